"""Advisory locks: ``aiopglock.advisory`` and its handle, ``AdvisoryLock``.

How a session lock stays cancellation-safe:

1. The lock statement is sent once. If it is interrupted (cancellation, a
   dropped result, any error but a definite "not granted"), or ended by
   ``lock_timeout`` (which can fire as the lock is granted: 55P03, and the
   session holds it anyway), the outcome is ambiguous: the server may have
   granted the lock just as the client gave up.
   aiopglock then asks the server (``pg_locks`` for ``pg_backend_pid()``) and
   releases the hold if there is one, before re-raising.
2. Release and that resolution run under a shield; a raw ``Task.cancel()``
   that gets through is remembered, the step is retried, and the cancellation
   is re-raised afterwards. A late CancelRequest that cancels the cleanup
   statement instead of the one it was meant for is retried too.
3. When cleanup cannot be confirmed, the connection is terminated, never
   reused: the server drops a dead session's locks.

Inside a transaction, every wait runs under a savepoint, so a failed or
interrupted wait is rolled back (taking any transaction-level grant with it)
and the caller's transaction stays usable.

``xact=True`` on a Pool or a Connection outside a transaction runs in a
transaction aiopglock opens with asyncpg's ``conn.transaction()`` (so the
block can nest one); ``BEGIN`` and ``COMMIT`` are never half-run, and any
failure or interruption rolls the whole transaction back, lock included.

A lost lock cancels the block once with a raw ``Task.cancel()``
(:class:`~aiopglock._cancel.BlockCanceller`), never with a cancel scope:
the block may be exited in another task than the one that entered it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import weakref
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar, cast

import anyio
import asyncpg

from . import _sql
from ._asyncpg import reset_unlocks, wait_released
from ._concurrency import BlockCanceller, Cleanup, Sweeper, mark_retrieved, run_through, sweeper
from ._db import (
    CLEANUP_STATEMENT_TIMEOUT,
    DB,
    Deadline,
    PoolFront,
    check_db,
    heartbeat_interval,
    lease,
    lock_table_full,
    raw_connection,
    resolve_db,
    terminate,
)
from ._decorate import target
from ._errors import LockLost, LockNotAcquired, UsageError
from ._handles import Entered
from ._keys import AdvisoryKey, Key, advisory_key, lock_ids
from ._protect import granted as protect_granted
from ._protect import released as protect_released
from ._protect import waiting
from ._server import check_lock_target
from ._timeouts import Timeout, to_milliseconds
from ._validate import check_bool, parse_timeout

__all__ = ["AdvisoryLock", "Raise", "Return", "SideEffect", "Skip", "advisory"]

logger = logging.getLogger("aiopglock")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


class SideEffect(enum.Enum):
    """What happens when a lock is not acquired.

    - ``Return``: the handle is falsy (context-manager default).
    - ``Raise``: raise :class:`aiopglock.LockNotAcquired` (decorator default).
    - ``Skip``: the decorated function is not run and the call returns ``None``
      (decorators only).

    Example::

        @aiopglock.advisory(timeout=0, side_effect=aiopglock.Skip)
        async def refresh_cache() -> None: ...
    """

    RETURN = "return"
    RAISE = "raise"
    SKIP = "skip"

    def __repr__(self) -> str:
        return f"aiopglock.{self.name.capitalize()}"


Return = SideEffect.RETURN
Raise = SideEffect.RAISE
Skip = SideEffect.SKIP


def _check_side_effect(value: object) -> SideEffect | None:
    if value is None or isinstance(value, SideEffect):
        return value
    raise ValueError(
        f"side_effect: expected aiopglock.Return, aiopglock.Raise or aiopglock.Skip, got {value!r}"
    )


# Re-entry is per task: a child task does not inherit its parent's holds
# (contextvars would copy them), so the registry is keyed by the task itself.
# It maps each key the task holds to the outermost handle holding it. A plain
# dict (a weak one costs a weakref per lock): every entry is removed when its
# handle exits, which ``async with`` and the decorator always reach.
_holds: dict[asyncio.Task[Any], dict[AdvisoryKey, AdvisoryLock]] = {}


# Transaction-level holds whose block has ended but whose transaction (the
# caller's) may still be open: the server keeps such a lock until COMMIT or
# ROLLBACK, which aiopglock does not see. Per task and key: the connection
# (weakly) and its backend. Consulted only when the same task asks for the
# key again on another connection, where waiting would wait for itself.
_xact_left: weakref.WeakKeyDictionary[
    asyncio.Task[Any], dict[AdvisoryKey, tuple[weakref.ReferenceType[Any], int]]
] = weakref.WeakKeyDictionary()


class _ConnHold:
    """A key claimed on a caller's Connection by one handle, from just before
    its lock statement until its exit."""

    __slots__ = ("lock", "released")

    def __init__(self, lock: AdvisoryLock) -> None:
        self.lock = lock
        self.released = asyncio.Event()


# PostgreSQL re-enters per session: two tasks sharing one Connection would both
# be granted the same key. Exclusion between them is kept here, by connection.
_conn_holds: dict[int, dict[AdvisoryKey, list[_ConnHold]]] = {}


class _ConnWatch:
    """The termination listener of one connection, registered once for its
    whole life (asyncpg's pool reset keeps it) rather than once per lock:
    registering a listener costs asyncpg an ``inspect`` call each time."""

    __slots__ = ("holders", "key", "ref")

    def __init__(self, raw: Any) -> None:
        self.key = id(raw)
        self.ref = weakref.ref(raw)
        self.holders: set[AdvisoryLock] = set()

    def __call__(self, _conn: object) -> None:
        # asyncpg drops its listeners once they have been called.
        if _watches.get(self.key) is self:
            del _watches[self.key]
        holders, self.holders = self.holders, set()
        for lock in holders:
            lock._mark_lost("its connection was closed")


_watches: dict[int, _ConnWatch] = {}

# How many handles of this process are acquiring or holding each key through
# a Pool: a release through the pool's reset is used only when no other one is.
_wanted: dict[AdvisoryKey, int] = {}


def _watch(raw: Any) -> _ConnWatch:
    watch = _watches.get(id(raw))
    if watch is None or watch.ref() is not raw:
        watch = _watches[id(raw)] = _ConnWatch(raw)
        raw.add_termination_listener(watch)
    return watch


def _unwatch(raw: Any, lock: AdvisoryLock) -> None:
    watch = _watches.get(id(raw))
    if watch is not None and watch.ref() is raw:
        watch.holders.discard(lock)


def _answered(failure: BaseException | None) -> bool:
    """Whether ``failure`` is the server's answer to a statement on a live
    session (rather than the session's end)."""
    if isinstance(failure, asyncpg.QueryCanceledError):
        return True
    return isinstance(failure, asyncpg.PostgresError) and not isinstance(
        failure,
        (asyncpg.PostgresConnectionError, asyncpg.exceptions.OperatorInterventionError),
    )


def _alive(conn: Any) -> bool:
    """Whether ``conn`` (a pool's proxy too) is still connected."""
    raw = raw_connection(conn)
    return raw is not None and not raw.is_closed()


def _foreign_cancel(exc: BaseException | None, canceller: BlockCanceller | None) -> bool:
    """Whether ``exc`` is a cancellation from someone else than ``canceller``
    (not yet settled)."""
    if not isinstance(exc, asyncio.CancelledError):
        return False
    return canceller is None or not canceller.fired or canceller.others()


def _current_task() -> asyncio.Task[Any]:
    task = asyncio.current_task()
    if task is None:  # pragma: no cover - asyncpg needs a running task anyway
        raise UsageError("aiopglock must be used from within an asyncio task")
    return task


def has_xact_left(task: asyncio.Task[Any], key: AdvisoryKey) -> bool:
    """Whether ``task`` took ``key`` with ``xact=True`` in a transaction of
    its caller's that may still hold it (no I/O)."""
    left = _xact_left.get(task)
    return left is not None and key in left


async def check_xact_left(conn: Any, task: asyncio.Task[Any], key: AdvisoryKey) -> None:
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


class _LockHandle:
    """What the handles of ``advisory()`` and ``Locker.advisory()`` show alike:
    truth, ``lost`` (through the outermost handle when nested), the repr and
    the ``LockLost`` they raise."""

    __slots__ = ()

    key: AdvisoryKey
    shared: bool
    xact: bool
    acquired: bool
    pid: int | None
    _lost: bool
    _lost_reason: str
    _outer: Any

    def __bool__(self) -> bool:
        return self.acquired

    @property
    def lost(self) -> bool:
        """True once the connection holding this lock has died."""
        if self._outer is not None:
            return bool(self._outer.lost)
        return self._lost

    def __repr__(self) -> str:
        mode = "shared" if self.shared else "exclusive"
        scope = "xact" if self.xact else "session"
        if self.lost:
            state = "lost"
        elif self.acquired:
            state = "acquired" if self._outer is None else "acquired (nested)"
        else:
            state = "not acquired"
        pid = f" pid={self.pid}" if self.pid is not None else ""
        return f"<{type(self).__name__} key={self.key!r} {mode} {scope} {state}{pid}>"

    def _lost_error(self) -> LockLost:
        return LockLost(
            f"advisory lock {self.key!r} was lost while held: {self._lost_reason}",
            key=self.key,
            pid=self.pid,
        )


class AdvisoryLock(_LockHandle):
    """The handle of one advisory lock acquisition (what ``async with`` yields).

    ``bool(lock)`` is True iff the lock was acquired. Attributes: ``key`` (as
    :func:`aiopglock.advisory_key` returns it), ``shared``, ``xact``,
    ``acquired``, ``lost`` (the holding connection died while held), ``pid``
    (the server process holding it, or None), ``connection`` (see below).

    Example::

        async with aiopglock.advisory("invoice:42", db=pool, timeout=5) as lock:
            if not lock:
                return "busy"
            print(lock.pid, lock.key)
    """

    __slots__ = (
        "_cancel_on_lost",
        "_canceller",
        "_claim",
        "_conn",
        "_elsewhere",
        "_expired",
        "_hb_stop",
        "_hb_task",
        "_key_args",
        "_lost",
        "_lost_reason",
        "_outer",
        "_owned",
        "_pool",
        "_raw",
        "_registered",
        "_stmts",
        "_sweeper",
        "_task",
        "_timeout",
        "_tx",
        "_wants",
        "acquired",
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
    ) -> None:
        self.key = key
        self.shared = shared
        self.xact = xact
        pair = isinstance(key, tuple)
        self._key_args: tuple[int, ...] = key if isinstance(key, tuple) else (key,)
        self._stmts = _sql.ADVISORY_STATEMENTS[shared, xact, pair]
        self.acquired = False
        self.pid: int | None = None
        self._timeout = timeout
        self._cancel_on_lost = cancel_on_lost
        self._lost = False
        self._lost_reason = ""
        self._outer: AdvisoryLock | None = None
        # A hold of this key by the same task that aiopglock keeps on another
        # session (a Locker's), which an xact=True request nests in.
        self._elsewhere: Any = None
        self._conn: Any = None
        self._raw: Any = None
        self._claim: tuple[int, _ConnHold] | None = None
        self._pool: Any = None
        self._canceller: BlockCanceller | None = None
        # xact=True on a Pool or a Connection outside a transaction: the
        # transaction aiopglock opened (asyncpg's own Transaction object).
        self._owned = False
        self._tx: Any = None
        # Whether this handle is the task's registered (outermost) hold.
        self._registered = False
        self._task: asyncio.Task[Any] | None = None
        self._sweeper: Sweeper | None = None
        self._expired = False
        self._wants = False
        self._hb_task: asyncio.Task[None] | None = None
        self._hb_stop: asyncio.Event | None = None

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
            return self._outer.connection
        if not self.acquired or (self._pool is not None and not self.xact):
            return None
        return self._conn

    # -- acquiring ---------------------------------------------------------

    def _args(self) -> tuple[int, ...]:
        return self._key_args

    def _statements(self) -> _sql.AdvisoryStatements:
        return self._stmts

    def _held_by_task(self, task: asyncio.Task[Any]) -> AdvisoryLock | None:
        """The task's outermost hold of this key, if any (checked for an upgrade)."""
        holds = _holds.get(task)
        outer = holds.get(self.key) if holds else None
        if outer is not None and outer.shared and not self.shared:
            raise UsageError(
                f"this task holds advisory key {self.key!r} shared and asks for it "
                "exclusive: upgrading in place would deadlock against itself; "
                "release the shared hold first"
            )
        return outer

    def _try_reenter(self, task: asyncio.Task[Any], target: Any) -> bool:
        outer = self._held_by_task(task)
        if outer is None:
            return False
        if self.xact and not outer.xact:
            # Held as a session lock, asked for until the caller's transaction
            # ends (which may outlive the session hold): that needs the
            # server's transaction-level lock, not a nested hold. On the
            # session holding the key it is granted at once.
            if raw_connection(target) is outer._raw:
                return False
            raise UsageError(
                f"this task holds advisory key {self.key!r} as a session lock on "
                "another connection: a transaction-level lock on this one would "
                "wait for that hold, i.e. for itself; take it on the connection "
                "holding the session lock, or release that first"
            )
        self._outer = outer
        self.acquired = True
        self.pid = outer.pid
        return True

    async def _enter(self, target: Any, task: asyncio.Task[Any]) -> None:
        """Acquire on ``target`` (a Pool or Connection) for ``task`` (the
        current one). On return, ``acquired`` tells; nothing is held (and no
        connection leased) unless it is True."""
        self._task = task
        is_pool = isinstance(target, asyncpg.Pool)
        if self.xact and (is_pool or not target.is_in_transaction()):
            await self._enter_owned(target, task, is_pool)
            return
        if self._try_reenter(task, target):
            return
        timeout = self._timeout
        if is_pool:
            # One timeout for the pool wait and the lock wait together.
            deadline = Deadline(timeout)
            _wanted[self.key] = _wanted.get(self.key, 0) + 1
            self._wants = True
            try:
                conn = await lease(target, timeout)
            except BaseException:
                self._unwant()
                raise
            if conn is None:  # every connection stayed in use: not acquired
                self._unwant()
                return
            self._pool = target
            timeout = deadline.remaining()
        else:
            conn = target
            timeout = await self._claim_locally(raw_connection(conn), timeout)
            if timeout is not None and timeout < 0:
                return  # another task sharing this connection holds the key
        self._conn = conn
        try:
            await check_lock_target(conn, session=not self.xact)
            await check_xact_left(conn, task, self.key)
            granted = await self._lock(conn, timeout)
        except BaseException:
            self._unclaim()
            self._unwant()
            if self._pool is not None:
                # _lock resolved the ambiguity (or discarded the connection);
                # the exception in flight outranks a cancellation met here.
                with Cleanup() as cleanup:
                    await cleanup.give_back(self._pool, conn, discard=False)
                    self._conn = None
                    raise
            raise
        if granted:
            self._after_grant(task)
            return
        self._unclaim()
        self._unwant()
        if self._pool is not None:
            with Cleanup() as cleanup:
                await cleanup.give_back(self._pool, conn, discard=False)
                self._conn = None

    async def _claim_locally(self, raw: Any, timeout: float | None) -> float | None:
        """Wait (within ``timeout``) until no other task's hold on this same
        connection conflicts, then claim the key. Returns the time left for the
        server wait, or -1 when the key stayed busy."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            holds = _conn_holds.setdefault(id(raw), {}).setdefault(self.key, [])
            # This task's own hold is not in the way (a transaction-level
            # request under its session hold): the server grants it at once.
            blocking = next(
                (
                    h
                    for h in holds
                    if h.lock._task is not self._task and not (h.lock.shared and self.shared)
                ),
                None,
            )
            if blocking is None:
                claim = _ConnHold(self)
                holds.append(claim)
                self._claim = (id(raw), claim)
                if deadline is None or timeout == 0:
                    return timeout
                return max(deadline - loop.time(), 0.001)
            if deadline is not None and (timeout == 0 or deadline <= loop.time()):
                return -1.0
            with anyio.move_on_after(None if deadline is None else deadline - loop.time()):
                await blocking.released.wait()

    def _unwant(self) -> None:
        if self._wants:
            self._wants = False
            count = _wanted[self.key] - 1
            if count:
                _wanted[self.key] = count
            else:
                del _wanted[self.key]

    def _unclaim(self) -> None:
        if self._claim is None:
            return
        raw_id, claim = self._claim
        self._claim = None
        by_key = _conn_holds.get(raw_id, {})
        holds = by_key.get(self.key, [])
        if claim in holds:
            holds.remove(claim)
            if not holds:
                by_key.pop(self.key, None)
            if not by_key:
                _conn_holds.pop(raw_id, None)
        claim.released.set()

    async def _lock(self, conn: Any, timeout: float | None) -> bool:
        """Send the lock statement; resolve any ambiguity before raising."""
        stmts = self._statements()
        args = self._args()
        in_tx = conn.is_in_transaction()
        phase = "savepoint"
        try:
            if in_tx:
                # Never half-run: a cancellation waits for the SAVEPOINT to
                # end (then rolls back to it), so the caller's transaction
                # is never left guessing whether it exists.
                with Cleanup(lazy=True) as cleanup:
                    await run_through(conn, _sql.SAVEPOINT, cleanup)
                    phase = "lock"
            phase = "lock"
            if timeout == 0:
                granted = bool(await conn.fetchval(stmts.try_lock, *args))
                if granted:
                    protect_granted(conn)
            elif timeout is None:
                with waiting(conn):
                    await conn.fetchval(stmts.lock, *args)
                granted = True
            elif in_tx:
                with waiting(conn):
                    previous = await conn.fetchval(
                        stmts.lock_with_timeout_in_tx, *args, to_milliseconds(timeout)
                    )
                await conn.fetchval(_sql.RESTORE_LOCK_TIMEOUT_LOCAL, previous)
                granted = True
            else:
                with waiting(conn):
                    await conn.fetchval(stmts.lock_with_timeout, *args, to_milliseconds(timeout))
                granted = True
        except asyncpg.LockNotAvailableError:
            # lock_timeout fired, but that is not a definite "not granted":
            # the timeout can fire as the lock is granted, and the statement
            # then fails with the session holding the lock anyway (a rolled
            # back savepoint does not release a session lock). Resolve it on
            # the server, as an interrupted wait is.
            await self._undo(conn, in_tx=in_tx, phase="lock", resolve=True)
            return False
        except asyncpg.exceptions.OutOfMemoryError as exc:
            # SQLSTATE 53200: the server's lock table is full.
            await self._undo(conn, in_tx=in_tx, phase=phase, resolve=True)
            raise lock_table_full(exc) from exc
        except asyncpg.InterfaceError:
            # Raised before anything is sent (connection closed or busy).
            if phase == "lock" and in_tx:
                await self._undo(conn, in_tx=True, phase=phase, resolve=False)
            raise
        except BaseException:
            await self._undo(conn, in_tx=in_tx, phase=phase, resolve=True)
            raise
        if in_tx:
            await self._release_savepoint(conn, granted)
        if granted:
            self.acquired = True
        return granted

    async def _release_savepoint(self, conn: Any, granted: bool) -> None:
        """RELEASE the savepoint; if cancelled meanwhile, let the statement
        finish (so its outcome is known), give back a session grant, re-raise."""
        fut = asyncio.ensure_future(conn.execute(_sql.RELEASE_SAVEPOINT))
        # Its outcome is always read below; this only keeps asyncio from
        # reporting it as never retrieved if this task is torn down first.
        fut.add_done_callback(mark_retrieved)
        with Cleanup() as cleanup:
            try:
                await cleanup.wait(fut)
            except BaseException:
                failed = True
            else:
                failed = False
                # Cancelled as the grant became final: give a session grant
                # back. A transaction-level grant now belongs to the caller's
                # transaction and ends with it, as every xact lock does.
                give_back = cleanup.cancelled is not None and granted and not self.xact
                if give_back and not await self._resolve(conn, cleanup):
                    self._discard(conn)
            if failed:
                # The statement itself failed: the savepoint still stands.
                await self._undo(conn, in_tx=True, phase="lock", resolve=granted)
                fut.result()  # raises that failure, which outranks a cancellation

    async def _undo(self, conn: Any, *, in_tx: bool, phase: str, resolve: bool) -> None:
        """After an interrupted or failed lock: leave nothing of ours held."""
        with Cleanup() as cleanup:
            await self._undo_steps(conn, cleanup, in_tx=in_tx, phase=phase, resolve=resolve)

    async def _undo_steps(
        self, conn: Any, cleanup: Cleanup, *, in_tx: bool, phase: str, resolve: bool
    ) -> None:
        ok = True
        if in_tx:

            async def rollback(attempt: int) -> None:
                try:
                    await run_through(conn, _sql.ROLLBACK_TO_SAVEPOINT, cleanup)
                except asyncpg.InvalidSavepointSpecificationError:
                    # Only possible when SAVEPOINT itself was cancelled: no lock
                    # was requested, and that statement's error aborted the
                    # caller's transaction, which rolls back as any would.
                    if phase != "savepoint":
                        raise

            ok, _ = await cleanup.run(rollback)
        if ok and resolve and phase != "savepoint" and not self.xact:
            ok = await self._resolve(conn, cleanup)
        if not ok:
            self._discard(conn)

    def _discard(self, conn: Any) -> None:
        """The last resort: never reuse a connection whose state is unknown.
        Its backend drops every lock of its session as it exits."""
        logger.warning(
            "could not confirm advisory key %r was released; terminating its connection",
            self.key,
        )
        terminate(conn)

    async def _resolve(self, conn: Any, cleanup: Cleanup) -> bool:
        """Ask the server whether this session holds the key; release it if so."""
        stmt = self._statements().resolve
        args = self._args()

        async def step(attempt: int) -> bool:
            return bool(await conn.fetchval(stmt, *args, timeout=CLEANUP_STATEMENT_TIMEOUT))

        ok, released = await cleanup.run(step)
        if released:
            logger.debug(
                "advisory key %r: a wait that failed or was interrupted had been "
                "granted after all; released it",
                self.key,
            )
        return ok

    def _after_grant(self, task: asyncio.Task[Any]) -> None:
        conn = self._conn
        self.pid = conn.get_server_pid()
        holds = _holds.setdefault(task, {})
        if self.key not in holds:
            # Not when this is a transaction-level lock taken under the task's
            # own session hold: that one stays the outermost.
            holds[self.key] = self
            self._registered = True
        raw = raw_connection(conn)
        self._raw = raw
        if raw is not None:
            _watch(raw).holders.add(self)
        if self._pool is not None and not self.xact:
            self._sweeper = sweeper(task.get_loop())
            self._sweeper.hold(self, self._start_heartbeat)
        if self._cancel_on_lost:
            # Losing the lock cancels the block's task once, as
            # asyncio.timeout() does; no cancel scope spans the block, which
            # may be exited in another task than the one that entered it.
            self._canceller = BlockCanceller(task)
        self._check_alive()

    # -- losing ------------------------------------------------------------

    def _check_alive(self) -> None:
        raw = self._raw
        if raw is None or raw.is_closed():
            self._mark_lost("its connection was closed")

    def _mark_lost(self, reason: str) -> None:
        if self._lost or not self.acquired:
            return
        self._lost = True
        self._lost_reason = reason
        logger.warning("advisory lock %r lost (pid %s): %s", self.key, self.pid, reason)
        if self._canceller is not None:
            self._canceller.fire(f"aiopglock: advisory lock {self.key!r} lost: {reason}")

    def _start_heartbeat(self) -> None:
        if self._lost or self._conn is None:
            return
        self._hb_stop = asyncio.Event()
        # Started lazily, only for locks held longer than one interval, and
        # always awaited in _stop_heartbeat before the block's exit completes.
        self._hb_task = asyncio.get_running_loop().create_task(self._heartbeat(self._hb_stop))

    async def _heartbeat(self, stop: asyncio.Event) -> None:
        # A beat every half interval, each allowed half an interval: a silent
        # death is noticed within one interval of happening.
        half = heartbeat_interval() / 2
        conn = self._conn
        while not stop.is_set():
            try:
                await conn.fetchval(_sql.HEARTBEAT, timeout=half)
            except Exception as exc:
                self._mark_lost(f"its connection stopped answering ({exc!r})")
                terminate(conn)
                return
            with anyio.move_on_after(half):
                await stop.wait()

    async def _stop_heartbeat(self, cleanup: Cleanup) -> None:
        if self._sweeper is not None:
            self._sweeper.unhold(self)
        task = self._hb_task
        if task is not None and self._hb_stop is not None:
            self._hb_stop.set()
            await cleanup.wait(task)
            self._hb_task = None

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
            await self._exit_owned(exc, ours, canceller)
            return
        if self._outer is not None:
            # Nested: the outermost handle holds (and releases) the lock.
            self.acquired = False
            outer = self._outer
            if outer.lost and not _foreign_cancel(exc, outer._canceller):
                raise outer._lost_error() from exc
            return
        if not self.acquired:
            return
        self._unregister()
        conn = self._conn
        if self.xact and self._raw is not None and self._task is not None and self.pid:
            left = _xact_left.setdefault(self._task, {})
            for key, (ref, _) in list(left.items()):  # transactions that have ended
                other = ref()
                if other is None or other.is_closed() or not other.is_in_transaction():
                    del left[key]
            left[self.key] = (weakref.ref(self._raw), self.pid)
        # Without an exception in flight, cancellation is unlikely: the
        # shield is entered only if a step is interrupted.
        with Cleanup(lazy=exc is None) as cleanup:
            try:
                await self._release_held(conn, exc, cleanup)
            finally:
                self._unclaim()
                self._unwant()
                self._conn = None
                self.acquired = False
            if self._lost:
                await self._raise_lost(exc, ours, canceller, cleanup, self._lost_error())

    async def _release_held(self, conn: Any, exc: BaseException | None, cleanup: Cleanup) -> None:
        """The exit's cleanup of a held lock: stop its liveness checks, unlock
        (or let the pool's reset unlock), give a Pool's connection back."""
        if self._sweeper is not None:
            self._sweeper.unhold(self)
        if self._hb_task is not None:
            await self._stop_heartbeat(cleanup)
        raw = self._raw
        if raw is not None:
            _unwatch(raw, self)
        # The termination listener runs a loop turn after the socket
        # closes: look for ourselves rather than rely on it having run.
        self._check_alive()
        if (
            exc is None
            and not self._lost
            and not self.xact
            and self._pool is not None
            and _wanted[self.key] == 1
            and reset_unlocks(self._pool, conn, raw)
        ):
            # The pool's reset ends every advisory lock of the session
            # on this same connection, confirmed before the connection
            # is handed out again: the unlock rides along with it. Not
            # when another task of this process wants the key: asyncpg
            # sends the reset from a task of its own, a loop turn later,
            # and a direct unlock hands the key over sooner.
            await self._release_with_reset(conn, raw, cleanup)
        else:
            if not self._lost and not self.xact:
                released = await self._release(conn, cleanup)
                if released is None:
                    self._unconfirmed(conn)
                elif not released:
                    self._mark_lost("it was no longer held when the block exited")
                else:
                    # A caller's Connection stays with the caller: in a
                    # prioritize() block its backend is no longer spared
                    # on this lock's account (a pool's return does that).
                    protect_released(conn)
            if self._pool is not None:
                await cleanup.give_back(self._pool, conn, discard=self._lost)

    def _unregister(self) -> None:
        """Forget this handle as the task's outermost hold of its key."""
        if not self._registered:
            return
        self._registered = False
        task = self._task
        holds = _holds.get(task) if task is not None else None
        if holds is not None and holds.get(self.key) is self:
            del holds[self.key]
            if not holds and task is not None:
                _holds.pop(task, None)

    async def _raise_lost(
        self,
        exc: BaseException | None,
        ours: bool,
        canceller: BlockCanceller | None,
        cleanup: Cleanup,
        error: LockLost,
    ) -> bool:
        """Inside the exit's ``cleanup``, after it: raise ``error`` in place of
        the cancellation delivered for the loss. Someone else's cancellation
        propagates instead: False when it is the one in flight (``exc``),
        True when it was met during the cleanup (``cleanup`` delivers it)."""
        cancelled = isinstance(exc, asyncio.CancelledError)
        if cancelled and not ours:
            return False  # not ours: it propagates out of the ``async with``
        if cleanup.cancelled is not None:
            # Met during the cleanup: ours arriving late, unless another
            # cancellation is pending too.
            if canceller is None or not ours or canceller.others():
                return True
            cleanup.forget()
        elif canceller is not None and ours and not cancelled:
            await self._absorb(canceller)
        raise error from (None if cancelled else exc)

    async def _absorb(self, canceller: BlockCanceller) -> None:
        """Take delivery of the cancellation delivered for the loss when the
        block never awaited after it (it would hit the caller's next await)."""
        if self._task is not asyncio.current_task():
            return
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            if canceller.others():
                raise

    # -- xact=True in a transaction of aiopglock's own ------------------------

    async def _enter_owned(self, target: Any, task: asyncio.Task[Any], is_pool: bool) -> None:
        """``xact=True`` on a Pool or a Connection outside a transaction: open
        a transaction with asyncpg's own ``conn.transaction()`` (so the block
        can nest one in it, as on plain asyncpg), take the lock in it; the
        block runs inside it. On return ``acquired`` tells; when False, no
        transaction is left open and no connection leased."""
        outer = self._held_by_task(task) or self._elsewhere
        timeout = self._timeout
        deadline = Deadline(timeout)
        if is_pool:
            conn = await lease(target, timeout)
            if conn is None:  # every connection stayed in use: not acquired
                return
            self._pool = target
        else:
            conn = target
            # Another task sharing this connection may hold the key on it.
            left = await self._claim_locally(raw_connection(conn), timeout)
            if left is not None and left < 0:
                return
        self._conn = conn
        self._owned = True
        # Held by this task on another session, for longer than this
        # transaction lasts (it ends with this block): asking the server again
        # would wait for that hold, i.e. for ourselves.
        nested = outer is not None and raw_connection(conn) is not getattr(outer, "_raw", None)
        try:
            try:
                # A hot standby is refused before BEGIN (nothing of ours open).
                await check_lock_target(conn, session=False)
                await check_xact_left(conn, task, self.key)
                await self._begin(conn)
            except asyncpg.InterfaceError:
                # Raised before BEGIN was sent (connection closed or busy with
                # another task's query): nothing of ours is open.
                self._tx = None
                raise
            if nested:
                granted = True
            else:
                granted = await self._lock_owned(conn, deadline.remaining())
        except BaseException:
            # The exception in flight outranks a cancellation met in cleanup.
            with Cleanup() as cleanup:
                await self._end_owned(cleanup, commit=False)
                raise
        if not granted:
            with Cleanup() as cleanup:
                await self._end_owned(cleanup, commit=False)
            return
        self.acquired = True
        if outer is not None and nested:
            self._outer = outer
            self.pid = outer.pid
        else:
            self._after_grant(task)

    async def _begin(self, conn: Any) -> None:
        """Start the transaction, never half-run (like COMMIT): a cancellation
        meanwhile waits for BEGIN to end, so that whether the transaction is
        open is known; it is re-raised after, and the caller rolls back."""
        tr = conn.transaction()
        self._tx = tr
        fut = asyncio.ensure_future(tr.start())
        # Its outcome is always read below; this only keeps asyncio from
        # reporting it as never retrieved if the task is torn down first.
        fut.add_done_callback(mark_retrieved)
        with Cleanup(lazy=True) as cleanup:
            await cleanup.wait(fut)

    async def _lock_owned(self, conn: Any, timeout: float | None) -> bool:
        """Send the lock statement in our transaction. False: the server said
        not granted. Any failure or interruption is undone by rolling the
        whole transaction back, which takes any grant with it (a
        transaction-level lock, so no resolving is needed)."""
        stmts = self._statements()
        args = self._args()
        try:
            if timeout == 0:
                granted = bool(await conn.fetchval(stmts.try_lock, *args))
                if granted:
                    protect_granted(conn)
                return granted
            if timeout is None:
                with waiting(conn):
                    await conn.fetchval(stmts.lock, *args)
                return True
            with waiting(conn):
                previous = await conn.fetchval(
                    stmts.lock_with_timeout_in_tx, *args, to_milliseconds(timeout)
                )
            # The block runs in this transaction: give it its lock_timeout back.
            await conn.fetchval(_sql.RESTORE_LOCK_TIMEOUT_LOCAL, previous)
            return True
        except asyncpg.LockNotAvailableError:
            return False
        except asyncpg.exceptions.OutOfMemoryError as exc:
            raise lock_table_full(exc) from exc

    async def _end_owned(self, cleanup: Cleanup, *, commit: bool) -> BaseException | None:
        """Commit (``commit``) or roll back our transaction and give a Pool's
        connection back. Returns a failed COMMIT's error (the transaction is
        then rolled back), for the caller to raise."""
        conn, tr = self._conn, self._tx
        self._tx = None
        error: BaseException | None = None
        clean = True
        if tr is not None and conn is not None:
            in_tx = True
            if commit and _alive(conn):
                fut = asyncio.ensure_future(tr.commit())
                fut.add_done_callback(mark_retrieved)
                try:
                    await cleanup.wait(fut)  # never interrupted: its outcome is known
                except Exception as exc:  # e.g. a deferred constraint
                    error = exc
                in_tx = not _alive(conn) or raw_connection(conn).is_in_transaction()
            if in_tx:
                clean = await self._rollback_owned(conn, tr, cleanup)
        if self._pool is not None and conn is not None:
            await cleanup.give_back(self._pool, conn, discard=not clean)
        self._unclaim()
        self._conn = None
        return error

    async def _rollback_owned(self, conn: Any, tr: Any, cleanup: Cleanup) -> bool:
        """Roll our transaction back (and with it the lock); True once the
        server confirms no transaction is open."""
        if not _alive(conn):
            return False

        async def step(attempt: int) -> None:
            if attempt == 0:
                try:
                    await tr.rollback()  # also ends asyncpg's record of it
                    return
                except asyncpg.InterfaceError:
                    pass  # asyncpg counts it as ended already (a failed COMMIT)
            # After an interrupted statement the server may or may not still
            # be in the transaction: a ROLLBACK is harmless either way.
            await conn.execute(_sql.ROLLBACK, timeout=CLEANUP_STATEMENT_TIMEOUT)

        ok, _ = await cleanup.run(step)
        if ok and _alive(conn) and not raw_connection(conn).is_in_transaction():
            return True
        self._discard(conn)
        return False

    async def _exit_owned(
        self, exc: BaseException | None, ours: bool, canceller: BlockCanceller | None
    ) -> None:
        """End the block of a lock in our own transaction: COMMIT when it
        succeeded, ROLLBACK on error, cancellation or a lost connection."""
        if not self.acquired:
            return
        outer = self._outer
        self._unregister()
        if self._raw is not None:
            _unwatch(self._raw, self)
        if outer is None:
            self._check_alive()
        with Cleanup(lazy=exc is None) as cleanup:
            try:
                error = await self._end_owned(cleanup, commit=exc is None and not self.lost)
                if error is not None and outer is None and not _answered(error):
                    # Not the server's answer (a deferred constraint, a
                    # serialization failure...): the connection failed under the
                    # COMMIT, as it does when its backend is terminated just then.
                    self._mark_lost(
                        f"its connection failed at COMMIT, whose outcome is unknown ({error!r})"
                    )
                    raise self._lost_error() from error
            finally:
                self.acquired = False
            if outer is not None:
                if outer.lost and not _foreign_cancel(exc, outer._canceller):
                    raise outer._lost_error() from exc
            elif self._lost and await self._raise_lost(
                exc, ours, canceller, cleanup, self._lost_error()
            ):
                return  # a cancellation met in cleanup outranks the rest
            if error is not None:
                raise error

    def _loop_sweeper(self) -> Sweeper:
        if self._sweeper is not None:
            return self._sweeper
        task = self._task
        return sweeper(task.get_loop() if task is not None else asyncio.get_running_loop())

    def _on_expired(self) -> None:
        self._expired = True

    def _unconfirmed(self, conn: Any) -> None:
        """The release could not be confirmed: a connection that died on the
        way lost the lock; one merely unresponsive is discarded."""
        if not self._expired:
            self._check_alive()
        self._discard(conn)

    async def _release_with_reset(self, conn: Any, raw: Any, cleanup: Cleanup) -> None:
        """Give the connection back; its pool's reset (``pg_advisory_unlock_all()``)
        releases the lock. Used on a normal exit only: after an error or a
        cancellation a late CancelRequest could interrupt the reset, so those
        exits unlock explicitly, with retries.

        When the reset fails, the pool terminates the connection and its
        backend drops the lock as it exits: the lock was lost if the connection
        had died, and is merely discarded otherwise."""
        sweep = self._loop_sweeper()
        sweep.deadline(self, conn, CLEANUP_STATEMENT_TIMEOUT, self._on_expired)
        failure: Exception | None = None
        try:
            await self._pool.release(conn)
        except asyncio.CancelledError as exc:
            # asyncpg shields the release itself: it goes on in the background.
            # Wait for it, so that the lock is gone when the exit completes.
            cleanup.cancelled = exc
            cleanup.shield()
            released = wait_released(conn)
            if released is not None:
                await cleanup.wait(asyncio.ensure_future(released))
        except Exception as exc:
            logger.debug("aiopglock: returning a connection to its pool failed: %r", exc)
            failure = exc
        finally:
            sweep.clear(self)
        if not raw.is_closed():
            return
        if self._expired or _answered(failure):
            # Alive but unresponsive, or the server answered the reset with an
            # error: the pool terminated a live connection.
            self._discard(conn)
        else:
            self._mark_lost("its connection was closed")

    async def _release(self, conn: Any, cleanup: Cleanup) -> bool | None:
        """Unlock on the holding connection. True: released; False: it was not
        held; None: could not be confirmed (the connection must be discarded)."""
        stmts = self._statements()
        args = self._args()

        async def step(attempt: int) -> bool:
            if attempt == 0:
                # The common case, bounded by the loop's sweeper rather than a
                # timer of its own: past the deadline the connection is
                # terminated, which ends the statement with an error.
                sweep = self._loop_sweeper()
                sweep.deadline(self, conn, CLEANUP_STATEMENT_TIMEOUT, self._on_expired)
                try:
                    return bool(await conn.fetchval(stmts.unlock, *args))
                finally:
                    sweep.clear(self)
            # A retry follows an interrupted unlock, which may or may not have
            # run: ask pg_locks instead of unlocking blindly a second time.
            await conn.fetchval(stmts.resolve, *args, timeout=CLEANUP_STATEMENT_TIMEOUT)
            return True

        ok, released = await cleanup.run(step)
        return released if ok else None


class _Handle(Protocol):
    acquired: bool

    async def _exit(self, exc: BaseException | None) -> None: ...


H = TypeVar("H", bound=_Handle)


class _AdvisorySpec(Generic[H]):
    """What ``advisory()`` and ``Locker.advisory()`` share: the validated
    arguments, ``async with`` and the decorator. A subclass says how a lock is
    taken (:meth:`_acquire`)."""

    __slots__ = (
        "_active",
        "_cancel_on_lost",
        "_key",
        "_shared",
        "_side_effect",
        "_timeout",
        "_xact",
    )

    #: How the decorator names itself in its TypeError.
    _name = "aiopglock.advisory"

    def _configure(
        self,
        key: Key | None,
        shared: bool,
        xact: bool,
        timeout: Timeout,
        side_effect: SideEffect | None,
        cancel_on_lost: bool,
    ) -> None:
        self._key: AdvisoryKey | None = None if key is None else advisory_key(key)
        self._shared = check_bool(shared, "shared")
        self._xact = check_bool(xact, "xact")
        self._timeout = parse_timeout(timeout)
        self._side_effect = _check_side_effect(side_effect)
        self._cancel_on_lost = check_bool(cancel_on_lost, "cancel_on_lost")
        self._active: Entered[H] = Entered()

    async def _acquire(self, key: AdvisoryKey, side_effect: SideEffect, task: Any) -> H:
        """Take ``key`` for ``task`` (the current one); the handle says whether."""
        raise NotImplementedError

    def _not_acquired(self, key: AdvisoryKey) -> LockNotAcquired:
        return LockNotAcquired(
            f"advisory lock {key!r} not acquired (timeout={self._timeout})", key=key
        )

    async def __aenter__(self) -> H:
        if self._key is None:
            raise ValueError("key: required when advisory() is used as a context manager")
        side_effect = self._side_effect or Return
        if side_effect is Skip:
            raise ValueError(
                "side_effect: aiopglock.Skip only applies to decorated functions; "
                "use aiopglock.Return or aiopglock.Raise with async with"
            )
        # asyncio.current_task() costs a getpid() system call: ask once.
        task = _current_task()
        lock = await self._acquire(self._key, side_effect, task)
        self._active.push(lock, task)
        return lock

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._active.pop()._exit(exc)

    def __call__(self, fn: F) -> F:
        # A functools.partial, a staticmethod or a classmethod is accepted too
        # (see aiopglock._decorate); the default key names the function that runs.
        decorated = target(fn, self._name)
        side_effect = self._side_effect or Raise
        if side_effect is Return:
            raise ValueError(
                "side_effect: aiopglock.Return does not apply to a decorated function "
                "(it cannot see the handle); use aiopglock.Raise or aiopglock.Skip"
            )
        key = self._key
        if key is None:
            key = advisory_key(decorated.default_name(self._name))
        spec = self
        call = decorated.fn

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            lock = await spec._acquire(key, side_effect, _current_task())
            if not lock.acquired:
                return None  # Skip
            try:
                result = await call(*args, **kwargs)
            except BaseException as exc:
                await lock._exit(exc)
                raise
            await lock._exit(None)
            return result

        return cast(F, decorated.finish(wrapper))


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
    ) -> None:
        self._configure(key, shared, xact, timeout, side_effect, cancel_on_lost)
        check_db(db)
        self._db = db

    def __repr__(self) -> str:
        return (
            f"aiopglock.advisory({self._key!r}, shared={self._shared}, xact={self._xact}, "
            f"timeout={self._timeout}, side_effect={self._side_effect!r})"
        )

    def _new_lock(self, key: AdvisoryKey) -> AdvisoryLock:
        return AdvisoryLock(
            key,
            shared=self._shared,
            xact=self._xact,
            timeout=self._timeout,
            cancel_on_lost=self._cancel_on_lost,
        )

    async def _acquire(self, key: AdvisoryKey, side_effect: SideEffect, task: Any) -> Any:
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
            )
        lock = self._new_lock(key)
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

    Example::

        async with aiopglock.advisory("invoice:42", db=pool, timeout=5) as lock:
            if lock:
                await bill(42)

        async with aiopglock.advisory("invoice:42", db=pool, xact=True) as lock:
            if lock:  # the block runs in the lock's transaction
                await lock.connection.execute("UPDATE invoices SET paid = true")

        @aiopglock.advisory(timeout=0, side_effect=aiopglock.Skip, db=lambda: pool)
        async def nightly() -> None: ...
    """
    return Advisory(
        key,
        db=db,
        shared=shared,
        xact=xact,
        timeout=timeout,
        side_effect=side_effect,
        cancel_on_lost=cancel_on_lost,
    )
