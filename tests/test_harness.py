"""The test harness itself, against the real server: fixtures and helpers."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from tests._helpers import (
    AdvisoryKey,
    Connect,
    PgServer,
    RestartServer,
    advisory_locks,
    holders,
    split_key,
    wait_for_release,
    wait_for_waiter,
    wait_until,
    waiters,
)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

KEYS: list[AdvisoryKey] = [
    0,
    1,
    -1,
    42,
    -42,
    2**32,
    2**32 - 1,
    -(2**32),
    0x1234_5678_9ABC_DEF0,
    -0x1234_5678_9ABC_DEF0,
    INT64_MIN,
    INT64_MAX,
    (0, 0),
    (1, 2),
    (-1, -1),
    (-7, 5),
    (5, -7),
    (INT32_MIN, INT32_MAX),
    (INT32_MAX, INT32_MIN),
]


async def lock(conn: asyncpg.Connection, key: AdvisoryKey) -> None:
    if isinstance(key, tuple):
        await conn.execute("SELECT pg_advisory_lock($1::int4, $2::int4)", *key)
    else:
        await conn.execute("SELECT pg_advisory_lock($1::int8)", key)


# --------------------------------------------------------------------------- split_key


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (0, (0, 0, 1)),
        (1, (0, 1, 1)),
        (-1, (0xFFFF_FFFF, 0xFFFF_FFFF, 1)),
        (2**32, (1, 0, 1)),
        (INT64_MIN, (0x8000_0000, 0, 1)),
        (INT64_MAX, (0x7FFF_FFFF, 0xFFFF_FFFF, 1)),
        ((0, 0), (0, 0, 2)),
        ((1, -2), (1, 0xFFFF_FFFE, 2)),
        ((INT32_MIN, INT32_MAX), (0x8000_0000, 0x7FFF_FFFF, 2)),
    ],
)
def test_split_key_values(key: AdvisoryKey, expected: tuple[int, int, int]) -> None:
    assert split_key(key) == expected


@pytest.mark.parametrize(
    ("key", "error"),
    [
        (True, TypeError),
        (1.0, TypeError),
        ("1", TypeError),
        ((1, 2, 3), TypeError),
        ((1, True), TypeError),
        (INT64_MAX + 1, ValueError),
        (INT64_MIN - 1, ValueError),
        ((INT32_MAX + 1, 0), ValueError),
        ((0, INT32_MIN - 1), ValueError),
    ],
)
def test_split_key_rejects(key: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        split_key(key)  # type: ignore[arg-type]


async def test_split_key_matches_pg_locks(connect: Connect, admin: asyncpg.Connection) -> None:
    conn = await connect()
    pid = conn.get_server_pid()
    for key in KEYS:
        await lock(conn, key)

    for key in KEYS:
        assert await holders(admin, key) == [pid], key
        assert await waiters(admin, key) == []

    rows = await advisory_locks(admin, pid=pid)
    assert {(r["classid"], r["objid"], r["objsubid"]) for r in rows} == {split_key(k) for k in KEYS}
    assert all(r["granted"] and r["mode"] == "ExclusiveLock" for r in rows)
    assert len(rows) == len(KEYS)

    await conn.execute("SELECT pg_advisory_unlock_all()")
    assert await advisory_locks(admin, pid=pid) == []


async def test_shared_mode_filter(connect: Connect, admin: asyncpg.Connection) -> None:
    a, b = await connect(), await connect()
    key = -123_456_789_012
    await a.execute("SELECT pg_advisory_lock_shared($1::int8)", key)
    await b.execute("SELECT pg_advisory_lock_shared($1::int8)", key)
    both = sorted([a.get_server_pid(), b.get_server_pid()])
    assert await holders(admin, key) == both
    assert await holders(admin, key, mode="ShareLock") == both
    assert await holders(admin, key, mode="ExclusiveLock") == []


async def test_admin_does_not_see_itself(admin: asyncpg.Connection) -> None:
    await admin.execute("SELECT pg_advisory_lock(777)")
    try:
        assert await holders(admin, 777) == []
    finally:
        await admin.execute("SELECT pg_advisory_unlock(777)")


# --------------------------------------------------------------------------- waiting


async def test_wait_for_waiter_and_release(connect: Connect, admin: asyncpg.Connection) -> None:
    holder, waiter = await connect(), await connect()
    key = (-3, 9)
    await lock(holder, key)

    task = asyncio.ensure_future(lock(waiter, key))
    try:
        assert await wait_for_waiter(admin, key) == waiter.get_server_pid()
        assert await holders(admin, key) == [holder.get_server_pid()]

        await holder.execute("SELECT pg_advisory_unlock($1::int4, $2::int4)", *key)
        await asyncio.wait_for(task, 10)
    finally:
        task.cancel()
    assert await holders(admin, key) == [waiter.get_server_pid()]
    assert await waiters(admin, key) == []

    await waiter.execute("SELECT pg_advisory_unlock_all()")
    await wait_for_release(admin, key)


async def test_terminated_holder_is_released(connect: Connect, admin: asyncpg.Connection) -> None:
    conn = await connect()
    await lock(conn, 99)
    assert await admin.fetchval("SELECT pg_terminate_backend($1)", conn.get_server_pid())
    await wait_for_release(admin, 99)


async def test_wait_until_returns_the_truthy_value() -> None:
    calls = 0

    async def third_time() -> list[int]:
        nonlocal calls
        calls += 1
        return [calls] if calls >= 3 else []

    assert await wait_until(third_time, interval=0) == [3]


async def test_wait_until_times_out() -> None:
    async def never() -> bool:
        return False

    with pytest.raises(AssertionError, match="the impossible"):
        await wait_until(never, timeout=0.05, message="the impossible")


# --------------------------------------------------------------------------- fixtures


def test_pg_server(pg_server: PgServer) -> None:
    assert pg_server.version >= 100000
    assert pg_server.kind in ("external", "docker", "embedded")
    assert pg_server.dsn in repr(pg_server)
    if pg_server.embedded:
        assert pg_server.version >= 180000
    else:
        with pytest.raises(RuntimeError, match="cannot be restarted"):
            pg_server.restart()


async def test_connect_passes_arguments(connect: Connect) -> None:
    conn = await connect(server_settings={"application_name": "harness-probe"})
    assert await conn.fetchval("SELECT current_setting('application_name')") == "harness-probe"


async def test_pool_fixture(pool: asyncpg.Pool, admin: asyncpg.Connection) -> None:
    assert await pool.fetchval("SELECT 1") == 1

    async def backend_pid() -> int:
        async with pool.acquire() as conn:
            pid: int = await conn.fetchval("SELECT pg_backend_pid()")
            await asyncio.sleep(0.05)
            return pid

    pids = set(await asyncio.gather(*(backend_pid() for _ in range(8))))
    assert 1 <= len(pids) <= 4
    seen = await admin.fetch(
        "SELECT pid FROM pg_stat_activity WHERE pid = any($1::int4[])", list(pids)
    )
    assert {r["pid"] for r in seen} == pids


@pytest.mark.embedded_only
def test_embedded_only_marker(pg_server: PgServer) -> None:
    assert pg_server.embedded


async def test_restart_server(
    restart_server: RestartServer, connect: Connect, admin: asyncpg.Connection
) -> None:
    conn = await connect()
    old_pid = conn.get_server_pid()
    await lock(conn, 4242)
    assert await holders(admin, 4242) == [old_pid]

    await restart_server()

    async def closed() -> bool:
        return conn.is_closed()

    await wait_until(closed, message="the old connection to notice the restart")
    with pytest.raises((asyncpg.InterfaceError, asyncpg.PostgresError, OSError)):
        await conn.fetchval("SELECT 1")

    fresh_admin = await connect()
    assert await fresh_admin.fetchval("SELECT 1") == 1
    assert await holders(fresh_admin, 4242) == []
