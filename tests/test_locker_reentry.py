"""A ``Locker`` and ``advisory()`` share one re-entry registry and one way
of delivering ``LockLost``, on the real server.

- a task holding a key through a Locker that asks ``advisory(key, db=pool)``
  for it (or the reverse, or through another Locker) nests: one hold in
  ``pg_locks``, no waiter, no hang;
- where nesting cannot be honest (a transaction-level lock in the caller's
  transaction on another session, an exclusive request under a shared hold,
  a fenced request under an unfenced hold) a ``UsageError`` names the fix;
- a lost Locker lock is delivered as a lost ``advisory()`` lock is: its own
  cancellation becomes ``LockLost``, anyone else's propagates.

The hang guard is ``anyio.fail_after`` rather than ``asyncio.wait_for``: on
Python 3.10 and 3.11 the latter runs the coroutine in a task of its own,
which holds nothing (re-entry is per task).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import asyncpg
import pytest

import aiopglock
from tests._helpers import holders, wait_for_release, wait_until, waiters

KEY = 881_200_001
GUARD = 10  # seconds: only a hang guard, never reached when nesting works


async def test_advisory_nests_in_the_tasks_locker_hold(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    async with aiopglock.Locker(pool) as locker:
        async with locker.advisory(KEY) as outer:
            assert outer
            with anyio.fail_after(GUARD):
                # No timeout: waiting on the server would wait forever.
                async with aiopglock.advisory(KEY, db=pool) as inner:
                    assert inner and inner.pid == outer.pid
                    assert "nested" in repr(inner)
                    assert inner.connection is None
                    assert await holders(admin, KEY) == [outer.pid]
                    assert await waiters(admin, KEY) == []
                    # No pool connection was leased for it.
                    assert pool.get_idle_size() == pool.get_size() - 1
                async with aiopglock.advisory(KEY, db=pool, xact=True) as tx:
                    # A transaction of its own, nested in the Locker's hold.
                    assert tx and tx.pid == outer.pid
                    assert tx.connection.is_in_transaction()
                    assert await holders(admin, KEY) == [outer.pid]
                    assert await waiters(admin, KEY) == []
                async with aiopglock.advisory(KEY, db=pool, shared=True) as shared:
                    assert shared
            # The inner exits released nothing.
            assert await holders(admin, KEY) == [outer.pid]
        assert await holders(admin, KEY) == []
    assert pool.get_idle_size() == pool.get_size()


async def test_locker_nests_in_the_tasks_advisory_hold(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    async with aiopglock.Locker(pool) as locker:
        async with aiopglock.advisory(KEY, db=pool) as outer:
            assert outer
            with anyio.fail_after(GUARD):
                async with locker.advisory(KEY) as inner:
                    assert inner and inner.pid == outer.pid
                    assert "nested" in repr(inner)
                    assert await holders(admin, KEY) == [outer.pid]
                    assert await waiters(admin, KEY) == []
                async with locker.advisory(KEY, xact=True) as tx:
                    assert tx and tx.pid == outer.pid
                    assert tx.connection.is_in_transaction()
                    assert await holders(admin, KEY) == [outer.pid]
                    assert await waiters(admin, KEY) == []
            assert await holders(admin, KEY) == [outer.pid]
            # A closed Locker takes nothing, not even a nested hold.
            await locker.aclose()
            with pytest.raises(aiopglock.UsageError, match="closed"):
                async with locker.advisory(KEY):
                    pass
        assert await holders(admin, KEY) == []
    assert pool.get_idle_size() == pool.get_size()


async def test_a_second_locker_nests_in_the_first(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    async with aiopglock.Locker(pool) as first, aiopglock.Locker(pool) as second:
        async with first.advisory(KEY) as outer:
            with anyio.fail_after(GUARD):
                async with second.advisory(KEY) as inner:
                    assert inner and inner.pid == outer.pid
                    assert await holders(admin, KEY) == [outer.pid]
                    assert await waiters(admin, KEY) == []
        assert await holders(admin, KEY) == []
        # Not inherited: another task waits for the hold like anyone else.
        async with first.advisory(KEY), second.advisory(KEY) as nested:
            assert nested
            child = asyncio.create_task(_try(second, KEY))
            assert await child is False
    assert pool.get_idle_size() == pool.get_size()


async def _try(locker: aiopglock.Locker, key: int) -> bool:
    async with locker.advisory(key, timeout=0) as lock:
        return bool(lock)


async def test_nesting_that_cannot_be_honest_is_refused(
    pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    async with aiopglock.Locker(pool) as locker:
        async with locker.advisory(KEY):
            # At transaction level in the caller's transaction on another
            # session: it would wait for the Locker's hold.
            async with pool.acquire() as conn, conn.transaction():
                with anyio.fail_after(GUARD), pytest.raises(aiopglock.UsageError, match="db=pool"):
                    async with aiopglock.advisory(KEY, db=conn, xact=True):
                        pass
            with anyio.fail_after(GUARD), pytest.raises(aiopglock.UsageError, match="fence=True"):
                async with aiopglock.advisory(KEY, db=pool, fence=True):
                    pass
            assert await waiters(admin, KEY) == []
        async with locker.advisory(KEY, shared=True):
            with pytest.raises(aiopglock.UsageError, match="upgrading"):
                async with aiopglock.advisory(KEY, db=pool):
                    pass
        async with aiopglock.advisory(KEY, db=pool, shared=True):
            with pytest.raises(aiopglock.UsageError, match="upgrading"):
                async with locker.advisory(KEY):
                    pass
        assert await holders(admin, KEY) == []
    assert pool.get_idle_size() == pool.get_size()


# -- LockLost delivery, the same for both ---------------------------------------


@asynccontextmanager
async def _lock_source(kind: str, pool: asyncpg.Pool) -> AsyncIterator[Callable[[], Any]]:
    if kind == "locker":
        async with aiopglock.Locker(pool) as locker:
            yield lambda: locker.advisory(KEY)
    else:
        yield lambda: aiopglock.advisory(KEY, db=pool)


@pytest.mark.parametrize("kind", ["locker", "advisory"])
@pytest.mark.parametrize("foreign", [False, True])
async def test_lost_lock_delivery_is_the_same(
    kind: str, foreign: bool, pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    """The holding backend is terminated while the block waits; the block's
    own cleanup awaits. Alone, the cancellation delivered for the loss
    becomes LockLost; someone else's, arriving in that cleanup, propagates
    (the loss is not hidden: ``lock.lost``)."""
    forever, cleaning, go = asyncio.Event(), asyncio.Event(), asyncio.Event()
    handle: list[Any] = []
    async with _lock_source(kind, pool) as lock_of:

        async def block() -> None:
            async with lock_of() as lock:
                handle.append(lock)
                try:
                    await forever.wait()
                finally:
                    cleaning.set()
                    await go.wait()

        task = asyncio.create_task(block())
        await wait_until(lambda: _held(admin), message="the lock to be held")
        pid = (await holders(admin, KEY))[0]
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        with anyio.fail_after(GUARD):
            await cleaning.wait()  # the loss cancelled the block
        assert handle[0].lost
        if foreign:
            task.cancel("someone else")
        else:
            go.set()
        with anyio.fail_after(GUARD):
            if foreign:
                with pytest.raises(asyncio.CancelledError):
                    await task
            else:
                with pytest.raises(aiopglock.LockLost):
                    await task
        assert handle[0].lost and not handle[0]
        await wait_for_release(admin, KEY)
    assert pool.get_idle_size() == pool.get_size()


async def _held(admin: asyncpg.Connection) -> bool:
    return bool(await holders(admin, KEY))
