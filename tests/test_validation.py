"""Bad input is rejected with TypeError/ValueError (or UsageError) that names the
argument and what it accepts, before any connection is taken or SQL is sent.

"Before" is proved two ways: ``db=`` is a zero-argument callable that records
being called (it must not be), or a real pool whose size, idle count and
backend activity (``pg_stat_activity``) are compared before and after.
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

import aiopglock
from aiopglock import _db
from tests._helpers import Connect, advisory_locks, holders, wait_for_waiter

KEY = "aiopglock-tests:validation"
INT64_MAX = 2**63 - 1


class RecordingDB:
    """``db=`` as a zero-argument callable that records every call."""

    def __init__(self, target: Any = None) -> None:
        self.target = target
        self.calls = 0

    def __call__(self) -> Any:
        self.calls += 1
        return self.target


class PoolProbe:
    """Snapshots of a pool and of its one backend, to show nothing touched them."""

    def __init__(self, pool: asyncpg.Pool, admin: asyncpg.Connection, pid: int) -> None:
        self.pool = pool
        self.admin = admin
        self.pid = pid

    async def snapshot(self) -> tuple[Any, ...]:
        row = await self.admin.fetchrow(
            "SELECT state, state_change, query_start, query FROM pg_stat_activity WHERE pid = $1",
            self.pid,
        )
        assert row is not None, "the pool's backend is gone"
        return (self.pool.get_size(), self.pool.get_idle_size(), *row)

    async def assert_untouched(self, before: tuple[Any, ...]) -> None:
        assert await self.snapshot() == before
        assert await advisory_locks(self.admin, pid=self.pid) == []


@pytest.fixture
async def probe(pool: asyncpg.Pool, admin: asyncpg.Connection) -> PoolProbe:
    # The pool has one connection (min_size=1): learn its backend's pid.
    async with pool.acquire() as conn:
        pid = conn.get_server_pid()
    assert pool.get_size() == pool.get_idle_size() == 1
    return PoolProbe(pool, admin, pid)


@pytest.fixture
def no_default_db() -> Iterator[None]:
    aiopglock.configure(db=None)
    try:
        yield
    finally:
        aiopglock.configure(db=None)


@pytest.fixture
def keep_heartbeat() -> Iterator[float]:
    saved = _db.heartbeat_interval()
    try:
        yield saved
    finally:
        aiopglock.configure(heartbeat=saved)


async def use_as_context_manager(**kwargs: Any) -> None:
    async with aiopglock.advisory(**kwargs):
        pytest.fail("the block ran")


async def use_as_decorator(**kwargs: Any) -> None:
    @aiopglock.advisory(**kwargs)
    async def work() -> None:
        pytest.fail("the function ran")

    await work()


# --------------------------------------------------------------------------- bad arguments

# (id, kwargs, exception, substrings the message must contain)
BAD: list[tuple[str, dict[str, Any], type[Exception], list[str]]] = [
    ("key-true", {"key": True}, TypeError, ["key", "str", "int"]),
    ("key-false", {"key": False}, TypeError, ["key"]),
    ("key-float", {"key": 1.0}, TypeError, ["key", "str", "int"]),
    ("key-bytes", {"key": b"k"}, TypeError, ["key"]),
    ("key-list", {"key": [1, 2]}, TypeError, ["key"]),
    ("key-empty", {"key": ""}, ValueError, ["key"]),
    ("key-int64-over", {"key": INT64_MAX + 1}, ValueError, ["key", "64"]),
    ("key-int64-under", {"key": -INT64_MAX - 2}, ValueError, ["key", "64"]),
    ("key-pair-over", {"key": (2**31, 0)}, ValueError, ["key", "32"]),
    ("key-triple", {"key": (1, 2, 3)}, TypeError, ["key"]),
    ("timeout-negative", {"timeout": -1}, ValueError, ["timeout", "None"]),
    ("timeout-negative-small", {"timeout": -0.001}, ValueError, ["timeout", "None"]),
    ("timeout-nan", {"timeout": math.nan}, ValueError, ["timeout", "None"]),
    ("timeout-inf", {"timeout": math.inf}, ValueError, ["timeout", "None"]),
    ("timeout-minus-inf", {"timeout": -math.inf}, ValueError, ["timeout", "None"]),
    ("timeout-true", {"timeout": True}, TypeError, ["timeout", "None", "timedelta"]),
    ("timeout-false", {"timeout": False}, TypeError, ["timeout", "None", "timedelta"]),
    ("timeout-str", {"timeout": "5"}, TypeError, ["timeout", "None", "timedelta"]),
    ("timeout-timedelta", {"timeout": timedelta(seconds=-1)}, ValueError, ["timeout", "None"]),
    ("shared-int", {"shared": 1}, TypeError, ["shared", "True", "False"]),
    ("shared-none", {"shared": None}, TypeError, ["shared", "True", "False"]),
    ("shared-str", {"shared": "yes"}, TypeError, ["shared", "True", "False"]),
    ("xact-int", {"xact": 0}, TypeError, ["xact", "True", "False"]),
    ("xact-str", {"xact": "true"}, TypeError, ["xact", "True", "False"]),
    ("cancel_on_lost-int", {"cancel_on_lost": 1}, TypeError, ["cancel_on_lost", "True"]),
    ("cancel_on_lost-none", {"cancel_on_lost": None}, TypeError, ["cancel_on_lost", "True"]),
]

BAD_SIDE_EFFECTS: list[object] = ["raise", "Raise", True, 1, aiopglock.LockNotAcquired, object()]


def _ids(case: tuple[str, Any, Any, Any]) -> str:
    return case[0]


@pytest.mark.parametrize("case", BAD, ids=_ids)
async def test_bad_argument_rejected_before_db_is_resolved(
    case: tuple[str, dict[str, Any], type[Exception], list[str]],
) -> None:
    _, kwargs, error, words = case
    kwargs = {"key": KEY, **kwargs}
    db = RecordingDB()
    for use in (use_as_context_manager, use_as_decorator):
        with pytest.raises(error) as info:
            await use(db=db, **kwargs)
        for word in words:
            assert word in str(info.value), (use.__name__, str(info.value))
    assert db.calls == 0


@pytest.mark.parametrize("case", BAD, ids=_ids)
async def test_bad_argument_leaves_the_pool_alone(
    case: tuple[str, dict[str, Any], type[Exception], list[str]], probe: PoolProbe
) -> None:
    _, kwargs, error, _words = case
    kwargs = {"key": KEY, **kwargs}
    before = await probe.snapshot()
    with pytest.raises(error):
        await use_as_context_manager(db=probe.pool, **kwargs)
    with pytest.raises(error):
        await use_as_decorator(db=probe.pool, **kwargs)
    await probe.assert_untouched(before)


@pytest.mark.parametrize("side_effect", BAD_SIDE_EFFECTS, ids=repr)
async def test_side_effect_must_be_a_side_effect(side_effect: object, probe: PoolProbe) -> None:
    db = RecordingDB(probe.pool)
    before = await probe.snapshot()
    for use in (use_as_context_manager, use_as_decorator):
        with pytest.raises((TypeError, ValueError)) as info:
            await use(key=KEY, db=db, side_effect=side_effect)
        message = str(info.value)
        for word in ("side_effect", "Return", "Raise", "Skip"):
            assert word in message, message
    assert db.calls == 0
    await probe.assert_untouched(before)


async def test_missing_key_for_a_context_manager(probe: PoolProbe) -> None:
    db = RecordingDB(probe.pool)
    before = await probe.snapshot()
    with pytest.raises((TypeError, ValueError), match="key"):
        async with aiopglock.advisory(db=db):
            pytest.fail("the block ran")
    with pytest.raises((TypeError, ValueError), match="key"):
        async with aiopglock.advisory(None, db=db):
            pytest.fail("the block ran")
    assert db.calls == 0
    await probe.assert_untouched(before)


@pytest.mark.parametrize("timeout", [0, 0.0, timedelta(0), timedelta(seconds=1.5), 1.5, 2])
async def test_accepted_timeouts(
    timeout: Any, pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    async with aiopglock.advisory(KEY + ":timeout-ok", db=pool, timeout=timeout) as lock:
        assert lock
        assert await holders(admin, lock.key) == [lock.pid]
    assert await advisory_locks(admin, pid=lock.pid) == []


async def test_timedelta_timeout_is_seconds_on_the_server(
    pool: asyncpg.Pool, connect: Connect, admin: asyncpg.Connection
) -> None:
    key = KEY + ":timedelta"
    as_int = aiopglock.advisory_key(key)
    other = await connect()
    await other.execute("SELECT pg_advisory_lock($1::int8)", as_int)
    try:
        loop_time = asyncio.get_running_loop().time
        started = loop_time()
        async with aiopglock.advisory(key, db=pool, timeout=timedelta(seconds=1.5)) as lock:
            assert not lock
        elapsed = loop_time() - started
        assert 1.4 <= elapsed < 10, elapsed
        assert await holders(admin, as_int) == [other.get_server_pid()]
        assert await advisory_locks(admin, key=as_int, granted=False) == []
    finally:
        await other.execute("SELECT pg_advisory_unlock($1::int8)", as_int)


async def test_timedelta_timeout_waits_on_the_server(
    pool: asyncpg.Pool, connect: Connect, admin: asyncpg.Connection
) -> None:
    # A positive timedelta is a real wait in PostgreSQL's lock queue, not a poll.
    key = KEY + ":timedelta-wait"
    as_int = aiopglock.advisory_key(key)
    other = await connect()
    await other.execute("SELECT pg_advisory_lock($1::int8)", as_int)

    async def take() -> bool:
        async with aiopglock.advisory(key, db=pool, timeout=timedelta(seconds=30)) as lock:
            return bool(lock)

    task = asyncio.ensure_future(take())
    try:
        await wait_for_waiter(admin, as_int)
        await other.execute("SELECT pg_advisory_unlock($1::int8)", as_int)
        assert await asyncio.wait_for(task, 10) is True
    finally:
        task.cancel()
    assert await holders(admin, as_int) == []


# --------------------------------------------------------------------------- side effects


async def test_skip_with_async_with_fails_at_enter(probe: PoolProbe) -> None:
    db = RecordingDB(probe.pool)
    before = await probe.snapshot()
    manager = aiopglock.advisory(KEY, db=db, side_effect=aiopglock.Skip)
    with pytest.raises(ValueError) as info:
        await manager.__aenter__()
    message = str(info.value)
    assert "side_effect" in message and "Skip" in message, message
    assert db.calls == 0
    await probe.assert_untouched(before)


async def test_return_as_decorator_side_effect_fails_at_decoration(probe: PoolProbe) -> None:
    db = RecordingDB(probe.pool)
    before = await probe.snapshot()
    decorator = aiopglock.advisory(db=db, side_effect=aiopglock.Return)

    async def work() -> None:
        pytest.fail("the function ran")

    with pytest.raises(ValueError) as info:
        decorator(work)
    message = str(info.value)
    assert "side_effect" in message and "Return" in message, message
    assert db.calls == 0
    await probe.assert_untouched(before)


# --------------------------------------------------------------------------- decorated functions


def _sync() -> None:
    pytest.fail("ran")


async def _async_gen() -> AsyncIterator[int]:
    yield 1


class _AsyncCallable:
    async def __call__(self) -> None:
        pytest.fail("ran")


@pytest.mark.parametrize(
    "fn",
    [
        _sync,
        lambda: None,
        _async_gen,
        print,
        functools.partial(_sync),
        staticmethod(_sync),
        classmethod(_sync),
        staticmethod(functools.partial(_sync)),
        _AsyncCallable(),
        _AsyncCallable,
        "async def",
        None,
    ],
    ids=[
        "def",
        "lambda",
        "async-generator",
        "builtin",
        "partial-of-def",
        "staticmethod-of-def",
        "classmethod-of-def",
        "staticmethod-of-partial",
        "async-callable-object",
        "class",
        "str",
        "None",
    ],
)
@pytest.mark.parametrize("key", [None, KEY], ids=["default-key", "explicit-key"])
def test_decorating_a_non_coroutine_function(fn: Any, key: Any) -> None:
    db = RecordingDB()
    with pytest.raises(TypeError, match="coroutine"):
        aiopglock.advisory(key, db=db)(fn)
    with pytest.raises(TypeError, match="coroutine"):
        aiopglock.advisory(key, db=db, side_effect=aiopglock.Skip)(fn)
    assert db.calls == 0


# --------------------------------------------------------------------------- db=


@pytest.mark.parametrize(
    "db",
    ["postgresql://postgres@127.0.0.1:5432/test", 5432, b"dsn", 1.5, True, ["pool"]],
    ids=repr,
)
async def test_db_of_a_wrong_type(db: object) -> None:
    for use in (use_as_context_manager, use_as_decorator):
        with pytest.raises(TypeError) as info:
            await use(key=KEY, db=db)
        message = str(info.value)
        assert "db" in message and "Pool" in message and "Connection" in message, message


@pytest.mark.parametrize(
    "returned", ["postgresql://postgres@127.0.0.1:5432/test", None, 0, object()], ids=repr
)
async def test_callable_db_returning_a_wrong_type(returned: object) -> None:
    db = RecordingDB(returned)
    manager = aiopglock.advisory(KEY, db=db)
    assert db.calls == 0  # resolved at call time, not when built
    with pytest.raises(TypeError) as info:
        async with manager:
            pytest.fail("the block ran")
    assert db.calls == 1
    message = str(info.value)
    assert "db" in message and "Pool" in message, message

    @aiopglock.advisory(db=db)
    async def work() -> None:
        pytest.fail("the function ran")

    assert db.calls == 1
    with pytest.raises(TypeError, match="db"):
        await work()
    assert db.calls == 2


async def test_callable_db_is_resolved_at_each_call(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    key = aiopglock.advisory_key(KEY + ":late-db")
    db = RecordingDB()

    @aiopglock.advisory(KEY + ":late-db", db=db)
    async def work() -> list[int]:
        return await holders(admin, key)

    assert db.calls == 0
    db.target = pool  # the pool exists only after decoration
    first, second = await work(), await work()
    assert len(first) == len(second) == 1
    assert db.calls == 2
    assert await holders(admin, key) == []


@pytest.mark.parametrize("form", ["pool", "connection", "proxy", "callable"])
async def test_accepted_db_forms(
    form: str, pool: asyncpg.Pool, connect: Connect, admin: asyncpg.Connection
) -> None:
    key = f"{KEY}:db-form:{form}"
    if form == "proxy":
        async with pool.acquire() as proxy, aiopglock.advisory(key, db=proxy) as lock:
            assert lock
            assert lock.pid == proxy.get_server_pid()
            assert await holders(admin, lock.key) == [lock.pid]
        assert await holders(admin, lock.key) == []
        return
    db: Any = {"pool": pool, "callable": lambda: pool}.get(form)
    if form == "connection":
        db = await connect()
    async with aiopglock.advisory(key, db=db) as lock:
        assert lock
        assert await holders(admin, lock.key) == [lock.pid]
    assert await holders(admin, lock.key) == []


async def test_no_db_and_no_default_is_a_usage_error(no_default_db: None) -> None:
    with pytest.raises(aiopglock.UsageError) as info:
        async with aiopglock.advisory(KEY):
            pytest.fail("the block ran")
    message = str(info.value)
    assert "db" in message and "configure" in message, message

    @aiopglock.advisory(timeout=0, side_effect=aiopglock.Skip)
    async def work() -> None:
        pytest.fail("the function ran")

    with pytest.raises(aiopglock.UsageError, match="configure"):
        await work()


async def test_configured_default_db_is_used(
    no_default_db: None, pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    db = RecordingDB(pool)
    aiopglock.configure(db=db)
    async with aiopglock.advisory(KEY + ":default") as lock:
        assert lock
        assert await holders(admin, lock.key) == [lock.pid]
    assert db.calls == 1
    aiopglock.configure(db=None)
    with pytest.raises(aiopglock.UsageError):
        async with aiopglock.advisory(KEY + ":default"):
            pytest.fail("the block ran")


@pytest.mark.parametrize("db", ["postgresql://postgres@127.0.0.1:5432/test", 5, b"x"], ids=repr)
async def test_configure_rejects_a_wrong_db(db: object, no_default_db: None) -> None:
    with pytest.raises(TypeError, match="db"):
        aiopglock.configure(db=db)
    with pytest.raises(aiopglock.UsageError):  # the default is still unset
        async with aiopglock.advisory(KEY):
            pytest.fail("the block ran")


# --------------------------------------------------------------------------- xact=True


# xact=True with a Pool, or a Connection outside a transaction, is no longer a
# UsageError: aiopglock opens the transaction (tests/test_xact.py).


async def test_xact_inside_a_transaction_is_accepted(
    connect: Connect, admin: asyncpg.Connection
) -> None:
    conn = await connect()
    async with conn.transaction():
        async with aiopglock.advisory(KEY + ":xact-ok", db=conn, xact=True) as lock:
            assert lock
        assert await holders(admin, lock.key) == [conn.get_server_pid()]
    assert await holders(admin, lock.key) == []


# --------------------------------------------------------------------------- configure(heartbeat=)


@pytest.mark.parametrize(
    ("heartbeat", "error"),
    [
        (0, ValueError),
        (0.0, ValueError),
        (-1, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        (-math.inf, ValueError),
        (True, TypeError),
        (False, TypeError),
        ("5", TypeError),
        ([5], TypeError),
    ],
    ids=repr,
)
def test_configure_rejects_a_bad_heartbeat(
    heartbeat: object, error: type[Exception], keep_heartbeat: float
) -> None:
    with pytest.raises(error, match="heartbeat"):
        aiopglock.configure(heartbeat=heartbeat)
    assert _db.heartbeat_interval() == keep_heartbeat


@pytest.mark.parametrize("heartbeat", [1, 0.25, 30.0])
def test_configure_accepts_a_heartbeat(heartbeat: float, keep_heartbeat: float) -> None:
    aiopglock.configure(heartbeat=heartbeat)
    assert _db.heartbeat_interval() == heartbeat


async def test_a_rejected_configure_changes_nothing(
    pool: asyncpg.Pool, no_default_db: None, keep_heartbeat: float
) -> None:
    with pytest.raises(ValueError, match="heartbeat"):
        aiopglock.configure(db=pool, heartbeat=-1)
    assert _db.heartbeat_interval() == keep_heartbeat
    with pytest.raises(aiopglock.UsageError):  # db= was not half-applied
        async with aiopglock.advisory(KEY):
            pytest.fail("the block ran")


# --------------------------------------------------------------------------- the error tree


def test_error_tree() -> None:
    for cls in (aiopglock.UsageError, aiopglock.LockNotAcquired, aiopglock.LockLost):
        assert issubclass(cls, aiopglock.Error)
    assert issubclass(aiopglock.Error, Exception)
    assert issubclass(aiopglock.LockNotAcquired, TimeoutError)
    assert not issubclass(aiopglock.LockLost, TimeoutError)
    assert not issubclass(aiopglock.UsageError, (TypeError, ValueError))
    # Bad arguments are plain TypeError/ValueError, not aiopglock errors.
    with pytest.raises(TypeError) as type_error:
        aiopglock.advisory_key(None)  # type: ignore[arg-type]
    assert not isinstance(type_error.value, aiopglock.Error)
    with pytest.raises(ValueError) as value_error:
        aiopglock.advisory_key("")
    assert not isinstance(value_error.value, aiopglock.Error)


async def test_the_probe_sees_a_pool_being_used(probe: PoolProbe) -> None:
    # The "untouched" checks above can fail: one lock through the pool is seen.
    before = await probe.snapshot()
    async with aiopglock.advisory(KEY + ":probe", db=probe.pool, timeout=0) as lock:
        assert lock
    with pytest.raises(AssertionError):
        await probe.assert_untouched(before)


async def test_a_db_callable_returning_a_coroutine_is_a_type_error() -> None:
    """An async factory is not a db: TypeError at call time, and the coroutine
    it returned is closed (no "never awaited" warning, which would be an error
    under this suite's warning filter)."""

    async def factory() -> None:
        return None

    with pytest.raises(TypeError, match="db: the callable returned coroutine"):
        async with aiopglock.advisory("k", db=factory):
            pass
