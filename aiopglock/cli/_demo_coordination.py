"""The demo's coordination steps: advisory_many, semaphore, Leader and fencing tokens."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

from .._advisory_many import advisory_many
from .._conntypes import Conn, Pool
from .._introspect import locks
from .._leader import Leader
from .._semaphore import semaphore

Say = Callable[[str], None]


async def demo_coordination(say: Say, pool: Pool, admin: Conn) -> None:
    """Steps 17 to 19 of ``aiopglock demo``."""
    await _demo_many(say, pool, admin)
    await _demo_semaphore(say, pool)
    await _demo_leader(say, pool, admin)


async def _demo_many(say: Say, pool: Pool, admin: Conn) -> None:
    say("17. advisory_many: transfers between two accounts, half of them in each direction.")
    say("    Taking the two keys one by one in the order of the transfer can deadlock;")
    say("    advisory_many takes a set in one sorted order, all or nothing.")
    tag = uuid.uuid4().hex[:8]
    accounts = (f"account:{tag}:alice", f"account:{tag}:bob")
    inside = 0
    overlaps = 0

    async def transfer(source: str, target: str) -> None:
        nonlocal inside, overlaps
        async with advisory_many([source, target], db=pool, timeout=10) as both:
            assert both, "advisory_many: not acquired"
            inside += 1
            overlaps += inside > 1
            await asyncio.sleep(0)
            inside -= 1

    started = time.monotonic()
    await asyncio.gather(*(transfer(*(accounts if i % 2 else accounts[::-1])) for i in range(100)))
    took = time.monotonic() - started
    say(f"    100 transfers in {took:.2f} s, never two at once ({overlaps} overlaps),")
    left = await admin.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
    say(f"    no deadlock; advisory locks left: {left}\n")


async def _demo_semaphore(say: Say, pool: Pool) -> None:
    say("18. semaphore: six exports, at most two at once across every process. A waiter")
    say("    is woken by the release (LISTEN/NOTIFY), not by polling.")
    exports = semaphore(f"exports-{uuid.uuid4().hex[:8]}", 2, db=pool, timeout=30)
    running = 0
    peak = 0

    async def export(n: int) -> None:
        nonlocal running, peak
        async with exports as slot:
            assert slot, "semaphore: no slot"
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.05)
            running -= 1

    started = time.monotonic()
    await asyncio.gather(*(export(n) for n in range(6)))
    took = time.monotonic() - started
    say(f"    six exports took {took:.2f} s (three rounds of 0.05 s); at most {peak} at once\n")


async def _demo_leader(say: Say, pool: Pool, admin: Conn) -> None:
    say("19. Leader election and fencing tokens: two nodes campaign for 'scheduler'; the")
    say("    leader's backend is terminated, and the other node takes over with a higher")
    say("    fence. A table that remembers the highest fence refuses the deposed leader.")
    key = f"scheduler-{uuid.uuid4().hex[:8]}"
    guard = f"demo_fence_{uuid.uuid4().hex[:8]}"
    await admin.execute(f'CREATE TABLE "{guard}" (fence bigint)')
    await admin.execute(f'INSERT INTO "{guard}" VALUES (0)')
    terms: asyncio.Queue[tuple[str, int, float]] = asyncio.Queue()
    leaders = {name: Leader(key, db=pool, retry_interval=0.05) for name in ("node-1", "node-2")}

    async def lead(name: str) -> None:
        leader = leaders[name]
        assert leader.fence is not None
        await admin.execute(f'UPDATE "{guard}" SET fence = $1 WHERE fence < $1', leader.fence)
        await terms.put((name, leader.fence, time.monotonic()))
        await asyncio.Event().wait()  # lead until deposed

    tasks = [asyncio.create_task(leaders[name].run(lead, name)) for name in leaders]
    try:
        first, first_fence, _ = await asyncio.wait_for(terms.get(), 30)
        say(f"    {first} leads, fence {first_fence}")
        (pid,) = [info.pid for info in await locks(admin, key=key) if info.granted]
        killed = time.monotonic()
        await admin.execute("SELECT pg_terminate_backend($1)", pid)
        second, second_fence, at = await asyncio.wait_for(terms.get(), 30)
        say(
            f"    {second} leads {1000 * (at - killed):.0f} ms after the termination, "
            f"fence {second_fence}"
        )
        stale = await admin.execute(
            f'UPDATE "{guard}" SET fence = $1 WHERE fence < $1', first_fence
        )
        say(f"    a write with the deposed leader's fence: {stale} (refused)\n")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await admin.execute(f'DROP TABLE IF EXISTS "{guard}"')
