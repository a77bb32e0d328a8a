"""``Cleanup`` delivers a cancellation met inside it when it ends.

A raw ``Task.cancel()`` (which an anyio shield does not stop) interrupts a
step of the cleanup; the step completes all the same, and leaving the
``with`` raises the remembered ``CancelledError``, unless an exception is
raised out of the block: that one outranks it. The statements run on a real
server, and the tests check what the server did.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg
import pytest

from aiopglock._concurrency import Cleanup, run_through


async def _cancel_once_waiting(task: asyncio.Task[object], started: asyncio.Event) -> None:
    await started.wait()
    await asyncio.sleep(0)
    task.cancel()


async def test_exit_without_cancellation_returns(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        with Cleanup() as cleanup:
            assert await run_through(conn, "SELECT 1", cleanup) == "SELECT 1"
        assert cleanup.cancelled is None


async def test_exit_raises_cancellation_met_inside(pool: asyncpg.Pool) -> None:
    """The statement completes despite the cancel; the code after it inside
    the block runs; the ``with`` then raises the cancellation."""
    after_statement = []
    started = asyncio.Event()

    async with pool.acquire() as conn:
        await conn.execute("CREATE TEMP TABLE cleanup_probe (n int)")

        async def body() -> None:
            with Cleanup() as cleanup:
                started.set()
                await run_through(
                    conn, "SELECT pg_sleep(0.2); INSERT INTO cleanup_probe VALUES (1)", cleanup
                )
                after_statement.append(cleanup.cancelled is not None)
            after_statement.append("after the with")  # never reached

        task = asyncio.ensure_future(body())
        await _cancel_once_waiting(task, started)
        with pytest.raises(asyncio.CancelledError):
            await task
        # The statement ran to its end on the server, uninterrupted.
        assert await conn.fetchval("SELECT count(*) FROM cleanup_probe") == 1
    assert after_statement == [True]


async def _cancelled_mid_statement(
    conn: asyncpg.Connection, then: Callable[[Cleanup], None]
) -> asyncio.Task[str]:
    """A task whose cleanup statement is hit by a raw cancel; ``then(cleanup)``
    runs at the end of the block, which otherwise returns normally."""
    started = asyncio.Event()

    async def body() -> str:
        with Cleanup() as cleanup:
            started.set()
            await run_through(conn, "SELECT pg_sleep(0.2)", cleanup)
            assert cleanup.cancelled is not None
            then(cleanup)
        return "returned"

    task = asyncio.ensure_future(body())
    await _cancel_once_waiting(task, started)
    return task


async def test_exception_in_flight_outranks_cancellation(pool: asyncpg.Pool) -> None:
    def fail(_: Cleanup) -> None:
        raise LookupError("in flight")

    async with pool.acquire() as conn:
        task = await _cancelled_mid_statement(conn, fail)
        with pytest.raises(LookupError, match="in flight"):
            await task
        assert await conn.fetchval("SELECT 2") == 2  # the connection is idle again


async def test_forget_drops_the_cancellation(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        task = await _cancelled_mid_statement(conn, Cleanup.forget)
        assert await task == "returned"


async def test_run_retries_interrupted_step_then_delivers(pool: asyncpg.Pool) -> None:
    """``run()``: an interrupted try is tried again (here it asks the server
    again), and the cancellation comes out of the ``with`` afterwards."""
    attempts: list[int] = []
    started = asyncio.Event()

    async with pool.acquire() as conn:

        async def step(attempt: int) -> int:
            attempts.append(attempt)
            if attempt == 0:
                started.set()
                await conn.fetchval("SELECT pg_sleep(5)")
            return int(await conn.fetchval("SELECT 41 + $1::int", attempt))

        async def body() -> tuple[bool, int | None]:
            with Cleanup(lazy=True) as cleanup:
                result = await cleanup.run(step)
                outcome.append(result)
            return result

        outcome: list[tuple[bool, int | None]] = []
        task = asyncio.ensure_future(body())
        await _cancel_once_waiting(task, started)
        with pytest.raises(asyncio.CancelledError):
            await task
        assert attempts == [0, 1]
        assert outcome == [(True, 42)]
        # The interrupted pg_sleep was cancelled on the server: nothing runs.
        busy = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(5)%'"
        )
        assert busy == 0
