"""``aiopglock.rows``: strengths, ``of=``, ``skip_locked``, timeouts, query checks.

Row locks live in the tuples, not in ``pg_locks``; which lock a row holds is
shown the way PostgreSQL defines it: by which competing ``SELECT ... FOR
<strength> NOWAIT`` from another session conflicts with it. Waits do show in
``pg_locks`` (``transactionid`` / ``tuple`` rows, not granted).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

import aiopglock
from tests._helpers import Connect, wait_until
from tests._relations import Tables, backend_state, quote, relation_locks, unique_name

STRENGTHS = list(aiopglock.RowLockStrength)

# PostgreSQL's row-lock conflict table: (held, requested) pairs that conflict.
CONFLICTS = {
    ("UPDATE", "UPDATE"),
    ("UPDATE", "NO KEY UPDATE"),
    ("UPDATE", "SHARE"),
    ("UPDATE", "KEY SHARE"),
    ("NO KEY UPDATE", "UPDATE"),
    ("NO KEY UPDATE", "NO KEY UPDATE"),
    ("NO KEY UPDATE", "SHARE"),
    ("SHARE", "UPDATE"),
    ("SHARE", "NO KEY UPDATE"),
    ("KEY SHARE", "UPDATE"),
}


@pytest.fixture
async def jobs(tables: Tables, admin: asyncpg.Connection) -> tuple[str, int]:
    """A job table of 20 rows, ids 1..20, none done."""
    name = unique_name("jobs")
    oid = await tables.create(name, columns="id int PRIMARY KEY, done bool NOT NULL DEFAULT false")
    await admin.execute(f"INSERT INTO {quote(name)} (id) SELECT generate_series(1, 20)")
    return name, oid


@pytest.fixture
async def other(connect: Connect, tables: Tables) -> AsyncIterator[asyncpg.Connection]:
    """Another session; closed before ``tables`` drops its tables."""
    conn: asyncpg.Connection = await connect()
    try:
        yield conn
    finally:
        await conn.close()


async def _probe(conn: asyncpg.Connection, sql: str, *args: Any) -> bool:
    """Whether ``sql`` (a ``... NOWAIT`` lock) gets its lock now; leaves nothing held."""
    async with conn.transaction():
        try:
            await conn.fetch(sql, *args)
        except asyncpg.LockNotAvailableError:
            return False
    return True


async def _waits(admin: asyncpg.Connection, pids: list[int] | None = None) -> list[Any]:
    """Lock waits (not granted) of the given backends, or of any but the admin."""
    return list(
        await admin.fetch(
            "SELECT pid, locktype, mode FROM pg_locks WHERE NOT granted "
            "AND pid <> pg_backend_pid() AND ($1::int4[] IS NULL OR pid = ANY($1::int4[]))",
            pids,
        )
    )


async def _pool_idle(pool: asyncpg.Pool) -> bool:
    return pool.get_idle_size() == pool.get_size()


# --------------------------------------------------------------------------- strengths


@pytest.mark.parametrize("strength", STRENGTHS, ids=lambda s: s.name)
async def test_each_strength_takes_its_row_lock(
    strength: aiopglock.RowLockStrength,
    pool: asyncpg.Pool,
    admin: asyncpg.Connection,
    other: asyncpg.Connection,
    jobs: tuple[str, int],
) -> None:
    name, oid = jobs
    spellings: list[Any] = [strength, strength.value.lower(), strength.value.replace(" ", "_")]
    for spelling in spellings:
        async with aiopglock.rows(
            f"SELECT id FROM {quote(name)} WHERE id = $1", 3, db=pool, strength=spelling
        ) as lock:
            assert lock and lock.strength is strength
            assert [r["id"] for r in lock] == [3]
            # The holder's table-level lock, as for any SELECT ... FOR.
            assert await relation_locks(admin, oid, pid=lock.pid) == [
                (lock.pid, "RowShareLock", True)
            ]
            for probe in STRENGTHS:
                got = await _probe(
                    other, f"SELECT id FROM {quote(name)} WHERE id = 3 FOR {probe.value} NOWAIT"
                )
                assert got == ((strength.value, probe.value) not in CONFLICTS), (spelling, probe)
            # Other rows are not locked.
            assert await _probe(
                other, f"SELECT id FROM {quote(name)} WHERE id = 4 FOR UPDATE NOWAIT"
            )
        assert await _probe(other, f"SELECT id FROM {quote(name)} WHERE id = 3 FOR UPDATE NOWAIT")


@pytest.mark.parametrize(
    "strength", ["", "update nowait", "FOR UPDATE", "exclusive", "no-key-update"]
)
def test_invalid_strength(strength: str) -> None:
    with pytest.raises(ValueError, match="strength"):
        aiopglock.rows("SELECT 1", strength=strength)


@pytest.mark.parametrize("strength", [None, 1, aiopglock.TableLockMode.SHARE])
def test_strength_of_wrong_type(strength: Any) -> None:
    with pytest.raises(TypeError, match="strength"):
        aiopglock.rows("SELECT 1", strength=strength)


# --------------------------------------------------------------------------- of=


async def test_of_locks_only_the_named_tables_and_is_quoted(
    pool: asyncpg.Pool,
    admin: asyncpg.Connection,
    other: asyncpg.Connection,
    tables: Tables,
) -> None:
    orders, customers = unique_name('ord"ers x'), unique_name("Customers;")
    await tables.create(orders, columns="id int PRIMARY KEY, customer int")
    await tables.create(customers)
    await admin.execute(f"INSERT INTO {quote(customers)} VALUES (1, 'ann')")
    await admin.execute(f"INSERT INTO {quote(orders)} VALUES (10, 1)")
    query = (
        f"SELECT o.id FROM {quote(orders)} AS {quote('O; x')} "
        f"JOIN {quote(customers)} AS c ON c.id = {quote('O; x')}.customer"
    ).replace("o.id", f"{quote('O; x')}.id")
    order_row = f"SELECT 1 FROM {quote(orders)} WHERE id = 10 FOR UPDATE NOWAIT"
    customer_row = f"SELECT 1 FROM {quote(customers)} WHERE id = 1 FOR UPDATE NOWAIT"

    async with aiopglock.rows(query, db=pool, of="O; x") as lock:
        assert len(lock) == 1
        assert not await _probe(other, order_row)
        assert await _probe(other, customer_row)
    async with aiopglock.rows(query, db=pool, of=["c"]) as lock:
        assert await _probe(other, order_row)
        assert not await _probe(other, customer_row)
    async with aiopglock.rows(query, db=pool, of=[("O; x",), "c"]) as lock:
        assert not await _probe(other, order_row)
        assert not await _probe(other, customer_row)
    async with aiopglock.rows(query, db=pool) as lock:  # no of=: every table
        assert not await _probe(other, order_row)
        assert not await _probe(other, customer_row)
    await wait_until(lambda: _pool_idle(pool))


async def test_of_injection_never_runs(
    pool: asyncpg.Pool, admin: asyncpg.Connection, jobs: tuple[str, int], tables: Tables
) -> None:
    name, _ = jobs
    victim = unique_name("victim")
    await tables.create(victim)
    for evil in [f"t; DROP TABLE {victim}; --", f'x"; DROP TABLE {quote(victim)}; --']:
        # Quoted, the name is just a table that is not in the FROM clause.
        with pytest.raises(asyncpg.PostgresError, match=r"FOR UPDATE|not found|missing"):
            async with aiopglock.rows(f"SELECT id FROM {quote(name)} AS t", db=pool, of=evil):
                pytest.fail("locked with a bogus of=")
    assert await admin.fetchval("SELECT to_regclass($1)", quote(victim)) is not None
    await wait_until(lambda: _pool_idle(pool))


@pytest.mark.parametrize(
    ("of", "error"),
    [
        ("public.t", ValueError),
        (("public", "t"), ValueError),
        ([], ValueError),
        ("", ValueError),
        (1, TypeError),
        ([1], TypeError),
        (b"t", TypeError),
    ],
)
def test_bad_of(of: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="of"):
        aiopglock.rows("SELECT 1", of=of)


# --------------------------------------------------------------------------- skip_locked


async def test_skip_locked_job_queue(
    pg_server: Any, admin: asyncpg.Connection, jobs: tuple[str, int]
) -> None:
    """Four workers on separate connections claim jobs at the same time: each
    gets different rows, none waits, and together they finish the queue."""
    name, _ = jobs
    workers = 4
    pool = await asyncpg.create_pool(pg_server.dsn, min_size=workers, max_size=workers)
    try:
        claim = aiopglock.rows(
            f"SELECT id FROM {quote(name)} WHERE NOT done ORDER BY id LIMIT 3",
            db=pool,
            skip_locked=True,
        )
        holding: list[asyncio.Event] = [asyncio.Event() for _ in range(workers)]
        go = asyncio.Event()
        claimed: dict[int, list[int]] = {}

        async def worker(n: int) -> None:
            async with claim as lock:
                claimed[n] = [row["id"] for row in lock]
                holding[n].set()
                await go.wait()
                await lock.connection.execute(
                    f"UPDATE {quote(name)} SET done = true WHERE id = ANY($1::int[])", claimed[n]
                )

        # One at a time into their claims, so each one's claim runs while the
        # others hold theirs; then all hold at once.
        tasks = []
        for n in range(workers):
            tasks.append(asyncio.create_task(worker(n)))
            await holding[n].wait()
        pids = [
            row["pid"]
            for row in await admin.fetch(
                "SELECT pid FROM pg_stat_activity WHERE state = 'idle in transaction' "
                "AND query LIKE '%SKIP LOCKED'"
            )
        ]
        assert len(pids) == workers
        assert await _waits(admin, pids) == []
        ids = [i for n in range(workers) for i in claimed[n]]
        assert len(ids) == 12 and len(set(ids)) == 12, claimed
        assert all(len(c) == 3 for c in claimed.values())
        go.set()
        await asyncio.gather(*tasks)
        assert await admin.fetchval(f"SELECT count(*) FROM {quote(name)} WHERE done") == 12

        # Concurrently, without choreography: 20 jobs, 4 workers, batches of 3.
        done_by: dict[int, int] = {}

        async def drain(n: int) -> None:
            while True:
                async with claim as lock:
                    if not lock.records:
                        return
                    for row in lock:
                        assert row["id"] not in done_by
                        done_by[row["id"]] = n
                    await lock.connection.execute(
                        f"UPDATE {quote(name)} SET done = true WHERE id = ANY($1::int[])",
                        [row["id"] for row in lock],
                    )

        await asyncio.gather(*(drain(n) for n in range(workers)))
        assert sorted(done_by) == list(range(13, 21))
        assert await admin.fetchval(f"SELECT count(*) FROM {quote(name)} WHERE NOT done") == 0
    finally:
        await pool.close()


async def test_skip_locked_skips_rows_another_session_holds(
    pool: asyncpg.Pool, admin: asyncpg.Connection, other: asyncpg.Connection, jobs: tuple[str, int]
) -> None:
    name, _ = jobs
    await other.execute("BEGIN")
    await other.fetch(f"SELECT id FROM {quote(name)} WHERE id <= 19 FOR UPDATE")
    async with aiopglock.rows(
        f"SELECT id FROM {quote(name)} ORDER BY id", db=pool, skip_locked=True
    ) as lock:
        assert [r["id"] for r in lock] == [20]
        assert await _waits(admin) == []
    await other.execute("COMMIT")
    async with aiopglock.rows(
        f"SELECT id FROM {quote(name)} WHERE id = 1", db=pool, skip_locked=True
    ) as lock:
        assert lock and [r["id"] for r in lock] == [1]


def test_skip_locked_with_nowait_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="skip_locked"):
        aiopglock.rows("SELECT 1", skip_locked=True, timeout=0)
    with pytest.raises(TypeError, match="skip_locked"):
        aiopglock.rows("SELECT 1", skip_locked=1)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- timeouts


async def test_timeout_zero_is_nowait(
    pool: asyncpg.Pool, admin: asyncpg.Connection, other: asyncpg.Connection, jobs: tuple[str, int]
) -> None:
    name, _ = jobs
    await other.execute("BEGIN")
    await other.fetch(f"SELECT id FROM {quote(name)} WHERE id = 1 FOR KEY SHARE")
    query = f"SELECT id FROM {quote(name)} WHERE id = 1"
    started = time.monotonic()
    async with aiopglock.rows(query, db=pool, timeout=0) as lock:
        assert not lock and lock.records == [] and lock.connection is None
    async with aiopglock.rows(query, db=pool, timeout=0, strength="share") as lock:
        assert lock  # SHARE does not conflict with KEY SHARE
    with pytest.raises(aiopglock.LockNotAcquired, match="UPDATE"):
        async with aiopglock.rows(query, db=pool, timeout=0, side_effect=aiopglock.Raise):
            pytest.fail("locked a busy row")
    assert time.monotonic() - started < 2
    assert await _waits(admin) == []
    await wait_until(lambda: _pool_idle(pool))


async def test_timeout_waits_at_most_on_the_server(
    connect: Connect, admin: asyncpg.Connection, other: asyncpg.Connection, jobs: tuple[str, int]
) -> None:
    name, _ = jobs
    await other.execute("BEGIN")
    await other.fetch(f"SELECT id FROM {quote(name)} WHERE id = 1 FOR UPDATE")
    conn = await connect()
    await conn.execute("SET lock_timeout = '8s'")
    seen: list[Any] = []

    async def watch() -> None:
        seen.extend(await wait_until(lambda: _waits(admin, [conn.get_server_pid()])))

    watcher = asyncio.create_task(watch())
    started = time.monotonic()
    async with aiopglock.rows(
        f"SELECT id FROM {quote(name)} WHERE id = 1", db=conn, timeout=0.3
    ) as lock:
        waited = time.monotonic() - started
        assert not lock
    await watcher
    assert 0.25 <= waited < 5, waited
    assert seen and seen[0]["locktype"] in ("transactionid", "tuple")
    assert await _waits(admin) == []
    assert not conn.is_in_transaction()
    assert await conn.fetchval("SHOW lock_timeout") == "8s"


# --------------------------------------------------------------------------- records, transactions


async def test_handle_yields_records(pool: asyncpg.Pool, jobs: tuple[str, int]) -> None:
    name, _ = jobs
    async with aiopglock.rows(
        f"SELECT id, done FROM {quote(name)} WHERE id BETWEEN $1 AND $2 ORDER BY id", 2, 4, db=pool
    ) as lock:
        assert lock.records == list(lock)
        assert len(lock) == 3
        assert lock[0]["id"] == 2 and lock[-1]["id"] == 4
        assert [tuple(r) for r in lock] == [(2, False), (3, False), (4, False)]
        assert "FOR UPDATE" in repr(lock) and "3 rows" in repr(lock)
    async with aiopglock.rows(f"SELECT id FROM {quote(name)} WHERE false", db=pool) as lock:
        assert lock and len(lock) == 0  # acquired: the statement succeeded


@pytest.mark.parametrize("db_kind", ["pool", "connection"])
async def test_commit_and_rollback(
    db_kind: str,
    pool: asyncpg.Pool,
    connect: Connect,
    admin: asyncpg.Connection,
    jobs: tuple[str, int],
) -> None:
    name, oid = jobs
    db: Any = pool if db_kind == "pool" else await connect()
    query = f"SELECT id FROM {quote(name)} WHERE id = $1"
    async with aiopglock.rows(query, 1, db=db) as lock:
        assert lock.owns_transaction
        await lock.connection.execute(f"UPDATE {quote(name)} SET done = true WHERE id = 1")
        assert await backend_state(admin, lock.pid) == "idle in transaction"
    assert await admin.fetchval(f"SELECT done FROM {quote(name)} WHERE id = 1") is True
    with pytest.raises(KeyError):
        async with aiopglock.rows(query, 2, db=db) as lock:
            await lock.connection.execute(f"UPDATE {quote(name)} SET done = true WHERE id = 2")
            raise KeyError("boom")
    assert await admin.fetchval(f"SELECT done FROM {quote(name)} WHERE id = 2") is False
    assert await relation_locks(admin, oid) == []
    if db_kind == "pool":
        await wait_until(lambda: _pool_idle(pool))
    else:
        assert not db.is_in_transaction()


async def test_inside_a_callers_transaction(
    connect: Connect, other: asyncpg.Connection, jobs: tuple[str, int]
) -> None:
    name, _ = jobs
    conn = await connect()
    row1 = f"SELECT 1 FROM {quote(name)} WHERE id = 1 FOR UPDATE NOWAIT"
    async with conn.transaction():
        async with aiopglock.rows(f"SELECT id FROM {quote(name)} WHERE id = 1", db=conn) as lock:
            assert lock and not lock.owns_transaction and lock.connection is conn
        # Held until the caller's transaction ends.
        assert not await _probe(other, row1)
        # A failed NOWAIT leaves the transaction usable.
        await other.execute("BEGIN")
        await other.fetch(f"SELECT id FROM {quote(name)} WHERE id = 2 FOR UPDATE")
        async with aiopglock.rows(
            f"SELECT id FROM {quote(name)} WHERE id = 2", db=conn, timeout=0
        ) as lock:
            assert not lock
        await other.execute("ROLLBACK")
        assert await conn.fetchval("SELECT count(*) FROM " + quote(name)) == 20
        assert conn.is_in_transaction()
    assert await _probe(other, row1)


# --------------------------------------------------------------------------- the query check


@pytest.mark.parametrize(
    ("query", "match"),
    [
        ("", "empty"),
        ("  -- nothing\n", "empty"),
        (";", "empty"),
        ("SELECT 1 FROM t FOR UPDATE", "locking clause"),
        ("select * from t for no key update skip locked", "locking clause"),
        ("SELECT * FROM t FOR SHARE", "locking clause"),
        ("SELECT * FROM t FOR KEY SHARE NOWAIT", "locking clause"),
        ("SELECT * FROM t FOR READ ONLY", "locking clause"),
        ("SELECT * FROM (SELECT * FROM t FOR UPDATE) AS s", "locking clause"),
        ("SELECT 1; SELECT 2", "several statements"),
        ("SELECT 1; DROP TABLE victim", "several statements"),
        ("SELECT 1;;", "several statements"),
        ("SELECT ';'; DELETE FROM t", "several statements"),
        ("SELECT 1 -- a comment ends at a carriage return\r; DROP TABLE victim", "several"),
        ("SELECT 1 -- comment\rFOR UPDATE", "locking clause"),
        ("SELECT 1 /* a */ ; /* b */ SELECT 2", "several statements"),
        ("UPDATE t SET x = 1", "SELECT"),
        ("DELETE FROM t RETURNING *", "SELECT"),
        ("INSERT INTO t VALUES (1)", "SELECT"),
        ("VALUES (1)", "SELECT"),
        ("TABLE t", "SELECT"),
        ("(SELECT 1)", "SELECT"),
        ("DROP TABLE t", "SELECT"),
        ("WITH x AS (SELECT 1) DELETE FROM t", "SELECT"),
        ("WITH x AS (SELECT 1)", "WITH"),
        ("SELECT * INTO new_t FROM t", "INTO"),
        ("SELECT 'unterminated", "unterminated"),
        ('SELECT "unterminated', "unterminated"),
        ("SELECT 1 /* open comment", "unterminated"),
        ("SELECT $x$ open", "unterminated"),
        ("SELECT (1", "parenthes"),
        ("SELECT 1)", "parenthes"),
    ],
)
def test_query_validation(query: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        aiopglock.rows(query)


@pytest.mark.parametrize("query", [None, b"SELECT 1", 1])
def test_query_of_wrong_type(query: Any) -> None:
    with pytest.raises(TypeError, match="query"):
        aiopglock.rows(query)


async def test_invalid_query_sends_nothing(
    connect: Connect, admin: asyncpg.Connection, tables: Tables
) -> None:
    victim = unique_name("victim")
    await tables.create(victim)
    conn = await connect()
    await conn.close()  # anything sent would be an InterfaceError
    with pytest.raises(ValueError):
        aiopglock.rows(f"SELECT 1; DROP TABLE {quote(victim)}", db=conn)
    assert await admin.fetchval("SELECT to_regclass($1)", quote(victim)) is not None


@pytest.mark.parametrize(
    "template",
    [
        "SELECT id, 'FOR SHARE' AS s FROM {t} WHERE id = 5",
        "SELECT id FROM {t} WHERE id = 5 -- FOR UPDATE",
        "SELECT id FROM {t} /* FOR UPDATE; DROP TABLE x; */ WHERE id = 5",
        "SELECT id FROM {t} /* nested /* FOR SHARE */ still comment */ WHERE id = 5",
        "SELECT id, $$FOR UPDATE; $$ AS s FROM {t} WHERE id = 5",
        "SELECT id, $q$ it's FOR SHARE $q$ AS s FROM {t} WHERE id = 5",
        "SELECT id, E'it\\'s; FOR UPDATE' AS s FROM {t} WHERE id = 5",
        "SELECT id, 'it''s; FOR UPDATE' AS s FROM {t} WHERE id = 5",
        'SELECT id, id AS "for update;" FROM {t} WHERE id = 5',
        "SELECT id FROM {t} WHERE id = 5;",
        "SELECT id FROM {t} WHERE id = 5 ; -- trailing",
        "  select id from {t} where id = 5 limit 1",
        "WITH five AS (SELECT 5 AS n) SELECT id FROM {t}, five WHERE id = five.n",
        "WITH RECURSIVE five (n) AS MATERIALIZED (SELECT 5) SELECT id FROM {t} JOIN five ON id = n",
        "SELECT id FROM {t} WHERE id = 5 AND substring('abc' for 1) = 'a'",
        "SELECT id FROM {t} WHERE id = 5 -- comment to the end\r\n",
        "SELECT id FROM {t}\tWHERE\fid = 5 AND 1.5e3 > .5 AND 'x' = U&'x'",
    ],
)
async def test_valid_queries_lock(
    template: str, pool: asyncpg.Pool, other: asyncpg.Connection, jobs: tuple[str, int]
) -> None:
    name, _ = jobs
    query = template.format(t=quote(name))
    async with aiopglock.rows(query, db=pool) as lock:
        assert [r["id"] for r in lock] == [5]
        assert not await _probe(
            other, f"SELECT 1 FROM {quote(name)} WHERE id = 5 FOR KEY SHARE NOWAIT"
        )
