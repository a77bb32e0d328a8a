"""Locks that live in a transaction: what ``table()`` and ``rows()`` share.

Whose transaction:

- ``db`` a Pool, or a Connection outside a transaction: aiopglock opens one
  with asyncpg's own ``conn.transaction()`` (so ``conn.transaction()`` inside
  the block nests, as a savepoint, exactly as on plain asyncpg) and ends it:
  commit when the block succeeds, rollback on error, cancellation, or a lock
  not acquired.
- a Connection inside a transaction: the lock is taken there under a
  savepoint (a failed or interrupted wait is rolled back to it, leaving the
  caller's transaction usable), and held until that transaction ends.

``timeout`` is the whole wait: a Pool's connection is leased within it
(``_db.lease``: ``0`` never waits for a busy pool, which is "not acquired"),
and the lock statement gets what is left of it as its ``lock_timeout``. A
wait that times out (even one granted as ``lock_timeout`` fires, which
PostgreSQL reports as 55P03 while holding the lock) is rolled back with its
transaction or savepoint, so nothing of it stays held.

Cancellation at any point (start, the wait, the block, commit):

- the transaction's start, its commit, and the savepoint statements
  (``SAVEPOINT``, ``RELEASE``, ``ROLLBACK TO``) are never interrupted: each
  runs to its end (no CancelRequest is sent), so whether it happened is
  known and a retry never names a savepoint that is gone (which would abort
  the caller's transaction); the cancellation is re-raised afterwards;
- an interrupted lock statement is followed, under a
  :class:`~aiopglock._db.Cleanup` shield, by a rollback (retried when a late
  CancelRequest cancels it), and the result is checked with
  ``is_in_transaction()``, which asyncpg reads from the server's
  ReadyForQuery once the interrupted statement has ended;
- a connection whose state cannot be confirmed is terminated (and returned
  to its pool, which discards it), never reused.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Generic, TypeVar

import anyio
import asyncpg
from asyncpg.pool import PoolConnectionProxy
from asyncpg.transaction import Transaction

from . import _otel, _sql
from ._advisory import Raise, SideEffect
from ._asyncpg import forget_top_transaction
from ._concurrency import Cleanup, mark_retrieved, run_through
from ._conntypes import Conn, Pool
from ._db import (
    CLEANUP_STATEMENT_TIMEOUT,
    DB,
    Deadline,
    lease,
    raw_connection,
    resolve_db,
    terminate,
)
from ._errors import LockNotAcquired
from ._handles import Entered, ExitsEntered
from ._protect import waiting
from ._server import check_pooled
from ._timeouts import to_milliseconds

__all__ = ["TransactionLock", "TransactionLockSpec"]

logger = logging.getLogger("aiopglock")


class TransactionLock:
    """The handle of a lock held by a transaction (base of ``TableLock`` and ``RowLock``)."""

    __slots__ = ("_conn", "_done", "_owned", "_pool", "_timeout", "_tx", "acquired", "pid")

    #: How the lock is named in messages and logs.
    _what = "lock"

    def __init__(self, timeout: float | None) -> None:
        self._timeout = timeout
        self._conn: Conn | None = None
        self._pool: Pool | None = None
        self._owned = False
        # Our own transaction, while asyncpg counts it as the connection's
        # top transaction (from its start until commit() or rollback() is called).
        self._tx: Transaction | None = None
        self._done = False
        self.acquired = False
        self.pid: int | None = None

    def __bool__(self) -> bool:
        return self.acquired

    @property
    def connection(self) -> Any:  # as AdvisoryLock.connection: no None check for callers
        """The connection holding the lock, for the block's statements (its
        transaction holds the lock). ``None`` once a Pool's connection is back
        in the pool (after the block, or when the lock was not acquired)."""
        return self._conn

    @property
    def owns_transaction(self) -> bool:
        """True when aiopglock opened the transaction (and commits or rolls it back)."""
        return self._owned

    def _state(self) -> str:
        if self._done:
            return "released" if self.acquired else "not acquired"
        return "acquired" if self.acquired else "not acquired"

    # -- what a subclass provides -----------------------------------------

    async def _statement(self, conn: Conn, *, nowait: bool) -> None:
        """Run the lock statement; ``LockNotAvailableError`` means not granted."""
        raise NotImplementedError

    # -- entering ----------------------------------------------------------

    async def _enter(self, target: Conn | Pool) -> None:
        """Acquire on ``target`` (a Pool or Connection) within the timeout. On
        return ``acquired`` tells; when it is False, nothing of ours is left
        open or leased."""
        deadline = Deadline(self._timeout)
        if isinstance(target, asyncpg.Pool):
            leased = await lease(target, self._timeout)
            if leased is None:
                return  # every connection stayed in use: not acquired
            self._pool = target
            conn: Conn = leased
        else:
            conn = target
        await check_pooled(self._pool, conn, session=False)
        self._conn = conn
        self._owned = self._pool is not None or not conn.is_in_transaction()
        try:
            if self._owned:
                await self._start(conn)
            granted = await self._lock(
                conn, savepoint=not self._owned, timeout=deadline.remaining()
            )
        except BaseException:
            # The exception in flight outranks a cancellation met in cleanup.
            await self._finish(commit=False, deliver=False)
            raise
        if granted:
            self.acquired = True
            self.pid = conn.get_server_pid()
            return
        await self._finish(commit=False, deliver=True)

    async def _start(self, conn: Conn) -> None:
        """Open our transaction with asyncpg's ``conn.transaction()``, its
        ``BEGIN`` run to its end even when cancelled meanwhile (the
        cancellation is raised once it has, and the transaction is rolled
        back by the caller's cleanup)."""
        with Cleanup(lazy=True) as cleanup:
            for attempt in range(2):
                tx = conn.transaction()
                fut = asyncio.ensure_future(tx.start())
                fut.add_done_callback(mark_retrieved)
                try:
                    await cleanup.wait(fut)
                except asyncpg.QueryCanceledError:
                    # BEGIN is never cancelled by us: this is the late
                    # CancelRequest of an earlier statement. Not begun: again.
                    _forget_failed_start(conn, tx)
                    if attempt:
                        raise
                    continue
                except asyncpg.InterfaceError:
                    # Refused before anything was sent (connection closed, or
                    # busy with another task's query): nothing of ours to
                    # undo, and a busy connection is not ours to roll back.
                    _forget_failed_start(conn, tx)
                    self._owned = False
                    raise
                except BaseException:
                    # BEGIN failed: not in a transaction.
                    _forget_failed_start(conn, tx)
                    raise
                self._tx = tx
                break

    async def _lock(self, conn: Conn, *, savepoint: bool, timeout: float | None) -> bool:
        """Send the lock statement (under a savepoint inside a caller's
        transaction), waiting at most ``timeout``. False: not granted (any
        grant that came with the timeout is undone by the rollback that
        follows: of the savepoint here, of our transaction by the caller)."""
        if savepoint:
            await self._make_savepoint(conn)
        try:
            if timeout is not None and timeout > 0:
                previous = await conn.fetchval(
                    _sql.SET_LOCK_TIMEOUT_LOCAL, to_milliseconds(timeout)
                )
                with waiting(conn):
                    await self._statement(conn, nowait=False)
                await conn.fetchval(_sql.RESTORE_LOCK_TIMEOUT_LOCAL, previous)
            else:
                with waiting(conn):
                    await self._statement(conn, nowait=timeout == 0)
        except asyncpg.LockNotAvailableError:
            # NOWAIT found it busy or lock_timeout fired (maybe as the lock was
            # granted: PostgreSQL can raise 55P03 and hold it): rolled back.
            if savepoint:
                await self._undo_savepoint(conn, deliver=True)
            return False
        except BaseException:
            # Interrupted (the lock may have been granted meanwhile), or any
            # other error: the savepoint takes the wait and any grant back.
            if savepoint:
                await self._undo_savepoint(conn, deliver=False)
            raise
        if savepoint:
            await self._release_savepoint(conn)
        return True

    async def _make_savepoint(self, conn: Conn) -> None:
        """SAVEPOINT, run to its end even when cancelled meanwhile (so whether
        it exists is known: rolling back to a savepoint that does not exist
        would abort the caller's transaction). A cancellation is raised after
        the savepoint is undone again."""
        with Cleanup(lazy=True) as cleanup:
            await run_through(conn, _sql.LOCK_SAVEPOINT, cleanup)  # its error propagates
            if cleanup.cancelled is not None:
                await self._undo_savepoint(conn, deliver=False)

    async def _undo_savepoint(self, conn: Conn, *, deliver: bool) -> None:
        """Roll back to the savepoint and release it: the wait, its
        lock_timeout and any grant go, and the caller's transaction is as it
        was. Each try runs to its end (never interrupted, so never half
        done); only a late CancelRequest can fail one, leaving the savepoint
        in place for the next try. A cancellation met meanwhile is raised
        when ``deliver``, else dropped (an exception in flight outranks it)."""

        async def step(attempt: int) -> None:
            await run_through(conn, _sql.LOCK_ROLLBACK_TO_SAVEPOINT, cleanup)

        with Cleanup() as cleanup:
            ok, _ = await cleanup.run(step)
            if not ok:
                self._discard(conn, "could not roll back to its savepoint")
            if not deliver:
                cleanup.forget()

    async def _release_savepoint(self, conn: Conn) -> None:
        """RELEASE the savepoint; if cancelled meanwhile, let it finish first.
        A lock granted by then belongs to the caller's transaction."""
        failure: BaseException | None = None
        with Cleanup(lazy=True) as cleanup:
            try:
                await run_through(conn, _sql.LOCK_RELEASE_SAVEPOINT, cleanup)
            except Exception as exc:  # e.g. a late CancelRequest: not released
                failure = exc
            if failure is not None:
                await self._undo_savepoint(conn, deliver=False)
                raise failure  # outranks a cancellation met meanwhile

    # -- ending ------------------------------------------------------------

    async def _finish(self, *, commit: bool, deliver: bool) -> None:
        """End our transaction (if we opened one) and give a Pool's connection
        back. Raises a failed COMMIT's error, then (``deliver``) a
        cancellation met on the way; without ``deliver`` it is dropped (an
        exception in flight outranks it)."""
        conn = self._conn
        error: BaseException | None = None
        with Cleanup() as cleanup:
            clean = True
            if self._owned and conn is not None:
                in_tx = True
                if commit:
                    fut = asyncio.ensure_future(self._end_statement(conn, commit=True))
                    fut.add_done_callback(mark_retrieved)
                    try:
                        await cleanup.wait(fut)
                    except BaseException as exc:
                        error = exc  # e.g. a deferred constraint: rolled back
                    in_tx = conn.is_in_transaction()
                if in_tx:
                    clean = await self._rollback(conn, cleanup)
                self._tx = None
            # A pool's connection is its proxy (a lease).
            if self._pool is not None and isinstance(conn, PoolConnectionProxy):
                await cleanup.give_back(self._pool, conn, discard=not clean)
                self._conn = None
            self._owned = False
            if error is not None:
                raise error
            if not deliver:
                cleanup.forget()

    async def _rollback(self, conn: Conn, cleanup: Cleanup) -> bool:
        """ROLLBACK whatever is open (after an interrupted statement the server
        may or may not be in a transaction); True once confirmed."""

        async def step(attempt: int) -> None:
            await self._end_statement(conn, commit=False)

        ok, _ = await cleanup.run(step)
        if ok and not conn.is_closed() and not conn.is_in_transaction():
            return True
        self._discard(conn, "could not confirm its transaction was rolled back")
        return False

    async def _end_statement(self, conn: Conn, *, commit: bool) -> None:
        """COMMIT or ROLLBACK our transaction: the first time through asyncpg's
        Transaction (which forgets it as the connection's top transaction
        before sending the statement, so even an interrupted end leaves no
        stale Transaction behind); a retry, or an end after a start that
        failed, as a plain statement."""
        tx, self._tx = self._tx, None
        if commit:  # as long as it takes (deferred triggers, synchronous replicas)
            await (conn.execute(_sql.COMMIT) if tx is None else tx.commit())
        elif tx is None:
            await conn.execute(_sql.ROLLBACK, timeout=CLEANUP_STATEMENT_TIMEOUT)
        else:
            # Awaited in this task, so asyncpg forgets the transaction before
            # anything can interrupt it (a task of its own, as wait_for()
            # makes one, could be cancelled before it ever ran).
            with anyio.fail_after(CLEANUP_STATEMENT_TIMEOUT):
                await tx.rollback()

    def _discard(self, conn: Conn, why: str) -> None:
        """The last resort: never reuse a connection whose state is unknown;
        its backend's transaction and locks go as it exits."""
        logger.warning(
            "%s: %s; terminating its connection",
            self._what,
            why,
            extra=_otel.log_fields(pid=self.pid, kind=self._what, outcome="discarded"),
        )
        terminate(conn)

    async def _exit(self, exc: BaseException | None) -> None:
        """End the block: commit or roll back our transaction, give back a
        Pool's connection. Inside a caller's transaction, nothing happens: the
        lock is held until that transaction ends."""
        if self._done:
            return
        self._done = True
        if not self.acquired:
            return
        await self._finish(commit=exc is None, deliver=True)


def _forget_failed_start(conn: Conn, tx: Transaction) -> None:
    """After ``tx.start()`` failed, make asyncpg forget ``tx`` as the
    connection's top transaction. asyncpg records it before sending BEGIN and
    keeps it when BEGIN fails (the Transaction, in its error state, refuses
    rollback()), after which every ``conn.transaction()`` would be taken for
    a savepoint outside any transaction. The one read of asyncpg's internals
    here (``Connection._top_xact``; pinned by tests/test_tables.py)."""
    raw = raw_connection(conn)
    if raw is not None:
        forget_top_transaction(raw, tx)


L = TypeVar("L", bound=TransactionLock)


class TransactionLockSpec(ExitsEntered, Generic[L]):
    """What ``table()`` and ``rows()`` share: ``async with`` over a fresh
    handle per entry (:meth:`_new_lock`), ``side_effect=Raise`` applied."""

    __slots__ = ("_active", "_db", "_side_effect", "_timeout")

    def _configure(self, db: DB | None, timeout: float | None, side_effect: SideEffect) -> None:
        self._db = db
        self._timeout = timeout
        self._side_effect = side_effect
        self._active: Entered[L] = Entered()

    def _new_lock(self) -> L:
        raise NotImplementedError

    def _not_acquired(self, lock: L) -> str:
        """The LockNotAcquired message for ``lock``."""
        raise NotImplementedError

    #: The kind of lock in metrics and spans.
    _kind = "lock"

    def _otel_mode(self, lock: L) -> str:
        """The lock's mode in metrics and spans."""
        raise NotImplementedError

    async def __aenter__(self) -> L:
        lock = self._new_lock()
        wait = _otel.begin(self._kind, self._otel_mode(lock), None)
        try:
            await lock._enter(resolve_db(self._db))
            if not lock.acquired and self._side_effect is Raise:
                raise LockNotAcquired(self._not_acquired(lock))
        except BaseException as exc:
            _otel.failed(wait, exc)
            raise
        _otel.granted(wait, lock)
        self._active.push(lock)
        return lock
