"""The statements of one advisory lock on a session: lock (under a savepoint
in a caller's transaction), undo an interrupted or failed wait, resolve an
ambiguous outcome on the server, unlock, and the release through a pool's
reset. Each step leaves nothing of ours held that the caller does not know
about; a connection whose state cannot be confirmed is terminated."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from . import _names, _otel, _sql
from ._asyncpg import reset_unlocks, wait_released
from ._concurrency import Cleanup, mark_retrieved, run_through
from ._conntypes import Conn, Pool, Proxy, RawConn
from ._db import CLEANUP_STATEMENT_TIMEOUT, lock_table_full, raw_connection, terminate
from ._errors import UsageError
from ._keys import AdvisoryKey
from ._liveness import Liveness
from ._protect import granted as protect_granted
from ._protect import released as protect_released
from ._protect import waiting
from ._timeouts import to_milliseconds

if TYPE_CHECKING:
    from ._advisory import AdvisoryLock

__all__ = [
    "LockSteps",
    "alive",
    "answered",
    "release_held",
    "release_with_reset",
    "statements_naming",
]

logger = logging.getLogger("aiopglock")


def answered(failure: BaseException | None) -> bool:
    """Whether ``failure`` is the server's answer to a statement on a live
    session (rather than the session's end)."""
    if isinstance(failure, asyncpg.QueryCanceledError):
        return True
    return isinstance(failure, asyncpg.PostgresError) and not isinstance(
        failure,
        (asyncpg.PostgresConnectionError, asyncpg.exceptions.OperatorInterventionError),
    )


def alive(conn: Conn) -> bool:
    """Whether ``conn`` (a pool's proxy too) is still connected."""
    raw = raw_connection(conn)
    return raw is not None and not raw.is_closed()


def statements_naming(
    name: str | None, slot: int | None, args: tuple[int, ...], *, shared: bool, xact: bool
) -> _sql.NamedStatements | None:
    """The statements naming the str key ``name`` on the server (see
    aiopglock._names), or None: no name, names off, or a name too long to
    send (which the cache then never keeps)."""
    if name is None or not _names.enabled() or len(name) > _names.MAX_NAME:
        return None
    return _named(name, slot, args, shared, xact)


@functools.lru_cache(maxsize=1024)
def _named(
    name: str, slot: int | None, args: tuple[int, ...], shared: bool, xact: bool
) -> _sql.NamedStatements | None:
    """The named statements of a key, kept for the names a service reuses."""
    comment = _names.comment(name, slot)
    if comment is None:
        return None
    return _sql.named_statements(comment, args, shared=shared, xact=xact)


class LockSteps:
    """The statements of one advisory key in one mode. With ``fence=True``
    each lock statement also returns the fencing token, kept in ``fence``
    (None unless the last lock statement returned granted).

    Example::

        steps = LockSteps(key, shared=False, xact=False)
        if await steps.lock(conn, timeout=5):
            ...
            with Cleanup() as cleanup:
                released = await steps.release(conn, cleanup, liveness)
    """

    __slots__ = ("args", "fence", "fenced", "key", "named", "stmts", "xact")

    def __init__(
        self,
        key: AdvisoryKey,
        *,
        shared: bool,
        xact: bool,
        fence: bool = False,
        name: str | None = None,
        slot: int | None = None,
    ) -> None:
        self.key = key
        self.xact = xact
        self.fenced = fence
        self.fence: int | None = None
        pair = isinstance(key, tuple)
        self.args: tuple[int, ...] = key if isinstance(key, tuple) else (key,)
        flavours = _sql.FENCED_STATEMENTS if fence else _sql.ADVISORY_STATEMENTS
        self.stmts = flavours[shared, xact, pair]
        # Not with fence=True, whose token is a column of the result.
        self.named = (
            None if fence else statements_naming(name, slot, self.args, shared=shared, xact=xact)
        )

    async def run_lock(self, conn: Conn, stmt: str, *args: Any) -> Any:
        """Run a lock statement and return its first column. With fence=True
        its last column is the fencing token (None when not granted): the one
        place it is read."""
        if not self.fenced:
            return await conn.fetchval(stmt, *args)
        row = await conn.fetchrow(stmt, *args)
        assert row is not None  # a SELECT without FROM returns one row
        self.fence = row[-1]
        return row[0]

    async def check_fence_xid(self, conn: Conn) -> None:
        """With fence=True in a transaction: refuse one that has an xid
        already. The token is the transaction's xid: one assigned before the
        grant could be older than a fence issued to another holder since."""
        if self.fenced and await conn.fetchval(_sql.XACT_ID_ASSIGNED):
            raise UsageError(
                f"fence=True for advisory key {self.key!r} in a transaction that has "
                "already written (its xid predates the grant): take the fenced lock "
                "before the transaction's first write"
            )

    async def lock(self, conn: Conn, timeout: float | None) -> bool:
        """Send the lock statement; resolve any ambiguity before raising.
        True: granted."""
        in_tx = conn.is_in_transaction()
        if in_tx:
            await self.check_fence_xid(conn)
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
            granted = await self.send(conn, timeout, in_tx=in_tx)
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
        return granted

    async def send(self, conn: Conn, timeout: float | None, *, in_tx: bool) -> bool:
        """The lock statement alone, nothing undone: True when granted, False
        when a try (``timeout=0``) was not; a timed-out wait raises
        ``LockNotAvailableError``. In a transaction a ``lock_timeout`` set for
        the wait is given back after the grant."""
        stmts = self.stmts
        args = self.args
        named = self.named
        if timeout == 0:
            if named is None:
                granted = bool(await self.run_lock(conn, stmts.try_lock, *args))
            else:
                granted = await conn.execute(named.try_lock) == "SELECT 1"
            if granted:
                protect_granted(conn)
            return granted
        if timeout is None:
            with waiting(conn):
                if named is None:
                    await self.run_lock(conn, stmts.lock, *args)
                else:
                    await conn.execute(named.lock)
            return True
        setting = to_milliseconds(timeout)
        if not in_tx:
            with waiting(conn):
                if named is None:
                    await self.run_lock(conn, stmts.lock_with_timeout, *args, setting)
                else:
                    await conn.execute(named.lock_with_timeout(setting))
            return True
        with waiting(conn):
            if named is None:
                previous = await self.run_lock(conn, stmts.lock_with_timeout_in_tx, *args, setting)
            else:
                await conn.execute(named.lock_with_timeout_in_tx(setting))
        # The transaction goes on: give it its lock_timeout back.
        if named is None:
            await conn.fetchval(_sql.RESTORE_LOCK_TIMEOUT_LOCAL, previous)
        else:
            await conn.fetchval(_sql.RESTORE_SAVED_LOCK_TIMEOUT)
        return True

    async def _release_savepoint(self, conn: Conn, granted: bool) -> None:
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
                if give_back and not await self.resolve(conn, cleanup):
                    self.discard(conn)
            if failed:
                # The statement itself failed: the savepoint still stands.
                await self._undo(conn, in_tx=True, phase="lock", resolve=granted)
                fut.result()  # raises that failure, which outranks a cancellation

    async def _undo(self, conn: Conn, *, in_tx: bool, phase: str, resolve: bool) -> None:
        """After an interrupted or failed lock: leave nothing of ours held."""
        self.fence = None  # a token counts only when the lock statement returned granted
        with Cleanup() as cleanup:
            await self._undo_steps(conn, cleanup, in_tx=in_tx, phase=phase, resolve=resolve)

    async def _undo_steps(
        self, conn: Conn, cleanup: Cleanup, *, in_tx: bool, phase: str, resolve: bool
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
            ok = await self.resolve(conn, cleanup)
        if not ok:
            self.discard(conn)

    def discard(self, conn: Conn) -> None:
        """The last resort: never reuse a connection whose state is unknown.
        Its backend drops every lock of its session as it exits."""
        logger.warning(
            "could not confirm advisory key %r was released; terminating its connection",
            self.key,
            extra=_otel.log_fields(key=self.key, kind="advisory", outcome="discarded"),
        )
        terminate(conn)

    async def resolve(self, conn: Conn, cleanup: Cleanup) -> bool:
        """Ask the server whether this session holds the key; release it if so."""
        stmt = self.stmts.resolve
        args = self.args

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

    def unconfirmed(self, conn: Conn, liveness: Liveness) -> None:
        """The release could not be confirmed: a connection that died on the
        way lost the lock; one merely unresponsive is discarded."""
        if not liveness.expired:
            liveness.check()
        self.discard(conn)

    async def release_with_reset(
        self, pool: Pool, conn: Proxy, raw: RawConn, cleanup: Cleanup, liveness: Liveness
    ) -> str | None:
        """Give the connection back; its pool's reset releases the lock (see
        :func:`release_with_reset`)."""
        return await release_with_reset(pool, conn, raw, cleanup, liveness, self.discard)

    async def release(self, conn: Conn, cleanup: Cleanup, liveness: Liveness) -> bool | None:
        """Unlock on the holding connection. True: released; False: it was not
        held; None: could not be confirmed (the connection must be discarded)."""
        stmts = self.stmts
        args = self.args

        async def step(attempt: int) -> bool:
            if attempt == 0:
                # The common case, bounded by the loop's sweeper rather than a
                # timer of its own: past the deadline the connection is
                # terminated, which ends the statement with an error.
                sweep = liveness.arm_deadline(conn)
                try:
                    return bool(await conn.fetchval(stmts.unlock, *args))
                finally:
                    sweep.clear(liveness)
            # A retry follows an interrupted unlock, which may or may not have
            # run: ask pg_locks instead of unlocking blindly a second time.
            await conn.fetchval(stmts.resolve, *args, timeout=CLEANUP_STATEMENT_TIMEOUT)
            return True

        ok, released = await cleanup.run(step)
        return released if ok else None


async def release_held(
    lock: AdvisoryLock, conn: Conn, exc: BaseException | None, cleanup: Cleanup
) -> None:
    """The exit's cleanup of a held session lock (or an ``xact=True`` one in a
    caller's transaction): stop its liveness checks, unlock (or let the
    pool's reset unlock), give a Pool's connection back."""
    steps = lock._steps
    await lock._liveness.stop(cleanup)
    # The termination listener runs a loop turn after the socket
    # closes: look for ourselves rather than rely on it having run.
    lock._liveness.check()
    raw = lock._raw
    pool = lock._pool
    # The pool's lease of the connection (always a proxy), when leased.
    leased = conn if pool is not None and isinstance(conn, PoolConnectionProxy) else None
    if (
        exc is None
        and not lock._lost
        and not lock.xact
        and pool is not None
        and leased is not None
        and raw is not None
        and lock._claims.wanted_alone()
        and reset_unlocks(pool, leased, raw)
    ):
        # The pool's reset ends every advisory lock of the session
        # on this same connection, confirmed before the connection
        # is handed out again: the unlock rides along with it. Not
        # when another task of this process wants the key: asyncpg
        # sends the reset from a task of its own, a loop turn later,
        # and a direct unlock hands the key over sooner.
        lost = await steps.release_with_reset(pool, leased, raw, cleanup, lock._liveness)
        if lost is not None:
            lock._mark_lost(lost)
    else:
        if not lock._lost and not lock.xact:
            released = await steps.release(conn, cleanup, lock._liveness)
            if released is None:
                steps.unconfirmed(conn, lock._liveness)
            elif not released:
                lock._mark_lost("it was no longer held when the block exited")
            else:
                # A caller's Connection stays with the caller: in a
                # prioritize() block its backend is no longer spared
                # on this lock's account (a pool's return does that).
                protect_released(conn)
        if pool is not None and leased is not None:
            await cleanup.give_back(pool, leased, discard=lock._lost)


async def release_with_reset(
    pool: Pool,
    conn: Proxy,
    raw: RawConn,
    cleanup: Cleanup,
    liveness: Liveness,
    discard: Callable[[Conn], None],
) -> str | None:
    """Give the connection back; its pool's reset (``pg_advisory_unlock_all()``)
    releases every advisory lock of the session. Used on a normal exit only:
    after an error or a cancellation a late CancelRequest could interrupt the
    reset, so those exits unlock explicitly, with retries.

    When the reset fails, the pool terminates the connection and its backend
    drops the locks as it exits: they were lost if the connection had died
    (the reason is returned), and are merely ``discard``-ed otherwise."""
    sweep = liveness.arm_deadline(conn)
    failure: Exception | None = None
    try:
        await pool.release(conn)
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
        sweep.clear(liveness)
    if not raw.is_closed():
        return None
    if liveness.expired or answered(failure):
        # Alive but unresponsive, or the server answered the reset with an
        # error: the pool terminated a live connection.
        discard(conn)
        return None
    return "its connection was closed"
