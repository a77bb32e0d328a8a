"""Mutual exclusion across OS processes, on the real server.

Several spawned processes, each running several asyncio tasks, increment one
counter row with a read-modify-write in two statements (SELECT, then UPDATE,
with a yield in between to invite races). Under an advisory lock the final
count is exact; without it (the negative control) updates are lost, which
shows the workload can expose a broken lock.

The worker functions live at module level so that ``spawn`` can import them
(``tests`` is a package). Every process started is joined with a deadline and
killed if it overstays, whatever the test did.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import queue
import time
from collections.abc import AsyncIterator, Callable
from multiprocessing.process import BaseProcess
from typing import Any

import anyio
import anyio.to_thread
import asyncpg
import pytest

import aiopglock
from tests._helpers import PgServer, holders, wait_for_release, wait_for_waiter

PROCESSES = 4
TASKS = 5
INCREMENTS = 25
EXPECTED = PROCESSES * TASKS * INCREMENTS

#: Bounds for everything a child process does (start-up, barrier, work).
CHILD_TIMEOUT = 60.0
JOIN_TIMEOUT = 90.0

COUNTER_ID = 1

# --------------------------------------------------------------------------- workers (children)


def _sql(table: str) -> tuple[str, str]:
    quoted = '"' + table.replace('"', '""') + '"'
    return (
        f"SELECT n FROM {quoted} WHERE id = $1",
        f"UPDATE {quoted} SET n = $2 WHERE id = $1",
    )


async def _read_modify_write(conn: Any, table: str) -> None:
    """``n = n + 1`` in two statements on ``conn`` (a Pool or a Connection), with a
    yield between them: without a lock this loses about 90 % of the updates."""
    select, update = _sql(table)
    n = await conn.fetchval(select, COUNTER_ID)
    await asyncio.sleep(0)  # invites other tasks (and processes) into the window
    await conn.execute(update, COUNTER_ID, n + 1)


async def _count(
    dsn: str, table: str, key: str, mode: str, tasks: int, increments: int, barrier: Any
) -> None:
    # Session locks: every task holds one connection for its lock (waiting or
    # held) and the holder needs one more for its statements.
    size = tasks + 1
    pool = await asyncpg.create_pool(dsn, min_size=size, max_size=size)
    try:

        async def session_task() -> None:
            for _ in range(increments):
                async with aiopglock.advisory(key, db=pool, side_effect=aiopglock.Raise):
                    await _read_modify_write(pool, table)

        async def xact_task() -> None:
            for _ in range(increments):
                async with (
                    pool.acquire() as conn,
                    conn.transaction(),
                    aiopglock.advisory(key, db=conn, xact=True, side_effect=aiopglock.Raise),
                ):
                    await _read_modify_write(conn, table)

        async def unlocked_task() -> None:
            for _ in range(increments):
                await _read_modify_write(pool, table)

        task = {"session": session_task, "xact": xact_task, "none": unlocked_task}[mode]
        # Every process is connected before any starts counting.
        barrier.wait(CHILD_TIMEOUT)
        with anyio.fail_after(CHILD_TIMEOUT):
            async with anyio.create_task_group() as tg:
                for _ in range(tasks):
                    tg.start_soon(task)
    finally:
        await pool.close()


def counter_worker(
    dsn: str, table: str, key: str, mode: str, tasks: int, increments: int, barrier: Any
) -> None:
    """Child process: ``tasks`` tasks, each incrementing the counter ``increments``
    times; ``mode`` is ``"session"``, ``"xact"`` or ``"none"`` (no lock)."""
    asyncio.run(_count(dsn, table, key, mode, tasks, increments, barrier))


async def _hold(dsn: str, key: str, shared: bool, report: Any, release: Any) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        async with aiopglock.advisory(
            key, db=conn, shared=shared, timeout=CHILD_TIMEOUT, side_effect=aiopglock.Raise
        ) as lock:
            report.put((os.getpid(), lock.pid))
            await anyio.to_thread.run_sync(release.wait, CHILD_TIMEOUT)
    finally:
        await conn.close()


def hold_worker(dsn: str, key: str, shared: bool, report: Any, release: Any) -> None:
    """Child process: take ``key`` (waiting if need be), report ``(os pid, backend
    pid)`` on ``report``, hold it until ``release`` is set."""
    asyncio.run(_hold(dsn, key, shared, report, release))


# --------------------------------------------------------------------------- parent side


def _join_all(procs: list[BaseProcess], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(10)


class Children:
    """Spawned processes of one test: started, then joined (or killed)."""

    def __init__(self) -> None:
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: list[BaseProcess] = []

    def start(self, target: Callable[..., None], *args: Any) -> BaseProcess:
        proc = self.ctx.Process(target=target, args=args, daemon=True)
        proc.start()
        self.procs.append(proc)
        return proc

    async def join(self, timeout: float = JOIN_TIMEOUT) -> None:
        """Join every child; fail unless all exited cleanly within ``timeout``."""
        await anyio.to_thread.run_sync(_join_all, self.procs, timeout)
        codes = {proc.name: proc.exitcode for proc in self.procs}
        assert all(code == 0 for code in codes.values()), f"child exit codes: {codes}"


@contextlib.asynccontextmanager
async def children() -> AsyncIterator[Children]:
    kids = Children()
    try:
        yield kids
    finally:
        # On any failure: nothing outlives the test (join or kill; never raise here).
        await anyio.to_thread.run_sync(_join_all, kids.procs, JOIN_TIMEOUT)


async def get(q: Any, timeout: float = CHILD_TIMEOUT) -> Any:
    try:
        return await anyio.to_thread.run_sync(q.get, True, timeout)
    except queue.Empty:
        raise AssertionError(f"no report from a child process within {timeout} s") from None


@pytest.fixture
async def counter(admin: asyncpg.Connection) -> AsyncIterator[str]:
    """The ``aiopglock_counter`` table (named per test run so that concurrent
    runs on a shared server do not collide), with one row at 0; dropped at the end."""
    table = f"aiopglock_counter_{os.getpid()}"
    quoted = '"' + table + '"'
    await admin.execute(f"DROP TABLE IF EXISTS {quoted}")
    await admin.execute(f"CREATE TABLE {quoted} (id int PRIMARY KEY, n int NOT NULL)")
    await admin.execute(f"INSERT INTO {quoted} (id, n) VALUES ($1, 0)", COUNTER_ID)
    try:
        yield table
    finally:
        await admin.execute(f"DROP TABLE IF EXISTS {quoted}")


async def run_counters(pg_server: PgServer, table: str, key: str, mode: str) -> None:
    async with children() as kids:
        barrier = kids.ctx.Barrier(PROCESSES)
        for _ in range(PROCESSES):
            kids.start(counter_worker, pg_server.dsn, table, key, mode, TASKS, INCREMENTS, barrier)
        await kids.join()


async def final_count(admin: asyncpg.Connection, table: str) -> int:
    select, _ = _sql(table)
    n: int = await admin.fetchval(select, COUNTER_ID)
    return n


# --------------------------------------------------------------------------- tests


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["session", "xact"])
async def test_counter_exact_under_lock(
    mode: str, pg_server: PgServer, admin: asyncpg.Connection, counter: str
) -> None:
    key = f"counter:{counter}"
    await run_counters(pg_server, counter, key, mode)
    assert await final_count(admin, counter) == EXPECTED
    assert await holders(admin, aiopglock.advisory_key(key)) == []


@pytest.mark.slow
async def test_counter_without_lock_loses_updates(
    pg_server: PgServer, admin: asyncpg.Connection, counter: str
) -> None:
    """Negative control: the same workload unlocked loses updates, so the exact
    counts above are evidence of exclusion, not of a workload that cannot race."""
    await run_counters(pg_server, counter, f"counter:{counter}", "none")
    n = await final_count(admin, counter)
    print(f"\n[aiopglock processes] unlocked control: {n} of {EXPECTED} increments survived")
    assert 0 < n < EXPECTED


@pytest.mark.slow
async def test_shared_holders_coexist_across_processes(
    pg_server: PgServer, admin: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    key = f"counter:shared:{os.getpid()}"
    server_key = aiopglock.advisory_key(key)
    async with children() as kids:
        report = kids.ctx.Queue()
        release = kids.ctx.Event()
        try:
            for _ in range(2):
                kids.start(hold_worker, pg_server.dsn, key, True, report, release)
            reports = [await get(report), await get(report)]
            backends = sorted(backend for _, backend in reports)
            assert sorted(os_pid for os_pid, _ in reports) == sorted(p.pid for p in kids.procs)
            # Both processes hold the key at once, shared, and nobody holds it exclusive.
            assert await holders(admin, server_key, mode="ShareLock") == backends
            assert await holders(admin, server_key, mode="ExclusiveLock") == []
            # An exclusive request is refused while they hold it.
            async with aiopglock.advisory(key, db=pool, timeout=0) as exclusive:
                assert not exclusive
            # A further shared request is granted alongside them.
            async with aiopglock.advisory(key, db=pool, shared=True, timeout=0) as third:
                assert third
                assert await holders(admin, server_key, mode="ShareLock") == sorted(
                    [*backends, third.pid]
                )
        finally:
            release.set()
        await kids.join()
    await wait_for_release(admin, server_key)


@pytest.mark.slow
async def test_exclusive_holder_excludes_other_process(
    pg_server: PgServer, admin: asyncpg.Connection
) -> None:
    key = f"counter:exclusive:{os.getpid()}"
    server_key = aiopglock.advisory_key(key)
    async with children() as kids:
        report = kids.ctx.Queue()
        release_first, release_second = kids.ctx.Event(), kids.ctx.Event()
        try:
            kids.start(hold_worker, pg_server.dsn, key, False, report, release_first)
            first_os, first_backend = await get(report)
            kids.start(hold_worker, pg_server.dsn, key, False, report, release_second)
            # The second process queues in PostgreSQL behind the first.
            second_backend = await wait_for_waiter(admin, server_key, timeout=CHILD_TIMEOUT)
            assert second_backend != first_backend
            assert await holders(admin, server_key) == [first_backend]
            assert report.empty()
            release_first.set()
            second_os, granted_backend = await get(report)
            assert granted_backend == second_backend
            assert (first_os, second_os) == (kids.procs[0].pid, kids.procs[1].pid)
            assert await holders(admin, server_key, mode="ExclusiveLock") == [second_backend]
        finally:
            release_first.set()
            release_second.set()
        await kids.join()
    await wait_for_release(admin, server_key)
