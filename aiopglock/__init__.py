"""aiopglock: PostgreSQL locks for asyncio services, on asyncpg.

Advisory locks that survive cancellation, with timeouts enforced by the
server and lost locks that never go unnoticed::

    import aiopglock

    async with aiopglock.advisory("invoice:42", db=pool, timeout=5) as lock:
        if lock:
            ...

The manual is in the docs/ folder of the source (a page per feature, built
with mkdocs); the README is a short tour.
"""

from __future__ import annotations

from ._advisory import Advisory as Advisory
from ._advisory import AdvisoryLock as AdvisoryLock
from ._advisory import Raise as Raise
from ._advisory import Return as Return
from ._advisory import SideEffect as SideEffect
from ._advisory import Skip as Skip
from ._advisory import advisory as advisory
from ._advisory_many import AdvisoryMany as AdvisoryMany
from ._advisory_many import AdvisoryManyLock as AdvisoryManyLock
from ._advisory_many import advisory_many as advisory_many
from ._db import configure as configure
from ._errors import Error as Error
from ._errors import LockLost as LockLost
from ._errors import LockNotAcquired as LockNotAcquired
from ._errors import UsageError as UsageError
from ._introspect import LockInfo as LockInfo
from ._introspect import cancel as cancel
from ._introspect import locks as locks
from ._introspect import terminate as terminate
from ._keys import advisory_key as advisory_key
from ._leader import Leader as Leader
from ._locker import Locker as Locker
from ._monitor import Action as Action
from ._monitor import Blocker as Blocker
from ._monitor import Cancel as Cancel
from ._monitor import Terminate as Terminate
from ._prioritize import Prioritize as Prioritize
from ._prioritize import Prioritizer as Prioritizer
from ._prioritize import prioritize as prioritize
from ._rows import RowLock as RowLock
from ._rows import RowLockStrength as RowLockStrength
from ._rows import Rows as Rows
from ._rows import rows as rows
from ._semaphore import Semaphore as Semaphore
from ._semaphore import SemaphoreSlot as SemaphoreSlot
from ._semaphore import semaphore as semaphore
from ._tables import Table as Table
from ._tables import TableLock as TableLock
from ._tables import TableLockMode as TableLockMode
from ._tables import table as table
from ._timeouts import TimeoutScope as TimeoutScope
from ._timeouts import lock_timeout as lock_timeout
from ._timeouts import statement_timeout as statement_timeout
from ._watchdog import Intervention as Intervention
from ._watchdog import Watchdog as Watchdog

__version__ = "0.1.0"

__all__ = [
    "Action",
    "Advisory",
    "AdvisoryLock",
    "AdvisoryMany",
    "AdvisoryManyLock",
    "Blocker",
    "Cancel",
    "Error",
    "Intervention",
    "Leader",
    "LockInfo",
    "LockLost",
    "LockNotAcquired",
    "Locker",
    "Prioritize",
    "Prioritizer",
    "Raise",
    "Return",
    "RowLock",
    "RowLockStrength",
    "Rows",
    "Semaphore",
    "SemaphoreSlot",
    "SideEffect",
    "Skip",
    "Table",
    "TableLock",
    "TableLockMode",
    "Terminate",
    "TimeoutScope",
    "UsageError",
    "Watchdog",
    "__version__",
    "advisory",
    "advisory_key",
    "advisory_many",
    "cancel",
    "configure",
    "lock_timeout",
    "locks",
    "prioritize",
    "rows",
    "semaphore",
    "statement_timeout",
    "table",
    "terminate",
]
