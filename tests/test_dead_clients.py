"""Dead clients and sessions the server ends, on the real server.

- Connections aiopglock opens itself (a ``prioritize()`` / ``Watchdog``
  monitor from a DSN, the command line's) ask for TCP keepalives: ``SHOW``
  on such a connection reports 30 / 10 / 3 (over TCP: the harness's own
  primary listens on loopback, whatever server the session uses). Behind a
  pooler that refuses unknown startup parameters they still connect.
- A holder the server ends for idling (``idle_session_timeout``,
  ``idle_in_transaction_session_timeout``) is a ``LockLost``, like any other
  lost connection: the block is cancelled and ``LockLost`` raised out of it,
  and the server holds nothing of it afterwards.
"""

from __future__ import annotations

import random
from typing import Any

import anyio
import asyncpg
import pytest

import aiopglock
from aiopglock import _server
from aiopglock._monitor import MonitorConnection
from aiopglock.cli import _connection as _cli
from tests._helpers import Connect, PgServer, holders, wait_for_release
from tests.conftest import PgBouncer, ReplicaPair

KEEPALIVES = {
    "tcp_keepalives_idle": "30",
    "tcp_keepalives_interval": "10",
    "tcp_keepalives_count": "3",
}
# How long the server lets the holder idle before ending its session.
IDLE_MS = 300
# The longest a test waits for the server to end the idle session.
DEATH_WITHIN = 15.0


def _key() -> int:
    return random.randint(1, 2**62)


async def _show_keepalives(conn: asyncpg.Connection) -> dict[str, str]:
    return {name: await conn.fetchval(f"SHOW {name}") for name in KEEPALIVES}


# --------------------------------------------------------------------------- keepalives


def test_keepalive_figures_are_those_documented() -> None:
    assert dict(_server.KEEPALIVE_SETTINGS) == KEEPALIVES
    idle, interval, count = (int(KEEPALIVES[name]) for name in KEEPALIVES)
    assert idle + interval * count <= 60  # "within about a minute"


async def test_owned_connections_ask_for_keepalives(replica_pair: ReplicaPair) -> None:
    dsn = replica_pair.primary_dsn  # loopback TCP: keepalives apply
    opened: list[asyncpg.Connection] = []
    try:
        opened.append(await _cli.connect(dsn))
        monitor = MonitorConnection(dsn, "aiopglock-keepalive-test")
        opened.append(await monitor.get())
        for conn in opened:
            assert await _show_keepalives(conn) == KEEPALIVES
        assert await opened[1].fetchval("SHOW application_name") == "aiopglock-keepalive-test"
        await monitor.release()
        assert opened[1].is_closed()
    finally:
        for conn in opened:
            await conn.close()


async def test_owned_connection_through_a_pooler_that_refuses_the_settings(
    pgbouncer: PgBouncer,
) -> None:
    with pytest.raises(asyncpg.ProtocolViolationError, match="startup parameter"):
        await asyncpg.connect(
            pgbouncer.dsn(), statement_cache_size=0, server_settings=dict(KEEPALIVES)
        )
    conn = await _server.connect_owned(pgbouncer.dsn(), statement_cache_size=0)
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


# --------------------------------------------------------------------------- idle timeouts


@pytest.fixture
def needs_idle_session_timeout(pg_server: PgServer) -> None:
    if pg_server.version < 140000:
        pytest.skip("idle_session_timeout needs PostgreSQL 14")


async def _held_until_lost(lock_cm: Any, admin: asyncpg.Connection, key: int) -> Any:
    """Enter ``lock_cm``, wait in the block for the server to end the
    session; returns the handle after ``LockLost`` came out of the block."""
    handle: Any = None
    reached_end = False
    with anyio.fail_after(DEATH_WITHIN):
        with pytest.raises(aiopglock.LockLost) as info:
            async with lock_cm as handle:
                assert handle
                assert len(await holders(admin, key)) == 1
                await anyio.sleep_forever()
            reached_end = True
    assert not reached_end
    assert handle.lost
    assert "lost" in str(info.value)
    await wait_for_release(admin, key)
    return handle


@pytest.mark.usefixtures("needs_idle_session_timeout")
async def test_idle_session_timeout_on_a_connection_is_lock_lost(
    connect: Connect, admin: asyncpg.Connection
) -> None:
    conn = await connect()
    key = _key()
    await conn.execute(f"SET idle_session_timeout = {IDLE_MS}")
    await _held_until_lost(aiopglock.advisory(key, db=conn), admin, key)
    assert conn.is_closed()


@pytest.mark.usefixtures("needs_idle_session_timeout")
async def test_idle_session_timeout_on_a_pool_is_lock_lost(
    pg_server: PgServer, admin: asyncpg.Connection
) -> None:
    async def setup(conn: asyncpg.Connection) -> None:
        # Set on every acquire (the pool's reset runs RESET ALL on release).
        await conn.execute(f"SET idle_session_timeout = {IDLE_MS}")

    pool = await asyncpg.create_pool(pg_server.dsn, min_size=0, max_size=2, setup=setup)
    try:
        key = _key()
        for _ in range(2):
            await _held_until_lost(aiopglock.advisory(key, db=pool), admin, key)
        # The pool lives on: the dead connection was discarded, not reused.
        assert await pool.fetchval("SELECT 1") == 1
    finally:
        with anyio.fail_after(10):
            await pool.close()


@pytest.mark.usefixtures("needs_idle_session_timeout")
async def test_idle_session_timeout_on_a_locker_holder_is_lock_lost(
    pg_server: PgServer, admin: asyncpg.Connection
) -> None:
    async def setup(conn: asyncpg.Connection) -> None:
        await conn.execute(f"SET idle_session_timeout = {IDLE_MS}")

    pool = await asyncpg.create_pool(pg_server.dsn, min_size=0, max_size=2, setup=setup)
    try:
        key = _key()
        async with aiopglock.Locker(pool) as locker:
            await _held_until_lost(locker.advisory(key), admin, key)
    finally:
        with anyio.fail_after(10):
            await pool.close()


async def test_idle_in_transaction_timeout_on_a_connection_is_lock_lost(
    connect: Connect, admin: asyncpg.Connection
) -> None:
    for xact in (True, False):
        conn = await connect()
        key = _key()
        tx = conn.transaction()
        await tx.start()
        await conn.execute(f"SET LOCAL idle_in_transaction_session_timeout = {IDLE_MS}")
        await _held_until_lost(aiopglock.advisory(key, db=conn, xact=xact), admin, key)
        assert conn.is_closed()
