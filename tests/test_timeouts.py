"""``aiopglock.lock_timeout`` / ``aiopglock.statement_timeout``: setting scopes.

The values are read back from the server (``SHOW``) through the connection
itself; "nothing leaks" is checked before the connection goes back to its
pool (whose ``RESET ALL`` would hide a leak) and with a pool whose reset
does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

import aiopglock
from tests._helpers import Connect, wait_until

SCOPES = {"lock_timeout": aiopglock.lock_timeout, "statement_timeout": aiopglock.statement_timeout}


async def _show(conn: Any, setting: str) -> str:
    value: str = await conn.fetchval(f"SHOW {setting}")
    return value


@pytest.fixture(params=list(SCOPES))
def setting(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


async def test_outside_a_transaction_sets_the_session_value(setting: str, connect: Connect) -> None:
    scope = SCOPES[setting]
    conn = await connect()
    await conn.execute(f"SET {setting} = '7s'")
    async with scope(2.5, db=conn) as entered:
        assert entered.setting == setting and entered.value == "2500ms"
        assert await _show(conn, setting) == "2500ms"
        # A session value: it survives a transaction inside the block.
        async with conn.transaction():
            assert await _show(conn, setting) == "2500ms"
        assert await _show(conn, setting) == "2500ms"
    assert await _show(conn, setting) == "7s"
    assert repr(scope(1, db=conn)) == f"aiopglock.{setting}('1000ms')"


async def test_inside_a_transaction_sets_a_local_value(setting: str, connect: Connect) -> None:
    scope = SCOPES[setting]
    conn = await connect()
    await conn.execute(f"SET {setting} = '7s'")
    async with conn.transaction():
        await conn.execute(f"SET LOCAL {setting} = '9s'")
        async with scope(timedelta(milliseconds=1500), db=conn):
            assert await _show(conn, setting) == "1500ms"
            source = await conn.fetchval("SELECT source FROM pg_settings WHERE name = $1", setting)
            assert source == "session"  # pg_settings shows a SET LOCAL as 'session'
        assert await _show(conn, setting) == "9s"
    assert await _show(conn, setting) == "7s"
    # A local value would not outlive the transaction even without a restore:
    async with conn.transaction(), scope(3, db=conn):
        await conn.execute("SELECT 1")
        # ... and set_config(..., true) is what was used: committing here
        # (inside the block) drops the value.
    assert await _show(conn, setting) == "7s"


async def test_local_value_ends_with_its_transaction_even_inside_the_block(
    setting: str, connect: Connect
) -> None:
    scope = SCOPES[setting]
    conn = await connect()
    await conn.execute("BEGIN")
    async with scope(3, db=conn):
        assert await _show(conn, setting) == "3s"
        await conn.execute("COMMIT")
        assert await _show(conn, setting) == "0"  # the local value went with it
        await conn.execute("BEGIN")  # another transaction: not restored into it
        await conn.execute(f"SET LOCAL {setting} = '4s'")
    assert await _show(conn, setting) == "4s"
    await conn.execute("ROLLBACK")
    assert await _show(conn, setting) == "0"


async def test_nesting_restores_each_level(setting: str, connect: Connect) -> None:
    scope = SCOPES[setting]
    conn = await connect()
    await conn.execute(f"SET {setting} = '11s'")
    outer = scope(5, db=conn)
    async with outer:
        assert await _show(conn, setting) == "5s"
        async with scope(None, db=conn):
            assert await _show(conn, setting) == "0"
            async with outer:  # one scope object, entered twice
                assert await _show(conn, setting) == "5s"
            assert await _show(conn, setting) == "0"
        assert await _show(conn, setting) == "5s"
    assert await _show(conn, setting) == "11s"


async def test_error_restores(setting: str, connect: Connect) -> None:
    scope = SCOPES[setting]
    conn = await connect()
    await conn.execute(f"SET {setting} = '6s'")
    with pytest.raises(ZeroDivisionError):
        async with scope(1, db=conn):
            1 / 0  # noqa: B018
    assert await _show(conn, setting) == "6s"
    # An SQL error that aborts the caller's transaction: the local value goes
    # with the rollback, and the exception is the caller's, unchanged.
    async with conn.transaction():
        await conn.execute(f"SET LOCAL {setting} = '8s'")
        with pytest.raises(asyncpg.DivisionByZeroError):
            async with scope(1, db=conn):
                await conn.execute("SELECT 1 / 0")
        assert conn.is_in_transaction()
        with pytest.raises(asyncpg.InFailedSQLTransactionError):
            await conn.execute("SELECT 1")
        await conn.execute("ROLLBACK")
    assert await _show(conn, setting) == "6s"


async def test_statement_timeout_fires_and_is_restored(connect: Connect) -> None:
    conn = await connect()
    with pytest.raises(asyncpg.QueryCanceledError):
        async with aiopglock.statement_timeout(0.1, db=conn):
            await conn.execute("SELECT pg_sleep(5)")
    assert await _show(conn, "statement_timeout") == "0"
    assert await conn.fetchval("SELECT 1") == 1


async def test_lock_timeout_fires_on_a_lock_wait(connect: Connect) -> None:
    conn, blocker = await connect(), await connect()
    await blocker.execute("SELECT pg_advisory_lock(4242)")
    with pytest.raises(asyncpg.LockNotAvailableError):
        async with aiopglock.lock_timeout(0.1, db=conn):
            await conn.execute("SELECT pg_advisory_lock(4242)")
    assert await _show(conn, "lock_timeout") == "0"


@pytest.mark.parametrize("where", ["session", "transaction"])
async def test_cancellation_restores(setting: str, where: str, connect: Connect) -> None:
    scope = SCOPES[setting]
    conn = await connect()
    await conn.execute(f"SET {setting} = '12s'")
    if where == "transaction":
        await conn.execute("BEGIN")
        await conn.execute(f"SET LOCAL {setting} = '13s'")
    expected = "13s" if where == "transaction" else "12s"
    inside = asyncio.Event()

    async def block(in_server: bool) -> None:
        async with scope(30, db=conn):
            inside.set()
            if in_server:
                await conn.execute("SELECT pg_sleep(30)")
            await asyncio.sleep(30)

    for in_server in (False, True):
        inside.clear()
        task = asyncio.create_task(block(in_server))
        await inside.wait()
        await asyncio.sleep(0.05 if in_server else 0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        if where == "transaction" and in_server:
            # The cancelled statement aborted the transaction: only a rollback
            # goes now, and the local value with it.
            assert conn.is_in_transaction()
            await conn.execute("ROLLBACK")
            assert await _show(conn, setting) == "12s"
            return
        assert await _show(conn, setting) == expected


async def test_cancellation_storm_always_restores(setting: str, connect: Connect) -> None:
    """Cancel at random points of entry, block and exit: the value is always
    back (or, as the last resort, the connection was terminated)."""
    scope = SCOPES[setting]
    rng = random.Random(11)
    conn = await connect()
    await conn.execute(f"SET {setting} = '21s'")
    discarded = restored = 0
    for _ in range(150):

        async def body(conn: asyncpg.Connection = conn) -> None:
            async with scope(3, db=conn):
                await conn.execute("SELECT 1")

        task = asyncio.create_task(body())
        for _ in range(rng.randint(0, 25)):
            await asyncio.sleep(0)
        task.cancel()
        if rng.random() < 0.3:
            asyncio.get_running_loop().call_soon(task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if conn.is_closed():
            discarded += 1
            conn = await connect()
            await conn.execute(f"SET {setting} = '21s'")
            continue
        for _ in range(3):  # a late CancelRequest may land on this query
            try:
                value = await _show(conn, setting)
                break
            except asyncpg.QueryCanceledError:
                continue
        assert value == "21s"
        restored += 1
    assert restored > 100, (restored, discarded)


async def test_decorator(setting: str, connect: Connect) -> None:
    conn = await connect()
    seen: list[str] = []

    @SCOPES[setting](0.75, db=lambda: conn)
    async def report(x: int) -> int:
        seen.append(await _show(conn, setting))
        if x < 0:
            raise ValueError("negative")
        return x * 2

    assert report.__name__ == "report"
    assert await report(2) == 4
    assert await report(3) == 6  # every call has its own state
    with pytest.raises(ValueError, match="negative"):
        await report(-1)
    assert seen == ["750ms"] * 3
    assert await _show(conn, setting) == "0"
    await asyncio.gather(report(1), asyncio.sleep(0))
    assert await _show(conn, setting) == "0"


async def test_configured_default_connection(setting: str, connect: Connect) -> None:
    conn = await connect()
    aiopglock.configure(db=conn)
    try:
        async with SCOPES[setting](4):
            assert await _show(conn, setting) == "4s"
    finally:
        aiopglock.configure(db=None)
    assert await _show(conn, setting) == "0"


async def test_nothing_leaks_to_the_next_pool_user(setting: str, pg_server: Any) -> None:
    """With the pool's own reset disabled, the next user of the one connection
    still finds the previous value: aiopglock restored it itself."""

    async def no_reset(conn: asyncpg.Connection) -> None:
        return None

    pool = await asyncpg.create_pool(pg_server.dsn, min_size=1, max_size=1, reset=no_reset)
    try:
        async with pool.acquire() as conn:
            await conn.execute(f"SET {setting} = '17s'")
        for in_transaction in (False, True):
            async with pool.acquire() as conn:
                pid = conn.get_server_pid()
                if in_transaction:
                    async with conn.transaction(), SCOPES[setting](1, db=conn):
                        assert await _show(conn, setting) == "1s"
                else:
                    with pytest.raises(RuntimeError):
                        async with SCOPES[setting](1, db=conn):
                            raise RuntimeError
            async with pool.acquire() as conn:
                assert conn.get_server_pid() == pid  # the same connection
                assert await _show(conn, setting) == "17s"
    finally:
        await pool.close()


async def test_pool_connection_is_back_clean(setting: str, pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        async with SCOPES[setting](2, db=conn):
            pass
        assert await _show(conn, setting) == "0"
    await wait_until(lambda: _idle(pool))


async def _idle(pool: asyncpg.Pool) -> bool:
    return pool.get_idle_size() == pool.get_size()


@pytest.mark.parametrize(
    ("timeout", "error"),
    [
        (0, ValueError),
        (timedelta(0), ValueError),
        (-1, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        (10**10, ValueError),
        ("5s", TypeError),
        (True, TypeError),
        ([1], TypeError),
    ],
)
async def test_invalid_timeout_before_sql(
    setting: str, timeout: Any, error: type[Exception], connect: Connect
) -> None:
    conn = await connect()
    await conn.close()  # anything sent would be an InterfaceError
    with pytest.raises(error, match="timeout"):
        SCOPES[setting](timeout, db=conn)


async def test_invalid_db(setting: str, pool: asyncpg.Pool) -> None:
    with pytest.raises(TypeError, match="db"):
        SCOPES[setting](1, db=pool)
    with pytest.raises(TypeError, match="db"):
        SCOPES[setting](1, db="postgresql://")  # type: ignore[arg-type]
    with pytest.raises(aiopglock.UsageError, match="db"):
        async with SCOPES[setting](1, db=lambda: pool):
            pytest.fail("scoped a setting on a pool")
    with pytest.raises(aiopglock.UsageError):
        async with SCOPES[setting](1):
            pytest.fail("entered without a database")


def test_decorating_a_plain_function_is_a_type_error(setting: str) -> None:
    def plain() -> None:
        return None

    with pytest.raises(TypeError, match="coroutine"):
        SCOPES[setting](1, db=lambda: None)(plain)
