"""``advisory(key, db=pool, xact=True)`` whose connection the server ends
for idling in its transaction (``idle_in_transaction_session_timeout``):
a ``LockLost``, like any other lost holder.

Needs xact=True with a Pool (aiopglock opens the transaction): until that
lands, the lock is refused with ``UsageError`` and this test fails.
"""

from __future__ import annotations

import anyio
import asyncpg

import aiopglock
from tests._helpers import PgServer
from tests.test_dead_clients import IDLE_MS, _held_until_lost, _key


async def test_idle_in_transaction_timeout_on_a_pool_xact_lock_is_lock_lost(
    pg_server: PgServer, admin: asyncpg.Connection
) -> None:
    pool = await asyncpg.create_pool(
        pg_server.dsn,
        min_size=0,
        max_size=2,
        server_settings={"idle_in_transaction_session_timeout": str(IDLE_MS)},
    )
    try:
        key = _key()
        for _ in range(2):
            await _held_until_lost(aiopglock.advisory(key, db=pool, xact=True), admin, key)
        assert await pool.fetchval("SELECT 1") == 1
    finally:
        with anyio.fail_after(10):
            await pool.close()
