"""Contended keys of a :class:`aiopglock.Locker`, on dedicated connections.

A try-lock refused on the holder connection (another session holds the key)
waits in PostgreSQL's queue on a pool connection of its own, in a task of
the Locker that runs in the caller's context, then holds the key there until
the Locker releases it. Every outcome is reported to the ``LockerState``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import asyncpg

from . import _sql
from ._advisory_steps import statements_naming
from ._concurrency import Cleanup
from ._db import CLEANUP_STATEMENT_TIMEOUT, lease, lock_table_full, raw_connection
from ._keys import AdvisoryKey
from ._liveness import Liveness
from ._locker_entry import Dedicated, Entry, Request
from ._locker_state import LockerState
from ._protect import waiting
from ._timeouts import to_milliseconds

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

__all__ = ["wait_dedicated"]

logger = logging.getLogger("aiopglock")


def _key_args(key: AdvisoryKey) -> tuple[int, ...]:
    return key if isinstance(key, tuple) else (key,)


async def wait_dedicated(
    pool: asyncpg.Pool[Any], state: LockerState, entry: Entry, req: Request
) -> None:
    """A contended request: wait for the key on a connection of its own,
    then hold it there until released. Runs in the caller's context."""
    stmts = _sql.ADVISORY_STATEMENTS[entry.shared, False, isinstance(entry.key, tuple)]
    args = _key_args(entry.key)
    # The wait names a str key on the server (see aiopglock._names).
    named = statements_naming(req.handle._name, None, args, shared=entry.shared, xact=False)
    error: BaseException | None = None
    conn: PoolConnectionProxy[Any] | None = None
    try:
        conn = await _wait_on_server(pool, state, req, stmts, args, named)
    except asyncio.CancelledError:
        pass  # withdrawn, or the Locker closes: nothing was left held
    except Exception as exc:
        error = exc
    if conn is None:
        state.wait_ended(entry, req, error)
        return
    await _hold(pool, state, entry, req, conn, stmts, args, named)


async def _wait_on_server(
    pool: asyncpg.Pool[Any],
    state: LockerState,
    req: Request,
    stmts: _sql.AdvisoryStatements,
    args: tuple[int, ...],
    named: _sql.NamedStatements | None,
) -> PoolConnectionProxy[Any] | None:
    """The connection now holding the key, or None (not granted within the
    timeout). Whatever ends the wait otherwise, nothing is left held."""
    remaining = state.remaining(req)
    if remaining == 0:
        return None
    conn: PoolConnectionProxy[Any] | None = await lease(pool, remaining)
    if conn is None:
        return None  # no pool connection within the timeout
    try:
        timeout = state.remaining(req)
        with waiting(conn):
            if timeout is None:
                if named is None:
                    await conn.fetchval(stmts.lock, *args)
                else:
                    await conn.execute(named.lock)
            else:
                setting = to_milliseconds(max(timeout, 0.001))
                if named is None:
                    await conn.fetchval(stmts.lock_with_timeout, *args, setting)
                else:
                    await conn.execute(named.lock_with_timeout(setting))
    except BaseException as exc:
        # lock_timeout (55P03), a cancellation, an error: the server may
        # have granted the lock all the same (lock_timeout can fire as
        # the lock is granted). Ask it, and release such a grant.
        with Cleanup() as cleanup:

            async def resolve(attempt: int) -> bool:
                return bool(
                    await conn.fetchval(stmts.resolve, *args, timeout=CLEANUP_STATEMENT_TIMEOUT)
                )

            ok, released = await cleanup.run(resolve)
            if released:
                logger.debug(
                    "aiopglock.Locker: advisory key %r was granted as its wait ended "
                    "(%r); released",
                    args,
                    exc,
                )
            await cleanup.give_back(pool, conn, discard=not ok)
        if isinstance(exc, asyncpg.LockNotAvailableError):
            return None
        if isinstance(exc, Exception):
            raise lock_table_full(exc) from exc
        raise
    return conn


async def _hold(
    pool: asyncpg.Pool[Any],
    state: LockerState,
    entry: Entry,
    req: Request,
    conn: PoolConnectionProxy[Any],
    stmts: _sql.AdvisoryStatements,
    args: tuple[int, ...],
    named: _sql.NamedStatements | None,
) -> None:
    dedicated = Dedicated()
    raw = raw_connection(conn)
    assert raw is not None  # a proxy still leased
    liveness = Liveness(lambda reason: state.dedicated_died(entry, dedicated, reason))
    # Until released: the termination listener, and a heartbeat (once held
    # a quarter interval) that notices a connection that died silently.
    liveness.start(
        conn, raw, heartbeat=True, beat=_sql.HEARTBEAT if named is None else named.heartbeat
    )
    liveness.check()
    state.dedicated_held(entry, req, dedicated, conn.get_server_pid())
    with contextlib.suppress(asyncio.CancelledError):  # the Locker closes: release now
        await dedicated.release.wait()

    async def unlock(attempt: int) -> bool:
        if attempt == 0:
            return bool(await conn.fetchval(stmts.unlock, *args, timeout=CLEANUP_STATEMENT_TIMEOUT))
        # A retry follows an interrupted unlock, which may or may not have
        # run: ask pg_locks rather than unlock blindly.
        await conn.fetchval(stmts.resolve, *args, timeout=CLEANUP_STATEMENT_TIMEOUT)
        return True

    released = False
    with Cleanup() as cleanup:
        try:
            await liveness.stop(cleanup)
            if dedicated.dead is None:
                ok, answer = await cleanup.run(unlock)
                released = ok and bool(answer)
                if raw.is_closed():
                    dedicated.dead = "its connection was closed"
                await cleanup.give_back(pool, conn, discard=not ok)
            else:
                await cleanup.give_back(pool, conn, discard=True)
        finally:
            state.dedicated_done(entry, dedicated, released)
