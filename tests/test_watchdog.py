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
import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import anyio
import asyncpg
import pytest

import aiopglock
from tests._blocking import Scene, make_scene
from tests._helpers import Connect, PgServer, wait_until


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
