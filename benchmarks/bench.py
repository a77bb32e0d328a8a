"""Side-by-side lock throughput, in one run and in alternating rounds.

Contenders (each runs every workload it can, with 10 connections):

- ``asyncpg by hand``: the baseline, ``pool.acquire()`` + ``pg_advisory_lock``
  + ``pg_advisory_unlock`` (and the pool's reset on release);
- ``aiopglock.advisory``: ``aiopglock.advisory(key, db=pool)``;
- ``aiopglock.Locker``: ``locker.advisory(key)`` on ``Locker(pool)``;
- ``django-pglock``: ``pglock.advisory(key)`` as a sync Django app runs it:
  ``settings.configure()`` with the ``postgresql`` backend (psycopg2, or
  psycopg 3 when Django finds it), persistent connections, and every task a
  job of a pool of 10 threads (so one connection per thread);
- ``sqlalchemy-dlock``: its asyncio API, ``create_async_sadlock(conn, key)``
  on an ``AsyncConnection`` of a ``postgresql+asyncpg`` engine (pool of 10),
  as its README shows it (``async with engine.connect()`` around the lock);
- ``redis-py Lock``: redis-py's asyncio ``Lock`` (``SET NX PX`` and a Lua
  release, a blocking pool of 10 connections), when Redis answers on
  127.0.0.1:6379.

A peer that is not installed (``pip install -e '.[bench]'``) or a Redis that
does not answer is skipped with the reason printed. Then the limits of the
machine, with nothing of aiopglock in them: one connection running
``SELECT pg_advisory_unlock($1), pg_advisory_lock($2)`` back to back (one
round trip per cycle); try-lock + unlock of 1,000 keys batched over
``unnest()`` on one connection; the asyncio floor (a future per acquire and
per release resolved by a batcher task, no I/O); ``aiopglock.advisory_many``
of 1,000 keys beside the batched limit (skipped while it does not exist).
Last, the Python memory per held lock (tracemalloc) for 10,000 locks held on
a Locker and 10,000 ``advisory(db=conn)`` holds on one connection, and the
leader failover time: two ``aiopglock.Leader`` on one key, the leader's
backend terminated, the time until the other one's term begins (median of
``FAILOVER_ROUNDS``; ``--skip failover`` leaves it out).

Every contender runs every workload in turn, round after round (the order
reversed every other round), so that the ratios survive a noisy machine; the
table shows each contender's median rate as a ratio of the baseline's, with
absolute rates as context. Progress goes to stderr; ``--json`` gets
everything, and ``benchmarks/table.py JSON`` renders the README's table.

    python benchmarks/bench.py [--dsn DSN] [--rounds 3] [--loop uvloop]
                               [--json PATH] [--only NAME ...] [--skip NAME ...]

Without a DSN (``--dsn`` or ``DATABASE_URL``) an embedded PostgreSQL is used.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import functools
import gc
import importlib.metadata
import json
import logging
import os
import platform
import statistics
import sys
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import asyncpg

import aiopglock

POOL_SIZE = 10
#: Per run, so that two runs (or other clients) on one server neither count
#: each other's connections nor contend for each other's keys.
APPLICATION_NAME = f"aiopglock-bench-{os.getpid()}"
#: Every key of a run is offset by this (random, well inside bigint).
KEY_BASE = int.from_bytes(os.urandom(4), "big") << 24
SEQUENTIAL_KEY = KEY_BASE + 1
HOT_KEY = KEY_BASE + 7
DISTINCT_KEYS = KEY_BASE + 1000
HELD_KEYS = KEY_BASE + 100_000
REDIS_URL = "redis://127.0.0.1:6379/0"
#: Keys of the limit rows and the memory rows (apart from the workloads').
LIMIT_KEY = KEY_BASE + 424_242
BATCH = 1000
HELD_FOR_MEMORY = 10_000
SEMAPHORE_WAKEUPS = 50
SERVER_NAMES_CYCLES = 2000
FAILOVER_KEY = KEY_BASE + 525_252
#: Failovers measured per run (the median is reported).
FAILOVER_ROUNDS = 9
FAILOVER = "leader failover"

Inside = Callable[[], Awaitable[None]] | None
Cycle = Callable[[int, Inside], Awaitable[None]]

BASELINE = "asyncpg by hand"
ADVISORY = "aiopglock.advisory"
LOCKER = "aiopglock.Locker"
DJANGO = "django-pglock"
SQLALCHEMY = "sqlalchemy-dlock"
REDIS = "redis-py Lock"


class Progress:
    """Plain progress lines on stderr, with the time since the start."""

    def __init__(self, quiet: bool = False) -> None:
        self.started = time.perf_counter()
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            elapsed = time.perf_counter() - self.started
            print(f"[{elapsed // 60:02.0f}:{elapsed % 60:04.1f}] {message}", file=sys.stderr)


# --------------------------------------------------------------------------- contenders


class Threaded:
    """A sync contender: ``cycle(key)`` runs in a thread of a pool of
    ``POOL_SIZE`` threads, every task one job of that pool (as a threaded
    web server runs a view); the event loop only waits for the jobs.
    ``close()`` runs once after the threads are gone."""

    def __init__(self, cycle: Callable[[int], None], close: Callable[[], None]) -> None:
        self.cycle = cycle
        self.close = close
        self.executor = concurrent.futures.ThreadPoolExecutor(POOL_SIZE, thread_name_prefix="bench")

    async def jobs(self, jobs: list[Callable[[], None]]) -> None:
        futures = [self.executor.submit(job) for job in jobs]
        # One wake-up of the loop for all of them, not one per job.
        await asyncio.get_running_loop().run_in_executor(None, concurrent.futures.wait, futures)
        for future in futures:
            future.result()

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.close()


Runner = Cycle | Threaded
Contender = Callable[[Any], contextlib.AbstractAsyncContextManager[Runner]]


@contextlib.asynccontextmanager
async def by_hand(pool: Any) -> AsyncIterator[Runner]:
    async def cycle(key: int, inside: Inside) -> None:
        async with pool.acquire() as conn:
            await conn.fetchval("SELECT pg_advisory_lock($1)", key)
            try:
                if inside is not None:
                    await inside()
            finally:
                await conn.fetchval("SELECT pg_advisory_unlock($1)", key)

    yield cycle


@contextlib.asynccontextmanager
async def with_advisory(pool: Any) -> AsyncIterator[Runner]:
    async def cycle(key: int, inside: Inside) -> None:
        async with aiopglock.advisory(key, db=pool):
            if inside is not None:
                await inside()

    yield cycle


@contextlib.asynccontextmanager
async def with_locker(pool: Any) -> AsyncIterator[Runner]:
    async with aiopglock.Locker(pool) as locker:

        async def cycle(key: int, inside: Inside) -> None:
            async with locker.advisory(key):
                if inside is not None:
                    await inside()

        yield cycle


def _django_settings(dsn: str) -> dict[str, Any]:
    url = urlsplit(dsn)
    options: dict[str, Any] = dict(parse_qsl(url.query))
    options["application_name"] = APPLICATION_NAME
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(url.path.lstrip("/")) or "postgres",
        "USER": unquote(url.username or ""),
        "PASSWORD": unquote(url.password or ""),
        "HOST": options.pop("host", url.hostname or ""),
        "PORT": str(url.port or options.pop("port", "")),
        "CONN_MAX_AGE": None,  # persistent: one connection per thread
        "OPTIONS": options,
    }


async def django_contender(dsn: str) -> tuple[Contender | None, str]:
    """django-pglock in threads, or None and why not."""
    try:
        import django
        import pglock
        from django.conf import settings
        from django.db import connections
    except ImportError as exc:
        return None, f"not installed ({exc.name}): pip install -e '.[bench]'"
    if not settings.configured:
        settings.configure(
            DATABASES={"default": _django_settings(dsn)},
            INSTALLED_APPS=["pgactivity", "pglock"],
            USE_TZ=True,
        )
        django.setup()

    def cycle(key: int) -> None:
        with pglock.advisory(key):
            pass

    def probe() -> str:
        try:
            cycle(LIMIT_KEY)
            return str(connections["default"].Database.__name__)
        finally:
            connections.close_all()

    try:
        driver = await asyncio.to_thread(probe)
    except Exception as exc:
        return None, f"cannot connect: {exc!r}"

    @contextlib.asynccontextmanager
    async def with_django(pool: Any) -> AsyncIterator[Runner]:
        # Django's connections are per thread: note each thread's, and close
        # them all once the threads are gone (else every round would leave
        # its 10 connections open on the server).
        opened: list[Any] = []
        mine = threading.local()

        def tracked(key: int) -> None:
            if not getattr(mine, "noted", False):
                mine.noted = True
                opened.append(connections["default"])  # list.append is atomic
            cycle(key)

        def close() -> None:
            for wrapper in opened:
                wrapper.inc_thread_sharing()  # closed from another thread
                wrapper.close()

        runner = Threaded(tracked, close)
        try:
            yield runner
        finally:
            await asyncio.to_thread(runner.shutdown)

    return with_django, f"Django {django.get_version()} on {driver}"


async def sqlalchemy_contender(dsn: str) -> tuple[Contender | None, str]:
    """sqlalchemy-dlock's asyncio API on asyncpg, or None and why not."""
    try:
        from sqlalchemy.ext.asyncio import create_async_engine
        from sqlalchemy_dlock import create_async_sadlock
    except ImportError as exc:
        return None, f"not installed ({exc.name}): pip install -e '.[bench]'"
    scheme, rest = dsn.split("://", 1)
    if scheme not in ("postgres", "postgresql"):
        return None, f"cannot use the DSN scheme {scheme!r}"

    def engine() -> Any:
        return create_async_engine(
            f"postgresql+asyncpg://{rest}",
            pool_size=POOL_SIZE,
            max_overflow=0,
            connect_args={"server_settings": {"application_name": APPLICATION_NAME}},
        )

    probe = engine()
    try:
        async with probe.connect() as conn, create_async_sadlock(conn, LIMIT_KEY):
            pass
    except Exception as exc:
        return None, f"cannot connect: {exc!r}"
    finally:
        await probe.dispose()

    @contextlib.asynccontextmanager
    async def with_sqlalchemy(pool: Any) -> AsyncIterator[Runner]:
        db = engine()
        try:

            async def cycle(key: int, inside: Inside) -> None:
                async with db.connect() as conn, create_async_sadlock(conn, key):
                    if inside is not None:
                        await inside()

            yield cycle
        finally:
            await db.dispose()

    return with_sqlalchemy, "asyncio API (create_async_sadlock) on asyncpg"


async def redis_contender() -> tuple[Contender | None, str]:
    """redis-py's asyncio Lock, or None and why not."""
    try:
        import redis.asyncio as aioredis
    except ImportError:
        return None, "redis-py not installed: pip install -e '.[bench]'"
    client = aioredis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        await client.ping()
    except Exception as exc:
        return None, f"no Redis answers on {REDIS_URL} ({type(exc).__name__}: {exc})"
    finally:
        await client.aclose()

    @contextlib.asynccontextmanager
    async def with_redis(pool: Any) -> AsyncIterator[Runner]:
        connections = aioredis.BlockingConnectionPool.from_url(
            REDIS_URL, max_connections=POOL_SIZE, timeout=None
        )
        client = aioredis.Redis(connection_pool=connections)
        try:

            async def cycle(key: int, inside: Inside) -> None:
                # Polls every millisecond while busy (the default is 100 ms).
                lock = client.lock(f"aiopglock-bench:{key}", timeout=60, sleep=0.001)
                await lock.acquire()
                try:
                    if inside is not None:
                        await inside()
                finally:
                    await lock.release()

            yield cycle
        finally:
            await client.aclose()
            await connections.aclose()

    return with_redis, f"redis-py {importlib.metadata.version('redis')}, asyncio Lock"


# --------------------------------------------------------------------------- workloads


async def sequential(run: Runner, n: int) -> int:
    if isinstance(run, Threaded):
        cycle = run.cycle

        def job() -> None:
            for _ in range(n):
                cycle(SEQUENTIAL_KEY)

        await run.jobs([job])
        return n
    for _ in range(n):
        await run(SEQUENTIAL_KEY, None)
    return n


async def distinct_keys(run: Runner, n: int) -> int:
    if isinstance(run, Threaded):
        cycle = run.cycle
        await run.jobs([functools.partial(cycle, DISTINCT_KEYS + i) for i in range(n)])
        return n
    await asyncio.gather(*(run(DISTINCT_KEYS + i, None) for i in range(n)))
    return n


async def hot_key(run: Runner, n: int) -> int:
    per_task = n // 50
    if isinstance(run, Threaded):
        cycle = run.cycle

        def job() -> None:
            for _ in range(per_task):
                cycle(HOT_KEY)

        # 50 jobs on the pool of 10 threads: 10 of them contend at a time.
        await run.jobs([job] * 50)
        return 50 * per_task

    async def worker() -> None:
        for _ in range(per_task):
            await run(HOT_KEY, None)

    await asyncio.gather(*(worker() for _ in range(50)))
    return 50 * per_task


class Held:
    """``n`` locks held at once: every task waits inside its lock until all
    are in; the server connections holding them are counted meanwhile."""

    def __init__(self, admin: asyncpg.Connection) -> None:
        self.admin = admin
        self.connections: int | None = None

    async def __call__(self, run: Runner, n: int) -> int:
        assert not isinstance(run, Threaded)
        count = 0
        all_in = asyncio.Event()

        async def inside() -> None:
            nonlocal count
            count += 1
            if count == n:
                all_in.set()
            await all_in.wait()
            if count == n:
                count += 1  # the first one out counts the connections
                self.connections = await self.admin.fetchval(
                    "SELECT count(DISTINCT l.pid) FROM pg_locks AS l "
                    "JOIN pg_stat_activity AS a USING (pid) "
                    "WHERE l.locktype = 'advisory' AND a.application_name = $1",
                    APPLICATION_NAME,
                )

        await asyncio.gather(*(run(HELD_KEYS + i, inside) for i in range(n)))
        return n


WORKLOADS: dict[str, tuple[str, int]] = {
    "sequential cycles (1 task)": ("sequential", 2000),
    "1,000 tasks, distinct keys, pool of 10": ("distinct", 1000),
    "50 tasks, one hot key, pool of 10": ("hot", 1000),
    "10,000 locks held at once": ("held", 10_000),
}

#: Contenders that pin one connection per held lock cannot hold 10,000 locks
#: with a pool of 10: they sit that workload out.
PINNING = {BASELINE, ADVISORY, DJANGO, SQLALCHEMY}


# --------------------------------------------------------------------------- limits


async def limit_one_round_trip(dsn: str, n: int) -> float:
    """One connection, ``SELECT pg_advisory_unlock($1), pg_advisory_lock($2)``
    back to back: a real unlock and a real lock in one round trip."""
    conn = await asyncpg.connect(dsn, server_settings={"application_name": APPLICATION_NAME})
    try:
        statement = await conn.prepare("SELECT pg_advisory_unlock($1), pg_advisory_lock($2)")
        # Two keys in turn, so that each statement really releases one and
        # takes the other whatever the order of evaluation.
        held, other = LIMIT_KEY, LIMIT_KEY + 1
        await conn.execute(f"SELECT pg_advisory_lock({held})")
        started = time.perf_counter()
        for _ in range(n):
            unlocked, _ = await statement.fetchrow(held, other)
            if not unlocked:
                raise RuntimeError("one-round-trip limit: the unlock found nothing held")
            held, other = other, held
        elapsed = time.perf_counter() - started
        if not await conn.fetchval("SELECT pg_advisory_unlock($1)", held):
            raise RuntimeError("one-round-trip limit: the last key was not held")
        return n / elapsed
    finally:
        await conn.close()


async def limit_unnest(dsn: str, n: int) -> float:
    """Try-lock then unlock of ``BATCH`` keys at a time, each batch one
    statement over ``unnest()`` on one connection: locks per second."""
    conn = await asyncpg.connect(dsn, server_settings={"application_name": APPLICATION_NAME})
    try:
        lock = await conn.prepare(
            "SELECT count(*) FILTER (WHERE pg_try_advisory_lock(k)) FROM unnest($1::bigint[]) AS k"
        )
        unlock = await conn.prepare(
            "SELECT count(*) FILTER (WHERE pg_advisory_unlock(k)) FROM unnest($1::bigint[]) AS k"
        )
        keys = list(range(LIMIT_KEY, LIMIT_KEY + BATCH))
        batches = max(n // BATCH, 1)
        started = time.perf_counter()
        for _ in range(batches):
            got = await lock.fetchval(keys)
            released = await unlock.fetchval(keys)
            if got != BATCH or released != BATCH:
                raise RuntimeError(f"batched limit: {got} locked, {released} unlocked")
        return batches * BATCH / (time.perf_counter() - started)
    finally:
        await conn.close()


async def floor_asyncio(n: int) -> float:
    """The event loop's floor for the fan-out, in the shape of the distinct
    keys workload: 1,000 tasks at a time (``n`` cycles in all), each awaiting
    a future for its acquire and one for its release, resolved in batches by
    one batcher task, as a Locker's background task would; no I/O."""
    loop = asyncio.get_running_loop()
    pending: list[asyncio.Future[None]] = []
    wake = asyncio.Event()
    stop = False

    async def batcher() -> None:
        nonlocal pending
        while not stop:
            await wake.wait()
            wake.clear()
            batch, pending = pending, []
            for future in batch:
                if not future.done():
                    future.set_result(None)

    async def request() -> None:
        future = loop.create_future()
        pending.append(future)
        wake.set()
        await future

    async def cycle() -> None:
        await request()  # acquire
        await request()  # release

    task = asyncio.create_task(batcher())
    try:
        tasks = min(n, 1000)
        batches = max(n // tasks, 1)
        started = time.perf_counter()
        for _ in range(batches):
            await asyncio.gather(*(cycle() for _ in range(tasks)))
        return batches * tasks / (time.perf_counter() - started)
    finally:
        stop = True
        wake.set()
        await task


async def with_advisory_many(pool: Any, n: int) -> float:
    """``aiopglock.advisory_many`` of ``BATCH`` keys on the pool, taken and
    released again and again: locks per second (issue 12)."""
    many = vars(aiopglock)["advisory_many"]
    keys = list(range(LIMIT_KEY, LIMIT_KEY + BATCH))
    batches = max(n // BATCH, 1)
    started = time.perf_counter()
    for _ in range(batches):
        async with many(keys, db=pool) as handle:
            if not handle:
                raise RuntimeError("advisory_many: not acquired")
    return batches * BATCH / (time.perf_counter() - started)


async def semaphore_wakeup(pool: Any, n: int) -> dict[str, Any]:
    """Release -> waiter holds the slot, in ms, for ``aiopglock.semaphore``
    (issue 12): a holder and a waiter on the pool, limit 1, ``n`` times; the
    waiter is given 20 ms to settle into its wait before each release."""
    sem = aiopglock.semaphore(f"bench-wakeup-{KEY_BASE}", 1, db=pool)
    delays: list[float] = []

    async def wait(released: list[float], got: asyncio.Event) -> None:
        async with sem:
            delays.append((time.perf_counter() - released[0]) * 1000)
            got.set()

    for _ in range(n):
        released: list[float] = []
        got = asyncio.Event()
        if not await sem.__aenter__():
            raise RuntimeError("semaphore: not acquired")
        task = asyncio.ensure_future(wait(released, got))
        await asyncio.sleep(0.02)
        released.append(time.perf_counter())
        await sem.__aexit__(None, None, None)
        await got.wait()
        await task
    ordered = sorted(delays)
    return {
        "unit": "ms",
        "what": "release -> waiter holds the slot (LISTEN/NOTIFY), limit 1, on the pool",
        "median": statistics.median(ordered),
        "p90": ordered[int(len(ordered) * 0.9) - 1] if len(ordered) >= 10 else ordered[-1],
        "max": ordered[-1],
        "n": n,
    }


# --------------------------------------------------------------------------- failover

_FAILOVER_LOCKS = (
    "SELECT pid, granted FROM pg_catalog.pg_locks WHERE locktype = 'advisory' "
    "AND classid::int8 = $1 AND objid::int8 = $2 AND objsubid = 1"
)


async def leader_failover(dsn: str, admin: asyncpg.Connection, rounds: int) -> list[float]:
    """Seconds from ``pg_terminate_backend`` of the leader's backend to the
    start of the next term, ``rounds`` times: two ``aiopglock.Leader`` on one
    key, the follower waiting on the server (a blocked ``pg_advisory_lock``),
    the deposed one campaigning again after its ``retry_interval``."""
    pool = await asyncpg.create_pool(
        dsn, min_size=2, max_size=4, server_settings={"application_name": APPLICATION_NAME}
    )
    terms: asyncio.Queue[float] = asyncio.Queue()
    ids = (FAILOVER_KEY >> 32, FAILOVER_KEY & 0xFFFF_FFFF)

    async def term() -> None:
        terms.put_nowait(time.perf_counter())
        await asyncio.Event().wait()  # leads until deposed

    leaders = [aiopglock.Leader(FAILOVER_KEY, db=pool, retry_interval=0.01) for _ in range(2)]
    # Every round loses a lock on purpose: keep its warnings off the progress lines.
    log = logging.getLogger("aiopglock")
    level = log.level
    log.setLevel(logging.CRITICAL)
    tasks = [asyncio.ensure_future(leader.run(term)) for leader in leaders]
    try:
        await asyncio.wait_for(terms.get(), 30)
        times = []
        for _ in range(rounds):
            deadline = time.monotonic() + 30
            while True:  # the follower must be waiting before the leader dies
                rows = await admin.fetch(_FAILOVER_LOCKS, *ids)
                held = [row["pid"] for row in rows if row["granted"]]
                if held and any(not row["granted"] for row in rows):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("leader failover: no follower waiting")
                await asyncio.sleep(0.005)
            started = time.perf_counter()
            await admin.fetchval("SELECT pg_terminate_backend($1)", held[0])
            times.append(await asyncio.wait_for(terms.get(), 30) - started)
        return times
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await pool.close()
        log.setLevel(level)


async def measure_failover(run: Run, admin: asyncpg.Connection) -> dict[str, Any]:
    if not run.wanted(FAILOVER):
        return {"skipped": "left out (--only/--skip)"}
    times = await leader_failover(run.dsn, admin, FAILOVER_ROUNDS)
    median = statistics.median(times)
    run.progress(f"{FAILOVER}: median {median * 1000:.1f} ms over {len(times)}")
    return {
        "what": "pg_terminate_backend of the leader's backend to the next term's start",
        "median_ms": median * 1000,
        "ms": [t * 1000 for t in times],
    }


# --------------------------------------------------------------------------- memory


async def memory_per_lock(
    dsn: str, pool: Any, admin: asyncpg.Connection, progress: Progress
) -> dict[str, Any]:
    """Python memory (tracemalloc) per held lock, with ``HELD_FOR_MEMORY``
    locks held by one task through an exit stack, and the server's count of
    them checked meanwhile. The exit stack's own bytes per entry count too
    (conservative); they are measured apart, with ``nullcontext()`` entries,
    as ``exit_stack_bytes_per_entry``."""
    results: dict[str, Any] = {}

    async def traced(enter: Callable[[int], contextlib.AbstractAsyncContextManager[Any]]) -> int:
        async with contextlib.AsyncExitStack() as stack:
            gc.collect()
            before = tracemalloc.get_traced_memory()[0]
            for i in range(HELD_FOR_MEMORY):
                await stack.enter_async_context(enter(LIMIT_KEY + i))
            gc.collect()
            return tracemalloc.get_traced_memory()[0] - before

    tracemalloc.start()
    try:
        stack_bytes = await traced(lambda key: contextlib.nullcontext()) / HELD_FOR_MEMORY
    finally:
        tracemalloc.stop()

    async def hold(
        name: str, enter: Callable[[int], contextlib.AbstractAsyncContextManager[Any]]
    ) -> None:
        async with enter(LIMIT_KEY - 1):  # warm up: connections, statements, tasks
            pass
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            async with contextlib.AsyncExitStack() as stack:
                for i in range(HELD_FOR_MEMORY):
                    await stack.enter_async_context(enter(LIMIT_KEY + i))
                gc.collect()
                during = tracemalloc.get_traced_memory()[0]
                on_server = await admin.fetchval(
                    "SELECT count(*) FROM pg_locks AS l JOIN pg_stat_activity AS a USING (pid) "
                    "WHERE l.locktype = 'advisory' AND l.granted AND a.application_name = $1",
                    APPLICATION_NAME,
                )
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        per_lock = (during - before) / HELD_FOR_MEMORY
        results[name] = {
            "locks": HELD_FOR_MEMORY,
            "held_on_server": on_server,
            "bytes_per_lock": per_lock,
            "total_bytes": during - before,
            "left_after_release_bytes": after - before,
            "exit_stack_bytes_per_entry": stack_bytes,
        }
        progress(f"memory · {name}: {per_lock:,.0f} B per held lock, {on_server} on the server")

    async def attempt(name: str, body: Callable[[str], Awaitable[None]]) -> None:
        try:
            await body(name)
        except (asyncpg.PostgresError, aiopglock.Error) as exc:
            # Typically a lock table too small for 10,000 more locks on a
            # busy shared server (max_locks_per_transaction): say so, go on.
            results[name] = {"failed": f"{type(exc).__name__}: {exc}"}
            progress(f"memory · {name}: failed, {results[name]['failed']}")

    async def on_locker(name: str) -> None:
        async with aiopglock.Locker(pool) as locker:
            await hold(name, lambda key: locker.advisory(key))

    async def on_connection(name: str) -> None:
        conn = await asyncpg.connect(dsn, server_settings={"application_name": APPLICATION_NAME})
        try:
            await hold(name, lambda key: aiopglock.advisory(key, db=conn))
        finally:
            await conn.close()

    await attempt(f"{LOCKER}, {HELD_FOR_MEMORY:,} held", on_locker)
    await attempt(f"advisory(db=conn), {HELD_FOR_MEMORY:,} held on one connection", on_connection)
    return results


# --------------------------------------------------------------------------- the run


@dataclass
class Run:
    dsn: str
    rounds: int
    progress: Progress
    only: list[str] = field(default_factory=list)
    skip: list[str] = field(default_factory=list)
    contenders: dict[str, Contender] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def wanted(self, name: str) -> bool:
        if any(s.lower() in name.lower() for s in self.skip):
            return False
        return not self.only or any(s.lower() in name.lower() for s in self.only)


async def find_contenders(run: Run) -> None:
    run.contenders = {BASELINE: by_hand, ADVISORY: with_advisory, LOCKER: with_locker}
    run.notes = {
        BASELINE: "pool.acquire() + pg_advisory_lock + pg_advisory_unlock",
        ADVISORY: "aiopglock.advisory(key, db=pool)",
        LOCKER: "locker.advisory(key) on Locker(pool)",
    }
    peers: dict[str, Callable[[], Awaitable[tuple[Contender | None, str]]]] = {
        DJANGO: lambda: django_contender(run.dsn),
        SQLALCHEMY: lambda: sqlalchemy_contender(run.dsn),
        REDIS: redis_contender,
    }
    for name, find in peers.items():
        if not run.wanted(name):
            run.skipped[name] = "left out (--only/--skip)"
            continue
        try:
            contender, note = await find()
        except Exception as exc:  # a peer that breaks on set-up is skipped, not fatal
            contender, note = None, f"failed to set up: {exc!r}"
        if contender is None:
            run.skipped[name] = note
        else:
            run.contenders[name] = contender
            run.notes[name] = note
    for name in [BASELINE, ADVISORY, LOCKER]:
        if not run.wanted(name) and name != BASELINE:  # the baseline always runs
            del run.contenders[name]
            run.skipped[name] = "left out (--only/--skip)"
    for name, reason in run.skipped.items():
        run.progress(f"{name}: skipped, {reason}")


async def measure_workloads(run: Run, pool: Any, admin: asyncpg.Connection) -> dict[str, Any]:
    return {
        workload: await measure_workload(run, pool, admin, workload, kind, n)
        for workload, (kind, n) in WORKLOADS.items()
    }


async def measure_workload(
    run: Run, pool: Any, admin: asyncpg.Connection, workload: str, kind: str, n: int
) -> dict[str, Any]:
    held = Held(admin)
    work: Callable[[Runner, int], Awaitable[int]] = {
        "sequential": sequential,
        "distinct": distinct_keys,
        "hot": hot_key,
        "held": held,
    }[kind]
    names = [name for name in run.contenders if not (kind == "held" and name in PINNING)]
    rates: dict[str, list[float]] = {name: [] for name in names}
    connections: dict[str, int | None] = {}
    failed: dict[str, str] = {}

    async def attempt(name: str, size: int) -> float | None:
        """One run of the workload by one contender: its rate, or None
        when it failed (noted, and the contender sits the rest out)."""
        try:
            async with run.contenders[name](pool) as runner:
                held.connections = None
                started = time.perf_counter()
                done = await work(runner, size)
                rate = done / (time.perf_counter() - started)
                if kind == "held" and name != REDIS:
                    connections[name] = held.connections
                return rate
        except Exception as exc:
            # Say, e.g., a lock table too small for 10,000 more locks on a
            # busy shared server: the rest of the run still counts.
            failed[name] = f"{type(exc).__name__}: {exc}"
            run.progress(f"{workload} · {name}: failed, {failed[name]}")
            return None

    run.progress(f"{workload}: warming up {len(names)} contenders")
    for name in names:  # warm up connections, statements, caches
        await attempt(name, max(n // 10, 50))
    for round_ in range(run.rounds):
        order = names if round_ % 2 == 0 else names[::-1]
        for name in order:
            if name in failed:
                continue
            rate = await attempt(name, n)
            if rate is not None:
                rates[name].append(rate)
                run.progress(
                    f"{workload} · round {round_ + 1}/{run.rounds} · {name}: {rate:,.0f}/s"
                )
    medians = {name: statistics.median(r) for name, r in rates.items() if name not in failed}
    base = medians.get(BASELINE)
    results: dict[str, dict[str, Any]] = {
        name: {
            "per_second": rate,
            "ratio": None if base is None else rate / base,
            "rounds": rates[name],
            "connections": connections.get(name),
        }
        for name, rate in medians.items()
    }
    for name, reason in failed.items():
        results[name] = {"failed": reason}
    return results


LIMITS: dict[str, tuple[str, str, int]] = {
    "one round trip per cycle (1 connection)": (
        "cycles",
        "SELECT pg_advisory_unlock($1), pg_advisory_lock($2) back to back",
        2000,
    ),
    "try-lock + unlock batched over unnest() (1 connection)": (
        "locks",
        f"{BATCH} keys per statement: one try-lock statement, one unlock statement",
        20 * BATCH,
    ),
    "asyncio floor, no I/O": (
        "cycles",
        "1,000 tasks at a time, a future per acquire and per release resolved by a batcher",
        20_000,
    ),
    "aiopglock.advisory_many of 1,000 keys (pool)": (
        "locks",
        f"advisory_many({BATCH} keys, db=pool) taken and released",
        20 * BATCH,
    ),
}


def instrumentation_cost(n: int = 200_000) -> dict[str, Any]:
    """What aiopglock's OpenTelemetry recording costs per lock while no SDK
    is set up (issue 14): the calls every entry and exit makes, timed alone."""
    from aiopglock import _otel

    class Handle:
        acquired = True
        lost = False

    handle = Handle()
    started = time.perf_counter()
    for _ in range(n):
        wait = _otel.begin("advisory", "exclusive", 1, "bench")
        _otel.granted(wait, handle)
        _otel.released(handle)
    per_lock = (time.perf_counter() - started) / n
    return {
        "ns_per_lock": per_lock * 1e9,
        "opentelemetry_api": _otel._metrics is not None,
        "n": n,
    }


async def server_names_cost(pool: Any, n: int, rounds: int) -> dict[str, Any]:
    """What naming a ``str`` key on the server costs (issue 14): sequential
    ``advisory(name, db=pool)`` cycles over 100 names, with the named
    statements (a comment, simple query protocol) and with
    ``configure(server_names=False)`` (the parameterised, cached ones),
    alternated in the same run; the int-key cycle for context."""
    names = [f"bench:{KEY_BASE}:{i}" for i in range(100)]
    ints = [SEQUENTIAL_KEY + 10 + i for i in range(100)]

    async def cycles(keys: list[Any], count: int) -> float:
        started = time.perf_counter()
        for i in range(count):
            async with aiopglock.advisory(keys[i % len(keys)], db=pool):
                pass
        return count / (time.perf_counter() - started)

    variants: dict[str, tuple[list[Any], bool]] = {
        "named": (names, True),
        "unnamed": (names, False),
        "int key": (ints, True),
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for round_ in range(rounds + 1):  # the first round warms up
            order = list(variants) if round_ % 2 else list(variants)[::-1]
            for name in order:
                keys, named = variants[name]
                aiopglock.configure(server_names=named)
                rate = await cycles(keys, n if round_ else max(n // 10, 10))
                if round_:
                    rates[name].append(rate)
    finally:
        aiopglock.configure(server_names=True)
    medians = {name: statistics.median(r) for name, r in rates.items()}
    return {
        "per_second": medians,
        "rounds": rates,
        "ratio": medians["named"] / medians["unnamed"],
        "n": n,
    }


async def measure_limits(run: Run, pool: Any) -> dict[str, Any]:
    results: dict[str, Any] = {}
    many = "aiopglock.advisory_many of 1,000 keys (pool)"
    for name, (unit, what, n) in LIMITS.items():
        entry: dict[str, Any] = {"unit": unit, "what": what}
        results[name] = entry
        if name == many and not hasattr(aiopglock, "advisory_many"):
            entry["skipped"] = "aiopglock.advisory_many does not exist yet (issue 12)"
            run.progress(f"limits · {name}: skipped, {entry['skipped']}")
            continue
        measure: Callable[[int], Coroutine[Any, Any, float]] = {
            "one round trip per cycle (1 connection)": lambda n: limit_one_round_trip(run.dsn, n),
            "try-lock + unlock batched over unnest() (1 connection)": lambda n: limit_unnest(
                run.dsn, n
            ),
            "asyncio floor, no I/O": floor_asyncio,
            many: lambda n: with_advisory_many(pool, n),
        }[name]
        await measure(max(n // 10, 1))  # warm up
        rates = []
        for round_ in range(run.rounds):
            rates.append(await measure(n))
            run.progress(
                f"limits · round {round_ + 1}/{run.rounds} · {name}: {rates[-1]:,.0f} {unit}/s"
            )
        # A limit is a ceiling: its best round (the median is kept too).
        entry["per_second"] = max(rates)
        entry["median"] = statistics.median(rates)
        entry["rounds"] = rates
    return results


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for package in [
        "asyncpg",
        "anyio",
        "django",
        "django-pglock",
        "psycopg2-binary",
        "psycopg2",
        "psycopg",
        "sqlalchemy",
        "sqlalchemy-dlock",
        "redis",
        "uvloop",
    ]:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


async def measure(run: Run, loop_name: str, memory: bool) -> dict[str, Any]:
    started = time.time()
    await find_contenders(run)
    pool = await asyncpg.create_pool(
        run.dsn,
        min_size=POOL_SIZE,
        max_size=POOL_SIZE,
        server_settings={"application_name": APPLICATION_NAME},
    )
    admin = await asyncpg.connect(run.dsn)
    try:
        server = await admin.fetchval("SHOW server_version")
        workloads = await measure_workloads(run, pool, admin)
        limits = await measure_limits(run, pool)
        run.progress("semaphore wake-up delay")
        wakeup = await semaphore_wakeup(pool, SEMAPHORE_WAKEUPS)
        run.progress("server names: named against unnamed str-key cycles")
        names = await server_names_cost(pool, SERVER_NAMES_CYCLES, run.rounds)
        held = await memory_per_lock(run.dsn, pool, admin, run.progress) if memory else {}
        failover = await measure_failover(run, admin)
    finally:
        await admin.close()
        await pool.close()
    return {
        "meta": {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "seconds": time.time() - started,
            "loop": loop_name,
            "rounds": run.rounds,
            "pool_size": POOL_SIZE,
            "server_version": server,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "aiopglock": getattr(aiopglock, "__version__", None),
            "versions": versions(),
        },
        "baseline": BASELINE,
        "contenders": {name: run.notes.get(name, "") for name in run.contenders},
        "skipped": run.skipped,
        "workloads": workloads,
        "limits": limits,
        "semaphore_wakeup": wakeup,
        "instrumentation": instrumentation_cost(),
        "server_names": names,
        "memory": held,
        "failover": failover,
    }


def report(results: dict[str, Any]) -> str:
    """The plain-text table printed at the end (``table.py`` makes Markdown)."""
    contenders = list(results["contenders"])
    width = 40
    head = f"{'workload':{width}}" + "".join(f" {name:>20}" for name in contenders)
    lines = [head, "-" * len(head)]
    for workload, by_name in results["workloads"].items():
        ratios = f"{workload:{width}}"
        rates = f"{'':{width}}"
        for name in contenders:
            got = by_name.get(name)
            if got is None or "failed" in got:
                ratios += f" {'n/a' if got is None else 'failed':>20}"
                rates += f" {'':>20}"
                continue
            ratio = got["ratio"]
            cell = f"{ratio:.2f}x" if ratio is not None else "-"
            if got["connections"] is not None:
                cell = f"{got['connections']} conn, " + cell
            ratios += f" {cell:>20}"
            rates += f" {got['per_second']:>16,.0f} /s "
        lines += [ratios, rates]
    lines.append("")
    lines.append(
        f"ratios: median rate / {BASELINE}'s median rate in the same run "
        "(higher is better); n/a: pins one connection per held lock"
    )
    lines.append("")
    lines.append(f"limits ({results['meta']['loop']} loop; the best round):")
    for name, got in results["limits"].items():
        if "skipped" in got:
            lines.append(f"  {name:60} skipped: {got['skipped']}")
        else:
            lines.append(f"  {name:60} {got['per_second']:>12,.0f} {got['unit']}/s")
    wakeup = results.get("semaphore_wakeup")
    if wakeup:
        lines.append("")
        lines.append(
            f"semaphore wake-up ({wakeup['what']}): median {wakeup['median']:.2f} ms, "
            f"p90 {wakeup['p90']:.2f} ms, max {wakeup['max']:.2f} ms over {wakeup['n']}"
        )
    cost = results.get("instrumentation")
    if cost:
        sequential = results["workloads"].get("sequential cycles (1 task)", {}).get(BASELINE, {})
        rate = sequential.get("per_second")
        share = f" ({cost['ns_per_lock'] * rate / 1e7:.2f}% of a by-hand cycle)" if rate else ""
        api = "installed" if cost["opentelemetry_api"] else "absent"
        lines.append("")
        lines.append(
            f"OpenTelemetry recording, no SDK set up (API {api}): "
            f"{cost['ns_per_lock']:,.0f} ns per lock{share}"
        )
    names = results.get("server_names")
    if names:
        rate = names["per_second"]
        lines.append("")
        lines.append(
            f"str keys named on the server / unnamed (sequential advisory() cycles): "
            f"{names['ratio']:.2f}x ({rate['named']:,.0f}/s against {rate['unnamed']:,.0f}/s; "
            f"int keys {rate['int key']:,.0f}/s)"
        )
    if results["memory"]:
        lines.append("")
        lines.append("Python memory per held lock (tracemalloc):")
        for name, got in results["memory"].items():
            if "failed" in got:
                lines.append(f"  {name:60} failed: {got['failed']}")
                continue
            lines.append(
                f"  {name:60} {got['bytes_per_lock']:>8,.0f} B"
                f" ({got['held_on_server']} held on the server)"
            )
    failover = results.get("failover", {})
    if "median_ms" in failover:
        lines.append("")
        lines.append(
            f"{FAILOVER} (terminate to new term): median {failover['median_ms']:.1f} ms "
            f"over {len(failover['ms'])}"
        )
    for workload, by_name in results["workloads"].items():
        for name, got in by_name.items():
            if "failed" in got:
                lines.append(f"failed {name} on {workload}: {got['failed']}")
    for name, reason in results["skipped"].items():
        lines.append(f"skipped {name}: {reason}")
    return "\n".join(lines)


def run_on(loop_name: str, main: Coroutine[Any, Any, Any]) -> Any:
    if loop_name == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=os.environ.get("DATABASE_URL"))
    parser.add_argument("--rounds", type=int, default=3, help="rounds per workload (3)")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results.json"))
    parser.add_argument("--no-memory", action="store_true", help="leave the memory rows out")
    parser.add_argument("--no-redis", action="store_true", help="leave redis-py out")
    parser.add_argument(
        "--only", action="append", default=[], help="run only contenders whose name has this"
    )
    parser.add_argument(
        "--skip", action="append", default=[], help="leave out contenders whose name has this"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.loop == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            parser.error("--loop uvloop: uvloop is not installed (pip install -e '.[bench]')")
    progress = Progress(args.quiet)
    skip = [*args.skip, *([REDIS] if args.no_redis else [])]

    def go(dsn: str) -> dict[str, Any]:
        run = Run(dsn=dsn, rounds=args.rounds, progress=progress, only=args.only, skip=skip)
        results: dict[str, Any] = run_on(args.loop, measure(run, args.loop, not args.no_memory))
        return results

    if args.dsn:
        results = go(args.dsn)
    else:
        from aiopglock.cli._embedded import embedded_postgres

        progress("starting an embedded PostgreSQL")
        with embedded_postgres() as dsn:
            results = go(dsn)
    print(report(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    progress(f"wrote {args.json}; render it with: python benchmarks/table.py {args.json}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # every connection and the embedded server are closed by now
        print("bench.py: interrupted, nothing written", file=sys.stderr)
        sys.exit(130)
