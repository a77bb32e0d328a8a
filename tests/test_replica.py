"""Locks on a real hot standby (the ``replica_pair`` fixture: an embedded
primary and a streaming standby made with ``pg_basebackup -R``).

PostgreSQL grants advisory locks, and ``LOCK TABLE`` up to ROW EXCLUSIVE, on
a standby, and they exclude nothing on the primary. aiopglock refuses every
lock there with ``UsageError`` before sending it: ``pg_locks`` on the standby
shows nothing of the caller's, a pool has every connection back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

import aiopglock
from tests._helpers import wait_until
from tests._relations import quote, unique_name
from tests.conftest import ReplicaPair

STANDBY = r"hot standby"


@pytest.fixture
async def standby(replica_pair: ReplicaPair) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(replica_pair.standby_dsn)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def standby_pool(replica_pair: ReplicaPair) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(replica_pair.standby_dsn, min_size=1, max_size=2)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def replicated_table(replica_pair: ReplicaPair) -> AsyncIterator[str]:
    """A table made on the primary, once the standby has replayed it."""
    name = unique_name("replicated")
    primary = await asyncpg.connect(replica_pair.primary_dsn)
    standby = await asyncpg.connect(replica_pair.standby_dsn)
    try:
        await primary.execute(f"CREATE TABLE {quote(name)} (id int PRIMARY KEY)")
        await primary.execute(f"INSERT INTO {quote(name)} VALUES (1)")
        lsn = await primary.fetchval("SELECT pg_current_wal_lsn()")
        await wait_until(
            lambda: standby.fetchval("SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn", lsn),
            message="the standby to replay the new table",
        )
        yield name
        await primary.execute(f"DROP TABLE {quote(name)}")
    finally:
        await standby.close()
        await primary.close()


_OUR_LOCKS = """
SELECT locktype, mode FROM pg_locks
WHERE pid = $1 AND locktype IN ('advisory', 'relation')
  AND relation IS DISTINCT FROM 'pg_locks'::regclass
"""


async def _our_locks(conn: asyncpg.Connection, pid: int) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(_OUR_LOCKS, pid)
    return rows


async def test_the_fixture_is_a_real_standby(
    standby: asyncpg.Connection, replica_pair: ReplicaPair
) -> None:
    assert await standby.fetchval("SELECT pg_is_in_recovery()") is True
    assert standby.get_settings().in_hot_standby == "on"
    # Left alone, PostgreSQL grants an advisory lock there: that is the trap.
    assert await standby.fetchval("SELECT pg_try_advisory_lock(42)") is True
    assert await standby.fetchval("SELECT pg_advisory_unlock(42)") is True


async def test_advisory_on_a_standby_connection_is_refused(
    standby: asyncpg.Connection, replica_pair: ReplicaPair
) -> None:
    pid = standby.get_server_pid()
    for timeout in (None, 0, 1):
        with pytest.raises(aiopglock.UsageError, match=STANDBY):
            async with aiopglock.advisory("replica", db=standby, timeout=timeout):
                pytest.fail("the block ran on a hot standby")
    async with standby.transaction():
        with pytest.raises(aiopglock.UsageError, match=STANDBY):
            async with aiopglock.advisory("replica", db=standby, xact=True):
                pytest.fail("the block ran on a hot standby")
        # The caller's transaction is untouched.
        assert await standby.fetchval("SELECT 1") == 1
    assert await _our_locks(standby, pid) == []


async def test_advisory_on_a_standby_pool_is_refused(standby_pool: asyncpg.Pool) -> None:
    with pytest.raises(aiopglock.UsageError, match=STANDBY):
        async with aiopglock.advisory("replica", db=standby_pool):
            pytest.fail("the block ran on a hot standby")

    @aiopglock.advisory("replica", db=standby_pool, timeout=0)
    async def job() -> None:
        pytest.fail("the job ran on a hot standby")

    with pytest.raises(aiopglock.UsageError, match=STANDBY):
        await job()
    assert standby_pool.get_idle_size() == standby_pool.get_size()
    locks = await standby_pool.fetch("SELECT 1 FROM pg_locks WHERE locktype = 'advisory'")
    assert locks == []


async def test_locker_on_a_standby_is_refused(standby_pool: asyncpg.Pool) -> None:
    with pytest.raises(aiopglock.UsageError, match=STANDBY):
        async with aiopglock.Locker(standby_pool) as locker, locker.advisory("replica"):
            pytest.fail("the block ran on a hot standby")
    assert standby_pool.get_idle_size() == standby_pool.get_size()


@pytest.mark.parametrize("mode", ["ACCESS SHARE", "ROW EXCLUSIVE", "ACCESS EXCLUSIVE"])
async def test_table_on_a_standby_is_refused(
    standby: asyncpg.Connection, standby_pool: asyncpg.Pool, replicated_table: str, mode: str
) -> None:
    # PostgreSQL itself grants the weak modes there and refuses the strong
    # ones with ReadOnlySQLTransactionError; aiopglock refuses all alike.
    for db in (standby, standby_pool):
        with pytest.raises(aiopglock.UsageError, match=STANDBY):
            async with aiopglock.table(replicated_table, db=db, mode=mode):
                pytest.fail("the block ran on a hot standby")
    assert not standby.is_in_transaction()
    assert await _our_locks(standby, standby.get_server_pid()) == []
    assert standby_pool.get_idle_size() == standby_pool.get_size()


async def test_rows_on_a_standby_are_refused(
    standby: asyncpg.Connection, standby_pool: asyncpg.Pool, replicated_table: str
) -> None:
    query = f"SELECT id FROM {quote(replicated_table)}"
    for db in (standby, standby_pool):
        with pytest.raises(aiopglock.UsageError, match=STANDBY):
            async with aiopglock.rows(query, db=db):
                pytest.fail("the block ran on a hot standby")
    assert not standby.is_in_transaction()
    assert standby_pool.get_idle_size() == standby_pool.get_size()


async def test_the_primary_is_not_refused(replica_pair: ReplicaPair) -> None:
    conn = await asyncpg.connect(replica_pair.primary_dsn)
    try:
        async with aiopglock.advisory("replica", db=conn) as lock:
            assert lock
            rows = await conn.fetch(
                "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
            )
            assert len(rows) == 1
    finally:
        await conn.close()
