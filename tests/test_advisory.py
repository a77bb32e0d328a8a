"""``aiopglock.advisory``: session and transaction advisory locks, against the real server.

Every claim is checked on the server (``pg_locks``, ``pg_stat_activity``,
``SHOW lock_timeout``) and, for pools, on the pool's bookkeeping; return
values alone prove nothing. Cancellation races and lost locks live in
``test_cancellation.py`` and ``test_lost.py``.

Keys are unique per test (random ints, random int4 pairs, text with a uuid),
so runs sharing one server never meet.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import secrets
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import anyio
import asyncpg
import pytest

import aiopglock
from aiopglock import advisory_key
from tests._helpers import (
    AdvisoryKey,
    Connect,
    PgServer,
    advisory_locks,
    holders,
    wait_for_release,
    wait_for_waiter,
    wait_until,
    waiters,
)

Key = str | int | tuple[int, int]

KEY_FORMS = ("int", "str", "pair")


def new_key(form: str = "str") -> Key:
    """A key no other test (or concurrent run) uses, in the given form."""
    if form == "int":
        return secrets.randbits(64) - 2**63
    if form == "pair":
        return (secrets.randbits(32) - 2**31, secrets.randbits(32) - 2**31)
    return f"tests.test_advisory:{uuid.uuid4().hex}"


@pytest.fixture(params=KEY_FORMS)
def any_key(request: pytest.FixtureRequest) -> Key:
    """The same test with an int8 key, a text key and an int4-pair key."""
    return new_key(request.param)


@pytest.fixture
def key() -> Key:
    return new_key()


@pytest.fixture
async def blocker(connect: Connect) -> asyncpg.Connection:
    """A raw connection that takes locks with plain SQL, to make keys busy."""
    conn: asyncpg.Connection = await connect()
    return conn


class _KeepAdvisoryLocksConnection(asyncpg.Connection):
    """A pooled connection whose reset on release leaves advisory locks alone.

    asyncpg's default reset runs ``pg_advisory_unlock_all()``, which would hide
    a lock aiopglock forgot to release; with this one it stays in ``pg_locks``.
    """

    def get_reset_query(self) -> str:
        return "RESET ALL;"


@pytest.fixture
async def strict_pool(pg_server: PgServer) -> AsyncIterator[asyncpg.Pool]:
    """Like ``pool``, but returning a connection does not release its advisory locks."""
    the_pool = await asyncpg.create_pool(
        pg_server.dsn, min_size=1, max_size=4, connection_class=_KeepAdvisoryLocksConnection
    )
    try:
        yield the_pool
    finally:
        try:
            await asyncio.wait_for(the_pool.close(), 10)
        except asyncio.TimeoutError:
            the_pool.terminate()
            raise AssertionError(
                "strict_pool.close() hung: a connection was never released"
            ) from None


# --------------------------------------------------------------------------- helpers


def _args(key: Key) -> tuple[str, tuple[int, ...]]:
    k = advisory_key(key)
    if isinstance(k, tuple):
        return "$1::int4, $2::int4", k
    return "$1::int8", (k,)


async def sql_lock(conn: asyncpg.Connection, key: Key, *, shared: bool = False) -> None:
    """Take ``key`` on ``conn`` with plain SQL (no aiopglock involved)."""
    params, args = _args(key)
    fn = "pg_advisory_lock_shared" if shared else "pg_advisory_lock"
    await conn.execute(f"SELECT {fn}({params})", *args)


async def sql_unlock(conn: asyncpg.Connection, key: Key, *, shared: bool = False) -> None:
    params, args = _args(key)
    fn = "pg_advisory_unlock_shared" if shared else "pg_advisory_unlock"
    assert await conn.fetchval(f"SELECT {fn}({params})", *args) is True


async def own_advisory_locks(conn: asyncpg.Connection) -> int:
    """How many advisory locks ``conn``'s own session holds or waits for."""
    count: int = await conn.fetchval(
        "SELECT count(*) FROM pg_catalog.pg_locks "
        "WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
    )
    return count


def assert_pool_idle(pool: asyncpg.Pool) -> None:
    assert pool.get_idle_size() == pool.get_size(), (pool.get_idle_size(), pool.get_size())


async def lock_rows(admin: asyncpg.Connection, key: AdvisoryKey) -> list[tuple[int, str, bool]]:
    rows = await advisory_locks(admin, key=key)
    return sorted((r["pid"], r["mode"], r["granted"]) for r in rows)


async def show_lock_timeout(conn: asyncpg.Connection) -> str:
    value: str = await conn.fetchval("SHOW lock_timeout")
    return value


# --------------------------------------------------------------------------- session locks


async def test_session_lock_with_pool(
    pool: asyncpg.Pool, admin: asyncpg.Connection, any_key: Key
) -> None:
    k = advisory_key(any_key)
    async with aiopglock.advisory(any_key, db=pool) as lock:
        assert lock
        assert lock.acquired is True
        assert lock.lost is False
        assert lock.key == k
        assert isinstance(lock.pid, int)
        assert await lock_rows(admin, k) == [(lock.pid, "ExclusiveLock", True)]
        # The lock's connection is leased from the pool for the block.
        assert pool.get_idle_size() == pool.get_size() - 1
        pid = lock.pid
    assert await holders(admin, k) == []
    assert await advisory_locks(admin, pid=pid) == []
    assert_pool_idle(pool)
    assert not lock


async def test_pool_lock_is_released_by_aiopglock_not_by_the_pool_reset(
    strict_pool: asyncpg.Pool, admin: asyncpg.Connection, key: Key
) -> None:
    k = advisory_key(key)
    async with aiopglock.advisory(key, db=strict_pool) as lock:
        assert await holders(admin, k) == [lock.pid]
    assert await holders(admin, k) == []
    assert_pool_idle(strict_pool)
    # The same connection goes out again, clean.
    async with aiopglock.advisory(key, db=strict_pool, timeout=0) as again:
        assert again
        assert await holders(admin, k) == [again.pid]
    assert await holders(admin, k) == []


@pytest.fixture
async def logged_pool(pg_server: PgServer) -> AsyncIterator[tuple[asyncpg.Pool, list[str]]]:
    """A pool of one connection whose statements are recorded (asyncpg's own
    query logger, on the client: what was sent and completed)."""
    sent: list[str] = []

    async def init(conn: asyncpg.Connection) -> None:
        conn.add_query_logger(lambda record: sent.append(record.query))

    the_pool = await asyncpg.create_pool(pg_server.dsn, min_size=1, max_size=1, init=init)
    try:
        yield the_pool, sent
    finally:
        await asyncio.wait_for(the_pool.close(), 10)


def _unlocks(sent: list[str]) -> list[str]:
    return [q for q in sent if "pg_advisory_unlock(" in q]


def _resets(sent: list[str]) -> list[str]:
    return [q for q in sent if "pg_advisory_unlock_all()" in q]


async def test_pool_lock_released_by_the_pool_reset_on_a_normal_exit(
    logged_pool: tuple[asyncpg.Pool, list[str]], admin: asyncpg.Connection, key: Key
) -> None:
    """A normal exit sends no unlock of its own: the pool's reset, which runs
    before the connection can be handed out again, releases the lock; the
    server confirms it is gone as soon as the block has exited."""
    pool, sent = logged_pool
    k = advisory_key(key)
    async with aiopglock.advisory(key, db=pool) as lock:
        assert await holders(admin, k) == [lock.pid]
        sent.clear()
    assert await holders(admin, k) == []
    assert _unlocks(sent) == []
    assert len(_resets(sent)) == 1
    assert_pool_idle(pool)


async def test_pool_lock_unlocked_explicitly_after_an_error(
    logged_pool: tuple[asyncpg.Pool, list[str]], admin: asyncpg.Connection, key: Key
) -> None:
    """After an error (or a cancellation) a late CancelRequest could fail the
    pool's reset: the exit unlocks explicitly first, with retries."""
    pool, sent = logged_pool
    k = advisory_key(key)
    with pytest.raises(ZeroDivisionError):
        async with aiopglock.advisory(key, db=pool) as lock:
            assert await holders(admin, k) == [lock.pid]
            sent.clear()
            1 / 0  # noqa: B018
    assert await holders(admin, k) == []
    assert len(_unlocks(sent)) == 1
    assert_pool_idle(pool)


async def test_pool_lock_unlocked_explicitly_when_another_local_task_wants_it(
    pg_server: PgServer, admin: asyncpg.Connection, key: Key
) -> None:
    """Under local contention the holder unlocks directly (the key changes
    hands a loop turn sooner than through the pool's reset, which asyncpg
    sends from a task of its own)."""
    sent: list[str] = []

    async def init(conn: asyncpg.Connection) -> None:
        conn.add_query_logger(lambda record: sent.append(record.query))

    pool = await asyncpg.create_pool(pg_server.dsn, min_size=2, max_size=2, init=init)
    try:
        k = advisory_key(key)
        async with aiopglock.advisory(key, db=pool) as lock:
            waiter = asyncio.create_task(_take(pool, key))
            await wait_for_waiter(admin, k)
            sent.clear()
        await waiter
        assert len(_unlocks(sent)) >= 1, sent
        assert await holders(admin, k) == []
        assert lock.pid is not None
        assert_pool_idle(pool)
    finally:
        await asyncio.wait_for(pool.close(), 10)


async def _take(pool: asyncpg.Pool, key: Key) -> None:
    async with aiopglock.advisory(key, db=pool) as lock:
        assert lock


@pytest.mark.parametrize("kind", ["raw", "pool proxy"])
async def test_session_lock_on_a_connection(
    kind: str,
    connect: Connect,
    pool: asyncpg.Pool,
    admin: asyncpg.Connection,
    any_key: Key,
) -> None:
    k = advisory_key(any_key)

    async def check(conn: Any) -> None:
        pid = conn.get_server_pid()
        async with aiopglock.advisory(any_key, db=conn) as lock:
            assert lock
            assert lock.pid == pid
            assert lock.key == k
            assert await lock_rows(admin, k) == [(pid, "ExclusiveLock", True)]
        assert await holders(admin, k) == []
        assert not conn.is_closed()
        assert not conn.is_in_transaction()
        assert await own_advisory_locks(conn) == 0
        assert await conn.fetchval("SELECT 41 + 1") == 42

    if kind == "raw":
        await check(await connect())
    else:
        async with pool.acquire() as proxy:
            await check(proxy)
            # Still the same backend, still usable.
            assert await proxy.fetchval("SELECT pg_backend_pid()") == proxy.get_server_pid()
        assert_pool_idle(pool)


async def test_repr_of_the_handle(connect: Connect) -> None:
    conn = await connect()
    async with aiopglock.advisory(12345, db=conn) as lock:
        text = repr(lock)
        assert "12345" in text
        assert "exclusive" in text
        assert "session" in text
        assert str(conn.get_server_pid()) in text


# --------------------------------------------------------------------------- shared


async def test_shared_holders_coexist_and_exclusive_waits(
    pool: asyncpg.Pool, admin: asyncpg.Connection, key: Key
) -> None:
    k = advisory_key(key)
    inside = [anyio.Event(), anyio.Event()]
    leave = anyio.Event()
    shared_pids: list[int] = []
    events: list[str] = []
    exclusive_pid: list[int] = []

    async def shared_holder(i: int) -> None:
        async with aiopglock.advisory(key, db=pool, shared=True, timeout=0) as lock:
            assert lock
            assert lock.shared
            assert lock.pid is not None
            shared_pids.append(lock.pid)
            inside[i].set()
            await leave.wait()
            events.append(f"shared {i} out")

    async def exclusive() -> None:
        async with aiopglock.advisory(key, db=pool, timeout=None) as lock:
            assert lock
            assert lock.pid is not None
            events.append("exclusive in")
            exclusive_pid.append(lock.pid)
            assert await lock_rows(admin, k) == [(lock.pid, "ExclusiveLock", True)]

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(shared_holder, 0)
            tg.start_soon(shared_holder, 1)
            await inside[0].wait()
            await inside[1].wait()
            assert len(set(shared_pids)) == 2
            assert await lock_rows(admin, k) == sorted((p, "ShareLock", True) for p in shared_pids)

            # A try for exclusive fails at once while shared holders exist.
            async with aiopglock.advisory(key, db=pool, timeout=0) as busy:
                assert not busy

            tg.start_soon(exclusive)
            waiter = await wait_for_waiter(admin, k)
            assert waiter not in shared_pids
            assert await waiters(admin, k, mode="ExclusiveLock") == [waiter]
            assert await holders(admin, k, mode="ShareLock") == sorted(shared_pids)
            assert events == []
            leave.set()

    assert events[-1] == "exclusive in"
    assert sorted(events[:2]) == ["shared 0 out", "shared 1 out"]
    assert exclusive_pid == [waiter]
    assert await holders(admin, k) == []
    assert_pool_idle(pool)


# --------------------------------------------------------------------------- exclusive


async def test_exclusive_contention_between_tasks(
    pool: asyncpg.Pool, admin: asyncpg.Connection, any_key: Key
) -> None:
    k = advisory_key(any_key)
    events: list[str] = []
    a_in = anyio.Event()
    a_leave = anyio.Event()
    pids: dict[str, int] = {}

    async def first() -> None:
        async with aiopglock.advisory(any_key, db=pool) as lock:
            assert lock
            assert lock.pid is not None
            pids["A"] = lock.pid
            events.append("A in")
            a_in.set()
            await a_leave.wait()
            events.append("A out")

    async def second() -> None:
        async with aiopglock.advisory(any_key, db=pool, timeout=None) as lock:
            assert lock
            assert lock.pid is not None
            pids["B"] = lock.pid
            events.append("B in")
            assert await holders(admin, k) == [lock.pid]
            events.append("B out")

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            await a_in.wait()
            tg.start_soon(second)
            waiter = await wait_for_waiter(admin, k)
            assert waiter != pids["A"]
            assert await holders(admin, k) == [pids["A"]]
            assert events == ["A in"]
            a_leave.set()

    assert events == ["A in", "A out", "B in", "B out"]
    assert pids["B"] == waiter
    assert await holders(admin, k) == []
    assert_pool_idle(pool)


# --------------------------------------------------------------------------- timeouts


async def test_timeout_zero_on_a_busy_key(
    pool: asyncpg.Pool, admin: asyncpg.Connection, blocker: asyncpg.Connection, any_key: Key
) -> None:
    k = advisory_key(any_key)
    await sql_lock(blocker, any_key)
    started = anyio.current_time()
    async with aiopglock.advisory(any_key, db=pool, timeout=0) as lock:
        elapsed = anyio.current_time() - started
        assert not lock
        assert lock.acquired is False
        assert lock.pid is None
        assert lock.key == k
        # Nothing of the requester's on the server: only the blocker's row.
        assert await lock_rows(admin, k) == [(blocker.get_server_pid(), "ExclusiveLock", True)]
    assert elapsed < 2.0
    assert_pool_idle(pool)
    assert await lock_rows(admin, k) == [(blocker.get_server_pid(), "ExclusiveLock", True)]


@pytest.mark.parametrize("timeout", [0.3, timedelta(milliseconds=300)], ids=["float", "timedelta"])
@pytest.mark.parametrize("session_value", [None, "7s"], ids=["default", "session-7s"])
async def test_timeout_is_enforced_by_the_server_and_restored(
    timeout: float | timedelta,
    session_value: str | None,
    connect: Connect,
    admin: asyncpg.Connection,
    blocker: asyncpg.Connection,
    key: Key,
) -> None:
    k = advisory_key(key)
    conn = await connect()
    pid = conn.get_server_pid()
    if session_value is not None:
        await conn.execute(f"SET lock_timeout = '{session_value}'")
    before = await show_lock_timeout(conn)
    assert before == (session_value or before)
    await sql_lock(blocker, key)
    outcome: dict[str, Any] = {}

    async def attempt() -> None:
        started = anyio.current_time()
        async with aiopglock.advisory(key, db=conn, timeout=timeout) as lock:
            outcome["elapsed"] = anyio.current_time() - started
            outcome["acquired"] = bool(lock)
            outcome["pid"] = lock.pid

    async def waiting_query() -> str | None:
        query: str | None = await admin.fetchval(
            "SELECT query FROM pg_catalog.pg_stat_activity "
            "WHERE pid = $1 AND wait_event_type = 'Lock' AND wait_event = 'advisory'",
            pid,
        )
        return query

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(attempt)
            assert await wait_for_waiter(admin, k, timeout=5) == pid
            # The waiting backend runs aiopglock's statement, which scopes
            # lock_timeout itself: the server ends the wait, not the client.
            query = await wait_until(waiting_query, timeout=5)

    assert query is not None
    assert "set_config('lock_timeout'" in query
    assert "pg_advisory" in query
    assert outcome == {"acquired": False, "pid": None, "elapsed": outcome["elapsed"]}
    assert 0.25 <= outcome["elapsed"] < 5.0
    # The scoped lock_timeout is gone; the session's own value is back.
    assert await show_lock_timeout(conn) == before
    assert not conn.is_in_transaction()
    assert await own_advisory_locks(conn) == 0
    assert await lock_rows(admin, k) == [(blocker.get_server_pid(), "ExclusiveLock", True)]


async def test_timeout_with_a_pool_waits_then_gives_up(
    pool: asyncpg.Pool, admin: asyncpg.Connection, blocker: asyncpg.Connection, key: Key
) -> None:
    k = advisory_key(key)
    await sql_lock(blocker, key)
    outcome: list[bool] = []

    async def attempt() -> None:
        async with aiopglock.advisory(key, db=pool, timeout=0.3) as lock:
            outcome.append(bool(lock))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(attempt)
            waiter = await wait_for_waiter(admin, k, timeout=5)
            assert waiter != blocker.get_server_pid()

    assert outcome == [False]
    assert await waiters(admin, k) == []
    assert await holders(admin, k) == [blocker.get_server_pid()]
    assert_pool_idle(pool)


@contextlib.asynccontextmanager
async def every_connection_leased(pool: asyncpg.Pool) -> AsyncIterator[list[Any]]:
    """Hold every connection ``pool`` can give (given back at the end)."""
    leased = [await pool.acquire() for _ in range(pool.get_max_size())]
    try:
        yield leased
    finally:
        for conn in leased:
            await pool.release(conn)


@pytest.mark.parametrize("xact", [False, True], ids=["session", "xact"])
@pytest.mark.parametrize("timeout", [0, 0.3], ids=["timeout=0", "timeout=0.3"])
async def test_timeout_covers_the_wait_for_a_pool_connection(
    timeout: float, xact: bool, pool: asyncpg.Pool, admin: asyncpg.Connection, key: Key
) -> None:
    """Issue 10.1: with every pool connection in use, ``timeout=0`` is "not
    acquired" at once and ``timeout=0.3`` within about that long; nothing is
    held and nobody waits on the server."""
    k = advisory_key(key)
    loop = asyncio.get_running_loop()
    async with every_connection_leased(pool):
        started = loop.time()
        with anyio.fail_after(3):
            async with aiopglock.advisory(key, db=pool, timeout=timeout, xact=xact) as lock:
                assert not lock
                assert lock.connection is None
        elapsed = loop.time() - started
        assert elapsed < timeout + 0.5, elapsed
        if timeout:
            assert elapsed >= timeout * 0.9, elapsed
        assert await lock_rows(admin, k) == []
        with anyio.fail_after(3):
            with pytest.raises(aiopglock.LockNotAcquired):
                async with aiopglock.advisory(
                    key, db=pool, timeout=timeout, xact=xact, side_effect=aiopglock.Raise
                ):
                    pytest.fail("the block must not run")
        ran: list[int] = []

        @aiopglock.advisory(key, db=pool, timeout=timeout, xact=xact, side_effect=aiopglock.Skip)
        async def job() -> int:
            ran.append(1)
            return 1

        with anyio.fail_after(3):
            assert await job() is None
        assert ran == []
    assert_pool_idle(pool)
    assert await lock_rows(admin, k) == []


async def test_timeout_none_waits_for_a_pool_connection(
    pool: asyncpg.Pool, admin: asyncpg.Connection, key: Key
) -> None:
    k = advisory_key(key)
    got: list[int] = []

    async def attempt() -> None:
        async with aiopglock.advisory(key, db=pool) as lock:
            assert lock
            got.append(lock.pid)
            assert await holders(admin, k) == [lock.pid]

    async with every_connection_leased(pool) as leased:
        task = asyncio.create_task(attempt())
        await asyncio.sleep(0.2)  # not synchronisation: time for it to wrongly give up
        assert not task.done()
        assert got == []
        freed = leased.pop()
        freed_pid = freed.get_server_pid()
        await pool.release(freed)
        with anyio.fail_after(5):
            await task
    assert got == [freed_pid]
    assert_pool_idle(pool)
    assert await holders(admin, k) == []


async def test_timeout_bounds_pool_wait_and_lock_wait_together(
    pool: asyncpg.Pool, admin: asyncpg.Connection, blocker: asyncpg.Connection, key: Key
) -> None:
    """A connection frees after 0.6 s of a 1 s timeout, and the key is busy:
    the lock wait gets only what is left (about 0.4 s), not a second 1 s."""
    k = advisory_key(key)
    await sql_lock(blocker, key)
    loop = asyncio.get_running_loop()
    async with every_connection_leased(pool) as leased:
        freed = leased.pop()
        loop.call_later(0.6, lambda: asyncio.ensure_future(pool.release(freed)))
        started = loop.time()
        async with aiopglock.advisory(key, db=pool, timeout=1.0) as lock:
            elapsed = loop.time() - started
            assert not lock
    assert 0.9 <= elapsed < 1.4, elapsed
    assert await lock_rows(admin, k) == [(blocker.get_server_pid(), "ExclusiveLock", True)]
    assert_pool_idle(pool)


async def test_timeout_on_a_free_key_acquires_and_restores_lock_timeout(
    connect: Connect, admin: asyncpg.Connection, key: Key
) -> None:
    k = advisory_key(key)
    conn = await connect()
    await conn.execute("SET lock_timeout = '7s'")
    async with aiopglock.advisory(key, db=conn, timeout=5) as lock:
        assert lock
        assert await holders(admin, k) == [conn.get_server_pid()]
        assert await show_lock_timeout(conn) == "7s"
    assert await holders(admin, k) == []
    assert await show_lock_timeout(conn) == "7s"


async def test_timeout_none_waits_until_released(
    pool: asyncpg.Pool, admin: asyncpg.Connection, blocker: asyncpg.Connection, key: Key
) -> None:
    k = advisory_key(key)
    await sql_lock(blocker, key)
    got: list[int] = []

    async def attempt() -> None:
        async with aiopglock.advisory(key, db=pool, timeout=None) as lock:
            assert lock
            assert lock.pid is not None
            got.append(lock.pid)
            assert await holders(admin, k) == [lock.pid]

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(attempt)
            waiter = await wait_for_waiter(admin, k)
            assert got == []
            await sql_unlock(blocker, key)

    assert got == [waiter]
    assert await holders(admin, k) == []
    assert_pool_idle(pool)


@pytest.mark.parametrize("side_effect", [aiopglock.Return, aiopglock.Raise])
async def test_session_lock_timeout_applies_when_timeout_is_none(
    side_effect: aiopglock.SideEffect,
    connect: Connect,
    admin: asyncpg.Connection,
    blocker: asyncpg.Connection,
    key: Key,
) -> None:
    k = advisory_key(key)
    conn = await connect()
    await conn.execute("SET lock_timeout = '200ms'")
    await sql_lock(blocker, key)
    ran = 0
    started = anyio.current_time()
    with anyio.fail_after(10):
        if side_effect is aiopglock.Return:
            async with aiopglock.advisory(key, db=conn, side_effect=side_effect) as lock:
                assert not lock
                assert await own_advisory_locks(conn) == 0
        else:
            with pytest.raises(aiopglock.LockNotAcquired) as info:
                async with aiopglock.advisory(key, db=conn, side_effect=side_effect):
                    ran += 1
            assert info.value.key == k
    elapsed = anyio.current_time() - started
    assert ran == 0
    assert elapsed >= 0.15  # it did wait, for the session's own lock_timeout
    assert await show_lock_timeout(conn) == "200ms"
    assert await own_advisory_locks(conn) == 0
    assert await holders(admin, k) == [blocker.get_server_pid()]
    assert await conn.fetchval("SELECT 1") == 1


async def test_timeout_inside_a_transaction_keeps_the_callers_lock_timeout(
    connect: Connect, admin: asyncpg.Connection, blocker: asyncpg.Connection, key: Key
) -> None:
    k = advisory_key(key)
    conn = await connect()
    before = await show_lock_timeout(conn)
    await sql_lock(blocker, key)
    async with conn.transaction():
        await conn.execute("SET LOCAL lock_timeout = '7s'")
        async with aiopglock.advisory(key, db=conn, timeout=0.2) as lock:
            assert not lock
        assert await show_lock_timeout(conn) == "7s"
        await sql_unlock(blocker, key)
        async with aiopglock.advisory(key, db=conn, timeout=0.2) as lock:
            assert lock
            assert await show_lock_timeout(conn) == "7s"
            assert await holders(admin, k) == [conn.get_server_pid()]
        assert await show_lock_timeout(conn) == "7s"
        assert await holders(admin, k) == []
    assert await show_lock_timeout(conn) == before


# --------------------------------------------------------------------------- side effects


@pytest.mark.parametrize("side_effect", [None, aiopglock.Return], ids=["default", "Return"])
async def test_return_gives_a_falsy_handle(
    side_effect: aiopglock.SideEffect | None,
    pool: asyncpg.Pool,
    admin: asyncpg.Connection,
    blocker: asyncpg.Connection,
    key: Key,
) -> None:
    await sql_lock(blocker, key)
    ran = 0
    async with aiopglock.advisory(key, db=pool, timeout=0, side_effect=side_effect) as lock:
        ran += 1
        assert not lock
        assert lock.lost is False
    assert ran == 1
    assert await holders(admin, advisory_key(key)) == [blocker.get_server_pid()]
    assert_pool_idle(pool)


async def test_raise_gives_lock_not_acquired(
    pool: asyncpg.Pool, admin: asyncpg.Connection, blocker: asyncpg.Connection, any_key: Key
) -> None:
    k = advisory_key(any_key)
    await sql_lock(blocker, any_key)
    ran = 0
    with pytest.raises(aiopglock.LockNotAcquired) as info:
        async with aiopglock.advisory(any_key, db=pool, timeout=0, side_effect=aiopglock.Raise):
            ran += 1
    assert ran == 0
    assert info.value.key == k
    assert isinstance(info.value, aiopglock.Error)
    assert isinstance(info.value, TimeoutError)
    assert await lock_rows(admin, k) == [(blocker.get_server_pid(), "ExclusiveLock", True)]
    assert_pool_idle(pool)


async def test_skip_is_refused_by_async_with(pool: asyncpg.Pool, key: Key) -> None:
    with pytest.raises(ValueError, match="Skip"):
        async with aiopglock.advisory(key, db=pool, side_effect=aiopglock.Skip):
            pytest.fail("the block must not run")
    assert_pool_idle(pool)


async def test_async_with_needs_a_key(pool: asyncpg.Pool) -> None:
    with pytest.raises(ValueError, match="key"):
        async with aiopglock.advisory(db=pool):
            pytest.fail("the block must not run")
    assert_pool_idle(pool)


async def test_decorator_refuses_return_and_plain_functions(pool: asyncpg.Pool) -> None:
    with pytest.raises(ValueError, match="Return"):
        aiopglock.advisory("k", db=pool, side_effect=aiopglock.Return)(_async_noop)

    def plain() -> None:
        pass

    with pytest.raises(TypeError):
        aiopglock.advisory("k", db=pool)(plain)  # type: ignore[type-var]


async def _async_noop() -> None:
    pass


async def test_decorator_raises_by_default(
    pool: asyncpg.Pool, admin: asyncpg.Connection, blocker: asyncpg.Connection, key: Key
) -> None:
    k = advisory_key(key)
    await sql_lock(blocker, key)
    calls = 0

    @aiopglock.advisory(key, db=pool, timeout=0)
    async def job() -> str:
        nonlocal calls
        calls += 1
        return "ran"

    with pytest.raises(aiopglock.LockNotAcquired) as info:
        await job()
    assert info.value.key == k
    assert calls == 0
    assert await holders(admin, k) == [blocker.get_server_pid()]
    assert_pool_idle(pool)

    await sql_unlock(blocker, key)
    assert await job() == "ran"
    assert calls == 1


async def test_decorator_skip_returns_none_without_running(
    pool: asyncpg.Pool, admin: asyncpg.Connection, blocker: asyncpg.Connection, key: Key
) -> None:
    k = advisory_key(key)
    await sql_lock(blocker, key)
    calls = 0

    @aiopglock.advisory(key, db=pool, timeout=0, side_effect=aiopglock.Skip)
    async def job() -> str:
        nonlocal calls
        calls += 1
        return "ran"

    assert await job() is None
    assert calls == 0
    assert await lock_rows(admin, k) == [(blocker.get_server_pid(), "ExclusiveLock", True)]
    assert_pool_idle(pool)

    await sql_unlock(blocker, key)
    assert await job() == "ran"
    assert calls == 1
    assert await holders(admin, k) == []


async def test_decorator_default_key_is_module_and_qualname(
    connect: Connect, admin: asyncpg.Connection
) -> None:
    conn = await connect()
    expected = advisory_key(
        "tests.test_advisory.test_decorator_default_key_is_module_and_qualname.<locals>.job"
    )
    seen: list[list[int]] = []

    @aiopglock.advisory(db=conn)
    async def job() -> str:
        seen.append(await holders(admin, expected))
        return "done"

    assert await job() == "done"
    assert seen == [[conn.get_server_pid()]]
    assert await holders(admin, expected) == []


async def test_decorator_module_level_default_key(
    connect: Connect, admin: asyncpg.Connection
) -> None:
    conn = await connect()
    _module_level.conn = conn
    expected = advisory_key("tests.test_advisory._module_level_job")
    assert await _module_level_job(admin, expected) == [conn.get_server_pid()]
    assert await holders(admin, expected) == []


class _ModuleLevel:
    conn: asyncpg.Connection | None = None


_module_level = _ModuleLevel()


@aiopglock.advisory(db=lambda: _module_level.conn)
async def _module_level_job(admin: asyncpg.Connection, expected: AdvisoryKey) -> list[int]:
    return await holders(admin, expected)


async def test_decorator_with_an_explicit_key(
    connect: Connect, admin: asyncpg.Connection, any_key: Key
) -> None:
    conn = await connect()
    k = advisory_key(any_key)
    default = advisory_key("tests.test_advisory.test_decorator_with_an_explicit_key.<locals>.job")
    seen: list[tuple[list[int], list[int]]] = []

    @aiopglock.advisory(any_key, db=conn)
    async def job() -> None:
        seen.append((await holders(admin, k), await holders(admin, default)))

    await job()
    assert seen == [([conn.get_server_pid()], [])]
    assert await holders(admin, k) == []


async def test_decorator_preserves_the_function(pool: asyncpg.Pool) -> None:
    async def report(a: int, b: int = 2) -> int:
        """Add two numbers under a lock."""
        return a + b

    wrapped = aiopglock.advisory("x", db=pool)(report)
    assert wrapped.__name__ == "report"
    assert wrapped.__qualname__ == report.__qualname__
    assert wrapped.__doc__ == "Add two numbers under a lock."
    assert wrapped.__module__ == report.__module__
    assert wrapped.__wrapped__ is report  # type: ignore[attr-defined]
    assert inspect.iscoroutinefunction(wrapped)
    assert inspect.signature(wrapped) == inspect.signature(report)


async def test_decorator_passes_arguments_results_and_exceptions(
    connect: Connect, admin: asyncpg.Connection, key: Key
) -> None:
    conn = await connect()
    k = advisory_key(key)
    pid = conn.get_server_pid()
    boom = LookupError("boom")

    @aiopglock.advisory(key, db=conn)
    async def job(a: int, *, b: int, fail: bool = False) -> tuple[int, int]:
        assert await holders(admin, k) == [pid]
        if fail:
            raise boom
        return a, b

    assert await job(1, b=2) == (1, 2)
    assert await holders(admin, k) == []

    with pytest.raises(LookupError) as info:
        await job(1, b=2, fail=True)
    assert info.value is boom
    # Released on the server after the exception (a raw connection: no pool
    # reset could have done it instead).
    assert await holders(admin, k) == []
    assert await own_advisory_locks(conn) == 0
    assert await conn.fetchval("SELECT 1") == 1


# --------------------------------------------------------------------------- per-call state


async def test_skipped_call_does_not_clobber_a_running_call(
    strict_pool: asyncpg.Pool, admin: asyncpg.Connection, key: Key
) -> None:
    """django-pglock keeps per-call state on the decorator: a skipped call that
    races a running one overwrites it and the running call's lock leaks. With
    ``strict_pool`` a leaked lock would stay in pg_locks after the return."""
    k = advisory_key(key)
    started = anyio.Event()
    finish = anyio.Event()
    calls: list[str] = []
    results: dict[str, Any] = {}

    @aiopglock.advisory(key, db=strict_pool, timeout=0, side_effect=aiopglock.Skip)
    async def job(name: str) -> str:
        calls.append(name)
        if name == "A":
            started.set()
            await finish.wait()
        return name

    async def run_a() -> None:
        results["A"] = await job("A")

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_a)
            await started.wait()
            holding = await holders(admin, k)
            assert len(holding) == 1
            assert await job("B") is None
            assert calls == ["A"]
            assert await holders(admin, k) == holding
            finish.set()

    assert results == {"A": "A"}
    assert await holders(admin, k) == []
    assert_pool_idle(strict_pool)
    # And nothing stale makes the next call skip.
    assert await job("C") == "C"
    assert calls == ["A", "C"]
    assert await holders(admin, k) == []


async def test_concurrent_decorated_calls_run_one_at_a_time(
    pool: asyncpg.Pool, admin: asyncpg.Connection, key: Key
) -> None:
    k = advisory_key(key)
    inside = 0
    max_inside = 0
    contended = 0

    @aiopglock.advisory(key, db=pool, timeout=None)
    async def job(i: int) -> int:
        nonlocal inside, max_inside, contended
        inside += 1
        max_inside = max(max_inside, inside)
        try:
            assert len(await holders(admin, k)) == 1
            if await waiters(admin, k):
                contended += 1
            return i
        finally:
            inside -= 1

    with anyio.fail_after(25):
        results = await asyncio.gather(*(job(i) for i in range(20)))
    assert sorted(results) == list(range(20))
    assert max_inside == 1
    assert contended > 0  # the calls really did queue on the server
    assert await holders(admin, k) == []
    assert_pool_idle(pool)


async def test_one_spec_entered_by_many_tasks(
    pool: asyncpg.Pool, admin: asyncpg.Connection, key: Key
) -> None:
    k = advisory_key(key)
    spec = aiopglock.advisory(key, db=pool, timeout=None)
    inside = 0
    max_inside = 0
    done: list[int] = []
    pids: list[int] = []

    async def worker(i: int) -> None:
        nonlocal inside, max_inside
        async with spec as lock:
            assert lock
            assert lock.pid is not None
            inside += 1
            max_inside = max(max_inside, inside)
            assert await holders(admin, k) == [lock.pid]
            pids.append(lock.pid)
            if len(done) < 4:
                # Someone else is queued on the server behind this holder.
                await wait_for_waiter(admin, k)
            inside -= 1
            done.append(i)

    with anyio.fail_after(25):
        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(worker, i)

    assert sorted(done) == list(range(5))
    assert max_inside == 1
    assert await holders(admin, k) == []
    assert_pool_idle(pool)


# --------------------------------------------------------------------------- db forms


async def test_db_callable_is_resolved_at_call_time(
    pool: asyncpg.Pool, connect: Connect, admin: asyncpg.Connection, key: Key
) -> None:
    k = advisory_key(key)

    class Holder:
        db: Any = None

    holder = Holder()

    @aiopglock.advisory(key, db=lambda: holder.db, timeout=0)
    async def job() -> list[int]:
        return await holders(admin, k)

    holder.db = pool
    seen = await job()
    assert len(seen) == 1
    assert await holders(admin, k) == []
    assert_pool_idle(pool)

    conn = await connect()
    holder.db = conn
    assert await job() == [conn.get_server_pid()]
    assert await holders(admin, k) == []

    async with aiopglock.advisory(key, db=lambda: conn) as lock:
        assert lock.pid == conn.get_server_pid()
        assert await holders(admin, k) == [conn.get_server_pid()]


async def test_configured_default_db(
    pool: asyncpg.Pool, connect: Connect, admin: asyncpg.Connection, key: Key
) -> None:
    k = advisory_key(key)
    conn = await connect()
    aiopglock.configure(db=pool)
    try:
        async with aiopglock.advisory(key) as lock:
            assert lock
            assert await holders(admin, k) == [lock.pid]
            assert pool.get_idle_size() == pool.get_size() - 1

        @aiopglock.advisory(key, timeout=0)
        async def job() -> list[int]:
            return await holders(admin, k)

        assert len(await job()) == 1

        # An explicit db= wins over the default.
        async with aiopglock.advisory(key, db=conn) as lock:
            assert lock.pid == conn.get_server_pid()
            assert await holders(admin, k) == [conn.get_server_pid()]
    finally:
        aiopglock.configure(db=None)
    assert await holders(admin, k) == []
    assert_pool_idle(pool)

    with pytest.raises(aiopglock.UsageError):
        async with aiopglock.advisory(key):
            pytest.fail("the block must not run")


# --------------------------------------------------------------------------- xact


@pytest.mark.parametrize("timeout", [None, 0, 5], ids=["None", "0", "5"])
@pytest.mark.parametrize("end", ["commit", "rollback"])
async def test_xact_lock_is_held_until_the_transaction_ends(
    end: str, timeout: float | None, connect: Connect, admin: asyncpg.Connection, any_key: Key
) -> None:
    k = advisory_key(any_key)
    conn = await connect()
    pid = conn.get_server_pid()
    before = await show_lock_timeout(conn)

    class Rollback(Exception):
        pass

    with pytest.raises(Rollback) if end == "rollback" else contextlib.nullcontext():
        async with conn.transaction():
            async with aiopglock.advisory(any_key, db=conn, xact=True, timeout=timeout) as lock:
                assert lock
                assert lock.xact
                assert lock.pid == pid
                assert await lock_rows(admin, k) == [(pid, "ExclusiveLock", True)]
                assert await show_lock_timeout(conn) == before
            # Exit does not release: the transaction owns the lock.
            assert await lock_rows(admin, k) == [(pid, "ExclusiveLock", True)]
            assert conn.is_in_transaction()
            if end == "rollback":
                raise Rollback
    assert not conn.is_in_transaction()
    assert await holders(admin, k) == []
    assert await own_advisory_locks(conn) == 0


async def _transaction_is_usable(conn: asyncpg.Connection, value: int) -> None:
    assert await conn.fetchval("SELECT $1::int + 1", value) == value + 1
    await conn.execute("INSERT INTO advisory_t VALUES ($1)", value)


async def _committed(conn: asyncpg.Connection) -> list[int]:
    return [r["x"] for r in await conn.fetch("SELECT x FROM advisory_t ORDER BY x")]


@pytest.mark.parametrize("timeout", [0, 0.2], ids=["timeout=0", "timeout=0.2"])
async def test_xact_failed_wait_returns_and_leaves_the_transaction_usable(
    timeout: float,
    connect: Connect,
    admin: asyncpg.Connection,
    blocker: asyncpg.Connection,
    any_key: Key,
) -> None:
    k = advisory_key(any_key)
    conn = await connect()
    await conn.execute("CREATE TEMP TABLE advisory_t (x int)")
    before = await show_lock_timeout(conn)
    await sql_lock(blocker, any_key)
    async with conn.transaction():
        await conn.execute("INSERT INTO advisory_t VALUES (1)")
        async with aiopglock.advisory(any_key, db=conn, xact=True, timeout=timeout) as lock:
            assert not lock
        assert conn.is_in_transaction()
        assert await own_advisory_locks(conn) == 0
        assert await show_lock_timeout(conn) == before
        await _transaction_is_usable(conn, 2)
    assert await _committed(conn) == [1, 2]
    assert await lock_rows(admin, k) == [(blocker.get_server_pid(), "ExclusiveLock", True)]


async def test_xact_raise_leaves_the_transaction_usable(
    connect: Connect, admin: asyncpg.Connection, blocker: asyncpg.Connection, key: Key
) -> None:
    k = advisory_key(key)
    conn = await connect()
    await conn.execute("CREATE TEMP TABLE advisory_t (x int)")
    await sql_lock(blocker, key)
    async with conn.transaction():
        await conn.execute("INSERT INTO advisory_t VALUES (1)")
        with pytest.raises(aiopglock.LockNotAcquired) as info:
            async with aiopglock.advisory(
                key, db=conn, xact=True, timeout=0.2, side_effect=aiopglock.Raise
            ):
                pytest.fail("the block must not run")
        assert info.value.key == k
        await _transaction_is_usable(conn, 2)
    assert await _committed(conn) == [1, 2]
    assert await own_advisory_locks(conn) == 0


async def test_session_lock_inside_a_transaction(
    connect: Connect, admin: asyncpg.Connection, blocker: asyncpg.Connection, key: Key
) -> None:
    k = advisory_key(key)
    conn = await connect()
    pid = conn.get_server_pid()
    await conn.execute("CREATE TEMP TABLE advisory_t (x int)")
    async with conn.transaction():
        await conn.execute("INSERT INTO advisory_t VALUES (1)")
        async with aiopglock.advisory(key, db=conn) as lock:
            assert lock
            assert not lock.xact
            assert await lock_rows(admin, k) == [(pid, "ExclusiveLock", True)]
        # A session lock is released at the block's exit, transaction or not.
        assert conn.is_in_transaction()
        assert await holders(admin, k) == []

        # A failed wait inside the transaction leaves it usable.
        await sql_lock(blocker, key)
        async with aiopglock.advisory(key, db=conn, timeout=0.2) as lock:
            assert not lock
        assert await own_advisory_locks(conn) == 0
        await _transaction_is_usable(conn, 2)

        # So does one ended by the transaction's own lock_timeout.
        await conn.execute("SET LOCAL lock_timeout = '150ms'")
        async with aiopglock.advisory(key, db=conn, timeout=None) as lock:
            assert not lock
        assert await own_advisory_locks(conn) == 0
        assert await show_lock_timeout(conn) == "150ms"
        await _transaction_is_usable(conn, 3)
    assert await _committed(conn) == [1, 2, 3]
    assert await lock_rows(admin, k) == [(blocker.get_server_pid(), "ExclusiveLock", True)]


@pytest.mark.parametrize("end", ["commit", "rollback"])
async def test_session_lock_outlives_the_transaction_it_was_taken_in(
    end: str, connect: Connect, admin: asyncpg.Connection, key: Key
) -> None:
    """Session locks are not transactional: ending the transaction inside the
    block leaves the lock held until the block exits."""
    k = advisory_key(key)
    conn = await connect()
    pid = conn.get_server_pid()
    tx = conn.transaction()
    await tx.start()
    async with aiopglock.advisory(key, db=conn, timeout=5) as lock:
        assert lock
        await (tx.commit() if end == "commit" else tx.rollback())
        assert not conn.is_in_transaction()
        assert await lock_rows(admin, k) == [(pid, "ExclusiveLock", True)]
    assert await holders(admin, k) == []
    assert await own_advisory_locks(conn) == 0


# --------------------------------------------------------------------------- re-entry


@pytest.mark.parametrize("same_spec", [False, True], ids=["new spec", "same spec"])
async def test_reentry_nests_without_a_second_server_lock(
    same_spec: bool, pool: asyncpg.Pool, admin: asyncpg.Connection, any_key: Key
) -> None:
    k = advisory_key(any_key)
    spec = aiopglock.advisory(any_key, db=pool, timeout=0)
    async with spec as outer:
        assert outer
        rows = [(outer.pid, "ExclusiveLock", True)]
        size = pool.get_size() - pool.get_idle_size()
        # timeout=0 on a pool: without re-entry this would try on another
        # connection and fail.
        inner_spec = spec if same_spec else aiopglock.advisory(any_key, db=pool, timeout=0)
        async with inner_spec as inner:
            assert inner
            assert inner.pid == outer.pid
            assert await lock_rows(admin, k) == rows
            assert pool.get_size() - pool.get_idle_size() == size  # no new lease
            async with aiopglock.advisory(any_key, db=pool, timeout=0) as innermost:
                assert innermost
                assert await lock_rows(admin, k) == rows
            assert await lock_rows(admin, k) == rows
        # Released only by the outermost exit.
        assert await lock_rows(admin, k) == rows
        async with aiopglock.advisory(any_key, db=pool, timeout=0) as again:
            assert again
        assert await lock_rows(admin, k) == rows
    assert await holders(admin, k) == []
    assert_pool_idle(pool)


async def test_reentry_shared_inside_exclusive(
    pool: asyncpg.Pool, admin: asyncpg.Connection, key: Key
) -> None:
    k = advisory_key(key)
    async with aiopglock.advisory(key, db=pool) as outer:
        async with aiopglock.advisory(key, db=pool, shared=True, timeout=0) as inner:
            assert inner
            assert await lock_rows(admin, k) == [(outer.pid, "ExclusiveLock", True)]
        assert await lock_rows(admin, k) == [(outer.pid, "ExclusiveLock", True)]
    assert await holders(admin, k) == []
    assert_pool_idle(pool)


async def test_reentry_exclusive_inside_shared_is_a_usage_error(
    pool: asyncpg.Pool, admin: asyncpg.Connection, key: Key
) -> None:
    k = advisory_key(key)
    async with aiopglock.advisory(key, db=pool, shared=True) as outer:
        assert outer
        with anyio.fail_after(10), pytest.raises(aiopglock.UsageError):
            async with aiopglock.advisory(key, db=pool, timeout=None):
                pytest.fail("the block must not run")
        # The outer hold is intact...
        assert await lock_rows(admin, k) == [(outer.pid, "ShareLock", True)]
        assert pool.get_idle_size() == pool.get_size() - 1
        # ...and still nests.
        async with aiopglock.advisory(key, db=pool, shared=True, timeout=0) as inner:
            assert inner
        assert await lock_rows(admin, k) == [(outer.pid, "ShareLock", True)]
    # ...and is released at its exit.
    assert await holders(admin, k) == []
    assert_pool_idle(pool)


async def test_different_keys_nest_normally(pool: asyncpg.Pool, admin: asyncpg.Connection) -> None:
    k1, k2 = new_key("int"), new_key("pair")
    async with aiopglock.advisory(k1, db=pool) as first:
        async with aiopglock.advisory(k2, db=pool, timeout=0) as second:
            assert first
            assert second
            assert first.pid != second.pid  # each session lock leases its own connection
            assert await lock_rows(admin, advisory_key(k1)) == [(first.pid, "ExclusiveLock", True)]
            assert await lock_rows(admin, advisory_key(k2)) == [(second.pid, "ExclusiveLock", True)]
        assert await holders(admin, advisory_key(k2)) == []
        assert await holders(admin, advisory_key(k1)) == [first.pid]
    assert await holders(admin, advisory_key(k1)) == []
    assert_pool_idle(pool)


async def test_a_child_task_does_not_reenter(
    pool: asyncpg.Pool, admin: asyncpg.Connection, key: Key
) -> None:
    k = advisory_key(key)
    events: list[str] = []
    child_pid: list[int] = []

    async def child() -> None:
        async with aiopglock.advisory(key, db=pool, timeout=None) as lock:
            assert lock
            assert lock.pid is not None
            child_pid.append(lock.pid)
            events.append("child in")
            assert await holders(admin, k) == [lock.pid]

    with anyio.fail_after(20):
        async with aiopglock.advisory(key, db=pool) as parent:
            task = asyncio.create_task(child())
            waiter = await wait_for_waiter(admin, k)
            assert waiter != parent.pid
            assert not task.done()
            assert await holders(admin, k) == [parent.pid]
            events.append("parent out")
        await task

    assert events == ["parent out", "child in"]
    assert child_pid == [waiter]
    assert await holders(admin, k) == []
    assert_pool_idle(pool)


async def test_another_task_on_the_same_connection_does_not_reenter(
    connect: Connect, admin: asyncpg.Connection, key: Key
) -> None:
    """Re-entry is per task. PostgreSQL's own re-entrancy is per session, so a
    second task using the same Connection would be granted the key by the
    server at once: aiopglock must not let it in while the first task holds
    it (not acquired, or a UsageError, are both acceptable answers)."""
    k = advisory_key(key)
    conn = await connect()
    pid = conn.get_server_pid()

    async def other_task() -> bool | None:
        try:
            async with aiopglock.advisory(key, db=conn, timeout=0) as lock:
                return bool(lock)
        except aiopglock.UsageError:
            return None

    with anyio.fail_after(10):
        async with aiopglock.advisory(key, db=conn) as parent:
            assert parent
            got = await asyncio.create_task(other_task())
            assert got is not True, "two tasks held the same exclusive key at once"
            assert await holders(admin, k) == [pid]
    assert await holders(admin, k) == []
    assert await own_advisory_locks(conn) == 0


async def test_tasks_sharing_a_connection_wait_in_process(
    connect: Connect, admin: asyncpg.Connection, key: Key
) -> None:
    """A second task on the same Connection waits (in this process) until the
    first releases, then takes the key on the server itself; with a timeout
    it gives up without touching the server."""
    k = advisory_key(key)
    conn = await connect()
    pid = conn.get_server_pid()
    events: list[str] = []
    second_waiting = asyncio.Event()

    async def second(timeout: float | None) -> bool:
        second_waiting.set()
        async with aiopglock.advisory(key, db=conn, timeout=timeout) as lock:
            if lock:
                events.append("second in")
                assert await holders(admin, k) == [pid]
            return bool(lock)

    with anyio.fail_after(10):
        async with aiopglock.advisory(key, db=conn):
            task = asyncio.create_task(second(None))
            await second_waiting.wait()
            assert await asyncio.create_task(second(0.2)) is False  # gave up, in process
            for _ in range(20):
                await asyncio.sleep(0)  # every chance to slip in
            assert not task.done(), "the second task got in while the first held the key"
            assert await holders(admin, k) == [pid]
            assert await own_advisory_locks(conn) == 1
            events.append("first out")
        assert await task is True
    assert events == ["first out", "second in"]
    assert await holders(admin, k) == []
    assert await own_advisory_locks(conn) == 0


async def test_tasks_sharing_a_connection_may_share_a_shared_key(
    connect: Connect, admin: asyncpg.Connection, key: Key
) -> None:
    k = advisory_key(key)
    conn = await connect()
    inside = asyncio.Event()
    leave = asyncio.Event()

    async def reader() -> bool:
        async with aiopglock.advisory(key, db=conn, shared=True) as lock:
            inside.set()
            await leave.wait()
            return bool(lock)

    with anyio.fail_after(10):
        task = asyncio.create_task(reader())
        await inside.wait()
        async with aiopglock.advisory(key, db=conn, shared=True, timeout=0) as lock:
            assert lock
            # One session, one ShareLock row (PostgreSQL counts the two holds).
            assert await lock_rows(admin, k) == [(conn.get_server_pid(), "ShareLock", True)]

            async def writer() -> bool:
                async with aiopglock.advisory(key, db=conn, timeout=0) as exclusive:
                    return bool(exclusive)

            # An exclusive request from a third task on the same connection
            # conflicts with the shared holds: refused in process.
            assert await asyncio.create_task(writer()) is False
        leave.set()
        assert await task is True
    assert await holders(admin, k) == []


async def test_recursive_decorated_function_does_not_deadlock(
    pool: asyncpg.Pool, admin: asyncpg.Connection, key: Key
) -> None:
    k = advisory_key(key)
    seen: list[list[int]] = []

    @aiopglock.advisory(key, db=pool, timeout=None)
    async def descend(depth: int) -> int:
        seen.append(await holders(admin, k))
        if depth == 0:
            return 0
        return 1 + await descend(depth - 1)

    with anyio.fail_after(10):
        assert await descend(4) == 4
    assert len(seen) == 5
    assert len(seen[0]) == 1
    assert all(s == seen[0] for s in seen)
    assert await holders(admin, k) == []
    assert_pool_idle(pool)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("db_kind", ["pool", "raw"])
async def test_an_exception_in_the_block_propagates_and_releases(
    db_kind: str, pool: asyncpg.Pool, connect: Connect, admin: asyncpg.Connection, any_key: Key
) -> None:
    k = advisory_key(any_key)
    db: Any = pool if db_kind == "pool" else await connect()
    boom = KeyError("boom")
    with pytest.raises(KeyError) as info:
        async with aiopglock.advisory(any_key, db=db) as lock:
            assert await holders(admin, k) == [lock.pid]
            raise boom
    assert info.value is boom
    assert await holders(admin, k) == []
    if db_kind == "pool":
        assert_pool_idle(pool)
    else:
        assert not db.is_closed()
        assert await own_advisory_locks(db) == 0


@pytest.mark.parametrize("timeout", [None, 0, 0.2], ids=["None", "0", "0.2"])
async def test_a_server_error_propagates_unchanged(
    timeout: float | None, connect: Connect, admin: asyncpg.Connection, key: Key
) -> None:
    conn = await connect()
    await conn.execute("BEGIN")
    with pytest.raises(asyncpg.DivisionByZeroError):
        await conn.execute("SELECT 1 / 0")
    with pytest.raises(asyncpg.InFailedSQLTransactionError) as info:
        async with aiopglock.advisory(key, db=conn, timeout=timeout):
            pytest.fail("the block must not run")
    assert info.value.sqlstate == "25P02"
    assert await holders(admin, advisory_key(key)) == []
    # The caller's connection is intact and its transaction still theirs to end.
    assert not conn.is_closed()
    assert conn.is_in_transaction()
    await conn.execute("ROLLBACK")
    assert await conn.fetchval("SELECT 1") == 1
    assert await own_advisory_locks(conn) == 0


@pytest.mark.parametrize("in_transaction", [False, True], ids=["autocommit", "transaction"])
async def test_a_server_error_during_the_wait_propagates_unchanged(
    in_transaction: bool,
    connect: Connect,
    admin: asyncpg.Connection,
    blocker: asyncpg.Connection,
    key: Key,
) -> None:
    k = advisory_key(key)
    conn = await connect()
    await conn.execute("CREATE TEMP TABLE advisory_t (x int)")
    await sql_lock(blocker, key)
    tx = conn.transaction()
    if in_transaction:
        await tx.start()
        await conn.execute("SET LOCAL statement_timeout = '200ms'")
    else:
        await conn.execute("SET statement_timeout = '200ms'")
    with anyio.fail_after(10), pytest.raises(asyncpg.QueryCanceledError) as info:
        async with aiopglock.advisory(key, db=conn, timeout=None):
            pytest.fail("the block must not run")
    assert info.value.sqlstate == "57014"
    assert not conn.is_closed()
    assert await own_advisory_locks(conn) == 0
    assert await holders(admin, k) == [blocker.get_server_pid()]
    if in_transaction:
        # aiopglock's savepoint took the failed wait with it.
        await _transaction_is_usable(conn, 1)
        await tx.commit()
        assert await _committed(conn) == [1]
    else:
        assert await conn.fetchval("SELECT 1") == 1


async def test_a_server_error_inside_the_block_in_a_transaction(
    connect: Connect, admin: asyncpg.Connection, key: Key
) -> None:
    """The block's own SQL aborts the caller's transaction: the session lock
    cannot be unlocked on that connection until the caller rolls back. The
    error still comes out unchanged and the lock does not outlive the block
    (aiopglock may discard the connection to guarantee that)."""
    k = advisory_key(key)
    conn = await connect()
    tx = conn.transaction()
    await tx.start()
    with pytest.raises(asyncpg.DivisionByZeroError):
        async with aiopglock.advisory(key, db=conn) as lock:
            assert await holders(admin, k) == [lock.pid]
            await conn.execute("SELECT 1 / 0")
    await wait_for_release(admin, k)
    if not conn.is_closed():
        await tx.rollback()
        assert await conn.fetchval("SELECT 1") == 1
        assert await own_advisory_locks(conn) == 0


# --------------------------------------------------------------------------- full lock table


def test_lock_table_full_keeps_the_class_and_names_the_setting() -> None:
    from aiopglock._db import lock_table_full

    original = asyncpg.exceptions.OutOfMemoryError("out of shared memory")
    made = lock_table_full(original)
    assert type(made) is asyncpg.exceptions.OutOfMemoryError
    assert made.sqlstate == "53200"
    assert "max_locks_per_transaction" in str(made)
    assert "out of shared memory" in str(made)
    other = asyncpg.exceptions.LockNotAvailableError("busy")
    assert lock_table_full(other) is other


class LockTableFiller:
    """Fills the (private, embedded) server's shared lock table with session
    locks of one connection of its own, and empties it again."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def fill(self) -> None:
        first = 1 << 40
        with pytest.raises(asyncpg.exceptions.OutOfMemoryError):
            for start in range(first, first + 10_000_000, 10_000):
                await self.conn.execute(
                    "SELECT pg_advisory_lock(k) "
                    "FROM generate_series($1::int8, $1::int8 + 9999) AS k",
                    start,
                )

    async def empty(self) -> None:
        await self.conn.execute("SELECT pg_advisory_unlock_all()")


@pytest.fixture
async def lock_table(connect: Connect) -> AsyncIterator[LockTableFiller]:
    filler = LockTableFiller(await connect())
    try:
        yield filler
    finally:
        await filler.empty()


@pytest.mark.embedded_only
@pytest.mark.parametrize("form", ["pool", "connection", "transaction", "xact-pool"])
async def test_full_lock_table_is_a_clear_error_and_nothing_is_held(
    form: str,
    pool: asyncpg.Pool,
    connect: Connect,
    admin: asyncpg.Connection,
    lock_table: LockTableFiller,
) -> None:
    """Issue 9.6: SQLSTATE 53200 from the lock statement is raised as
    ``asyncpg.OutOfMemoryError`` naming max_locks_per_transaction, after the
    wait is resolved like any failed one: nothing is left held and the
    connection stays usable. (New connections cannot even log in meanwhile:
    every connection used is made first; the pool keeps its one.)"""
    key = new_key("int")
    conn = await connect()
    db: Any = pool if form in ("pool", "xact-pool") else conn
    await lock_table.fill()
    if form == "transaction":
        await conn.execute("BEGIN")
    for timeout in (None, 0, 1):
        with pytest.raises(asyncpg.exceptions.OutOfMemoryError, match="lock table is full"):
            async with aiopglock.advisory(key, db=db, timeout=timeout, xact=form == "xact-pool"):
                pytest.fail("the block must not run")
    assert not conn.is_closed()
    assert_pool_idle(pool)
    # Looking at pg_locks takes locks too: only once there is room again. A
    # session lock left by any of the three waits would still be there.
    await lock_table.empty()
    assert await holders(admin, advisory_key(key)) == []
    if form == "transaction":
        assert conn.is_in_transaction()
        assert await conn.fetchval("SELECT 1") == 1
        assert await own_advisory_locks(conn) == 0
        await conn.execute("ROLLBACK")
    assert await own_advisory_locks(conn) == 0
    async with aiopglock.advisory(key, db=db, timeout=5, xact=form == "xact-pool") as lock:
        assert lock
