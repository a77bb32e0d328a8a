"""``aiopglock.advisory_many``: all or nothing, sorted order, one timeout.

Every claim is checked on the server (``pg_locks`` through the admin
connection). Keys are random per test, so runs sharing one server never meet.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator

import anyio
import asyncpg
import pytest

import aiopglock
from aiopglock import advisory_key
from tests import test_otel
from tests._helpers import (
    AdvisoryKey,
    Connect,
    advisory_locks,
    holders,
    wait_for_waiter,
    wait_until,
)
from tests.test_otel import Recorder


def new_keys(n: int) -> list[int]:
    return [secrets.randbits(62) for _ in range(n)]


async def held_by(
    admin: asyncpg.Connection, keys: list[AdvisoryKey]
) -> dict[AdvisoryKey, list[int]]:
    return {key: await holders(admin, key) for key in keys}


async def none_held(admin: asyncpg.Connection, keys: list[AdvisoryKey]) -> bool:
    for key in keys:
        if await advisory_locks(admin, key=key):
            return False
    return True


@pytest.fixture
def otel_recorder() -> Iterator[Recorder]:
    """The OpenTelemetry SDK of tests/test_otel.py, installed for one test."""
    test_otel._install()
    yield Recorder()
    aiopglock._otel.set_record_names(False)


# --------------------------------------------------------------------------- basics


async def test_pool_holds_every_key_and_releases(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    keys: list[AdvisoryKey] = [*new_keys(3), (secrets.randbits(30), -5)]
    async with aiopglock.advisory_many(keys, db=pool) as lock:
        assert lock
        assert lock.connection is None
        assert lock.pid is not None
        held = await held_by(admin, keys)
        assert all(pids == [lock.pid] for pids in held.values()), held
    assert not lock
    assert await none_held(admin, keys)
    assert pool.get_size() - pool.get_idle_size() == 0


async def test_keys_are_validated_sorted_and_deduplicated() -> None:
    spec = aiopglock.advisory_many(["b", (1, 2), 7, "b", -3, (0, 9)], db=None)
    lock_keys = spec._keys
    assert lock_keys == (
        *sorted([advisory_key("b"), 7, -3]),
        (0, 9),
        (1, 2),
    )
    with pytest.raises(ValueError, match="keys"):
        aiopglock.advisory_many([])
    with pytest.raises(TypeError, match="keys"):
        aiopglock.advisory_many("abc")
    with pytest.raises(TypeError, match="keys"):
        aiopglock.advisory_many((1, 2))  # one pair key, not a set
    with pytest.raises(TypeError, match="keys"):
        aiopglock.advisory_many(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="keys"):
        aiopglock.advisory_many([1.5])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="keys"):
        aiopglock.advisory_many([2**70])
    with pytest.raises(ValueError, match="keys"):
        aiopglock.advisory_many([""])
    with pytest.raises(TypeError, match="shared"):
        aiopglock.advisory_many([1], shared=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        aiopglock.advisory_many([1], timeout=-1)
    with pytest.raises(TypeError, match="db"):
        aiopglock.advisory_many([1], db=3)  # type: ignore[arg-type]


async def test_handle_keys_in_order_taken(pool: asyncpg.Pool) -> None:
    async with aiopglock.advisory_many([(1, 1), 9, -9], db=pool) as lock:
        assert lock.keys == (-9, 9, (1, 1))


async def test_uncontended_set_is_one_statement(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    keys = new_keys(50)
    async with pool.acquire() as conn:
        async with aiopglock.advisory_many(new_keys(1), db=conn):
            pass  # the connection's one-time server probe
        sent: list[str] = []
        conn._con.add_query_logger(lambda record: sent.append(record.query))
        async with aiopglock.advisory_many(keys, db=conn) as lock:
            assert lock
            assert len(await advisory_locks(admin, pid=lock.pid)) == 50
        await wait_until(lambda: _true(len(sent) >= 2))
        # One statement took the 50 keys, one gave them back.
        assert len(sent) == 2, sent
        assert "pg_try_advisory_lock" in sent[0]


async def _true(value: bool) -> bool:
    return value


# --------------------------------------------------------------------------- all or nothing


async def test_timeout_zero_busy_is_falsy_and_nothing_held(
    pool: asyncpg.Pool, connect: Connect, admin: asyncpg.Connection
) -> None:
    keys = new_keys(5)
    blocker = await connect()
    await blocker.fetchval("SELECT pg_advisory_lock($1)", sorted(keys)[2])
    async with aiopglock.advisory_many(keys, db=pool, timeout=0) as lock:
        assert not lock
        assert lock.connection is None
        others = [k for k in keys if k != sorted(keys)[2]]
        assert await none_held(admin, others)
    assert pool.get_size() - pool.get_idle_size() == 0
    with pytest.raises(aiopglock.LockNotAcquired):
        async with aiopglock.advisory_many(keys, db=pool, timeout=0, side_effect=aiopglock.Raise):
            pass


async def test_waits_for_missing_key_then_takes_the_rest(
    pool: asyncpg.Pool, connect: Connect, admin: asyncpg.Connection
) -> None:
    keys = sorted(new_keys(4))
    blocker = await connect()
    await blocker.fetchval("SELECT pg_advisory_lock($1)", keys[1])
    got = anyio.Event()

    async def take() -> None:
        async with aiopglock.advisory_many(keys, db=pool, timeout=10) as lock:
            assert lock
            got.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(take)
        waiter = await wait_for_waiter(admin, keys[1])
        # The prefix is held while waiting, nothing past the busy key.
        assert await holders(admin, keys[0]) == [waiter]
        assert await holders(admin, keys[2]) == []
        assert await holders(admin, keys[3]) == []
        await blocker.fetchval("SELECT pg_advisory_unlock($1)", keys[1])
        with anyio.fail_after(10):
            await got.wait()
    assert await none_held(admin, keys)


async def test_timeout_bounds_the_set_and_leaves_none_held(
    pool: asyncpg.Pool, connect: Connect, admin: asyncpg.Connection
) -> None:
    keys = sorted(new_keys(4))
    blocker = await connect()
    await blocker.fetchval("SELECT pg_advisory_lock($1)", keys[3])
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with aiopglock.advisory_many(keys, db=pool, timeout=0.3) as lock:
        assert not lock
    assert loop.time() - start < 5
    assert await none_held(admin, keys[:3])
    assert await holders(admin, keys[3]) == [blocker.get_server_pid()]


@pytest.mark.parametrize(
    ("target", "xact"), [("pool", False), ("pool", True), ("connection", False)]
)
async def test_cancellation_storm_leaves_none_held(
    target: str, xact: bool, pool: asyncpg.Pool, connect: Connect, admin: asyncpg.Connection
) -> None:
    keys = sorted(new_keys(6))
    blocker = await connect()
    db = pool if target == "pool" else await connect()
    for round_ in range(30):
        busy = keys[round_ % len(keys)]
        await blocker.fetchval("SELECT pg_advisory_lock($1)", busy)
        with anyio.move_on_after(0.001 * (round_ % 10)):
            async with aiopglock.advisory_many(keys, db=db, xact=xact):
                raise AssertionError("granted while one key is busy")
        await blocker.fetchval("SELECT pg_advisory_unlock($1)", busy)
        others = [k for k in keys if k != busy]
        rows = [r for k in others for r in await advisory_locks(admin, key=k)]
        assert rows == [], (round_, rows)
        if isinstance(db, asyncpg.Connection):
            assert not db.is_in_transaction()
            assert await db.fetchval("SELECT 1") == 1  # still usable
    assert pool.get_size() - pool.get_idle_size() == 0


async def test_cancellation_storm_on_connection_in_transaction(
    connect: Connect, admin: asyncpg.Connection
) -> None:
    keys = sorted(new_keys(5))
    blocker = await connect()
    conn = await connect()
    for xact in (False, True):
        for round_ in range(15):
            busy = keys[(round_ % 4) + 1]
            await blocker.fetchval("SELECT pg_advisory_lock($1)", busy)
            async with conn.transaction():
                with anyio.move_on_after(0.002 * (round_ % 6)):
                    async with aiopglock.advisory_many(keys, db=conn, xact=xact):
                        raise AssertionError("granted while one key is busy")
                # Still usable: the caller's transaction was not aborted.
                assert await conn.fetchval("SELECT 1") == 1
                others = [k for k in keys if k != busy]
                assert await advisory_locks(admin, pid=conn.get_server_pid()) == [], others
            await blocker.fetchval("SELECT pg_advisory_unlock($1)", busy)


# --------------------------------------------------------------------------- no deadlock


@pytest.mark.parametrize("kind", ["pool", "connection"])
async def test_overlapping_sets_in_opposite_orders_never_deadlock(
    kind: str, pool: asyncpg.Pool, connect: Connect, admin: asyncpg.Connection
) -> None:
    shared_keys = new_keys(4)
    a_keys: list[AdvisoryKey] = [*shared_keys, *new_keys(2), (7, secrets.randbits(30))]
    b_keys: list[AdvisoryKey] = [*reversed(shared_keys), *new_keys(2), (7, secrets.randbits(30))]
    inside = 0
    peak = 0
    conns = [await connect(), await connect()] if kind == "connection" else [pool, pool]

    async def worker(keys: list[AdvisoryKey], db: object) -> None:
        nonlocal inside, peak
        for _ in range(40):
            async with aiopglock.advisory_many(keys, db=db) as lock:  # type: ignore[arg-type]
                assert lock
                inside += 1
                peak = max(peak, inside)
                await asyncio.sleep(0)
                inside -= 1

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker, a_keys, conns[0])
            tg.start_soon(worker, b_keys, conns[1])
    assert peak == 1  # they overlap: never both inside
    assert await none_held(admin, a_keys + b_keys)


async def test_mixed_with_single_key_holders(
    pool: asyncpg.Pool, connect: Connect, admin: asyncpg.Connection
) -> None:
    keys = new_keys(3)
    conn = await connect()
    counts = dict.fromkeys(keys, 0)

    async def single(key: int) -> None:
        for _ in range(20):
            async with aiopglock.advisory(key, db=conn if key == keys[0] else pool) as lock:
                assert lock
                counts[key] += 1
                await asyncio.sleep(0)

    async def many() -> None:
        for _ in range(20):
            async with aiopglock.advisory_many(keys, db=pool, timeout=10) as lock:
                assert lock
                # While the set is held no single holder is in (server check).
                for key in keys:
                    assert await holders(admin, key) == [lock.pid]

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(many)
            for key in keys:
                tg.start_soon(single, key)
    assert all(count == 20 for count in counts.values())
    assert await none_held(admin, keys)


# --------------------------------------------------------------------------- xact


async def test_xact_on_pool_owns_a_transaction(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    keys = new_keys(3)
    async with aiopglock.advisory_many(keys, db=pool, xact=True) as lock:
        assert lock
        assert lock.connection.is_in_transaction()
        rows = await advisory_locks(admin, pid=lock.pid)
        assert len(rows) == 3
        assert all(row["mode"] == "ExclusiveLock" for row in rows)
    assert await none_held(admin, keys)
    assert pool.get_size() - pool.get_idle_size() == 0


async def test_xact_in_callers_transaction_stays_until_it_ends(
    connect: Connect, admin: asyncpg.Connection
) -> None:
    keys = new_keys(3)
    conn = await connect()
    async with conn.transaction():
        async with aiopglock.advisory_many(keys, db=conn, xact=True) as lock:
            assert lock
            assert lock.connection is conn
        assert len(await advisory_locks(admin, pid=conn.get_server_pid())) == 3
    assert await none_held(admin, keys)


async def test_xact_busy_in_callers_transaction_keeps_it_usable(
    connect: Connect, admin: asyncpg.Connection
) -> None:
    keys = sorted(new_keys(3))
    blocker = await connect()
    await blocker.fetchval("SELECT pg_advisory_lock($1)", keys[2])
    conn = await connect()
    async with conn.transaction():
        async with aiopglock.advisory_many(keys, db=conn, xact=True, timeout=0.1) as lock:
            assert not lock
        # The savepoint rolled back the prefix: nothing of this set is held.
        assert await advisory_locks(admin, pid=conn.get_server_pid()) == []
        assert await conn.fetchval("SELECT 1") == 1


# --------------------------------------------------------------------------- Locker, fence, lost


async def test_locker_takes_the_set_on_its_pool(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    keys = new_keys(3)
    async with (
        aiopglock.Locker(pool) as locker,
        aiopglock.advisory_many(keys, db=locker, timeout=5) as lock,
    ):
        assert lock
        assert all(pids == [lock.pid] for pids in (await held_by(admin, keys)).values())

        async def other_task() -> None:
            async with aiopglock.advisory_many(keys, db=locker, timeout=0) as other:
                assert not other
            async with locker.advisory(keys[0], timeout=0) as single:
                assert not single

        async with anyio.create_task_group() as tg:
            tg.start_soon(other_task)
    assert await none_held(admin, keys)


async def test_fence_increases(pool: asyncpg.Pool) -> None:
    keys = new_keys(2)
    fences = []
    for _ in range(3):
        async with aiopglock.advisory_many(keys, db=pool, fence=True) as lock:
            assert isinstance(lock.fence, int)
            fences.append(lock.fence)
        assert lock.fence is not None
    async with aiopglock.advisory(keys[0], db=pool, fence=True) as single:
        fences.append(single.fence)
    assert fences == sorted(fences) and len(set(fences)) == len(fences)
    async with aiopglock.advisory_many(keys, db=pool) as plain:
        assert plain.fence is None


async def test_lost_connection_raises_lock_lost(
    otel_recorder: Recorder, pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    keys = new_keys(3)
    with pytest.raises(aiopglock.LockLost):
        async with aiopglock.advisory_many(keys, db=pool) as lock:
            await admin.fetchval("SELECT pg_terminate_backend($1)", lock.pid)
            await anyio.sleep_forever()
    assert lock.lost
    await wait_until(lambda: none_held(admin, keys))
    # Counted once, as one lock of kind advisory_many.
    assert otel_recorder.delta("aiopglock.locks.lost", lock_kind="advisory_many") == 1
    assert otel_recorder.delta("aiopglock.locks.held", lock_kind="advisory_many") == 0


async def test_reentry_rule(pool: asyncpg.Pool, admin: asyncpg.Connection) -> None:
    keys = new_keys(2)
    async with aiopglock.advisory_many(keys, db=pool) as lock:
        # advisory() of a key of the set nests in the set's hold.
        async with aiopglock.advisory(keys[0], db=pool, timeout=1) as inner:
            assert inner
            assert inner.pid == lock.pid
        assert await holders(admin, keys[0]) == [lock.pid]
    async with aiopglock.advisory(keys[1], db=pool) as single:
        assert single
        with pytest.raises(aiopglock.UsageError, match="already holds"):
            async with aiopglock.advisory_many(keys, db=pool):
                pass
    assert await none_held(admin, keys)


async def test_decorator(pool: asyncpg.Pool, connect: Connect, admin: asyncpg.Connection) -> None:
    keys = new_keys(2)
    pids: list[int] = []

    @aiopglock.advisory_many(keys, db=lambda: pool, timeout=0, side_effect=aiopglock.Skip)
    async def job(x: int) -> int:
        pids.extend(await holders(admin, keys[0]))
        return x * 2

    assert await job(21) == 42
    assert len(pids) == 1
    blocker = await connect()
    await blocker.fetchval("SELECT pg_advisory_lock($1)", keys[1])
    assert await job(1) is None
    with pytest.raises(ValueError, match="side_effect"):
        aiopglock.advisory_many(keys, side_effect=aiopglock.Return)(job)


async def test_transaction_pooler_refused_for_session_locks(
    pgbouncer: object, connect: Connect, admin: asyncpg.Connection
) -> None:
    keys = new_keys(2)
    conn = await connect(dsn=pgbouncer.dsn("transaction"), statement_cache_size=0)  # type: ignore[attr-defined]
    with pytest.raises(aiopglock.UsageError):
        async with aiopglock.advisory_many(keys, db=conn):
            pass
    assert await none_held(admin, keys)
    async with conn.transaction(), aiopglock.advisory_many(keys, db=conn, xact=True) as lock:
        assert lock


async def test_locker_reentry_is_refused(pool: asyncpg.Pool, admin: asyncpg.Connection) -> None:
    keys = new_keys(2)
    async with aiopglock.Locker(pool) as locker:
        async with locker.advisory(keys[1]) as single:
            assert single
            with pytest.raises(aiopglock.UsageError, match="already holds advisory key"):
                async with aiopglock.advisory_many(keys, db=locker):
                    pass
            assert await holders(admin, keys[0]) == []
        async with aiopglock.advisory_many(keys, db=locker, xact=True) as lock:
            assert lock
            assert lock.connection.is_in_transaction()
    assert await none_held(admin, keys)


async def test_xact_on_idle_connection_opens_and_commits(
    connect: Connect, admin: asyncpg.Connection
) -> None:
    keys = new_keys(2)
    conn = await connect()
    async with aiopglock.advisory_many(keys, db=conn, xact=True) as lock:
        assert lock.connection is conn
        assert conn.is_in_transaction()
        await conn.execute("CREATE TEMP TABLE many_t (x int)")
    assert not conn.is_in_transaction()
    assert await conn.fetchval("SELECT count(*) FROM many_t") == 0  # committed
    assert await none_held(admin, keys)
    with pytest.raises(RuntimeError):
        async with aiopglock.advisory_many(keys, db=conn, xact=True):
            await conn.execute("INSERT INTO many_t VALUES (1)")
            raise RuntimeError
    assert await conn.fetchval("SELECT count(*) FROM many_t") == 0  # rolled back
    assert await none_held(admin, keys)


async def test_shared_sets_coexist_and_exclude_exclusive(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    keys = new_keys(3)
    inside = anyio.Event()
    leave = anyio.Event()
    pids: list[int] = []

    async def other() -> None:
        async with aiopglock.advisory_many(keys, db=pool, shared=True) as b:
            assert b
            pids.append(b.pid)
            inside.set()
            await leave.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(other)
        await inside.wait()
        async with aiopglock.advisory_many(keys, db=pool, shared=True, timeout=5) as a:
            assert a
            for key in keys:
                assert await holders(admin, key, mode="ShareLock") == sorted([a.pid, *pids])
        async with aiopglock.advisory_many(keys, db=pool, timeout=0) as c:
            assert not c
        leave.set()
    assert await none_held(admin, keys)


async def test_fence_refused_after_a_write_in_callers_transaction(
    connect: Connect, admin: asyncpg.Connection
) -> None:
    keys = new_keys(2)
    conn = await connect()
    async with conn.transaction():
        await conn.execute("CREATE TEMP TABLE fence_t (x int)")
        with pytest.raises(aiopglock.UsageError, match="already written"):
            async with aiopglock.advisory_many(keys, db=conn, xact=True, fence=True):
                pass
        assert await conn.fetchval("SELECT 1") == 1
    assert await none_held(admin, keys)


async def test_grant_racing_the_timeout_storm_leaves_all_or_nothing(
    pool: asyncpg.Pool, connect: Connect, admin: asyncpg.Connection
) -> None:
    """The blocker lets go just as the set's timeout fires (and as a
    cancellation lands): each round ends with every key held by the set, or
    none of them."""
    keys = sorted(new_keys(4))
    blocker = await connect()
    outcomes = {True: 0, False: 0}
    for round_ in range(40):
        busy = keys[1 + round_ % 3]
        await blocker.fetchval("SELECT pg_advisory_lock($1)", busy)

        async def let_go(delay: float, key: int = busy) -> None:
            await anyio.sleep(delay)
            await blocker.fetchval("SELECT pg_advisory_unlock($1)", key)

        async with anyio.create_task_group() as tg:
            tg.start_soon(let_go, 0.001 * (round_ % 8))
            with anyio.move_on_after(0.002 * (round_ % 5) + 0.001) if round_ % 2 else _null():
                async with aiopglock.advisory_many(keys, db=pool, timeout=0.004) as lock:
                    outcomes[bool(lock)] += 1
                    if lock:
                        assert await held_by(admin, keys) == {key: [lock.pid] for key in keys}
                    else:
                        assert await none_held(admin, [k for k in keys if k != busy])
        assert await none_held(admin, keys), round_
    assert outcomes[True] > 0  # the race was run, not only the timeout
    assert pool.get_size() - pool.get_idle_size() == 0


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


async def test_pool_timeout_zero_with_no_free_connection(
    pg_server: object, admin: asyncpg.Connection
) -> None:
    small = await asyncpg.create_pool(pg_server.dsn, min_size=1, max_size=1)  # type: ignore[attr-defined]
    try:
        keys = new_keys(2)
        async with (
            small.acquire(),
            aiopglock.advisory_many(keys, db=small, timeout=0) as lock,
        ):
            assert not lock
        assert await none_held(admin, keys)
    finally:
        await small.close()


async def test_metrics_record_the_set_as_one_advisory_many_lock(
    otel_recorder: Recorder, pool: asyncpg.Pool
) -> None:
    otel = otel_recorder
    keys = new_keys(3)
    async with aiopglock.advisory_many(keys, db=pool) as lock:
        assert lock
        assert otel.delta("aiopglock.locks.held", lock_kind="advisory_many") == 1
    assert otel.delta("aiopglock.locks.held", lock_kind="advisory_many") == 0
    assert (
        otel.delta(
            "aiopglock.lock.hold.duration", lock_kind="advisory_many", lock_outcome="released"
        )
        == 1
    )


@pytest.mark.parametrize("xact", [False, True])
async def test_cancellation_during_the_one_statement_leaves_none_held(
    xact: bool, pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    """Nothing contended: the cancellation lands while the set's statement
    runs (or around it); the set is then resolved on the server."""
    keys = new_keys(300)
    entered = 0
    for round_ in range(30):
        # The last rounds leave time to enter (and are cancelled in the block).
        with anyio.move_on_after(0.001 * (round_ % 20) if round_ < 26 else 0.2):
            async with aiopglock.advisory_many(keys, db=pool, xact=xact) as lock:
                entered += 1
                assert len(await advisory_locks(admin, pid=lock.pid)) == len(keys)
                await anyio.sleep_forever()
        assert await advisory_locks(admin, key=keys[0]) == []
        assert await advisory_locks(admin, key=keys[-1]) == []
    assert await none_held(admin, keys)
    assert entered > 0
    assert pool.get_size() - pool.get_idle_size() == 0


# --------------------------------------------------------------------------- hostile findings


async def test_a_failed_shared_set_leaves_another_tasks_shared_hold_alone(
    connect: Connect, admin: asyncpg.Connection
) -> None:
    """Task B holds k shared on a Connection; task A's shared set [j, k] on
    the same Connection fails at j (busy elsewhere): A's cleanup releases
    only what A took, and B's k stays held until B exits."""
    j, k = new_keys(2)
    conn = await connect()
    other = await connect()
    await other.execute("SELECT pg_advisory_lock($1)", j)
    b_in, b_go = asyncio.Event(), asyncio.Event()

    async def b() -> None:
        async with aiopglock.advisory(k, db=conn, shared=True) as lock:
            assert lock
            b_in.set()
            await b_go.wait()

    task = asyncio.create_task(b())
    await b_in.wait()
    async with aiopglock.advisory_many([j, k], db=conn, shared=True, timeout=0) as many:
        assert not many
    assert await holders(admin, k) == [conn.get_server_pid()]
    b_go.set()
    await task  # no LockLost: the hold was never released under it
    assert await holders(admin, k) == []
    await other.execute("SELECT pg_advisory_unlock($1)", j)


async def test_a_cancelled_rollback_of_the_own_transaction_keeps_the_connection(
    connect: Connect, admin: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """xact=True on an idle Connection, the set not granted: a cancellation
    landing while aiopglock rolls its transaction back is remembered, the
    rollback finishes (asyncpg refuses a second rollback() of that
    transaction: a plain ROLLBACK does it), and the caller's Connection
    stays open, outside any transaction."""
    import asyncpg.transaction

    keys = new_keys(2)
    conn = await connect()
    other = await connect()
    await other.execute("SELECT pg_advisory_lock($1)", keys[1])
    real = asyncpg.transaction.Transaction.rollback
    shots = [True]

    async def rollback(self: asyncpg.transaction.Transaction) -> None:
        if shots:
            shots.pop()
            task = asyncio.current_task()
            assert task is not None
            asyncio.get_running_loop().call_soon(task.cancel)  # lands mid-ROLLBACK
        await real(self)

    monkeypatch.setattr(asyncpg.transaction.Transaction, "rollback", rollback)

    async def attempt() -> None:
        async with aiopglock.advisory_many(keys, db=conn, xact=True, timeout=0) as many:
            raise AssertionError(f"granted with a busy key: {many!r}")

    with pytest.raises(asyncio.CancelledError):
        await asyncio.create_task(attempt())
    assert not shots, "the injected cancellation never ran"
    assert not conn.is_closed()
    assert not conn.is_in_transaction()
    assert await conn.fetchval("SELECT 1") == 1
    async with conn.transaction():  # asyncpg's record of the old one is gone
        assert await conn.fetchval("SELECT 2") == 2
    assert await none_held(admin, [keys[0]])
