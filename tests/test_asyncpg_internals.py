"""Pins the asyncpg behaviour that ``aiopglock/_asyncpg.py`` relies on.

Each function there reads a private asyncpg attribute. These tests run the
installed asyncpg against a real server and check both that the attribute is
there and that it means what aiopglock assumes; when one fails after an
asyncpg upgrade, the fallback of that function is what users get.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import asyncpg
import pytest

from aiopglock import _asyncpg
from tests._helpers import Connect, PgServer, advisory_locks, wait_until


def _key() -> int:
    return 0x5EED_0A51


async def test_pool_reset_runs_advisory_unlock_all(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    """reset_unlocks() says yes for a default pool, and the release indeed
    ends the session's advisory locks before the connection is handed out."""
    conn = await pool.acquire()
    raw = _asyncpg.proxy_connection(conn)
    assert raw is not None
    await conn.execute("SELECT pg_advisory_lock($1)", _key())
    pid = conn.get_server_pid()
    assert len(await advisory_locks(admin, pid=pid)) == 1
    assert _asyncpg.reset_unlocks(pool, conn, raw)
    await pool.release(conn)
    assert await advisory_locks(admin, pid=pid) == []


async def test_custom_reset_or_used_up_connection_gets_no_reset_unlock(
    pg_server: PgServer, pool: asyncpg.Pool
) -> None:
    async def reset(_: asyncpg.Connection) -> None:
        pass

    custom = await asyncpg.create_pool(pg_server.dsn, min_size=1, max_size=1, reset=reset)
    try:
        async with custom.acquire() as conn:
            assert not _asyncpg.reset_unlocks(custom, conn, _asyncpg.proxy_connection(conn))
    finally:
        await custom.close()
    used_up = await asyncpg.create_pool(pg_server.dsn, min_size=1, max_size=1, max_queries=1)
    try:
        async with used_up.acquire() as conn:
            raw = _asyncpg.proxy_connection(conn)
            assert _asyncpg.reset_unlocks(used_up, conn, raw)
            await conn.execute("SELECT 1")
            # Used up: the pool closes it on release instead of resetting it.
            assert not _asyncpg.reset_unlocks(used_up, conn, raw)
    finally:
        await used_up.close()


async def test_proxy_lets_go_of_its_connection_on_release(pool: asyncpg.Pool) -> None:
    conn = await pool.acquire()
    raw = _asyncpg.proxy_connection(conn)
    assert isinstance(raw, asyncpg.Connection)
    assert raw.get_server_pid() == conn.get_server_pid()
    assert _asyncpg.lease_of(raw) is conn
    await pool.release(conn)
    assert _asyncpg.proxy_connection(conn) is None
    # Back in the pool, after its reset: no longer leased.
    assert _asyncpg.lease_of(raw) is None


async def test_loop_of_pool_connection_and_proxy(pool: asyncpg.Pool, connect: Connect) -> None:
    running = asyncio.get_running_loop()
    assert _asyncpg.loop_of(pool) is running
    assert _asyncpg.loop_of(await connect()) is running
    async with pool.acquire() as proxy:
        assert _asyncpg.loop_of(proxy) is running
    assert _asyncpg.loop_of(proxy) is None  # released: nothing to tell


async def test_pool_has_free_follows_the_queue(pg_server: PgServer) -> None:
    pool = await asyncpg.create_pool(pg_server.dsn, min_size=1, max_size=1)
    try:
        assert _asyncpg.pool_has_free(pool)
        conn = await pool.acquire()
        assert not _asyncpg.pool_has_free(pool)
        await pool.release(conn)
        assert _asyncpg.pool_has_free(pool)
    finally:
        await pool.close()


async def test_wait_released_outlasts_a_cancelled_release(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    """asyncpg shields pool.release(): cancelled, it goes on in the
    background, and the holder's wait_until_released() tells when it is done
    (the reset having ended the session's locks)."""
    conn = await pool.acquire()
    await conn.execute("SELECT pg_advisory_lock($1)", _key())
    pid = conn.get_server_pid()
    releasing = asyncio.ensure_future(pool.release(conn))
    await asyncio.sleep(0)
    releasing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await releasing
    released = _asyncpg.wait_released(conn)
    assert released is not None
    await released
    assert await advisory_locks(admin, pid=pid) == []
    assert _asyncpg.pool_has_free(pool)


async def test_forget_top_transaction_after_a_refused_begin(
    connect: Connect, admin: asyncpg.Connection
) -> None:
    """asyncpg records a transaction as the connection's top one before
    sending BEGIN, and keeps it when BEGIN is refused; forgetting it makes
    the next ``transaction()`` a real BEGIN again."""
    conn = await connect()
    busy = asyncio.ensure_future(conn.execute("SELECT pg_sleep(0.2)"))

    async def sleeping() -> bool:
        query = await admin.fetchval(
            "SELECT query FROM pg_stat_activity WHERE pid = $1", conn.get_server_pid()
        )
        return bool(query and "pg_sleep" in query)

    await wait_until(sleeping)
    tx = conn.transaction()
    with pytest.raises(asyncpg.InterfaceError, match="another operation"):
        await tx.start()
    await busy
    assert _asyncpg._private(conn, "_top_xact") is tx  # the stale record
    _asyncpg.forget_top_transaction(conn, tx)
    async with conn.transaction():
        assert conn.is_in_transaction()
        assert await conn.fetchval("SELECT txid_current_if_assigned() IS NULL")
    assert not conn.is_in_transaction()


async def test_listening_follows_add_and_remove_listener(connect: Connect) -> None:
    """asyncpg registers a channel's callback after LISTEN ran and forgets it
    before UNLISTEN: listening() tells whether the server-side LISTEN stands
    on asyncpg's account."""
    conn = await connect()
    chan = "aiopglock_internals_listening"

    def on(*_: object) -> None:
        pass

    assert not _asyncpg.listening(conn, chan)
    await conn.add_listener(chan, on)
    assert _asyncpg.listening(conn, chan)
    assert await conn.fetchval("SELECT $1 = ANY(ARRAY(SELECT pg_listening_channels()))", chan)
    await conn.remove_listener(chan, on)
    assert not _asyncpg.listening(conn, chan)
    assert await conn.fetch("SELECT pg_listening_channels()") == []
    # Without the attribute: not listening, so the caller sends UNLISTEN.
    assert not _asyncpg.listening(cast(Any, object()), chan)


def test_a_missing_attribute_falls_back_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class NotAPool:
        def get_size(self) -> int:
            return 2

        def get_idle_size(self) -> int:
            return 0

        def get_max_size(self) -> int:
            return 3

    _asyncpg._reported.discard("Pool._queue")
    with caplog.at_level(logging.DEBUG, logger="aiopglock"):
        assert _asyncpg.pool_has_free(cast(Any, NotAPool()))
        assert _asyncpg.pool_has_free(cast(Any, NotAPool()))
    said = [r for r in caplog.records if "Pool._queue" in r.getMessage()]
    assert len(said) == 1
    assert not _asyncpg.reset_unlocks(cast(Any, object()), cast(Any, object()), cast(Any, object()))
