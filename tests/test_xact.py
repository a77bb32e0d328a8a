"""``advisory(xact=True)`` in a transaction aiopglock opens (issue 9.3), and
re-entry of ``xact=True`` under a session hold (issue 10.6).

With a Pool, or a Connection outside a transaction, aiopglock opens the
transaction with asyncpg's own ``conn.transaction()``, takes
``pg_advisory_xact_lock`` in it and runs the block inside it
(``lock.connection``); it commits when the block succeeds and rolls back on
error or cancellation. Every claim is checked on the server: ``pg_locks``,
``pg_stat_activity.xact_start``, the rows committed, the pool's sizes.

The cancellation storms hold the standard of ``test_transaction_cancellation``
(their victims and ways of cancelling are reused): after every exit no
transaction of the victim's is open, nothing is held, the pool has every
connection back, and the block's row is committed only if the block ran to
its end (and always when it did and nobody interrupted it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import asyncpg
import pytest

import aiopglock
from tests._helpers import Connect, PgServer, advisory_locks, holders, wait_until
from tests._relations import Tables, in_transaction_pids, quote, unique_name
from tests.test_cancellation import CANCELS, Victim, _jitter, _run_victim, _settle
from tests.test_lost import terminate_backend

GRANT_FIRST = 0.15
ITERATIONS = max(int(os.environ.get("AIOPGLOCK_STORM", "1000")) // 6, 40)


def new_key() -> int:
    return secrets.randbits(63)


@pytest.fixture
async def app_pool(pg_server: PgServer) -> AsyncIterator[tuple[asyncpg.Pool, str]]:
    """A pool whose connections carry an application_name of their own."""
    app = unique_name("aiopglock-xact")
    pool = await asyncpg.create_pool(
        pg_server.dsn, min_size=1, max_size=3, server_settings={"application_name": app}
    )
    try:
        yield pool, app
    finally:
        await asyncio.wait_for(pool.close(), 10)


@pytest.fixture
async def table(tables: Tables) -> str:
    name = unique_name("xact")
    await tables.create(name, columns="id int PRIMARY KEY")
    return name


async def committed(admin: asyncpg.Connection, table: str) -> list[int]:
    return [r["id"] for r in await admin.fetch(f"SELECT id FROM {quote(table)} ORDER BY id")]


async def try_lock_elsewhere(other: asyncpg.Connection, key: int) -> bool:
    """Whether another session can take ``key`` now (released again at once)."""
    got = bool(await other.fetchval("SELECT pg_try_advisory_lock($1)", key))
    if got:
        await other.execute("SELECT pg_advisory_unlock($1)", key)
    return got


async def pool_idle(pool: asyncpg.Pool) -> bool:
    return pool.get_idle_size() == pool.get_size()


# --------------------------------------------------------------------------- basics


@pytest.mark.parametrize("form", ["pool", "connection"])
async def test_block_runs_in_the_lock_transaction_and_commits(
    form: str,
    app_pool: tuple[asyncpg.Pool, str],
    connect: Connect,
    admin: asyncpg.Connection,
    table: str,
) -> None:
    pool, app = app_pool
    db: Any = pool if form == "pool" else await connect()
    other = await connect()
    key = new_key()
    async with aiopglock.advisory(key, db=db, xact=True) as lock:
        assert lock
        assert lock.xact
        conn = lock.connection
        assert conn is not None
        if form == "connection":
            assert conn is db
        assert conn.is_in_transaction()
        assert lock.pid == conn.get_server_pid()
        rows = await advisory_locks(admin, key=key)
        assert [(r["pid"], r["mode"], r["granted"]) for r in rows] == [
            (lock.pid, "ExclusiveLock", True)
        ]
        # A transaction-level hold: pg_locks names the transaction, not "n/0".
        assert not rows[0]["virtualtransaction"].endswith("/0")
        assert not await try_lock_elsewhere(other, key)
        await conn.execute(f"INSERT INTO {quote(table)} VALUES (1)")
        # Not committed yet: the block runs inside the transaction.
        assert await committed(admin, table) == []
        # The lock_timeout of the block is the session's, not the lock's.
        assert await conn.fetchval("SHOW lock_timeout") == "0"
    assert await committed(admin, table) == [1]
    assert lock.connection is None
    assert await holders(admin, key) == []
    assert await try_lock_elsewhere(other, key)
    if form == "pool":
        assert await pool_idle(pool)
        assert await in_transaction_pids(admin, app) == []
    else:
        assert not db.is_in_transaction()


@pytest.mark.parametrize("form", ["pool", "connection"])
async def test_error_in_the_block_rolls_back(
    form: str,
    app_pool: tuple[asyncpg.Pool, str],
    connect: Connect,
    admin: asyncpg.Connection,
    table: str,
) -> None:
    pool, app = app_pool
    db: Any = pool if form == "pool" else await connect()
    key = new_key()

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with aiopglock.advisory(key, db=db, xact=True) as lock:
            await lock.connection.execute(f"INSERT INTO {quote(table)} VALUES (1)")
            raise Boom
    assert await committed(admin, table) == []
    assert await holders(admin, key) == []
    if form == "pool":
        assert await pool_idle(pool)
        assert await in_transaction_pids(admin, app) == []
    else:
        assert not db.is_in_transaction()


@pytest.mark.parametrize("form", ["pool", "connection"])
async def test_nested_transaction_inside_the_block(
    form: str,
    app_pool: tuple[asyncpg.Pool, str],
    connect: Connect,
    admin: asyncpg.Connection,
    table: str,
) -> None:
    """``lock.connection.transaction()`` nests a savepoint, as on plain asyncpg."""
    pool, _ = app_pool
    db: Any = pool if form == "pool" else await connect()
    key = new_key()

    class Undo(Exception):
        pass

    async with aiopglock.advisory(key, db=db, xact=True) as lock:
        conn = lock.connection
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {quote(table)} VALUES (1)")
        with pytest.raises(Undo):
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {quote(table)} VALUES (2)")
                raise Undo
        assert conn.is_in_transaction()
        # The savepoint's rollback left the lock alone.
        assert await holders(admin, key) == [lock.pid]
        await conn.execute(f"INSERT INTO {quote(table)} VALUES (3)")
    assert await committed(admin, table) == [1, 3]
    assert await holders(admin, key) == []


@pytest.mark.parametrize("timeout", [0, 0.2], ids=["timeout=0", "timeout=0.2"])
@pytest.mark.parametrize("form", ["pool", "connection"])
async def test_busy_key_leaves_no_transaction(
    form: str,
    timeout: float,
    app_pool: tuple[asyncpg.Pool, str],
    connect: Connect,
    admin: asyncpg.Connection,
) -> None:
    pool, app = app_pool
    db: Any = pool if form == "pool" else await connect()
    blocker = await connect()
    key = new_key()
    await blocker.execute("SELECT pg_advisory_lock($1)", key)
    async with aiopglock.advisory(key, db=db, xact=True, timeout=timeout) as lock:
        assert not lock
        assert lock.connection is None
    with pytest.raises(aiopglock.LockNotAcquired):
        async with aiopglock.advisory(
            key, db=db, xact=True, timeout=timeout, side_effect=aiopglock.Raise
        ):
            pytest.fail("the block must not run")
    assert await holders(admin, key) == [blocker.get_server_pid()]
    assert await advisory_locks(admin, key=key, granted=False) == []
    if form == "pool":
        assert await pool_idle(pool)
        assert await in_transaction_pids(admin, app) == []
    else:
        assert not db.is_in_transaction()
        assert await db.fetchval("SHOW lock_timeout") == "0"
        # asyncpg's own transaction API works on it afterwards.
        async with db.transaction():
            assert await db.fetchval("SELECT 1") == 1


async def test_decorated_xact_on_a_pool(
    app_pool: tuple[asyncpg.Pool, str], admin: asyncpg.Connection
) -> None:
    pool, _ = app_pool
    key = new_key()
    seen: list[int] = []

    @aiopglock.advisory(key, db=pool, xact=True)
    async def job() -> str:
        seen.extend(await holders(admin, key))
        return "done"

    assert await job() == "done"
    assert len(seen) == 1
    assert await holders(admin, key) == []
    assert await pool_idle(pool)


@pytest.mark.parametrize("form", ["pool", "connection"])
async def test_lost_connection_is_lock_lost(
    form: str, app_pool: tuple[asyncpg.Pool, str], connect: Connect, admin: asyncpg.Connection
) -> None:
    pool, _ = app_pool
    db: Any = pool if form == "pool" else await connect()
    key = new_key()
    reached = False
    with pytest.raises(aiopglock.LockLost):
        async with aiopglock.advisory(key, db=db, xact=True) as lock:
            assert lock
            await terminate_backend(admin, lock.pid)
            with anyio.move_on_after(10):
                await anyio.Event().wait()
            reached = True
    assert not reached
    assert lock.lost

    async def released() -> bool:
        return await holders(admin, key) == []

    await wait_until(released)
    if form == "pool":
        await wait_until(lambda: pool_idle(pool))
        async with aiopglock.advisory(key, db=pool, xact=True, timeout=5) as again:
            assert again


# --------------------------------------------------------------------------- re-entry


@pytest.mark.parametrize("begin", ["before", "inside"])
async def test_xact_under_a_session_hold_takes_the_server_lock(
    begin: str, connect: Connect, admin: asyncpg.Connection
) -> None:
    """Issue 10.6: the inner ``xact=True`` request is not "nested": it takes
    the server's transaction-level lock, so the key stays held after the
    outer session block exits, until the transaction ends."""
    conn = await connect()
    other = await connect()
    key = new_key()
    tx = conn.transaction()
    if begin == "before":
        await tx.start()
    async with aiopglock.advisory(key, db=conn) as outer:
        assert outer
        if begin == "inside":
            await tx.start()
        async with aiopglock.advisory(key, db=conn, xact=True, timeout=1) as inner:
            assert inner
            assert "nested" not in repr(inner)
            assert inner.connection is conn
            assert not await try_lock_elsewhere(other, key)
        assert not await try_lock_elsewhere(other, key)
    # The session hold is gone; the transaction still holds the key.
    assert conn.is_in_transaction()
    assert await holders(admin, key) == [conn.get_server_pid()]
    assert not await try_lock_elsewhere(other, key)
    await tx.commit()
    assert await holders(admin, key) == []
    assert await try_lock_elsewhere(other, key)


async def test_xact_on_another_connection_under_a_session_hold_is_refused(
    pool: asyncpg.Pool, connect: Connect, admin: asyncpg.Connection
) -> None:
    """It would wait for the task's own session hold: a UsageError, at once."""
    conn = await connect()
    key = new_key()
    async with aiopglock.advisory(key, db=pool) as outer:
        async with conn.transaction():
            with anyio.fail_after(5):
                with pytest.raises(aiopglock.UsageError, match="session lock"):
                    async with aiopglock.advisory(key, db=conn, xact=True):
                        pytest.fail("the block must not run")
            assert await conn.fetchval("SELECT 1") == 1
        assert await holders(admin, key) == [outer.pid]
    assert await holders(admin, key) == []


async def test_xact_on_a_pool_under_a_session_hold_nests(
    app_pool: tuple[asyncpg.Pool, str], admin: asyncpg.Connection, table: str
) -> None:
    """Its own transaction ends with its block, inside the session hold: it
    nests (no second server lock, which would wait for ourselves) and still
    gets a transaction to run in."""
    pool, _ = app_pool
    key = new_key()
    async with aiopglock.advisory(key, db=pool) as outer:
        with anyio.fail_after(5):
            async with aiopglock.advisory(key, db=pool, xact=True) as inner:
                assert inner
                assert inner.connection.is_in_transaction()
                await inner.connection.execute(f"INSERT INTO {quote(table)} VALUES (1)")
                assert await holders(admin, key) == [outer.pid]
        assert await holders(admin, key) == [outer.pid]
    assert await committed(admin, table) == [1]
    assert await holders(admin, key) == []
    assert await pool_idle(pool)


# --------------------------------------------------------------------------- storms


class Stats:
    def __init__(self) -> None:
        self.iterations = 0
        self.acquired = 0
        self.finished = 0
        self.cancelled = 0
        self.committed = 0
        self.discarded = 0

    def __repr__(self) -> str:
        return (
            f"<xact storm {self.iterations} iterations: {self.acquired} acquired, "
            f"{self.finished} blocks finished, {self.committed} committed, "
            f"{self.cancelled} interrupted, {self.discarded} connections discarded>"
        )


class TxVictim(Victim):
    def __init__(self) -> None:
        super().__init__()
        self.finished = False
        self.granted = asyncio.Event()


@pytest.fixture
def storm_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger="aiopglock")
    return caplog


async def storm(
    *,
    how: str,
    db: Callable[[], Any],
    admin: asyncpg.Connection,
    blocker: asyncpg.Connection,
    table: str,
    caplog: pytest.LogCaptureFixture,
    seed: str,
    after: Callable[[], Awaitable[None]],
) -> Stats:
    rng = random.Random(seed)
    stats = Stats()
    key = new_key()
    for i in range(1, ITERATIONS + 1):
        stats.iterations += 1
        caplog.clear()
        await blocker.execute("SELECT pg_advisory_lock($1)", key)
        victim = TxVictim()
        timeout = rng.choice([None, None, 0, 0.02])

        async def body(victim: TxVictim = victim, timeout: Any = timeout, i: int = i) -> None:
            async with aiopglock.advisory(key, db=db(), xact=True, timeout=timeout) as lock:
                victim.got = bool(lock)
                if lock:
                    victim.granted.set()
                    await lock.connection.execute(f"INSERT INTO {quote(table)} VALUES ($1)", i)
                    await asyncio.sleep(0)
                    victim.finished = True

        task = asyncio.create_task(_run_victim(victim, how, rng, body))
        await _jitter(rng)
        release = asyncio.create_task(blocker.execute("SELECT pg_advisory_unlock($1)", key))
        await _jitter(rng)
        if rng.random() < GRANT_FIRST:
            with anyio.move_on_after(0.05):
                await victim.granted.wait()
        if how != "asyncio.timeout" and not task.done():
            CANCELS[how](task, victim)
        interrupted = False
        try:
            await task
        except (asyncio.CancelledError, TimeoutError):
            interrupted = True
        if victim.scope.cancelled_caught:
            interrupted = True
        stats.cancelled += interrupted
        await release
        stats.acquired += bool(victim.got)
        stats.finished += victim.finished
        if any("terminating its connection" in r.getMessage() for r in caplog.records):
            stats.discarded += 1
        # Never handed back to the pool inside a transaction (asyncpg would
        # report "Resetting connection with an active transaction").
        assert not any("active transaction" in r.getMessage() for r in caplog.records), stats
        await after()
        is_committed = await admin.fetchval(
            f"SELECT EXISTS (SELECT FROM {quote(table)} WHERE id = $1)", i
        )
        stats.committed += is_committed
        if is_committed:
            assert victim.finished, f"a block interrupted midway was committed; {stats}"
        if victim.got and not interrupted:
            assert is_committed, f"a block that ran to its end was not committed; {stats}"

        async def free() -> bool:
            return await holders(admin, key) == []

        # The blocker's hold is gone: any hold now would be the victim's.
        await wait_until(free, timeout=5, message=f"the victim's lock to go; {stats}")
    return stats


@pytest.mark.slow
@pytest.mark.parametrize("how", list(CANCELS))
async def test_storm_pool(
    how: str,
    app_pool: tuple[asyncpg.Pool, str],
    connect: Connect,
    admin: asyncpg.Connection,
    table: str,
    storm_log: pytest.LogCaptureFixture,
) -> None:
    pool, app = app_pool
    blocker = await connect()

    async def after() -> None:
        await wait_until(lambda: pool_idle(pool), timeout=5, message="the pool to be idle")
        assert await in_transaction_pids(admin, app) == []
        backends = await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app
        )
        assert backends <= pool.get_size() + 1, (backends, pool.get_size())

    stats = await storm(
        how=how,
        db=lambda: pool,
        admin=admin,
        blocker=blocker,
        table=table,
        caplog=storm_log,
        seed=f"pool-{how}",
        after=after,
    )
    print(stats)
    assert stats.acquired > 0 and stats.cancelled > 0 and stats.committed > 0, stats
    if how != "cancel-twice":
        assert stats.discarded == 0, stats


@pytest.mark.slow
@pytest.mark.parametrize("how", ["task.cancel", "anyio-scope"])
async def test_storm_connection(
    how: str,
    connect: Connect,
    admin: asyncpg.Connection,
    table: str,
    storm_log: pytest.LogCaptureFixture,
) -> None:
    """A Connection outside a transaction: no pool reset to hide a leftover."""
    app = unique_name("aiopglock-xact-conn")
    blocker = await connect()
    conns = [await connect(server_settings={"application_name": app})]

    async def after() -> None:
        conn = conns[0]
        if conn.is_closed():  # discarded as the last resort
            conns[0] = await connect(server_settings={"application_name": app})
            return
        assert not conn.is_in_transaction()
        assert await _settle(conn, "SELECT 1") == "SELECT 1"
        assert await in_transaction_pids(admin, app) == []
        # asyncpg's record of the transaction was ended too.
        async with conn.transaction():
            pass

    stats = await storm(
        how=how,
        db=lambda: conns[0],
        admin=admin,
        blocker=blocker,
        table=table,
        caplog=storm_log,
        seed=f"conn-{how}",
        after=after,
    )
    print(stats)
    assert stats.acquired > 0 and stats.cancelled > 0 and stats.committed > 0, stats
    assert stats.discarded == 0, stats


@pytest.mark.parametrize("cancel_on_lost", [True, False])
async def test_backend_terminated_just_before_commit(
    cancel_on_lost: bool, app_pool: tuple[asyncpg.Pool, str], admin: asyncpg.Connection
) -> None:
    """The backend is terminated and the block ends at once, before the client
    has read the connection's end: the COMMIT at exit meets a dead
    connection. That is LockLost (the COMMIT's outcome unknown), never a
    silent success nor a raw asyncpg error."""
    pool, _ = app_pool
    key = new_key()
    outcomes: dict[str, int] = {}
    for _ in range(10):
        try:
            async with aiopglock.advisory(
                key, db=pool, xact=True, cancel_on_lost=cancel_on_lost
            ) as lock:
                assert lock
                await terminate_backend(admin, lock.pid)
            outcome = "silent exit"
        except aiopglock.LockLost:
            outcome = "LockLost"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        await wait_until(lambda: pool_idle(pool))

        async def released() -> bool:
            return await holders(admin, key) == []

        await wait_until(released)
    assert outcomes == {"LockLost": 10}, outcomes


async def test_a_session_request_after_an_xact_block_does_not_wait_for_itself(
    connect: Connect, pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    """The xact=True block has ended but its transaction (the caller's) still
    holds the key: the same task asking for it on another connection would
    wait for itself. It is refused at once; once the transaction has ended it
    is granted; on the same connection PostgreSQL re-enters."""
    conn = await connect()
    key = new_key()
    async with conn.transaction():
        async with aiopglock.advisory(key, db=conn, xact=True) as inner:
            assert inner
        assert await holders(admin, key) == [conn.get_server_pid()]
        with anyio.fail_after(5):
            with pytest.raises(aiopglock.UsageError, match="transaction is still open"):
                async with aiopglock.advisory(key, db=pool):
                    pass
            async with aiopglock.advisory(key, db=conn) as again:  # same session
                assert again
    assert pool.get_idle_size() == pool.get_size()
    with anyio.fail_after(5):
        async with aiopglock.advisory(key, db=pool) as lock:
            assert lock
            assert await holders(admin, key) == [lock.pid]


@pytest.mark.parametrize(
    "form", ["pool xact", "locker", "db=locker", "locker xact", "db=locker xact"]
)
async def test_every_path_refuses_to_wait_for_the_tasks_own_open_xact_hold(
    connect: Connect, pool: asyncpg.Pool, admin: asyncpg.Connection, form: str
) -> None:
    conn = await connect()
    key = new_key()
    async with aiopglock.Locker(pool) as locker:

        def spec() -> Any:
            xact = form.endswith("xact")
            if form.startswith("pool"):
                return aiopglock.advisory(key, db=pool, xact=xact)
            if form.startswith("db=locker"):
                return aiopglock.advisory(key, db=locker, xact=xact)
            return locker.advisory(key, xact=xact)

        async with conn.transaction():
            async with aiopglock.advisory(key, db=conn, xact=True) as inner:
                assert inner
            with anyio.fail_after(5), pytest.raises(aiopglock.UsageError, match="still open"):
                async with spec():
                    pass
        with anyio.fail_after(5):
            async with spec() as lock:
                assert lock
        assert await holders(admin, key) == []
