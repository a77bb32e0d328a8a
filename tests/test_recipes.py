"""The recipes of docs/recipes.md, on the real server.

Update-or-create without duplicates: a table with a natural key and no unique
constraint, many workers each doing "SELECT ... FOR UPDATE; INSERT if nothing
was found, else UPDATE" for one key. ``FOR UPDATE`` locks rows that exist:
while the row does not, every worker finds nothing and inserts (a barrier puts
every worker past its SELECT before any inserts, so the duplicates are certain,
not a matter of luck). An ``xact=True`` advisory lock on the natural key, taken
first in the same transaction, closes the race: the first worker holds the key
until every other is seen waiting for it in ``pg_locks``, and still one row
results, counting every worker.

Whole-table rewrite: DELETE and INSERT of every row under ``table(...,
mode="EXCLUSIVE")`` in the transaction aiopglock opens. Readers (plain SELECT,
``ACCESS SHARE``) are served while the lock is held and always see the whole
table, old or new; a writer waits for the rewrite to commit.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import anyio.to_thread
import asyncpg
import pytest

import aiopglock
from tests._helpers import Connect, PgServer, holders, wait_until, waiters
from tests._relations import Tables, quote, relation_locks, unique_name
from tests.test_processes import CHILD_TIMEOUT, children

#: Concurrent update-or-creates of one key in one event loop (one connection each).
WORKERS = 8
#: The run across OS processes: PROCESSES processes of TASKS tasks each.
PROCESSES = 3
TASKS = 3
#: How long a worker waits for the others (barrier, pg_locks) before failing.
SYNC_TIMEOUT = 30.0

# --------------------------------------------------------------------------- update-or-create


def _statements(table: str) -> tuple[str, str, str]:
    name = quote(table)
    return (
        f"SELECT name, n FROM {name} WHERE name = $1",
        f"INSERT INTO {name} (name, n) VALUES ($1, 1)",
        f"UPDATE {name} SET n = n + 1 WHERE name = $1",
    )


async def upsert_rows_only(
    conn: asyncpg.Connection, table: str, name: str, all_selected: Callable[[], Awaitable[Any]]
) -> None:
    """``SELECT ... FOR UPDATE`` in aiopglock's transaction, then insert or update;
    ``all_selected()`` returns once every worker has run its SELECT."""
    select, insert, update = _statements(table)
    async with aiopglock.rows(select, name, db=conn) as found:
        await all_selected()
        await found.connection.execute(update if found.records else insert, name)


async def upsert_guarded(conn: asyncpg.Connection, table: str, name: str, workers: int) -> None:
    """The same, after an ``xact=True`` advisory lock on the natural key (the
    table's name and ``name``) in the same transaction. The worker that finds
    no row (the first one in) keeps the key until the ``workers - 1`` others
    are waiting for it: all of them are in the race window at once, as in the
    unguarded run."""
    select, insert, update = _statements(table)
    natural_key = f"{table}:{name}"
    key = aiopglock.advisory_key(natural_key)
    async with (
        conn.transaction(),
        aiopglock.advisory(natural_key, db=conn, xact=True, side_effect=aiopglock.Raise),
        aiopglock.rows(select, name, db=conn) as found,
    ):
        if not found.records:

            async def others_waiting() -> bool:
                return len(await waiters(conn, key)) == workers - 1

            await wait_until(others_waiting, timeout=SYNC_TIMEOUT)
        await conn.execute(update if found.records else insert, name)


@pytest.fixture
async def counters(tables: Tables) -> str:
    """A table whose natural key ``name`` has no unique constraint (nor an index)."""
    name = unique_name("recipe_counters")
    await tables.create(name, columns="name text NOT NULL, n int NOT NULL")
    return name


async def _rows_of(admin: asyncpg.Connection, table: str, name: str) -> list[int]:
    """The ``n`` of every row of ``name``."""
    rows = await admin.fetch(f"SELECT n FROM {quote(table)} WHERE name = $1 ORDER BY n", name)
    return [row["n"] for row in rows]


async def _sessions(connect: Connect, count: int) -> list[asyncpg.Connection]:
    return [await connect() for _ in range(count)]


def _rendezvous(parties: int) -> Callable[[], Awaitable[None]]:
    """``await arrive()`` returns once ``parties`` tasks have called it (a
    one-shot barrier: asyncio.Barrier is Python 3.11+)."""
    arrived = 0
    everyone = asyncio.Event()

    async def arrive() -> None:
        nonlocal arrived
        arrived += 1
        if arrived == parties:
            everyone.set()
        with anyio.fail_after(SYNC_TIMEOUT):
            await everyone.wait()

    return arrive


async def test_for_update_alone_creates_duplicates(
    connect: Connect, admin: asyncpg.Connection, counters: str
) -> None:
    conns = await _sessions(connect, WORKERS)
    all_selected = _rendezvous(WORKERS)
    async with anyio.create_task_group() as tg:
        for conn in conns:
            tg.start_soon(upsert_rows_only, conn, counters, "visits", all_selected)
    # Every worker found nothing to lock, so every worker inserted.
    assert await _rows_of(admin, counters, "visits") == [1] * WORKERS


async def test_advisory_on_the_natural_key_creates_one_row(
    connect: Connect, admin: asyncpg.Connection, counters: str
) -> None:
    conns = await _sessions(connect, WORKERS)
    async with anyio.create_task_group() as tg:
        for conn in conns:
            tg.start_soon(upsert_guarded, conn, counters, "visits", WORKERS)
    assert await _rows_of(admin, counters, "visits") == [WORKERS]
    assert await holders(admin, aiopglock.advisory_key(f"{counters}:visits")) == []


async def test_a_second_round_updates_the_row_it_finds(
    connect: Connect, admin: asyncpg.Connection, counters: str
) -> None:
    """Once the row exists, FOR UPDATE alone serialises the workers (the lock
    has a row to take): the duplicates are a first-insert race only."""
    await admin.execute(f"INSERT INTO {quote(counters)} (name, n) VALUES ('visits', 0)")
    conns = await _sessions(connect, WORKERS)

    async def nothing() -> None:
        await asyncio.sleep(0)

    async with anyio.create_task_group() as tg:
        for conn in conns:
            tg.start_soon(upsert_rows_only, conn, counters, "visits", nothing)
    assert await _rows_of(admin, counters, "visits") == [WORKERS]


# The same across OS processes (module level, so that spawn can import it).


async def _upsert_tasks(dsn: str, table: str, name: str, guarded: bool, barrier: Any) -> None:
    conns = [await asyncpg.connect(dsn) for _ in range(TASKS)]
    workers = PROCESSES * TASKS
    try:

        async def all_arrived() -> None:
            await anyio.to_thread.run_sync(barrier.wait, SYNC_TIMEOUT)

        async def one(conn: asyncpg.Connection) -> None:
            # Every worker of every process is connected before any starts.
            await all_arrived()
            if guarded:
                await upsert_guarded(conn, table, name, workers)
            else:
                await upsert_rows_only(conn, table, name, all_arrived)

        with anyio.fail_after(CHILD_TIMEOUT):
            async with anyio.create_task_group() as tg:
                for conn in conns:
                    tg.start_soon(one, conn)
    finally:
        for conn in conns:
            await conn.close()


def upsert_worker(dsn: str, table: str, name: str, guarded: bool, barrier: Any) -> None:
    """Child process: TASKS concurrent update-or-creates of ``name``."""
    asyncio.run(_upsert_tasks(dsn, table, name, guarded, barrier))


@pytest.mark.slow
@pytest.mark.parametrize("guarded", [False, True], ids=["rows-only", "advisory"])
async def test_update_or_create_across_processes(
    guarded: bool, pg_server: PgServer, admin: asyncpg.Connection, counters: str
) -> None:
    workers = PROCESSES * TASKS
    async with children() as kids:
        # One party per task: the start, then (unguarded) the SELECTs all done.
        barrier = kids.ctx.Barrier(workers)
        for _ in range(PROCESSES):
            kids.start(upsert_worker, pg_server.dsn, counters, "visits", guarded, barrier)
        await kids.join()
    found = await _rows_of(admin, counters, "visits")
    if guarded:
        assert found == [workers]
    else:
        assert len(found) > 1
        assert found == [1] * workers
    assert await holders(admin, aiopglock.advisory_key(f"{counters}:visits")) == []


# --------------------------------------------------------------------------- whole-table rewrite

ROWS = 50
REWRITES = 5
READERS = 3


@pytest.fixture
async def catalogue(tables: Tables, admin: asyncpg.Connection) -> tuple[str, int]:
    """``ROWS`` rows ``(id, version = 0)``: the table the rewrite replaces."""
    name = unique_name("recipe_catalogue")
    oid = await tables.create(name, columns="id int NOT NULL, version int NOT NULL")
    await _insert_all(admin, name, 0)
    return name, oid


async def _snapshot(conn: asyncpg.Connection, table: str) -> tuple[int, int, int]:
    row = await conn.fetchrow(
        f"SELECT count(*) AS n, min(version) AS lo, max(version) AS hi FROM {quote(table)}"
    )
    assert row is not None
    return row["n"], row["lo"], row["hi"]


async def _insert_all(conn: asyncpg.Connection, table: str, version: int) -> None:
    """The second half of a rewrite: ``ROWS`` rows of ``version``."""
    await conn.execute(
        f"INSERT INTO {quote(table)} SELECT g, $2 FROM generate_series(1, $1) AS g", ROWS, version
    )


@contextlib.asynccontextmanager
async def _rewriting(pool: asyncpg.Pool, table: str) -> AsyncIterator[Any]:
    """The rewrite's EXCLUSIVE lock, in aiopglock's transaction, with every
    row deleted: the block inserts the new ones before it commits."""
    async with aiopglock.table(table, db=pool, mode="EXCLUSIVE") as lock:
        await lock.connection.execute(f"DELETE FROM {quote(table)}")
        yield lock


async def test_readers_are_served_during_an_exclusive_rewrite(
    pool: asyncpg.Pool, connect: Connect, admin: asyncpg.Connection, catalogue: tuple[str, int]
) -> None:
    table, oid = catalogue
    reader = await connect()
    async with _rewriting(pool, table) as lock:
        # Half rewritten, uncommitted: a reader in a transaction of its own
        # takes ACCESS SHARE beside the EXCLUSIVE lock and sees the old table.
        async with reader.transaction():
            assert await _snapshot(reader, table) == (ROWS, 0, 0)
            # (The DELETE added a RowExclusiveLock, which EXCLUSIVE already covers.)
            assert sorted(await relation_locks(admin, oid)) == sorted(
                [
                    (lock.pid, "ExclusiveLock", True),
                    (lock.pid, "RowExclusiveLock", True),
                    (reader.get_server_pid(), "AccessShareLock", True),
                ]
            )
        await _insert_all(lock.connection, table, 1)
        assert await _snapshot(reader, table) == (ROWS, 0, 0)
    assert await _snapshot(reader, table) == (ROWS, 1, 1)
    assert await relation_locks(admin, oid) == []


async def test_a_writer_waits_for_the_rewrite(
    pool: asyncpg.Pool, connect: Connect, admin: asyncpg.Connection, catalogue: tuple[str, int]
) -> None:
    table, oid = catalogue
    writer = await connect()
    async with _rewriting(pool, table) as lock:
        update = asyncio.ensure_future(
            writer.execute(f"UPDATE {quote(table)} SET version = version + 10")
        )

        async def writer_waits() -> bool:
            return (writer.get_server_pid(), "RowExclusiveLock", False) in await relation_locks(
                admin, oid
            )

        await wait_until(writer_waits)
        await _insert_all(lock.connection, table, 1)
        assert not update.done()
    # The writer ran after the commit, on the new rows: none was lost or doubled.
    assert await update == f"UPDATE {ROWS}"
    assert await _snapshot(admin, table) == (ROWS, 11, 11)


async def test_readers_never_see_a_half_rewritten_table(
    pool: asyncpg.Pool, connect: Connect, admin: asyncpg.Connection, catalogue: tuple[str, int]
) -> None:
    """Readers loop on their own connections through several rewrites; each
    rewrite waits, between its DELETE and its INSERT and again before it
    commits, for every reader to finish a SELECT it started after that point."""
    table, oid = catalogue
    conns = await _sessions(connect, READERS)
    reads = [0] * READERS
    during = [0] * READERS
    progress = asyncio.Condition()
    stop = asyncio.Event()
    rewriting = False

    async def read(index: int) -> None:
        while not stop.is_set():
            held = rewriting
            count, lo, hi = await _snapshot(conns[index], table)
            assert count == ROWS and lo == hi, (count, lo, hi)
            async with progress:
                reads[index] += 1
                during[index] += held
                progress.notify_all()

    async def every_reader_reads_again() -> None:
        async with progress:
            seen = list(reads)
            await progress.wait_for(
                lambda: all(r >= s + 2 for r, s in zip(reads, seen, strict=True))
            )

    async with anyio.create_task_group() as tg:
        for index in range(READERS):
            tg.start_soon(read, index)
        for version in range(1, REWRITES + 1):
            async with _rewriting(pool, table) as lock:
                rewriting = True
                await every_reader_reads_again()
                await _insert_all(lock.connection, table, version)
                await every_reader_reads_again()
                assert (lock.pid, "ExclusiveLock", True) in await relation_locks(admin, oid)
                rewriting = False
            assert await _snapshot(admin, table) == (ROWS, version, version)
        stop.set()
    assert all(n >= 2 * REWRITES for n in during), during
    assert await relation_locks(admin, oid) == []
