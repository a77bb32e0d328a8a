"""A ``str`` key's lock statement names it on the server (issue 14, item 2):
``pg_stat_activity.query`` of a waiting or holding session starts with
``/* aiopglock "<name>" */``, the statement is sent without parameters (the
simple query protocol), so asyncpg's statement cache does not grow with the
names, and ``configure(server_names=False)`` turns it off."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest

import aiopglock
from aiopglock import _advisory_steps, _names
from tests._helpers import Connect, PgServer, holders, wait_for_waiter, wait_until

HOSTILE = [
    "a */ b",
    "/* nested",
    "*/; SELECT pg_terminate_backend(pg_backend_pid()); /*",
    "quote \" and ' and \\ backslash",
    "nul \x00 byte",
    "ключ €uro ✓",
    "$$ dollar $tag$",
    "-- dash comment\nnew line\ttab",
    "{braces} %s %(x)s",
    "x" * _names.MAX_NAME,
]


@pytest.fixture(autouse=True)
def _names_on() -> Any:
    yield
    aiopglock.configure(server_names=True)


def _name(prefix: str = "names") -> str:
    return f"{prefix}:{uuid.uuid4().hex}"


async def _query(admin: asyncpg.Connection, pid: int) -> str:
    query: str = await admin.fetchval("SELECT query FROM pg_stat_activity WHERE pid = $1", pid)
    return query


async def _named_waiter(
    admin: asyncpg.Connection, key: aiopglock.Key, start: Callable[[], Awaitable[Any]]
) -> tuple[asyncio.Task[Any], int, str]:
    """Start ``start()`` in a task while ``key`` is held elsewhere; once it
    waits on the server, return it, its pid and its statement as the server
    shows it."""
    task = asyncio.create_task(start())
    pid = await wait_for_waiter(admin, aiopglock.advisory_key(key))
    return task, pid, await _query(admin, pid)


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize(
    ("form", "kwargs"),
    [
        ("session", {}),
        ("session, timeout", {"timeout": 30}),
        ("xact on a pool, timeout", {"xact": True, "timeout": 30}),
        ("shared", {"shared": True}),
    ],
)
async def test_a_waiting_session_shows_the_name(
    form: str, kwargs: dict[str, Any], pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    name = _name(form)
    async with aiopglock.advisory(name, db=pool):

        async def wait() -> None:
            async with aiopglock.advisory(name, db=pool, **kwargs):
                pass

        task, _pid, query = await _named_waiter(admin, name, wait)
        assert _names.parse(query) == (name, None), query
        await _cancel(task)
    assert await holders(admin, aiopglock.advisory_key(name)) == []
    await wait_until(lambda: _pool_idle(pool))


async def _pool_idle(pool: asyncpg.Pool) -> bool:
    return pool.get_idle_size() == pool.get_size()


async def test_a_holding_session_shows_the_name_until_its_next_statement(
    pool: asyncpg.Pool, admin: asyncpg.Connection, connect: Connect
) -> None:
    name = _name()
    async with aiopglock.advisory(name, db=pool) as lock:
        assert lock.pid is not None
        assert _names.parse(await _query(admin, lock.pid)) == (name, None)
    conn = await connect()
    async with aiopglock.advisory(name, db=conn, timeout=0) as lock:
        assert lock and _names.parse(await _query(admin, lock.pid)) == (name, None)
        await conn.execute("SELECT 1")
        assert await _query(admin, lock.pid) == "SELECT 1"
    assert await holders(admin, aiopglock.advisory_key(name)) == []


async def test_try_lock_says_not_granted_through_the_status(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    """The named try-lock reads its answer from the status (SELECT 1 or 0)."""
    name = _name()
    key = aiopglock.advisory_key(name)

    async def try_once() -> bool:
        async with aiopglock.advisory(name, db=pool, timeout=0) as lock:
            return bool(lock)

    async with aiopglock.advisory(name, db=pool) as held:
        assert await asyncio.create_task(try_once()) is False
        assert await holders(admin, key) == [held.pid]
    assert await try_once() is True
    assert await holders(admin, key) == []


async def test_in_the_callers_transaction_its_lock_timeout_is_given_back(
    connect: Connect, admin: asyncpg.Connection
) -> None:
    name = _name()
    conn = await connect()
    async with conn.transaction():
        await conn.execute("SET LOCAL lock_timeout = '7s'")
        for xact in (True, False):
            async with aiopglock.advisory(name, db=conn, timeout=5, xact=xact) as lock:
                assert lock
                assert await conn.fetchval("SHOW lock_timeout") == "7s"
        # A timed-out wait rolls back to its savepoint: the setting is back too.
        other = _name()
        await admin.execute("SELECT pg_advisory_lock($1)", aiopglock.advisory_key(other))
        try:
            async with aiopglock.advisory(other, db=conn, timeout=0.05) as lock:
                assert not lock
            assert await conn.fetchval("SHOW lock_timeout") == "7s"
        finally:
            await admin.execute("SELECT pg_advisory_unlock($1)", aiopglock.advisory_key(other))
    assert await holders(admin, aiopglock.advisory_key(name)) == []


@pytest.mark.parametrize("name", HOSTILE, ids=range(len(HOSTILE)))
async def test_hostile_names_lock_and_read_back(
    name: str, pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    key = aiopglock.advisory_key(name)
    async with aiopglock.advisory(name, db=pool) as lock:
        assert await holders(admin, key) == [lock.pid]
        assert _names.parse(await _query(admin, lock.pid)) == (name, None)
    assert await holders(admin, key) == []


async def test_a_name_too_long_is_not_sent(pool: asyncpg.Pool, admin: asyncpg.Connection) -> None:
    name = "y" * (_names.MAX_NAME + 1) + uuid.uuid4().hex
    cached = _advisory_steps._named.cache_info().currsize
    async with aiopglock.advisory(name, db=pool) as lock:
        query = await _query(admin, lock.pid)
        assert _names.parse(query) is None and "$1" in query
        assert await holders(admin, aiopglock.advisory_key(name)) == [lock.pid]
    # Nor kept: the named statements' cache holds only names that are sent.
    assert _advisory_steps._named.cache_info().currsize == cached


async def test_int_keys_and_fenced_locks_are_not_named(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    key = int.from_bytes(uuid.uuid4().bytes[:7], "big")
    async with aiopglock.advisory(key, db=pool) as lock:
        assert "$1" in await _query(admin, lock.pid)
    name = _name()
    async with aiopglock.advisory(name, db=pool, fence=True) as lock:
        assert lock.fence is not None
        assert _names.parse(await _query(admin, lock.pid)) is None


async def test_server_names_off_sends_the_parameterised_statement(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    name = _name()
    aiopglock.configure(server_names=False)
    async with aiopglock.advisory(name, db=pool) as lock:
        query = await _query(admin, lock.pid)
        assert _names.parse(query) is None and name not in query and "$1" in query
    aiopglock.configure(server_names=True)
    async with aiopglock.advisory(name, db=pool) as lock:
        assert _names.parse(await _query(admin, lock.pid)) == (name, None)


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_server_names_takes_a_bool(bad: object) -> None:
    with pytest.raises(TypeError, match="server_names"):
        aiopglock.configure(server_names=bad)
    assert _names.enabled()


async def test_the_statement_cache_does_not_grow_with_names(connect: Connect) -> None:
    """300 names on one connection: the cache holds the few constant
    statements (unlock), not a statement per name."""
    conn = await connect()
    cache = conn._stmt_cache
    prefix = _name("cache")
    async with aiopglock.advisory(f"{prefix}:warm", db=conn):
        pass
    before = len(cache)
    for i in range(300):
        async with aiopglock.advisory(f"{prefix}:{i}", db=conn, timeout=5):
            pass
        async with aiopglock.advisory(f"{prefix}:{i}", db=conn, timeout=0):
            pass
    assert len(cache) - before <= 2, len(cache) - before


async def test_a_locker_names_its_contended_waits(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    name = _name("locker")
    async with aiopglock.Locker(pool) as locker, aiopglock.advisory(name, db=pool):

        async def wait() -> None:
            async with locker.advisory(name, timeout=30):
                pass

        task, _pid, query = await _named_waiter(admin, name, wait)
        assert _names.parse(query) == (name, None), query
        await _cancel(task)
    assert await holders(admin, aiopglock.advisory_key(name)) == []


async def test_a_decorated_function_is_named_after_itself(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    @aiopglock.advisory(db=pool)
    async def nightly() -> str:
        pids = await holders(admin, aiopglock.advisory_key(default))
        assert len(pids) == 1
        return await _query(admin, pids[0])

    default = f"{nightly.__module__}.{nightly.__qualname__}"
    assert _names.parse(await nightly()) == (default, None)


async def test_a_semaphore_slot_names_its_semaphore(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    name = _name("sem")
    async with aiopglock.semaphore(name, 3, db=pool) as slot:
        assert slot.pid is not None and slot.slot is not None
        assert _names.parse(await _query(admin, slot.pid)) == (name, slot.slot)


@pytest.fixture
async def latin1(pg_server: PgServer, admin: asyncpg.Connection) -> AsyncIterator[str]:
    """A database whose encoding cannot hold most of Unicode."""
    db = f"aiopglock_latin1_{uuid.uuid4().hex[:8]}"
    await admin.execute(
        f"CREATE DATABASE {db} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
    )
    try:
        yield db
    finally:
        await admin.execute(f"DROP DATABASE {db} WITH (FORCE)")


async def test_any_name_in_a_latin1_database(
    latin1: str, pg_server: PgServer, admin: asyncpg.Connection
) -> None:
    """Non-ASCII travels as \\u escapes: valid in any server encoding."""
    conn = await asyncpg.connect(pg_server.dsn, database=latin1)
    try:
        assert await conn.fetchval("SHOW server_encoding") == "LATIN1"
        name = "ключ ✓"
        async with aiopglock.advisory(name, db=conn) as lock:
            assert lock
            assert _names.parse(await _query(admin, conn.get_server_pid())) == (name, None)
        assert not await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
        )
    finally:
        await conn.close()


async def test_a_long_holds_heartbeat_keeps_naming_it(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    """The heartbeat of a Pool lock (its connection is aiopglock's) is the
    statement the holder shows after a while: it names the key too."""
    name = _name("heartbeat")
    aiopglock.configure(heartbeat=0.2)
    try:
        async with aiopglock.advisory(name, db=pool) as lock:
            assert lock.pid is not None
            pid = lock.pid

            async def beaten() -> bool:
                query = await _query(admin, pid)
                return query.endswith("SELECT 1") and _names.parse(query) == (name, None)

            await wait_until(beaten, message="a heartbeat that names the key")
            assert await holders(admin, aiopglock.advisory_key(name)) == [pid]
    finally:
        aiopglock.configure(heartbeat=5.0)
    assert await holders(admin, aiopglock.advisory_key(name)) == []


async def test_server_names_off_reaches_a_held_locks_heartbeat(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    """configure(server_names=False) keeps names off the server from then on,
    also for a lock already held: its next heartbeat is the plain one."""
    name = _name("secret")
    aiopglock.configure(heartbeat=0.2)
    try:
        async with aiopglock.advisory(name, db=pool) as lock:
            assert lock.pid is not None
            pid = lock.pid
            aiopglock.configure(server_names=False)

            async def plain_beat() -> bool:
                return await _query(admin, pid) == "SELECT 1"

            await wait_until(plain_beat, message="a heartbeat without the name")
    finally:
        aiopglock.configure(heartbeat=5.0)
