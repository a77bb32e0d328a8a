"""Lost locks: the connection holding an advisory lock dies (or the lock vanishes).

DESIGN.md, "Lost locks": the handle knows within a second for a closed
connection and within the heartbeat interval for a silent one; by default the
block is cancelled and ``aiopglock.LockLost`` comes out of the ``async with``;
``cancel_on_lost=False`` lets the block finish and raises at exit. Code never
continues silently unprotected.

Every fault here is real: ``pg_terminate_backend``, a restart of the embedded
server, ``pg_advisory_unlock_all()`` on the holding session, and a backend
frozen with SIGSTOP. Detection latencies are printed (``pytest -s``) and
recorded as test properties (``--junitxml``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import asyncpg
import pytest

import aiopglock
from tests._helpers import (
    Connect,
    RestartServer,
    advisory_locks,
    check_local_backend,
    holders,
    wait_for_release,
    wait_until,
)

#: The contract's bound for noticing a closed connection.
CLOSED_BOUND = 1.0
#: Heartbeat interval used by the silent-death test, and its detection bound:
#: the contract says within one interval; 0.3 s more is scheduling slack.
FAST_HEARTBEAT = 0.2
SILENT_BOUND = FAST_HEARTBEAT + 0.3
#: aiopglock's documented default heartbeat.
DEFAULT_HEARTBEAT = 5.0
#: How long a block waits for the cancellation that a lost lock must bring.
#: Reaching the end of that wait means the loss went unnoticed: the test fails.
PARK = 10.0

RecordProperty = Callable[[str, object], None]


def key_of(name: str) -> int:
    key = aiopglock.advisory_key(f"tests.test_lost:{name}")
    assert isinstance(key, int)
    return key


def report(record_property: RecordProperty, what: str, seconds: float) -> None:
    """Print (visible with ``-s``) and record a measured detection latency."""
    record_property(f"latency[{what}]", round(seconds, 4))
    print(f"\n[aiopglock lost-lock latency] {what}: {seconds * 1000:.1f} ms")


async def terminate_backend(admin: asyncpg.Connection, pid: int) -> float:
    """``pg_terminate_backend(pid)`` from the admin session; returns the
    ``time.monotonic()`` taken just before it was sent.

    When the lock's loss is noticed while this admin query is still in
    flight, the block's cancellation (a raw ``Task.cancel()``, which an anyio
    shield does not stop) lands here: the query is let finish (so that no
    CancelRequest reaches the admin connection) and the cancellation goes on.
    Callers that measure a latency read the clock themselves, before calling.
    """
    started = time.monotonic()
    fut = asyncio.ensure_future(admin.fetchval("SELECT pg_terminate_backend($1)", pid))
    try:
        signalled = await asyncio.shield(fut)
    except asyncio.CancelledError:
        await asyncio.wait([fut])
        assert fut.result() is True, f"pg_terminate_backend({pid}) found no such backend"
        raise
    assert signalled is True, f"pg_terminate_backend({pid}) found no such backend"
    return started


async def park() -> None:
    """Wait for a cancellation that must come; return (so the caller can fail
    the test) only if it has not come after ``PARK`` seconds."""
    with anyio.move_on_after(PARK):
        await anyio.Event().wait()


def assert_no_pending_cancel() -> None:
    """The task that caught LockLost carries no leftover cancellation request."""
    if sys.version_info >= (3, 11):
        current = asyncio.current_task()
        assert current is not None
        assert current.cancelling() == 0, "aiopglock left a cancellation request on the task"


async def assert_pool_recovers(
    pool: asyncpg.Pool, admin: asyncpg.Connection, key: int, dead_pid: int | None = None
) -> None:
    """Every connection of ``pool`` is back (none leaked or stuck) and a new
    lock on the same pool is granted on a live backend and shows in pg_locks."""

    async def settled() -> bool:
        return pool.get_idle_size() == pool.get_size()

    await wait_until(settled, message="every pool connection to be idle again")
    async with aiopglock.advisory(key, db=pool, timeout=5, side_effect=aiopglock.Raise) as again:
        assert again
        assert again.pid is not None
        assert again.pid != dead_pid
        assert await holders(admin, key, mode="ExclusiveLock") == [again.pid]
    assert await holders(admin, key) == []
    await wait_until(settled, message="the pool to settle after the new lock")


async def is_lost(lock: aiopglock.AdvisoryLock) -> bool:
    return lock.lost


# --------------------------------------------------------------------------- terminate


async def terminate_inside(
    admin: asyncpg.Connection, key: int, db: Any
) -> tuple[aiopglock.AdvisoryLock, float]:
    """Hold ``key`` on ``db``, terminate the holder's backend from ``admin``
    inside the block, and check the block went no further and LockLost came
    out of it. Returns the handle and the detection latency."""
    reached = False
    started = 0.0
    with pytest.raises(aiopglock.LockLost) as info:
        async with aiopglock.advisory(key, db=db) as lock:
            assert lock
            assert lock.pid is not None
            assert await holders(admin, key, mode="ExclusiveLock") == [lock.pid]
            started = time.monotonic()
            await terminate_backend(admin, lock.pid)
            await park()
            reached = True
    latency = time.monotonic() - started
    assert not reached, "the block ran on after its lock was lost"
    assert latency < CLOSED_BOUND
    assert lock.lost is True
    assert info.value.key == key
    assert info.value.pid == lock.pid
    assert_no_pending_cancel()
    return lock, latency


async def test_terminated_backend_pool(
    pool: asyncpg.Pool, admin: asyncpg.Connection, record_property: RecordProperty
) -> None:
    key = key_of("terminate-pool")
    lock, latency = await terminate_inside(admin, key, pool)
    report(record_property, "terminate, db=Pool", latency)
    await anyio.lowlevel.checkpoint()  # the task can keep awaiting: no cancellation leaked
    await wait_for_release(admin, key)
    await assert_pool_recovers(pool, admin, key, lock.pid)


async def test_terminated_backend_connection(
    connect: Connect, admin: asyncpg.Connection, record_property: RecordProperty
) -> None:
    key = key_of("terminate-connection")
    conn = await connect()
    lock, latency = await terminate_inside(admin, key, conn)
    report(record_property, "terminate, db=Connection", latency)
    assert lock.pid == conn.get_server_pid()
    assert conn.is_closed()
    await wait_for_release(admin, key)
    assert await advisory_locks(admin, pid=lock.pid) == []


async def test_terminated_backend_pool_proxy(
    pool: asyncpg.Pool, admin: asyncpg.Connection, record_property: RecordProperty
) -> None:
    key = key_of("terminate-proxy")
    async with pool.acquire() as conn:
        # Read now: once its backend dies, the proxy counts as released.
        pid = conn.get_server_pid()
        lock, latency = await terminate_inside(admin, key, conn)
        assert lock.pid == pid
    report(record_property, "terminate, db=pool proxy connection", latency)
    await wait_for_release(admin, key)
    await assert_pool_recovers(pool, admin, key, lock.pid)


async def test_cancel_on_lost_false_runs_block_then_raises(
    pool: asyncpg.Pool, admin: asyncpg.Connection, record_property: RecordProperty
) -> None:
    key = key_of("cancel-on-lost-false")
    finished = False
    latency = float("inf")
    with pytest.raises(aiopglock.LockLost):
        async with aiopglock.advisory(key, db=pool, cancel_on_lost=False) as lock:
            assert lock
            assert await holders(admin, key) == [lock.pid]
            started = time.monotonic()
            await terminate_backend(admin, lock.pid)
            # Awaiting (with checkpoints) after the loss: nothing cancels the block.
            await wait_until(lambda: is_lost(lock), message="the handle to report the loss")
            latency = time.monotonic() - started
            await anyio.lowlevel.checkpoint()
            await wait_for_release(admin, key)
            finished = True
    report(record_property, "terminate, cancel_on_lost=False (lock.lost set)", latency)

    assert finished, "cancel_on_lost=False: the block must run to its end"
    assert latency < CLOSED_BOUND
    assert lock.lost is True
    assert_no_pending_cancel()
    await assert_pool_recovers(pool, admin, key, lock.pid)


async def test_lock_vanishes_on_live_connection(
    connect: Connect, admin: asyncpg.Connection
) -> None:
    """The session survives but its lock is gone (``pg_advisory_unlock_all()``
    on the holding connection): the unlock at exit finds it not held."""
    key = key_of("unlock-all")
    conn = await connect()
    finished = False
    with pytest.raises(aiopglock.LockLost) as info:
        async with aiopglock.advisory(key, db=conn) as lock:
            assert lock
            assert await holders(admin, key) == [conn.get_server_pid()]
            await conn.execute("SELECT pg_advisory_unlock_all()")
            assert await holders(admin, key) == []
            finished = True
    assert finished, "a lock that vanished on a live connection is only found at exit"
    assert lock.lost is True
    assert info.value.key == key
    # Nothing is held, and the caller's connection was answered clearly: it is
    # left open and usable.
    assert await advisory_locks(admin, pid=conn.get_server_pid()) == []
    assert not conn.is_closed()
    assert await conn.fetchval("SELECT 1") == 1


async def test_connection_closed_in_block_is_lost(
    connect: Connect, admin: asyncpg.Connection
) -> None:
    """The holding connection is closed before the block ends, and the block
    ends before the termination listener's callback has run: the exit finds
    the connection already closed, so the lock was certainly not held at the
    end of the block. That must be a LockLost, not a silent exit."""
    key = key_of("closed-in-block")
    conn = await connect()
    pid = conn.get_server_pid()
    with pytest.raises(aiopglock.LockLost):
        async with aiopglock.advisory(key, db=conn) as lock:
            assert lock
            assert await holders(admin, key) == [pid]
            conn.terminate()
            assert conn.is_closed()
    assert lock.lost is True
    await wait_for_release(admin, key)


@pytest.mark.parametrize("cancel_on_lost", [True, False])
async def test_backend_terminated_just_before_exit(
    cancel_on_lost: bool, pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    """The backend is terminated and the block ends at once, before the client
    has read the connection's end: the unlock at exit then fails because the
    session is gone. The block's last statements ran while the server was
    dropping the lock, and nothing confirms it was held to the end: LockLost
    (at exit), never a silent success."""
    key = key_of(f"terminated-before-exit-{cancel_on_lost}")
    rounds = 10
    outcomes: dict[str, int] = {}
    for _ in range(rounds):
        try:
            async with aiopglock.advisory(key, db=pool, cancel_on_lost=cancel_on_lost) as lock:
                assert lock
                await terminate_backend(admin, lock.pid)
            outcome = "silent exit"
        except aiopglock.LockLost:
            outcome = "LockLost"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        await wait_for_release(admin, key)
    assert outcomes == {"LockLost": rounds}, outcomes
    await assert_pool_recovers(pool, admin, key)


async def test_nested_reentry_both_levels_raise(
    pool: asyncpg.Pool, admin: asyncpg.Connection, record_property: RecordProperty
) -> None:
    key = key_of("nested")
    reached = False
    inner_error: BaseException | None = None
    started = 0.0
    with pytest.raises(aiopglock.LockLost) as outer_info:
        async with aiopglock.advisory(key, db=pool) as outer:
            assert outer
            try:
                async with aiopglock.advisory(key, db=pool) as inner:
                    assert inner
                    assert inner.pid == outer.pid
                    # Re-entry takes no second hold on the server.
                    rows = await advisory_locks(admin, key=key)
                    assert [(r["pid"], r["mode"], r["granted"]) for r in rows] == [
                        (outer.pid, "ExclusiveLock", True)
                    ]
                    started = time.monotonic()
                    await terminate_backend(admin, outer.pid)
                    await park()
                    reached = True
            except BaseException as exc:
                inner_error = exc
                raise
    latency = time.monotonic() - started
    report(record_property, "terminate, nested re-entry", latency)

    assert not reached, "the inner block ran on after the lock was lost"
    assert isinstance(inner_error, aiopglock.LockLost), repr(inner_error)
    assert isinstance(outer_info.value, aiopglock.LockLost)
    assert latency < CLOSED_BOUND
    assert outer.lost is True
    assert inner.lost is True
    assert_no_pending_cancel()
    await wait_for_release(admin, key)
    await assert_pool_recovers(pool, admin, key, outer.pid)


@contextlib.asynccontextmanager
async def a_connection(
    kind: str, pool: asyncpg.Pool, connect: Connect
) -> AsyncIterator[asyncpg.Connection]:
    if kind == "connection":
        yield await connect()
    else:
        async with pool.acquire() as conn:
            yield conn


@pytest.mark.parametrize("kind", ["connection", "pool proxy"])
async def test_xact_lock_lost(
    kind: str,
    pool: asyncpg.Pool,
    connect: Connect,
    admin: asyncpg.Connection,
    record_property: RecordProperty,
) -> None:
    key = key_of(f"xact-{kind}")
    reached = False
    started = 0.0
    async with a_connection(kind, pool, connect) as conn:
        # The transaction is started by hand: asyncpg's own `async with
        # transaction()` would try to ROLLBACK on the dead connection at exit.
        transaction = conn.transaction()
        await transaction.start()
        pid = conn.get_server_pid()
        with pytest.raises(aiopglock.LockLost):
            async with aiopglock.advisory(key, db=conn, xact=True) as lock:
                assert lock
                assert await holders(admin, key, mode="ExclusiveLock") == [pid]
                started = time.monotonic()
                await terminate_backend(admin, pid)
                await park()
                reached = True
        latency = time.monotonic() - started
        if kind == "connection":
            assert conn.is_closed()
        # (A pool's proxy is already detached: asyncpg released it when its
        # connection closed.)
    report(record_property, f"terminate, xact lock on a {kind}", latency)

    assert not reached, "the block ran on after its lock was lost"
    assert latency < CLOSED_BOUND
    assert lock.lost is True
    assert_no_pending_cancel()
    await wait_for_release(admin, key)
    await assert_pool_recovers(pool, admin, key, pid)


# --------------------------------------------------------------------------- restart


@pytest.mark.embedded_only
async def test_server_restart(
    pool: asyncpg.Pool,
    connect: Connect,
    restart_server: RestartServer,
    record_property: RecordProperty,
) -> None:
    key = key_of("restart")
    observer = await connect()
    reached = False
    started = 0.0
    async with anyio.create_task_group() as tg:
        with pytest.raises(aiopglock.LockLost):
            async with aiopglock.advisory(key, db=pool) as lock:
                assert lock
                assert await holders(observer, key) == [lock.pid]
                started = time.monotonic()
                tg.start_soon(restart_server)
                await park()
                reached = True
        latency = time.monotonic() - started
        # The task group waits here for the restart to complete.
    report(record_property, "server restart (from the start of pg_ctl restart)", latency)

    assert not reached, "the block ran on after its lock was lost"
    assert lock.lost is True
    # Measured from launching `pg_ctl restart`, so it includes pg_ctl's own
    # start-up and the fast shutdown reaching the backend.
    assert latency < 2 * CLOSED_BOUND
    assert_no_pending_cancel()
    assert observer.is_closed()

    admin = await connect()
    assert await holders(admin, key) == []
    await assert_pool_recovers(pool, admin, key, lock.pid)


# --------------------------------------------------------------------------- heartbeat


@pytest.fixture
def fast_heartbeat() -> Iterator[float]:
    aiopglock.configure(heartbeat=FAST_HEARTBEAT)
    try:
        yield FAST_HEARTBEAT
    finally:
        aiopglock.configure(heartbeat=DEFAULT_HEARTBEAT)


async def test_silent_death_heartbeat(
    pool: asyncpg.Pool,
    admin: asyncpg.Connection,
    fast_heartbeat: float,
    record_property: RecordProperty,
) -> None:
    key = key_of("heartbeat")
    reached = False
    stopped_pid: int | None = None
    started = 0.0
    try:
        with pytest.raises(aiopglock.LockLost):
            async with aiopglock.advisory(key, db=pool) as lock:
                assert lock
                assert lock.pid is not None
                assert await holders(admin, key) == [lock.pid]
                await check_local_backend(admin, lock.pid)

                # The heartbeat runs: the idle holder session gets statements.
                first = await admin.fetchval(
                    "SELECT query_start FROM pg_stat_activity WHERE pid = $1", lock.pid
                )

                async def heartbeat_seen() -> bool:
                    latest = await admin.fetchval(
                        "SELECT query_start FROM pg_stat_activity WHERE pid = $1", lock.pid
                    )
                    return bool(latest is not None and latest > first)

                await wait_until(heartbeat_seen, message="a heartbeat on the holding connection")

                try:
                    os.kill(lock.pid, signal.SIGSTOP)
                except (PermissionError, ProcessLookupError) as exc:
                    pytest.skip(f"cannot freeze backend {lock.pid}: {exc!r}")
                started = time.monotonic()
                stopped_pid = lock.pid
                await park()
                # Only reached when the silent death went unnoticed.
                os.kill(stopped_pid, signal.SIGCONT)
                stopped_pid = None
                reached = True
        latency = time.monotonic() - started
    finally:
        if stopped_pid is not None:
            os.kill(stopped_pid, signal.SIGCONT)
    report(record_property, f"silent death, heartbeat={fast_heartbeat} s", latency)

    assert not reached, "the block ran on after its lock was lost"
    assert latency < SILENT_BOUND
    assert lock.lost is True
    assert_no_pending_cancel()

    # aiopglock closed the connection that stopped answering; once continued,
    # the backend finds its socket closed and exits, and its lock goes with it.
    async def backend_gone() -> bool:
        gone = await admin.fetchval(
            "SELECT NOT EXISTS (SELECT FROM pg_stat_activity WHERE pid = $1)", lock.pid
        )
        return bool(gone) and await advisory_locks(admin, pid=lock.pid) == []

    await wait_until(backend_gone, message=f"backend {lock.pid} to exit")
    assert await holders(admin, key) == []
    await assert_pool_recovers(pool, admin, key, lock.pid)


# --------------------------------------------------------------------------- one cancellation


@pytest.mark.parametrize("kind", ["pool", "connection"])
async def test_block_is_cancelled_once_and_its_cleanup_runs(
    kind: str, pool: asyncpg.Pool, connect: Connect, admin: asyncpg.Connection
) -> None:
    """Issue 10.8: the loss cancels the block once, as ``asyncio.timeout()``
    does: its ``except CancelledError`` and ``finally`` awaits run to their
    end (real queries on another connection), then ``LockLost`` comes out."""
    key = key_of(f"cleanup-runs-{kind}")
    db: Any = pool if kind == "pool" else await connect()
    other = await connect()
    cleaned: list[object] = []
    with pytest.raises(aiopglock.LockLost):
        async with aiopglock.advisory(key, db=db) as lock:
            try:
                await terminate_backend(admin, lock.pid)
                await park()
                pytest.fail("the block ran on after its lock was lost")
            except asyncio.CancelledError:
                cleaned.append(await other.fetchval("SELECT 'except'::text"))
                await anyio.lowlevel.checkpoint()
                cleaned.append(await other.fetchval("SELECT pg_sleep(0.05)::text"))
                raise
            finally:
                cleaned.append(await other.fetchval("SELECT 'finally'::text"))
    assert cleaned == ["except", "", "finally"]
    assert lock.lost
    assert_no_pending_cancel()
    await wait_for_release(admin, key)
    assert await other.fetchval("SELECT 1") == 1
    if kind == "pool":
        await assert_pool_recovers(pool, admin, key, lock.pid)


@pytest.mark.parametrize("kind", ["pool", "connection"])
async def test_an_unrelated_cancellation_still_propagates(
    kind: str, pool: asyncpg.Pool, connect: Connect, admin: asyncpg.Connection
) -> None:
    """While the block cleans up after the loss, someone else cancels the
    task: that cancellation propagates as CancelledError (it is not turned
    into LockLost, nor swallowed)."""
    key = key_of(f"unrelated-cancel-{kind}")
    db: Any = pool if kind == "pool" else await connect()
    in_cleanup = asyncio.Event()
    outcome: list[str] = []

    async def holder() -> None:
        async with aiopglock.advisory(key, db=db) as lock:
            try:
                await terminate_backend(admin, lock.pid)
                await park()
            except asyncio.CancelledError:
                outcome.append("ours")
                in_cleanup.set()
                await park()  # interrupted by the unrelated cancellation
                outcome.append("cleanup not interrupted")
                raise

    task = asyncio.create_task(holder())
    with anyio.fail_after(10):
        await in_cleanup.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    assert outcome == ["ours"]
    await wait_for_release(admin, key)
    if kind == "pool":
        await assert_pool_recovers(pool, admin, key)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout is Python 3.11+")
async def test_outer_timeout_still_works_after_lock_lost(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    """No cancellation is left over or miscounted: an enclosing
    ``asyncio.timeout()`` still fires after LockLost was handled."""
    key = key_of("outer-timeout")
    loop = asyncio.get_running_loop()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(None) as deadline:  # type: ignore[attr-defined]
            with pytest.raises(aiopglock.LockLost):
                async with aiopglock.advisory(key, db=pool) as lock:
                    await terminate_backend(admin, lock.pid)
                    await park()
            assert_no_pending_cancel()
            deadline.reschedule(loop.time() + 0.05)
            await park()
    await wait_for_release(admin, key)
    await assert_pool_recovers(pool, admin, key)


# --------------------------------------------------------------------------- across tasks


async def test_entered_in_one_task_exited_in_another(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    """No cancel scope spans the ``async with``: entering in task A and
    exiting in task B (pytest-asyncio fixtures, AsyncExitStack on an app
    object) works and releases the lock."""
    key = key_of("cross-task")
    spec = aiopglock.advisory(key, db=pool)
    lock = await asyncio.create_task(spec.__aenter__())
    assert lock
    assert await holders(admin, key) == [lock.pid]
    await asyncio.create_task(spec.__aexit__(None, None, None))
    assert await holders(admin, key) == []
    assert pool.get_idle_size() == pool.get_size()

    # The loss is still reported, at the exit, in the other task.
    lock = await asyncio.create_task(spec.__aenter__())
    await terminate_backend(admin, lock.pid)
    await wait_until(lambda: is_lost(lock), message="the handle to report the loss")
    with pytest.raises(aiopglock.LockLost):
        await asyncio.create_task(spec.__aexit__(None, None, None))
    await wait_for_release(admin, key)
    await assert_pool_recovers(pool, admin, key, lock.pid)


@pytest.fixture
async def held_in_a_fixture(pool: asyncpg.Pool) -> AsyncIterator[aiopglock.AdvisoryLock]:
    """pytest-asyncio runs this setup and its teardown in different tasks."""
    setup_task = asyncio.current_task()
    async with aiopglock.advisory(key_of("fixture"), db=pool) as lock:
        yield lock
        teardown_task = asyncio.current_task()
    assert pool.get_idle_size() == pool.get_size()
    # What this fixture is for: if pytest-asyncio ever runs both in one
    # task, the cross-task case is still covered by the test above.
    print(f"fixture setup and teardown in different tasks: {setup_task is not teardown_task}")


async def test_held_by_a_pytest_asyncio_fixture(
    held_in_a_fixture: aiopglock.AdvisoryLock, admin: asyncpg.Connection
) -> None:
    lock = held_in_a_fixture
    assert lock
    assert await holders(admin, key_of("fixture")) == [lock.pid]
