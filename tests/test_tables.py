"""``aiopglock.table``: modes, names, injection, timeouts, transaction ownership.

Every assertion about a lock is made on the server (``pg_locks`` through the
admin connection), every assertion about a transaction on
``pg_stat_activity`` or on data another session can (or cannot) see.
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

MODES = list(aiopglock.TableLockMode)


@pytest.fixture
async def ledger(tables: Tables) -> tuple[str, int]:
    """A plain table: its name and oid."""
    name = unique_name("ledger")
    return name, await tables.create(name)


async def _waiting_on(admin: asyncpg.Connection, oid: int) -> list[int]:
    return [pid for pid, _, granted in await relation_locks(admin, oid) if not granted]


async def _pool_idle(pool: asyncpg.Pool) -> bool:
    return pool.get_idle_size() == pool.get_size()


# --------------------------------------------------------------------------- modes


def _spellings(mode: aiopglock.TableLockMode) -> list[str]:
    words = mode.value.split()
    return [
        mode.value,
        mode.value.lower(),
        "_".join(words),
        "_".join(words).lower(),
        "  " + "   ".join(w.capitalize() for w in words) + " ",
        "_ ".join(w.lower() for w in words),
    ]


def test_mode_pg_names() -> None:
    assert [m.pg_mode for m in MODES] == [
        "AccessShareLock",
        "RowShareLock",
        "RowExclusiveLock",
        "ShareUpdateExclusiveLock",
        "ShareLock",
        "ShareRowExclusiveLock",
        "ExclusiveLock",
        "AccessExclusiveLock",
    ]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
async def test_every_mode_shows_in_pg_locks(
    mode: aiopglock.TableLockMode,
    pool: asyncpg.Pool,
    admin: asyncpg.Connection,
    ledger: tuple[str, int],
) -> None:
    name, oid = ledger
    for spelling in [mode, *_spellings(mode)]:
        async with aiopglock.table(name, db=pool, mode=spelling) as lock:
            assert lock, spelling
            assert lock.mode is mode
            assert await relation_locks(admin, oid) == [(lock.pid, mode.pg_mode, True)], spelling
        assert await relation_locks(admin, oid) == []


async def test_default_mode_is_access_exclusive(
    pool: asyncpg.Pool, admin: asyncpg.Connection, ledger: tuple[str, int]
) -> None:
    name, oid = ledger
    async with aiopglock.table(name, db=pool) as lock:
        assert await relation_locks(admin, oid) == [(lock.pid, "AccessExclusiveLock", True)]


@pytest.mark.parametrize(
    "mode",
    [
        "",
        "   ",
        "ACCESS",
        "exclusive mode",
        "ACCESS-EXCLUSIVE",
        "accessexclusive",
        "ROW EXCLUSIVE MODE",
        "SHARE MODE; DROP TABLE victim; --",
        "EXCLUSIVE MODE NOWAIT",
        "ACCESS EXCLUSIVE\x00",
        "AccessExclusiveLock",
    ],
)
async def test_invalid_mode_is_a_value_error_before_sql(
    mode: str, connect: Connect, admin: asyncpg.Connection, tables: Tables
) -> None:
    victim = unique_name("victim")
    await tables.create(victim)
    # A closed connection: any statement sent would be an InterfaceError.
    conn = await connect()
    await conn.close()
    with pytest.raises(ValueError, match="mode"):
        aiopglock.table(victim, db=conn, mode=mode)
    assert await admin.fetchval("SELECT to_regclass($1)", quote(victim)) is not None


@pytest.mark.parametrize("mode", [None, 1, b"SHARE", ["SHARE"]])
def test_mode_of_wrong_type_is_a_type_error(mode: Any) -> None:
    with pytest.raises(TypeError, match="mode"):
        aiopglock.table("t", mode=mode)


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "table_name",
    [
        "plain",
        "MixedCase",
        'quo"te',
        '"already quoted"',
        "with space",
        "semi;colon",
        "ta.ble",  # a dot: only the tuple forms can name it
        "ünï",
        "x'y",
    ],
)
async def test_names_are_quoted(
    table_name: str, pool: asyncpg.Pool, admin: asyncpg.Connection, tables: Tables
) -> None:
    schema = await tables.schema(unique_name("aiopglock S;x"))
    oid = await tables.create(schema, table_name)
    forms: list[Any] = [(schema, table_name)]
    if "." not in table_name:
        forms.append(f"{schema}.{table_name}")
    for form in forms:
        async with aiopglock.table(form, db=pool, mode="share") as lock:
            assert lock.tables == (quote(schema, table_name),)
            assert await relation_locks(admin, oid) == [(lock.pid, "ShareLock", True)], form
    # Unqualified: found through the search_path.
    async with pool.acquire() as conn:
        await conn.execute(f"SET search_path = {quote(schema)}")
        for form in [(table_name,)] + ([table_name] if "." not in table_name else []):
            async with aiopglock.table(form, db=conn, mode="share") as lock:
                assert await relation_locks(admin, oid) == [(lock.pid, "ShareLock", True)]


async def test_several_tables_one_statement(
    pool: asyncpg.Pool, admin: asyncpg.Connection, tables: Tables
) -> None:
    a, b = unique_name("a"), unique_name("b")
    oid_a, oid_b = await tables.create(a), await tables.create(b)
    async with aiopglock.table(a, ("public", b), db=pool, mode="exclusive") as lock:
        assert await relation_locks(admin, oid_a) == [(lock.pid, "ExclusiveLock", True)]
        assert await relation_locks(admin, oid_b) == [(lock.pid, "ExclusiveLock", True)]
    assert await relation_locks(admin, oid_a) == await relation_locks(admin, oid_b) == []


async def test_injection_in_a_name_never_runs(
    pool: asyncpg.Pool, admin: asyncpg.Connection, tables: Tables
) -> None:
    victim = unique_name("victim")
    await tables.create(victim)
    evil = f'x"; DROP TABLE {quote(victim)}; --'
    oid = await tables.create(evil)
    async with aiopglock.table(evil, db=pool) as lock:
        assert await relation_locks(admin, oid) == [(lock.pid, "AccessExclusiveLock", True)]
    # A name that is all injection and no table: the server looks for a
    # table of that name and does not find it.
    for name in [f"{victim}; DROP TABLE {victim}", (f"{victim} CASCADE; DROP TABLE {victim}",)]:
        with pytest.raises(asyncpg.UndefinedTableError):
            async with aiopglock.table(name, db=pool):
                pytest.fail("locked a table that does not exist")
    assert await admin.fetchval("SELECT to_regclass($1)", quote(victim)) is not None
    assert await wait_until(lambda: _pool_idle(pool))


@pytest.mark.parametrize(
    ("tables_arg", "error"),
    [
        ((), TypeError),
        ((1,), TypeError),
        ((None,), TypeError),
        ((("a", "b", "c"),), TypeError),
        ((("a", 1),), TypeError),
        (("",), ValueError),
        (("a.",), ValueError),
        (("a.b.c",), ValueError),
        ((("", "t"),), ValueError),
        (("t\x00",), ValueError),
    ],
)
def test_bad_table_names(tables_arg: tuple[Any, ...], error: type[Exception]) -> None:
    with pytest.raises(error, match="tables"):
        aiopglock.table(*tables_arg)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"timeout": -1}, ValueError, "timeout"),
        ({"timeout": float("nan")}, ValueError, "timeout"),
        ({"timeout": "1"}, TypeError, "timeout"),
        ({"side_effect": aiopglock.Skip}, ValueError, "side_effect"),
        ({"side_effect": "raise"}, ValueError, "side_effect"),
        ({"db": "postgresql://"}, TypeError, "db"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        aiopglock.table("t", **kwargs)


async def test_no_database_is_a_usage_error() -> None:
    with pytest.raises(aiopglock.UsageError):
        async with aiopglock.table("t"):
            pytest.fail("entered without a database")


# --------------------------------------------------------------------------- timeouts


@pytest.fixture
async def blocker(connect: Connect, tables: Tables) -> AsyncIterator[asyncpg.Connection]:
    """Another session to hold locks; closed before ``tables`` drops its tables."""
    conn: asyncpg.Connection = await connect()
    try:
        yield conn
    finally:
        await conn.close()


async def _block(blocker: asyncpg.Connection, name: str, mode: str = "ACCESS EXCLUSIVE") -> None:
    await blocker.execute("BEGIN")
    await blocker.execute(f"LOCK TABLE {quote(name)} IN {mode} MODE")


@pytest.mark.parametrize("db_kind", ["pool", "connection"])
async def test_timeout_zero_is_nowait(
    db_kind: str,
    pool: asyncpg.Pool,
    connect: Connect,
    admin: asyncpg.Connection,
    blocker: asyncpg.Connection,
    ledger: tuple[str, int],
) -> None:
    name, oid = ledger
    await _block(blocker, name)
    db: Any = pool if db_kind == "pool" else await connect()
    started = time.monotonic()
    async with aiopglock.table(name, db=db, mode="access share", timeout=0) as lock:
        assert not lock
        assert lock.connection is (None if db_kind == "pool" else db)
        # Nothing of ours is on the server: no lock, no wait, no transaction.
        assert [pid for pid, *_ in await relation_locks(admin, oid)] == [blocker.get_server_pid()]
    assert time.monotonic() - started < 2
    assert "not acquired" in repr(lock)
    with pytest.raises(aiopglock.LockNotAcquired) as info:
        async with aiopglock.table(name, db=db, timeout=0, side_effect=aiopglock.Raise):
            pytest.fail("entered a busy table")
    assert isinstance(info.value, TimeoutError)
    assert name in str(info.value)
    if db_kind == "pool":
        await wait_until(lambda: _pool_idle(pool))
    else:
        assert not db.is_in_transaction()
        assert await backend_state(admin, db.get_server_pid()) == "idle"
    await blocker.execute("ROLLBACK")
    async with aiopglock.table(name, db=db, timeout=0) as lock:
        assert lock


@pytest.mark.parametrize("db_kind", ["pool", "connection", "transaction"])
async def test_timeout_waits_at_most_on_the_server(
    db_kind: str,
    pool: asyncpg.Pool,
    connect: Connect,
    admin: asyncpg.Connection,
    blocker: asyncpg.Connection,
    ledger: tuple[str, int],
) -> None:
    name, oid = ledger
    await _block(blocker, name)
    conn: Any = None
    db: Any = pool
    if db_kind != "pool":
        conn = db = await connect()
        await conn.execute("SET lock_timeout = '7s'")
        if db_kind == "transaction":
            await conn.execute("BEGIN")
            await conn.execute("SET LOCAL lock_timeout = '9s'")

    seen: list[int] = []

    async def watch() -> None:
        seen.extend(await wait_until(lambda: _waiting_on(admin, oid)))

    watcher = asyncio.create_task(watch())
    started = time.monotonic()
    async with aiopglock.table(name, db=db, timeout=0.4) as lock:
        waited = time.monotonic() - started
        assert not lock
    await watcher
    # It really waited in the server (a wait row in pg_locks), for about the
    # timeout, and gave up without anyone cancelling it.
    assert 0.35 <= waited < 5, waited
    assert len(seen) == 1 and seen[0] != blocker.get_server_pid()
    assert await _waiting_on(admin, oid) == []
    if conn is not None:
        expected = "9s" if db_kind == "transaction" else "7s"
        assert await conn.fetchval("SHOW lock_timeout") == expected
        assert conn.is_in_transaction() == (db_kind == "transaction")
    await blocker.execute("ROLLBACK")
    async with aiopglock.table(name, db=db, timeout=5) as lock:
        assert lock
        if conn is not None:
            # The block runs with the caller's setting, not the wait's.
            expected = "9s" if db_kind == "transaction" else "7s"
            assert await lock.connection.fetchval("SHOW lock_timeout") == expected
        else:
            assert await lock.connection.fetchval("SHOW lock_timeout") == "0"
    if conn is not None:
        assert await conn.fetchval("SHOW lock_timeout") == expected
        if db_kind == "transaction":
            await conn.execute("ROLLBACK")
            assert await conn.fetchval("SHOW lock_timeout") == "7s"


async def test_timeout_as_timedelta(
    pool: asyncpg.Pool, blocker: asyncpg.Connection, ledger: tuple[str, int]
) -> None:
    from datetime import timedelta

    name, _ = ledger
    await _block(blocker, name, "SHARE")
    started = time.monotonic()
    async with aiopglock.table(name, db=pool, timeout=timedelta(milliseconds=200)) as lock:
        assert not lock
    assert 0.15 <= time.monotonic() - started < 5
    async with aiopglock.table(name, db=pool, mode="share", timeout=timedelta(0)) as lock:
        assert lock  # SHARE does not conflict with SHARE


async def test_no_timeout_waits_until_granted(
    pool: asyncpg.Pool,
    admin: asyncpg.Connection,
    blocker: asyncpg.Connection,
    ledger: tuple[str, int],
) -> None:
    name, oid = ledger
    await _block(blocker, name)

    async def take() -> int:
        async with aiopglock.table(name, db=pool) as lock:
            assert lock
            return int(lock.pid)  # type: ignore[arg-type]

    task = asyncio.create_task(take())
    waiting = await wait_until(lambda: _waiting_on(admin, oid))
    await blocker.execute("COMMIT")
    assert await task == waiting[0]


# --------------------------------------------------------------------------- transactions


async def _db_for(kind: str, pool: asyncpg.Pool, connect: Connect) -> Any:
    return pool if kind == "pool" else await connect()


async def _count(admin: asyncpg.Connection, name: str) -> int:
    n: int = await admin.fetchval(f"SELECT count(*) FROM {quote(name)}")
    return n


@pytest.mark.parametrize("db_kind", ["pool", "connection"])
async def test_commits_on_success(
    db_kind: str,
    pool: asyncpg.Pool,
    connect: Connect,
    admin: asyncpg.Connection,
    ledger: tuple[str, int],
) -> None:
    name, oid = ledger
    db = await _db_for(db_kind, pool, connect)
    async with aiopglock.table(name, db=db, mode="exclusive") as lock:
        assert lock.owns_transaction
        conn = lock.connection
        assert conn.get_server_pid() == lock.pid
        if db_kind == "connection":
            assert conn is db
        assert conn.is_in_transaction()
        await conn.execute(f"INSERT INTO {quote(name)} VALUES (1, 'one')")
        assert await backend_state(admin, lock.pid) == "idle in transaction"
        assert await _count(admin, name) == 0  # not committed yet
    assert await _count(admin, name) == 1
    assert await relation_locks(admin, oid) == []
    assert repr(lock).startswith("<TableLock ") and "released" in repr(lock)
    if db_kind == "pool":
        assert lock.connection is None
        await wait_until(lambda: _pool_idle(pool))
    else:
        assert not db.is_in_transaction()
        assert await backend_state(admin, db.get_server_pid()) == "idle"


@pytest.mark.parametrize("db_kind", ["pool", "connection"])
async def test_rolls_back_on_error(
    db_kind: str,
    pool: asyncpg.Pool,
    connect: Connect,
    admin: asyncpg.Connection,
    ledger: tuple[str, int],
) -> None:
    name, oid = ledger
    db = await _db_for(db_kind, pool, connect)
    with pytest.raises(ZeroDivisionError):
        async with aiopglock.table(name, db=db) as lock:
            await lock.connection.execute(f"INSERT INTO {quote(name)} VALUES (1, 'one')")
            1 / 0  # noqa: B018
    assert await _count(admin, name) == 0
    assert await relation_locks(admin, oid) == []
    # An SQL error inside the block: rolled back too, the error unchanged.
    with pytest.raises(asyncpg.UniqueViolationError):
        async with aiopglock.table(name, db=db) as lock:
            await lock.connection.execute(f"INSERT INTO {quote(name)} VALUES (1, 'a'), (1, 'b')")
    assert await relation_locks(admin, oid) == []
    if db_kind == "pool":
        await wait_until(lambda: _pool_idle(pool))
    else:
        assert not db.is_in_transaction()
        assert await db.fetchval("SELECT 1") == 1


@pytest.mark.parametrize("db_kind", ["pool", "connection"])
async def test_rolls_back_on_cancellation(
    db_kind: str,
    pool: asyncpg.Pool,
    connect: Connect,
    admin: asyncpg.Connection,
    ledger: tuple[str, int],
) -> None:
    name, oid = ledger
    db = await _db_for(db_kind, pool, connect)
    inside = asyncio.Event()
    pids: list[int] = []

    async def work(sleep_in_server: bool) -> None:
        async with aiopglock.table(name, db=db) as lock:
            pids.append(lock.pid)  # type: ignore[arg-type]
            await lock.connection.execute(f"INSERT INTO {quote(name)} VALUES (1, 'one')")
            inside.set()
            if sleep_in_server:
                await lock.connection.execute("SELECT pg_sleep(30)")
            else:
                await asyncio.sleep(30)

    for sleep_in_server in (False, True):
        inside.clear()
        task = asyncio.create_task(work(sleep_in_server))
        await inside.wait()
        if sleep_in_server:
            await wait_until(
                lambda: admin.fetchval(
                    "SELECT query LIKE 'SELECT pg_sleep%' FROM pg_stat_activity WHERE pid = $1",
                    pids[-1],
                )
            )
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await _count(admin, name) == 0
        assert await relation_locks(admin, oid) == []
        assert await backend_state(admin, pids[-1]) in ("idle", None)
        if db_kind == "pool":
            await wait_until(lambda: _pool_idle(pool))
        else:
            assert not db.is_in_transaction()


async def test_inside_a_transaction_the_lock_is_held_to_its_end(
    connect: Connect, admin: asyncpg.Connection, ledger: tuple[str, int]
) -> None:
    name, oid = ledger
    conn = await connect()
    async with conn.transaction():
        await conn.execute(f"INSERT INTO {quote(name)} VALUES (1, 'before')")
        async with aiopglock.table(name, db=conn, mode="share row exclusive") as lock:
            assert lock and not lock.owns_transaction
            assert lock.connection is conn
            await conn.execute(f"INSERT INTO {quote(name)} VALUES (2, 'inside')")
        # The block has exited; the transaction (and the lock) have not.
        assert conn.is_in_transaction()
        modes = {(pid, mode) for pid, mode, _ in await relation_locks(admin, oid)}
        assert (conn.get_server_pid(), "ShareRowExclusiveLock") in modes
        assert await _count(admin, name) == 0
        # A nested table() inside the caller's transaction: the same rules.
        async with aiopglock.table(name, db=conn, mode="access exclusive") as inner:
            assert inner and not inner.owns_transaction
        modes = {(pid, mode) for pid, mode, _ in await relation_locks(admin, oid)}
        assert (conn.get_server_pid(), "AccessExclusiveLock") in modes
    assert await relation_locks(admin, oid) == []
    assert await _count(admin, name) == 2


async def test_error_inside_a_callers_transaction_is_the_callers(
    connect: Connect, admin: asyncpg.Connection, ledger: tuple[str, int]
) -> None:
    """An error in the block does not end the caller's transaction: aiopglock
    did not open it, so it neither commits nor rolls it back."""
    name, oid = ledger
    conn = await connect()
    await conn.execute("BEGIN")
    with pytest.raises(RuntimeError):
        async with aiopglock.table(name, db=conn):
            raise RuntimeError("boom")
    assert conn.is_in_transaction()
    assert [pid for pid, *_ in await relation_locks(admin, oid)] == [conn.get_server_pid()]
    await conn.execute("ROLLBACK")
    assert await relation_locks(admin, oid) == []


@pytest.mark.parametrize("timeout", [0, 0.2])
@pytest.mark.parametrize("side_effect", [aiopglock.Return, aiopglock.Raise])
async def test_failed_wait_leaves_the_callers_transaction_usable(
    timeout: float,
    side_effect: aiopglock.SideEffect,
    connect: Connect,
    admin: asyncpg.Connection,
    blocker: asyncpg.Connection,
    tables: Tables,
) -> None:
    busy, free = unique_name("busy"), unique_name("free")
    busy_oid = await tables.create(busy)
    await tables.create(free)
    await _block(blocker, busy)
    conn = await connect()
    await conn.execute("BEGIN")
    await conn.execute(f"INSERT INTO {quote(free)} VALUES (1, 'before')")
    try:
        async with aiopglock.table(busy, db=conn, timeout=timeout, side_effect=side_effect) as lock:
            assert side_effect is aiopglock.Return
            assert not lock
            assert lock.connection is conn
    except aiopglock.LockNotAcquired:
        assert side_effect is aiopglock.Raise
    assert conn.is_in_transaction()
    assert await _waiting_on(admin, busy_oid) == []
    # The transaction is not aborted: statements work, and what came before
    # the failed wait is still part of it.
    await conn.execute(f"INSERT INTO {quote(free)} VALUES (2, 'after')")
    assert await conn.fetchval(f"SELECT count(*) FROM {quote(free)}") == 2
    await conn.execute("COMMIT")
    assert await _count(admin, free) == 2


async def test_missing_table_inside_a_callers_transaction_leaves_it_usable(
    connect: Connect, admin: asyncpg.Connection, ledger: tuple[str, int]
) -> None:
    name, _ = ledger
    conn = await connect()
    await conn.execute("BEGIN")
    await conn.execute(f"INSERT INTO {quote(name)} VALUES (1, 'x')")
    with pytest.raises(asyncpg.UndefinedTableError):
        async with aiopglock.table(unique_name("missing"), db=conn):
            pytest.fail("locked a missing table")
    await conn.execute("COMMIT")
    assert await _count(admin, name) == 1


async def test_one_request_entered_by_many_tasks(
    pool: asyncpg.Pool, admin: asyncpg.Connection, ledger: tuple[str, int]
) -> None:
    """A ``Table`` holds only configuration: concurrent entries queue on the
    server, each with its own handle and connection."""
    name, oid = ledger
    request = aiopglock.table(name, db=pool, mode="exclusive")
    assert "exclusive" in repr(request).lower()
    order: list[int] = []
    first_in = asyncio.Event()
    release = asyncio.Event()

    async def first() -> None:
        async with request as lock:
            order.append(1)
            first_in.set()
            await release.wait()
            assert await lock.connection.fetchval("SELECT 1") == 1

    async def second() -> None:
        async with request as lock:
            assert lock
            order.append(2)

    t1 = asyncio.create_task(first())
    await first_in.wait()
    t2 = asyncio.create_task(second())
    await wait_until(lambda: _waiting_on(admin, oid))
    release.set()
    await asyncio.gather(t1, t2)
    assert order == [1, 2]
    await wait_until(lambda: _pool_idle(pool))


async def test_callable_and_configured_db(
    pool: asyncpg.Pool, admin: asyncpg.Connection, ledger: tuple[str, int]
) -> None:
    name, oid = ledger
    async with aiopglock.table(name, db=lambda: pool) as lock:
        assert await relation_locks(admin, oid) == [(lock.pid, "AccessExclusiveLock", True)]
    aiopglock.configure(db=pool)
    try:
        async with aiopglock.table(name, mode=aiopglock.TableLockMode.ROW_SHARE) as lock:
            assert await relation_locks(admin, oid) == [(lock.pid, "RowShareLock", True)]
    finally:
        aiopglock.configure(db=None)


async def test_no_timeout_means_the_sessions_lock_timeout(
    connect: Connect,
    admin: asyncpg.Connection,
    blocker: asyncpg.Connection,
    ledger: tuple[str, int],
) -> None:
    """``timeout=None`` adds no limit of ours: a ``lock_timeout`` scope (or the
    session's own setting) ends the wait, and the lock is simply not acquired."""
    name, oid = ledger
    await _block(blocker, name)
    conn = await connect()
    started = time.monotonic()
    async with aiopglock.lock_timeout(0.2, db=conn):
        async with aiopglock.table(name, db=conn) as lock:
            assert not lock
        assert await conn.fetchval("SHOW lock_timeout") == "200ms"
    assert 0.15 <= time.monotonic() - started < 5
    assert await conn.fetchval("SHOW lock_timeout") == "0"
    assert not conn.is_in_transaction()
    assert await _waiting_on(admin, oid) == []


# ---------------------------------------------------------- nested transactions (10.7)


@pytest.mark.parametrize("db_kind", ["pool", "connection"])
async def test_nested_transactions_inside_the_block(
    db_kind: str,
    pool: asyncpg.Pool,
    connect: Connect,
    admin: asyncpg.Connection,
    ledger: tuple[str, int],
) -> None:
    """In aiopglock's own transaction, ``conn.transaction()`` nests as a
    savepoint, as it does on plain asyncpg: a failed nested block is rolled
    back alone, the rest commits with the lock's transaction."""
    name, oid = ledger
    db = await _db_for(db_kind, pool, connect)
    async with aiopglock.table(name, db=db, mode="exclusive") as lock:
        conn = lock.connection
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {quote(name)} VALUES (1, 'kept')")
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {quote(name)} VALUES (2, 'kept too')")
        with pytest.raises(asyncpg.UniqueViolationError):
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {quote(name)} VALUES (3, 'rolled back')")
                await conn.execute(f"INSERT INTO {quote(name)} VALUES (1, 'duplicate')")
        # The lock's transaction goes on, the lock still held.
        assert conn.is_in_transaction()
        assert (lock.pid, "ExclusiveLock", True) in await relation_locks(admin, oid)
        assert await _count(admin, name) == 0
    ids = [r["id"] for r in await admin.fetch(f"SELECT id FROM {quote(name)} ORDER BY id")]
    assert ids == [1, 2]
    assert await relation_locks(admin, oid) == []
    committed = 2
    if db_kind == "pool":
        await wait_until(lambda: _pool_idle(pool))
    else:
        # asyncpg has forgotten aiopglock's transaction: a new one is a top level one.
        assert not db.is_in_transaction()
        async with db.transaction():
            await db.execute(f"INSERT INTO {quote(name)} VALUES (4, 'after')")
        committed = 3
        assert await _count(admin, name) == committed
    with pytest.raises(KeyError):
        async with aiopglock.table(name, db=db) as lock:
            async with lock.connection.transaction():
                await lock.connection.execute(f"INSERT INTO {quote(name)} VALUES (5, 'x')")
            raise KeyError("the block fails: everything in it is rolled back")
    assert await _count(admin, name) == committed


async def test_a_failed_start_leaves_asyncpg_no_stale_transaction(
    connect: Connect, admin: asyncpg.Connection, ledger: tuple[str, int]
) -> None:
    """The connection is busy with another task's query, so asyncpg refuses
    the BEGIN of aiopglock's transaction (InterfaceError) after recording it
    as the connection's transaction; aiopglock makes it forget that one, or
    every later ``conn.transaction()`` would be sent as a SAVEPOINT outside
    a transaction. (Pins the one asyncpg internal _transaction.py touches.)"""
    name, _ = ledger
    conn = await connect()
    busy = asyncio.create_task(conn.execute("SELECT pg_sleep(0.2)"))

    async def sleeping() -> bool:
        query = await admin.fetchval(
            "SELECT query FROM pg_stat_activity WHERE pid = $1", conn.get_server_pid()
        )
        return bool(query and "pg_sleep" in query)

    await wait_until(sleeping)
    with pytest.raises(asyncpg.InterfaceError, match="another operation"):
        async with aiopglock.table(name, db=conn):
            pytest.fail("locked on a busy connection")
    await busy
    assert not conn.is_in_transaction()
    async with conn.transaction():
        assert conn.is_in_transaction()
        await conn.execute(f"INSERT INTO {quote(name)} VALUES (1, 'top level')")
    assert await _count(admin, name) == 1


# --------------------------------------------------------------------------- a busy pool (10.1)


@pytest.fixture
async def leased(pool: asyncpg.Pool) -> AsyncIterator[list[Any]]:
    """Every connection of ``pool`` (4) taken out, given back at teardown."""
    conns = [await pool.acquire() for _ in range(pool.get_max_size())]
    try:
        yield conns
    finally:
        for conn in conns:
            if conn is not None:
                await pool.release(conn)


async def test_timeout_zero_with_a_busy_pool_is_not_acquired_at_once(
    pool: asyncpg.Pool, leased: list[Any], admin: asyncpg.Connection, ledger: tuple[str, int]
) -> None:
    """``timeout=0`` never waits, for a connection either: with every pool
    connection in use the handle is falsy at once (LockNotAcquired under
    Raise), nothing was sent, and the pool is as it was."""
    name, oid = ledger
    started = time.monotonic()
    async with aiopglock.table(name, db=pool, timeout=0) as lock:
        assert not lock and lock.connection is None
    with pytest.raises(aiopglock.LockNotAcquired):
        async with aiopglock.table(name, db=pool, timeout=0, side_effect=aiopglock.Raise):
            pytest.fail("locked without a connection")
    assert time.monotonic() - started < 1
    assert pool.get_size() == 4 and pool.get_idle_size() == 0
    assert await relation_locks(admin, oid) == []
    # A free connection: acquired with timeout=0.
    await pool.release(leased.pop())
    async with aiopglock.table(name, db=pool, timeout=0) as lock:
        assert lock
        assert await relation_locks(admin, oid) == [(lock.pid, "AccessExclusiveLock", True)]


async def test_timeout_bounds_the_pool_wait_plus_the_lock_wait(
    pool: asyncpg.Pool,
    leased: list[Any],
    admin: asyncpg.Connection,
    blocker: asyncpg.Connection,
    ledger: tuple[str, int],
) -> None:
    name, oid = ledger
    # Nothing free for the whole timeout: not acquired after about that long.
    started = time.monotonic()
    async with aiopglock.table(name, db=pool, timeout=0.3) as lock:
        assert not lock
    assert 0.25 <= time.monotonic() - started < 1.5
    assert pool.get_idle_size() == 0
    # A connection frees half way through, the table stays locked: the lock
    # wait gets what is left of the timeout, not a whole one of its own.
    await _block(blocker, name)
    loop = asyncio.get_running_loop()
    loop.call_later(0.5, lambda: asyncio.ensure_future(pool.release(leased.pop())))
    started = time.monotonic()
    async with aiopglock.table(name, db=pool, timeout=1.0) as lock:
        assert not lock
    elapsed = time.monotonic() - started
    assert 0.95 <= elapsed < 1.4, elapsed
    assert [pid for pid, *_ in await relation_locks(admin, oid)] == [blocker.get_server_pid()]
    await blocker.execute("ROLLBACK")
    await wait_until(lambda: _idle_count(pool, 1))
    async with aiopglock.table(name, db=pool, timeout=1.0) as lock:
        assert lock


async def _idle_count(pool: asyncpg.Pool, n: int) -> bool:
    return pool.get_idle_size() == n
