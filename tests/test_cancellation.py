"""Cancellation storms: cancel at random points while another session releases.

Each iteration: a blocker session holds the key; a victim task asks for it
through aiopglock; the blocker releases it while the victim is cancelled a
random moment later, so the cancellation lands before the request is sent,
while it waits, at the instant of the grant, inside the block or during the
release. After the victim's ``async with`` has exited, the server must show
no lock of the victim's, and no connection may be leaked.

A control runs the same storm on plain asyncpg (lock, then unlock in a
``finally``) and must leak: proof that the storm reaches the race window.

``AIOPGLOCK_STORM`` sets the iterations per storm (default 1000).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import asyncpg
import pytest

import aiopglock
from tests._helpers import (
    Connect,
    check_local_backend,
    holders,
    wait_for_waiter,
    wait_until,
    waiters,
)

ITERATIONS = int(os.environ.get("AIOPGLOCK_STORM", "1000"))
KEY = 0x5EED_0000_0001
PAIR = (20_241, -7)

pytestmark = pytest.mark.slow


class Storm:
    """One storm's bookkeeping: outcomes, and the connections it discarded."""

    def __init__(self) -> None:
        self.acquired = 0
        self.cancelled = 0
        self.discarded = 0
        self.iterations = 0

    def __repr__(self) -> str:
        return (
            f"<Storm {self.iterations} iterations: {self.acquired} acquired, "
            f"{self.cancelled} interrupted, {self.discarded} connections discarded>"
        )


async def _jitter(rng: random.Random) -> None:
    """Wait a random, fine-grained number of event-loop turns (I/O is polled
    at each turn), sometimes up to about a millisecond."""
    if rng.random() < 0.3:
        await asyncio.sleep(rng.uniform(0, 0.001))
    for _ in range(rng.randint(0, 40)):
        await asyncio.sleep(0)


Cancel = Callable[[asyncio.Task[Any], "Victim"], None]


class Victim:
    """Runs a body in its own task; knows how to be cancelled in each way."""

    def __init__(self) -> None:
        self.scope = anyio.CancelScope()  # cancelled before entry: cancelled at entry
        self.got: bool | None = None
        self.began = False  # the victim's own transaction block was entered
        self.in_statement = False  # a statement of the block's own was running


def cancel_task(task: asyncio.Task[Any], victim: Victim) -> None:
    task.cancel()


def cancel_scope(task: asyncio.Task[Any], victim: Victim) -> None:
    victim.scope.cancel()


def cancel_twice(task: asyncio.Task[Any], victim: Victim) -> None:
    # The second raw cancel lands during cleanup: the last line of defence.
    task.cancel()
    asyncio.get_running_loop().call_soon(task.cancel)


CANCELS: dict[str, Cancel] = {
    "task.cancel": cancel_task,
    "anyio-scope": cancel_scope,
    "cancel-twice": cancel_twice,
}
if sys.version_info >= (3, 11):
    CANCELS["asyncio.timeout"] = cancel_task  # the deadline is set by the victim itself


#: The share of asyncio.timeout storm iterations whose deadline leaves room to finish.
LONG_DEADLINE = 0.1


async def _run_victim(
    victim: Victim, how: str, rng: random.Random, body: Callable[[], Awaitable[None]]
) -> None:
    if how == "anyio-scope":
        with victim.scope:
            await body()
    elif how == "asyncio.timeout":
        async with asyncio.timeout(None) as deadline:  # type: ignore[attr-defined]
            # Mostly within 2 ms of the start (the race); now and then half a
            # second, so some blocks end on their own however slow the machine
            # is today (the storms also check what a finished block leaves).
            delay = 0.5 if rng.random() < LONG_DEADLINE else rng.uniform(0, 0.002)
            deadline.reschedule(asyncio.get_running_loop().time() + delay)
            await body()
    else:
        await body()


async def storm(
    *,
    admin: asyncpg.Connection,
    blocker: asyncpg.Connection,
    key: int | tuple[int, int],
    how: str,
    make_body: Callable[[Victim], Callable[[], Awaitable[None]]],
    after: Callable[[Victim], Awaitable[None]],
    seed: int,
    before: Callable[[], Awaitable[None]] | None = None,
    caplog: pytest.LogCaptureFixture,
    iterations: int = ITERATIONS,
    expect_clean: bool = True,
) -> Storm:
    rng = random.Random(seed)
    stats = Storm()
    server_key = aiopglock.advisory_key(key)
    args = server_key if isinstance(server_key, tuple) else (server_key,)
    lock_sql = (
        "SELECT pg_advisory_lock($1, $2)" if len(args) == 2 else "SELECT pg_advisory_lock($1)"
    )
    unlock_sql = lock_sql.replace("pg_advisory_lock", "pg_advisory_unlock")
    for _ in range(iterations):
        stats.iterations += 1
        caplog.clear()
        await blocker.execute(lock_sql, *args)
        if before is not None:
            await before()
        victim = Victim()
        task = asyncio.create_task(_run_victim(victim, how, rng, make_body(victim)))
        await _jitter(rng)
        release = asyncio.create_task(blocker.execute(unlock_sql, *args))
        await _jitter(rng)
        if how != "asyncio.timeout" and not task.done():
            CANCELS[how](task, victim)
        try:
            await task
        except (asyncio.CancelledError, TimeoutError):
            stats.cancelled += 1
        if victim.scope.cancelled_caught:  # anyio swallows its own cancellation
            stats.cancelled += 1
        await release
        if victim.got:
            stats.acquired += 1
        discarded = any("terminating its connection" in r.getMessage() for r in caplog.records)
        if discarded:
            # Last resort: the connection was terminated; its backend drops
            # the lock as it exits, a moment later.
            stats.discarded += 1
            await wait_until(lambda: _free(admin, server_key), timeout=5)
        elif expect_clean:
            held = await holders(admin, server_key)
            assert held == [], f"lock left held by {held} after the block exited; {stats}"
        await after(victim)
    return stats


async def _free(admin: asyncpg.Connection, key: int | tuple[int, int]) -> bool:
    return await holders(admin, key) == []


def _session_body(
    db: Any, key: Any, **kw: Any
) -> Callable[[Victim], Callable[[], Awaitable[None]]]:
    def make(victim: Victim) -> Callable[[], Awaitable[None]]:
        async def body() -> None:
            async with aiopglock.advisory(key, db=db, **kw) as lock:
                victim.got = bool(lock)
                await asyncio.sleep(0)

        return body

    return make


@pytest.fixture
def storm_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger="aiopglock")
    return caplog


@pytest.mark.parametrize("how", list(CANCELS))
async def test_storm_pool_session_lock(
    how: str,
    pool: asyncpg.Pool,
    admin: asyncpg.Connection,
    connect: Connect,
    storm_log: pytest.LogCaptureFixture,
) -> None:
    blocker = await connect()
    stats = await storm(
        admin=admin,
        blocker=blocker,
        key=KEY,
        how=how,
        make_body=_session_body(pool, KEY),
        after=_pool_back(pool),
        seed=1,
        caplog=storm_log,
    )
    print(stats)
    # The storm must exercise both outcomes, or it proved nothing.
    assert stats.acquired > 0 and stats.cancelled > 0, stats
    # Discarding is the last resort, not the routine: only a second raw
    # cancel landing in cleanup may force it.
    if how != "cancel-twice":
        assert stats.discarded == 0, stats


async def _pool_idle(pool: asyncpg.Pool) -> bool:
    return pool.get_idle_size() == pool.get_size()


def _pool_back(pool: asyncpg.Pool) -> Callable[[Victim], Awaitable[None]]:
    """The storms' after-check for a Pool: no connection leaked, every one is
    back (asyncpg may still be finishing a shielded release that a raw cancel
    interrupted)."""

    async def after(victim: Victim) -> None:
        await wait_until(lambda: _pool_idle(pool), timeout=5)

    return after


@pytest.mark.parametrize("how", list(CANCELS))
async def test_storm_connection_session_lock(
    how: str,
    admin: asyncpg.Connection,
    connect: Connect,
    storm_log: pytest.LogCaptureFixture,
) -> None:
    """``db`` a Connection: no pool reset to hide a leak."""
    blocker = await connect()
    conns = [await connect()]

    def make(victim: Victim) -> Callable[[], Awaitable[None]]:
        return _session_body(conns[0], PAIR)(victim)

    async def after(victim: Victim) -> None:
        conn = conns[0]
        if conn.is_closed():  # discarded as the last resort
            conns[0] = await connect()
            return
        # The connection is clean and usable: no lock, no transaction.
        assert not conn.is_in_transaction()
        assert await conn.fetchval("SELECT 1") == 1
        mine = await holders(admin, aiopglock.advisory_key(PAIR))
        assert conn.get_server_pid() not in mine

    stats = await storm(
        admin=admin,
        blocker=blocker,
        key=PAIR,
        how=how,
        make_body=make,
        after=after,
        seed=2,
        caplog=storm_log,
    )
    print(stats)
    assert stats.acquired > 0 and stats.cancelled > 0, stats
    if how != "cancel-twice":
        assert stats.discarded == 0, stats


@pytest.mark.parametrize("xact", [True, False], ids=["xact-lock", "session-lock"])
@pytest.mark.parametrize("how", ["task.cancel", "anyio-scope", "cancel-twice"])
async def test_storm_inside_transaction(
    how: str,
    xact: bool,
    admin: asyncpg.Connection,
    connect: Connect,
    storm_log: pytest.LogCaptureFixture,
) -> None:
    """A lock taken inside the caller's transaction, cancelled at random points.

    The caller's transaction is opened and ended by this controller (not by
    the victim, so asyncpg's own BEGIN/ROLLBACK races stay out of the
    picture). A session lock survives a rollback unless aiopglock releases
    it: it must be gone as soon as the block exits, before the transaction
    ends. A transaction-level lock is held until the transaction ends once
    granted, so it is checked after the ROLLBACK; either way the connection
    comes back usable.

    One outcome is documented rather than avoidable: a cancellation that
    interrupts the block's own statement aborts the caller's transaction, in
    which a session lock cannot be released (PostgreSQL accepts only a
    rollback, which a session lock survives), so aiopglock terminates that
    connection. Only then may a session-lock round discard its connection.
    """
    blocker = await connect()
    conns = [await connect()]
    allowed = 0

    async def before() -> None:
        await conns[0].execute("BEGIN")

    def make(victim: Victim) -> Callable[[], Awaitable[None]]:
        conn = conns[0]

        async def body() -> None:
            async with aiopglock.advisory(KEY, db=conn, xact=xact) as lock:
                victim.got = bool(lock)
                victim.in_statement = True
                await conn.execute("SELECT 1")
                victim.in_statement = False

        return body

    async def after(victim: Victim) -> None:
        nonlocal allowed
        conn = conns[0]
        if conn.is_closed():
            assert not xact and victim.in_statement, (
                "the connection was discarded, and not after an interrupted statement "
                "aborted the caller's transaction"
            )
            allowed += 1  # (storm() has seen its lock go with the backend)
            conns[0] = await connect()
            return
        assert conn.is_in_transaction()
        await _settle(conn, "ROLLBACK")
        assert not conn.is_in_transaction()
        assert await holders(admin, KEY) == []
        assert await _settle(conn, "SELECT 1") == "SELECT 1"

    stats = await storm(
        admin=admin,
        blocker=blocker,
        key=KEY,
        how=how,
        make_body=make,
        before=before,
        after=after,
        seed=3,
        caplog=storm_log,
        iterations=max(ITERATIONS // 2, 50),
        expect_clean=not xact,
    )
    print(stats, f"{allowed} discarded after the block's statement was interrupted")
    assert stats.acquired > 0 and stats.cancelled > 0, stats
    assert stats.discarded == allowed, stats


async def _settle(conn: asyncpg.Connection, sql: str) -> str:
    """Run ``sql``, retrying once if the late CancelRequest of the victim's
    interrupted statement lands on it instead (a documented asyncpg trap)."""
    try:
        return str(await conn.execute(sql))
    except asyncpg.QueryCanceledError:
        return str(await conn.execute(sql))


@pytest.mark.parametrize("timeout", [0, 0.05], ids=["try", "lock_timeout"])
async def test_storm_with_timeouts(
    timeout: float,
    pool: asyncpg.Pool,
    admin: asyncpg.Connection,
    connect: Connect,
    storm_log: pytest.LogCaptureFixture,
) -> None:
    """The try-lock and the server-enforced lock_timeout forms race too."""
    blocker = await connect()
    stats = await storm(
        admin=admin,
        blocker=blocker,
        key=KEY,
        how="task.cancel",
        make_body=_session_body(pool, KEY, timeout=timeout, shared=True),
        after=_pool_back(pool),
        seed=4,
        caplog=storm_log,
        iterations=max(ITERATIONS // 2, 50),
    )
    print(stats)
    assert stats.cancelled > 0, stats
    assert stats.discarded == 0, stats


#: A str key: its lock statements name it on the server and go by the simple
#: query protocol (aiopglock._names), a path of their own.
NAME = "storm */ named key"


@pytest.mark.parametrize(
    ("how", "timeout"),
    [("task.cancel", None), ("cancel-twice", None), ("task.cancel", 0), ("anyio-scope", 0.05)],
)
async def test_storm_named_key(
    how: str,
    timeout: float | None,
    pool: asyncpg.Pool,
    admin: asyncpg.Connection,
    connect: Connect,
    storm_log: pytest.LogCaptureFixture,
) -> None:
    """The named statements race cancellations as the parameterised ones do."""
    blocker = await connect()
    stats = await storm(
        admin=admin,
        blocker=blocker,
        key=NAME,
        how=how,
        make_body=_session_body(pool, NAME, timeout=timeout),
        after=_pool_back(pool),
        seed=5,
        caplog=storm_log,
        iterations=max(ITERATIONS // 2, 50),
    )
    print(stats)
    assert stats.acquired > 0 and stats.cancelled > 0, stats
    if how != "cancel-twice":
        assert stats.discarded == 0, stats


async def test_control_plain_asyncpg_leaks(
    admin: asyncpg.Connection,
    connect: Connect,
    storm_log: pytest.LogCaptureFixture,
) -> None:
    """Without aiopglock the same storm leaves locks held that their caller
    believes it never got: the storm really reaches the race window."""
    blocker = await connect()
    conn = await connect()
    leaked = 0

    def make(victim: Victim) -> Callable[[], Awaitable[None]]:
        async def body() -> None:
            await conn.execute("SELECT pg_advisory_lock($1)", KEY)
            try:
                victim.got = True
                await asyncio.sleep(0)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", KEY)

        return body

    async def after(victim: Victim) -> None:
        nonlocal leaked
        # asyncpg raises CancelledError at once, while the naive victim's
        # cancelled statement may still be running on the server: let it end
        # before counting, or a lock granted a moment later goes unseen.
        await _settle(conn, "SELECT 1")
        # A late CancelRequest may have aborted the naive unlock as well.
        if conn.get_server_pid() in await holders(admin, KEY):
            leaked += 1
            await _settle(conn, "SELECT pg_advisory_unlock_all()")

    await storm(
        admin=admin,
        blocker=blocker,
        key=KEY,
        how="task.cancel",
        make_body=make,
        after=after,
        seed=5,
        caplog=storm_log,
        expect_clean=False,
    )
    print(f"plain asyncpg leaked {leaked} locks")
    assert leaked > 0


# --------------------------------------------------------------------------- deterministic


@pytest.mark.parametrize("xact", [False, True], ids=["session-lock", "xact-lock"])
async def test_cancel_while_waiting_inside_transaction(
    xact: bool, admin: asyncpg.Connection, connect: Connect
) -> None:
    """Cancelled mid-wait inside the caller's transaction: the savepoint is
    rolled back, nothing is held even before the transaction ends, and the
    transaction is still usable."""
    blocker = await connect()
    conn = await connect()
    await blocker.execute("SELECT pg_advisory_lock($1)", KEY)
    await conn.execute("BEGIN")
    await conn.execute("CREATE TEMP TABLE t_cancel_wait (x int) ON COMMIT DROP")

    async def victim() -> None:
        async with aiopglock.advisory(KEY, db=conn, xact=xact):
            pytest.fail("granted while the blocker holds the key")

    task = asyncio.create_task(victim())
    assert await wait_for_waiter(admin, KEY) == conn.get_server_pid()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await blocker.execute("SELECT pg_advisory_unlock($1)", KEY)
    assert conn.get_server_pid() not in await holders(admin, KEY)
    assert await waiters(admin, KEY) == []
    # Still the caller's transaction, still usable.
    assert conn.is_in_transaction()
    await conn.execute("INSERT INTO t_cancel_wait VALUES (1)")
    assert await conn.fetchval("SELECT count(*) FROM t_cancel_wait") == 1
    await conn.execute("COMMIT")


async def test_cleanup_that_cannot_finish_discards_the_connection(
    pool: asyncpg.Pool,
    admin: asyncpg.Connection,
    connect: Connect,
    monkeypatch: pytest.MonkeyPatch,
    storm_log: pytest.LogCaptureFixture,
) -> None:
    """The last line of defence. The victim's backend is frozen (SIGSTOP)
    while it waits, then granted the lock by the blocker's release: it holds
    the lock but cannot answer. The cancelled victim's cleanup cannot confirm
    anything, so the connection is terminated rather than returned dirty; once
    the backend runs again it finds its socket closed and exits, and the
    server drops its lock."""
    monkeypatch.setattr("aiopglock._advisory_steps.CLEANUP_STATEMENT_TIMEOUT", 0.3)
    blocker = await connect()
    await blocker.execute("SELECT pg_advisory_lock($1)", KEY)

    async def victim() -> None:
        async with aiopglock.advisory(KEY, db=pool):
            pytest.fail("the block must not run")

    task = asyncio.create_task(victim())
    victim_pid = await wait_for_waiter(admin, KEY)
    await check_local_backend(admin, victim_pid)
    stopped = False
    try:
        try:
            os.kill(victim_pid, signal.SIGSTOP)
        except (PermissionError, ProcessLookupError) as exc:
            pytest.skip(f"cannot freeze backend {victim_pid}: {exc!r}")
        stopped = True
        await blocker.execute("SELECT pg_advisory_unlock($1)", KEY)
        # Granted to the frozen backend, which cannot know it yet.
        assert await holders(admin, KEY) == [victim_pid]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert any("terminating its connection" in r.getMessage() for r in storm_log.records)
    finally:
        if stopped:
            os.kill(victim_pid, signal.SIGCONT)
    await wait_until(lambda: _free(admin, KEY), message="the discarded backend's lock to go")

    async def backend_gone() -> bool:
        return not await admin.fetchval(
            "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE pid = $1)", victim_pid
        )

    await wait_until(backend_gone, message="the discarded backend to exit")
    # The pool did not take the dirty connection back: it is whole, and no
    # connection of it is the discarded backend.
    await wait_until(lambda: _pool_idle(pool), timeout=5)
    async with pool.acquire() as conn:
        assert conn.get_server_pid() != victim_pid
    async with aiopglock.advisory(KEY, db=pool, timeout=0) as lock:
        assert lock
