"""Cancellation storms for ``aiopglock.table`` and ``aiopglock.rows``.

The same standard as the advisory storms (``tests/test_cancellation.py``,
whose victims and ways of cancelling are reused here): a blocker session
holds the table (or row) in a transaction; a victim task asks for it through
aiopglock and writes a row inside the block; the blocker commits while the
victim is cancelled a random moment later, so the cancellation lands before
``BEGIN``, while the lock waits, at the instant of the grant, inside the
block or during ``COMMIT``. After the victim's ``async with`` has exited:

- no transaction of the victim's is open (``pg_stat_activity.xact_start`` of
  its application), unless it was the caller's own;
- no lock of the victim's is held (``pg_locks``; a row lock by a competing
  ``NOWAIT``);
- the pool has every connection back, and the server sees no more
  connections of the victim's application than the pool owns;
- the row written in the block was committed only if the block ran to its
  end, and always when the victim was not interrupted.

``AIOPGLOCK_STORM`` scales the iterations (default 1000, of which these
storms run a sixth each).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import asyncpg
import pytest

import aiopglock
from tests._helpers import Connect, wait_until
from tests._relations import Tables, in_transaction_pids, quote, relation_locks, unique_name
from tests.test_cancellation import CANCELS, Victim, _jitter, _run_victim, _settle

# The share of iterations that wait for the grant before cancelling.
GRANT_FIRST = 0.15
ITERATIONS = max(int(os.environ.get("AIOPGLOCK_STORM", "1000")) // 6, 40)

pytestmark = pytest.mark.slow


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
            f"<Stats {self.iterations} iterations: {self.acquired} acquired, "
            f"{self.finished} blocks finished, {self.committed} committed, "
            f"{self.cancelled} interrupted, {self.discarded} connections discarded>"
        )


class TxVictim(Victim):
    def __init__(self) -> None:
        super().__init__()
        self.finished = False  # the block's body ran to its end
        # In the body's own INSERT: a cancellation that interrupts it on the
        # server fails it, and so aborts the caller's transaction, as it
        # would without aiopglock.
        self.in_statement = False
        self.pid: int | None = None
        self.granted = asyncio.Event()  # set as the block starts with its lock


@pytest.fixture
async def target(tables: Tables, admin: asyncpg.Connection) -> tuple[str, int]:
    """The contended table (row id 0 is the contended row) and its oid."""
    name = unique_name("storm")
    oid = await tables.create(name, columns="id int PRIMARY KEY")
    await admin.execute(f"INSERT INTO {quote(name)} VALUES (0)")
    return name, oid


@pytest.fixture
async def blocker(connect: Connect, tables: Tables) -> AsyncIterator[asyncpg.Connection]:
    conn: asyncpg.Connection = await connect()
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def app_pool(pg_server: Any, tables: Tables) -> AsyncIterator[tuple[asyncpg.Pool, str]]:
    """A pool whose connections carry an application_name of their own."""
    app = unique_name("aiopglock-storm")
    pool = await asyncpg.create_pool(
        pg_server.dsn, min_size=1, max_size=3, server_settings={"application_name": app}
    )
    try:
        yield pool, app
    finally:
        await asyncio.wait_for(pool.close(), 10)


@pytest.fixture
def storm_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger="aiopglock")
    return caplog


Body = Callable[[TxVictim, int], Callable[[], Awaitable[None]]]


def table_body(db: Any, name: str, rng: random.Random) -> Body:
    def make(victim: TxVictim, i: int) -> Callable[[], Awaitable[None]]:
        timeout = rng.choice([None, None, 0, 0.02])
        mode = rng.choice(["share row exclusive", "exclusive", "access exclusive"])

        async def body() -> None:
            async with aiopglock.table(name, db=db, mode=mode, timeout=timeout) as lock:
                victim.got = bool(lock)
                if lock:
                    victim.granted.set()
                    victim.pid = lock.pid
                    victim.in_statement = True
                    await lock.connection.execute(f"INSERT INTO {quote(name)} VALUES ($1)", i)
                    victim.in_statement = False
                    await asyncio.sleep(0)
                    victim.finished = True

        return body

    return make


def rows_body(db: Any, name: str, rng: random.Random) -> Body:
    def make(victim: TxVictim, i: int) -> Callable[[], Awaitable[None]]:
        timeout = rng.choice([None, None, 0, 0.02])
        strength = rng.choice(["update", "no key update", "share"])

        async def body() -> None:
            async with aiopglock.rows(
                f"SELECT id FROM {quote(name)} WHERE id = 0",
                db=db,
                strength=strength,
                timeout=timeout,
            ) as lock:
                victim.got = bool(lock)
                if lock:
                    victim.granted.set()
                    victim.pid = lock.pid
                    assert [r["id"] for r in lock] == [0]
                    victim.in_statement = True
                    await lock.connection.execute(f"INSERT INTO {quote(name)} VALUES ($1)", i)
                    victim.in_statement = False
                    await asyncio.sleep(0)
                    victim.finished = True

        return body

    return make


async def _row_free(admin: asyncpg.Connection, name: str) -> bool:
    """Whether nobody holds a lock on row 0 (a NOWAIT probe, rolled back)."""
    try:
        async with admin.transaction():
            await admin.fetch(f"SELECT id FROM {quote(name)} WHERE id = 0 FOR UPDATE NOWAIT")
    except asyncpg.LockNotAvailableError:
        return False
    return True


async def storm(
    *,
    how: str,
    kind: str,
    admin: asyncpg.Connection,
    blocker: asyncpg.Connection,
    target: tuple[str, int],
    make_body: Body,
    caplog: pytest.LogCaptureFixture,
    rng: random.Random,
    before: Callable[[], Awaitable[None]] | None = None,
    after: Callable[[TxVictim], Awaitable[None]],
    in_callers_transaction: bool = False,
) -> Stats:
    name, oid = target
    stats = Stats()
    if kind == "table":
        hold = f"LOCK TABLE {quote(name)} IN SHARE MODE"
    else:
        hold = f"SELECT id FROM {quote(name)} WHERE id = 0 FOR UPDATE"
    for i in range(1, ITERATIONS + 1):
        stats.iterations += 1
        caplog.clear()
        await blocker.execute("BEGIN")
        await blocker.execute(hold)
        if before is not None:
            await before()
        victim = TxVictim()
        task = asyncio.create_task(_run_victim(victim, how, rng, make_body(victim, i)))
        await _jitter(rng)
        release = asyncio.create_task(blocker.execute("COMMIT"))
        await _jitter(rng)
        if rng.random() < GRANT_FIRST:
            # Now and then let the grant come first, however slow the machine
            # is today: the cancellation then lands inside the block or its exit.
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
        # asyncpg was never left with aiopglock's transaction as its own (the
        # pool's reset would report it as an active transaction).
        assert not [r for r in caplog.records if "active transaction" in r.getMessage()]
        await after(victim)
        if not in_callers_transaction:
            committed = await admin.fetchval(
                f"SELECT EXISTS (SELECT FROM {quote(name)} WHERE id = $1)", i
            )
            stats.committed += committed
            if committed:
                assert victim.finished, f"a block interrupted midway was committed; {stats}"
            if victim.got and not interrupted:
                assert committed, f"a block that ran to its end was not committed; {stats}"

        # No lock of the victim's is left: the blocker's is gone, so any
        # lock on the table now is the victim's.
        async def no_locks() -> bool:
            return await relation_locks(admin, oid) == [] and await _row_free(admin, name)

        await wait_until(no_locks, timeout=5, message=f"the victim's locks to go; {stats}")
    return stats


def _pool_after(
    pool: asyncpg.Pool, app: str, admin: asyncpg.Connection
) -> Callable[[TxVictim], Awaitable[None]]:
    async def after(victim: TxVictim) -> None:
        async def settled() -> bool:
            return pool.get_idle_size() == pool.get_size()

        await wait_until(settled, timeout=5, message="every connection back in the pool")
        assert await in_transaction_pids(admin, app) == []
        # No connection leaked: the server sees at most the pool's (a
        # discarded one may still be exiting).
        backends = await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app
        )
        assert backends <= pool.get_size() + 1, (backends, pool.get_size())

    return after


@pytest.mark.parametrize("how", list(CANCELS))
@pytest.mark.parametrize("kind", ["table", "rows"])
async def test_storm_pool(
    kind: str,
    how: str,
    app_pool: tuple[asyncpg.Pool, str],
    admin: asyncpg.Connection,
    blocker: asyncpg.Connection,
    target: tuple[str, int],
    storm_log: pytest.LogCaptureFixture,
) -> None:
    pool, app = app_pool
    rng = random.Random(f"{kind}-{how}")
    make = table_body if kind == "table" else rows_body
    stats = await storm(
        how=how,
        kind=kind,
        admin=admin,
        blocker=blocker,
        target=target,
        make_body=make(pool, target[0], rng),
        caplog=storm_log,
        rng=rng,
        after=_pool_after(pool, app, admin),
    )
    print(stats)
    assert stats.acquired > 0 and stats.cancelled > 0 and stats.committed > 0, stats
    if how != "cancel-twice":
        assert stats.discarded == 0, stats


@pytest.mark.parametrize("how", ["task.cancel", "anyio-scope"])
@pytest.mark.parametrize("kind", ["table", "rows"])
async def test_storm_connection(
    kind: str,
    how: str,
    connect: Connect,
    admin: asyncpg.Connection,
    blocker: asyncpg.Connection,
    target: tuple[str, int],
    storm_log: pytest.LogCaptureFixture,
) -> None:
    """``db`` a Connection outside a transaction: aiopglock's own transaction
    on the caller's connection, with no pool reset to hide a leftover."""
    app = unique_name("aiopglock-storm-conn")
    conns = [await connect(server_settings={"application_name": app})]
    rng = random.Random(f"conn-{kind}-{how}")
    make = table_body if kind == "table" else rows_body

    def make_body(victim: TxVictim, i: int) -> Callable[[], Awaitable[None]]:
        return make(conns[0], target[0], rng)(victim, i)

    async def after(victim: TxVictim) -> None:
        conn = conns[0]
        if conn.is_closed():  # discarded as the last resort
            conns[0] = await connect(server_settings={"application_name": app})
            return
        assert not conn.is_in_transaction()
        assert await _settle(conn, "SELECT 1") == "SELECT 1"
        assert await in_transaction_pids(admin, app) == []
        # asyncpg has forgotten aiopglock's transaction: a new one is top level.
        async with conn.transaction():
            assert await conn.fetchval("SELECT 1") == 1

    stats = await storm(
        how=how,
        kind=kind,
        admin=admin,
        blocker=blocker,
        target=target,
        make_body=make_body,
        caplog=storm_log,
        rng=rng,
        after=after,
    )
    print(stats)
    assert stats.acquired > 0 and stats.cancelled > 0 and stats.committed > 0, stats
    assert stats.discarded == 0, stats


@pytest.mark.parametrize("how", list(CANCELS))
@pytest.mark.parametrize("kind", ["table", "rows"])
async def test_storm_inside_callers_transaction(
    kind: str,
    how: str,
    connect: Connect,
    admin: asyncpg.Connection,
    blocker: asyncpg.Connection,
    target: tuple[str, int],
    storm_log: pytest.LogCaptureFixture,
) -> None:
    """The caller's transaction, opened and ended by this controller: after
    the block it is still open and usable (never aborted by an interrupted
    wait), and its ROLLBACK leaves nothing held."""
    conn = await connect()
    late: list[int] = []
    interrupted: list[int] = []
    rng = random.Random(f"tx-{kind}-{how}")
    make = table_body if kind == "table" else rows_body

    async def before() -> None:
        await conn.execute("BEGIN")

    async def after(victim: TxVictim) -> None:
        assert not conn.is_closed(), "the connection was discarded"
        assert conn.is_in_transaction()
        # Usable: a statement runs. (A CancelRequest of the victim's that
        # lands late may cancel this one instead: asyncpg's trap, not a
        # transaction aiopglock left aborted.)
        try:
            assert await conn.fetchval("SELECT 1") == 1
        except asyncpg.QueryCanceledError:
            late.append(1)
        except asyncpg.InFailedSQLTransactionError:
            # Aborted: only by the body's own INSERT, failed on the server by
            # the cancellation that interrupted it; never by aiopglock's steps.
            assert victim.in_statement, "the caller's transaction was left aborted"
            interrupted.append(1)
        await _settle(conn, "ROLLBACK")
        assert not conn.is_in_transaction()

    stats = await storm(
        how=how,
        kind=kind,
        admin=admin,
        blocker=blocker,
        target=target,
        make_body=make(conn, target[0], rng),
        caplog=storm_log,
        rng=rng,
        before=before,
        after=after,
        in_callers_transaction=True,
    )
    print(stats, f"{len(late)} late CancelRequests, {len(interrupted)} INSERTs interrupted")
    assert stats.acquired > 0 and stats.cancelled > 0, stats
    assert stats.discarded == 0, stats


# --------------------------------------------------------------------------- deterministic


@pytest.mark.parametrize("kind", ["table", "rows"])
async def test_cancel_while_waiting_inside_callers_transaction(
    kind: str,
    connect: Connect,
    admin: asyncpg.Connection,
    blocker: asyncpg.Connection,
    target: tuple[str, int],
) -> None:
    """Cancelled mid-wait inside the caller's transaction: the wait is gone
    at once, nothing is held, and the transaction is still usable."""
    name, oid = target
    conn = await connect()
    await blocker.execute("BEGIN")
    if kind == "table":
        # Does not conflict with the caller's INSERT (ROW EXCLUSIVE), does
        # with the ACCESS EXCLUSIVE asked for.
        await blocker.execute(f"LOCK TABLE {quote(name)} IN SHARE UPDATE EXCLUSIVE MODE")
        request: Any = aiopglock.table(name, db=conn)
    else:
        await blocker.execute(f"SELECT id FROM {quote(name)} WHERE id = 0 FOR UPDATE")
        request = aiopglock.rows(f"SELECT id FROM {quote(name)} WHERE id = 0", db=conn)
    await conn.execute("BEGIN")
    await conn.execute(f"INSERT INTO {quote(name)} VALUES (1)")

    async def victim() -> None:
        async with request:
            pytest.fail("granted while the blocker holds it")

    async def waiting() -> bool:
        return bool(
            await admin.fetchval(
                "SELECT count(*) FROM pg_locks WHERE pid = $1 AND NOT granted",
                conn.get_server_pid(),
            )
        )

    task = asyncio.create_task(victim())
    await wait_until(waiting)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not await waiting()
    assert conn.is_in_transaction()
    await conn.execute(f"INSERT INTO {quote(name)} VALUES (2)")
    await blocker.execute("COMMIT")
    await conn.execute("COMMIT")
    assert await admin.fetchval(f"SELECT count(*) FROM {quote(name)}") == 3
    assert await relation_locks(admin, oid) == []


# ----------------------------------------------------------------- granted at the timeout (9.1)

TIMEOUT_ROUNDS = max(int(os.environ.get("AIOPGLOCK_STORM", "1000")) // 4, 40)


@pytest.mark.parametrize("where", ["own transaction", "caller's transaction"])
@pytest.mark.parametrize("kind", ["table", "rows"])
async def test_storm_timeout_races_the_release(
    kind: str,
    where: str,
    app_pool: tuple[asyncpg.Pool, str],
    connect: Connect,
    admin: asyncpg.Connection,
    blocker: asyncpg.Connection,
    target: tuple[str, int],
) -> None:
    """``lock_timeout`` can fire as the lock is granted: PostgreSQL raises
    55P03 and the backend holds the lock. A 1-5 ms timeout races the
    holder's COMMIT, round after round; whenever the handle is falsy, the
    waiter's backend holds nothing on the table or the row afterwards (the
    grant went with the rolled-back transaction or savepoint), and the
    caller's transaction is intact and usable."""
    name, oid = target
    pool, app = app_pool
    rng = random.Random(f"timeout-{kind}-{where}")
    conn: Any = None
    if where == "caller's transaction":
        conn = await connect(server_settings={"application_name": app})
    if kind == "table":
        # Conflicts with EXCLUSIVE, not with the caller's INSERT.
        hold = f"LOCK TABLE {quote(name)} IN SHARE UPDATE EXCLUSIVE MODE"
    else:
        hold = f"SELECT id FROM {quote(name)} WHERE id = 0 FOR UPDATE"
    acquired = not_acquired = 0
    for i in range(1, TIMEOUT_ROUNDS + 1):
        timeout = rng.uniform(0.001, 0.005)
        if kind == "table":
            request: Any = aiopglock.table(name, db=conn or pool, mode="exclusive", timeout=timeout)
        else:
            request = aiopglock.rows(
                f"SELECT id FROM {quote(name)} WHERE id = 0", db=conn or pool, timeout=timeout
            )
        await blocker.execute("BEGIN")
        await blocker.execute(hold)
        if conn is not None:
            await conn.execute("BEGIN")
            await conn.execute(f"INSERT INTO {quote(name)} VALUES ($1)", i)
        outcome: dict[str, Any] = {}

        async def victim(request: Any = request, outcome: dict[str, Any] = outcome) -> None:
            async with request as lock:
                outcome["got"] = bool(lock)
                outcome["pid"] = lock.pid

        task = asyncio.create_task(victim())
        await asyncio.sleep(rng.uniform(0, 0.007))
        await blocker.execute("COMMIT")
        await task
        if outcome["got"]:
            acquired += 1
        else:
            not_acquired += 1
        # The blocker's locks are gone: whatever is held now is the waiter's.
        if conn is None:
            await wait_until(
                lambda: _idle(pool), timeout=5, message="every connection back in the pool"
            )
            assert await in_transaction_pids(admin, app) == []
            assert await relation_locks(admin, oid) == []
            assert await _row_free(admin, name)
        else:
            assert conn.is_in_transaction()
            if not outcome["got"]:
                pid = conn.get_server_pid()
                # Only the caller's own INSERT's lock, nothing of the wait.
                assert await relation_locks(admin, oid, pid=pid) == [
                    (pid, "RowExclusiveLock", True)
                ], (i, kind)
                assert await _row_free(admin, name), (i, kind)
            # Intact and usable: the caller's own row is there.
            assert await conn.fetchval(f"SELECT count(*) FROM {quote(name)} WHERE id = $1", i) == 1
            await conn.execute("ROLLBACK")
            assert await relation_locks(admin, oid) == []
    print(
        f"{kind}, {where}: {TIMEOUT_ROUNDS} races, {acquired} acquired, "
        f"{not_acquired} timed out, 0 locks left"
    )
    assert acquired > 0 and not_acquired > 0


async def _idle(pool: asyncpg.Pool) -> bool:
    return pool.get_idle_size() == pool.get_size()
