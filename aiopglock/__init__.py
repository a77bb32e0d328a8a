"""aiopglock: PostgreSQL locks for asyncio services, on asyncpg.

Advisory locks that survive cancellation, with timeouts enforced by the
server and lost locks that never go unnoticed::

    import aiopglock

    async with aiopglock.advisory("invoice:42", db=pool, timeout=5) as lock:
        if lock:
            ...

See the README for every feature.
"""

from __future__ import annotations

from ._advisory import Advisory as Advisory
from ._advisory import AdvisoryLock as AdvisoryLock
from ._advisory import Raise as Raise
from ._advisory import Return as Return
from ._advisory import SideEffect as SideEffect
from ._advisory import Skip as Skip
from ._advisory import advisory as advisory
from ._db import configure as configure
from ._errors import Error as Error
from ._errors import LockLost as LockLost
from ._errors import LockNotAcquired as LockNotAcquired
from ._errors import UsageError as UsageError
from ._keys import advisory_key as advisory_key

__version__ = "0.1.0"

__all__ = [
    "Advisory",
    "AdvisoryLock",
    "Error",
    "LockLost",
    "LockNotAcquired",
    "Raise",
    "Return",
    "SideEffect",
    "Skip",
    "UsageError",
    "__version__",
    "advisory",
    "advisory_key",
    "configure",
]
