"""The exception tree of aiopglock.

::

    Error                          base of everything aiopglock raises itself
    ├── LockNotAcquired            (also a TimeoutError) a lock was not granted
    ├── LockLost                   a held lock vanished with its connection
    └── UsageError                 the call cannot work as written

Bad argument types and values are plain ``TypeError`` / ``ValueError``; errors
from asyncpg or the server that aiopglock does not interpret propagate
unchanged.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Error", "LockLost", "LockNotAcquired", "UsageError"]


class Error(Exception):
    """Raised for failures specific to aiopglock; the base of its exception tree.

    Example::

        try:
            async with aiopglock.advisory("job", db=pool, side_effect=aiopglock.Raise):
                ...
        except aiopglock.Error:
            ...
    """


class LockNotAcquired(Error, TimeoutError):
    """Raised when a lock was not granted (``timeout`` elapsed or ``timeout=0`` found it busy).

    Only raised under ``side_effect=aiopglock.Raise`` (the decorator default).
    ``key`` holds the advisory key as :func:`aiopglock.advisory_key` returns it
    (``None`` for other lock kinds).

    Example::

        try:
            async with aiopglock.advisory("job", db=pool, timeout=0,
                                          side_effect=aiopglock.Raise):
                ...
        except aiopglock.LockNotAcquired as exc:
            print("busy:", exc.key)
    """

    def __init__(self, message: str, *, key: Any = None) -> None:
        super().__init__(message)
        self.key = key


class LockLost(Error):
    """Raised when a held lock was lost: its connection died while the block ran.

    By default the block is cancelled and this is raised out of the
    ``async with``; with ``cancel_on_lost=False`` the block finishes and this
    is raised at exit. ``key`` and ``pid`` name the lock and the server
    process that held it.

    Example::

        try:
            async with aiopglock.advisory("job", db=pool):
                await long_work()
        except aiopglock.LockLost:
            ...  # the work ran partly unprotected: compensate or retry
    """

    def __init__(self, message: str, *, key: Any = None, pid: int | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.pid = pid


class UsageError(Error):
    """Raised when a call cannot work as written (no ``db`` configured,
    upgrading a shared hold to exclusive in one task, ...).

    Example::

        try:
            async with aiopglock.advisory("job", shared=True, db=pool):
                async with aiopglock.advisory("job", db=pool):
                    ...
        except aiopglock.UsageError as exc:
            print(exc)  # ... holds advisory key ... shared and asks for it exclusive ...
    """
