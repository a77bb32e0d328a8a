"""Locks behind a real PgBouncer (the ``pgbouncer`` fixture), on the real server.

- A session-level lock through a transaction-mode pooler would be taken on
  whichever backend serves the statement: it is refused with ``UsageError``
  naming ``xact=True``, before anything is held (``pg_locks`` on the server
  behind the pooler shows nothing, the pool has every connection back).
- ``configure(session_pooler=True)`` declares a session-mode pooler: there
  session locks work and exclude.
- ``xact=True`` on a Connection in a transaction, ``table()`` and ``rows()``
  exclude through the transaction-mode pooler.
- On a direct connection the check costs one query per physical connection,
  never one per lock.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import asyncpg
import pytest

import aiopglock
from aiopglock import _server
from tests._helpers import Connect, advisory_locks, holders
from tests._relations import Tables, unique_name
from tests.conftest import PgBouncer

TASKS = 8
ROUNDS = 6


def _key() -> int:
    return random.randint(1, 2**62)


class Exclusion:
    """Counts the tasks inside a critical section; remembers the most at once."""

    def __init__(self) -> None:
        self.inside = 0
        self.most = 0
        self.entries = 0

    async def visit(self) -> None:
        self.inside += 1
        self.entries += 1
        self.most = max(self.most, self.inside)
        try:
            # Widen the window in which a second holder would show.
            await anyio.sleep(0.002)
        finally:
            self.inside -= 1


async def _run_tasks(n: int, body: Callable[[], Awaitable[None]]) -> None:
    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(body)


@pytest.fixture
async def bouncer_pool(pgbouncer: PgBouncer) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """``await bouncer_pool(mode)``: an asyncpg pool through the pooler, closed at teardown."""
    made: list[asyncpg.Pool] = []

    async def factory(mode: str = "transaction", **kw: Any) -> asyncpg.Pool:
        kw.setdefault("min_size", 1)
        kw.setdefault("max_size", TASKS)
        pool = await asyncpg.create_pool(pgbouncer.dsn(mode), statement_cache_size=0, **kw)
        made.append(pool)
        return pool

    try:
        yield factory
    finally:
        for pool in made:
            with anyio.fail_after(10):
                await pool.close()


@pytest.fixture
def session_pooler() -> AsyncIterator[None]:
    aiopglock.configure(session_pooler=True)
    try:
        yield
    finally:
        aiopglock.configure(session_pooler=False)


def _all_idle(pool: asyncpg.Pool) -> bool:
    return pool.get_idle_size() == pool.get_size()


# --------------------------------------------------------------------------- refused


async def test_session_lock_through_a_transaction_pooler_is_refused(
    bouncer_pool: Callable[..., Awaitable[Any]], admin: asyncpg.Connection
) -> None:
    pool = await bouncer_pool("transaction")
    key = _key()
    for timeout in (None, 0, 2):
        with pytest.raises(aiopglock.UsageError, match=r"xact=True") as info:
            async with aiopglock.advisory(key, db=pool, timeout=timeout):
                pytest.fail("the block ran behind a transaction-mode pooler")
        assert "pooler" in str(info.value)
        assert await advisory_locks(admin, key=key) == []
        assert _all_idle(pool)
    # The decorator and a Connection of the pool are refused alike.

    @aiopglock.advisory(key, db=pool)
    async def job() -> None:
        pytest.fail("the job ran behind a transaction-mode pooler")

    with pytest.raises(aiopglock.UsageError, match=r"xact=True"):
        await job()
    async with pool.acquire() as conn:
        with pytest.raises(aiopglock.UsageError, match=r"xact=True"):
            async with aiopglock.advisory(key, db=conn, shared=True):
                pytest.fail("the block ran behind a transaction-mode pooler")
    assert await advisory_locks(admin, key=key) == []
    assert _all_idle(pool)


async def test_session_lock_on_a_direct_connection_through_a_pooler_is_refused(
    pgbouncer: PgBouncer, connect: Connect, admin: asyncpg.Connection
) -> None:
    conn = await connect(dsn=pgbouncer.dsn("transaction"), statement_cache_size=0)
    key = _key()
    with pytest.raises(aiopglock.UsageError, match=r"xact=True"):
        async with aiopglock.advisory(key, db=conn):
            pytest.fail("the block ran behind a transaction-mode pooler")
    assert await advisory_locks(admin, key=key) == []
    # Still usable: nothing was half done on it.
    assert await conn.fetchval("SELECT 1") == 1


async def test_locker_through_a_transaction_pooler_is_refused(
    bouncer_pool: Callable[..., Awaitable[Any]], admin: asyncpg.Connection
) -> None:
    pool = await bouncer_pool("transaction")
    key = _key()
    with pytest.raises(aiopglock.UsageError, match=r"xact=True"):
        async with aiopglock.Locker(pool) as locker, locker.advisory(key):
            pytest.fail("the block ran behind a transaction-mode pooler")
    assert await advisory_locks(admin, key=key) == []
    assert _all_idle(pool)


async def test_a_session_mode_pooler_is_refused_until_declared(
    bouncer_pool: Callable[..., Awaitable[Any]], admin: asyncpg.Connection
) -> None:
    # The client cannot tell the pool modes apart: the switch says which.
    pool = await bouncer_pool("session")
    key = _key()
    with pytest.raises(aiopglock.UsageError, match=r"session_pooler=True"):
        async with aiopglock.advisory(key, db=pool):
            pytest.fail("the block ran behind an undeclared pooler")
    assert await advisory_locks(admin, key=key) == []


def test_session_pooler_switch_is_validated() -> None:
    for bad in (1, "yes", None):
        with pytest.raises(TypeError, match="session_pooler"):
            aiopglock.configure(session_pooler=bad)
    from aiopglock._db import session_pooler

    assert session_pooler() is False


# --------------------------------------------------------------------------- works


@pytest.mark.usefixtures("session_pooler")
async def test_declared_session_pooler_locks_and_excludes(
    bouncer_pool: Callable[..., Awaitable[Any]], admin: asyncpg.Connection
) -> None:
    pool = await bouncer_pool("session")
    key = _key()
    seen = Exclusion()
    held_pids: set[int] = set()

    async def worker() -> None:
        for _ in range(ROUNDS):
            async with aiopglock.advisory(key, db=pool) as lock:
                assert lock
                pids = await holders(admin, key)
                assert len(pids) == 1, pids
                held_pids.update(pids)
                await seen.visit()

    await _run_tasks(TASKS, worker)
    assert seen.most == 1
    assert seen.entries == TASKS * ROUNDS
    assert held_pids  # the server saw every hold
    assert await advisory_locks(admin, key=key) == []


async def test_xact_lock_on_a_connection_excludes_through_a_transaction_pooler(
    pgbouncer: PgBouncer, connect: Connect, admin: asyncpg.Connection
) -> None:
    key = _key()
    seen = Exclusion()

    async def worker() -> None:
        conn = await connect(dsn=pgbouncer.dsn("transaction"), statement_cache_size=0)
        for _ in range(ROUNDS):
            async with (
                conn.transaction(),
                aiopglock.advisory(key, db=conn, xact=True) as lock,
            ):
                assert lock
                assert len(await holders(admin, key)) == 1
                await seen.visit()

    await _run_tasks(TASKS, worker)
    assert seen.most == 1
    assert seen.entries == TASKS * ROUNDS
    assert await advisory_locks(admin, key=key) == []


async def test_table_excludes_through_a_transaction_pooler(
    bouncer_pool: Callable[..., Awaitable[Any]], tables: Tables
) -> None:
    pool = await bouncer_pool("transaction")
    name = unique_name("bounced")
    await tables.create(name)
    seen = Exclusion()

    async def worker() -> None:
        for _ in range(ROUNDS):
            async with aiopglock.table(name, db=pool, mode="EXCLUSIVE") as lock:
                assert lock
                await seen.visit()

    await _run_tasks(TASKS, worker)
    assert seen.most == 1
    assert seen.entries == TASKS * ROUNDS
    assert _all_idle(pool)


async def test_rows_exclude_through_a_transaction_pooler(
    bouncer_pool: Callable[..., Awaitable[Any]], tables: Tables
) -> None:
    pool = await bouncer_pool("transaction")
    name = unique_name("bounced_rows")
    await tables.create(name)
    await tables.admin.execute(f'INSERT INTO "{name}" (id, v) VALUES (1, $1)', "0")
    seen = Exclusion()

    async def worker() -> None:
        for _ in range(ROUNDS):
            async with aiopglock.rows(f'SELECT id, v FROM "{name}" WHERE id = 1', db=pool) as lock:
                assert lock
                (row,) = list(lock)
                await seen.visit()
                # A read-modify-write that only exclusion keeps exact.
                await lock.connection.execute(
                    f'UPDATE "{name}" SET v = $1 WHERE id = 1', str(int(row["v"]) + 1)
                )

    await _run_tasks(TASKS, worker)
    assert seen.most == 1
    assert await tables.admin.fetchval(f'SELECT v FROM "{name}" WHERE id = 1') == str(
        TASKS * ROUNDS
    )
    assert _all_idle(pool)


# --------------------------------------------------------------------------- cost


async def test_direct_connection_is_asked_once_not_per_lock(
    connect: Connect, admin: asyncpg.Connection
) -> None:
    conn = await connect()
    sent: list[str] = []
    conn.add_query_logger(lambda record: sent.append(record.query))
    key = _key()
    for _ in range(5):
        async with aiopglock.advisory(key, db=conn) as lock:
            assert lock
            assert await holders(admin, key) == [conn.get_server_pid()]
    assert sent.count(_server.PROBE) == 1
    # A transaction-level lock needs no question at all on PostgreSQL 14+.
    sent.clear()
    other = await connect()
    other.add_query_logger(lambda record: sent.append(record.query))
    async with other.transaction(), aiopglock.advisory(key, db=other, xact=True) as lock:
        assert lock
    assert sent.count(_server.PROBE) == 0
