"""Side-by-side lock throughput, in one run and in alternating rounds:

- ``asyncpg by hand``: the baseline, ``pool.acquire()`` + ``pg_advisory_lock``
  + ``pg_advisory_unlock`` (and the pool's reset on release);
- ``aiopglock.advisory``: ``aiopglock.advisory(key, db=pool)``;
- ``aiopglock.Locker``: ``locker.advisory(key)`` on ``Locker(pool)``;
- ``redis-py Lock``: redis-py's asyncio ``Lock`` (``SET NX PX`` and a Lua
  release, a blocking pool of as many connections as the asyncpg pool), when
  redis-py is installed and Redis answers on 127.0.0.1:6379.

Every contender runs every workload in turn, round after round (the order
reversed every other round), so that the ratios survive a noisy machine; the
table shows each contender's median rate as a ratio of the baseline's, with
absolute rates as context. ``--json`` gets everything.

    python benchmarks/bench.py [--dsn DSN] [--rounds 5] [--json PATH] [--no-redis]

Without a DSN (``--dsn`` or ``DATABASE_URL``) an embedded PostgreSQL is used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

import aiopglock

POOL_SIZE = 10
APPLICATION_NAME = "aiopglock-bench"
REDIS_URL = "redis://127.0.0.1:6379/0"

Inside = Callable[[], Awaitable[None]] | None
Cycle = Callable[[int, Inside], Awaitable[None]]
Contender = Callable[[Any], contextlib.AbstractAsyncContextManager[Cycle]]

BASELINE = "asyncpg by hand"


# --------------------------------------------------------------------------- contenders


@contextlib.asynccontextmanager
async def by_hand(pool: Any) -> AsyncIterator[Cycle]:
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
async def with_advisory(pool: Any) -> AsyncIterator[Cycle]:
    async def cycle(key: int, inside: Inside) -> None:
        async with aiopglock.advisory(key, db=pool):
            if inside is not None:
                await inside()

    yield cycle


@contextlib.asynccontextmanager
async def with_locker(pool: Any) -> AsyncIterator[Cycle]:
    async with aiopglock.Locker(pool) as locker:

        async def cycle(key: int, inside: Inside) -> None:
            async with locker.advisory(key):
                if inside is not None:
                    await inside()

        yield cycle


def redis_contender() -> Contender | None:
    """redis-py's asyncio Lock, or None when redis-py or Redis is missing."""
    try:
        import redis.asyncio as aioredis
    except ImportError:
        return None

    async def ping() -> bool:
        client = aioredis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
        try:
            return bool(await client.ping())
        except Exception:
            return False
        finally:
            await client.aclose()

    if not asyncio.run(ping()):
        return None

    @contextlib.asynccontextmanager
    async def with_redis(pool: Any) -> AsyncIterator[Cycle]:
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

    return with_redis


# --------------------------------------------------------------------------- workloads


async def sequential(cycle: Cycle, n: int) -> int:
    for _ in range(n):
        await cycle(1, None)
    return n


async def distinct_keys(cycle: Cycle, n: int) -> int:
    await asyncio.gather(*(cycle(1000 + i, None) for i in range(n)))
    return n


async def hot_key(cycle: Cycle, n: int) -> int:
    async def worker() -> None:
        for _ in range(n // 50):
            await cycle(7, None)

    await asyncio.gather(*(worker() for _ in range(50)))
    return 50 * (n // 50)


class Held:
    """``n`` locks held at once: every task waits inside its lock until all
    are in; the server connections holding them are counted meanwhile."""

    def __init__(self, admin: asyncpg.Connection) -> None:
        self.admin = admin
        self.connections: int | None = None

    async def __call__(self, cycle: Cycle, n: int) -> int:
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

        await asyncio.gather(*(cycle(100_000 + i, inside) for i in range(n)))
        return n


WORKLOADS: dict[str, tuple[str, int]] = {
    "sequential cycles (1 task)": ("sequential", 2000),
    "1,000 tasks, distinct keys, pool of 10": ("distinct", 1000),
    "50 tasks, one hot key, pool of 10": ("hot", 1000),
    "10,000 locks held at once": ("held", 10_000),
}

#: Contenders that pin one connection per held lock cannot hold 10,000 locks
#: with a pool of 10: they sit that workload out.
PINNING = {BASELINE, "aiopglock.advisory"}


async def measure(
    dsn: str | None, rounds: int, contenders: dict[str, Contender]
) -> dict[str, dict[str, Any]]:
    pool = await asyncpg.create_pool(
        dsn,
        min_size=POOL_SIZE,
        max_size=POOL_SIZE,
        server_settings={"application_name": APPLICATION_NAME},
    )
    admin = await asyncpg.connect(dsn)
    results: dict[str, dict[str, Any]] = {}
    try:
        for workload, (kind, n) in WORKLOADS.items():
            held = Held(admin)
            run: Callable[[Cycle, int], Awaitable[int]] = {
                "sequential": sequential,
                "distinct": distinct_keys,
                "hot": hot_key,
                "held": held,
            }[kind]
            names = [name for name in contenders if not (kind == "held" and name in PINNING)]
            rates: dict[str, list[float]] = {name: [] for name in names}
            connections: dict[str, int | None] = {}
            for name in names:  # warm up connections, statements, caches
                async with contenders[name](pool) as cycle:
                    await run(cycle, max(n // 10, 50))
            for round_ in range(rounds):
                order = names if round_ % 2 == 0 else names[::-1]
                for name in order:
                    async with contenders[name](pool) as cycle:
                        held.connections = None
                        started = time.perf_counter()
                        done = await run(cycle, n)
                        rates[name].append(done / (time.perf_counter() - started))
                        if kind == "held" and name != "redis-py Lock":
                            connections[name] = held.connections
            medians = {name: statistics.median(r) for name, r in rates.items()}
            base = medians.get(BASELINE)
            results[workload] = {
                name: {
                    "per_second": rate,
                    "ratio": None if base is None else rate / base,
                    "rounds": rates[name],
                    "connections": connections.get(name),
                }
                for name, rate in medians.items()
            }
    finally:
        await admin.close()
        await pool.close()
    return results


def report(results: dict[str, dict[str, Any]], contenders: list[str]) -> str:
    width = 40
    head = f"{'workload':{width}}" + "".join(f" {name:>20}" for name in contenders)
    lines = [head, "-" * len(head)]
    for workload, by_name in results.items():
        ratios = f"{workload:{width}}"
        rates = f"{'':{width}}"
        for name in contenders:
            got = by_name.get(name)
            if got is None:
                ratios += f" {'n/a':>20}"
                rates += f" {'':>20}"
                continue
            ratio = got["ratio"]
            cell = f"{ratio:.2f}x" if ratio is not None else "-"
            if got["connections"] is not None:
                cell = f"{got['connections']} conn, " + cell
            ratios += f" {cell:>20}"
            rates += f" {got['per_second']:>16.0f} /s "
        lines += [ratios, rates]
    lines.append("")
    lines.append(
        f"ratios: median rate / {BASELINE}'s median rate in the same run "
        "(higher is better); n/a: pins one connection per held lock"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=os.environ.get("DATABASE_URL"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results.json"))
    parser.add_argument("--no-redis", action="store_true", help="leave redis-py out")
    args = parser.parse_args()
    contenders: dict[str, Contender] = {
        BASELINE: by_hand,
        "aiopglock.advisory": with_advisory,
        "aiopglock.Locker": with_locker,
    }
    redis = None if args.no_redis else redis_contender()
    if redis is not None:
        contenders["redis-py Lock"] = redis
    else:
        print("redis-py Lock: left out (no redis-py, or no Redis on 127.0.0.1:6379)")
    if args.dsn:
        results = asyncio.run(measure(args.dsn, args.rounds, contenders))
    else:
        from aiopglock.cli._embedded import embedded_postgres

        with embedded_postgres() as dsn:
            results = asyncio.run(measure(dsn, args.rounds, contenders))
    print(report(results, list(contenders)))
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
