"""The lock_timeout grant race (issue 9.1): a timed-out wait that was granted.

PostgreSQL can grant a lock just as ``lock_timeout`` fires: the statement
fails with 55P03 (``LockNotAvailableError``) and the session holds the lock
anyway. A session lock survives that failure, and a rolled-back savepoint
does not release it either. aiopglock resolves every timed-out session-lock
wait on the server (``pg_locks`` for ``pg_backend_pid()``, released if held),
as it does a cancelled one.

Each storm runs rounds of: a holder session holds the key; a waiter asks for
it through aiopglock with a 1-5 ms timeout; the holder releases it with
server-side timing close to that timeout (``pg_sleep`` then
``pg_advisory_unlock`` in one statement, sent as the waiter starts). After
each round ``pg_locks`` must show exactly one lock of the waiter's backend
when its handle was truthy (inside the block) and none when it was falsy.

The Pool form uses a pool whose reset does not run ``pg_advisory_unlock_all()``
(a custom ``reset=``), so that a leaked lock stays visible instead of being
hidden by the reset, as it would be with asyncpg's default.

How many rounds hit the ambiguous case (granted, yet 55P03) is counted from
aiopglock's debug log ("granted after all") and printed (``pytest -s``).
``AIOPGLOCK_TIMEOUT_RACES`` sets the rounds per storm (default 1000).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest

import aiopglock
from tests._helpers import Connect, PgServer, advisory_locks

ROUNDS = int(os.environ.get("AIOPGLOCK_TIMEOUT_RACES", "1000"))
KEY = 0x7173_0000_0009_0001
# Every other round locks a str key: its statements name it on the server and
# go by the simple query protocol (aiopglock._names), a path of their own.
NAME = "timeout-race */ named"
GRANTED_AFTER_ALL = "granted after all"

pytestmark = pytest.mark.slow

RecordProperty = Callable[[str, object], None]


async def _no_unlock_reset(conn: asyncpg.Connection) -> None:
    # Everything asyncpg's reset does except pg_advisory_unlock_all().
    await conn.execute("CLOSE ALL; UNLISTEN *; RESET ALL;")


@pytest.fixture
async def leaky_pool(pg_server: PgServer) -> AsyncIterator[asyncpg.Pool]:
    """One connection, whose return to the pool leaves advisory locks held."""
    pool = await asyncpg.create_pool(pg_server.dsn, min_size=1, max_size=1, reset=_no_unlock_reset)
    try:
        yield pool
    finally:
        await asyncio.wait_for(pool.close(), 10)


class Race:
    def __init__(self, form: str) -> None:
        self.form = form
        self.rounds = 0
        self.acquired = 0
        self.timed_out = 0
        self.ambiguous = 0

    def __repr__(self) -> str:
        return (
            f"<timeout race, {self.form}: {self.rounds} rounds, {self.acquired} acquired, "
            f"{self.timed_out} timed out, {self.ambiguous} granted and 55P03 (resolved), "
            "0 locks left>"
        )


async def race(
    *,
    db: Any,
    waiter_pid: int,
    holder: asyncpg.Connection,
    admin: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
    seed: str,
    form: str,
    before: Callable[[], Any] | None = None,
    after: Callable[[], Any] | None = None,
) -> Race:
    rng = random.Random(seed)
    stats = Race(form)
    for _ in range(ROUNDS):
        stats.rounds += 1
        caplog.clear()
        key: aiopglock.Key = NAME if stats.rounds % 2 else KEY
        server_key = aiopglock.advisory_key(key)
        await holder.execute("SELECT pg_advisory_lock($1)", server_key)
        if before is not None:
            await before()
        timeout = rng.uniform(0.001, 0.005)
        # Released on the server around the moment the waiter's timeout fires.
        delay_ms = max(timeout * 1000 + rng.uniform(-1.0, 1.5), 0.0)
        inside: list[asyncpg.Record] = []
        got: list[bool] = []

        async def waiter(
            timeout: float = timeout,
            inside: list[Any] = inside,
            got: list[bool] = got,
            key: aiopglock.Key = key,
        ) -> None:
            async with aiopglock.advisory(key, db=db, timeout=timeout) as lock:
                got.append(bool(lock))
                inside.extend(await advisory_locks(admin, pid=waiter_pid))

        task = asyncio.create_task(waiter())
        await holder.execute(
            "SELECT pg_sleep($2::float8 / 1000), pg_advisory_unlock($1)", server_key, delay_ms
        )
        await task
        if got[0]:
            stats.acquired += 1
            assert [(r["pid"], r["mode"], r["granted"]) for r in inside] == [
                (waiter_pid, "ExclusiveLock", True)
            ], f"a truthy handle must hold exactly one lock; {stats}"
        else:
            stats.timed_out += 1
            assert inside == [], f"a falsy handle left {list(inside)} held; {stats}"
        stats.ambiguous += sum(GRANTED_AFTER_ALL in r.getMessage() for r in caplog.records)
        # And nothing after the block either, whatever the outcome.
        left = await advisory_locks(admin, pid=waiter_pid)
        assert left == [], f"left held after the block: {left}; {stats}"
        if after is not None:
            await after()
    return stats


@pytest.fixture
def debug_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="aiopglock")
    return caplog


def _report(stats: Race, record_property: RecordProperty) -> None:
    print(f"\n{stats!r}")
    record_property(f"timeout-race[{stats.form}]", repr(stats))
    # Both outcomes happened, or the storm missed the race window.
    assert stats.acquired > 0 and stats.timed_out > 0, stats


async def test_timeout_race_pool(
    leaky_pool: asyncpg.Pool,
    connect: Connect,
    admin: asyncpg.Connection,
    debug_log: pytest.LogCaptureFixture,
    record_property: RecordProperty,
) -> None:
    holder = await connect()
    async with leaky_pool.acquire() as conn:
        pid = conn.get_server_pid()
    stats = await race(
        db=leaky_pool,
        waiter_pid=pid,
        holder=holder,
        admin=admin,
        caplog=debug_log,
        seed="pool",
        form="Pool",
    )
    async with leaky_pool.acquire() as conn:
        assert conn.get_server_pid() == pid, "the pool's connection was discarded"
    _report(stats, record_property)


async def test_timeout_race_connection(
    connect: Connect,
    admin: asyncpg.Connection,
    debug_log: pytest.LogCaptureFixture,
    record_property: RecordProperty,
) -> None:
    holder = await connect()
    conn = await connect()
    stats = await race(
        db=conn,
        waiter_pid=conn.get_server_pid(),
        holder=holder,
        admin=admin,
        caplog=debug_log,
        seed="connection",
        form="Connection",
    )
    assert not conn.is_closed() and not conn.is_in_transaction()
    _report(stats, record_property)


async def test_timeout_race_inside_callers_transaction(
    connect: Connect,
    admin: asyncpg.Connection,
    debug_log: pytest.LogCaptureFixture,
    record_property: RecordProperty,
) -> None:
    """A rolled-back savepoint does not release a session lock: the leak
    shows while the caller's transaction is still open (checked inside the
    block and right after it, before the ROLLBACK)."""
    holder = await connect()
    conn = await connect()

    async def before() -> None:
        await conn.execute("BEGIN")

    async def after() -> None:
        # The caller's transaction is intact and usable.
        assert conn.is_in_transaction()
        assert await conn.fetchval("SELECT 1") == 1
        await conn.execute("ROLLBACK")

    stats = await race(
        db=conn,
        waiter_pid=conn.get_server_pid(),
        holder=holder,
        admin=admin,
        caplog=debug_log,
        seed="transaction",
        form="caller's transaction",
        before=before,
        after=after,
    )
    _report(stats, record_property)


async def test_control_plain_asyncpg_leaks(connect: Connect, admin: asyncpg.Connection) -> None:
    """The same race on plain asyncpg (``lock_timeout`` then
    ``pg_advisory_lock``, 55P03 taken as "not granted") leaves locks held that
    their caller believes it never got: proof the storm reaches the window."""
    holder = await connect()
    conn = await connect()
    pid = conn.get_server_pid()
    rng = random.Random("control")
    rounds = leaked = 0
    while rounds < ROUNDS and leaked < 3:
        rounds += 1
        await holder.execute("SELECT pg_advisory_lock($1)", KEY)
        timeout = rng.uniform(0.001, 0.005)
        delay_ms = max(timeout * 1000 + rng.uniform(-1.0, 1.5), 0.0)

        async def naive(timeout: float = timeout) -> None:
            try:
                await conn.execute(
                    "SELECT set_config('lock_timeout', $2, false), pg_advisory_lock($1)",
                    KEY,
                    f"{timeout * 1000:.3f}ms",
                )
            except asyncpg.LockNotAvailableError:
                return  # "not acquired"
            await conn.execute("SELECT pg_advisory_unlock($1)", KEY)

        task = asyncio.create_task(naive())
        await holder.execute(
            "SELECT pg_sleep($2::float8 / 1000), pg_advisory_unlock($1)", KEY, delay_ms
        )
        await task
        if await advisory_locks(admin, pid=pid):
            leaked += 1
            await conn.execute("SELECT pg_advisory_unlock_all()")
    print(f"\nplain asyncpg: {leaked} locks leaked by a timed-out wait in {rounds} rounds")
    assert leaked > 0
