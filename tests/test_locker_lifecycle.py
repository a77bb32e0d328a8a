"""A ``Locker``'s lifetime crosses tasks, as a pool's does.

pytest-asyncio runs an async generator fixture's setup and teardown in
different tasks, and applications keep an ``AsyncExitStack`` on a long-lived
object: a Locker entered in one task is closed in another. It may also be
used without ``async with`` at all (it starts on first use) and closed with
``aclose()``. Whatever the path, after closing nothing is left: no task of
the Locker, no pool connection leased, no advisory lock in ``pg_locks``. A
Locker dropped while open warns (``ResourceWarning``) and still gives its
connection back.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import warnings
import weakref
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

import aiopglock
from tests._helpers import Connect, PgServer, advisory_locks, holders, wait_for_waiter

KEY = 0x10C4_0000_0101
OTHER_KEY = 0x10C4_0000_0102
THIRD_KEY = 0x10C4_0000_0103
APP = f"aiopglock-lifecycle-{os.getpid()}"


async def all_idle(pool: asyncpg.Pool) -> bool:
    return pool.get_idle_size() == pool.get_size()


async def nothing_held(admin: asyncpg.Connection, app: str) -> bool:
    """No advisory lock held or awaited by a session named ``app``."""
    count = await admin.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
        "AND pid IN (SELECT pid FROM pg_stat_activity WHERE application_name = $1)",
        app,
    )
    return bool(count == 0)


def locker_tasks(locker: aiopglock.Locker) -> list[asyncio.Task[Any]]:
    """The tasks a Locker owns that are still running."""
    tasks = list(locker._waits)
    if locker._serve_task is not None:
        tasks.append(locker._serve_task)
    return [t for t in tasks if not t.done()]


@pytest.fixture
async def app_pool(pg_server: PgServer) -> AsyncIterator[asyncpg.Pool]:
    """A pool whose sessions are recognisable in pg_stat_activity."""
    pool = await asyncpg.create_pool(
        pg_server.dsn, min_size=0, max_size=4, server_settings={"application_name": APP}
    )
    try:
        yield pool
    finally:
        await asyncio.wait_for(pool.close(), 10)


async def assert_nothing_left(
    locker: aiopglock.Locker, pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    assert locker_tasks(locker) == []
    assert await all_idle(pool), (pool.get_size(), pool.get_idle_size())
    assert await nothing_held(admin, APP)
    with pytest.raises(aiopglock.UsageError, match="closed"):
        async with locker.advisory(KEY):
            pass


# --------------------------------------------------------------------------- a real fixture

# Where the fixture below ran its setup and its teardown, and what it saw after.
_fixture_log: list[Any] = []


@pytest_asyncio.fixture
async def checked(app_pool: asyncpg.Pool, admin: asyncpg.Connection) -> AsyncIterator[None]:
    """Torn down after ``locker`` (requested first, set up first): checks
    that the Locker's teardown, in another task, left nothing."""
    _fixture_log.clear()
    yield
    setup_task, locker = _fixture_log[0]
    teardown_task = _fixture_log[1]
    print(
        f"\n[lifecycle] fixture setup in {setup_task.get_name()}, "
        f"teardown in {teardown_task.get_name()}"
    )
    assert setup_task is not teardown_task
    await assert_nothing_left(locker, app_pool, admin)


@pytest_asyncio.fixture
async def locker(app_pool: asyncpg.Pool) -> AsyncIterator[aiopglock.Locker]:
    """The fixture every user of pytest-asyncio writes."""
    async with aiopglock.Locker(app_pool) as lk:
        _fixture_log.append((asyncio.current_task(), lk))
        yield lk
    _fixture_log.append(asyncio.current_task())


@pytest_asyncio.fixture
async def held(locker: aiopglock.Locker) -> AsyncIterator[Any]:
    """A lock held across the test: taken in the setup task, released in the
    teardown task."""
    async with locker.advisory(THIRD_KEY) as lock:
        assert lock
        yield lock


async def test_a_real_pytest_asyncio_fixture(
    checked: None,
    locker: aiopglock.Locker,
    held: Any,
    admin: asyncpg.Connection,
    connect: Connect,
) -> None:
    assert await holders(admin, THIRD_KEY) == [held.pid]
    async with locker.advisory(KEY) as lock:
        assert lock and await holders(admin, KEY) == [lock.pid]
    # A contended wait on a dedicated connection, too.
    other = await connect()
    await other.execute("SELECT pg_advisory_lock($1)", OTHER_KEY)
    task = asyncio.create_task(_hold_once(locker, OTHER_KEY))
    waiter = await wait_for_waiter(admin, OTHER_KEY)
    await other.execute("SELECT pg_advisory_unlock($1)", OTHER_KEY)
    assert await task == waiter
    assert locker_tasks(locker) != []


async def _hold_once(locker: aiopglock.Locker, key: int, **kw: Any) -> int | None:
    async with locker.advisory(key, side_effect=aiopglock.Raise, **kw) as lock:
        return lock.pid


# --------------------------------------------------------------------------- other lifetimes


async def test_async_exit_stack_closed_in_another_task(
    app_pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    stack = contextlib.AsyncExitStack()

    async def start() -> aiopglock.Locker:
        return await stack.enter_async_context(aiopglock.Locker(app_pool))

    locker = await asyncio.create_task(start())
    async with locker.advisory(KEY) as lock:
        assert lock and await holders(admin, KEY) == [lock.pid]
    await asyncio.create_task(stack.aclose())
    await assert_nothing_left(locker, app_pool, admin)


async def test_entered_in_one_task_exited_in_another_while_a_lock_is_held(
    app_pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    """A third task holds a lock when the Locker closes: it is told (LockLost),
    and nothing stays held or leased."""
    locker = aiopglock.Locker(app_pool)
    assert await asyncio.create_task(locker.__aenter__()) is locker
    entered = asyncio.Event()
    outcome: list[str] = []

    async def holder() -> None:
        try:
            async with locker.advisory(KEY) as lock:
                assert lock
                entered.set()
                await asyncio.sleep(30)
        except aiopglock.LockLost:
            outcome.append("lost")

    task = asyncio.create_task(holder())
    await entered.wait()
    await asyncio.create_task(locker.__aexit__(None, None, None))
    await task
    assert outcome == ["lost"]
    await assert_nothing_left(locker, app_pool, admin)


async def test_no_async_with_at_all(
    app_pool: asyncpg.Pool, admin: asyncpg.Connection, connect: Connect
) -> None:
    before = set(asyncio.all_tasks())
    locker = aiopglock.Locker(app_pool)
    assert app_pool.get_size() == 0  # nothing taken before first use
    async with locker.advisory(KEY) as lock:
        assert lock and await holders(admin, KEY) == [lock.pid]
    assert "open" in repr(locker)
    # A contended wait leaves a dedicated connection behind it.
    other = await connect()
    await other.execute("SELECT pg_advisory_lock($1)", OTHER_KEY)
    task = asyncio.create_task(_hold_once(locker, OTHER_KEY, timeout=5))
    await wait_for_waiter(admin, OTHER_KEY)
    await other.execute("SELECT pg_advisory_unlock($1)", OTHER_KEY)
    await task
    await locker.aclose()
    await locker.aclose()  # idempotent
    assert set(asyncio.all_tasks()) - before == set()
    await assert_nothing_left(locker, app_pool, admin)


async def test_aclose_from_two_tasks_at_once_with_a_wait_in_progress(
    app_pool: asyncpg.Pool, admin: asyncpg.Connection, connect: Connect
) -> None:
    """Two tasks close the Locker at once while a contended wait is queued on
    the server: both return once it is closed, the wait is withdrawn (a
    UsageError for its caller), and nothing waits or is held."""
    other = await connect()
    await other.execute("SELECT pg_advisory_lock($1)", KEY)
    locker = aiopglock.Locker(app_pool)
    waiting = asyncio.create_task(_hold_once(locker, KEY))
    await wait_for_waiter(admin, KEY)
    await asyncio.gather(asyncio.create_task(locker.aclose()), asyncio.create_task(locker.aclose()))
    with pytest.raises(aiopglock.UsageError, match="closed"):
        await waiting
    assert [r["pid"] for r in await advisory_locks(admin, key=KEY)] == [other.get_server_pid()]
    await assert_nothing_left(locker, app_pool, admin)


async def test_garbage_collected_while_open_warns_and_gives_back(
    app_pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    locker = aiopglock.Locker(app_pool)
    async with locker.advisory(KEY) as lock:
        assert lock
    task = locker._serve_task
    assert task is not None
    assert app_pool.get_idle_size() == app_pool.get_size() - 1  # the holder
    ref = weakref.ref(locker)
    with pytest.warns(ResourceWarning, match="unclosed <aiopglock.Locker open"):
        del locker, lock
        gc.collect()
    assert ref() is None
    # The background task noticed, and gave its connection back.
    await asyncio.wait_for(task, 5)
    assert await all_idle(app_pool)
    assert await holders(admin, KEY) == []


async def test_used_from_another_event_loop_is_refused(app_pool: asyncpg.Pool) -> None:
    """A Locker belongs to the loop it started on: from another loop (another
    thread's asyncio.run) it is a clear UsageError, before anything is sent."""
    async with aiopglock.Locker(app_pool) as locker:

        async def elsewhere() -> None:
            async with locker.advisory(KEY):
                pass

        with pytest.raises(aiopglock.UsageError, match="another event loop"):
            await asyncio.to_thread(asyncio.run, elsewhere())
        async with locker.advisory(KEY) as lock:
            assert lock


async def test_dropped_open_stops_even_when_the_warning_is_kept(
    app_pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    """A recorded ResourceWarning (or anything else) that keeps a reference
    must not keep the dropped Locker's task and holder connection alive."""
    locker = aiopglock.Locker(app_pool)
    async with locker.advisory(KEY) as lock:
        assert lock
    task = locker._serve_task
    assert task is not None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del locker, lock
        gc.collect()
        kept = list(caught)  # alive until the end of the test
    assert [w.category for w in kept] == [ResourceWarning]
    await asyncio.wait_for(task, 5)
    assert await all_idle(app_pool)
    assert await holders(admin, KEY) == []


async def test_aclose_after_its_loop_has_ended_is_a_no_op(pg_server: PgServer) -> None:
    """Used in one asyncio.run() and never closed; aclose() in a later one
    has nothing left to do (the first loop cancelled its task) and says so
    by returning, not by failing on the closed loop."""
    state: dict[str, Any] = {}

    async def first() -> None:
        pool = await asyncpg.create_pool(pg_server.dsn, min_size=0, max_size=2)
        locker = aiopglock.Locker(pool)
        async with locker.advisory(KEY) as lock:
            assert lock
        state["locker"] = locker
        pool.terminate()  # the holder connection goes with it; the Locker stays open

    async def second() -> None:
        locker = state["locker"]
        await locker.aclose()
        await locker.aclose()
        with pytest.raises(aiopglock.UsageError, match=r"closed|another event loop"):
            async with locker.advisory(KEY):
                pass

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the first loop destroys the pending task
        await asyncio.to_thread(asyncio.run, first())
    await asyncio.to_thread(asyncio.run, second())
