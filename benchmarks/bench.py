"""Side-by-side lock throughput: ``aiopglock.advisory(db=pool)`` against the
same lock written by hand on asyncpg (``pool.acquire()`` + lock + unlock).

Both run in one process against one server, in alternating rounds, so that
the ratio survives a noisy machine; absolute numbers are context only.

    python benchmarks/bench.py [--dsn DSN] [--rounds 5] [--json PATH]

Without a DSN (``--dsn`` or ``DATABASE_URL``) an embedded PostgreSQL is used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

import aiopglock

Cycle = Callable[[Any, int], Awaitable[None]]


async def by_hand(pool: Any, key: int) -> None:
    async with pool.acquire() as conn:
        await conn.fetchval("SELECT pg_advisory_lock($1)", key)
        await conn.fetchval("SELECT pg_advisory_unlock($1)", key)


async def with_aiopglock(pool: Any, key: int) -> None:
    async with aiopglock.advisory(key, db=pool):
        pass


CONTENDERS: dict[str, Cycle] = {"asyncpg by hand": by_hand, "aiopglock.advisory": with_aiopglock}


async def sequential(pool: Any, cycle: Cycle, n: int) -> int:
    for _ in range(n):
        await cycle(pool, 1)
    return n


async def distinct_keys(pool: Any, cycle: Cycle, n: int) -> int:
    await asyncio.gather(*(cycle(pool, 1000 + i) for i in range(n)))
    return n


async def hot_key(pool: Any, cycle: Cycle, n: int) -> int:
    async def worker() -> None:
        for _ in range(n // 50):
            await cycle(pool, 7)

    await asyncio.gather(*(worker() for _ in range(50)))
    return 50 * (n // 50)


WORKLOADS = {
    "sequential cycles (1 task)": (sequential, 2000),
    "1,000 tasks, distinct keys, pool of 10": (distinct_keys, 1000),
    "50 tasks, one hot key, pool of 10": (hot_key, 1000),
}


async def measure(dsn: str | None, rounds: int) -> dict[str, dict[str, float]]:
    pool = await asyncpg.create_pool(dsn, min_size=10, max_size=10)
    results: dict[str, dict[str, float]] = {}
    try:
        for workload, (run, n) in WORKLOADS.items():
            rates: dict[str, list[float]] = {name: [] for name in CONTENDERS}
            await run(pool, by_hand, n // 4)  # warm up connections and statements
            await run(pool, with_aiopglock, n // 4)
            for round_ in range(rounds):
                order = list(CONTENDERS.items())
                if round_ % 2:
                    order.reverse()
                for name, cycle in order:
                    started = time.perf_counter()
                    done = await run(pool, cycle, n)
                    rates[name].append(done / (time.perf_counter() - started))
            results[workload] = {name: statistics.median(r) for name, r in rates.items()}
    finally:
        await pool.close()
    return results


def report(results: dict[str, dict[str, float]]) -> str:
    lines = [f"{'workload':42} {'by hand/s':>10} {'aiopglock/s':>12} {'ratio':>6}"]
    for workload, rates in results.items():
        base, ours = rates["asyncpg by hand"], rates["aiopglock.advisory"]
        lines.append(f"{workload:42} {base:10.0f} {ours:12.0f} {ours / base:6.2f}x")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=os.environ.get("DATABASE_URL"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results.json"))
    args = parser.parse_args()
    if args.dsn:
        results = asyncio.run(measure(args.dsn, args.rounds))
    else:
        from aiopglock._embedded import embedded_postgres

        with embedded_postgres() as dsn:
            results = asyncio.run(measure(dsn, args.rounds))
    print(report(results))
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
