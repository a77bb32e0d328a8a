"""``aiopglock.Watchdog``: sessions waiting longer than ``max_wait`` get their
blockers cancelled or terminated, against the real server.

Every watchdog here watches only this test's waiting session (by its
``application_name``; ``tests/_blocking.py``), so it can only ever act on this
test's blockers, even on a server shared with other runs. Claims are checked
on the server (``pg_stat_activity``: the blocker gone or alive, the waiter
still waiting or granted, no monitor connection left) and on the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import anyio
import asyncpg
import pytest
import pytest_asyncio

import aiopglock
from tests._blocking import Scene, make_scene, no_monitor_left
from tests._helpers import Connect, PgServer, wait_until

KEY_LOCK = "SELECT pg_advisory_lock($1)"
KEY_UNLOCK = "SELECT pg_advisory_unlock($1)"


@pytest.fixture
async def scene(connect: Connect, admin: asyncpg.Connection) -> AsyncIterator[Scene]:
    async with make_scene(connect, admin) as the_scene:
        yield the_scene


class Waiting:
    """A blocker holding the scene's advisory key and a session waiting for it."""

    def __init__(self, scene: Scene, blocker: asyncpg.Connection, waiter: asyncpg.Connection):
        self.scene = scene
        self.blocker = blocker
        self.waiter = waiter
        self.blocker_pid: int = blocker.get_server_pid()
        self.waiter_pid: int = waiter.get_server_pid()
        self.wait: asyncio.Future[None] = asyncio.ensure_future(scene.wait_raw(waiter, "advisory"))

    async def still_waiting(self) -> bool:
        return not self.wait.done() and self.blocker_pid in await self.scene.admin.fetchval(
            "SELECT pg_blocking_pids($1)", self.waiter_pid
        )


@contextlib.asynccontextmanager
async def waiting(scene: Scene) -> AsyncIterator[Waiting]:
    blocker = await scene.session("blocker")
    await scene.hold(blocker, "advisory")
    waiter = await scene.session("waiter")
    scene_wait = Waiting(scene, blocker, waiter)
    try:
        await scene.waiting(scene_wait.waiter_pid)
        yield scene_wait
    finally:
        if not scene_wait.wait.done():
            scene_wait.wait.cancel()
        with contextlib.suppress(BaseException):
            await scene_wait.wait


def watchdog(scene: Scene, db: Any, **kw: Any) -> aiopglock.Watchdog:
    kw.setdefault("interval", 0.02)
    kw.setdefault("application_name", scene.app("waiter"))
    kw.setdefault("monitor_application_name", scene.app("monitor"))
    return aiopglock.Watchdog(db, **kw)


async def more_polls(dog: aiopglock.Watchdog, count: int = 3) -> None:
    """Wait until the watchdog has looked ``count`` more times."""
    target = dog.polls + count

    async def done() -> bool:
        return dog.polls >= target

    await wait_until(done, message=f"{count} more polls")


# --------------------------------------------------------------------------- acting


@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_terminates_after_max_wait_and_reports(
    scene: Scene, pool: asyncpg.Pool, flavour: str, caplog: pytest.LogCaptureFixture
) -> None:
    reported: list[aiopglock.Intervention] = []

    def report(intervention: aiopglock.Intervention) -> None:
        reported.append(intervention)

    async def report_async(intervention: aiopglock.Intervention) -> None:
        # A slow report (a chat message, say): still running when the wait it
        # freed lets the block exit; the watchdog lets it finish.
        await anyio.sleep(0.3)
        reported.append(intervention)

    callback = report if flavour == "sync" else report_async
    max_wait = timedelta(seconds=0.3)
    with caplog.at_level(logging.WARNING, logger="aiopglock"):
        async with waiting(scene) as w:
            async with watchdog(scene, pool, max_wait=max_wait, callback=callback) as dog:
                with anyio.fail_after(20):
                    await w.wait  # granted once the blocker is gone
            await scene.gone(w.blocker_pid)
    [intervention] = reported
    assert list(dog.interventions) == reported
    assert intervention.blocker.pid == w.blocker_pid
    assert intervention.blocker.blocked_pid == w.waiter_pid
    assert intervention.waiter_pids == (w.waiter_pid,)
    assert intervention.action is aiopglock.Terminate
    assert intervention.signalled and not intervention.dry_run
    # Measured by the server from pg_locks.waitstart: never before max_wait.
    assert intervention.wait_duration is not None and intervention.wait_duration >= max_wait
    assert intervention.blocker.application_name == scene.app("blocker")
    assert "pg_advisory_xact_lock" in (intervention.blocker.query or "")
    messages = [r.getMessage() for r in caplog.records if r.name == "aiopglock"]
    assert any(f"terminated backend {w.blocker_pid}" in m for m in messages), messages


async def test_cancel_cancels_the_blockers_statement(scene: Scene, pool: asyncpg.Pool) -> None:
    async with waiting(scene) as w:
        sleeping = asyncio.ensure_future(w.blocker.execute("SELECT pg_sleep(60)"))
        try:
            async with watchdog(scene, pool, max_wait=0, action=aiopglock.Cancel) as dog:
                with anyio.fail_after(20):
                    await w.wait
            with pytest.raises(asyncpg.QueryCanceledError):
                await sleeping
        finally:
            sleeping.cancel()
        assert [i.blocker.pid for i in dog.interventions] == [w.blocker_pid]
        assert await scene.alive(w.blocker_pid)
        await w.blocker.execute("ROLLBACK")
        assert await w.blocker.fetchval("SELECT pg_backend_pid()") == w.blocker_pid


async def test_a_wait_younger_than_max_wait_is_untouched(scene: Scene, pool: asyncpg.Pool) -> None:
    async with waiting(scene) as w, watchdog(scene, pool, max_wait=3600) as dog:
        await more_polls(dog)
        assert await w.still_waiting()
    assert list(dog.interventions) == []
    assert await scene.alive(w.blocker_pid)


async def test_dry_run_touches_nothing_but_reports_once(
    scene: Scene, pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    reported: list[aiopglock.Intervention] = []
    with caplog.at_level(logging.WARNING, logger="aiopglock"):
        async with (
            waiting(scene) as w,
            watchdog(scene, pool, max_wait=0, dry_run=True, callback=reported.append) as dog,
        ):

            async def reported_once() -> bool:
                return bool(reported)

            await wait_until(reported_once)
            await more_polls(dog)
            assert await w.still_waiting()
            assert await scene.alive(w.blocker_pid)
    [intervention] = reported
    assert intervention.dry_run and not intervention.signalled
    assert intervention.blocker.pid == w.blocker_pid
    messages = [r.getMessage() for r in caplog.records if r.name == "aiopglock"]
    assert any(f"(dry run) would terminate backend {w.blocker_pid}" in m for m in messages)


async def test_a_failing_callback_is_logged_and_the_watchdog_goes_on(
    scene: Scene, pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(intervention: aiopglock.Intervention) -> None:
        raise LookupError("callback failed")

    with caplog.at_level(logging.WARNING, logger="aiopglock"):
        async with (
            waiting(scene) as w,
            watchdog(scene, pool, max_wait=0, dry_run=True, callback=broken) as dog,
        ):

            async def reported() -> bool:
                return bool(dog.interventions)

            await wait_until(reported)
            await more_polls(dog)
            assert dog.running
    assert any("callback failed" in (r.exc_text or "") for r in caplog.records)
    assert await scene.alive(w.blocker_pid)


# --------------------------------------------------------------------------- filters


@pytest.mark.parametrize(
    "which",
    [
        "application_name",
        "user",
        "database",
        "exclude_pids",
        "exclude_application_names",
        "predicate",
    ],
)
async def test_filters_leave_other_sessions_alone(
    scene: Scene, pool: asyncpg.Pool, which: str
) -> None:
    async with waiting(scene) as w:
        filters: dict[str, Any] = {
            "application_name": {"application_name": scene.app("somebody-else")},
            "user": {"user": "aiopglock_no_such_user"},
            "database": {"database": "template1"},
            "exclude_pids": {"exclude_pids": [w.blocker_pid]},
            "exclude_application_names": {"exclude_application_names": [scene.app("blocker")]},
            "predicate": {"predicate": lambda blocker: blocker.pid != w.blocker_pid},
        }[which]
        # A dry run: a broken filter shows as a report, and nothing is signalled.
        async with watchdog(scene, pool, max_wait=0, dry_run=True, **filters) as dog:
            await more_polls(dog)
            assert await w.still_waiting()
        assert list(dog.interventions) == []


async def test_matching_filters_act(scene: Scene, pool: asyncpg.Pool) -> None:
    user, database = await scene.admin.fetchrow("SELECT current_user, current_database()")
    async with waiting(scene) as w:
        async with watchdog(
            scene,
            pool,
            max_wait=0,
            user=[user, "aiopglock_no_such_user"],
            database=database,
            exclude_application_names=[scene.app("somebody-else")],
            predicate=lambda blocker: blocker.application_name == scene.app("blocker"),
        ) as dog:
            with anyio.fail_after(20):
                await w.wait
        assert [i.blocker.pid for i in dog.interventions] == [w.blocker_pid]
        await scene.gone(w.blocker_pid)


# --------------------------------------------------------------------------- structure


async def _leftovers(scene: Scene, pool: asyncpg.Pool, before: set[asyncio.Task[Any]]) -> None:
    assert asyncio.all_tasks() - before == set()
    assert pool.get_idle_size() == pool.get_size()

    async def closed() -> bool:
        return await scene.sessions("monitor") == 0

    await wait_until(closed, message="the monitor's backend to exit")


@pytest.mark.parametrize("source", ["pool", "dsn"])
@pytest.mark.parametrize("how", ["async-with", "run-in-task-group"])
async def test_stops_cleanly(
    scene: Scene, pool: asyncpg.Pool, pg_server: PgServer, source: str, how: str
) -> None:
    db: Any = pool if source == "pool" else pg_server.dsn
    async with waiting(scene) as w:
        before = asyncio.all_tasks()
        dog = watchdog(scene, db, max_wait=3600)
        if how == "async-with":
            async with dog:
                assert dog.running and dog.monitor_pid is not None
                assert f"running pid={dog.monitor_pid}" in repr(dog)
                assert await scene.sessions("monitor") == 1
                await more_polls(dog)
        else:
            async with anyio.create_task_group() as tg:
                await tg.start(dog.run)
                assert dog.running and dog.monitor_pid is not None
                assert await scene.sessions("monitor") == 1
                await more_polls(dog)
                tg.cancel_scope.cancel()
        assert not dog.running and dog.monitor_pid is None
        assert " stopped " in repr(dog)
        await _leftovers(scene, pool, before)
        assert await w.still_waiting()


async def test_an_error_in_the_block_stops_it(scene: Scene, pool: asyncpg.Pool) -> None:
    before = asyncio.all_tasks()
    dog = watchdog(scene, pool, max_wait=3600)
    with pytest.raises(RuntimeError, match="the service failed"):
        async with dog:
            await more_polls(dog)
            raise RuntimeError("the service failed")
    assert not dog.running
    await _leftovers(scene, pool, before)


async def test_a_bad_dsn_fails_at_start(scene: Scene, pool: asyncpg.Pool) -> None:
    before = asyncio.all_tasks()
    dog = watchdog(scene, "postgresql://nobody@127.0.0.1:1/none", max_wait=1)
    with pytest.raises(OSError):
        async with dog:
            pytest.fail("the block ran")
    assert not dog.running
    await _leftovers(scene, pool, before)


async def test_runs_once_at_a_time(scene: Scene, pool: asyncpg.Pool) -> None:
    dog = watchdog(scene, pool, max_wait=3600)
    async with dog:
        with pytest.raises(aiopglock.UsageError, match="already running"):
            async with dog:
                pass
        with pytest.raises(aiopglock.UsageError, match="already running"):
            await dog.run()
        assert dog.running
    assert "stopped" in repr(dog)


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"max_wait": -1}, ValueError, "max_wait"),
        ({"max_wait": "1"}, TypeError, "max_wait"),
        ({"interval": 0}, ValueError, "interval"),
        ({"action": "cancel"}, TypeError, "action"),
        ({"dry_run": 1}, TypeError, "dry_run"),
        ({"database": ""}, ValueError, "database"),
        ({"application_name": 3}, TypeError, "application_name"),
        ({"user": []}, ValueError, "user"),
        ({"exclude_pids": ["1"]}, TypeError, "exclude_pids"),
        ({"exclude_pids": [0]}, ValueError, "exclude_pids"),
        ({"exclude_application_names": "x\x00"}, ValueError, "exclude_application_names"),
        ({"predicate": 3}, TypeError, "predicate"),
        ({"callback": "print"}, TypeError, "callback"),
        ({"history": -1}, ValueError, "history"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], error: type[Exception], name: str) -> None:
    kwargs.setdefault("max_wait", 1)
    with pytest.raises(error, match=name):
        aiopglock.Watchdog(None, **kwargs)


def test_bad_db() -> None:
    with pytest.raises(TypeError, match="db"):
        aiopglock.Watchdog(42, max_wait=1)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- victims and culprits


async def _queue(scene: Scene, count: int) -> list[asyncpg.Connection]:
    """``count`` worker sessions, each queued (in this order) for the scene's key."""
    workers = [await scene.session("worker") for _ in range(count)]
    return workers


async def _work(
    scene: Scene, worker: asyncpg.Connection, hold: float, done: list[int], waited: list[float]
) -> None:
    """A healthy worker: wait for the key, hold it ``hold`` seconds, let go."""
    key = aiopglock.advisory_key(scene.key)
    started = time.monotonic()
    await worker.execute(KEY_LOCK, key)
    waited.append(time.monotonic() - started)
    await asyncio.sleep(hold)  # the work done under the lock
    await worker.execute(KEY_UNLOCK, key)
    done.append(worker.get_server_pid())


async def _start_in_order(
    scene: Scene,
    workers: list[asyncpg.Connection],
    hold: float,
    done: list[int],
    waited: list[float],
) -> list[asyncio.Task[None]]:
    """Start the workers one after the other, each once the previous one is
    queued (or holds the key), so the lock queue is in this order."""
    tasks: list[asyncio.Task[None]] = []
    key = aiopglock.advisory_key(scene.key)

    async def in_pg_locks(pid: int) -> bool:
        return bool(
            await scene.admin.fetchval(
                "SELECT EXISTS (SELECT FROM pg_locks WHERE pid = $1 AND locktype = 'advisory' "
                "AND ((classid::int8 << 32) | objid::int8) = $2 & x'ffffffffffffffff'::int8)",
                pid,
                key,
            )
        )

    for worker in workers:
        tasks.append(asyncio.ensure_future(_work(scene, worker, hold, done, waited)))
        await wait_until(lambda worker=worker: in_pg_locks(worker.get_server_pid()))
    return tasks


async def test_only_the_stuck_holder_is_terminated_and_the_queue_completes(
    scene: Scene, pool: asyncpg.Pool
) -> None:
    """One stuck holder, four workers queued on its key, max_wait=1: the
    workers queued ahead of others are victims, not culprits, and each worker
    that gets the lock after the queue has aged holds it for 0.2 s unharmed."""
    stuck = await scene.session("stuck")
    stuck_pid = stuck.get_server_pid()
    await stuck.execute(KEY_LOCK, aiopglock.advisory_key(scene.key))
    workers = await _queue(scene, 4)
    done: list[int] = []
    waited: list[float] = []
    tasks = await _start_in_order(scene, workers, 0.2, done, waited)
    try:
        # Every worker but the first is blocked by workers ahead of it, too.
        blockers = await scene.admin.fetchval(
            "SELECT pg_blocking_pids($1)", workers[-1].get_server_pid()
        )
        assert set(blockers) == {stuck_pid} | {w.get_server_pid() for w in workers[:-1]}
        async with watchdog(
            scene, pool, max_wait=1, interval=0.02, application_name=scene.app("worker")
        ) as dog:
            with anyio.fail_after(30):
                await asyncio.gather(*tasks)
            await more_polls(dog)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert [i.blocker.pid for i in dog.interventions] == [stuck_pid]
    [intervention] = dog.interventions
    assert set(intervention.waiter_pids) == {w.get_server_pid() for w in workers}
    await scene.gone(stuck_pid)
    assert sorted(done) == sorted(w.get_server_pid() for w in workers)
    for worker in workers:
        assert await scene.alive(worker.get_server_pid())
        assert await worker.fetchval("SELECT 1") == 1
    # The later workers got the lock long after max_wait: the queue had aged.
    assert max(waited) > 1.0


async def test_a_queue_of_short_holders_behind_an_old_wait_is_left_alone(
    scene: Scene, pool: asyncpg.Pool
) -> None:
    """Five workers take turns at the key, 0.25 s each: the last waits about
    1 s (past max_wait=0.75), yet no holder kept anyone waiting for 0.75 s."""
    workers = await _queue(scene, 5)
    done: list[int] = []
    waited: list[float] = []
    async with watchdog(
        scene, pool, max_wait=0.75, interval=0.02, application_name=scene.app("worker")
    ) as dog:
        tasks = await _start_in_order(scene, workers, 0.25, done, waited)
        with anyio.fail_after(30):
            await asyncio.gather(*tasks)
        await more_polls(dog)
    assert list(dog.interventions) == []
    assert sorted(done) == sorted(w.get_server_pid() for w in workers)
    assert max(waited) > 0.75  # a wait did pass max_wait
    for worker in workers:
        assert await scene.alive(worker.get_server_pid())


async def test_a_new_holder_is_timed_from_when_it_began_to_block(
    scene: Scene, pool: asyncpg.Pool
) -> None:
    """A waiter aged past max_wait; the holder it waited for goes, the next
    one in the queue gets the key and keeps it: that one is terminated only
    after it has itself blocked for max_wait, not the moment it is granted."""
    key = aiopglock.advisory_key(scene.key)
    first = await scene.session("first")
    await first.execute(KEY_LOCK, key)
    second = await scene.session("second")
    second_wait = asyncio.ensure_future(second.execute(KEY_LOCK, key))
    await scene.waiting(second.get_server_pid())
    waiter = await scene.session("waiter")
    waiter_wait = asyncio.ensure_future(scene.wait_raw(waiter, "advisory"))
    try:
        await scene.waiting(waiter.get_server_pid())
        max_wait = 0.8
        async with watchdog(
            scene, pool, max_wait=max_wait, exclude_application_names=[scene.app("first")]
        ) as dog:
            await anyio.sleep(max_wait)  # the waiter's wait ages past max_wait
            assert list(dog.interventions) == []  # 'first' is spared by name
            await first.execute(KEY_UNLOCK, key)
            granted_at = time.monotonic()
            await second_wait  # 'second' holds the key now, and keeps it
            with anyio.fail_after(20):
                await waiter_wait
            freed_after = time.monotonic() - granted_at
    finally:
        for wait in (second_wait, waiter_wait):
            wait.cancel()
        await asyncio.gather(second_wait, waiter_wait, return_exceptions=True)
    assert [i.blocker.pid for i in dog.interventions] == [second.get_server_pid()]
    # Timed from its grant (the client sees the grant a moment after the server).
    assert freed_after >= max_wait - 0.05
    await scene.gone(second.get_server_pid())
    assert await scene.alive(first.get_server_pid())


async def test_a_holder_that_let_go_since_the_look_is_left_alone(
    scene: Scene, pool: asyncpg.Pool
) -> None:
    """A look is a snapshot: a holder that lets go before the signal (here,
    while the predicate runs) is neither signalled nor reported."""
    async with waiting(scene) as w:
        asked: list[int] = []

        async def let_go_first(found: aiopglock.Blocker) -> bool:
            asked.append(found.pid)
            await w.blocker.execute("ROLLBACK")  # its transaction's lock goes
            return True

        async with watchdog(scene, pool, max_wait=0, predicate=let_go_first) as dog:
            with anyio.fail_after(20):
                await w.wait
            await more_polls(dog)
    assert asked == [w.blocker_pid]
    assert list(dog.interventions) == []
    assert await scene.alive(w.blocker_pid)
    assert await w.blocker.fetchval("SELECT pg_backend_pid()") == w.blocker_pid


# --------------------------------------------------------------------------- a busy pool


async def test_a_fully_leased_pool_fails_at_start_at_once(scene: Scene, pool: asyncpg.Pool) -> None:
    leased = [await pool.acquire() for _ in range(pool.get_max_size())]
    try:
        dog = watchdog(scene, pool, max_wait=1)
        with anyio.fail_after(2), pytest.raises(aiopglock.UsageError, match="in use"):
            await dog.start()
        assert not dog.running
        with anyio.fail_after(2), pytest.raises(aiopglock.UsageError, match="in use"):
            async with dog:
                pytest.fail("the block ran")
        assert not dog.running
        assert await scene.sessions("monitor") == 0
    finally:
        for conn in leased:
            await pool.release(conn)
    await no_monitor_left(scene, pool)


async def test_a_lost_connection_is_replaced_once_the_pool_has_room(
    scene: Scene, pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    """The monitor's backend dies (the pool takes the connection back by
    itself) while every other pool connection is in use: each look logs
    that none is free, the watchdog goes on, and takes one once one is."""
    dog = watchdog(scene, pool, max_wait=3600, interval=0.3)
    with caplog.at_level(logging.WARNING, logger="aiopglock"):
        async with dog:
            await more_polls(dog, 1)
            first = dog.monitor_pid
            assert first is not None
            leased = [await pool.acquire() for _ in range(pool.get_max_size() - 1)]
            # Queued first: the connection the pool takes back goes to this.
            last = asyncio.ensure_future(pool.acquire())
            try:
                await scene.admin.execute("SELECT pg_terminate_backend($1)", first)
                await scene.gone(first)
                with anyio.fail_after(10):
                    leased.append(await last)

                async def warned() -> bool:
                    return any(
                        "every connection of the pool" in r.getMessage() for r in caplog.records
                    )

                await wait_until(warned)
                assert dog.running
            finally:
                if not last.done():
                    last.cancel()
                for conn in leased:
                    await pool.release(conn)

            async def replaced() -> bool:
                return dog.monitor_pid not in (None, first)

            await wait_until(replaced, message="a new monitor connection")
            await more_polls(dog)
            assert dog.running and await scene.sessions("monitor") == 1
    await no_monitor_left(scene, pool)


# --------------------------------------------------------------------------- lifecycles


@pytest_asyncio.fixture
async def nothing_left(scene: Scene, pool: asyncpg.Pool) -> AsyncIterator[None]:
    """Torn down after the fixtures that use it: no monitor task, connection
    or backend is left."""
    yield
    await no_monitor_left(scene, pool)


@pytest_asyncio.fixture
async def fixture_watchdog(
    nothing_left: None, scene: Scene, pool: asyncpg.Pool
) -> AsyncIterator[aiopglock.Watchdog]:
    entered_in = asyncio.current_task()
    async with watchdog(scene, pool, max_wait=0.3) as dog:
        yield dog
    # pytest-asyncio runs this teardown in another task than the setup.
    assert asyncio.current_task() is not entered_in
    assert not dog.running and dog.monitor_pid is None


async def test_in_an_async_generator_fixture(
    fixture_watchdog: aiopglock.Watchdog, scene: Scene
) -> None:
    assert fixture_watchdog.running
    async with waiting(scene) as w:
        with anyio.fail_after(20):
            await w.wait

    # The waiter may be granted before the watchdog has read the server's reply.
    async def acted() -> list[int]:
        return [i.blocker.pid for i in fixture_watchdog.interventions]

    assert await wait_until(acted) == [w.blocker_pid]
    await scene.gone(w.blocker_pid)


@pytest.mark.parametrize("how", ["exit-stack", "tasks", "start-aclose"])
async def test_entered_and_exited_in_different_tasks(
    scene: Scene, pool: asyncpg.Pool, how: str
) -> None:
    dog = watchdog(scene, pool, max_wait=0.3)
    stack = contextlib.AsyncExitStack()
    if how == "exit-stack":
        await asyncio.create_task(stack.enter_async_context(dog))
    elif how == "tasks":
        await asyncio.create_task(dog.__aenter__())
    else:
        await asyncio.create_task(dog.start())
    assert dog.running and await scene.sessions("monitor") == 1
    async with waiting(scene) as w:
        with anyio.fail_after(20):
            await w.wait
    if how == "exit-stack":
        await asyncio.create_task(stack.aclose())
    elif how == "tasks":
        await asyncio.create_task(dog.__aexit__(None, None, None))
    else:
        await asyncio.create_task(dog.aclose())
    assert not dog.running
    assert [i.blocker.pid for i in dog.interventions] == [w.blocker_pid]
    await no_monitor_left(scene, pool)


async def test_start_and_an_idempotent_aclose(scene: Scene, pool: asyncpg.Pool) -> None:
    dog = watchdog(scene, pool, max_wait=3600)
    await dog.aclose()  # never started: nothing to do
    await dog.start()
    try:
        with pytest.raises(aiopglock.UsageError, match="already running"):
            await dog.start()
        await more_polls(dog)
        assert await scene.sessions("monitor") == 1
        assert pool.get_size() - pool.get_idle_size() == 1
    finally:
        await dog.aclose()
    await dog.aclose()
    assert not dog.running and " stopped " in repr(dog)
    await no_monitor_left(scene, pool)
    # A closed watchdog may be started again.
    async with dog:
        await more_polls(dog)
    await no_monitor_left(scene, pool)


async def test_aclose_finishes_through_a_cancellation(scene: Scene, pool: asyncpg.Pool) -> None:
    """The task closing it is cancelled meanwhile: the watchdog still stops
    and gives its connection back before the cancellation goes on."""
    dog = watchdog(scene, pool, max_wait=3600)
    await dog.start()
    await more_polls(dog)
    closing = asyncio.ensure_future(dog.aclose())
    await asyncio.sleep(0)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert not dog.running
    await no_monitor_left(scene, pool)


async def test_dropped_open_warns_and_leaves_nothing(scene: Scene, pool: asyncpg.Pool) -> None:
    dog = watchdog(scene, pool, max_wait=3600, interval=3600)
    await dog.start()
    await more_polls(dog, 1)
    assert await scene.sessions("monitor") == 1
    with pytest.warns(ResourceWarning, match="unclosed <Watchdog") as warned:
        del dog
        gc.collect()
    [warning] = warned.list
    assert isinstance(warning.source, aiopglock.Watchdog)
    del warning, warned

    # Its task stops (nobody awaits it) and gives its connection back.
    async def stopped() -> bool:
        return not [t for t in asyncio.all_tasks() if t.get_name().startswith("aiopglock")]

    await wait_until(stopped, message="the dropped watchdog's task to end")
    await no_monitor_left(scene, pool)
