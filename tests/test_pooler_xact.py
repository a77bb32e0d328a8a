"""``advisory(key, db=pool, xact=True)`` through a real transaction-mode PgBouncer.

aiopglock opens the transaction itself, takes ``pg_advisory_xact_lock`` in
it and runs the block inside it, so every statement of one hold goes to one
server backend: the form of advisory lock that excludes behind a
transaction-mode pooler.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

import aiopglock
from tests._helpers import advisory_locks, holders
from tests.test_poolers import ROUNDS, TASKS, Exclusion, _all_idle, _key, _run_tasks, bouncer_pool

__all__ = ["bouncer_pool"]


@pytest.mark.parametrize("named", [False, True], ids=["int key", "str key"])
async def test_xact_lock_with_a_pool_excludes_through_a_transaction_pooler(
    named: bool, bouncer_pool: Callable[..., Awaitable[Any]], admin: asyncpg.Connection
) -> None:
    """A str key's statements (named, by the simple query protocol) too."""
    pool = await bouncer_pool("transaction")
    asked: aiopglock.Key = f"pooler:{_key()}" if named else _key()
    key = aiopglock.advisory_key(asked)
    # The named form with a timeout: its lock_timeout is kept and given back
    # in the same transaction, so on the same server backend.
    timeout = 30 if named else None
    seen = Exclusion()
    pids: set[int] = set()

    async def worker() -> None:
        for _ in range(ROUNDS * 2):
            async with aiopglock.advisory(asked, db=pool, xact=True, timeout=timeout) as lock:
                assert lock
                assert lock.connection.is_in_transaction()
                held = await holders(admin, key)
                assert len(held) == 1, held
                pids.update(held)
                await seen.visit()

    await _run_tasks(TASKS, worker)
    assert seen.most == 1
    assert seen.entries == TASKS * ROUNDS * 2
    assert len(pids) > 1  # the holds really went to several server backends
    assert await advisory_locks(admin, key=key) == []
    assert _all_idle(pool)
