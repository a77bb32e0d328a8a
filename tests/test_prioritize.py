"""``aiopglock.prioritize``: the sessions blocking protected lock waits are
cancelled or terminated, against the real server.

Every claim is checked on the server: the blocker's backend is gone from
``pg_stat_activity`` (Terminate) or still there with its statement cancelled
(Cancel), bystanders keep their pids, and after the block no monitor
connection is left (``pg_stat_activity`` by application_name, pool sizes)
and no asyncio task.

Each test's sessions and resources are its own (``tests/_blocking.py``), so
runs sharing one server never meet; the prioritizer only ever sees the
blockers of this test's waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import anyio
import anyio.lowlevel
import asyncpg
import pytest
import pytest_asyncio

import aiopglock
from aiopglock import _protect
from aiopglock._db import raw_connection
from tests._blocking import KINDS, Scene, make_scene, no_monitor_left
from tests._helpers import Connect, PgServer, wait_until


@pytest.fixture
async def scene(connect: Connect, admin: asyncpg.Connection) -> AsyncIterator[Scene]:
    async with make_scene(connect, admin) as the_scene:
        yield the_scene


def prioritize(scene: Scene, db: Any = None, **kw: Any) -> aiopglock.Prioritize:
    kw.setdefault("interval", 0.05)
    kw.setdefault("monitor_application_name", scene.app("monitor"))
    return aiopglock.prioritize(db, **kw)


# --------------------------------------------------------------------------- freeing waits


@pytest.mark.parametrize("protect", ["waits", "connection"])
@pytest.mark.parametrize("kind", KINDS)
async def test_terminate_frees_the_wait(
    scene: Scene,
    pool: asyncpg.Pool,
    kind: str,
    protect: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    blocker = await scene.session("blocker")
    blocker_pid = blocker.get_server_pid()
    statement = await scene.hold(blocker, kind)
    if protect == "connection":
        conn = await scene.session("protected")
        db, protected = conn, conn
    else:
        db, protected = pool, None
    with caplog.at_level(logging.WARNING, logger="aiopglock"):
        async with prioritize(scene, protected, via=pool) as prioritizer:
            assert await scene.sessions("monitor") == 1
            assert f"running monitor_pid={prioritizer.monitor_pid}" in repr(prioritizer)
            async with scene.acquire(kind, db, timeout=20) as lock:
                assert lock
                assert lock.pid != blocker_pid
    assert prioritizer.signalled == [blocker_pid]
    assert [blocker.pid for blocker in prioritizer.blockers] == [blocker_pid]
    assert repr(prioritizer).endswith(f"signalled=[{blocker_pid}]>")
    assert " stopped " in repr(prioritizer)
    await scene.gone(blocker_pid)
    assert await scene.sessions("monitor") == 0
    messages = [r.getMessage() for r in caplog.records if r.name == "aiopglock"]
    assert any(f"terminated backend {blocker_pid}" in m and statement in m for m in messages), (
        messages
    )


async def test_a_new_wait_is_looked_at_at_once(scene: Scene, pool: asyncpg.Pool) -> None:
    """The monitor sleeps until a protected wait begins, not until the next interval."""
    blocker = await scene.session("blocker")
    await scene.hold(blocker, "advisory")
    with anyio.fail_after(20):
        async with (
            prioritize(scene, via=pool, interval=3600) as prioritizer,
            scene.acquire("advisory", pool, timeout=20) as lock,
        ):
            assert lock
    assert prioritizer.signalled == [blocker.get_server_pid()]


@pytest.mark.parametrize("kind", KINDS)
async def test_cancel_cancels_the_statement_and_spares_the_session(
    scene: Scene, pool: asyncpg.Pool, kind: str
) -> None:
    blocker = await scene.session("blocker")
    blocker_pid = blocker.get_server_pid()
    await scene.hold(blocker, kind)
    sleeping = asyncio.ensure_future(blocker.execute("SELECT pg_sleep(60)"))
    try:

        async def running() -> bool:
            return bool(
                await scene.admin.fetchval(
                    "SELECT state = 'active' AND query LIKE '%pg_sleep%' "
                    "FROM pg_stat_activity WHERE pid = $1",
                    blocker_pid,
                )
            )

        await wait_until(running, message="the blocker's pg_sleep")
        async with (
            prioritize(scene, via=pool, action=aiopglock.Cancel) as prioritizer,
            scene.acquire(kind, pool, timeout=20) as lock,
        ):
            assert lock
        with pytest.raises(asyncpg.QueryCanceledError):
            await sleeping
    finally:
        if not sleeping.done():
            sleeping.cancel()
    assert prioritizer.signalled == [blocker_pid]
    # The same backend lives on, in its aborted transaction, and answers.
    state = await scene.admin.fetchval(
        "SELECT state FROM pg_stat_activity WHERE pid = $1", blocker_pid
    )
    assert state == "idle in transaction (aborted)"
    await blocker.execute("ROLLBACK")
    assert await blocker.fetchval("SELECT pg_backend_pid()") == blocker_pid


@pytest.mark.parametrize("kind", KINDS)
async def test_bystanders_are_never_signalled(scene: Scene, pool: asyncpg.Pool, kind: str) -> None:
    """Neither a session holding an unrelated lock nor one queued behind the
    protected wait (for the same blocker) is touched."""
    blocker = await scene.session("blocker")
    blocker_pid = blocker.get_server_pid()
    await scene.hold(blocker, kind)
    unrelated = await scene.session("unrelated")
    await unrelated.execute("BEGIN")
    if kind == "row":  # another row of the same table (a table lock waits for it)
        await unrelated.execute(f'UPDATE "{scene.table}" SET v = v + 1 WHERE id = 2')
    await unrelated.execute("SELECT pg_advisory_lock($1)", aiopglock.advisory_key(scene.key + "x"))
    queued = await scene.session("queued")
    gate = anyio.Event()
    seen: list[int] = []

    async def after_gate(blocker: aiopglock.Blocker) -> bool:
        seen.append(blocker.pid)
        await gate.wait()
        return True

    async with prioritize(scene, via=pool, predicate=after_gate) as prioritizer:
        async with anyio.create_task_group() as tg:

            async def protected() -> None:
                async with scene.acquire(kind, pool, timeout=20) as lock:
                    assert lock

            tg.start_soon(protected)
            [protected_pid] = await scene.blocked_by(blocker_pid)
            queued_wait = asyncio.ensure_future(scene.wait_raw(queued, kind))
            try:
                # Behind the protected wait (for rows: blocked by its tuple lock).
                await scene.waiting(queued.get_server_pid())
                gate.set()
            except BaseException:
                queued_wait.cancel()
                raise
        with anyio.fail_after(20):
            await queued_wait
    assert prioritizer.signalled == [blocker_pid]
    assert set(seen) == {blocker_pid}
    await scene.gone(blocker_pid)
    for bystander in (unrelated, queued):
        assert await scene.alive(bystander.get_server_pid())
        assert await bystander.fetchval("SELECT 1") == 1
    assert protected_pid not in prioritizer.signalled


async def test_protected_waits_never_signal_each_other(scene: Scene, pool: asyncpg.Pool) -> None:
    """Two waits of the block queue for one key: the second is blocked by the
    first too, but only the outside blocker is signalled."""
    blocker = await scene.session("blocker")
    blocker_pid = blocker.get_server_pid()
    await scene.hold(blocker, "advisory")
    gate = anyio.Event()
    blocked_by: dict[int, set[int]] = {}

    async def after_gate(blocker: aiopglock.Blocker) -> bool:
        blocked_by.setdefault(blocker.blocked_pid, set()).add(blocker.pid)
        await gate.wait()
        return True

    acquired: list[int] = []
    async with prioritize(scene, via=pool, predicate=after_gate) as prioritizer:

        async def protected() -> None:
            async with scene.acquire("advisory", pool, timeout=20) as lock:
                assert lock
                acquired.append(lock.pid)

        async with anyio.create_task_group() as tg:
            tg.start_soon(protected)
            [first] = await scene.blocked_by(blocker_pid)
            tg.start_soon(protected)
            [second] = [p for p in await scene.blocked_by(blocker_pid, 2) if p != first]
            await scene.blocked_by(first)  # queued behind the first wait too
            gate.set()
    assert prioritizer.signalled == [blocker_pid]
    assert sorted(acquired) == sorted([first, second])
    assert all(pids == {blocker_pid} for pids in blocked_by.values()), blocked_by


async def test_a_lock_the_block_holds_is_never_signalled(scene: Scene, pool: asyncpg.Pool) -> None:
    """The block holds the table on one connection, then waits for its rows on
    another: the holder is the block's own, and is spared (the wait times out)."""
    async with prioritize(scene, via=pool) as prioritizer:
        async with scene.acquire("table", pool, timeout=20) as table_lock:
            assert table_lock
            async with scene.acquire("row", pool, timeout=0.5) as row_lock:
                assert not row_lock
            assert await table_lock.connection.fetchval("SELECT pg_backend_pid()") == (
                table_lock.pid
            )
        assert prioritizer.polls >= 1
    assert prioritizer.signalled == []


# --------------------------------------------------------------------------- filters


async def test_min_age_spares_younger_blockers(scene: Scene, pool: asyncpg.Pool) -> None:
    blocker = await scene.session("blocker")
    blocker_pid = blocker.get_server_pid()
    await scene.hold(blocker, "advisory")
    async with prioritize(scene, via=pool, min_age=3600, interval=0.02) as prioritizer:
        async with scene.acquire("advisory", pool, timeout=1) as lock:
            assert not lock
        polls = prioritizer.polls
    assert polls >= 3
    assert prioritizer.signalled == []
    assert await scene.alive(blocker_pid)


async def test_min_age_waits_until_the_blocker_is_old_enough(
    scene: Scene, pool: asyncpg.Pool
) -> None:
    blocker = await scene.session("blocker")
    blocker_pid = blocker.get_server_pid()
    await scene.hold(blocker, "advisory")
    min_age = timedelta(seconds=0.3)
    async with (
        prioritize(scene, via=pool, min_age=min_age, interval=0.02) as prioritizer,
        scene.acquire("advisory", pool, timeout=20) as lock,
    ):
        assert lock
    assert prioritizer.signalled == [blocker_pid]
    [signalled] = prioritizer.blockers
    assert signalled.age is not None and signalled.age >= min_age
    await scene.gone(blocker_pid)


@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_predicate_chooses_the_blockers(
    scene: Scene, pool: asyncpg.Pool, flavour: str
) -> None:
    """Two sessions share the lock; only the one the predicate picks is
    terminated, so the wait (still blocked by the other) times out."""
    chosen = await scene.session("chosen")
    spared = await scene.session("spared")
    for blocker in (chosen, spared):
        await scene.hold(blocker, "advisory", shared=True)
    asked: list[int] = []

    def pick(blocker: aiopglock.Blocker) -> bool:
        asked.append(blocker.pid)
        return blocker.application_name == scene.app("chosen")

    async def pick_async(blocker: aiopglock.Blocker) -> bool:
        await anyio.lowlevel.checkpoint()
        return pick(blocker)

    predicate = pick if flavour == "sync" else pick_async
    async with (
        prioritize(scene, via=pool, predicate=predicate) as prioritizer,
        scene.acquire("advisory", pool, timeout=1) as lock,
    ):
        assert not lock
    assert prioritizer.signalled == [chosen.get_server_pid()]
    assert set(asked) == {chosen.get_server_pid(), spared.get_server_pid()}
    await scene.gone(chosen.get_server_pid())
    assert await scene.alive(spared.get_server_pid())


# --------------------------------------------------------------------------- structure


async def _leftovers(scene: Scene, pool: asyncpg.Pool, before: set[asyncio.Task[Any]]) -> None:
    assert asyncio.all_tasks() - before == set()
    assert pool.get_idle_size() == pool.get_size()

    async def closed() -> bool:
        return await scene.sessions("monitor") == 0

    # A closed connection's backend exits a moment after the client lets go.
    await wait_until(closed, message="the monitor's backend to exit")


@pytest.mark.parametrize("via", ["pool", "dsn"])
@pytest.mark.parametrize("ending", ["normal", "error", "task-cancel", "cancel-scope"])
async def test_nothing_outlives_the_block(
    scene: Scene, pool: asyncpg.Pool, pg_server: PgServer, via: str, ending: str
) -> None:
    blocker = await scene.session("blocker")
    await scene.hold(blocker, "advisory")
    source: Any = pool if via == "pool" else pg_server.dsn
    before = asyncio.all_tasks()
    started = anyio.Event()
    handle: list[aiopglock.Prioritizer] = []

    async def block() -> None:
        # min_age keeps the blocker alive: the block ends while it waits.
        async with prioritize(scene, via=source, min_age=3600, interval=0.01) as prioritizer:
            handle.append(prioritizer)
            assert await scene.sessions("monitor") == 1
            if ending == "normal":
                async with scene.acquire("advisory", pool, timeout=0.2) as lock:
                    assert not lock
                return
            async with anyio.create_task_group() as tg:

                async def wait() -> None:
                    async with scene.acquire("advisory", pool, timeout=20):
                        pass

                tg.start_soon(wait)
                await scene.blocked_by(blocker.get_server_pid())
                await wait_until(lambda: _polls_past(prioritizer, 3))
                if ending == "error":
                    raise RuntimeError("the block failed")
                started.set()
                await anyio.sleep_forever()

    if ending == "normal":
        await block()
    elif ending == "error":
        # The block's own exception (its task group's) comes out as it was raised.
        with pytest.raises(Exception) as raised:
            await block()
        assert raised.group_contains(RuntimeError, match="the block failed")
    elif ending == "task-cancel":
        task = asyncio.ensure_future(block())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    else:
        with anyio.CancelScope() as scope:

            async def cancel_when_started() -> None:
                await started.wait()
                scope.cancel()

            async with anyio.create_task_group() as tg:
                tg.start_soon(cancel_when_started)
                await block()
        assert scope.cancelled_caught
    [prioritizer] = handle
    assert not prioritizer.running
    assert prioritizer.monitor_pid is None
    assert prioritizer.signalled == []
    await _leftovers(scene, pool, before)
    assert await scene.alive(blocker.get_server_pid())


async def _polls_past(prioritizer: aiopglock.Prioritizer, count: int) -> bool:
    return prioritizer.polls >= count


async def test_a_failing_predicate_ends_the_block(scene: Scene, pool: asyncpg.Pool) -> None:
    blocker = await scene.session("blocker")
    await scene.hold(blocker, "advisory")
    before = asyncio.all_tasks()

    def broken(blocker: aiopglock.Blocker) -> bool:
        raise LookupError("predicate failed")

    with pytest.raises(LookupError, match="predicate failed"):
        async with (
            prioritize(scene, via=pool, predicate=broken),
            scene.acquire("advisory", pool, timeout=20),
        ):
            pass
    await _leftovers(scene, pool, before)
    assert await scene.alive(blocker.get_server_pid())


async def test_as_a_decorator(scene: Scene, pool: asyncpg.Pool) -> None:
    blocker = await scene.session("blocker")
    await scene.hold(blocker, "row")

    @prioritize(scene, via=pool)
    async def update() -> int:
        async with scene.acquire("row", pool, timeout=20) as lock:
            assert lock
            return len(lock)

    assert await update() == 1
    await scene.gone(blocker.get_server_pid())


# --------------------------------------------------------------------------- entry


async def test_a_bad_dsn_fails_at_entry(scene: Scene, pool: asyncpg.Pool) -> None:
    before = asyncio.all_tasks()
    with pytest.raises((OSError, asyncpg.PostgresError)):
        async with prioritize(scene, via="postgresql://nobody@127.0.0.1:1/none"):
            pytest.fail("the block ran")
    await _leftovers(scene, pool, before)


async def test_a_connection_without_via_needs_a_default_pool(scene: Scene) -> None:
    conn = await scene.session("protected")
    with pytest.raises(aiopglock.UsageError, match="via="):
        async with prioritize(scene, conn):
            pytest.fail("the block ran")
    assert await scene.sessions("monitor") == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"interval": 0}, ValueError, "interval"),
        ({"interval": "1"}, TypeError, "interval"),
        ({"action": "terminate"}, TypeError, "action"),
        ({"via": 42}, TypeError, "via"),
        ({"via": ""}, ValueError, "via"),
        ({"min_age": -1}, ValueError, "min_age"),
        ({"min_age": float("nan")}, ValueError, "min_age"),
        ({"predicate": 3}, TypeError, "predicate"),
        ({"include_other_databases": 1}, TypeError, "include_other_databases"),
        ({"db": "postgresql://"}, TypeError, "db"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], error: type[Exception], name: str) -> None:
    with pytest.raises(error, match=name):
        aiopglock.prioritize(**kwargs)


# --------------------------------------------------------------------------- a busy pool


async def test_a_fully_leased_pool_fails_at_entry_at_once(scene: Scene, pool: asyncpg.Pool) -> None:
    """``prioritize(db=conn, via=pool)`` with every pool connection in use:
    a UsageError at entry, not a wait (the blockers may hold them)."""
    leased = [await pool.acquire() for _ in range(pool.get_max_size())]
    try:
        conn = leased[0]
        with anyio.fail_after(2), pytest.raises(aiopglock.UsageError, match="in use"):
            async with prioritize(scene, conn, via=pool):
                pytest.fail("the block ran")
        assert await scene.sessions("monitor") == 0
        assert [t for t in asyncio.all_tasks() if t.get_name().startswith("aiopglock")] == []
    finally:
        for conn in leased:
            await pool.release(conn)
    assert pool.get_idle_size() == pool.get_size()


# --------------------------------------------------------------------------- exemptions


async def test_a_spared_backend_is_signalled_once_back_from_the_pool(
    scene: Scene, pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    """A protected wait is granted and released; its connection goes back to
    the pool and unrelated code reusing it blocks a second protected wait:
    that backend is signalled like any other."""
    other_key = scene.key + ":second"
    async with prioritize(scene, via=pool) as prioritizer:
        async with aiopglock.advisory(scene.key, db=pool, timeout=20) as first:
            assert first
            spared = first.pid
        # The pool hands the connection it got back last out first (LIFO).
        unrelated = await pool.acquire()
        try:
            assert unrelated.get_server_pid() == spared
            await unrelated.execute("BEGIN")
            await unrelated.execute(
                "SELECT pg_advisory_xact_lock($1)", aiopglock.advisory_key(other_key)
            )
            async with aiopglock.advisory(other_key, db=pool, timeout=10) as second:
                assert second

            # The wait may be granted before the monitor has read the server's reply.
            async def signalled() -> list[int]:
                return prioritizer.signalled

            assert await wait_until(signalled) == [spared]
            await scene.gone(spared)

            async def noticed() -> bool:
                # The client sees its backend gone: the pool takes it back itself.
                raw = raw_connection(unrelated)
                return raw is None or bool(raw.is_closed())

            await wait_until(noticed)
        finally:
            raw = raw_connection(unrelated)
            if raw is not None:
                raw.terminate()
                await pool.release(unrelated)


async def test_an_exemption_lasts_while_the_grant_may_be_held(
    scene: Scene, pool: asyncpg.Pool
) -> None:
    """The bookkeeping itself: a grant on a leased connection is exempt until
    ``released()`` or until the connection goes back to its pool (asyncpg
    counts the releases of a pooled connection: this pins that behaviour)."""
    async with prioritize(scene, via=pool) as prioritizer:
        protection = prioritizer._protection
        assert protection is not None
        conn = await pool.acquire()
        pid = conn.get_server_pid()
        try:
            _protect.granted(conn)
            _protect.granted(conn)
            assert protection.held() == {pid}
            _protect.released(conn)
            assert protection.held() == {pid}  # one of the two grants is still held
            _protect.released(conn)
            assert protection.held() == frozenset()
            _protect.granted(conn)
            assert protection.held() == {pid}
        finally:
            await pool.release(conn)
        assert protection.held() == frozenset()  # back in the pool: no longer exempt
        again = await pool.acquire()
        try:
            assert again.get_server_pid() == pid  # the same backend, a new lease
            assert protection.held() == frozenset()
        finally:
            await pool.release(again)
    # After the block nothing is recorded, and a new grant is nobody's.
    assert protection.held() == frozenset() and protection.closed


async def test_an_exemption_lasts_through_the_pools_reset(
    scene: Scene, pg_server: PgServer
) -> None:
    """asyncpg counts a release before its reset (``pg_advisory_unlock_all()``)
    runs, and detaches the lease after it: the block's session lock is held
    until then, so its backend stays exempt until then (pins asyncpg)."""
    during_reset: list[frozenset[int]] = []
    protections: list[_protect.Protection] = []

    async def reset(conn: asyncpg.Connection) -> None:
        during_reset.append(protections[0].held())
        await conn.reset()

    pool = await asyncpg.create_pool(pg_server.dsn, min_size=1, max_size=2, reset=reset)
    try:
        async with prioritize(scene, via=pool) as prioritizer:
            assert prioritizer._protection is not None
            protections.append(prioritizer._protection)
            conn = await pool.acquire()
            pid = conn.get_server_pid()
            with _protect.waiting(conn):
                await conn.execute("SELECT pg_advisory_lock($1)", aiopglock.advisory_key(scene.key))
            await pool.release(conn)  # the pool's reset unlocks it
            assert during_reset[-1] == {pid}
            assert protections[0].held() == frozenset()
    finally:
        await pool.close()


async def test_a_wait_that_ends_otherwise_leaves_its_backend_exempt(
    scene: Scene, pool: asyncpg.Pool
) -> None:
    """A protected wait that times out may have been granted at the timeout,
    or be undone still: its backend is the block's own until ``released()``
    says the lock is gone (or the connection is back in the pool)."""
    blocker = await scene.session("blocker")
    await scene.hold(blocker, "advisory")
    conn = await scene.session("protected-waits")
    pid = conn.get_server_pid()
    spare = aiopglock.prioritize(
        via=pool, predicate=lambda b: False, monitor_application_name=scene.app("monitor")
    )
    async with spare as prioritizer:
        protection = prioritizer._protection
        assert protection is not None
        async with aiopglock.advisory(scene.key, db=conn, timeout=0.2) as lock:
            assert not lock
        assert protection.held() == {pid}
        with pytest.raises(RuntimeError), _protect.waiting(conn):
            raise RuntimeError("the wait failed")
        assert protection.held() == {pid}
        _protect.released(conn)
        _protect.released(conn)
        assert protection.held() == frozenset()
    assert prioritizer.signalled == []


async def test_a_blocker_that_let_go_since_the_look_is_not_signalled(
    scene: Scene, pool: asyncpg.Pool
) -> None:
    """A look is a snapshot: a blocker that lets go before the signal (here,
    while the predicate runs) is not signalled (its connection may be
    someone else's by then, the block's own included)."""
    blocker = await scene.session("blocker")
    blocker_pid = blocker.get_server_pid()
    await scene.hold(blocker, "advisory")
    asked: list[int] = []

    async def let_go_first(found: aiopglock.Blocker) -> bool:
        asked.append(found.pid)
        await blocker.execute("ROLLBACK")  # its transaction's lock goes
        return True

    async with (
        prioritize(scene, via=pool, predicate=let_go_first) as prioritizer,
        scene.acquire("advisory", pool, timeout=20) as lock,
    ):
        assert lock
    assert asked == [blocker_pid]
    assert prioritizer.signalled == []
    assert await scene.alive(blocker_pid)
    assert await blocker.fetchval("SELECT pg_backend_pid()") == blocker_pid


async def test_a_lost_monitor_connection_is_replaced(scene: Scene, pool: asyncpg.Pool) -> None:
    """The monitor's backend dies mid-block (the pool takes the connection
    back by itself): the block goes on, and its next wait is still freed."""
    blocker = await scene.session("blocker")
    await scene.hold(blocker, "advisory")
    async with prioritize(scene, via=pool, interval=0.02) as prioritizer:
        first = prioritizer.monitor_pid
        await scene.admin.execute("SELECT pg_terminate_backend($1)", first)
        await scene.gone(first)
        async with scene.acquire("advisory", pool, timeout=20) as lock:
            assert lock
        assert prioritizer.monitor_pid not in (None, first)
    assert prioritizer.signalled == [blocker.get_server_pid()]
    await no_monitor_left(scene, pool)


# --------------------------------------------------------------------------- lifecycles


@pytest_asyncio.fixture
async def nothing_left(scene: Scene, pool: asyncpg.Pool) -> AsyncIterator[None]:
    """Torn down after the fixtures that use it: no monitor task, connection
    or backend is left."""
    yield
    await no_monitor_left(scene, pool)


@pytest_asyncio.fixture
async def fixture_prioritizer(
    nothing_left: None, scene: Scene, pool: asyncpg.Pool
) -> AsyncIterator[aiopglock.Prioritizer]:
    entered_in = asyncio.current_task()
    async with prioritize(scene, via=pool) as prioritizer:
        yield prioritizer
    # pytest-asyncio runs this teardown in another task than the setup.
    assert asyncio.current_task() is not entered_in
    assert not prioritizer.running and prioritizer.monitor_pid is None


async def test_in_an_async_generator_fixture(
    fixture_prioritizer: aiopglock.Prioritizer, scene: Scene, pool: asyncpg.Pool
) -> None:
    """The fixture's block protects the test's waits (pytest-asyncio hands
    the fixture's context to the test)."""
    blocker = await scene.session("blocker")
    await scene.hold(blocker, "advisory")
    assert fixture_prioritizer.running
    async with scene.acquire("advisory", pool, timeout=20) as lock:
        assert lock

    # The wait may be granted before the monitor has read the server's reply.
    async def signalled() -> list[int]:
        return fixture_prioritizer.signalled

    assert await wait_until(signalled) == [blocker.get_server_pid()]
    await scene.gone(blocker.get_server_pid())


@pytest.mark.parametrize("how", ["exit-stack", "tasks"])
async def test_entered_and_exited_in_different_tasks(
    scene: Scene, pool: asyncpg.Pool, how: str
) -> None:
    blocker = await scene.session("blocker")
    await scene.hold(blocker, "advisory")
    conn = await scene.session("protected")
    spec = prioritize(scene, conn, via=pool)
    stack = contextlib.AsyncExitStack()
    if how == "exit-stack":
        prioritizer = await asyncio.create_task(stack.enter_async_context(spec))
    else:
        prioritizer = await asyncio.create_task(spec.__aenter__())
    assert prioritizer.running and await scene.sessions("monitor") == 1
    with anyio.fail_after(20):
        await scene.wait_raw(conn, "advisory")  # raw SQL on the protected connection
    if how == "exit-stack":
        await asyncio.create_task(stack.aclose())
    else:
        await asyncio.create_task(spec.__aexit__(None, None, None))
    assert not prioritizer.running
    assert prioritizer.signalled == [blocker.get_server_pid()]
    await no_monitor_left(scene, pool)


async def test_exited_in_another_task_stops_protecting_waits(
    scene: Scene, pool: asyncpg.Pool
) -> None:
    """A block entered in this task and exited in another: this task's
    context still names it, but it protects nothing more."""
    blocker = await scene.session("blocker")
    await scene.hold(blocker, "advisory")
    spec = prioritize(scene, via=pool, interval=0.02)
    prioritizer = await spec.__aenter__()
    await asyncio.create_task(spec.__aexit__(None, None, None))
    assert not prioritizer.running
    async with scene.acquire("advisory", pool, timeout=0.3) as lock:
        assert not lock
    assert prioritizer.signalled == []
    assert await scene.alive(blocker.get_server_pid())
    await no_monitor_left(scene, pool)


@pytest.mark.parametrize("wait", [0, 5], ids=["try", "wait"])
async def test_a_callers_connection_is_no_longer_spared_once_its_lock_is_released(
    scene: Scene, pool: asyncpg.Pool, connect: Connect, wait: float
) -> None:
    """On a caller's own Connection (no pool return to end it), the
    exemption of a grant ends when aiopglock releases that lock."""
    conn = await connect()
    pid = conn.get_server_pid()
    async with prioritize(scene, via=pool) as prioritizer:
        protection = prioritizer._protection
        assert protection is not None
        async with aiopglock.advisory(scene.key + ":own", db=conn, timeout=wait) as lock:
            assert lock
            assert protection.held() == {pid}
        assert protection.held() == frozenset()
        assert not conn.is_closed()
