"""A test's own blockers, waiters and resources (``tests/test_prioritize.py``,
``tests/test_watchdog.py``).

A :class:`Scene` names its sessions ``aiopglock-t-<tag>-<role>`` with a tag of
its own, and locks a table and an advisory key of its own, so runs sharing one
server never meet, and a prioritizer or watchdog scoped to the scene's
sessions can only ever see (and signal) them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

import aiopglock
from tests._helpers import Connect, wait_until

__all__ = ["KINDS", "Scene", "make_scene"]

KINDS = ("advisory", "row", "table")

_BLOCKED_BY = (
    "SELECT pid FROM pg_catalog.pg_stat_activity "
    "WHERE $1::int4 = ANY (pg_catalog.pg_blocking_pids(pid)) ORDER BY pid"
)


@dataclasses.dataclass
class Scene:
    """One test's sessions and resources, all named with a tag of its own."""

    tag: str
    connect: Connect
    admin: asyncpg.Connection
    table: str
    key: str

    def app(self, role: str) -> str:
        return f"aiopglock-t-{self.tag}-{role}"

    async def session(self, role: str) -> asyncpg.Connection:
        conn: asyncpg.Connection = await self.connect(
            server_settings={"application_name": self.app(role)}
        )
        return conn

    async def hold(self, blocker: asyncpg.Connection, kind: str, *, shared: bool = False) -> str:
        """``blocker`` takes, in a transaction it leaves open, the lock the
        protected work will wait for. Returns the statement it ran."""
        await blocker.execute("BEGIN")
        if kind == "advisory":
            fn = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
            statement = f"SELECT {fn}($1)"
            await blocker.execute(statement, aiopglock.advisory_key(self.key))
            return statement
        if kind == "row":
            if shared:
                statement = f'SELECT id FROM "{self.table}" WHERE id = 1 FOR SHARE'
            else:
                statement = f'UPDATE "{self.table}" SET v = v + 1 WHERE id = 1'
        else:
            statement = f'LOCK TABLE "{self.table}" IN ACCESS SHARE MODE'
        await blocker.execute(statement)
        return statement

    def acquire(self, kind: str, db: Any, **kw: Any) -> Any:
        """The protected work: aiopglock waits for the resource ``hold`` takes."""
        if kind == "advisory":
            return aiopglock.advisory(self.key, db=db, **kw)
        if kind == "row":
            return aiopglock.rows(f'SELECT id FROM "{self.table}" WHERE id = 1', db=db, **kw)
        return aiopglock.table(self.table, db=db, **kw)

    async def wait_raw(self, conn: asyncpg.Connection, kind: str) -> None:
        """A wait for the same resource that aiopglock does not issue."""
        if kind == "advisory":
            await conn.execute("SELECT pg_advisory_lock($1)", aiopglock.advisory_key(self.key))
            await conn.execute("SELECT pg_advisory_unlock_all()")
            return
        async with conn.transaction():
            if kind == "row":
                await conn.execute(f'SELECT id FROM "{self.table}" WHERE id = 1 FOR UPDATE')
            else:
                await conn.execute(f'LOCK TABLE "{self.table}"')

    async def blocked_by(self, pid: int, count: int = 1) -> list[int]:
        """Wait until ``count`` sessions are blocked by ``pid``; their pids."""

        async def blocked() -> list[int]:
            rows = await self.admin.fetch(_BLOCKED_BY, pid)
            return [row["pid"] for row in rows] if len(rows) >= count else []

        return await wait_until(blocked, message=f"{count} session(s) blocked by {pid}")

    async def waiting(self, pid: int) -> None:
        """Wait until backend ``pid`` waits for a lock."""

        async def waits() -> bool:
            return bool(
                await self.admin.fetchval(
                    "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
                )
            )

        await wait_until(waits, message=f"backend {pid} to wait for a lock")

    async def alive(self, pid: int) -> bool:
        return bool(
            await self.admin.fetchval(
                "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE pid = $1)", pid
            )
        )

    async def gone(self, pid: int) -> None:
        async def exited() -> bool:
            return not await self.alive(pid)

        await wait_until(exited, message=f"backend {pid} to exit")

    async def sessions(self, role: str) -> int:
        count: int = await self.admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", self.app(role)
        )
        return count


@contextlib.asynccontextmanager
async def make_scene(connect: Connect, admin: asyncpg.Connection) -> AsyncIterator[Scene]:
    """A Scene with a table of its own; at exit its sessions are ended and the table dropped."""
    tag = uuid.uuid4().hex[:10]
    table = f"aiopglock_t_{tag}"
    setup = await connect()
    await setup.execute(f'CREATE TABLE "{table}" (id int PRIMARY KEY, v int NOT NULL DEFAULT 0)')
    await setup.execute(f'INSERT INTO "{table}" (id) VALUES (1), (2)')
    try:
        yield Scene(tag, connect, admin, table, f"tests.blocking:{tag}")
    finally:
        # A failed test may leave a blocker in its transaction: end this test's
        # sessions (and only these) before dropping the table.
        prefix = f"aiopglock-t-{tag}-%"
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name LIKE $1 AND pid <> pg_backend_pid()",
            prefix,
        )

        async def ended() -> bool:
            return not await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE $1", prefix
            )

        await wait_until(ended, message="this test's sessions to end")
        await setup.execute(f'DROP TABLE "{table}"')


async def no_monitor_left(scene: Scene, pool: asyncpg.Pool) -> None:
    """Assert that no monitor of ``scene`` is left: no backend, no leased pool
    connection, no ``aiopglock*`` task."""

    async def closed() -> bool:
        return await scene.sessions("monitor") == 0

    await wait_until(closed, message="the monitor's backend to exit")
    assert pool.get_idle_size() == pool.get_size()
    assert [t for t in asyncio.all_tasks() if t.get_name().startswith("aiopglock")] == []
