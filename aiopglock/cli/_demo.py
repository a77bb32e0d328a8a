"""``aiopglock demo``: a short narrated run of every feature, on a real server."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Callable

import asyncpg

from .._advisory import Raise, Skip, advisory
from .._conntypes import Conn, Pool
from .._errors import LockLost, LockNotAcquired
from .._introspect import LockInfo, locks
from .._keys import AdvisoryKey, advisory_key, lock_ids
from .._locker import Locker
from .._prioritize import prioritize
from .._rows import rows
from .._tables import table
from .._timeouts import lock_timeout, statement_timeout
from .._watchdog import Intervention, Watchdog
from ._demo_coordination import demo_coordination

__all__ = ["run_demo"]

Say = Callable[[str], None]

_LOCKS = """
SELECT l.pid, l.mode, l.granted
FROM pg_catalog.pg_locks l
WHERE l.locktype = 'advisory' AND l.classid::int8 = $1 AND l.objid::int8 = $2
ORDER BY l.granted DESC, l.pid
"""


async def _show_locks(say: Say, admin: Conn, key: AdvisoryKey) -> None:
    classid, objid, _ = lock_ids(key)
    rows = await admin.fetch(_LOCKS, classid, objid)
    if not rows:
        say("    pg_locks: (nothing held)")
    for row in rows:
        state = "granted" if row["granted"] else "WAITING"
        say(f"    pg_locks: pid {row['pid']} {row['mode']} {state}")


async def _race(
    conn: Conn, blocker: Conn, key: int, use_aiopglock: bool, rng: random.Random
) -> bool:
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


async def _execute_despite_late_cancel(conn: Conn, sql: str) -> None:
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

        await _demo_prioritizer(say, pool, dsn)
        await _demo_watchdog(say, pool, dsn)
        await _demo_tables_rows_timeouts(say, pool, admin)
        await _demo_locker(say, pool, admin)
        await _demo_introspection(say, pool, admin)
        await _demo_update_or_create(say, pool, admin)
        await demo_coordination(say, pool, admin)

        say("Done. Every lock above was checked in pg_locks; nothing is left held:")
        left = await admin.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
        say(f"   advisory locks on the server now: {left}")
    finally:
        await admin.close()
        await pool.close()


async def _demo_prioritizer(say: Say, pool: Pool, dsn: str | None) -> None:
    say("9. The prioritizer: a forgotten session holds the lock a migration needs.")
    straggler = await asyncpg.connect(dsn, server_settings={"application_name": "straggler"})
    try:
        await straggler.execute("SELECT pg_advisory_lock($1)", advisory_key("migrations"))
        say(f"   backend {straggler.get_server_pid()} ('straggler') holds 'migrations', idle")
        started = time.monotonic()
        async with (
            prioritize(via=pool) as prioritizer,
            advisory("migrations", db=pool, timeout=10) as lock,
        ):
            waited = 1000 * (time.monotonic() - started)
            say(f"   inside prioritize(): the migration waited {waited:.0f} ms, then {lock!r}")
        say(f"   prioritizer.signalled = {prioritizer.signalled} (terminated)")
        say("   (tables and rows too: pg_blocking_pids sees every lock type)\n")
    finally:
        straggler.terminate()


async def _demo_watchdog(say: Say, pool: Pool, dsn: str | None) -> None:
    say("10. The watchdog: sessions of 'api' may wait 0.3 s for a lock, no longer.")
    key = advisory_key("stuck-job")
    stuck = await asyncpg.connect(dsn, server_settings={"application_name": "stuck-job"})
    api = await asyncpg.connect(dsn, server_settings={"application_name": "api"})
    try:
        await stuck.execute("SELECT pg_advisory_lock($1)", key)
        reported = asyncio.Event()

        def report(action: Intervention) -> None:
            reported.set()
            waited = action.wait_duration.total_seconds() if action.wait_duration else 0.0
            verb = "would terminate" if action.dry_run else "terminated"
            say(
                f"   callback: {verb} backend {action.blocker.pid} "
                f"({action.blocker.application_name!r}), which held up "
                f"{list(action.waiter_pids)} for {waited:.2f} s"
            )

        for dry_run in (True, False):
            watchdog = Watchdog(
                pool,
                max_wait=0.3,
                interval=0.05,
                application_name="api",
                dry_run=dry_run,
                callback=report,
            )
            say(f"   dry_run={dry_run}:")
            async with watchdog:
                if dry_run:
                    waiting = asyncio.ensure_future(api.execute("SELECT pg_advisory_lock($1)", key))
                    await reported.wait()
                    say(f"   ... and the api session still waits: {not waiting.done()}")
                else:
                    await waiting
                    say("   the api session got its lock")
        await api.execute("SELECT pg_advisory_unlock_all()")
        say("")
    finally:
        stuck.terminate()
        api.terminate()


async def _demo_tables_rows_timeouts(say: Say, pool: Pool, admin: Conn) -> None:
    suffix = uuid.uuid4().hex[:8]
    ledger, jobs = f"demo_ledger_{suffix}", f"demo_jobs_{suffix}"
    await admin.execute(
        f'CREATE TABLE "{ledger}" (id serial PRIMARY KEY, amount int);'
        f'CREATE TABLE "{jobs}" (id int PRIMARY KEY, done_by text);'
        f'INSERT INTO "{jobs}" (id) SELECT generate_series(1, 6)'
    )
    try:
        say("11. A table lock: LOCK TABLE in a transaction aiopglock opens and commits.")
        async with table(ledger, db=pool, mode="share row exclusive") as tlock:
            await tlock.connection.execute(f'INSERT INTO "{ledger}" (amount) VALUES (100)')
            say(f"   {tlock!r}")
            held = await admin.fetch(
                "SELECT pid, mode FROM pg_locks WHERE relation = $1::regclass",
                f'"{ledger}"',
            )
            for row in held:
                say(f"    pg_locks: pid {row['pid']} {row['mode']} on {ledger}")

            async def impatient() -> str:
                async with table(ledger, db=pool, mode="exclusive", timeout=0) as other:
                    return repr(other)

            say(f"   another task, timeout=0 (NOWAIT): {await asyncio.create_task(impatient())}")
        rows_now = await admin.fetchval(f'SELECT count(*) FROM "{ledger}"')
        say(f"   after the block: committed ({rows_now} row), no lock left\n")

        say("12. Row locks: a job queue. Three workers claim jobs with SKIP LOCKED;")
        say("    each gets different rows, none waits for another.")
        claim = rows(
            f'SELECT id FROM "{jobs}" WHERE done_by IS NULL ORDER BY id LIMIT 2',
            db=pool,
            skip_locked=True,
        )
        all_claimed = asyncio.Event()
        claimed: list[list[int]] = []

        async def worker(name: str) -> None:
            async with claim as batch:
                ids = [job["id"] for job in batch]
                claimed.append(ids)
                say(f"   {name} claimed {ids}")
                if len(claimed) == 3:
                    all_claimed.set()
                await all_claimed.wait()  # all three hold their rows at once
                await batch.connection.execute(
                    f'UPDATE "{jobs}" SET done_by = $1 WHERE id = ANY($2::int[])', name, ids
                )

        await asyncio.gather(*(worker(f"worker-{n}") for n in range(3)))
        left = await admin.fetchval(f'SELECT count(*) FROM "{jobs}" WHERE done_by IS NULL')
        say(f"   jobs left: {left}\n")

        say("13. Timeout scopes: a setting for one block, the previous value restored.")
        async with pool.acquire() as conn:
            before = await conn.fetchval("SHOW statement_timeout")
            try:
                async with statement_timeout(0.2, db=conn):
                    inside = await conn.fetchval("SHOW statement_timeout")
                    await conn.execute("SELECT pg_sleep(5)")
            except asyncpg.QueryCanceledError:
                say(f"   statement_timeout {before} -> {inside}: pg_sleep(5) cancelled")
            say(f"   after the block: {await conn.fetchval('SHOW statement_timeout')}")
            async with conn.transaction(), lock_timeout(2, db=conn):
                say(
                    f"   in a transaction, set_config(..., true): lock_timeout "
                    f"{await conn.fetchval('SHOW lock_timeout')}"
                )
            say(f"   after it: lock_timeout {await conn.fetchval('SHOW lock_timeout')}\n")
    finally:
        await admin.execute(f'DROP TABLE IF EXISTS "{ledger}", "{jobs}"')


async def _demo_locker(say: Say, pool: Pool, admin: Conn) -> None:
    say("14. Locker: 1,000 tasks hold 1,000 advisory locks at once. With advisory(db=pool)")
    say("    each would pin a connection of its own; a Locker multiplexes them onto one,")
    say("    its try-locks and unlocks batched into a round trip each.")
    count = 1000
    first = 0x5EED0000
    all_in = asyncio.Event()
    release = asyncio.Event()
    held = 0

    async def worker(locker: Locker, key: int) -> None:
        nonlocal held
        async with locker.advisory(key):
            held += 1
            if held == count:
                all_in.set()
            await release.wait()

    async with Locker(pool) as locker:
        started = time.monotonic()
        tasks = [asyncio.create_task(worker(locker, first + i)) for i in range(count)]
        await all_in.wait()
        took = time.monotonic() - started
        row = await admin.fetchrow(
            "SELECT count(*) AS locks, count(DISTINCT pid) AS sessions FROM pg_locks "
            "WHERE locktype = 'advisory' AND granted AND classid = 0 AND objsubid = 1 "
            "AND objid::int8 BETWEEN $1 AND $2",
            first,
            first + count - 1,
        )
        assert row is not None  # an aggregate without GROUP BY: one row, always
        say(f"    all held after {took:.2f} s: pg_locks shows {row['locks']} locks")
        say(f"    on {row['sessions']} server session(s)")
        release.set()
        await asyncio.gather(*tasks)
    left = await admin.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = 0 "
        "AND objsubid = 1 AND objid::int8 BETWEEN $1 AND $2",
        first,
        first + count - 1,
    )
    say(f"    after the Locker exits: {left} left\n")


async def _demo_introspection(say: Say, pool: Pool, admin: Conn) -> None:
    say("15. Introspection: aiopglock.locks() sees advisory and row waits with their")
    say("    blockers (django-pglock's queries join pg_class and miss both).")
    key = advisory_key("demo:introspection")
    holding = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> None:
        async with advisory("demo:introspection", db=pool):
            holding.set()
            await release.wait()

    async def waiter() -> None:
        async with advisory("demo:introspection", db=pool):
            pass

    tasks = [asyncio.create_task(holder())]
    await holding.wait()
    tasks.append(asyncio.create_task(waiter()))
    waiting: list[LockInfo] = []
    while not waiting:
        waiting = [info for info in await locks(admin, blocked=True) if info.key == key]
        await asyncio.sleep(0.01)
    info = waiting[0]
    say(f"    pid {info.pid} waits for {info.locktype} key {info.key} ({info.mode}),")
    say(f"    blocked by {info.blocking_pids}, for {info.wait_duration}")
    say(f"    its query: {info.query}")
    say(f"    the key's name, read back from that comment: {info.name!r}")
    release.set()
    await asyncio.gather(*tasks)
    say("    the holder's block ends, the waiter gets the lock and exits.")
    say("    The same from a shell: aiopglock locks --blocked (--json, --watch 1)\n")


async def _demo_update_or_create(say: Say, pool: Pool, admin: Conn) -> None:
    say("16. Update-or-create without duplicates. Five workers each run 'SELECT ... FOR")
    say("    UPDATE; INSERT if nothing was found, else UPDATE' for one name, in a table")
    say("    with no unique constraint on it (docs/recipes.md).")
    visits = f"demo_visits_{uuid.uuid4().hex[:8]}"
    await admin.execute(f'CREATE TABLE "{visits}" (name text NOT NULL, n int NOT NULL)')
    select = f'SELECT n FROM "{visits}" WHERE name = $1'
    insert = f'INSERT INTO "{visits}" (name, n) VALUES ($1, 1)'
    update = f'UPDATE "{visits}" SET n = n + 1 WHERE name = $1'
    workers = 5
    try:
        looked = 0
        everyone_looked = asyncio.Event()

        async def for_update_alone() -> None:
            nonlocal looked
            async with rows(select, "home", db=pool) as found:
                looked += 1
                if looked == workers:
                    everyone_looked.set()
                await everyone_looked.wait()  # every worker has looked before any writes
                await found.connection.execute(update if found.records else insert, "home")

        await asyncio.gather(*(for_update_alone() for _ in range(workers)))
        made = await admin.fetchval(f'SELECT count(*) FROM "{visits}" WHERE name = $1', "home")
        say(f"    FOR UPDATE alone: {made} rows for 'home'. While the row does not exist,")
        say("    FOR UPDATE has nothing to lock, so no worker waits and every one inserts.")

        say("    With advisory(natural key, db=conn, xact=True) first in the same transaction:")
        key = f"{visits}:about"

        async def advisory_first() -> None:
            async with (
                pool.acquire() as conn,
                conn.transaction(),
                advisory(key, db=conn, xact=True),
                rows(select, "about", db=conn) as found,
            ):
                if not found.records:  # the first one in: the others queue on the key
                    waiting: list[LockInfo] = []
                    while len(waiting) < workers - 1:
                        waiting = await locks(admin, key=key, blocked=True)
                        await asyncio.sleep(0.01)
                    await _show_locks(say, admin, advisory_key(key))
                await conn.execute(update if found.records else insert, "about")

        await asyncio.gather(*(advisory_first() for _ in range(workers)))
        counted = await admin.fetchrow(
            f'SELECT count(*), sum(n) FROM "{visits}" WHERE name = $1', "about"
        )
        assert counted is not None  # an aggregate always returns one row
        made, total = counted
        say(f"    {made} row for 'about', n = {total}: the COMMIT releases the key after")
        say("    the new row is visible, and the next worker's SELECT finds it.\n")
    finally:
        await admin.execute(f'DROP TABLE IF EXISTS "{visits}"')
