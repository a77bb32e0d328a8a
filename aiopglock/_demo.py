"""``aiopglock demo``: a short narrated run of every feature, on a real server."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from typing import Any

import asyncpg

from ._advisory import Raise, Skip, advisory
from ._errors import LockLost, LockNotAcquired
from ._keys import advisory_key, lock_ids

__all__ = ["run_demo"]

Say = Callable[[str], None]

_LOCKS = """
SELECT l.pid, l.mode, l.granted
FROM pg_catalog.pg_locks l
WHERE l.locktype = 'advisory' AND l.classid::int8 = $1 AND l.objid::int8 = $2
ORDER BY l.granted DESC, l.pid
"""


async def _show_locks(say: Say, admin: Any, key: Any) -> None:
    classid, objid, _ = lock_ids(key)
    rows = await admin.fetch(_LOCKS, classid, objid)
    if not rows:
        say("    pg_locks: (nothing held)")
    for row in rows:
        state = "granted" if row["granted"] else "WAITING"
        say(f"    pg_locks: pid {row['pid']} {row['mode']} {state}")


async def _race(conn: Any, blocker: Any, key: int, use_aiopglock: bool, rng: random.Random) -> bool:
    """One race: cancel a waiter while its blocker releases. True if a lock leaked."""

    async def victim() -> None:
        if use_aiopglock:
            async with advisory(key, db=conn):
                await asyncio.sleep(0)
        else:
            await conn.execute("SELECT pg_advisory_lock($1)", key)
            try:
                await asyncio.sleep(0)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", key)

    await blocker.execute("SELECT pg_advisory_lock($1)", key)
    task = asyncio.create_task(victim())
    for _ in range(rng.randint(0, 30)):
        await asyncio.sleep(0)
    release = asyncio.create_task(blocker.execute("SELECT pg_advisory_unlock($1)", key))
    for _ in range(rng.randint(0, 30)):
        await asyncio.sleep(0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, asyncpg.QueryCanceledError):
        await task
    await release
    # Let the racing connection settle before counting: asyncpg raises
    # CancelledError at once while the cancelled statement may still be
    # running on the server; the next statement waits for it to end.
    await _execute_despite_late_cancel(conn, "SELECT 1")
    held = await blocker.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = $1 AND granted"
        " AND objid::int8 = $2",
        conn.get_server_pid(),
        key,
    )
    if held:
        await _execute_despite_late_cancel(conn, "SELECT pg_advisory_unlock_all()")
    return bool(held)


async def _execute_despite_late_cancel(conn: Any, sql: str) -> None:
    """A CancelRequest meant for an earlier statement may land on this one."""
    for _ in range(3):
        try:
            await conn.execute(sql)
            return
        except asyncpg.QueryCanceledError:
            continue


async def run_demo(dsn: str | None, say: Say) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=2, max_size=6)
    admin = await asyncpg.connect(dsn)
    try:
        version = await admin.fetchval("SHOW server_version")
        say(f"Connected to PostgreSQL {version}.\n")

        say("1. Keys. Text is hashed exactly as django-pglock does (SHA-256, 8 bytes,")
        say("   little-endian), so a Django app and this service share lock names:")
        say(f"   advisory_key('invoice:42') = {advisory_key('invoice:42')}")
        say(f"   advisory_key(42) = 42, advisory_key((1, 2)) = {advisory_key((1, 2))}\n")

        say("2. An exclusive session lock on a pool connection, as another task sees it.")
        async with advisory("invoice:42", db=pool) as lock:
            say(f"   holder: {lock!r}")
            await _show_locks(say, admin, lock.key)
            async with advisory("invoice:42", db=pool, timeout=0) as other:
                say(f"   timeout=0 from the same task re-enters at once: {other!r}")

            async def contender(timeout: float) -> str:
                async with advisory("invoice:42", db=pool, timeout=timeout) as got:
                    return repr(got)

            say(f"   another task, timeout=0: {await asyncio.create_task(contender(0))}")
            started = time.monotonic()
            result = await asyncio.create_task(contender(0.3))
            waited = time.monotonic() - started
            say(f"   another task, timeout=0.3 (a server-side lock_timeout): {result}")
            say(f"   ... gave up after {waited:.2f} s")
        say("   after the block:")
        await _show_locks(say, admin, advisory_key("invoice:42"))
        say("")

        say("3. Shared locks: two readers hold the same key at once.")
        readers = [asyncio.Event() for _ in range(2)]
        done = asyncio.Event()

        async def reader(ready: asyncio.Event) -> None:
            async with advisory("report", db=pool, shared=True):
                ready.set()
                await done.wait()

        tasks = [asyncio.create_task(reader(ev)) for ev in readers]
        for ev in readers:
            await ev.wait()
        await _show_locks(say, admin, advisory_key("report"))
        done.set()
        await asyncio.gather(*tasks)
        say("")

        say("4. A decorator with timeout=0 and Skip: three overlapping calls, one runs.")
        runs: list[int] = []

        @advisory("nightly-report", timeout=0, side_effect=Skip, db=lambda: pool)
        async def nightly(n: int) -> int:
            runs.append(n)
            await asyncio.sleep(0.2)
            return n

        results = await asyncio.gather(nightly(1), nightly(2), nightly(3))
        ran = sum(r is not None for r in results)
        say(f"   results: {results} (ran: {ran}, skipped: {len(results) - ran})\n")

        say("5. A transaction-level lock: held until the transaction ends.")
        async with pool.acquire() as conn:
            async with conn.transaction():
                async with advisory(7, db=conn, xact=True) as lock:
                    say(f"   {lock!r}")
                say("   the block has exited, the transaction has not:")
                await _show_locks(say, admin, lock.key)
            say("   after COMMIT:")
            await _show_locks(say, admin, lock.key)
        say("")

        say("6. Raise: a busy lock under side_effect=Raise is an exception.")
        async with advisory("busy", db=pool):

            async def impatient() -> None:
                async with advisory("busy", db=pool, timeout=0, side_effect=Raise):
                    pass

            try:
                await asyncio.create_task(impatient())
            except LockNotAcquired as exc:
                say(f"   LockNotAcquired: {exc}\n")

        say("7. The hard part: cancel a waiting task at the instant its blocker")
        say("   releases. 300 races each, the same connection kinds and timing:")
        racer = await asyncpg.connect(dsn)
        blocker = await asyncpg.connect(dsn)
        try:
            rng = random.Random(7)
            for label, ours in (("plain asyncpg", False), ("aiopglock", True)):
                leaked = 0
                for _ in range(300):
                    leaked += await _race(racer, blocker, 0x5EED, ours, rng)
                say(f"   {label:14}: {leaked:3} of 300 races left a lock held by a task")
                say("                   that believes it never got it")
        finally:
            await racer.close()
            await blocker.close()
        say("")

        say("8. A lost lock: the holder's backend is terminated mid-block.")
        started = time.monotonic()
        try:
            async with advisory("fragile", db=pool) as lock:
                await admin.execute("SELECT pg_terminate_backend($1)", lock.pid)
                await asyncio.sleep(30)
                say("   (never printed: the block is cancelled)")
        except LockLost as exc:
            say(f"   LockLost after {1000 * (time.monotonic() - started):.0f} ms: {exc}")
        async with advisory("fragile", db=pool) as lock:
            say(f"   the pool recovered: {lock!r}\n")

        say("Done. Every lock above was checked in pg_locks; nothing is left held:")
        left = await admin.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
        say(f"   advisory locks on the server now: {left}")
    finally:
        await admin.close()
        await pool.close()
