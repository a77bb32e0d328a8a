"""``xact=True`` on a Pool, or on a Connection outside a transaction: the
lock is taken in a transaction aiopglock opens with asyncpg's own
``conn.transaction()`` (so the block can nest one in it, as on plain
asyncpg) and the block runs inside it. ``BEGIN`` and ``COMMIT`` are never
half-run; any failure or interruption rolls the whole transaction back,
lock included (a transaction-level lock needs no resolving)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from . import _sql
from ._advisory_steps import alive, answered
from ._asyncpg import forget_top_transaction
from ._concurrency import BlockCanceller, Cleanup, deliver_lost, foreign_cancel, mark_retrieved
from ._conntypes import Conn, Pool
from ._db import CLEANUP_STATEMENT_TIMEOUT, Deadline, lease, lock_table_full, raw_connection
from ._reentry import advisory_holds, check_xact_left
from ._server import check_lock_target

if TYPE_CHECKING:
    from ._advisory import AdvisoryLock

__all__ = ["enter_owned", "exit_owned"]


async def enter_owned(lock: AdvisoryLock, target: Pool | Conn, task: asyncio.Task[Any]) -> None:
    """``xact=True`` on a Pool or a Connection outside a transaction: open
    a transaction with asyncpg's own ``conn.transaction()`` (so the block
    can nest one in it, as on plain asyncpg), take the lock in it; the
    block runs inside it. On return ``acquired`` tells; when False, no
    transaction is left open and no connection leased."""
    outer = advisory_holds.outer(task, lock.key, shared=lock.shared)
    timeout = lock._timeout
    deadline = Deadline(timeout)
    conn: Conn | None
    if isinstance(target, asyncpg.Pool):
        conn = await lease(target, timeout)
        if conn is None:  # every connection stayed in use: not acquired
            return
        lock._pool = target
    else:
        conn = target
        # Another task sharing this connection may hold the key on it.
        left = await lock._claims.claim_on(raw_connection(conn), task, timeout)
        if left is not None and left < 0:
            return
    lock._conn = conn
    lock._owned = True
    # Held by this task on another session, for longer than this
    # transaction lasts (it ends with this block): asking the server again
    # would wait for that hold, i.e. for ourselves.
    nested = outer is not None and raw_connection(conn) is not getattr(outer, "_raw", None)
    try:
        if nested:
            # Refused without a token to share: nothing of ours is open yet.
            lock._take_fence_of(outer)
        try:
            # A hot standby is refused before BEGIN (nothing of ours open).
            await check_lock_target(conn, session=False)
            await check_xact_left(conn, task, lock.key)
            await _begin(lock, conn)
        except asyncpg.InterfaceError:
            # Raised before BEGIN was sent (connection closed or busy with
            # another task's query): nothing of ours is open.
            lock._tx = None
            raise
        if nested:
            granted = True
        else:
            granted = await _lock_owned(lock, conn, deadline.remaining())
    except BaseException:
        # The exception in flight outranks a cancellation met in cleanup.
        with Cleanup() as cleanup:
            await _end_owned(lock, cleanup, commit=False)
            raise
    if not granted:
        with Cleanup() as cleanup:
            await _end_owned(lock, cleanup, commit=False)
        return
    lock.acquired = True
    if outer is not None and nested:
        lock._outer = outer
        lock.pid = outer.pid
    else:
        lock._after_grant(task)


async def _begin(lock: AdvisoryLock, conn: Conn) -> None:
    """Start the transaction, never half-run (like COMMIT): a cancellation
    meanwhile waits for BEGIN to end, so that whether the transaction is
    open is known; it is re-raised after, and the caller rolls back."""
    tr = conn.transaction()
    lock._tx = tr
    fut = asyncio.ensure_future(tr.start())
    # Its outcome is always read below; this only keeps asyncio from
    # reporting it as never retrieved if the task is torn down first.
    fut.add_done_callback(mark_retrieved)
    with Cleanup(lazy=True) as cleanup:
        await cleanup.wait(fut)


async def _lock_owned(lock: AdvisoryLock, conn: Conn, timeout: float | None) -> bool:
    """Send the lock statement in our transaction. False: the server said
    not granted. Any failure or interruption is undone by rolling the
    whole transaction back, which takes any grant with it (a
    transaction-level lock, so no resolving is needed)."""
    try:
        # The block runs in this transaction: a lock_timeout set for the
        # wait is given back after the grant.
        return await lock._steps.send(conn, timeout, in_tx=True)
    except asyncpg.LockNotAvailableError:
        return False
    except asyncpg.exceptions.OutOfMemoryError as exc:
        raise lock_table_full(exc) from exc


async def _end_owned(lock: AdvisoryLock, cleanup: Cleanup, *, commit: bool) -> BaseException | None:
    """Commit (``commit``) or roll back our transaction and give a Pool's
    connection back. Returns a failed COMMIT's error (the transaction is
    then rolled back), for the caller to raise."""
    conn, tr = lock._conn, lock._tx
    lock._tx = None
    error: BaseException | None = None
    clean = True
    if tr is not None and conn is not None:
        in_tx = True
        if commit and alive(conn):
            fut = asyncio.ensure_future(tr.commit())
            fut.add_done_callback(mark_retrieved)
            try:
                await cleanup.wait(fut)  # never interrupted: its outcome is known
            except Exception as exc:  # e.g. a deferred constraint
                error = exc
            raw = raw_connection(conn)
            in_tx = raw is None or raw.is_closed() or raw.is_in_transaction()
        if in_tx:
            clean = await _rollback_owned(lock, conn, tr, cleanup)
    if lock._pool is not None and conn is not None:
        assert isinstance(conn, PoolConnectionProxy)  # leased from the pool
        await cleanup.give_back(lock._pool, conn, discard=not clean)
    lock._claims.release()
    lock._conn = None
    return error


def rollback_step(conn: Conn, tr: Any) -> Callable[[int], Awaitable[None]]:
    """A :meth:`Cleanup.run` step that rolls back aiopglock's transaction
    ``tr``: asyncpg's own rollback first; after an interrupted one (asyncpg
    then counts ``tr`` as failed and refuses it again) a plain ROLLBACK,
    harmless whether the server is still in the transaction or not."""

    async def step(attempt: int) -> None:
        if attempt == 0:
            try:
                await tr.rollback()  # also ends asyncpg's record of it
                return
            except asyncpg.InterfaceError:
                pass  # asyncpg counts it as ended already (a failed COMMIT)
        await conn.execute(_sql.ROLLBACK, timeout=CLEANUP_STATEMENT_TIMEOUT)
        raw = raw_connection(conn)
        if raw is not None:
            forget_top_transaction(raw, tr)

    return step


async def _rollback_owned(lock: AdvisoryLock, conn: Conn, tr: Any, cleanup: Cleanup) -> bool:
    """Roll our transaction back (and with it the lock); True once the
    server confirms no transaction is open."""
    if not alive(conn):
        return False
    ok, _ = await cleanup.run(rollback_step(conn, tr))
    raw = raw_connection(conn)
    if ok and raw is not None and not raw.is_closed() and not raw.is_in_transaction():
        return True
    lock._steps.discard(conn)
    return False


async def exit_owned(
    lock: AdvisoryLock, exc: BaseException | None, ours: bool, canceller: BlockCanceller | None
) -> None:
    """End the block of a lock in our own transaction: COMMIT when it
    succeeded, ROLLBACK on error, cancellation or a lost connection."""
    if not lock.acquired:
        return
    outer = lock._outer
    lock._unregister()
    lock._liveness.unwatch()
    if outer is None:
        lock._liveness.check()
    with Cleanup(lazy=exc is None) as cleanup:
        try:
            error = await _end_owned(lock, cleanup, commit=exc is None and not lock.lost)
            if error is not None and outer is None and not answered(error):
                # Not the server's answer (a deferred constraint, a
                # serialization failure...): the connection failed under the
                # COMMIT, as it does when its backend is terminated just then.
                lock._mark_lost(
                    f"its connection failed at COMMIT, whose outcome is unknown ({error!r})"
                )
                raise lock._lost_error() from error
        finally:
            lock.acquired = False
        if outer is not None:
            if outer.lost and not foreign_cancel(exc, outer._canceller):
                raise outer._lost_error() from exc
        elif lock._lost and await deliver_lost(
            lock._lost_error(), exc, ours, canceller, cleanup, lock._task
        ):
            return  # a cancellation met in cleanup outranks the rest
        if error is not None:
            raise error
