"""``aiopglock.Locker``: many advisory locks on few connections, on the real server.

What is checked, always against ``pg_locks`` / ``pg_stat_activity``:

- uncontended locks live on the Locker's one holder connection, and are gone
  from the server once the block has exited;
- exclusion between local tasks is kept in process (PostgreSQL would let two
  tasks of one session share a key), shared holds are counted locally;
- a contended wait moves to a dedicated connection and queues in PostgreSQL,
  with ``timeout`` enforced by the server;
- cancellation at random points (remote contention, local contention, no
  contention) leaves nothing held and no connection leaked;
- a terminated holder connection loses every lock on it at once, and the
  Locker keeps serving on a new one;
- 10,000 locks held at once on at most 2 server connections;
- mutual exclusion across OS processes, Locker and plain ``advisory`` mixed.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import asyncpg
import pytest

import aiopglock
from aiopglock._locker import SPEC_CACHE_SIZE
from tests._helpers import (
    Connect,
    PgServer,
    advisory_locks,
    check_local_backend,
    holders,
    wait_for_release,
    wait_for_waiter,
    wait_until,
    waiters,
)
from tests.test_cancellation import CANCELS, ITERATIONS, Victim, _jitter, storm
from tests.test_lost import fast_heartbeat
from tests.test_processes import (
    CHILD_TIMEOUT,
    INCREMENTS,
    PROCESSES,
    TASKS,
    _read_modify_write,
    children,
    counter,
    final_count,
)

__all__ = ["counter", "fast_heartbeat", "locker_counter_worker"]

KEY = 0x10C4_0000_0001
PAIR = (4242, -17)
LOST_BOUND = 1.0


def key_of(name: str) -> int:
    key = aiopglock.advisory_key(f"tests.test_locker:{name}")
    assert isinstance(key, int)
    return key


async def idle_but_holder(pool: asyncpg.Pool) -> bool:
    """Every connection of ``pool`` but the Locker's holder is back."""
    return pool.get_idle_size() == pool.get_size() - 1


async def all_idle(pool: asyncpg.Pool) -> bool:
    return pool.get_idle_size() == pool.get_size()


# --------------------------------------------------------------------------- basics


async def test_uncontended_locks_live_on_the_holder_connection(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    async with aiopglock.Locker(pool) as locker:
        for key in (KEY, PAIR, "tests.test_locker:text"):
            server_key = aiopglock.advisory_key(key)
            async with locker.advisory(key) as first:
                assert first and first.acquired and not first.lost
                assert first.key == server_key and first.xact is False
                assert await holders(admin, server_key, mode="ExclusiveLock") == [first.pid]
                # Another key, another task: the same holder connection.
                other = await asyncio.create_task(_hold_for(locker, key_of("other")))
                assert other == first.pid
            assert await holders(admin, server_key) == []
        assert await idle_but_holder(pool)
        assert "holder pid=" in repr(locker)
    await wait_until(lambda: all_idle(pool), message="the holder to go back to the pool")
    for key in (KEY, PAIR, "tests.test_locker:text", key_of("other"), key_of("probe")):
        assert await holders(admin, aiopglock.advisory_key(key)) == []


async def test_plain_specs_are_validated_once_and_never_conflated(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    """``locker.advisory()`` keeps the spec of plain arguments: the same one
    for the same arguments, never one of equal but other-typed arguments,
    and bad arguments still refused on every call, before any SQL."""
    locker = aiopglock.Locker(pool)
    try:
        spec = locker.advisory(KEY, timeout=5)
        assert locker.advisory(KEY, timeout=5) is spec
        assert locker.advisory(KEY, timeout=5.5) is not spec
        assert locker.advisory(KEY, shared=True, timeout=5) is not spec
        assert locker.advisory(1) is locker.advisory(1)
        with pytest.raises(TypeError, match="key"):
            locker.advisory(True)  # equal to 1, and not a key
        with pytest.raises(TypeError, match="shared"):
            locker.advisory(1, shared=1)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="timeout"):
            locker.advisory(1, timeout=-1)
        with pytest.raises(ValueError, match="timeout"):
            locker.advisory(1, timeout=-1)  # refused again: never kept
        # A spec kept for one task serves others at once, each its own handle.
        results: list[bool] = []
        inside = {KEY: 0, KEY + 1: 0}

        async def take(k: int) -> None:
            async with locker.advisory(k) as lock:
                inside[k] += 1
                results.append(lock.acquired and inside[k] == 1)
                await asyncio.sleep(0)
                inside[k] -= 1

        await asyncio.gather(*(take(KEY + i % 2) for i in range(6)))
        assert results == [True] * 6
        assert await holders(admin, KEY) == [] and await holders(admin, KEY + 1) == []
        assert len(locker._specs) <= SPEC_CACHE_SIZE
        for k in range(SPEC_CACHE_SIZE + 1):
            locker.advisory(KEY + k)
        assert len(locker._specs) <= SPEC_CACHE_SIZE  # bounded
    finally:
        await locker.aclose()


async def test_handle_repr_and_bool(pool: asyncpg.Pool) -> None:
    async with aiopglock.Locker(pool) as locker:
        async with locker.advisory(KEY, shared=True) as lock:
            assert bool(lock) is True and lock.shared
            assert repr(lock).startswith(f"<LockerLock key={KEY} shared session acquired pid=")
        assert not lock and "not acquired" in repr(lock)
        assert repr(locker.advisory(KEY, timeout=0)).startswith("<Locker.advisory(")


async def test_local_tasks_exclude_each_other(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    """40 tasks of this process on one key: one at a time in process, while
    the server shows exactly one holder (the holder connection)."""
    inside = 0
    most = 0
    seen: set[int] = set()
    count = 0

    async with aiopglock.Locker(pool) as locker:

        async def work() -> None:
            nonlocal inside, most, count
            for _ in range(5):
                async with locker.advisory(KEY, side_effect=aiopglock.Raise) as lock:
                    inside += 1
                    most = max(most, inside)
                    n = count
                    await asyncio.sleep(0)
                    count = n + 1
                    seen.add(lock.pid or 0)
                    inside -= 1

        async def watch() -> None:
            while True:
                assert len(await holders(admin, KEY)) <= 1
                await asyncio.sleep(0.001)

        watcher = asyncio.create_task(watch())
        try:
            await asyncio.gather(*(work() for _ in range(40)))
        finally:
            watcher.cancel()
            with pytest.raises(asyncio.CancelledError):
                await watcher
        assert most == 1 and count == 200
        assert len(seen) == 1
        assert await holders(admin, KEY) == []


async def test_shared_and_exclusive(
    pool: asyncpg.Pool, admin: asyncpg.Connection, connect: Connect
) -> None:
    other = await connect()
    async with aiopglock.Locker(pool) as locker:
        async with locker.advisory(KEY, shared=True) as a:
            b_in = asyncio.Event()
            b_out = asyncio.Event()

            async def second_shared() -> None:
                async with locker.advisory(KEY, shared=True, timeout=0) as b:
                    assert b and b.pid == a.pid
                    b_in.set()
                    await b_out.wait()

            b_task = asyncio.create_task(second_shared())
            await b_in.wait()
            # One server hold for the two local shared handles.
            rows = await advisory_locks(admin, key=KEY)
            assert [(r["pid"], r["mode"]) for r in rows] == [(a.pid, "ShareLock")]
            # Exclusive: refused locally at once, and by the server for others.
            assert await asyncio.create_task(_try_once(locker, KEY)) is False
            assert not await other.fetchval("SELECT pg_try_advisory_lock($1)", KEY)
            assert await other.fetchval("SELECT pg_try_advisory_lock_shared($1)", KEY)
            await other.fetchval("SELECT pg_advisory_unlock_shared($1)", KEY)
            # A local exclusive request queues behind both shared holders.
            got_ex = asyncio.Event()

            async def exclusive() -> None:
                async with locker.advisory(KEY, timeout=5) as ex:
                    assert ex
                    assert await holders(admin, KEY, mode="ExclusiveLock") == [ex.pid]
                    got_ex.set()

            ex_task = asyncio.create_task(exclusive())
            # A later shared request waits behind the queued exclusive one (FIFO).
            await wait_until(lambda: _queued(locker, KEY))
            late = asyncio.create_task(_try_once(locker, KEY, shared=True))
            assert await late is False
            b_out.set()
            await b_task
            assert not got_ex.is_set()
        await ex_task
        assert got_ex.is_set()
        assert await holders(admin, KEY) == []


async def test_local_hand_overs_let_a_remote_waiter_in(
    pool: asyncpg.Pool, admin: asyncpg.Connection, connect: Connect
) -> None:
    """Local tasks hammering one key hand it over in process, but not forever:
    a session waiting in PostgreSQL's queue gets its turn."""
    other = await connect()
    stop = asyncio.Event()
    cycles = 0
    async with aiopglock.Locker(pool) as locker:

        async def hammer() -> None:
            nonlocal cycles
            while not stop.is_set():
                async with locker.advisory(KEY, timeout=10, side_effect=aiopglock.Raise):
                    cycles += 1
                    await asyncio.sleep(0)

        tasks = [asyncio.create_task(hammer()) for _ in range(5)]
        try:
            await wait_until(lambda: holders(admin, KEY))
            with anyio.fail_after(10):
                await other.fetchval("SELECT pg_advisory_lock($1)", KEY)
            assert await holders(admin, KEY) == [other.get_server_pid()]
            assert not any(task.done() for task in tasks)
            before = cycles
            await other.fetchval("SELECT pg_advisory_unlock($1)", KEY)
            await wait_until(lambda: _more(lambda: cycles, before))
        finally:
            stop.set()
            await asyncio.gather(*tasks)
    assert await holders(admin, KEY) == []


async def _more(count: Callable[[], int], than: int) -> bool:
    return count() > than


async def test_reentry_nests(pool: asyncpg.Pool, admin: asyncpg.Connection) -> None:
    async with aiopglock.Locker(pool) as locker:
        async with locker.advisory(KEY) as outer:
            async with locker.advisory(KEY, timeout=0) as inner:
                assert inner and inner.pid == outer.pid
                assert "nested" in repr(inner)
                async with locker.advisory(KEY, shared=True) as innermost:
                    assert innermost
            # The inner exit released nothing.
            assert await holders(admin, KEY) == [outer.pid]
        assert await holders(admin, KEY) == []
        async with locker.advisory(KEY, shared=True):
            with pytest.raises(aiopglock.UsageError, match="upgrading"):
                async with locker.advisory(KEY):
                    pass
        # A child task does not inherit the hold: it waits like any other task.
        async with locker.advisory(KEY):
            child = asyncio.create_task(_try_once(locker, KEY))
            assert await child is False


async def _try_once(locker: aiopglock.Locker, key: Any, shared: bool = False) -> bool:
    async with locker.advisory(key, timeout=0, shared=shared) as lock:
        return bool(lock)


async def _queued(locker: aiopglock.Locker, key: Any) -> bool:
    entry = locker._entries.get(key)
    return entry is not None and len(entry.waiters) > 0


# --------------------------------------------------------------------------- timeouts


async def test_timeout_zero_on_a_key_held_elsewhere(
    pool: asyncpg.Pool, admin: asyncpg.Connection, connect: Connect
) -> None:
    other = await connect()
    await other.execute("SELECT pg_advisory_lock($1)", KEY)
    async with aiopglock.Locker(pool) as locker:
        started = time.monotonic()
        async with locker.advisory(KEY, timeout=0) as lock:
            assert not lock and lock.pid is None
        assert time.monotonic() - started < 1.0
        # No connection was taken for a wait, nothing waits on the server.
        assert await waiters(admin, KEY) == []
        assert await idle_but_holder(pool)


async def test_timeout_waits_on_the_server_on_a_dedicated_connection(
    pool: asyncpg.Pool, admin: asyncpg.Connection, connect: Connect
) -> None:
    other = await connect()
    await other.execute("SELECT pg_advisory_lock($1)", KEY)
    async with aiopglock.Locker(pool) as locker:
        holder_pid = await _holder_pid(locker, admin)
        result: dict[str, Any] = {}

        async def attempt() -> None:
            started = time.monotonic()
            async with locker.advisory(KEY, timeout=0.5) as lock:
                result["got"] = bool(lock)
            result["took"] = time.monotonic() - started

        task = asyncio.create_task(attempt())
        waiter = await wait_for_waiter(admin, KEY)
        # The wait is in PostgreSQL's queue, on a connection that is not the holder,
        # with lock_timeout scoped to it.
        assert waiter not in (holder_pid, other.get_server_pid())
        setting = await admin.fetchval("SELECT query FROM pg_stat_activity WHERE pid = $1", waiter)
        assert "lock_timeout" in setting
        await task
        assert result["got"] is False and 0.45 < result["took"] < 3
        assert await waiters(admin, KEY) == []
        await wait_until(lambda: idle_but_holder(pool))
        # Released within the timeout: granted, and held on the dedicated connection.
        task2 = asyncio.create_task(_hold_for(locker, KEY, timeout=5))
        waiter = await wait_for_waiter(admin, KEY)
        await other.execute("SELECT pg_advisory_unlock($1)", KEY)
        pid = await task2
        assert pid == waiter
        assert await holders(admin, KEY) == []
        await wait_until(lambda: idle_but_holder(pool))
        # A lock_timeout set by a dedicated wait did not leak into the pool.
        async with pool.acquire() as conn:
            assert await conn.fetchval("SHOW lock_timeout") == "0"


async def _holder_pid(locker: aiopglock.Locker, admin: asyncpg.Connection) -> int:
    async with locker.advisory(key_of("probe")) as probe:
        assert probe.pid is not None
        return probe.pid


async def _hold_for(locker: aiopglock.Locker, key: Any, **kw: Any) -> int | None:
    async with locker.advisory(key, side_effect=aiopglock.Raise, **kw) as lock:
        return lock.pid


async def test_timeout_applies_to_a_local_wait(pool: asyncpg.Pool) -> None:
    async with aiopglock.Locker(pool) as locker:
        async with locker.advisory(KEY):
            started = time.monotonic()
            got = await asyncio.create_task(_try_for(locker, KEY, 0.3))
            assert got is False
            assert 0.25 < time.monotonic() - started < 3
        # Released within the timeout: granted.
        release = asyncio.Event()

        async def holder() -> None:
            async with locker.advisory(KEY):
                await release.wait()

        task = asyncio.create_task(holder())
        await asyncio.sleep(0)
        waiting = asyncio.create_task(_try_for(locker, KEY, 5))
        await asyncio.sleep(0.05)
        release.set()
        assert await waiting is True
        await task


async def _try_for(locker: aiopglock.Locker, key: Any, timeout: float) -> bool:
    async with locker.advisory(key, timeout=timeout) as lock:
        return bool(lock)


async def test_timeout_none_waits_until_released(
    pool: asyncpg.Pool, admin: asyncpg.Connection, connect: Connect
) -> None:
    other = await connect()
    await other.execute("SELECT pg_advisory_lock($1, $2)", *PAIR)
    async with aiopglock.Locker(pool) as locker:
        task = asyncio.create_task(_hold_for(locker, PAIR))
        waiter = await wait_for_waiter(admin, aiopglock.advisory_key(PAIR))
        assert not task.done()
        await other.execute("SELECT pg_advisory_unlock($1, $2)", *PAIR)
        assert await task == waiter
        assert await holders(admin, aiopglock.advisory_key(PAIR)) == []


# ------------------------------------------------------------------ side effects, validation


async def test_side_effects(pool: asyncpg.Pool, connect: Connect) -> None:
    other = await connect()
    await other.execute("SELECT pg_advisory_lock($1)", KEY)
    async with aiopglock.Locker(pool) as locker:
        with pytest.raises(aiopglock.LockNotAcquired) as info:
            async with locker.advisory(KEY, timeout=0, side_effect=aiopglock.Raise):
                pytest.fail("the block must not run")
        assert info.value.key == KEY
        with pytest.raises(ValueError, match="side_effect"):
            async with locker.advisory(KEY, side_effect=aiopglock.Skip):
                pass

        ran: list[int] = []

        @locker.advisory(KEY, timeout=0, side_effect=aiopglock.Skip)
        async def skipped(x: int) -> int:
            ran.append(x)
            return x

        assert await skipped(1) is None and ran == []

        @locker.advisory(timeout=0)
        async def default_key() -> str:
            return "ran"

        # The default key is module.qualname, and the default side effect Raise.
        name = f"{default_key.__module__}.{default_key.__qualname__}"
        await other.execute("SELECT pg_advisory_lock($1)", aiopglock.advisory_key(name))
        with pytest.raises(aiopglock.LockNotAcquired):
            await default_key()
        await other.execute("SELECT pg_advisory_unlock($1)", aiopglock.advisory_key(name))
        assert await default_key() == "ran"
        with pytest.raises(ValueError, match="Return"):
            locker.advisory(KEY, side_effect=aiopglock.Return)(skipped)
        with pytest.raises(TypeError, match="coroutine"):
            locker.advisory(KEY)(lambda: None)  # type: ignore[arg-type,return-value]


async def test_validation_before_any_sql(pool: asyncpg.Pool) -> None:
    with pytest.raises(TypeError, match="pool"):
        aiopglock.Locker("postgresql://")  # type: ignore[arg-type]
    locker = aiopglock.Locker(pool)
    with pytest.raises(TypeError, match="key"):
        locker.advisory(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="key"):
        locker.advisory("")
    with pytest.raises(ValueError, match="timeout"):
        locker.advisory(KEY, timeout=-1)
    with pytest.raises(TypeError, match="shared"):
        locker.advisory(KEY, shared=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cancel_on_lost"):
        locker.advisory(KEY, cancel_on_lost=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="side_effect"):
        locker.advisory(KEY, side_effect="skip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="key"):
        async with locker.advisory():
            pass
    # Validation took no connection: the Locker has not started.
    assert await all_idle(pool)
    assert "not started" in repr(locker)
    async with locker:
        pass
    # Closed: further use is a UsageError, and so is entering it again.
    with pytest.raises(aiopglock.UsageError, match="closed"):
        async with locker.advisory(KEY):
            pass
    with pytest.raises(aiopglock.UsageError, match="closed"):
        async with locker.advisory(KEY, xact=True):
            pass
    with pytest.raises(aiopglock.UsageError, match="closed"):
        async with locker:
            pass
    assert "closed" in repr(locker)


async def test_entry_fails_with_the_pools_own_error(pg_server: PgServer) -> None:
    closed = await asyncpg.create_pool(pg_server.dsn, min_size=0, max_size=1)
    await closed.close()
    locker = aiopglock.Locker(closed)
    with pytest.raises(asyncpg.InterfaceError, match="closed"):
        async with locker:
            pytest.fail("entered without a holder connection")
    with pytest.raises(aiopglock.UsageError):
        async with locker.advisory(KEY):
            pass


async def test_a_locker_is_accepted_as_db(pool: asyncpg.Pool, admin: asyncpg.Connection) -> None:
    async with aiopglock.Locker(pool) as locker:
        async with locker.advisory(KEY) as mine:
            # advisory(db=locker), from another task, excludes against the
            # Locker's own locks (db given, or returned by a callable).
            for db in (locker, lambda: locker):
                other = asyncio.create_task(_advisory_once(KEY, db))
                assert await other is False
            assert await holders(admin, KEY) == [mine.pid]
        async with aiopglock.advisory(KEY, db=locker, timeout=0) as lock:
            assert lock
            assert await holders(admin, KEY) == [lock.pid]
            # Routed to the Locker: the lock is on its holder connection, and
            # the task's re-entry works across both spellings.
            assert lock.pid == await _holder_pid(locker, admin)
            async with locker.advisory(KEY, timeout=0) as inner:
                assert inner and "nested" in repr(inner)
        aiopglock.configure(db=locker)
        try:

            @aiopglock.advisory(timeout=0)
            async def configured() -> list[int]:
                name = f"{configured.__module__}.{configured.__qualname__}"
                return await holders(admin, aiopglock.advisory_key(name))

            assert await configured() == [await _holder_pid(locker, admin)]
        finally:
            aiopglock.configure(db=None)
        # table() takes its connection from the Locker's pool.
        async with aiopglock.table("pg_catalog.pg_class", db=locker, mode="access share") as t:
            assert t.connection is not None
        assert await holders(admin, KEY) == []


async def _advisory_once(key: Any, db: Any) -> bool:
    async with aiopglock.advisory(key, db=db, timeout=0) as lock:
        return bool(lock)


# --------------------------------------------------------------------------- cancellation storms


@pytest.mark.slow
@pytest.mark.parametrize("how", list(CANCELS))
async def test_storm_remote_contention(
    how: str,
    pool: asyncpg.Pool,
    admin: asyncpg.Connection,
    connect: Connect,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Another session holds the key and releases it while the Locker's caller,
    waiting on a dedicated connection, is cancelled at a random moment."""
    blocker = await connect()
    async with aiopglock.Locker(pool) as locker:

        def make(victim: Victim) -> Callable[[], Awaitable[None]]:
            async def body() -> None:
                async with locker.advisory(KEY) as lock:
                    victim.got = bool(lock)
                    await asyncio.sleep(0)

            return body

        async def after(victim: Victim) -> None:
            await wait_until(lambda: idle_but_holder(pool), timeout=5)
            assert not locker._entries

        stats = await storm(
            admin=admin,
            blocker=blocker,
            key=KEY,
            how=how,
            make_body=make,
            after=after,
            seed=21,
            caplog=caplog,
            iterations=max(ITERATIONS // 2, 50),
        )
    print(stats)
    assert stats.acquired > 0 and stats.cancelled > 0, stats
    if how != "cancel-twice":
        assert stats.discarded == 0, stats
    await wait_until(lambda: all_idle(pool), timeout=5)
    assert await holders(admin, KEY) == []


@pytest.mark.slow
@pytest.mark.parametrize("how", list(CANCELS))
@pytest.mark.parametrize("contended", [True, False], ids=["local-contention", "uncontended"])
async def test_storm_local(
    how: str, contended: bool, pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    """A local task holds the key and leaves while the victim is cancelled at a
    random moment: before its request, while queued, at the hand-over, inside
    the block, during the batched unlock. Uncontended: the cancellation lands
    around the batched try-lock and unlock instead."""
    rng = random.Random(22)
    acquired = cancelled = 0
    async with aiopglock.Locker(pool) as locker:
        for _ in range(max(ITERATIONS // 2, 50)):
            victim = Victim()
            release = asyncio.Event()
            held = asyncio.Event()

            async def blocker(held: asyncio.Event = held, release: asyncio.Event = release) -> None:
                async with locker.advisory(KEY, side_effect=aiopglock.Raise):
                    held.set()
                    await release.wait()

            async def body(victim: Victim = victim) -> None:
                async with locker.advisory(KEY) as lock:
                    victim.got = bool(lock)
                    await asyncio.sleep(0)

            async def run(victim: Victim = victim, body: Any = body) -> None:
                if how == "anyio-scope":
                    with victim.scope:
                        await body()
                elif how == "asyncio.timeout":
                    async with asyncio.timeout(None) as deadline:  # type: ignore[attr-defined]
                        deadline.reschedule(
                            asyncio.get_running_loop().time() + rng.uniform(0, 0.002)
                        )
                        await body()
                else:
                    await body()

            blocking = None
            if contended:
                blocking = asyncio.create_task(blocker())
                await held.wait()
            task = asyncio.create_task(run())
            await _jitter(rng)
            release.set()
            await _jitter(rng)
            if how != "asyncio.timeout" and not task.done():
                CANCELS[how](task, victim)
            try:
                await task
            except (asyncio.CancelledError, TimeoutError):
                cancelled += 1
            if victim.scope.cancelled_caught:
                cancelled += 1
            if blocking is not None:
                await blocking
            acquired += bool(victim.got)
            # Nothing of the victim's is held, here or on the server.
            assert not locker._entries
            assert await holders(admin, KEY) == []
            assert await idle_but_holder(pool)
    print(f"local storm: {acquired} acquired, {cancelled} interrupted")
    assert acquired > 0 and cancelled > 0
    await wait_until(lambda: all_idle(pool), timeout=5)


# --------------------------------------------------------------------------- lost holder


@pytest.mark.parametrize("cancel_on_lost", [True, False])
async def test_terminated_holder_loses_every_lock_and_the_locker_reconnects(
    cancel_on_lost: bool, pool: asyncpg.Pool, admin: asyncpg.Connection, connect: Connect
) -> None:
    keys = [key_of(f"lost-{i}") for i in range(3)]
    outcomes: list[tuple[str, float]] = []
    entered = 0
    all_in = asyncio.Event()
    finished = asyncio.Event()
    async with aiopglock.Locker(pool) as locker:
        pids: list[int] = []

        async def hold(key: int) -> None:
            nonlocal entered
            try:
                async with locker.advisory(key, cancel_on_lost=cancel_on_lost) as lock:
                    assert lock.pid is not None
                    pids.append(lock.pid)
                    entered += 1
                    if entered == len(keys):
                        all_in.set()
                    if cancel_on_lost:
                        await anyio.sleep(30)
                    else:
                        await wait_until(lambda: _lost(lock), timeout=5)
                        await finished.wait()
                outcomes.append(("no error", time.monotonic()))
            except aiopglock.LockLost as exc:
                assert exc.key == key and exc.pid == pids[0]
                outcomes.append(("lost", time.monotonic()))
                current = asyncio.current_task()
                if sys.version_info >= (3, 11) and current is not None:
                    # aiopglock took back the cancellation it delivered.
                    assert current.cancelling() == 0

        tasks = [asyncio.create_task(hold(k)) for k in keys]
        await all_in.wait()
        assert len(set(pids)) == 1
        dead = pids[0]
        for key in keys:
            assert await holders(admin, key) == [dead]
        started = time.monotonic()
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", dead)
        if not cancel_on_lost:
            await wait_until(lambda: _all_marked(locker, keys), timeout=LOST_BOUND)
            finished.set()
        await asyncio.gather(*tasks)
        assert [o for o, _ in outcomes] == ["lost"] * len(keys)
        if cancel_on_lost:
            assert max(t for _, t in outcomes) - started < LOST_BOUND
        for key in keys:
            await wait_for_release(admin, key)
        # The Locker serves again, on a new holder connection.
        async with locker.advisory(keys[0], timeout=5) as again:
            assert again and again.pid != dead
            assert await holders(admin, keys[0]) == [again.pid]
        assert await holders(admin, keys[0]) == []
    await wait_until(lambda: all_idle(pool), timeout=5)


async def test_terminated_dedicated_connection_loses_its_lock(
    pool: asyncpg.Pool, admin: asyncpg.Connection, connect: Connect
) -> None:
    """A contended lock lives on its dedicated connection: terminating that
    backend loses it (LockLost at once), not the holder's locks."""
    other = await connect()
    await other.execute("SELECT pg_advisory_lock($1)", KEY)
    calm = key_of("calm")
    async with aiopglock.Locker(pool) as locker:
        async with locker.advisory(calm) as bystander:
            outcome: list[float] = []

            async def contended() -> None:
                with pytest.raises(aiopglock.LockLost):
                    async with locker.advisory(KEY) as lock:
                        assert lock.pid != bystander.pid
                        assert await holders(admin, KEY) == [lock.pid]
                        started = time.monotonic()
                        assert await admin.fetchval("SELECT pg_terminate_backend($1)", lock.pid)
                        with anyio.move_on_after(30):
                            await anyio.Event().wait()
                        outcome.append(time.monotonic() - started)
                outcome.append(time.monotonic() - started)

            task = asyncio.create_task(contended())
            await wait_for_waiter(admin, KEY)
            await other.execute("SELECT pg_advisory_unlock($1)", KEY)
            await task
            assert len(outcome) == 1 and outcome[0] < LOST_BOUND
            # The holder connection and its lock are untouched.
            assert not bystander.lost
            assert await holders(admin, calm) == [bystander.pid]
        await wait_for_release(admin, KEY)
        async with locker.advisory(KEY, timeout=5) as again:
            assert again
    await wait_until(lambda: all_idle(pool), timeout=5)


async def test_silent_holder_is_noticed_by_the_heartbeat(
    pool: asyncpg.Pool, admin: asyncpg.Connection, fast_heartbeat: float
) -> None:
    """The holder's backend frozen (SIGSTOP): no socket closes, the heartbeat
    notices within the interval, the connection is discarded, every lock on
    it is lost, and the Locker serves again on a new holder."""
    stopped: int | None = None
    started = 0.0
    try:
        async with aiopglock.Locker(pool) as locker:
            with pytest.raises(aiopglock.LockLost):
                async with locker.advisory(KEY) as lock:
                    assert lock.pid is not None
                    await check_local_backend(admin, lock.pid)
                    try:
                        os.kill(lock.pid, signal.SIGSTOP)
                    except (PermissionError, ProcessLookupError) as exc:
                        pytest.skip(f"cannot freeze backend {lock.pid}: {exc!r}")
                    stopped = lock.pid
                    started = time.monotonic()
                    with anyio.move_on_after(10):
                        await anyio.Event().wait()
            latency = time.monotonic() - started
            print(f"\n[locker] silent holder noticed after {latency * 1000:.0f} ms")
            assert latency < fast_heartbeat + 0.3
            os.kill(lock.pid, signal.SIGCONT)
            stopped = None
            async with locker.advisory(KEY, timeout=5) as again:
                assert again and again.pid != lock.pid
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
    await wait_for_release(admin, KEY)


async def _lost(lock: Any) -> bool:
    return bool(lock.lost)


async def _all_marked(locker: aiopglock.Locker, keys: list[int]) -> bool:
    return all(locker._entries[k].lost for k in keys)


async def test_holder_closed_client_side_while_waiting_to_release(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    """A lock released after its holder died raises LockLost at exit; the
    next request works."""
    async with aiopglock.Locker(pool) as locker:
        with pytest.raises(aiopglock.LockLost):
            async with locker.advisory(KEY, cancel_on_lost=False) as lock:
                pid = lock.pid
                assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
                await wait_until(lambda: _lost(lock), timeout=LOST_BOUND)
        async with locker.advisory(KEY, timeout=5) as again:
            assert again and again.pid != pid


# --------------------------------------------------------------------------- scale


@pytest.mark.slow
async def test_ten_thousand_locks_on_at_most_two_connections(
    pg_server: PgServer, admin: asyncpg.Connection
) -> None:
    name = f"aiopglock-locker-10k-{os.getpid()}"
    pool = await asyncpg.create_pool(
        pg_server.dsn, min_size=1, max_size=2, server_settings={"application_name": name}
    )
    n = 10_000
    try:
        async with aiopglock.Locker(pool) as locker:
            release = asyncio.Event()
            count = 0
            all_in = asyncio.Event()

            async def hold(i: int) -> None:
                nonlocal count
                async with locker.advisory(1_000_000 + i, side_effect=aiopglock.Raise):
                    count += 1
                    if count == n:
                        all_in.set()
                    await release.wait()

            tasks = [asyncio.create_task(hold(i)) for i in range(n)]
            with anyio.fail_after(60):
                await all_in.wait()
            rows = await admin.fetch(
                "SELECT pid, count(*) AS n FROM pg_locks WHERE locktype = 'advisory' "
                "AND pid IN (SELECT pid FROM pg_stat_activity WHERE application_name = $1) "
                "GROUP BY pid",
                name,
            )
            assert sum(r["n"] for r in rows) == n
            assert len(rows) == 1
            connections = await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", name
            )
            print(f"\n[locker] {n} locks held on {connections} server connection(s)")
            assert connections <= 2
            release.set()
            await asyncio.gather(*tasks)
            assert not locker._entries
            remaining = await admin.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                "AND pid IN (SELECT pid FROM pg_stat_activity WHERE application_name = $1)",
                name,
            )
            assert remaining == 0
    finally:
        await pool.close()


async def test_exit_leaves_nothing(pool: asyncpg.Pool, admin: asyncpg.Connection) -> None:
    before = set(asyncio.all_tasks())
    release = asyncio.Event()
    outcome: list[str] = []

    async def straggler(locker: aiopglock.Locker, entered: asyncio.Event) -> None:
        try:
            async with locker.advisory(KEY, cancel_on_lost=False):
                entered.set()
                await release.wait()
        except aiopglock.LockLost:
            outcome.append("lost")

    async with aiopglock.Locker(pool) as locker:
        entered = asyncio.Event()
        task = asyncio.create_task(straggler(locker, entered))
        await entered.wait()
        assert len(set(asyncio.all_tasks()) - before) == 2  # the straggler, the Locker's
    # The straggler's lock went with the holder connection: it is told at exit.
    assert await holders(admin, KEY) == []
    release.set()
    await task
    assert outcome == ["lost"]
    assert set(asyncio.all_tasks()) - before == set()
    assert await all_idle(pool)
    with pytest.raises(aiopglock.UsageError, match="closed"):
        async with locker.advisory(KEY):
            pass


# --------------------------------------------------------------------------- processes


async def _count_with_locker(
    dsn: str, table: str, key: str, use_locker: bool, tasks: int, increments: int, barrier: Any
) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=2, max_size=tasks + 2)
    try:
        async with aiopglock.Locker(pool) as locker:

            async def task() -> None:
                for _ in range(increments):
                    if use_locker:
                        spec = locker.advisory(key, side_effect=aiopglock.Raise)
                    else:
                        spec = aiopglock.advisory(key, db=pool, side_effect=aiopglock.Raise)
                    async with spec:
                        await _read_modify_write(pool, table)

            barrier.wait(CHILD_TIMEOUT)
            with anyio.fail_after(CHILD_TIMEOUT):
                async with anyio.create_task_group() as tg:
                    for _ in range(tasks):
                        tg.start_soon(task)
    finally:
        await pool.close()


def locker_counter_worker(
    dsn: str, table: str, key: str, use_locker: bool, tasks: int, increments: int, barrier: Any
) -> None:
    """Child process: ``tasks`` tasks incrementing the counter under the lock,
    through a Locker (``use_locker``) or plain ``advisory(db=pool)``."""
    asyncio.run(_count_with_locker(dsn, table, key, use_locker, tasks, increments, barrier))


@pytest.mark.slow
async def test_counter_exact_across_processes(
    pg_server: PgServer, admin: asyncpg.Connection, counter: str
) -> None:
    """Processes with a Locker each (and one with plain advisory locks) share
    one counter: exact, so local and remote exclusion both held."""
    key = f"locker-counter:{counter}"
    async with children() as kids:
        barrier = kids.ctx.Barrier(PROCESSES)
        for i in range(PROCESSES):
            kids.start(
                locker_counter_worker,
                pg_server.dsn,
                counter,
                key,
                i != 0,
                TASKS,
                INCREMENTS,
                barrier,
            )
        await kids.join()
    assert await final_count(admin, counter) == PROCESSES * TASKS * INCREMENTS
    assert await holders(admin, aiopglock.advisory_key(key)) == []


# --------------------------------------------------------------------------- LockLost delivery


@pytest.mark.parametrize("where", ["holder", "dedicated"])
async def test_lock_lost_is_one_cancellation_whose_cleanup_awaits_run(
    where: str, pool: asyncpg.Pool, admin: asyncpg.Connection, connect: Connect
) -> None:
    """The connection holding the lock is terminated while the block sleeps:
    the block gets one CancelledError, its ``except``/``finally`` awaits run
    to their end (a query on another connection included), and LockLost
    comes out of the ``async with``, with the task's cancellation count back
    to zero (as asyncio.timeout() leaves it)."""
    side = await connect()
    other = await connect()
    steps: list[str] = []
    pids: list[int] = []
    entered = asyncio.Event()

    async def block(locker: aiopglock.Locker) -> None:
        try:
            async with locker.advisory(KEY) as lock:
                assert lock.pid is not None
                pids.append(lock.pid)
                entered.set()
                try:
                    await asyncio.sleep(30)
                except asyncio.CancelledError:
                    await asyncio.sleep(0.05)
                    steps.append(await side.fetchval("SELECT 'cleaned up'"))
                    raise
                finally:
                    await asyncio.sleep(0.01)
                    steps.append("finally")
            steps.append("no error")
        except aiopglock.LockLost:
            steps.append("LockLost")
            current = asyncio.current_task()
            if sys.version_info >= (3, 11) and current is not None:
                steps.append(f"cancelling={current.cancelling()}")

    async with aiopglock.Locker(pool) as locker:
        if where == "dedicated":
            await other.execute("SELECT pg_advisory_lock($1)", KEY)
        task = asyncio.create_task(block(locker))
        if where == "dedicated":
            await wait_for_waiter(admin, KEY)
            await other.execute("SELECT pg_advisory_unlock($1)", KEY)
        await entered.wait()
        holder = await _holder_pid(locker, admin)
        assert (pids[0] == holder) is (where == "holder")
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pids[0])
        with anyio.fail_after(5):
            await task
        expected = ["cleaned up", "finally", "LockLost"]
        if sys.version_info >= (3, 11):
            expected.append("cancelling=0")
        assert steps == expected
        await wait_for_release(admin, KEY)
    await wait_until(lambda: all_idle(pool), timeout=5)


# --------------------------------------------------------------------------- timeouts


async def test_timeout_covers_the_pool_wait_of_a_contended_wait(
    pg_server: PgServer, admin: asyncpg.Connection, connect: Connect
) -> None:
    """Every pool connection is in use: a contended request does not wait
    beyond its timeout for the connection of its dedicated wait, and
    ``timeout=0`` never waits; once a connection frees within the timeout,
    the wait goes on and is granted."""
    other = await connect()
    await other.execute("SELECT pg_advisory_lock($1)", KEY)
    small = await asyncpg.create_pool(pg_server.dsn, min_size=0, max_size=2)
    try:
        async with aiopglock.Locker(small) as locker:
            busy = await small.acquire()  # the holder has the other one
            assert small.get_idle_size() == 0
            with anyio.fail_after(5):
                started = time.monotonic()
                assert await _try_for(locker, KEY, 0.5) is False
                took = time.monotonic() - started
                assert 0.4 < took < 2, took
                started = time.monotonic()
                async with locker.advisory(KEY, timeout=0) as lock:
                    assert not lock
                assert time.monotonic() - started < 0.5
            assert await waiters(admin, KEY) == []
            # A connection freed within the timeout: the wait proceeds.
            task = asyncio.create_task(_hold_for(locker, KEY, timeout=10))
            await asyncio.sleep(0.1)
            assert not task.done()
            await small.release(busy)
            waiter = await wait_for_waiter(admin, KEY)
            await other.execute("SELECT pg_advisory_unlock($1)", KEY)
            assert await task == waiter
            assert await holders(admin, KEY) == []
    finally:
        await asyncio.wait_for(small.close(), 10)


async def test_timeout_covers_the_wait_for_a_holder_connection(
    pg_server: PgServer, admin: asyncpg.Connection
) -> None:
    """A Locker used without ``async with`` takes its holder connection on
    first use: with none free, ``timeout=0`` is "not acquired" at once and
    ``timeout=0.3`` after 0.3 s; once one frees, the Locker serves."""
    small = await asyncpg.create_pool(pg_server.dsn, min_size=0, max_size=1)
    locker = aiopglock.Locker(small)
    try:
        busy = await small.acquire()
        with anyio.fail_after(5):
            started = time.monotonic()
            assert await _try_for(locker, KEY, 0) is False
            assert time.monotonic() - started < 0.2
            started = time.monotonic()
            assert await _try_for(locker, KEY, 0.3) is False
            assert 0.25 < time.monotonic() - started < 2
        task = asyncio.create_task(_hold_for(locker, KEY, timeout=10))
        await asyncio.sleep(0.1)
        assert not task.done()
        await small.release(busy)
        pid = await task
        assert pid is not None and await holders(admin, KEY) == []
    finally:
        await locker.aclose()
        await asyncio.wait_for(small.close(), 10)


STORM_LANES = 4
STORM_ROUNDS = 260  # per lane: 1,040 races


@pytest.mark.slow
async def test_storm_lock_timeout_racing_the_unlock_leaves_nothing(
    pg_server: PgServer, connect: Connect
) -> None:
    """``lock_timeout`` firing as the holder unlocks: PostgreSQL can grant the
    lock and still raise 55P03. A contended Locker wait with a 1-5 ms timeout
    races another session's unlock; after every round whose handle is
    falsy, pg_locks holds nothing of the Locker's connections for that key.
    The pool's reset here leaves advisory locks alone (``reset=``), so a hold
    the Locker failed to resolve would stay visible rather than be cleaned
    up behind its back."""
    app = f"aiopglock-locker-55p03-{os.getpid()}"

    async def reset(conn: asyncpg.Connection) -> None:
        await conn.execute("RESET ALL")

    pool = await asyncpg.create_pool(
        pg_server.dsn,
        min_size=0,
        max_size=STORM_LANES + 2,
        server_settings={"application_name": app},
        reset=reset,
    )
    outcomes = {True: 0, False: 0}
    started = time.monotonic()
    try:
        async with aiopglock.Locker(pool) as locker:

            async def lane(i: int) -> None:
                key = KEY + 1000 + i
                other = await connect()
                watcher = await connect()
                for n in range(STORM_ROUNDS):
                    await other.execute("SELECT pg_advisory_lock($1)", key)
                    attempt = asyncio.create_task(
                        _try_for(locker, key, random.uniform(0.001, 0.005))
                    )
                    await asyncio.sleep(random.uniform(0.0, 0.006))
                    await other.execute("SELECT pg_advisory_unlock($1)", key)
                    got = await attempt
                    outcomes[got] += 1
                    left = await watcher.fetch(
                        "SELECT l.pid, l.granted FROM pg_locks AS l "
                        "JOIN pg_stat_activity AS a ON a.pid = l.pid "
                        "WHERE l.locktype = 'advisory' AND a.application_name = $1 "
                        "AND l.objid::int8 = ($2::int8 & 4294967295)",
                        app,
                        key,
                    )
                    assert left == [], f"round {n}, handle {got}: {left}"

            with anyio.fail_after(120):
                await asyncio.gather(*(lane(i) for i in range(STORM_LANES)))
    finally:
        await asyncio.wait_for(pool.close(), 10)
    total = sum(outcomes.values())
    print(
        f"\n[locker] {total} lock_timeout races in {time.monotonic() - started:.1f} s: "
        f"{outcomes[True]} granted, {outcomes[False]} not acquired, locks left: 0"
    )
    assert total >= 1000


# --------------------------------------------------------------------------- prioritize()


@pytest.mark.parametrize("form", ["locker.advisory", "advisory(db=locker)"])
async def test_prioritize_protects_a_wait_through_a_locker(
    form: str, pg_server: PgServer, admin: asyncpg.Connection, connect: Connect
) -> None:
    """A blocker session holds the key; inside a prioritize() block, a wait
    through the Locker is granted because the blocker is terminated."""
    blocker = await connect()
    await blocker.execute("SELECT pg_advisory_lock($1)", KEY)
    blocker_pid = blocker.get_server_pid()
    pool = await asyncpg.create_pool(pg_server.dsn, min_size=0, max_size=4)
    try:
        async with aiopglock.Locker(pool) as locker:
            spec = (
                locker.advisory(KEY, timeout=5)
                if form == "locker.advisory"
                else aiopglock.advisory(KEY, db=locker, timeout=5)
            )
            async with aiopglock.prioritize(
                via=pool, action=aiopglock.Terminate, interval=0.05
            ) as prioritizer:
                started = time.monotonic()
                async with spec as lock:
                    assert lock
                    assert await holders(admin, KEY) == [lock.pid]
                took = time.monotonic() - started
            assert blocker_pid in prioritizer.signalled
            # The Locker's own connections were never signalled.
            assert lock.pid not in prioritizer.signalled
            assert took < 3, took
    finally:
        await asyncio.wait_for(pool.close(), 10)


@pytest.mark.parametrize("form", ["locker.advisory", "advisory(db=locker)"])
async def test_xact_takes_the_lock_in_a_transaction_of_its_own(
    pool: asyncpg.Pool, admin: asyncpg.Connection, form: str
) -> None:
    key = 880_000_001
    async with aiopglock.Locker(pool) as locker:
        spec = (
            locker.advisory(key, xact=True)
            if form == "locker.advisory"
            else aiopglock.advisory(key, db=locker, xact=True)
        )
        async with spec as lock:
            assert lock
            assert lock.connection is not None
            assert lock.connection.is_in_transaction()
            pid = lock.connection.get_server_pid()
            # Held by the transaction's backend, at transaction level: not on
            # the Locker's holder connection, and another session cannot take it.
            assert await holders(admin, key) == [pid]
            assert not await admin.fetchval("SELECT pg_try_advisory_lock($1)", key)
            # A nested transaction works inside, as on plain asyncpg.
            async with lock.connection.transaction():
                assert await lock.connection.fetchval("SELECT 1") == 1
        assert await holders(admin, key) == []
        # Busy elsewhere: timeout=0 is falsy, and Raise raises.
        assert await admin.fetchval("SELECT pg_try_advisory_lock($1)", key)
        async with locker.advisory(key, xact=True, timeout=0) as lock:
            assert not lock
        with pytest.raises(aiopglock.LockNotAcquired):
            async with locker.advisory(key, xact=True, timeout=0, side_effect=aiopglock.Raise):
                pass
        await admin.fetchval("SELECT pg_advisory_unlock($1)", key)
    assert pool.get_idle_size() == pool.get_size()


async def test_xact_under_the_tasks_own_locker_hold_nests(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    """A task holding a key on the Locker asks for it again with xact=True:
    it is granted at once (waiting on the server would wait for itself), in a
    transaction of its own; a shared hold asked for exclusive is refused."""
    key = 880_000_002
    async with aiopglock.Locker(pool) as locker:
        for timeout in (0, 1, None):
            async with locker.advisory(key) as outer:
                assert outer
                with anyio.fail_after(5):
                    async with locker.advisory(key, xact=True, timeout=timeout) as inner:
                        assert inner
                        assert inner.connection.is_in_transaction()
                        assert inner.pid == outer.pid
                        assert not await admin.fetchval("SELECT pg_try_advisory_lock($1)", key)
                    async with aiopglock.advisory(key, db=locker, xact=True) as inner:
                        assert inner
                assert await holders(admin, key) == [outer.pid]
            assert await holders(admin, key) == []
        async with locker.advisory(key, shared=True):
            with pytest.raises(aiopglock.UsageError, match="upgrading"):
                async with locker.advisory(key, xact=True):
                    pass
    assert pool.get_idle_size() == pool.get_size()
