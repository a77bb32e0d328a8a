"""What the decorators accept: ``functools.partial``, ``staticmethod`` and
``classmethod`` objects besides plain coroutine functions, with the lock (or
setting) checked on the server while the decorated code runs."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import asyncpg
import pytest

import aiopglock
from tests._helpers import holders

MODULE = __name__


async def job(admin: asyncpg.Connection, key: Any, tag: str) -> tuple[str, list[int]]:
    """Reports who holds ``key`` while it runs."""
    return tag, await holders(admin, aiopglock.advisory_key(key))


def _sync_job() -> None:
    pytest.fail("ran")


def _pids(pool: asyncpg.Pool) -> set[int]:
    return {holder._con.get_server_pid() for holder in pool._holders if holder._con is not None}


async def test_a_partial_is_named_after_the_function_it_runs(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    name = f"{MODULE}.job"
    decorated = aiopglock.advisory(db=pool)(functools.partial(job, admin, name))
    assert decorated.__name__ == "job" and decorated.__qualname__ == "job"
    assert decorated.__doc__ == job.__doc__
    assert inspect.iscoroutinefunction(decorated)
    tag, held_by = await decorated("partial")
    assert tag == "partial"
    assert len(held_by) == 1 and held_by[0] in _pids(pool)
    assert await holders(admin, aiopglock.advisory_key(name)) == []
    # Nested partials, and an explicit key.
    for key, checked in ((None, name), ("k2", "k2")):
        nested = functools.partial(functools.partial(job, admin), checked)
        _, held_by = await aiopglock.advisory(key, db=pool)(nested)("n")
        assert len(held_by) == 1 and held_by[0] in _pids(pool)


async def test_a_partial_excludes_its_function(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    """Same default key: a call through the partial waits for (here: skips
    because of) a call of the plain function holding it."""
    plain = aiopglock.advisory(db=pool, timeout=0, side_effect=aiopglock.Skip)(job)
    partial = aiopglock.advisory(db=pool, timeout=0, side_effect=aiopglock.Skip)(
        functools.partial(job, admin)
    )
    name = f"{MODULE}.job"
    key = aiopglock.advisory_key(name)
    async with pool.acquire() as other:
        await other.execute("SELECT pg_advisory_lock($1)", key)
        try:
            assert await partial(name, "skipped") is None
            assert await plain(admin, name, "skipped") is None
        finally:
            await other.execute("SELECT pg_advisory_unlock($1)", key)
    assert (await partial(name, "ran"))[0] == "ran"


def test_a_partial_of_a_plain_function_is_refused() -> None:
    with pytest.raises(TypeError, match=r"coroutine.*functools\.partial of '_sync_job'"):
        aiopglock.advisory()(functools.partial(_sync_job))
    with pytest.raises(TypeError, match=r"coroutine.*functools\.partial"):
        aiopglock.lock_timeout(1)(functools.partial(_sync_job))
    with pytest.raises(TypeError, match=r"coroutine.*functools\.partial"):
        aiopglock.prioritize()(functools.partial(_sync_job))


class Service:
    """Methods decorated above ``@staticmethod`` / ``@classmethod``."""

    admin: asyncpg.Connection

    @aiopglock.advisory(db=lambda: Service.pool)
    @staticmethod
    async def static(tag: str) -> tuple[str, list[int]]:
        return tag, await holders(Service.admin, aiopglock.advisory_key(f"{MODULE}.Service.static"))

    @aiopglock.advisory(db=lambda: Service.pool)
    @classmethod
    async def klass(cls, tag: str) -> tuple[Any, str, list[int]]:
        key = aiopglock.advisory_key(f"{MODULE}.Service.klass")
        return cls, tag, await holders(cls.admin, key)

    # The usual order still works too.
    @staticmethod
    @aiopglock.advisory(db=lambda: Service.pool)
    async def static_below(tag: str) -> tuple[str, list[int]]:
        key = aiopglock.advisory_key(f"{MODULE}.Service.static_below")
        return tag, await holders(Service.admin, key)

    pool: asyncpg.Pool


class SubService(Service):
    pass


async def test_staticmethod_and_classmethod_objects(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    Service.pool, Service.admin = pool, admin
    assert isinstance(Service.__dict__["static"], staticmethod)
    assert isinstance(Service.__dict__["klass"], classmethod)
    for call in (Service.static, Service().static, Service.static_below):
        tag, held_by = await call("s")
        assert tag == "s"
        assert len(held_by) == 1 and held_by[0] in _pids(pool)
    for owner, call in ((Service, Service.klass), (SubService, SubService().klass)):
        cls, tag, held_by = await call("c")
        assert cls is owner and tag == "c"
        assert len(held_by) == 1 and held_by[0] in _pids(pool)
    assert Service.static.__qualname__ == "Service.static"
    assert Service.klass.__name__ == "klass"


def test_a_staticmethod_of_a_plain_function_is_refused() -> None:
    for decorator in (aiopglock.advisory(), aiopglock.statement_timeout(1), aiopglock.prioritize()):
        with pytest.raises(TypeError, match=r"coroutine.*the staticmethod of '_sync_job'"):
            decorator(staticmethod(_sync_job))
        with pytest.raises(TypeError, match=r"coroutine.*the classmethod of '_sync_job'"):
            decorator(classmethod(_sync_job))


async def show(conn: asyncpg.Connection, setting: str) -> str:
    value: str = await conn.fetchval(f"SHOW {setting}")
    return value


class Queries:
    conn: asyncpg.Connection

    @aiopglock.statement_timeout(2.5, db=lambda: Queries.conn)
    @staticmethod
    async def static() -> str:
        return await show(Queries.conn, "statement_timeout")

    @aiopglock.lock_timeout(1.5, db=lambda: Queries.conn)
    @classmethod
    async def klass(cls) -> str:
        return await show(cls.conn, "lock_timeout")


async def test_timeout_scopes_decorate_partials_and_methods(connect: Any) -> None:
    conn: asyncpg.Connection = await connect()
    decorated = aiopglock.lock_timeout(0.25, db=conn)(functools.partial(show, conn))
    assert await decorated("lock_timeout") == "250ms"
    assert await show(conn, "lock_timeout") == "0"
    Queries.conn = conn
    assert await Queries.static() == "2500ms"
    assert await Queries().klass() == "1500ms"
    assert await show(conn, "statement_timeout") == "0"
    assert await show(conn, "lock_timeout") == "0"


async def test_prioritize_decorates_a_partial(pool: asyncpg.Pool, connect: Any) -> None:
    conn: asyncpg.Connection = await connect()
    decorated = aiopglock.prioritize(conn, via=pool, interval=3600)(functools.partial(show, conn))
    assert decorated.__name__ == "show"
    assert await decorated("lock_timeout") == "0"
