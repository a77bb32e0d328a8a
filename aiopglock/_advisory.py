"""Advisory locks: ``aiopglock.advisory`` and its handle, ``AdvisoryLock``.

The handle keeps the driver (enter, exit) and delegates each concern:

- ``_advisory_steps``: the statements (lock, under a savepoint in a caller's
  transaction; undo and resolve an interrupted wait on the server; unlock,
  or let a pool's reset unlock). An ambiguous outcome is resolved on the
  server before anything is raised, and a connection whose state cannot be
  confirmed is terminated, never reused.
- ``_advisory_owned``: ``xact=True`` in a transaction aiopglock opens.
- ``_claims``: exclusion between tasks sharing one Connection (PostgreSQL
  re-enters per session), and who else in this process wants the key.
- ``_reentry``: the task's holds, for nesting.
- ``_liveness``: whether the holding connection is still there.
- ``_concurrency``: shielded cleanup that delivers a cancellation met in it,
  and the one way a lost lock reaches the block: a single raw
  ``Task.cancel()`` (:class:`~aiopglock._concurrency.BlockCanceller`),
  never a cancel scope, since the block may be exited in another task than
  the one that entered it; ``LockLost`` replaces it at exit.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from . import _sql
from ._advisory_owned import enter_owned, exit_owned
from ._advisory_steps import LockSteps, release_held
from ._claims import KeyClaim
from ._concurrency import BlockCanceller, Cleanup, deliver_lost, foreign_cancel
from ._conntypes import Conn, Pool, RawConn
from ._db import DB, Deadline, PoolFront, check_db, lease, raw_connection, resolve_db
from ._errors import UsageError
from ._handle import Raise, Return, SideEffect, Skip
from ._handle import _AdvisorySpec as _AdvisorySpec  # the Locker imports these from here
from ._handle import _LockHandle as _LockHandle
from ._keys import AdvisoryKey, Key
from ._liveness import Liveness
from ._reentry import advisory_holds as holds
from ._reentry import check_xact_left as check_xact_left  # the Locker imports these from here
from ._reentry import has_xact_left as has_xact_left
from ._reentry import nested_fence, note_xact_left
from ._server import check_lock_target
from ._timeouts import Timeout

__all__ = ["AdvisoryLock", "Raise", "Return", "SideEffect", "Skip", "advisory"]

logger = logging.getLogger("aiopglock")


class AdvisoryLock(_LockHandle):
    """The handle of one advisory lock acquisition (what ``async with`` yields).

    ``bool(lock)`` is True iff the lock was acquired. Attributes: ``key`` (as
    :func:`aiopglock.advisory_key` returns it), ``shared``, ``xact``,
    ``acquired``, ``lost`` (the holding connection died while held), ``pid``
    (the server process holding it, or None), ``connection`` (see below),
    ``fence`` (with ``fence=True``: the grant's fencing token, else None).

    Example::

        async with aiopglock.advisory("invoice:42", db=pool, timeout=5) as lock:
            if not lock:
                return "busy"
            print(lock.pid, lock.key)
    """

    __slots__ = (
        "_cancel_on_lost",
        "_canceller",
        "_claims",
        "_conn",
        "_liveness",
        "_outer",
        "_owned",
        "_pool",
        "_raw",
        "_registered",
        "_steps",
        "_task",
        "_timeout",
        "_tx",
        "acquired",
        "fence",
        "key",
        "pid",
        "shared",
        "xact",
    )

    def __init__(
        self,
        key: AdvisoryKey,
        *,
        shared: bool,
        xact: bool,
        timeout: float | None,
        cancel_on_lost: bool,
        fence: bool = False,
        name: str | None = None,
        slot: int | None = None,
    ) -> None:
        self.key = key
        self.shared = shared
        self.xact = xact
        # name/slot: the str the key was made from, shown on the server.
        self._steps = LockSteps(key, shared=shared, xact=xact, fence=fence, name=name, slot=slot)
        self.fence: int | None = None
        self.acquired = False
        self.pid: int | None = None
        self._timeout = timeout
        self._cancel_on_lost = cancel_on_lost
        self._lost = False
        self._lost_reason = ""
        self._outer: AdvisoryLock | None = None
        self._conn: Conn | None = None
        self._raw: RawConn | None = None
        self._claims = KeyClaim(key, shared)
        self._pool: Pool | None = None
        self._canceller: BlockCanceller | None = None
        # xact=True on a Pool or a Connection outside a transaction: the
        # transaction aiopglock opened (asyncpg's own Transaction object).
        self._owned = False
        self._tx: Any = None
        # Whether this handle is the task's registered (outermost) hold.
        self._registered = False
        self._task: asyncio.Task[Any] | None = None
        self._liveness = Liveness(self._mark_lost)

    @property
    def connection(self) -> Any:
        """The connection for the block's statements, or None.

        - ``xact=True``: the connection whose transaction holds the lock; with
          a Pool or a Connection outside a transaction, the one whose
          transaction aiopglock opened for the block (``lock.connection.transaction()``
          nests a savepoint in it, as on plain asyncpg);
        - a session lock on a Connection: that connection;
        - a session lock on a Pool: None (the connection is aiopglock's, for
          the lock's lifetime).

        None when the lock was not acquired and after the block.

        Example::

            async with aiopglock.advisory("k", db=pool, xact=True) as lock:
                await lock.connection.execute("UPDATE jobs SET done = true")
        """
        if self._outer is not None and self._conn is None:
            # A Locker's hold has no connection of the caller's.
            return getattr(self._outer, "connection", None)
        if not self.acquired or (self._pool is not None and not self.xact):
            return None
        return self._conn

    # -- acquiring ---------------------------------------------------------

    def _try_reenter(self, task: asyncio.Task[Any], target: Pool | Conn) -> bool:
        outer: AdvisoryLock | None = holds.outer(task, self.key, shared=self.shared)
        if outer is None:
            return False
        if self.xact and not outer.xact:
            # Held as a session lock, asked for until the caller's transaction
            # ends (which may outlive the session hold): that needs the
            # server's transaction-level lock, not a nested hold. On the
            # session holding the key it is granted at once.
            if not isinstance(target, asyncpg.Pool) and raw_connection(target) is outer._raw:
                return False
            raise UsageError(
                f"this task holds advisory key {self.key!r} as a session lock on "
                "another connection: a transaction-level lock on this one would "
                f"wait for that hold, i.e. for itself; {outer._xact_elsewhere_fix}"
            )
        self._take_fence_of(outer)
        self._outer = outer
        self.acquired = True
        self.pid = outer.pid
        return True

    def _take_fence_of(self, outer: Any) -> None:
        """A fenced hold nested in ``outer`` shares its grant, so its token."""
        if self._steps.fenced:
            self.fence = nested_fence(outer, self.key)

    async def _enter(self, target: Pool | Conn, task: asyncio.Task[Any]) -> None:
        """Acquire on ``target`` (a Pool or Connection) for ``task`` (the
        current one). On return, ``acquired`` tells; nothing is held (and no
        connection leased) unless it is True."""
        self._task = task
        if self.xact and (isinstance(target, asyncpg.Pool) or not target.is_in_transaction()):
            await enter_owned(self, target, task)
            return
        if self._try_reenter(task, target):
            return
        timeout = self._timeout
        conn: Conn | None
        if isinstance(target, asyncpg.Pool):
            # One timeout for the pool wait and the lock wait together.
            deadline = Deadline(timeout)
            self._claims.want()
            try:
                conn = await lease(target, timeout)
            except BaseException:
                self._claims.release()
                raise
            if conn is None:  # every connection stayed in use: not acquired
                self._claims.release()
                return
            self._pool = target
            timeout = deadline.remaining()
        else:
            conn = target
            timeout = await self._claims.claim_on(raw_connection(conn), task, timeout)
            if timeout is not None and timeout < 0:
                return  # another task sharing this connection holds the key
        self._conn = conn
        try:
            await check_lock_target(conn, session=not self.xact)
            await check_xact_left(conn, task, self.key)
            granted = await self._steps.lock(conn, timeout)
        except BaseException:
            # The lock statement resolved any ambiguity (or discarded the
            # connection); the exception in flight outranks a cancellation
            # met giving the connection back.
            await self._not_held(conn, raising=True)
            raise
        if granted:
            self.acquired = True
            self._after_grant(task)
        else:
            await self._not_held(conn, raising=False)

    async def _not_held(self, conn: Conn, *, raising: bool) -> None:
        """Not acquired after all: end the claims, give a Pool's connection
        back. ``raising``: the caller re-raises an exception in flight."""
        self._claims.release()
        if self._pool is not None:
            assert isinstance(conn, PoolConnectionProxy)  # leased from the pool
            with Cleanup() as cleanup:
                await cleanup.give_back(self._pool, conn, discard=False)
                self._conn = None
                if raising:
                    cleanup.forget()

    def _after_grant(self, task: asyncio.Task[Any]) -> None:
        conn = self._conn
        assert conn is not None  # set by _enter before the grant
        self.pid = conn.get_server_pid()
        self.fence = self._steps.fence
        # Not when this is a transaction-level lock taken under the task's
        # own session hold: that one stays the outermost.
        self._registered = holds.register(task, self.key, self)
        raw = raw_connection(conn)
        self._raw = raw
        # A heartbeat only for a connection of aiopglock's own.
        named = self._steps.named
        self._liveness.start(
            conn,
            raw,
            heartbeat=self._pool is not None and not self.xact,
            beat=_sql.HEARTBEAT if named is None else named.heartbeat,
        )
        if self._cancel_on_lost:
            # Losing the lock cancels the block's task once, as
            # asyncio.timeout() does; no cancel scope spans the block, which
            # may be exited in another task than the one that entered it.
            self._canceller = BlockCanceller(task)
        self._liveness.check()

    # -- releasing ---------------------------------------------------------

    async def _exit(self, exc: BaseException | None) -> None:
        """Release. Raises LockLost when the lock was lost while held (which
        replaces the cancellation aiopglock itself delivered for that); a
        cancellation from anyone else propagates."""
        canceller, self._canceller = self._canceller, None
        # First, before any await: stop delivering, and tell whether the
        # cancellation in flight (or still to come) is the one delivered here.
        ours = canceller.settle(exc) if canceller is not None else False
        if self._owned:
            await exit_owned(self, exc, ours, canceller)
            return
        if self._outer is not None:
            # Nested: the outermost handle holds (and releases) the lock.
            self.acquired = False
            outer = self._outer
            if outer.lost and not foreign_cancel(exc, outer._canceller):
                raise outer._lost_error() from exc
            return
        if not self.acquired:
            return
        self._unregister()
        conn = self._conn
        assert conn is not None  # acquired on a connection of its own
        if self.xact and self._raw is not None and self._task is not None and self.pid:
            note_xact_left(self._task, self.key, self._raw, self.pid)
        # Without an exception in flight, cancellation is unlikely: the
        # shield is entered only if a step is interrupted.
        with Cleanup(lazy=exc is None) as cleanup:
            try:
                await release_held(self, conn, exc, cleanup)
            finally:
                self._claims.release()
                self._conn = None
                self.acquired = False
            if self._lost:
                await deliver_lost(self._lost_error(), exc, ours, canceller, cleanup, self._task)

    def _unregister(self) -> None:
        """Forget this handle as the task's outermost hold of its key."""
        if self._registered:
            self._registered = False
            if self._task is not None:
                holds.unregister(self._task, self.key, self)


class Advisory(_AdvisorySpec[Any]):
    """An advisory lock request: an async context manager and a decorator.

    Built by :func:`aiopglock.advisory`; holds only configuration, so one
    instance can be entered by many tasks at once and every call of a
    decorated function gets its own :class:`AdvisoryLock`.

    Example::

        invoices = aiopglock.advisory("invoices", db=pool, timeout=5)

        async def bill() -> None:
            async with invoices as lock:  # safe to share between tasks
                if lock:
                    ...
    """

    __slots__ = ("_db",)

    def __init__(
        self,
        key: Key | None = None,
        *,
        db: DB | None = None,
        shared: bool = False,
        xact: bool = False,
        timeout: Timeout = None,
        side_effect: SideEffect | None = None,
        cancel_on_lost: bool = True,
        fence: bool = False,
    ) -> None:
        self._configure(key, shared, xact, timeout, side_effect, cancel_on_lost, fence)
        check_db(db)
        self._db = db

    def __repr__(self) -> str:
        return (
            f"aiopglock.advisory({self._key!r}, shared={self._shared}, xact={self._xact}, "
            f"timeout={self._timeout}, side_effect={self._side_effect!r})"
        )

    def _new_lock(self, key: AdvisoryKey, text: str | None = None) -> AdvisoryLock:
        return AdvisoryLock(
            key,
            shared=self._shared,
            xact=self._xact,
            timeout=self._timeout,
            cancel_on_lost=self._cancel_on_lost,
            fence=self._fence,
            name=text,
        )

    async def _acquire(
        self, key: AdvisoryKey, side_effect: SideEffect, task: Any, text: str | None = None
    ) -> Any:
        target = resolve_db(self._db, front=True)
        if isinstance(target, PoolFront):
            # A Locker takes the lock itself: same arguments, same handle API.
            return await target.enter_advisory(
                key,
                shared=self._shared,
                xact=self._xact,
                timeout=self._timeout,
                side_effect=side_effect,
                cancel_on_lost=self._cancel_on_lost,
                fence=self._fence,
                text=text,
            )
        lock = self._new_lock(key, text)
        await lock._enter(target, task)
        if not lock.acquired and side_effect is Raise:
            raise self._not_acquired(key)
        return lock


def advisory(
    key: Key | None = None,
    *,
    db: DB | None = None,
    shared: bool = False,
    xact: bool = False,
    timeout: Timeout = None,
    side_effect: SideEffect | None = None,
    cancel_on_lost: bool = True,
    fence: bool = False,
) -> Advisory:
    """A PostgreSQL advisory lock, as an async context manager or a decorator.

    - ``key``: ``str`` (hashed as django-pglock does), ``int`` (int64) or
      ``(int, int)`` (two int4); see :func:`aiopglock.advisory_key`. A
      decorator defaults it to ``"module.qualname"`` of the function.
    - ``db``: Pool, Connection, zero-argument callable, or the configured default.
    - ``shared``: a shared lock (many holders) instead of an exclusive one.
    - ``xact``: a transaction-level lock, held until its transaction ends.
      On a Connection inside an open transaction, it is taken in that
      transaction. On a Pool, or a Connection outside a transaction,
      aiopglock opens a transaction (``conn.transaction()``), takes the lock
      in it and runs the block inside it (``lock.connection``): COMMIT when
      the block succeeds, ROLLBACK on error, cancellation or not acquired.
    - ``timeout``: ``None`` waits without a limit of ours, ``0`` tries once
      and never waits for a pool connection either (none free: not
      acquired), ``> 0`` (seconds or ``timedelta``) bounds the whole wait,
      pool connection included; the lock wait is enforced by the server.
    - ``side_effect``: ``Return`` (context-manager default), ``Raise``
      (decorator default), ``Skip`` (decorators only).
    - ``cancel_on_lost``: when the holding connection dies, cancel the block
      once, as ``asyncio.timeout()`` does (its ``except``/``finally`` awaits
      run), and raise :class:`aiopglock.LockLost` out of the ``async with``
      (default), or let it finish and raise at exit (False).
    - ``fence``: give the handle a fencing token, ``lock.fence`` (an ``int``
      taken on the server after the grant, in the lock statement itself:
      the xid it assigns, greater than every fence issued before anywhere on
      the cluster; see docs/fencing.md). Inside a caller's transaction that
      has already written, refused with :class:`aiopglock.UsageError`.
      Without it ``lock.fence`` is None and nothing extra is sent.

    Example::

        async with aiopglock.advisory("invoice:42", db=pool, timeout=5) as lock:
            if lock:
                await bill(42)

        async with aiopglock.advisory("invoice:42", db=pool, xact=True) as lock:
            if lock:  # the block runs in the lock's transaction
                await lock.connection.execute("UPDATE invoices SET paid = true")

        @aiopglock.advisory(timeout=0, side_effect=aiopglock.Skip, db=lambda: pool)
        async def nightly() -> None: ...

        async with aiopglock.advisory("report", db=pool, fence=True) as lock:
            await store.write(data, fence=lock.fence)  # refused once superseded
    """
    return Advisory(
        key,
        db=db,
        shared=shared,
        xact=xact,
        timeout=timeout,
        side_effect=side_effect,
        cancel_on_lost=cancel_on_lost,
        fence=fence,
    )
