"""A full lock table (SQLSTATE 53200), on a server of this module's own.

PostgreSQL's shared lock table holds about ``max_locks_per_transaction x
(max_connections + max_prepared_transactions)`` locks for the whole server.
This module starts a separate embedded PostgreSQL with a tiny table
(``max_locks_per_transaction = 10``, ``max_connections = 20``: about 1,400
advisory locks), never the shared service, and fills it:

- a burst of Locker requests bigger than the table: the requests that fit
  are granted, the rest fail with an error naming
  ``max_locks_per_transaction``; nothing is half-held (pg_locks shows exactly
  the granted keys); the Locker keeps its locks, refuses new ones while the
  table is full, and serves again once room frees;
- plain ``advisory(db=pool)`` on a full table raises
  ``asyncpg.exceptions.OutOfMemoryError``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import asyncpg
import pytest

import aiopglock
import aiopglock._advisory
from tests._helpers import split_key
from tests.conftest import _EmbeddedServer

BURST = 3000
BASE = 0x10C4_7AB1_0000
LONE_KEY = 0x10C4_7AB2_0000


async def _configure(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("ALTER SYSTEM SET max_locks_per_transaction = 10")
        await conn.execute("ALTER SYSTEM SET max_connections = 20")
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def small_server() -> Iterator[str]:
    """A separate embedded PostgreSQL with a tiny lock table; its DSN."""
    server = _EmbeddedServer()
    try:
        asyncio.run(_configure(server.dsn))
        server.restart()
        yield server.dsn
    finally:
        server.stop()


@pytest.fixture
async def small(small_server: str) -> AsyncIterator[tuple[asyncpg.Pool, asyncpg.Connection]]:
    """A pool on the small server, and an admin connection watching it."""
    admin = await asyncpg.connect(small_server)
    assert await admin.fetchval("SHOW max_locks_per_transaction") == "10"
    pool = await asyncpg.create_pool(small_server, min_size=0, max_size=3)
    try:
        yield pool, admin
    finally:
        await asyncio.wait_for(pool.close(), 10)
        await admin.close()


async def _advisory_count(admin: asyncpg.Connection, pid: int | None = None) -> int:
    count = await admin.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
        "AND ($1::int4 IS NULL OR pid = $1::int4)",
        pid,
    )
    return int(count)


def _key(form: str, i: int) -> int | tuple[int, int]:
    """Burst keys: int8, int4 pairs, or one pair in five among int8 keys."""
    if form == "pairs" or (form == "mixed" and i % 5 == 0):
        return (7, i)
    return BASE + i


class _Burst:
    """``BURST`` tasks asking a Locker for one key each, at once; the granted
    ones hold until ``release`` is set."""

    def __init__(self, locker: aiopglock.Locker, form: str = "int8") -> None:
        self.locker = locker
        self.granted: list[Any] = []
        self.failed: list[BaseException] = []
        self.settled = asyncio.Event()
        self.release = asyncio.Event()
        # One key in five is an int4 pair: both forms go through the batch.
        self.tasks = [
            asyncio.create_task(self._one((7, i) if i % 5 == 0 else BASE + i)) for i in range(BURST)
        ]

    def _tally(self) -> None:
        if len(self.granted) + len(self.failed) == BURST:
            self.settled.set()

    async def _one(self, key: int | tuple[int, int]) -> None:
        try:
            async with self.locker.advisory(key, side_effect=aiopglock.Raise) as lock:
                self.granted.append(lock)
                self._tally()
                await self.release.wait()
        except asyncpg.exceptions.OutOfMemoryError as exc:
            self.failed.append(exc)
            self._tally()


@pytest.mark.parametrize("form", ["int8", "pairs", "mixed"])
async def test_locker_burst_grants_what_fits_and_keeps_serving(
    form: str, small: tuple[asyncpg.Pool, asyncpg.Connection]
) -> None:
    pool, admin = small
    # Prepared before the table fills up (a statement's first run may need
    # catalog locks that a full table refuses).
    await _held_keys(admin, 0)
    async with aiopglock.Locker(pool) as locker:
        burst = _Burst(locker, form)
        try:
            with anyio.fail_after(60):
                await burst.settled.wait()
            granted, failed = len(burst.granted), len(burst.failed)
            print(
                f"\n[lock table] burst of {BURST} {form} keys: {granted} granted, {failed} failed"
            )
            # Grant what fits, fail the rest clearly.
            assert granted > 500 and failed > 0 and granted + failed == BURST
            for exc in burst.failed:
                assert isinstance(exc, asyncpg.exceptions.OutOfMemoryError)
                assert "max_locks_per_transaction" in str(exc)
            # Nothing half-held: the server holds exactly the granted keys,
            # all on the holder connection.
            pids = {lock.pid for lock in burst.granted}
            assert len(pids) == 1
            holder = pids.pop()
            assert await _held_keys(admin, holder) == sorted(
                map(_row_key, (lock.key for lock in burst.granted))
            )
            # The Locker keeps the locks it has ...
            assert not any(lock.lost for lock in burst.granted)
            # ... refuses a new one clearly while the table is full ...
            with pytest.raises(
                asyncpg.exceptions.OutOfMemoryError, match="max_locks_per_transaction"
            ):
                async with locker.advisory(LONE_KEY, timeout=0):
                    pass
        finally:
            burst.release.set()
            await asyncio.gather(*burst.tasks, return_exceptions=True)
        # ... and serves new ones once room frees.
        assert await _held_keys(admin, holder) == []
        async with locker.advisory(LONE_KEY, timeout=0) as lock:
            assert lock and lock.pid == holder
            assert await _held_keys(admin, holder) == [_row_key(LONE_KEY)]
    assert await _advisory_count(admin) == 0


async def _held_keys(admin: asyncpg.Connection, pid: int) -> list[tuple[int, int, int]]:
    """The advisory keys ``pid`` holds, as pg_locks shows them, sorted."""
    rows = await admin.fetch(
        "SELECT classid::int8 AS c, objid::int8 AS o, objsubid::int4 AS s FROM pg_locks "
        "WHERE locktype = 'advisory' AND granted AND pid = $1",
        pid,
    )
    return sorted((row["c"], row["o"], row["s"]) for row in rows)


def _row_key(key: Any) -> tuple[int, int, int]:
    """``(classid, objid, objsubid)`` of an advisory key, as pg_locks shows it."""
    return split_key(key)


async def test_locker_contended_wait_on_a_full_table(
    small: tuple[asyncpg.Pool, asyncpg.Connection], small_server: str
) -> None:
    """A key held by another session, the table full: a waiting request
    fails with the named error, and leaves nothing behind."""
    pool, admin = small
    other = await asyncpg.connect(small_server)
    try:
        await other.execute("SELECT pg_advisory_lock($1)", LONE_KEY)
        async with aiopglock.Locker(pool) as locker:
            burst = _Burst(locker)
            try:
                with anyio.fail_after(60):
                    await burst.settled.wait()
                assert burst.failed
                with pytest.raises(
                    asyncpg.exceptions.OutOfMemoryError, match="max_locks_per_transaction"
                ):
                    async with locker.advisory(LONE_KEY, timeout=1):
                        pass
            finally:
                burst.release.set()
                await asyncio.gather(*burst.tasks, return_exceptions=True)
        # Only the other session's lock is left.
        assert await _advisory_count(admin) == 1
        assert await _advisory_count(admin, other.get_server_pid()) == 1
    finally:
        await other.close()


async def _fill_then(
    small: tuple[asyncpg.Pool, asyncpg.Connection],
) -> BaseException:
    """Fill the table with a Locker's burst, then ask plain advisory(db=pool)."""
    pool, admin = small
    async with aiopglock.Locker(pool) as locker:
        burst = _Burst(locker)
        try:
            with anyio.fail_after(60):
                await burst.settled.wait()
            with pytest.raises(asyncpg.exceptions.OutOfMemoryError) as info:
                async with aiopglock.advisory(LONE_KEY, db=pool):
                    pass
        finally:
            burst.release.set()
            await asyncio.gather(*burst.tasks, return_exceptions=True)
    assert await _advisory_count(admin) == 0
    return info.value


async def test_advisory_on_a_full_table(small: tuple[asyncpg.Pool, asyncpg.Connection]) -> None:
    await _fill_then(small)


async def test_advisory_lock_table_full_message(
    small: tuple[asyncpg.Pool, asyncpg.Connection],
) -> None:
    exc = await _fill_then(small)
    assert "max_locks_per_transaction" in str(exc)
