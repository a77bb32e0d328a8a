"""Re-entry: which keys a task holds already, and which it left held in a
transaction of its caller's.

Re-entry is per task: a child task does not inherit its parent's holds
(contextvars would copy them), so a registry is keyed by the task itself. It
maps each key the task holds to the outermost hold of it; a nested request
of the same task for the same key joins that hold instead of asking the
server again (which would wait for itself, or count the session's
re-entries). :class:`Reentry` is that registry, for any kind of hold (an
``AdvisoryLock``, a Locker's handle).
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any, Generic, Protocol, TypeVar

from . import _sql
from ._conntypes import Conn, RawConn
from ._db import raw_connection
from ._errors import UsageError
from ._keys import AdvisoryKey, lock_ids

__all__ = [
    "Reentry",
    "advisory_holds",
    "check_xact_left",
    "has_xact_left",
    "nested_fence",
    "note_xact_left",
]


class _Hold(Protocol):
    shared: bool


H = TypeVar("H", bound=_Hold)


class Reentry(Generic[H]):
    """task -> key -> the task's outermost hold of the key.

    A plain dict (a weak one costs a weakref per lock): every entry is removed
    when its hold ends, which ``async with`` and the decorator always reach.

    Example::

        holds: Reentry[AdvisoryLock] = Reentry()
        outer = holds.held(task, key)        # join it, if any
        registered = holds.register(task, key, lock)  # False: one is outermost
        ...
        holds.unregister(task, key, lock)
    """

    __slots__ = ("_by_task",)

    def __init__(self) -> None:
        self._by_task: dict[asyncio.Task[Any], dict[AdvisoryKey, H]] = {}

    def held(self, task: asyncio.Task[Any], key: AdvisoryKey) -> H | None:
        """The task's outermost hold of ``key``, or None."""
        by_key = self._by_task.get(task)
        return by_key.get(key) if by_key else None

    def outer(self, task: asyncio.Task[Any], key: AdvisoryKey, *, shared: bool) -> H | None:
        """The task's outermost hold of ``key`` for a new request of it to
        nest in, or None. An exclusive request under a shared hold is a
        :class:`UsageError`: upgrading in place would wait for itself."""
        outer = self.held(task, key)
        if outer is not None and outer.shared and not shared:
            raise UsageError(
                f"this task holds advisory key {key!r} shared and asks for it "
                "exclusive: upgrading in place would deadlock against itself; "
                "release the shared hold first"
            )
        return outer

    def register(self, task: asyncio.Task[Any], key: AdvisoryKey, hold: H) -> bool:
        """Make ``hold`` the task's outermost hold of ``key`` unless there is
        one already; True when it is."""
        by_key = self._by_task.setdefault(task, {})
        if key in by_key:
            return False
        by_key[key] = hold
        return True

    def unregister(self, task: asyncio.Task[Any], key: AdvisoryKey, hold: H) -> None:
        """Forget ``hold`` as the task's outermost hold of ``key``."""
        by_key = self._by_task.get(task)
        if by_key is not None and by_key.get(key) is hold:
            del by_key[key]
            if not by_key:
                del self._by_task[task]


#: The holds of ``aiopglock.advisory()`` in this process.
advisory_holds: Reentry[Any] = Reentry()


def nested_fence(outer: object, key: AdvisoryKey) -> int:
    """The fencing token of a ``fence=True`` hold nested in ``outer``: it
    shares that grant, so its token. Refused (``UsageError``) when the
    outer hold has none.

    Example::

        lock.fence = nested_fence(outer, lock.key)
    """
    fence = getattr(outer, "fence", None)
    if fence is None:
        raise UsageError(
            f"this task already holds advisory key {key!r} without fence=True: "
            "a nested hold shares that grant, which has no fencing token; take the "
            "outermost hold with fence=True"
        )
    return int(fence)


# Transaction-level holds whose block has ended but whose transaction (the
# caller's) may still be open: the server keeps such a lock until COMMIT or
# ROLLBACK, which aiopglock does not see. Per task and key: the connection
# (weakly) and its backend. Consulted only when the same task asks for the
# key again on another connection, where waiting would wait for itself.
_xact_left: weakref.WeakKeyDictionary[
    asyncio.Task[Any], dict[AdvisoryKey, tuple[weakref.ReferenceType[RawConn], int]]
] = weakref.WeakKeyDictionary()


def note_xact_left(task: asyncio.Task[Any], key: AdvisoryKey, raw: RawConn, pid: int) -> None:
    """At the end of the block of an ``xact=True`` hold in the caller's
    transaction on ``raw`` (backend ``pid``): the server keeps the lock until
    that transaction ends."""
    left = _xact_left.setdefault(task, {})
    for other_key, (ref, _) in list(left.items()):  # transactions that have ended
        other = ref()
        if other is None or other.is_closed() or not other.is_in_transaction():
            del left[other_key]
    left[key] = (weakref.ref(raw), pid)


def has_xact_left(task: asyncio.Task[Any], key: AdvisoryKey) -> bool:
    """Whether ``task`` took ``key`` with ``xact=True`` in a transaction of
    its caller's that may still hold it (no I/O)."""
    left = _xact_left.get(task)
    return left is not None and key in left


async def check_xact_left(conn: Conn, task: asyncio.Task[Any], key: AdvisoryKey) -> None:
    """Refuse (``UsageError``) a request of ``task`` for ``key`` that would
    wait for the task's own transaction-level hold of it on another
    connection, whose transaction is still open: asked on the server through
    ``conn`` (the connection the request uses, or any of its pool's). Costs a
    round trip only when the task took the key with ``xact=True`` earlier.

    Example::

        await check_xact_left(conn, task, key)  # before a lock statement on conn
    """
    left = _xact_left.get(task)
    entry = left.get(key) if left else None
    if entry is None or left is None:
        return
    ref, pid = entry
    other = ref()
    if other is raw_connection(conn):
        return  # the same session: PostgreSQL re-enters
    holds = (
        other is not None
        and not other.is_closed()
        and other.is_in_transaction()
        and bool(await conn.fetchval(_sql.HELD_BY_BACKEND, pid, *lock_ids(key)))
    )
    if not holds:
        left.pop(key, None)
        if not left:
            _xact_left.pop(task, None)
        return
    raise UsageError(
        f"this task holds advisory key {key!r} at transaction level on another "
        f"connection (backend {pid}) whose transaction is still open: waiting for it "
        "here would wait for itself; take it on that connection, or end that "
        "transaction first"
    )
