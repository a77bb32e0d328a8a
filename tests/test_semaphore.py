"""``aiopglock.semaphore``: at most ``limit`` holders, across processes, on the real server."""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import asyncpg
import pytest

import aiopglock
from aiopglock import _names, _semaphore
from aiopglock._semaphore import channel, slot_key
from tests._helpers import Connect, PgServer, holders, wait_until
from tests.conftest import PgBouncer, ReplicaPair
from tests.test_processes import CHILD_TIMEOUT, children

# --------------------------------------------------------------------------- helpers


async def slot_holders(admin: asyncpg.Connection, name: str, limit: int) -> dict[int, list[int]]:
    """Backends holding each slot of semaphore ``name`` (slots nobody holds left out)."""
    held = {}
    for slot in range(limit):
        pids = await holders(admin, slot_key(name, slot))
        if pids:
            held[slot] = pids
    return held


async def idle_pool(pool: asyncpg.Pool) -> bool:
    return bool(pool.get_idle_size() == pool.get_size())


# --------------------------------------------------------------------------- processes

PROCESSES = 3
TASKS = 3
ROUNDS = 4
LIMIT = 3


async def _count_peak(dsn: str, table: str, name: str, barrier: Any) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=TASKS + 1, max_size=TASKS + 1)
    quoted = '"' + table + '"'
    try:

        async def task() -> None:
            for _ in range(ROUNDS):
                async with aiopglock.semaphore(
                    name, LIMIT, db=pool, side_effect=aiopglock.Raise
                ) as slot:
                    assert 0 <= slot.slot < LIMIT
                    await pool.execute(
                        f"UPDATE {quoted} SET cur = cur + 1, peak = greatest(peak, cur + 1)"
                    )
                    await asyncio.sleep(0.02)  # the work done under the slot
                    await pool.execute(f"UPDATE {quoted} SET cur = cur - 1")

        barrier.wait(CHILD_TIMEOUT)
        with anyio.fail_after(CHILD_TIMEOUT):
            async with anyio.create_task_group() as tg:
                for _ in range(TASKS):
                    tg.start_soon(task)
    finally:
        await pool.close()


def peak_worker(dsn: str, table: str, name: str, barrier: Any) -> None:
    """Child process: ``TASKS`` tasks, each entering the semaphore ``ROUNDS`` times."""
    asyncio.run(_count_peak(dsn, table, name, barrier))


@pytest.fixture
async def peak_table(admin: asyncpg.Connection) -> AsyncIterator[str]:
    table = f"aiopglock_sem_peak_{os.getpid()}"
    quoted = '"' + table + '"'
    await admin.execute(f"DROP TABLE IF EXISTS {quoted}")
    await admin.execute(f"CREATE TABLE {quoted} (cur int NOT NULL, peak int NOT NULL)")
    await admin.execute(f"INSERT INTO {quoted} VALUES (0, 0)")
    try:
        yield table
    finally:
        await admin.execute(f"DROP TABLE IF EXISTS {quoted}")


@pytest.mark.slow
async def test_peak_holders_across_processes_never_above_limit(
    pg_server: PgServer, admin: asyncpg.Connection, peak_table: str
) -> None:
    name = f"peak:{peak_table}"
    async with children() as kids:
        barrier = kids.ctx.Barrier(PROCESSES)
        for _ in range(PROCESSES):
            kids.start(peak_worker, pg_server.dsn, peak_table, name, barrier)
        await kids.join()
    cur, peak = await admin.fetchrow(f'SELECT cur, peak FROM "{peak_table}"')
    # Nine contenders for three slots, each held for 20 ms: the limit is reached.
    assert (cur, peak) == (0, LIMIT)
    assert await slot_holders(admin, name, LIMIT) == {}


# --------------------------------------------------------------------------- basics


async def test_timeout_zero_is_falsy_when_full(
    pool: asyncpg.Pool, connect: Connect, admin: asyncpg.Connection
) -> None:
    a, b = await connect(), await connect()
    sem = aiopglock.semaphore("full", 2, timeout=0)
    one, two = aiopglock.semaphore("full", 2, db=a), aiopglock.semaphore("full", 2, db=b)
    # Held by other tasks (this one, holding both, would be refused its wait),
    # released by this one (as a fixture's teardown would).
    first = await asyncio.create_task(one.__aenter__())
    second = await asyncio.create_task(two.__aenter__())
    try:
        assert first and second
        assert {first.slot, second.slot} == {0, 1}
        held = await slot_holders(admin, "full", 2)
        assert held == {first.slot: [a.get_server_pid()], second.slot: [b.get_server_pid()]}
        async with aiopglock.semaphore("full", 2, db=pool, timeout=0) as third:
            assert not third
            assert third.slot is None and not third.lost
        with pytest.raises(aiopglock.LockNotAcquired):
            async with aiopglock.semaphore(
                "full", 2, db=pool, timeout=0, side_effect=aiopglock.Raise
            ):
                pass
        start = time.monotonic()
        async with aiopglock.semaphore("full", 2, db=pool, timeout=0.3) as late:
            assert not late
        assert 0.25 < time.monotonic() - start < 3
    finally:
        await two.__aexit__(None, None, None)
        await one.__aexit__(None, None, None)
    assert await slot_holders(admin, "full", 2) == {}
    assert await idle_pool(pool)
    assert repr(sem) == "aiopglock.semaphore('full', 2, timeout=0.0, side_effect=None)"


async def test_busy_pool_with_timeout_zero_is_not_acquired(pool: asyncpg.Pool) -> None:
    conns = [await pool.acquire() for _ in range(pool.get_max_size())]
    try:
        async with aiopglock.semaphore("busy", 5, db=pool, timeout=0) as slot:
            assert not slot
    finally:
        for conn in conns:
            await pool.release(conn)


async def test_timeout_bounds_the_pool_lease(pool: asyncpg.Pool) -> None:
    conns = [await pool.acquire() for _ in range(pool.get_max_size())]
    try:
        start = time.monotonic()
        async with aiopglock.semaphore("lease", 5, db=pool, timeout=0.2) as slot:
            assert not slot
        assert time.monotonic() - start < 2
    finally:
        for conn in conns:
            await pool.release(conn)


async def test_slots_do_not_collide_with_advisory_of_the_name(
    connect: Connect, admin: asyncpg.Connection
) -> None:
    a, b = await connect(), await connect()
    async with (
        aiopglock.advisory("shared-name", db=a, timeout=0) as lock,
        aiopglock.semaphore("shared-name", 1, db=b, timeout=0) as slot,
    ):
        assert lock and slot
        assert slot.key == slot_key("shared-name", 0)
        rows = await admin.fetch(
            "SELECT objsubid FROM pg_locks WHERE locktype = 'advisory' AND pid = $1",
            b.get_server_pid(),
        )
        assert [r["objsubid"] for r in rows] == [2]  # the two-int4 form
        assert await holders(admin, aiopglock.advisory_key("shared-name")) == [a.get_server_pid()]
    keys = {slot_key("n", i) for i in range(100)} | {slot_key("m", i) for i in range(100)}
    assert len(keys) == 200


async def test_same_task_takes_another_slot_and_never_waits_for_itself(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    sem = aiopglock.semaphore("nested", 2, db=pool)
    async with sem as outer, sem as inner:
        assert outer and inner
        assert {outer.slot, inner.slot} == {0, 1}
        assert outer.pid != inner.pid
        with pytest.raises(aiopglock.UsageError, match="wait for itself"):
            async with sem:
                pass
        assert set(await slot_holders(admin, "nested", 2)) == {0, 1}
    assert await slot_holders(admin, "nested", 2) == {}
    assert _semaphore._own == {}


# --------------------------------------------------------------------------- waking


async def _wait_waiting(admin: asyncpg.Connection, pid: int, listening: list[int]) -> None:
    """Until the waiter on backend ``pid`` has LISTENed, tried again, and sits idle
    (its last statement a slot's try-lock, which names the semaphore)."""

    async def waiting() -> bool:
        row = await admin.fetchrow("SELECT state, query FROM pg_stat_activity WHERE pid = $1", pid)
        query = row["query"] or ""
        named = _names.parse(query)
        return (
            bool(listening)
            and row["state"] == "idle"
            and named is not None
            and named[1] is not None
            and "pg_try_advisory_lock(" in query
        )

    await wait_until(waiting, message="the waiter to wait")


async def test_waiter_is_woken_by_the_release_not_by_polling(
    connect: Connect, admin: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With the backstop far away, only the release's notification can wake it.
    monkeypatch.setattr(_semaphore, "BACKSTOP_INTERVAL", 60.0)
    listening = _tell_listening(monkeypatch)
    holder_conn, waiter_conn = await connect(), await connect()
    delays: list[float] = []
    for _ in range(3):
        got = anyio.Event()
        released_at: list[float] = []
        listening.clear()

        async def wait_for_slot(got: anyio.Event, released_at: list[float]) -> None:
            async with aiopglock.semaphore("wake", 1, db=waiter_conn) as slot:
                delays.append(time.monotonic() - released_at[0])
                assert slot.slot == 0
                assert await holders(admin, slot_key("wake", 0)) == [waiter_conn.get_server_pid()]
                got.set()

        async with anyio.create_task_group() as tg:
            holding = aiopglock.semaphore("wake", 1, db=holder_conn)
            await holding.__aenter__()
            tg.start_soon(wait_for_slot, got, released_at)
            await _wait_waiting(admin, waiter_conn.get_server_pid(), listening)
            released_at.append(time.monotonic())
            await holding.__aexit__(None, None, None)
            with anyio.fail_after(5):
                await got.wait()
    print(f"\n[semaphore] wake-up delays (release -> waiter holds): {delays}")
    assert max(delays) < 5
    # The waiter's LISTEN was undone on the caller's connection.
    assert await waiter_conn.fetch("SELECT pg_listening_channels()") == []


def _tell_listening(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that gets an item each time a waiter has started LISTENing."""
    listening: list[int] = []
    start = _semaphore._Listening.start

    async def start_and_tell(self: Any) -> None:
        await start(self)
        listening.append(1)

    monkeypatch.setattr(_semaphore._Listening, "start", start_and_tell)
    return listening


async def test_dead_holder_is_noticed_by_the_backstop(
    connect: Connect, admin: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_semaphore, "BACKSTOP_INTERVAL", 0.5)
    listening = _tell_listening(monkeypatch)
    holder_conn, waiter_conn = await connect(), await connect()
    held = anyio.Event()
    outcome: list[BaseException] = []

    async def hold() -> None:
        try:
            async with aiopglock.semaphore("dead", 1, db=holder_conn) as slot:
                assert slot
                held.set()
                await anyio.sleep_forever()
        except aiopglock.LockLost as exc:
            outcome.append(exc)

    waiter_got = anyio.Event()

    async def wait() -> None:
        async with aiopglock.semaphore("dead", 1, db=waiter_conn, timeout=10) as slot:
            assert slot
            assert await holders(admin, slot_key("dead", 0)) == [waiter_conn.get_server_pid()]
            waiter_got.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold)
        await held.wait()
        tg.start_soon(wait)
        await _wait_waiting(admin, waiter_conn.get_server_pid(), listening)
        await admin.execute("SELECT pg_terminate_backend($1)", holder_conn.get_server_pid())
        start = time.monotonic()
        with anyio.fail_after(_semaphore.BACKSTOP_INTERVAL + 5):
            await waiter_got.wait()
        delay = time.monotonic() - start
        print(f"\n[semaphore] dead holder -> waiter holds: {delay:.3f} s")
    assert len(outcome) == 1 and "lost" in str(outcome[0])
    assert await slot_holders(admin, "dead", 1) == {}
    assert await waiter_conn.fetch("SELECT pg_listening_channels()") == []


async def test_lost_slot_without_cancel_raises_at_exit(
    connect: Connect, admin: asyncpg.Connection
) -> None:
    conn = await connect()
    with pytest.raises(aiopglock.LockLost):
        async with aiopglock.semaphore("lost", 2, db=conn, cancel_on_lost=False) as slot:
            await admin.execute("SELECT pg_terminate_backend($1)", slot.pid)
            await wait_until(lambda: anyio.to_thread.run_sync(lambda: slot.lost or None))
            assert slot.lost
            assert "lost" in repr(slot)


# --------------------------------------------------------------------------- cancellation


@pytest.mark.parametrize("how", ["anyio", "asyncio.timeout"])
@pytest.mark.parametrize("on", ["pool", "connection"])
async def test_cancellation_storm_leaves_no_slot_held(
    on: str,
    how: str,
    pool: asyncpg.Pool,
    connect: Connect,
    admin: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    listening = _tell_listening(monkeypatch)
    held: list[int] = []
    name, limit = f"storm-{on}-{how}", 2
    conns = [await connect() for _ in range(4)] if on == "connection" else []
    rng = random.Random(12)

    async def one(i: int) -> None:
        db: Any = pool if on == "pool" else conns[i % len(conns)]
        delay = rng.uniform(0, 0.05)

        async def body() -> None:
            async with aiopglock.semaphore(name, limit, db=db) as slot:
                if slot:
                    held.append(1)
                    await anyio.sleep(rng.uniform(0, 0.03))

        if how == "anyio":  # a cancel scope
            with anyio.move_on_after(delay):
                await body()
        else:  # a raw Task.cancel(), which a shield does not stop
            try:
                async with asyncio.timeout(delay):
                    await body()
            except TimeoutError:
                pass

    for _ in range(15):
        async with anyio.create_task_group() as tg:
            for i in range(4 if on == "connection" else 6):
                tg.start_soon(one, i)
    # The storm reached both the holders' blocks and the waiters' LISTEN.
    assert held and listening
    assert await slot_holders(admin, name, limit) == {}
    assert _semaphore._own == {}
    if on == "pool":
        assert await idle_pool(pool)
    for conn in conns:
        assert await conn.fetch("SELECT pg_listening_channels()") == []
    # The slots are free: the semaphore is usable at once.
    async with aiopglock.semaphore(name, limit, db=pool, timeout=0) as slot:
        assert slot


# --------------------------------------------------------------------------- decorator, fixture


async def test_decorator(pool: asyncpg.Pool, admin: asyncpg.Connection) -> None:
    @aiopglock.semaphore("deco", 1, db=pool)
    async def work(x: int) -> list[int]:
        held = await slot_holders(admin, "deco", 1)
        return [x, len(held)]

    @aiopglock.semaphore("deco", 1, db=pool, timeout=0, side_effect=aiopglock.Skip)
    async def skipped() -> str:
        return "ran"

    @aiopglock.semaphore("deco", 1, db=pool, timeout=0)
    async def raising() -> str:
        return "ran"

    assert await work(7) == [7, 1]
    assert work.__name__ == "work"
    async with aiopglock.semaphore("deco", 1, db=pool):
        assert await skipped() is None
        with pytest.raises(aiopglock.LockNotAcquired):
            await raising()
    assert await skipped() == "ran"
    assert await slot_holders(admin, "deco", 1) == {}


@pytest.fixture
async def slot_held(pool: asyncpg.Pool) -> AsyncIterator[aiopglock.SemaphoreSlot]:
    async with aiopglock.semaphore("fixture", 1, db=pool) as slot:
        yield slot


async def test_from_a_fixture(
    slot_held: aiopglock.SemaphoreSlot, pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    assert slot_held and slot_held.slot == 0
    assert await holders(admin, slot_key("fixture", 0)) == [slot_held.pid]
    async with aiopglock.semaphore("fixture", 1, db=pool, timeout=0) as other:
        assert not other


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((1, 2), {}, TypeError, "name"),
        (("", 2), {}, ValueError, "name"),
        (("\ud800", 2), {}, ValueError, "name"),
        (("n", True), {}, TypeError, "limit"),
        (("n", 2.0), {}, TypeError, "limit"),
        (("n", 0), {}, ValueError, "limit"),
        (("n", 10_001), {}, ValueError, "limit"),
        (("n", 2), {"timeout": -1}, ValueError, "timeout"),
        (("n", 2), {"timeout": "1"}, TypeError, "timeout"),
        (("n", 2), {"side_effect": "raise"}, ValueError, "side_effect"),
        (("n", 2), {"cancel_on_lost": 1}, TypeError, "cancel_on_lost"),
        (("n", 2), {"db": 42}, TypeError, "db"),
    ],
)
def test_bad_input_before_any_sql(
    args: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        aiopglock.semaphore(*args, **kwargs)


async def test_skip_with_async_with_and_return_on_a_decorator(pool: asyncpg.Pool) -> None:
    with pytest.raises(ValueError, match="side_effect"):
        async with aiopglock.semaphore("n", 1, db=pool, side_effect=aiopglock.Skip):
            pass
    with pytest.raises(ValueError, match="side_effect"):
        aiopglock.semaphore("n", 1, side_effect=aiopglock.Return)(test_decorator)
    assert await idle_pool(pool)


def test_channel_is_a_valid_identifier() -> None:
    name = channel("x" * 1000)
    assert len(name) < 64 and name.isidentifier()


# --------------------------------------------------------------------------- refused targets


async def test_a_transaction_pooler_is_refused(
    pgbouncer: PgBouncer, admin: asyncpg.Connection
) -> None:
    pool = await asyncpg.create_pool(
        pgbouncer.dsn("transaction"), statement_cache_size=0, min_size=1, max_size=2
    )
    try:
        for timeout in (None, 0):
            with pytest.raises(aiopglock.UsageError, match="pooler"):
                async with aiopglock.semaphore("pooled", 2, db=pool, timeout=timeout):
                    pytest.fail("the block ran behind a transaction-mode pooler")
        assert await slot_holders(admin, "pooled", 2) == {}
        assert await idle_pool(pool)
    finally:
        await pool.close()


async def test_a_hot_standby_is_refused(replica_pair: ReplicaPair) -> None:
    conn = await asyncpg.connect(replica_pair.standby_dsn)
    try:
        with pytest.raises(aiopglock.UsageError, match="hot standby"):
            async with aiopglock.semaphore("replica", 2, db=conn):
                pytest.fail("the block ran on a hot standby")
        locks = await conn.fetch("SELECT 1 FROM pg_locks WHERE locktype = 'advisory'")
        assert locks == []
        assert await conn.fetch("SELECT pg_listening_channels()") == []
    finally:
        await conn.close()


async def test_fence_tokens_grow_with_every_slot_grant(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    """fence=True: each grant's token is greater than every earlier one, on any
    slot; a stale holder's guarded write is refused; without it, None."""
    name = f"fence-{uuid.uuid4().hex}"
    fences: list[int] = []
    for _ in range(3):
        async with (
            aiopglock.semaphore(name, 2, db=pool, fence=True) as a,
            aiopglock.semaphore(name, 2, db=pool, fence=True) as b,
        ):
            assert a and b and a.slot != b.slot
            assert a.fence is not None and b.fence is not None
            fences += [a.fence, b.fence]
    assert fences == sorted(fences) and len(set(fences)) == len(fences)
    async with aiopglock.semaphore(name, 2, db=pool) as plain:
        assert plain and plain.fence is None
    with pytest.raises(TypeError, match="fence"):
        aiopglock.semaphore(name, 2, db=pool, fence="yes")  # type: ignore[arg-type]
    # The stale-holder pattern: the guarded row only takes a newer token.
    await admin.execute("CREATE TEMP TABLE guarded (fence bigint)")
    await admin.execute("INSERT INTO guarded VALUES ($1)", fences[-1])
    assert (
        await admin.execute("UPDATE guarded SET fence = $1 WHERE fence < $1", fences[0])
        == "UPDATE 0"
    )
    async with aiopglock.semaphore(name, 2, db=pool, fence=True) as newer:
        assert newer.fence is not None and newer.fence > fences[-1]
        assert (
            await admin.execute("UPDATE guarded SET fence = $1 WHERE fence < $1", newer.fence)
            == "UPDATE 1"
        )
