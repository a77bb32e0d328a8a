"""``fence=True``: fencing tokens on advisory locks, against the real server.

A fence is the xid the lock statement assigns after the grant. The claims
checked here: every fence is greater than any xid issued before the grant
(read from another session just before), fences of one key grow strictly
across sessions and processes, a resource guarded by ``WHERE fence <
$token`` refuses a holder that lost its lock, and without ``fence=True``
nothing extra happens (no xid is assigned).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest

import aiopglock
from tests._helpers import (
    Connect,
    PgServer,
    holders,
    wait_for_release,
    wait_for_waiter,
    wait_until,
)
from tests.test_processes import children

DB_FORMS = ("pool", "connection", "callable", "locker")
TIMEOUTS = (None, 0, 5.0)

XID = "SELECT pg_current_xact_id()::text::int8"


def new_key() -> str:
    return f"tests.test_fence:{uuid.uuid4().hex}"


@pytest.fixture
async def guarded(admin: asyncpg.Connection) -> AsyncIterator[str]:
    """A table whose one row is guarded by a fence (named per test run)."""
    table = f'"aiopglock_fence_{os.getpid()}_{uuid.uuid4().hex[:8]}"'
    await admin.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, fence int8, value text)")
    await admin.execute(f"INSERT INTO {table} VALUES (1, 0, 'initial')")
    try:
        yield table
    finally:
        await admin.execute(f"DROP TABLE IF EXISTS {table}")


def guarded_write(table: str) -> str:
    """The fencing pattern: a write that only a fence newer than the last one passes."""
    return f"UPDATE {table} SET fence = $1, value = $2 WHERE id = 1 AND fence < $1"


async def resolve_db(form: str, pool: asyncpg.Pool, connect: Connect) -> tuple[Any, Any]:
    """``db=`` in the given form, and a Locker to close (or None)."""
    if form == "pool":
        return pool, None
    if form == "connection":
        return await connect(), None
    if form == "callable":
        return (lambda: pool), None
    locker = aiopglock.Locker(pool)
    return locker, locker


@pytest.mark.parametrize("timeout", TIMEOUTS)
@pytest.mark.parametrize("xact", [False, True], ids=["session", "xact"])
@pytest.mark.parametrize("shared", [False, True], ids=["exclusive", "shared"])
@pytest.mark.parametrize("form", DB_FORMS)
async def test_fence_with_every_form(
    pool: asyncpg.Pool,
    connect: Connect,
    admin: asyncpg.Connection,
    form: str,
    shared: bool,
    xact: bool,
    timeout: float | None,
) -> None:
    db, locker = await resolve_db(form, pool, connect)
    key = new_key()
    fences = []
    try:
        for _ in range(2):
            before = await admin.fetchval(XID)
            options: dict[str, Any] = {"shared": shared, "xact": xact, "timeout": timeout}
            if locker is not None and fences:  # the second round through Locker.advisory
                spec: Any = locker.advisory(key, fence=True, **options)
            else:
                spec = aiopglock.advisory(key, db=db, fence=True, **options)
            async with spec as lock:
                assert lock
                assert isinstance(lock.fence, int)
                assert lock.fence > before
                assert await holders(admin, aiopglock.advisory_key(key)) == [lock.pid]
                fences.append(lock.fence)
            after = await admin.fetchval(XID)
            assert lock.fence < after
            await wait_for_release(admin, aiopglock.advisory_key(key))
    finally:
        if locker is not None:
            await locker.aclose()
    assert fences[0] < fences[1]


async def test_without_fence_nothing_is_sent(connect: Connect) -> None:
    conn = await connect()
    key = new_key()
    async with conn.transaction():
        async with aiopglock.advisory(key, db=conn, xact=True) as lock:
            assert lock and lock.fence is None
        # The lock statement assigned no xid.
        assert await conn.fetchval("SELECT pg_current_xact_id_if_assigned()") is None


@pytest.mark.parametrize("timeout", TIMEOUTS)
@pytest.mark.parametrize("xact", [False, True], ids=["session", "xact"])
async def test_in_a_callers_transaction_the_fence_is_its_xid(
    connect: Connect, admin: asyncpg.Connection, xact: bool, timeout: float | None
) -> None:
    conn = await connect()
    key = new_key()
    async with conn.transaction():
        before = await admin.fetchval(XID)
        async with aiopglock.advisory(key, db=conn, xact=xact, timeout=timeout, fence=True) as lock:
            assert lock and lock.fence is not None and lock.fence > before
            assert lock.fence == await conn.fetchval(XID)
            assert await conn.fetchval("SHOW lock_timeout") == "0"  # given back
        assert await holders(admin, aiopglock.advisory_key(key)) == ([lock.pid] if xact else [])
    await wait_for_release(admin, aiopglock.advisory_key(key))


async def test_fenced_in_a_transaction_that_has_written_is_refused(
    connect: Connect, admin: asyncpg.Connection
) -> None:
    conn = await connect()
    key = new_key()
    for xact in (True, False):
        async with conn.transaction():
            await conn.fetchval(XID)  # the transaction's first write would do the same
            with pytest.raises(aiopglock.UsageError, match="before the transaction's first write"):
                async with aiopglock.advisory(key, db=conn, xact=xact, fence=True):
                    pytest.fail("entered")
            assert await holders(admin, aiopglock.advisory_key(key)) == []
            assert await conn.fetchval("SELECT 1") == 1  # the transaction stays usable


async def test_not_acquired_has_no_fence(
    pool: asyncpg.Pool, connect: Connect, admin: asyncpg.Connection
) -> None:
    key = new_key()
    other = await connect()
    # Held by another session (a plain lock taken directly, not by this task).
    await other.execute("SELECT pg_advisory_lock($1)", aiopglock.advisory_key(key))
    pid = other.get_server_pid()
    for timeout in (0, 0.2):
        async with aiopglock.advisory(key, db=pool, timeout=timeout, fence=True) as lock:
            assert not lock
            assert lock.fence is None
    assert await holders(admin, aiopglock.advisory_key(key)) == [pid]


async def test_nested_hold_shares_the_outer_fence(pool: asyncpg.Pool) -> None:
    key = new_key()
    async with (
        aiopglock.advisory(key, db=pool, fence=True) as outer,
        aiopglock.advisory(key, db=pool, fence=True) as inner,
    ):
        assert inner.fence == outer.fence is not None
    async with aiopglock.advisory(key, db=pool):
        with pytest.raises(aiopglock.UsageError, match="without fence=True"):
            async with aiopglock.advisory(key, db=pool, fence=True):
                pytest.fail("entered")
    async with aiopglock.Locker(pool) as locker, locker.advisory(key):
        with pytest.raises(aiopglock.UsageError, match="without fence=True"):
            async with locker.advisory(key, fence=True):
                pytest.fail("entered")


async def test_a_refused_nested_xact_fence_gives_its_connection_back(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    """xact=True with fence=True nested in an unfenced session hold: refused
    in aiopglock's own transaction path, with nothing of its own left open
    or leased (the outer hold alone is in use, and the key stays its)."""
    key = new_key()
    async with aiopglock.advisory(key, db=pool) as outer:
        for _ in range(3):
            with pytest.raises(aiopglock.UsageError, match="without fence=True"):
                async with aiopglock.advisory(key, db=pool, xact=True, fence=True):
                    pytest.fail("entered")
        assert pool.get_size() - pool.get_idle_size() == 1  # the outer hold's
        assert await holders(admin, aiopglock.advisory_key(key)) == [outer.pid]
    assert await holders(admin, aiopglock.advisory_key(key)) == []


async def test_fence_must_be_a_bool(pool: asyncpg.Pool) -> None:
    bad: Any = "yes"
    with pytest.raises(TypeError, match="fence"):
        aiopglock.advisory("k", db=pool, fence=bad)
    async with aiopglock.Locker(pool) as locker:
        with pytest.raises(TypeError, match="fence"):
            locker.advisory("k", fence=bad)


async def test_shared_holders_get_distinct_fences(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    key = new_key()
    release = asyncio.Event()
    fences: list[int | None] = []

    async def hold() -> None:
        async with aiopglock.advisory(key, db=pool, shared=True, fence=True) as lock:
            fences.append(lock.fence)
            await release.wait()

    tasks = [asyncio.ensure_future(hold()) for _ in range(2)]
    try:
        await wait_until(lambda: _count(holders(admin, aiopglock.advisory_key(key)), 2))
        assert len(set(fences)) == 2 and None not in fences
    finally:
        release.set()
        await asyncio.gather(*tasks)
    await wait_for_release(admin, aiopglock.advisory_key(key))


async def _count(pids: Awaitable[list[int]], n: int) -> bool:
    return len(await pids) == n


async def test_stale_holder_is_refused(
    pool: asyncpg.Pool, connect: Connect, admin: asyncpg.Connection, guarded: str
) -> None:
    """A holder whose backend is terminated while it sleeps writes after a new
    holder took over: the guarded write refuses it."""
    key = new_key()
    resource = await connect()  # the guarded store, reached on a connection of its own
    write = guarded_write(guarded)
    resume = asyncio.Event()
    stale_fence: list[int] = []
    late: list[str] = []
    wrote = asyncio.Event()

    async def stale_holder() -> None:
        # cancel_on_lost=False: a holder paused (GC, swapped out) that does not
        # know yet that it lost the lock.
        with pytest.raises(aiopglock.LockLost):
            async with aiopglock.advisory(key, db=pool, fence=True, cancel_on_lost=False) as lock:
                assert lock.fence is not None
                stale_fence.append(lock.fence)
                assert (
                    await resource.execute(write, lock.fence, "stale holder, first") == "UPDATE 1"
                )
                wrote.set()
                await resume.wait()
                late.append(await resource.execute(write, lock.fence, "stale holder, late"))

    task = asyncio.ensure_future(stale_holder())
    ident = aiopglock.advisory_key(key)
    try:
        await asyncio.wait_for(wrote.wait(), 10)
        pids = await holders(admin, ident)
        waiting = asyncio.ensure_future(_take_over(pool, key, write))
        await wait_for_waiter(admin, ident)
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pids[0])
        new_fence = await asyncio.wait_for(waiting, 10)
        assert new_fence > stale_fence[0]
        resume.set()
        await asyncio.wait_for(task, 10)
        assert late == ["UPDATE 0"]  # refused
    finally:
        resume.set()
        task.cancel()
    row = await admin.fetchrow(f"SELECT fence, value FROM {guarded} WHERE id = 1")
    assert (row["fence"], row["value"]) == (new_fence, "new holder")


async def _take_over(pool: asyncpg.Pool, key: str, write: str) -> int:
    async with aiopglock.advisory(key, db=pool, fence=True) as lock:
        assert lock.fence is not None
        assert await pool.execute(write, lock.fence, "new holder") == "UPDATE 1"
        return lock.fence


# --------------------------------------------------------------------------- processes

ROUNDS = 15
PROCESSES = 3


async def _fence_rounds(dsn: str, key: str, table: str, rounds: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for _ in range(rounds):
            async with aiopglock.advisory(key, db=conn, fence=True) as lock:
                # Under the lock, so the serial order is the order of the grants.
                await conn.execute(f"INSERT INTO {table} (fence) VALUES ($1)", lock.fence)
    finally:
        await conn.close()


def fence_worker(dsn: str, key: str, table: str, rounds: int) -> None:
    """Child process: take ``key`` with a fence ``rounds`` times, logging each fence."""
    asyncio.run(_fence_rounds(dsn, key, table, rounds))


async def log_from_processes(
    pg_server: PgServer,
    admin: asyncpg.Connection,
    columns: str,
    worker: Callable[..., None],
    *args: Any,
    processes: int = PROCESSES,
) -> list[asyncpg.Record]:
    """``processes`` children run ``worker(dsn, key, table, *args)`` on one new
    key, logging into a table of ``columns`` (with a serial ``seq``) made for
    them; returns its rows in ``seq`` order (the table is dropped)."""
    table = f'"aiopglock_log_{os.getpid()}_{uuid.uuid4().hex[:8]}"'
    await admin.execute(f"CREATE TABLE {table} (seq serial PRIMARY KEY, {columns})")
    key = new_key()
    try:
        async with children() as kids:
            for _ in range(processes):
                kids.start(worker, pg_server.dsn, key, table, *args)
            await kids.join()
        rows: list[asyncpg.Record] = await admin.fetch(f"SELECT * FROM {table} ORDER BY seq")
    finally:
        await admin.execute(f"DROP TABLE IF EXISTS {table}")
    assert await holders(admin, aiopglock.advisory_key(key)) == []
    return rows


async def test_fences_grow_across_processes(pg_server: PgServer, admin: asyncpg.Connection) -> None:
    rows = await log_from_processes(pg_server, admin, "fence int8 NOT NULL", fence_worker, ROUNDS)
    fences = [row["fence"] for row in rows]
    assert len(fences) == PROCESSES * ROUNDS
    assert all(a < b for a, b in itertools.pairwise(fences)), fences


async def test_a_read_only_session_gets_fences(connect: Connect, admin: asyncpg.Connection) -> None:
    """A read-only transaction may still be assigned an xid: the fence works there."""
    conn = await connect(server_settings={"default_transaction_read_only": "on"})
    key = new_key()
    for timeout in TIMEOUTS:
        before = await admin.fetchval(XID)
        async with aiopglock.advisory(key, db=conn, timeout=timeout, fence=True) as lock:
            assert lock and lock.fence is not None and lock.fence > before
            assert await holders(admin, aiopglock.advisory_key(key)) == [lock.pid]
        assert await holders(admin, aiopglock.advisory_key(key)) == []
