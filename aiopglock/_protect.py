"""Which lock waits a running :func:`aiopglock.prioritize` block protects.

``prioritize()`` without a Connection as ``db=`` protects "every lock wait
aiopglock itself issues inside the block". It sets a :class:`Protection` in a
context variable; every lock module wraps its waiting statement in
:func:`waiting`, which records the waiting backend's pid there for as long
as the statement runs. The prioritizer's background task reads
:meth:`Protection.pids` and is woken up by :meth:`Protection.add`, so that a
new wait is looked at promptly rather than at the next interval.

A context variable is copied into the tasks started from a context, so the
waits of tasks started inside the block are protected too (while it runs).
Nested blocks: a wait is recorded in the innermost :class:`Protection` and in
every enclosing one, so an outer prioritizer keeps protecting it.

A wait that ends granted leaves its backend in :meth:`Protection.held` for the
rest of the block: that backend holds a lock of the block's own work, and the
prioritizer never signals it (it would take the block's lock away to free
the block's own later wait).

Outside a ``prioritize()`` block :func:`waiting` costs one context-variable
lookup.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

__all__ = ["Protection", "current", "granted", "waiting"]


class Protection:
    """The backends currently waiting on behalf of one ``prioritize()`` block."""

    __slots__ = ("_held", "_waiting", "listener", "parent")

    def __init__(self, parent: Protection | None = None) -> None:
        # pid -> number of waits in progress on that backend
        self._waiting: dict[int, int] = {}
        # backends whose wait was granted inside the block
        self._held: set[int] = set()
        #: The enclosing block's Protection, if any: it protects the same waits.
        self.parent = parent
        #: Called (synchronously, in the waiting task) whenever a wait begins.
        self.listener: Callable[[], None] | None = None

    def pids(self) -> frozenset[int]:
        """The pids of the backends waiting for a lock right now."""
        return frozenset(self._waiting)

    def held(self) -> frozenset[int]:
        """The pids of the backends whose wait was granted inside the block."""
        return frozenset(self._held)

    def _chain(self) -> Iterator[Protection]:
        protection: Protection | None = self
        while protection is not None:
            yield protection
            protection = protection.parent

    def add(self, pid: int) -> None:
        for protection in self._chain():
            protection._waiting[pid] = protection._waiting.get(pid, 0) + 1
            if protection.listener is not None:
                protection.listener()

    def hold(self, pid: int) -> None:
        """Record a lock granted without a wait (a try-lock) to ``pid``."""
        for protection in self._chain():
            protection._held.add(pid)

    def discard(self, pid: int, *, granted: bool = False) -> None:
        for protection in self._chain():
            if granted:
                protection._held.add(pid)
            count = protection._waiting.get(pid, 0) - 1
            if count > 0:
                protection._waiting[pid] = count
            else:
                protection._waiting.pop(pid, None)


_current: ContextVar[Protection | None] = ContextVar("aiopglock_protection", default=None)
current = _current


_UNPROTECTED: contextlib.AbstractContextManager[None] = contextlib.nullcontext()


def waiting(conn: Any) -> contextlib.AbstractContextManager[None]:
    """Mark ``conn``'s backend as waiting for a lock on behalf of the enclosing
    ``prioritize()`` block, if there is one, for the duration of the ``with``."""
    protection = _current.get()
    if protection is None:
        return _UNPROTECTED  # the common case costs no allocation
    return _waiting(protection, conn)


@contextlib.contextmanager
def _waiting(protection: Protection, conn: Any) -> Iterator[None]:
    pid = conn.get_server_pid()
    protection.add(pid)
    granted = False
    try:
        yield
        granted = True  # the statement returned: the lock is the block's
    finally:
        protection.discard(pid, granted=granted)


def granted(conn: Any) -> None:
    """Record that ``conn``'s backend was granted a lock without waiting (a
    try-lock) inside the enclosing ``prioritize()`` block, if there is one: it
    holds the block's own lock and is never signalled."""
    protection = _current.get()
    if protection is not None:
        protection.hold(conn.get_server_pid())
