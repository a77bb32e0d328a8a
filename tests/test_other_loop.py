"""A Pool or Connection of another event loop is refused up front.

asyncpg objects belong to the loop that made them. Used from another loop,
asyncpg fails half-way through a statement with a RuntimeError, and cleanup
then closed the other loop's connection from the wrong thread. Every public
function that takes ``db=`` refuses it with a UsageError naming the loop
problem, before anything is sent: the connection's ``pg_stat_activity`` row
is unchanged, it stays open, and its own loop can still use it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import asyncpg
import pytest

import aiopglock
from tests._helpers import PgServer

T = TypeVar("T")
APP = "aiopglock-tests-other-loop"


class OtherLoop:
    """An event loop running in a thread of its own."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` in the other loop; await its result here."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture
def other_loop() -> Iterator[OtherLoop]:
    other = OtherLoop()
    try:
        yield other
    finally:
        other.close()


@pytest.fixture
async def foreign_conn(
    other_loop: OtherLoop, pg_server: PgServer
) -> AsyncIterator[asyncpg.Connection]:
    """A connection made in (and belonging to) the other loop."""
    conn: asyncpg.Connection = await other_loop.run(
        asyncpg.connect(pg_server.dsn, server_settings={"application_name": APP})
    )
    try:
        yield conn
    finally:
        await other_loop.run(conn.close())


@pytest.fixture
async def foreign_pool(other_loop: OtherLoop, pg_server: PgServer) -> AsyncIterator[asyncpg.Pool]:
    async def create() -> asyncpg.Pool:
        pool: asyncpg.Pool = await asyncpg.create_pool(
            pg_server.dsn, min_size=1, max_size=1, server_settings={"application_name": APP}
        )
        return pool

    pool = await other_loop.run(create())
    try:
        yield pool
    finally:
        await other_loop.run(pool.close())


async def _activity(admin: asyncpg.Connection, pid: int) -> tuple[Any, ...]:
    row = await admin.fetchrow(
        "SELECT state, query, query_start, state_change, xact_start "
        "FROM pg_stat_activity WHERE pid = $1",
        pid,
    )
    assert row is not None, f"backend {pid} is gone"
    return tuple(row)


async def _enter(manager: Any) -> None:
    async with manager:
        pytest.fail("the block ran")


def _decorated(decorator: Any) -> Callable[[], Awaitable[None]]:
    async def work() -> None:
        pytest.fail("the function ran")

    decorated: Callable[[], Awaitable[None]] = decorator(work)
    return decorated


# Every public entry point that takes db= (context manager, decorator, call).
USES: list[tuple[str, Callable[[Any], Awaitable[Any]]]] = [
    ("advisory", lambda db: _enter(aiopglock.advisory("k", db=db))),
    ("advisory-timeout-0", lambda db: _enter(aiopglock.advisory("k", db=db, timeout=0))),
    ("advisory-xact", lambda db: _enter(aiopglock.advisory("k", db=db, xact=True))),
    ("advisory-decorator", lambda db: _decorated(aiopglock.advisory("k", db=db))()),
    ("advisory-callable-db", lambda db: _enter(aiopglock.advisory("k", db=lambda: db))),
    ("table", lambda db: _enter(aiopglock.table("pg_class", db=db, mode="access share"))),
    ("rows", lambda db: _enter(aiopglock.rows("SELECT 1 AS x FROM pg_class LIMIT 1", db=db))),
    ("lock_timeout", lambda db: _enter(aiopglock.lock_timeout(1, db=db))),
    ("statement_timeout", lambda db: _decorated(aiopglock.statement_timeout(1, db=db))()),
    ("prioritize", lambda db: _enter(aiopglock.prioritize(db, interval=3600))),
    ("locks", lambda db: aiopglock.locks(db)),
    ("cancel", lambda db: aiopglock.cancel(db, 2**31 - 1)),
    ("terminate", lambda db: aiopglock.terminate(db, 2**31 - 1)),
]


def _ids(use: tuple[str, Any]) -> str:
    return use[0]


@pytest.mark.parametrize("use", USES, ids=_ids)
async def test_a_connection_of_another_loop_is_refused_untouched(
    use: tuple[str, Callable[[Any], Awaitable[Any]]],
    foreign_conn: asyncpg.Connection,
    other_loop: OtherLoop,
    admin: asyncpg.Connection,
    pool: asyncpg.Pool,
) -> None:
    _, call = use
    pid = foreign_conn.get_server_pid()
    before = await _activity(admin, pid)
    aiopglock.configure(db=pool)  # for prioritize's monitor connection
    try:
        with pytest.raises(aiopglock.UsageError, match="another event loop"):
            await call(foreign_conn)
    finally:
        aiopglock.configure(db=None)
    assert not foreign_conn.is_closed()
    assert await _activity(admin, pid) == before
    # Its own loop still uses it.
    assert await other_loop.run(foreign_conn.fetchval("SELECT 41 + 1")) == 42


# lock_timeout()/statement_timeout() refuse any Pool (a TypeError of their own).
POOL_USES = [use for use in USES if not use[0].endswith("_timeout")]


@pytest.mark.parametrize("use", POOL_USES, ids=_ids)
async def test_a_pool_of_another_loop_is_refused_untouched(
    use: tuple[str, Callable[[Any], Awaitable[Any]]],
    foreign_pool: asyncpg.Pool,
    other_loop: OtherLoop,
    admin: asyncpg.Connection,
    pool: asyncpg.Pool,
) -> None:
    _, call = use
    pids = await admin.fetch(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1 ORDER BY pid", APP
    )
    assert len(pids) == 1
    pid = pids[0]["pid"]
    before = await _activity(admin, pid)
    aiopglock.configure(db=pool)
    try:
        with pytest.raises(aiopglock.UsageError, match="another event loop"):
            await call(foreign_pool)
    finally:
        aiopglock.configure(db=None)
    assert (foreign_pool.get_size(), foreign_pool.get_idle_size()) == (1, 1)
    assert await _activity(admin, pid) == before
    assert await other_loop.run(foreign_pool.fetchval("SELECT 41 + 1")) == 42


async def test_a_pool_proxy_of_another_loop_is_refused(
    foreign_pool: asyncpg.Pool, other_loop: OtherLoop, admin: asyncpg.Connection
) -> None:
    async def acquire() -> Any:
        return await foreign_pool.acquire()

    proxy = await other_loop.run(acquire())
    try:
        before = await _activity(admin, proxy.get_server_pid())
        with pytest.raises(aiopglock.UsageError, match="Connection belongs to another event loop"):
            await _enter(aiopglock.advisory("k", db=proxy))
        assert await _activity(admin, proxy.get_server_pid()) == before
    finally:
        await other_loop.run(foreign_pool.release(proxy))


async def test_a_connection_of_a_loop_no_longer_running_is_refused(pg_server: PgServer) -> None:
    """The everyday form: a connection made in one ``loop.run_until_complete()``
    (or ``asyncio.run()``) and used in the next."""
    loop = asyncio.new_event_loop()

    def in_thread(coro: Coroutine[Any, Any, T]) -> T:
        box: list[T] = []
        thread = threading.Thread(target=lambda: box.append(loop.run_until_complete(coro)))
        thread.start()
        thread.join(30)
        return box[0]

    conn: asyncpg.Connection = in_thread(asyncpg.connect(pg_server.dsn))
    try:
        with pytest.raises(aiopglock.UsageError, match="another event loop"):
            await aiopglock.locks(conn)
        assert not conn.is_closed()
        assert in_thread(conn.fetchval("SELECT 1")) == 1
    finally:
        in_thread(conn.close())
        loop.close()


async def test_own_loop_objects_are_accepted(pool: asyncpg.Pool, admin: asyncpg.Connection) -> None:
    async with (
        pool.acquire() as proxy,
        aiopglock.advisory("aiopglock-tests:own-loop", db=proxy) as lock,
    ):
        assert lock
    assert await aiopglock.locks(pool, pids=[admin.get_server_pid()]) == []


async def _refused_untouched(
    foreign_pool: asyncpg.Pool,
    other_loop: OtherLoop,
    admin: asyncpg.Connection,
    use: Callable[[], Awaitable[Any]],
) -> None:
    """``use()`` raises UsageError; the foreign pool's connection is unchanged."""
    pids = await admin.fetch(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1 ORDER BY pid", APP
    )
    assert len(pids) == 1
    before = await _activity(admin, pids[0]["pid"])
    with pytest.raises(aiopglock.UsageError, match="another event loop"):
        await use()
    assert (foreign_pool.get_size(), foreign_pool.get_idle_size()) == (1, 1)
    assert await _activity(admin, pids[0]["pid"]) == before
    assert await other_loop.run(foreign_pool.fetchval("SELECT 41 + 1")) == 42


async def test_prioritize_via_a_pool_of_another_loop_is_refused_untouched(
    foreign_pool: asyncpg.Pool, other_loop: OtherLoop, admin: asyncpg.Connection
) -> None:
    await _refused_untouched(
        foreign_pool,
        other_loop,
        admin,
        lambda: _enter(aiopglock.prioritize(via=foreign_pool, interval=0.05)),
    )


async def test_a_locker_on_a_pool_of_another_loop_is_refused_untouched(
    foreign_pool: asyncpg.Pool, other_loop: OtherLoop, admin: asyncpg.Connection
) -> None:
    locker = aiopglock.Locker(foreign_pool)
    await _refused_untouched(foreign_pool, other_loop, admin, lambda: _enter(locker.advisory("k")))
    await _refused_untouched(
        foreign_pool, other_loop, admin, lambda: _enter(aiopglock.Locker(foreign_pool))
    )
    await locker.aclose()
