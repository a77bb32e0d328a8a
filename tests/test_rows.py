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
        aiopglock.rows("SELECT 1 FROM t", strength=strength)


@pytest.mark.parametrize("strength", [None, 1, aiopglock.TableLockMode.SHARE])
def test_strength_of_wrong_type(strength: Any) -> None:
    with pytest.raises(TypeError, match="strength"):
        aiopglock.rows("SELECT 1 FROM t", strength=strength)


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
        aiopglock.rows("SELECT 1 FROM t", of=of)


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
        aiopglock.rows("SELECT 1 FROM t", skip_locked=True, timeout=0)
    with pytest.raises(TypeError, match="skip_locked"):
        aiopglock.rows("SELECT 1 FROM t", skip_locked=1)  # type: ignore[arg-type]


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
        ("SELECT 1 FROM t FOR NO KEY UPDATE OF t", "locking clause"),
        ("SELECT 1 FROM t LIMIT 1 FOR UPDATE", "locking clause"),
        ("SELECT 1 FROM t FOR SHARE LIMIT 1", "locking clause"),
        # An escape string continued on the next line stays an escape string.
        # (10.11: read as a standard string, the continuation hid FOR SHARE.)
        ("SELECT E'a'\n'\\'' AS x FROM t FOR SHARE -- '", "locking clause"),
        ("SELECT E'it\\'s' -- c\n  '\\'' FROM t FOR SHARE /* ' */", "locking clause"),
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
        ("WITH x AS (SELECT 1) DELETE FROM t", "WITH"),
        ("WITH x AS (SELECT 1)", "WITH"),
        ("SELECT 1", "without FROM"),
        ("SELECT id FROM (SELECT 1 AS id) AS s", "without FROM"),
        ("SELECT * FROM generate_series(1, 3) AS g", "function"),
        ("SELECT g distinct FROM generate_series(1, 3) AS g", "function"),
        ("SELECT 1 IS DISTINCT FROM 2 FROM generate_series(1, 3) AS g", "function"),
        ("SELECT t.* FROM t JOIN unnest($1::int[]) AS u (id) USING (id)", "function"),
        ("SELECT t.* FROM t, LATERAL pg_catalog.jsonb_array_elements(t.j) AS e", "function"),
        ("SELECT * FROM ROWS FROM (generate_series(1, 3)) AS g", "ROWS FROM"),
        ("SELECT * FROM (VALUES (1)) AS v (id)", "VALUES"),
        ("SELECT * FROM (TABLE t) AS s", "TABLE"),
        ("SELECT * FROM (WITH j AS (SELECT id FROM t) SELECT id FROM j) AS s", "WITH"),
        ("SELECT DISTINCT id FROM t", "DISTINCT"),
        ("SELECT DISTINCT ON (id) id FROM t", "DISTINCT"),
        ("SELECT id FROM t GROUP BY id", "GROUP BY"),
        ("SELECT id FROM t HAVING true", "HAVING"),
        ("SELECT id FROM t WINDOW w AS (ORDER BY id)", "WINDOW"),
        ("SELECT id FROM t UNION SELECT id FROM u", "UNION"),
        ("SELECT id FROM t INTERSECT SELECT id FROM u", "INTERSECT"),
        ("SELECT id FROM t EXCEPT ALL SELECT id FROM u", "EXCEPT"),
        ("SELECT * FROM (SELECT id FROM t UNION SELECT id FROM u) AS s", "UNION"),
        ("SELECT * FROM (SELECT DISTINCT id FROM t) AS s", "DISTINCT"),
        ("SELECT * FROM t JOIN u", "FROM clause"),
        ("SELECT * FROM t LEFT OUTER", "FROM clause"),
        ("SELECT * FROM t AS", "FROM clause"),
        ("SELECT * FROM", "FROM clause"),
        ("SELECT * FROM " + "(" * 100 + "t" + ")" * 100, "nested too deeply"),
        ("SELECT * INTO new_t FROM t", "INTO"),
        ("SELECT 'unterminated", "unterminated"),
        ('SELECT "unterminated', "unterminated"),
        ("SELECT 1 /* open comment", "unterminated"),
        ("SELECT $x$ open", "unterminated"),
        ("SELECT (1", "parenthes"),
        ("SELECT 1)", "parenthes"),
        # SQL value functions need no parentheses: in FROM they are still functions.
        ("SELECT * FROM current_date", "function in FROM"),
        ("SELECT * FROM current_user", "function in FROM"),
        ("SELECT * FROM session_user AS s", "function in FROM"),
        ("SELECT * FROM t, localtimestamp ts", "function in FROM"),
        (
            "SELECT * FROM collation for ((SELECT relname FROM pg_class LIMIT 1))",
            "function in FROM",
        ),
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
        "SELECT id FROM {t} WHERE id = 5 AND substring('abc' for 1) = 'a'",
        # 10.11: FOR inside parentheses is no locking clause.
        "SELECT id, substring('abcdef' from 1 for 3) AS s FROM {t} WHERE id = 5",
        "SELECT id, overlay('abcdef' placing 'x' from 2 for 3) AS s FROM {t} WHERE id = 5",
        # An escape string continued on the next line, in escape mode.
        "SELECT id, E'a'\n'\\' FOR UPDATE' AS s FROM {t} WHERE id = 5",
        "SELECT id, 'a' -- c\n  'b' AS s FROM {t} WHERE id = 5",
        "SELECT id, 1 AS for, {t}.id IS DISTINCT FROM 4 AS d FROM {t} WHERE id = 5",
        "SELECT id, id distinct FROM {t} WHERE id IS NOT DISTINCT FROM 5",
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


# ------------------------------------------------------------- every row returned is locked


@pytest.fixture
async def tags(tables: Tables, admin: asyncpg.Connection, jobs: tuple[str, int]) -> str:
    """A second table: tag ``100 + n`` belongs to job ``n`` (n = 1..20)."""
    name = unique_name("tags")
    await tables.create(name, columns="tid int PRIMARY KEY, job int NOT NULL, label text")
    await admin.execute(
        f"INSERT INTO {quote(name)} SELECT 100 + n, n, 'tag' || n FROM generate_series(1, 20) n"
    )
    return name


async def _locked(other: asyncpg.Connection, table: str, column: str, value: int) -> bool:
    """Whether another session's FOR UPDATE NOWAIT on that row fails."""
    return not await _probe(
        other, f"SELECT 1 FROM {quote(table)} WHERE {column} = $1 FOR UPDATE NOWAIT", value
    )


# Each accepted shape returns jid (a row of jobs) and tid (a row of tags, or null).
ACCEPTED_SHAPES = {
    "one table": "SELECT id AS jid, NULL::int AS tid FROM {j} WHERE id IN (3, 4)",
    "order by, limit, offset": (
        "SELECT id AS jid, NULL::int AS tid FROM {j} WHERE NOT done "
        "ORDER BY id DESC LIMIT 2 OFFSET 1"
    ),
    "fetch first": (
        "SELECT id AS jid, NULL::int AS tid FROM {j} ORDER BY id FETCH FIRST 2 ROWS ONLY"
    ),
    "only, alias, tablesample": (
        "SELECT j.id AS jid, NULL::int AS tid FROM ONLY {j} AS j TABLESAMPLE bernoulli (100) "
        "REPEATABLE (1) WHERE j.id BETWEEN 5 AND 6"
    ),
    "comma join": (
        "SELECT j.id AS jid, g.tid FROM {j} j, {g} g WHERE g.job = j.id AND j.id IN (7, 8)"
    ),
    "inner join on": (
        "SELECT j.id AS jid, g.tid FROM {j} AS j INNER JOIN {g} AS g "
        "ON g.job = j.id AND left(g.label, 3) = 'tag' WHERE j.id = 9"
    ),
    "join using": (
        "SELECT id AS jid, tid FROM {j} AS j (id, done) JOIN {g} AS g (tid, id, label) "
        "USING (id) WHERE id = 10"
    ),
    "parenthesised join": (
        "SELECT j.id AS jid, g.tid FROM ({j} AS j JOIN {g} AS g ON g.job = j.id) WHERE j.id = 11"
    ),
    "subquery in FROM": (
        "SELECT s.id AS jid, NULL::int AS tid "
        "FROM (SELECT id FROM {j} WHERE id > 11 ORDER BY id LIMIT 2) AS s"
    ),
    "lateral subquery": (
        "SELECT j.id AS jid, s.tid FROM {j} AS j, "
        "LATERAL (SELECT tid FROM {g} AS g WHERE g.job = j.id) AS s WHERE j.id = 14"
    ),
    "subquery in WHERE": (
        "SELECT id AS jid, NULL::int AS tid FROM {j} "
        "WHERE id IN (SELECT job FROM {g} WHERE tid = 115)"
    ),
    "functions outside FROM": (
        "SELECT id AS jid, NULL::int AS tid FROM {j} "
        "WHERE substring(id::text from 1 for 2) = '16' AND id = ANY($1::int[])"
    ),
}


@pytest.mark.parametrize("shape", list(ACCEPTED_SHAPES))
async def test_every_accepted_shape_locks_every_row_it_returns(
    shape: str,
    pool: asyncpg.Pool,
    other: asyncpg.Connection,
    jobs: tuple[str, int],
    tags: str,
) -> None:
    """For each shape rows() accepts: another session's NOWAIT on each row
    returned (of each table read) fails while the block runs, and succeeds
    after it."""
    name, _ = jobs
    query = ACCEPTED_SHAPES[shape].format(j=quote(name), g=quote(tags))
    args = [[16, 17]] if "$1" in query else []
    async with aiopglock.rows(query, *args, db=pool) as lock:
        assert lock and len(lock) > 0, shape
        for row in lock:
            assert await _locked(other, name, "id", row["jid"]), (shape, dict(row))
            if row["tid"] is not None:
                assert await _locked(other, tags, "tid", row["tid"]), (shape, dict(row))
        # Rows not returned are not locked (the probe itself works).
        returned = {row["jid"] for row in lock}
        spare = next(i for i in range(1, 21) if i not in returned)
        assert not await _locked(other, name, "id", spare)
    for row in lock.records:
        assert not await _locked(other, name, "id", row["jid"])
    await wait_until(lambda: _pool_idle(pool))


async def test_ctes_are_refused_because_postgresql_skips_them(
    pool: asyncpg.Pool,
    admin: asyncpg.Connection,
    other: asyncpg.Connection,
    jobs: tuple[str, int],
) -> None:
    """10.2: the locking clause does not lock rows read through a CTE
    (measured here on this server, so the refusal stays justified), and a
    data-modifying CTE would run; rows() refuses every WITH before sending
    anything."""
    name, _ = jobs
    t = quote(name)
    reads = [
        f"WITH j AS (SELECT id FROM {t} WHERE id = 1) SELECT id FROM j",
        f"WITH j AS MATERIALIZED (SELECT id FROM {t} WHERE id = 1) SELECT id FROM j",
        f"WITH j AS NOT MATERIALIZED (SELECT id FROM {t} WHERE id = 1) SELECT id FROM j",
    ]
    # What PostgreSQL does with them: row 1 returned, not locked.
    async with pool.acquire() as conn, conn.transaction():
        for query in reads:
            assert [r["id"] for r in await conn.fetch(query + "\nFOR UPDATE")] == [1]
            assert not await _locked(other, name, "id", 1)
    delete = f"WITH d AS (DELETE FROM {t} WHERE id = 2 RETURNING id) SELECT id FROM d"
    hidden = f"SELECT id FROM (WITH j AS (SELECT id FROM {t} WHERE id = 1) SELECT id FROM j) s"
    for query in [*reads, delete, hidden, "with j as (select 1) select * from j, " + t]:
        with pytest.raises(ValueError, match=r"WITH is not accepted.*common table expression"):
            aiopglock.rows(query, db=pool)
    assert await admin.fetchval(f"SELECT count(*) FROM {t}") == 20


@pytest.mark.parametrize(
    "query",
    [
        "SELECT count(*) FROM {t}",
        "SELECT id, row_number() OVER () FROM {t}",
        "SELECT id, generate_series(1, 2) FROM {t}",
        "SELECT a.id FROM {t} AS a LEFT JOIN {t} AS b ON b.id = a.id + 100",
    ],
    ids=["aggregate", "window function", "set-returning select list", "outer join"],
)
async def test_shapes_postgresql_refuses_fail_before_any_row(
    query: str,
    pool: asyncpg.Pool,
    admin: asyncpg.Connection,
    other: asyncpg.Connection,
    jobs: tuple[str, int],
) -> None:
    """Left to PostgreSQL: it refuses them (FOR UPDATE is not allowed with
    ...), so no row is ever returned unlocked, and nothing is left held."""
    name, oid = jobs
    with pytest.raises(asyncpg.FeatureNotSupportedError, match="FOR UPDATE"):
        async with aiopglock.rows(query.format(t=quote(name)), db=pool):
            pytest.fail("the block ran")
    await wait_until(lambda: _pool_idle(pool))
    assert await relation_locks(admin, oid) == []
    assert not await _locked(other, name, "id", 1)


# --------------------------------------------------------- nested transactions, busy pools


async def test_nested_transactions_inside_the_block(
    pool: asyncpg.Pool, admin: asyncpg.Connection, other: asyncpg.Connection, jobs: tuple[str, int]
) -> None:
    """10.7: ``conn.transaction()`` nests in aiopglock's transaction as on
    plain asyncpg; the row locks stay held through a rolled-back nested block."""
    name, _ = jobs
    async with aiopglock.rows(
        f"SELECT id FROM {quote(name)} WHERE id = 1", db=pool, skip_locked=True
    ) as lock:
        conn = lock.connection
        async with conn.transaction():
            await conn.execute(f"UPDATE {quote(name)} SET done = true WHERE id = 1")
        with pytest.raises(ZeroDivisionError):
            async with conn.transaction():
                await conn.execute(f"DELETE FROM {quote(name)} WHERE id = 1")
                raise ZeroDivisionError
        assert await _locked(other, name, "id", 1)
    assert await admin.fetchval(f"SELECT done FROM {quote(name)} WHERE id = 1") is True
    assert not await _locked(other, name, "id", 1)
    await wait_until(lambda: _pool_idle(pool))


async def test_timeout_zero_with_a_busy_pool_is_not_acquired_at_once(
    pool: asyncpg.Pool, admin: asyncpg.Connection, other: asyncpg.Connection, jobs: tuple[str, int]
) -> None:
    """10.1: every pool connection in use: ``timeout=0`` is "not acquired"
    at once, ``timeout > 0`` after about that long; nothing was locked."""
    name, _ = jobs
    conns = [await pool.acquire() for _ in range(pool.get_max_size())]
    try:
        query = f"SELECT id FROM {quote(name)} WHERE id = 1"
        started = time.monotonic()
        async with aiopglock.rows(query, db=pool, timeout=0) as lock:
            assert not lock and lock.records == []
        with pytest.raises(aiopglock.LockNotAcquired):
            async with aiopglock.rows(query, db=pool, timeout=0, side_effect=aiopglock.Raise):
                pytest.fail("locked without a connection")
        assert time.monotonic() - started < 1
        started = time.monotonic()
        async with aiopglock.rows(query, db=pool, timeout=0.2) as lock:
            assert not lock
        assert 0.15 <= time.monotonic() - started < 1.5
        assert pool.get_idle_size() == 0
        assert not await _locked(other, name, "id", 1)
    finally:
        for conn in conns:
            await pool.release(conn)
    async with aiopglock.rows(query, db=pool, timeout=0) as lock:
        assert [r["id"] for r in lock] == [1]


async def test_a_server_without_standard_conforming_strings_reads_backslashes(
    connect: Connect, admin: asyncpg.Connection, jobs: tuple[str, int]
) -> None:
    """With ``standard_conforming_strings = off`` the server reads ``\\'`` in
    ``'...'`` as a quote: a query the check reads as ``FROM <table>`` is, to
    that server, a function in FROM whose rows nothing locks. The setting is
    known from the server's reports: the query is checked again as that
    server reads it, and refused before it runs."""
    name, _ = jobs
    query = (
        "SELECT id, 'x\\'' AS a FROM generate_series(1, 3) AS id -- ' "
        f"FROM {quote(name)} WHERE id = 1"
    )
    plain = await connect()
    async with aiopglock.rows(query, db=plain) as lock:  # read as the check reads it
        assert [r["id"] for r in lock] == [1]
    legacy = await connect(server_settings={"standard_conforming_strings": "off"})
    assert await legacy.fetchval("SHOW standard_conforming_strings") == "off"
    with pytest.raises(ValueError, match="function in FROM"):
        async with aiopglock.rows(query, db=legacy):
            pytest.fail("ran a query whose rows are not locked")
    assert not legacy.is_in_transaction()
    # Queries both readings agree on run there as anywhere.
    async with aiopglock.rows(
        f"SELECT id, 'C:\\\\dir' AS p FROM {quote(name)} WHERE id = 2", db=legacy
    ) as lock:
        assert [r["id"] for r in lock] == [2]


async def test_a_table_named_like_a_value_function_is_a_table(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    """Quoted or schema-qualified, ``current_date`` is a table name again, and
    its rows are locked."""
    await admin.execute('CREATE TABLE IF NOT EXISTS "current_date" (id int PRIMARY KEY)')
    try:
        await admin.execute('INSERT INTO "current_date" VALUES (1) ON CONFLICT DO NOTHING')
        for query in ('SELECT id FROM "current_date"', "SELECT id FROM public.current_date"):
            async with aiopglock.rows(query, db=pool) as lock:
                assert [r["id"] for r in lock] == [1]
                with pytest.raises(asyncpg.LockNotAvailableError):
                    await admin.fetch('SELECT id FROM "current_date" FOR UPDATE NOWAIT')
    finally:
        await admin.execute('DROP TABLE "current_date"')
