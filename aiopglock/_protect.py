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
every enclosing one, so an outer prioritizer keeps protecting it. A block
that has ended is :meth:`closed <Protection.close>`: a context that still
holds it (a block exited in another task than the one that entered it)
protects nothing more through it.

A wait that ends (or a try-lock that succeeds: :func:`granted`) makes its
backend *exempt*: it holds a lock of the block's own work, and the
prioritizer never signals it (it would take the block's lock away to free
the block's own later wait). A wait that ended otherwise than granted
(cancelled, timed out) counts too: the server may have granted it anyway,
or still be ending it, while the lock module undoes it. The exemption
belongs to that grant, not to the backend: it ends when the lock's user
says the lock is released (:func:`released`), when the connection is back
in its pool (after the pool's reset, which releases session locks), or when
it is closed. So a backend reused from the pool by unrelated code is
signalled like any other.

Outside a ``prioritize()`` block :func:`waiting` costs one context-variable
lookup.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import asyncpg

from ._asyncpg import lease_of
from ._conntypes import Conn
from ._db import raw_connection

__all__ = ["Protection", "current", "granted", "released", "waiting"]


class _Grant:
    """One lock granted inside a block: exempt while it may still be held."""

    __slots__ = ("_lease", "_raw", "pid")

    def __init__(self, raw: asyncpg.Connection[Any], pid: int) -> None:
        self.pid = pid
        # Weak: a grant never keeps a connection alive. The lease is kept
        # strongly, so that a later lease's proxy can never be taken for it.
        self._raw = weakref.ref(raw)
        # The pool's proxy of the lease the grant was made in (asyncpg clears it
        # once the connection is back in the pool, after its reset has run;
        # its release counter is bumped before that reset, while session
        # locks are still held). An asyncpg that does not say: a grant stays
        # exempt until :func:`released`, or until the connection is closed.
        self._lease = lease_of(raw)

    def live(self) -> bool:
        """False once the connection is back in its pool, closed, or gone."""
        raw = self._raw()
        if raw is None or raw.is_closed():
            return False
        return lease_of(raw) is self._lease

    def on(self, raw: asyncpg.Connection[Any]) -> bool:
        return self._raw() is raw


class Protection:
    """The backends currently waiting on behalf of one ``prioritize()`` block."""

    __slots__ = ("_grants", "_seen", "_waiting", "closed", "listener", "parent")

    def __init__(self, parent: Protection | None = None) -> None:
        # pid -> number of waits in progress on that backend
        self._waiting: dict[int, int] = {}
        # locks granted inside the block, oldest first
        self._grants: list[_Grant] = []
        #: The enclosing block's Protection, if any: it protects the same waits.
        self.parent = parent
        #: Called (synchronously, in the waiting task) whenever a wait begins.
        self.listener: Callable[[], None] | None = None
        #: True once the block has ended.
        self.closed = False
        # pids that began a wait or got a grant since mark(), if marked
        self._seen: set[int] | None = None

    def pids(self) -> frozenset[int]:
        """The pids of the backends waiting for a lock right now."""
        return frozenset(self._waiting)

    def held(self) -> frozenset[int]:
        """The pids of the backends exempt now: a lock granted to them inside
        the block may still be held (see the module's docstring)."""
        self._grants = [grant for grant in self._grants if grant.live()]
        return frozenset(grant.pid for grant in self._grants)

    def mark(self) -> frozenset[int]:
        """The backends that are the block's own now (waiting or exempt);
        from now on, :meth:`since_mark` also names those that become so."""
        self._seen = set()
        return self.pids() | self.held()

    def since_mark(self) -> frozenset[int]:
        """The backends that are the block's own now, or became so at some
        point since :meth:`mark` (even if they have let go since)."""
        return frozenset(self._seen or ()) | self.pids() | self.held()

    def close(self) -> None:
        """The block ended: forget everything, protect nothing more."""
        self.closed = True
        self.listener = None
        self._waiting.clear()
        self._grants.clear()

    def _chain(self) -> Iterator[Protection]:
        protection: Protection | None = self
        while protection is not None:
            if not protection.closed:
                yield protection
            protection = protection.parent

    def add(self, pid: int) -> None:
        for protection in self._chain():
            protection._waiting[pid] = protection._waiting.get(pid, 0) + 1
            if protection._seen is not None:
                protection._seen.add(pid)
            if protection.listener is not None:
                protection.listener()

    def exempt(self, conn: Conn, pid: int | None = None) -> None:
        """Record a lock granted (or possibly granted) to ``conn``'s backend
        inside the block. Nothing to record once the connection is gone."""
        raw = raw_connection(conn)
        if raw is None or raw.is_closed():
            return
        if pid is None:
            pid = raw.get_server_pid()
        for protection in self._chain():
            grants = [grant for grant in protection._grants if grant.live()]
            grants.append(_Grant(raw, pid))
            protection._grants = grants
            if protection._seen is not None:
                protection._seen.add(pid)

    def release(self, conn: Conn) -> None:
        """The latest lock granted to ``conn`` inside the block is released."""
        raw = raw_connection(conn)
        if raw is None:
            return
        for protection in self._chain():
            for index in range(len(protection._grants) - 1, -1, -1):
                if protection._grants[index].on(raw):
                    del protection._grants[index]
                    break

    def discard(self, pid: int) -> None:
        """A wait of ``pid`` has ended (granted or not)."""
        for protection in self._chain():
            count = protection._waiting.get(pid, 0) - 1
            if count > 0:
                protection._waiting[pid] = count
            else:
                protection._waiting.pop(pid, None)


_current: ContextVar[Protection | None] = ContextVar("aiopglock_protection", default=None)
current = _current


_UNPROTECTED: contextlib.AbstractContextManager[None] = contextlib.nullcontext()


def _open() -> Protection | None:
    """The innermost running block's Protection in this context, if any."""
    protection = _current.get()
    while protection is not None and protection.closed:
        protection = protection.parent
    return protection


def waiting(conn: Conn) -> contextlib.AbstractContextManager[None]:
    """Mark ``conn``'s backend as waiting for a lock on behalf of the enclosing
    ``prioritize()`` block, if there is one, for the duration of the ``with``.

    When the ``with`` ends (the lock granted, or possibly granted: a
    cancelled or timed-out wait) the backend is exempt until
    :func:`released`, or until ``conn`` goes back to its pool. A lock module
    that finds such a wait held nothing calls :func:`released` too.

    Example::

        with waiting(conn):
            await conn.execute("SELECT pg_advisory_lock($1)", key)
        ...
        await conn.execute("SELECT pg_advisory_unlock($1)", key)
        released(conn)
    """
    protection = _current.get()
    if protection is None:
        return _UNPROTECTED  # the common case costs no allocation
    protection = _open()
    if protection is None:
        return _UNPROTECTED
    return _waiting(protection, conn)


@contextlib.contextmanager
def _waiting(protection: Protection, conn: Conn) -> Iterator[None]:
    pid = conn.get_server_pid()
    protection.add(pid)
    try:
        yield
    finally:
        # Granted, or ended otherwise (cancelled, timed out, failed): the
        # server may have granted it all the same, or still be ending the
        # wait, and the lock module is now undoing it. Either way the
        # backend is the block's own until it says the lock is released or
        # the connection goes back to its pool. Recorded before the wait is
        # forgotten, so the monitor never sees the backend in neither set.
        protection.exempt(conn, pid)
        protection.discard(pid)


def granted(conn: Conn) -> None:
    """Record that ``conn``'s backend was granted a lock without waiting (a
    try-lock) inside the enclosing ``prioritize()`` block, if there is one: it
    holds the block's own lock and is not signalled until :func:`released`
    (or until ``conn`` goes back to its pool).

    Example::

        if await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
            granted(conn)
    """
    protection = _open()
    if protection is not None:
        protection.exempt(conn)


def released(conn: Conn) -> None:
    """Record that the latest lock granted to ``conn`` inside the enclosing
    ``prioritize()`` block (:func:`waiting`, :func:`granted`) was released:
    its backend is no longer exempt on that lock's account. Returning
    ``conn`` to its pool ends every exemption of it without this call.

    Example::

        await conn.execute("SELECT pg_advisory_unlock($1)", key)
        released(conn)
    """
    protection = _open()
    if protection is not None:
        protection.release(conn)
