"""A spec entered by several tasks, one of whose blocks is exited in another task.

An async fixture's teardown, or an ``AsyncExitStack`` closed by another
task, exits a block in a task that never entered it. While a second task is
inside the same spec object, that exit must still close the right handle:
the one entered by the task that has finished.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncpg

import aiopglock
from aiopglock._semaphore import slot_key
from tests._helpers import holders


async def _enter_in_a_task(spec: Any, stack: contextlib.AsyncExitStack) -> Any:
    async def enter() -> Any:
        return await stack.enter_async_context(spec)

    return await asyncio.create_task(enter())


async def test_advisory_exit_from_another_task_while_a_third_is_inside(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    spec = aiopglock.advisory("cross-task:advisory", db=pool, shared=True)
    key = aiopglock.advisory_key("cross-task:advisory")
    stack = contextlib.AsyncExitStack()
    first = await _enter_in_a_task(spec, stack)
    inside = asyncio.Event()
    leave = asyncio.Event()

    async def third() -> int:
        async with spec as lock:
            inside.set()
            await leave.wait()
            assert lock.pid is not None
            return lock.pid

    task = asyncio.create_task(third())
    await inside.wait()
    assert len(await holders(admin, key)) == 2
    await asyncio.create_task(stack.aclose())  # exits first's block, from a third task
    assert not first.acquired or first.pid not in await holders(admin, key)
    remaining = await holders(admin, key)
    assert len(remaining) == 1
    leave.set()
    assert await task == remaining[0]
    assert await holders(admin, key) == []
    assert pool.get_idle_size() == pool.get_size()


async def test_semaphore_exit_from_another_task_while_a_third_is_inside(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    spec = aiopglock.semaphore("cross-task:semaphore", 2, db=pool)
    stack = contextlib.AsyncExitStack()
    first = await _enter_in_a_task(spec, stack)
    inside = asyncio.Event()
    leave = asyncio.Event()

    async def third() -> int:
        async with spec as slot:
            inside.set()
            await leave.wait()
            return int(slot.slot)

    task = asyncio.create_task(third())
    await inside.wait()
    await asyncio.create_task(stack.aclose())
    # The first slot is free again: a new entry gets exactly that one.
    async with aiopglock.semaphore("cross-task:semaphore", 2, db=pool, timeout=0) as again:
        assert again
        assert again.slot == first.slot
    leave.set()
    await task
    for slot in range(2):
        assert await holders(admin, slot_key("cross-task:semaphore", slot)) == []
