"""``aiopglock.Leader``: leader election on the real server.

Leadership is checked on the server (``pg_locks``: who holds the key, who
waits), never inferred from return values alone: exactly one leader across
OS processes (intervals recorded with the server's clock), failover when the
leader's backend is terminated, release on return, error and cancellation,
and a Leader started in one task and stopped from another.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

import aiopglock
from tests._helpers import (
    AdvisoryKey,
    Connect,
    PgServer,
    advisory_locks,
    holders,
    wait_for_release,
    wait_for_waiter,
    wait_until,
)
from tests.conftest import PgBouncer
from tests.test_fence import PROCESSES, log_from_processes


def new_key() -> str:
    return f"tests.test_leader:{uuid.uuid4().hex}"


def ident(key: str) -> AdvisoryKey:
    return aiopglock.advisory_key(key)


def idle(pool: asyncpg.Pool) -> bool:
    return pool.get_idle_size() == pool.get_size()


async def forever() -> None:
    await asyncio.Event().wait()


def no_task_left() -> None:
    """Nothing of a stopped Leader runs on: no task but the test's own."""
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []


# --------------------------------------------------------------------------- arguments


async def test_bad_arguments_are_refused_before_any_sql(pool: asyncpg.Pool) -> None:
    bad: Any = 1.5
    bad_interval: Any = "1"
    with pytest.raises(TypeError, match="key"):
        aiopglock.Leader(bad, db=pool)
    with pytest.raises(TypeError, match="db"):
        aiopglock.Leader("k", db=bad)
    with pytest.raises(TypeError, match="retry_interval"):
        aiopglock.Leader("k", db=pool, retry_interval=bad_interval)
    with pytest.raises(ValueError, match="retry_interval"):
        aiopglock.Leader("k", db=pool, retry_interval=-1)
    with pytest.raises(ValueError, match="retry_interval"):
        aiopglock.Leader("k", db=pool, retry_interval=float("nan"))
    leader = aiopglock.Leader("k", db=pool)
    with pytest.raises(TypeError, match="fn"):
        await leader.run(bad)
    assert leader.term == 0 and not leader.is_leader and leader.fence is None
    assert idle(pool)
    assert repr(leader).startswith("<Leader key=") and "follower term=0" in repr(leader)


# --------------------------------------------------------------------------- one term


async def test_returning_ends_run_and_releases(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    key = new_key()
    leader = aiopglock.Leader(key, db=pool)

    async def fn(x: int) -> int:
        assert leader.is_leader and leader.term == 1
        assert isinstance(leader.fence, int)
        assert len(await holders(admin, ident(key))) == 1
        assert "leader fence=" in repr(leader)
        return x * 2

    assert await leader.run(fn, 21) == 42
    assert not leader.is_leader and leader.fence is None and leader.term == 1
    await wait_for_release(admin, ident(key))
    assert idle(pool)


async def test_on_a_locker(pool: asyncpg.Pool, admin: asyncpg.Connection) -> None:
    key = new_key()
    async with aiopglock.Locker(pool) as locker:
        leader = aiopglock.Leader(key, db=locker)

        async def fn() -> int | None:
            assert len(await holders(admin, ident(key))) == 1
            return leader.fence

        fence = await leader.run(fn)
        assert isinstance(fence, int) and leader.term == 1
    await wait_for_release(admin, ident(key))
    assert idle(pool)


async def test_an_inner_lock_lost_propagates(
    pool: asyncpg.Pool, connect: Connect, admin: asyncpg.Connection
) -> None:
    """A LockLost of another lock fn holds is fn's error, not a lost term."""
    key, inner = new_key(), new_key()
    conn = await connect()
    leader = aiopglock.Leader(key, db=pool, retry_interval=0)

    async def fn() -> None:
        async with aiopglock.advisory(inner, db=conn) as lock:
            await admin.execute("SELECT pg_terminate_backend($1)", lock.pid)
            await forever()  # cancelled once the inner lock is lost

    with pytest.raises(aiopglock.LockLost, match="was lost"):
        await asyncio.wait_for(leader.run(fn), 10)
    assert leader.term == 1 and not leader.is_leader
    await wait_for_release(admin, ident(key))
    assert idle(pool)


async def test_raising_propagates_and_releases(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    key = new_key()
    leader = aiopglock.Leader(key, db=pool)

    async def fn() -> None:
        raise OSError("boom")  # even an error that looks like a connection failure

    with pytest.raises(OSError, match="boom"):
        await leader.run(fn)
    assert leader.term == 1 and not leader.is_leader
    await wait_for_release(admin, ident(key))
    assert idle(pool)


async def test_one_run_at_a_time(pool: asyncpg.Pool) -> None:
    leader = aiopglock.Leader(new_key(), db=pool)
    running = asyncio.Event()

    async def fn() -> None:
        running.set()
        await forever()

    task = asyncio.ensure_future(leader.run(fn))
    try:
        await asyncio.wait_for(running.wait(), 10)
        with pytest.raises(aiopglock.UsageError, match="already running"):
            await leader.run(fn)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_second_leader_waits_on_the_server(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    key = new_key()
    first, second = aiopglock.Leader(key, db=pool), aiopglock.Leader(key, db=pool)
    done = asyncio.Event()

    async def fn() -> str:
        await done.wait()
        return "done"

    one = asyncio.ensure_future(first.run(fn))
    await wait_until(lambda: holders(admin, ident(key)))
    two = asyncio.ensure_future(second.run(fn))
    await wait_for_waiter(admin, ident(key))  # a server-side wait, no polling
    assert first.is_leader and not second.is_leader
    done.set()
    assert await asyncio.wait_for(one, 10) == "done"
    assert await asyncio.wait_for(two, 10) == "done"
    assert (first.term, second.term) == (1, 1)
    await wait_for_release(admin, ident(key))


# --------------------------------------------------------------------------- failover


async def test_failover_when_the_leaders_backend_is_terminated(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    key = new_key()
    a = aiopglock.Leader(key, db=pool, retry_interval=0.05)
    b = aiopglock.Leader(key, db=pool, retry_interval=0.05)
    a_fences: list[int | None] = []
    b_fences: list[int | None] = []
    a_cancelled = asyncio.Event()
    b_leads = asyncio.Event()

    async def lead_a() -> None:
        a_fences.append(a.fence)
        try:
            await forever()
        except asyncio.CancelledError:
            a_cancelled.set()
            raise

    async def lead_b() -> None:
        b_fences.append(b.fence)
        b_leads.set()
        await forever()

    task_a = asyncio.ensure_future(a.run(lead_a))
    pid_a = (await wait_until(lambda: holders(admin, ident(key))))[0]
    task_b = asyncio.ensure_future(b.run(lead_b))
    try:
        await wait_for_waiter(admin, ident(key))
        assert a.is_leader and a.term == 1 and not b.is_leader and b.term == 0
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid_a)
        await asyncio.wait_for(a_cancelled.wait(), 10)  # fn was cancelled
        await asyncio.wait_for(b_leads.wait(), 10)
        assert b.is_leader and b.term == 1 and not a.is_leader
        assert b_fences[0] is not None and a_fences[0] is not None
        assert b_fences[0] > a_fences[0]
        # A campaigns again (after retry_interval) and waits behind B.
        await wait_until(lambda: _waiter_other_than(admin, key, pid_a))
        assert a.term == 1 and not a.is_leader
        assert await holders(admin, ident(key)) != [pid_a]
    finally:
        for task in (task_a, task_b):
            task.cancel()
        await asyncio.gather(task_a, task_b, return_exceptions=True)
    await wait_for_release(admin, ident(key))
    assert await advisory_locks(admin, key=ident(key)) == []
    assert idle(pool)
    no_task_left()


async def _waiter_other_than(admin: asyncpg.Connection, key: str, pid: int) -> bool:
    rows = await advisory_locks(admin, key=ident(key), granted=False)
    return any(row["pid"] != pid for row in rows)


@pytest.mark.parametrize("signal", ["pg_terminate_backend", "pg_cancel_backend"])
async def test_a_campaign_whose_wait_is_interrupted_campaigns_again(
    pool: asyncpg.Pool, admin: asyncpg.Connection, signal: str
) -> None:
    key = new_key()
    holder = aiopglock.Leader(key, db=pool)
    follower = aiopglock.Leader(key, db=pool, retry_interval=0.01)
    done = asyncio.Event()

    async def fn() -> str:
        await done.wait()
        return "done"

    first = asyncio.ensure_future(holder.run(fn))
    await wait_until(lambda: holders(admin, ident(key)))
    second = asyncio.ensure_future(follower.run(fn))
    try:
        pid = await wait_for_waiter(admin, ident(key))
        waits = await _waits(admin, key)
        assert await admin.fetchval(f"SELECT {signal}($1)", pid)
        # A new wait (on a new backend after a termination), the same run() call.
        await wait_until(lambda: _new_wait(admin, key, waits))
        assert not second.done() and follower.term == 0
        done.set()
        assert await asyncio.wait_for(first, 10) == "done"
        assert await asyncio.wait_for(second, 10) == "done"
        assert follower.term == 1
    finally:
        first.cancel()
        second.cancel()
        await asyncio.gather(first, second, return_exceptions=True)
    await wait_for_release(admin, ident(key))
    assert idle(pool)


_WAITS = (
    "SELECT a.pid, a.query_start FROM pg_locks AS l JOIN pg_stat_activity AS a ON a.pid = l.pid "
    "WHERE l.locktype = 'advisory' AND NOT l.granted AND l.pid = ANY($1::int4[])"
)


async def _waits(admin: asyncpg.Connection, key: str) -> set[tuple[int, Any]]:
    """The waits for ``key``: (pid, start of the waiting statement)."""
    rows = await advisory_locks(admin, key=ident(key), granted=False)
    found = await admin.fetch(_WAITS, [row["pid"] for row in rows])
    return {(row["pid"], row["query_start"]) for row in found}


async def _new_wait(admin: asyncpg.Connection, key: str, old: set[tuple[int, Any]]) -> bool:
    return bool(await _waits(admin, key) - old)


# --------------------------------------------------------------------------- cancellation


async def test_cancellation_storm_leaves_no_lock(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    key = new_key()
    rng = random.Random(12)
    for _ in range(8):
        leaders = [aiopglock.Leader(key, db=pool, retry_interval=0) for _ in range(3)]

        async def fn() -> None:
            await asyncio.sleep(rng.random() * 0.01)
            await forever()

        tasks = [asyncio.ensure_future(leader.run(fn)) for leader in leaders]
        await asyncio.sleep(rng.random() * 0.02)  # cancel at an arbitrary point
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert all(task.cancelled() for task in tasks)
        assert not any(leader.is_leader for leader in leaders)
        assert sum(leader.term for leader in leaders) <= 1
    await wait_for_release(admin, ident(key))
    assert await advisory_locks(admin, key=ident(key)) == []
    assert idle(pool)
    no_task_left()


@pytest.fixture
async def running_leader(pool: asyncpg.Pool) -> AsyncIterator[aiopglock.Leader]:
    """A Leader started in the fixture's setup task, stopped in its teardown task."""
    leader = aiopglock.Leader(new_key(), db=pool)
    task = asyncio.ensure_future(leader.run(forever))
    yield leader
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not leader.is_leader
    assert idle(pool)
    no_task_left()


async def test_started_and_stopped_in_fixture_tasks(
    running_leader: aiopglock.Leader, pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    await wait_until(lambda: _is_leader(running_leader))
    assert len(await holders(admin, running_leader.key)) == 1


async def _is_leader(leader: aiopglock.Leader) -> bool:
    return leader.is_leader


async def test_behind_a_transaction_pooler_is_refused(
    pgbouncer: PgBouncer, connect: Connect, admin: asyncpg.Connection
) -> None:
    conn = await connect(dsn=pgbouncer.dsn("transaction"), statement_cache_size=0)
    key = new_key()
    leader = aiopglock.Leader(key, db=conn)
    with pytest.raises(aiopglock.UsageError, match="xact=True"):
        await leader.run(forever)
    assert leader.term == 0
    assert await advisory_locks(admin, key=ident(key)) == []


# --------------------------------------------------------------------------- processes

TERMS = 4


async def _campaign(dsn: str, key: str, table: str, terms: int) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        leader = aiopglock.Leader(key, db=pool, retry_interval=0)

        async def term() -> None:
            # The server's clock, at both ends of the term, inside it.
            row = await pool.fetchval(
                f"INSERT INTO {table} (pid, started) VALUES ($1, clock_timestamp()) RETURNING seq",
                os.getpid(),
            )
            await asyncio.sleep(0.02)
            await pool.execute(f"UPDATE {table} SET ended = clock_timestamp() WHERE seq = $1", row)

        for _ in range(terms):
            await asyncio.wait_for(leader.run(term), 60)
    finally:
        await pool.close()


def leader_worker(dsn: str, key: str, table: str, terms: int) -> None:
    """Child process: win ``terms`` terms of ``key``, logging each term's interval."""
    asyncio.run(_campaign(dsn, key, table, terms))


async def test_exactly_one_leader_across_processes(
    pg_server: PgServer, admin: asyncpg.Connection
) -> None:
    columns = "pid int NOT NULL, started timestamptz NOT NULL, ended timestamptz"
    rows = await log_from_processes(pg_server, admin, columns, leader_worker, TERMS)
    rows.sort(key=lambda row: row["started"])
    assert len(rows) == PROCESSES * TERMS
    assert len({row["pid"] for row in rows}) == PROCESSES
    assert all(row["ended"] is not None for row in rows)
    # No two terms overlap: each ends before the next one starts.
    overlaps = [(a, b) for a, b in itertools.pairwise(rows) if a["ended"] > b["started"]]
    assert overlaps == []


# --------------------------------------------------------------------------- hostile findings


async def test_a_session_lock_timeout_never_makes_a_second_leader(
    pg_server: PgServer, admin: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """A lock_timeout set for the session (here the pool's server_settings)
    ends the follower's wait without the lock: a failed campaign, never a term."""
    caplog.set_level("INFO", logger="aiopglock")
    pool = await asyncpg.create_pool(
        pg_server.dsn, min_size=1, max_size=4, server_settings={"lock_timeout": "20ms"}
    )
    key = new_key()
    a = aiopglock.Leader(key, db=pool, retry_interval=0.01)
    b = aiopglock.Leader(key, db=pool, retry_interval=0.01)
    b_ran = asyncio.Event()

    async def lead_b() -> None:
        b_ran.set()

    task_a = asyncio.ensure_future(a.run(forever))
    try:
        await wait_until(lambda: holders(admin, ident(key)))
        task_b = asyncio.ensure_future(b.run(lead_b))

        async def three_failed_campaigns() -> bool:
            return sum("without the lock" in r.getMessage() for r in caplog.records) >= 3

        await wait_until(three_failed_campaigns)
        assert not b_ran.is_set() and not b.is_leader and b.term == 0 and b.fence is None
        assert a.is_leader and len(await holders(admin, ident(key))) == 1
        # Once A steps down, B wins a real term.
        task_a.cancel()
        await asyncio.gather(task_a, return_exceptions=True)
        await asyncio.wait_for(task_b, 10)
        assert b_ran.is_set() and b.term == 1
    finally:
        task_a.cancel()
        await asyncio.gather(task_a, return_exceptions=True)
        await pool.close()
    assert await advisory_locks(admin, key=ident(key)) == []


@pytest.mark.parametrize("ending", ["return", "raise"])
async def test_fn_that_ends_as_its_term_is_lost_is_not_run_again(
    pool: asyncpg.Pool, admin: asyncpg.Connection, ending: str
) -> None:
    """fn terminates its own backend and ends at once: its outcome stands,
    though the loss is noticed at the exit of the term."""
    key = new_key()
    leader = aiopglock.Leader(key, db=pool, retry_interval=0.01)
    calls = 0

    terminations: list[asyncio.Task[Any]] = []

    async def job() -> str:
        nonlocal calls
        calls += 1
        pids = await holders(admin, ident(key))
        # The backend is terminated as fn ends: the loss is noticed during
        # the term's exit (or after it), never while fn runs.
        terminations.append(
            asyncio.create_task(admin.execute("SELECT pg_terminate_backend($1)", pids[0]))
        )
        if ending == "raise":
            raise ValueError("job failed")
        return f"call {calls}"

    if ending == "raise":
        with pytest.raises(ValueError, match="job failed"):
            await leader.run(job)
    else:
        assert await leader.run(job) == "call 1"
    await asyncio.gather(*terminations)
    assert calls == 1 and leader.term == 1 and not leader.is_leader
    await wait_for_release(admin, ident(key))
    await wait_until(lambda: _idle_async(pool))


async def _idle_async(pool: asyncpg.Pool) -> bool:
    return idle(pool)
