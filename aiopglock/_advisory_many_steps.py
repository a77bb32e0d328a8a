"""The statements of one ``advisory_many`` set on a session: open
aiopglock's transaction, take the set (a prefix at a time, waiting on the
server for the first busy key), undo a take that failed or was interrupted,
unlock, and end aiopglock's transaction; and the handle's two cleanups
built on them: ``not_held`` (after a take that did not end with the whole
set) and ``release_set`` (the exit). Each step leaves nothing of ours held
that the handle does not know about; a connection whose state cannot be
confirmed is terminated."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from . import _sql
from ._advisory_owned import rollback_step
from ._advisory_steps import LockSteps, release_with_reset
from ._asyncpg import reset_unlocks
from ._concurrency import Cleanup, mark_retrieved, run_through
from ._conntypes import Conn
from ._db import CLEANUP_STATEMENT_TIMEOUT, Deadline, raw_connection, terminate
from ._errors import UsageError
from ._keys import AdvisoryKey
from ._liveness import Liveness
from ._many_keys import key_arrays, keys_text
from ._protect import granted as protect_granted
from ._protect import released as protect_released
from ._reentry import note_xact_left

if TYPE_CHECKING:
    from ._advisory_many import AdvisoryManyLock

__all__ = ["ManySteps", "not_held", "release_set"]

logger = logging.getLogger("aiopglock")


class ManySteps:
    """The statements of one key set (sorted, as
    :func:`~aiopglock._many_keys.sorted_keys` returns it) in one mode. With
    ``fence=True`` a granted take also reads one fencing token for the set,
    kept in ``fence``.

    Example::

        steps = ManySteps(sorted_keys(["a", "b"]), shared=False, xact=False, fence=False)
        if await steps.take(conn, Deadline(5)):
            ...
            with Cleanup() as cleanup:
                missing = await steps.unlock(conn, cleanup)
    """

    __slots__ = (
        "args",
        "fence",
        "fenced",
        "keys",
        "pairs",
        "savepoint",
        "shared",
        "stmts",
        "taken",
        "tx",
        "unknown",
        "xact",
    )

    def __init__(
        self, keys: tuple[AdvisoryKey, ...], *, shared: bool, xact: bool, fence: bool
    ) -> None:
        self.keys = keys
        self.shared = shared
        self.xact = xact
        self.fenced = fence
        self.fence: int | None = None
        # Pairs sort last: the last key tells whether there is any.
        self.pairs = isinstance(keys[-1], tuple)
        self.stmts = _sql.many_statements(shared=shared, xact=xact, pairs=self.pairs)
        self.args = key_arrays(keys, self.pairs)
        # How many keys (a prefix of ``keys``) the take holds; whether a failed
        # statement may hold more (cleanup then asks pg_locks about those).
        self.taken = 0
        self.unknown = False
        self.tx: Any = None
        self.savepoint = False

    async def begin(self, conn: Conn) -> None:
        """Open aiopglock's transaction (asyncpg's own, so the block can nest
        one); BEGIN is never half-run."""
        self.tx = conn.transaction()
        fut = asyncio.ensure_future(self.tx.start())
        fut.add_done_callback(mark_retrieved)
        with Cleanup(lazy=True) as cleanup:
            await cleanup.wait(fut)

    async def take(self, conn: Conn, deadline: Deadline) -> bool:
        """The lock statements; True when every key is held."""
        in_tx = conn.is_in_transaction()
        if in_tx:
            if self.fenced and await conn.fetchval(_sql.XACT_ID_ASSIGNED):
                raise UsageError(
                    "fence=True for advisory_many in a transaction that has already "
                    "written (its xid predates the grant): take the fenced set before "
                    "the transaction's first write"
                )
            with Cleanup(lazy=True) as cleanup:
                self.savepoint = True
                await run_through(conn, _sql.SAVEPOINT, cleanup)
        keys = self.keys
        stmts = self.stmts
        while True:
            rest = keys[self.taken :]
            # Run to its end even when cancelled meanwhile (the cancellation is
            # raised after): how many keys it took is then known, and cleanup
            # releases exactly those, never a hold of another task sharing
            # this connection. Try-locks never wait, so this is quick.
            fut = asyncio.ensure_future(
                conn.fetchval(stmts.try_prefix, *key_arrays(rest, self.pairs))
            )
            fut.add_done_callback(mark_retrieved)
            with Cleanup(lazy=True) as cleanup:
                try:
                    got = await cleanup.wait(fut)
                except BaseException:
                    # A failed statement may have taken a prefix of the rest.
                    self.unknown = True
                    raise
                self.taken += got
            if self.taken == len(keys):
                break
            remaining = deadline.remaining()
            if remaining == 0:
                return False
            # Wait for the first missing key on the server (its own steps
            # resolve that one key if interrupted), then try the rest.
            steps = LockSteps(keys[self.taken], shared=self.shared, xact=self.xact)
            if not await steps.lock(conn, remaining):
                return False
            self.taken += 1
        if self.fenced:
            # One token for the set, taken once every key is held.
            self.fence = await conn.fetchval(_sql.FENCE_NOW)
        if in_tx:
            with Cleanup(lazy=True) as cleanup:
                await run_through(conn, _sql.RELEASE_SAVEPOINT, cleanup)
                self.savepoint = False
        protect_granted(conn)
        return True

    async def undo(self, conn: Conn, cleanup: Cleanup, *, owned: bool) -> bool:
        """Roll back what the take did (``owned``: in aiopglock's own
        transaction); False when that is not confirmed."""
        raw = raw_connection(conn)
        if raw is None or raw.is_closed():
            return True  # its backend's locks went with it
        if owned:
            tx, self.tx = self.tx, None
            if tx is None or not conn.is_in_transaction():
                return True  # BEGIN never ran: nothing of ours is open
            ok, _ = await cleanup.run(rollback_step(conn, tx))
            return ok and not raw.is_in_transaction()
        if self.savepoint:
            self.savepoint = False

            async def rollback(attempt: int) -> None:
                # InvalidSavepoint: SAVEPOINT itself failed (the caller's
                # transaction is aborted, and rolls back as any would).
                with contextlib.suppress(asyncpg.InvalidSavepointSpecificationError):
                    await run_through(conn, _sql.ROLLBACK_TO_SAVEPOINT, cleanup)

            ok, _ = await cleanup.run(rollback)
            if not ok:
                return False
        if self.xact:
            return True  # the rollback to the savepoint ended every grant
        # Session locks: release the keys known taken; only after a failed
        # statement ask pg_locks about the ones it may have taken.
        taken, self.taken = self.keys[: self.taken], 0
        unknown, self.unknown = self.unknown, False
        todo: list[tuple[str, tuple[list[Any], ...]]] = []
        if taken:
            todo.append((self.stmts.unlock, key_arrays(taken, self.pairs)))
        if unknown and len(taken) < len(self.keys):
            todo.append((self.stmts.resolve, key_arrays(self.keys[len(taken) :], self.pairs)))
        for stmt, args in todo:

            async def release(attempt: int, stmt: str = stmt, args: Any = args) -> int:
                return int(await conn.fetchval(stmt, *args, timeout=CLEANUP_STATEMENT_TIMEOUT))

            ok, _ = await cleanup.run(release)
            if not ok:
                return False
        return True

    def discard(self, conn: Conn) -> None:
        logger.warning(
            "could not confirm advisory keys %s were released; terminating their connection",
            keys_text(self.keys),
        )
        terminate(conn)

    async def unlock(self, conn: Conn, cleanup: Cleanup) -> int | None:
        """Unlock the set on the holding connection: how many keys were no
        longer held, or None when that could not be confirmed."""
        stmts = self.stmts
        args = self.args

        async def step(attempt: int) -> int:
            if attempt == 0:
                return int(await conn.fetchval(stmts.unlock, *args))
            # A retry follows an interrupted unlock: ask pg_locks instead.
            await conn.fetchval(stmts.resolve, *args, timeout=CLEANUP_STATEMENT_TIMEOUT)
            return 0

        ok, missing = await cleanup.run(step)
        return missing if ok else None

    async def end_owned(
        self,
        conn: Conn,
        exc: BaseException | None,
        cleanup: Cleanup,
        liveness: Liveness,
        lost: Callable[[], bool],
    ) -> BaseException | None:
        """COMMIT aiopglock's transaction when the block succeeded, else roll
        it back; returns a COMMIT's failure (raised after the cleanup).
        ``lost`` tells whether the handle's keys were lost."""
        tx, self.tx = self.tx, None
        if tx is None or lost():
            return None
        commit = exc is None
        fut = asyncio.ensure_future(tx.commit() if commit else tx.rollback())
        fut.add_done_callback(mark_retrieved)
        try:
            await cleanup.wait(fut)
        except Exception as failure:
            terminate(conn)
            liveness.check()
            return failure if commit and not lost() else None
        return None


async def not_held(lock: AdvisoryManyLock, *, raising: bool) -> None:
    """Leave nothing held after a failed, refused or interrupted take, no
    transaction of ours open and no connection leased. ``raising``: an
    exception is in flight (it outranks a cancellation met here)."""
    lock.fence = None
    conn = lock._conn
    with Cleanup() as cleanup:
        if conn is not None and not await lock._steps.undo(conn, cleanup, owned=lock._owned):
            lock._steps.discard(conn)
        lock._release_claims()
        if lock._pool is not None and conn is not None:
            await cleanup.give_back(lock._pool, conn, discard=False)
        lock._conn = None
        lock._pool = None
        if raising:
            cleanup.forget()


async def release_set(
    lock: AdvisoryManyLock, conn: Any, exc: BaseException | None, cleanup: Cleanup
) -> BaseException | None:
    """The exit's cleanup of a held set: stop its liveness checks, end
    aiopglock's transaction, or note the keys left held in the caller's, or
    unlock (or let the pool's reset unlock), and give a Pool's connection
    back. Returns a COMMIT's failure (raised after the cleanup)."""
    steps = lock._steps
    task = lock._task
    failure: BaseException | None = None
    await lock._liveness.stop(cleanup)
    lock._liveness.check()
    if lock._owned:
        failure = await steps.end_owned(conn, exc, cleanup, lock._liveness, lambda: lock.lost)
    elif lock.xact:
        # In the caller's transaction: the keys stay held until it ends.
        if task is not None and lock._raw is not None and lock.pid:
            for key in lock.keys:
                note_xact_left(task, key, lock._raw, lock.pid)
    elif not lock.lost and _reset_unlocks(lock, exc, conn):
        # The pool's reset unlocks every key on the way back (as
        # advisory()'s normal exit does): no round trip of ours.
        lost = await release_with_reset(
            lock._pool, conn, lock._raw, cleanup, lock._liveness, steps.discard
        )
        if lost is not None:
            lock._mark_lost(lost)
        conn = None
    elif not lock.lost:
        await _unlock(lock, conn, cleanup)
    if lock._pool is not None and conn is not None:
        await cleanup.give_back(lock._pool, conn, discard=lock.lost)
    return failure


def _reset_unlocks(lock: AdvisoryManyLock, exc: BaseException | None, conn: Conn) -> bool:
    """Whether a normal exit may leave the unlock to the pool's reset: a
    session set on a leased connection, no other handle of this process
    waiting for one of its keys (a direct unlock hands a key over a loop
    turn sooner), and the pool's default reset."""
    return (
        exc is None
        and lock._pool is not None
        and isinstance(conn, PoolConnectionProxy)
        and all(claim.wanted_alone() for claim in lock._claims)
        and reset_unlocks(lock._pool, conn, lock._raw)
    )


async def _unlock(lock: AdvisoryManyLock, conn: Conn, cleanup: Cleanup) -> None:
    """Unlock the set; a missing key marks it lost, an unconfirmed unlock
    discards the connection."""
    missing = await lock._steps.unlock(conn, cleanup)
    if missing is None:
        lock._liveness.check()
        if not lock.lost:
            lock._steps.discard(conn)
        return
    if missing:
        lock._mark_lost("some keys were no longer held when the block exited")
    elif lock._pool is None:
        protect_released(conn)
