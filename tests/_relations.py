"""Helpers for the table-lock, row-lock and timeout-scope tests.

Tables are created with unique names (the process id and a random suffix),
so that two test runs against one server, in parallel or one after the
other, never touch each other's tables; the ``tables`` fixture of each test
module drops what it created.
"""

from __future__ import annotations

import os
import uuid

import asyncpg

__all__ = [
    "Tables",
    "backend_state",
    "in_transaction_pids",
    "quote",
    "relation_locks",
    "unique_name",
]


def unique_name(prefix: str) -> str:
    """A table name no other test run uses: ``prefix_<pid>_<random>``."""
    return f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"


def quote(*parts: str) -> str:
    """``("s", 't"x')`` -> ``"s"."t""x"`` (independently of aiopglock's quoting)."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in parts)


class Tables:
    """Creates schemas and tables through the admin connection; drops them all."""

    def __init__(self, admin: asyncpg.Connection) -> None:
        self.admin = admin
        self._schemas: list[str] = []
        self._tables: list[str] = []

    async def schema(self, name: str | None = None) -> str:
        name = name or unique_name("aiopglock_s")
        await self.admin.execute(f"CREATE SCHEMA {quote(name)}")
        self._schemas.append(name)
        return name

    async def create(self, *parts: str, columns: str = "id int PRIMARY KEY, v text") -> int:
        """Create table ``parts`` (``name`` or ``schema, name``); return its oid."""
        qualified = quote(*parts)
        await self.admin.execute(f"CREATE TABLE {qualified} ({columns})")
        self._tables.append(qualified)
        oid: int = await self.admin.fetchval("SELECT to_regclass($1)::oid", qualified)
        return oid

    async def drop(self) -> None:
        """Drop everything created; a lock left held by a test fails it in
        seconds (lock_timeout) rather than hang the run."""
        async with self.admin.transaction():
            await self.admin.execute("SET LOCAL lock_timeout = '10s'")
            for qualified in reversed(self._tables):
                await self.admin.execute(f"DROP TABLE IF EXISTS {qualified} CASCADE")
            for name in reversed(self._schemas):
                await self.admin.execute(f"DROP SCHEMA IF EXISTS {quote(name)} CASCADE")


_RELATION_LOCKS = """
SELECT l.pid, l.mode, l.granted
FROM pg_catalog.pg_locks AS l
WHERE l.locktype = 'relation' AND l.relation = $1::oid
  AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())
  AND l.pid IS DISTINCT FROM pg_backend_pid()
  AND ($2::int4 IS NULL OR l.pid = $2::int4)
ORDER BY l.pid, l.granted DESC, l.mode
"""


async def relation_locks(
    admin: asyncpg.Connection, oid: int, *, pid: int | None = None
) -> list[tuple[int, str, bool]]:
    """``(pid, mode, granted)`` of every lock on relation ``oid`` but the admin's own."""
    rows = await admin.fetch(_RELATION_LOCKS, oid, pid)
    return [(row["pid"], row["mode"], row["granted"]) for row in rows]


async def backend_state(admin: asyncpg.Connection, pid: int) -> str | None:
    """``pg_stat_activity.state`` of backend ``pid`` (None when it is gone)."""
    state: str | None = await admin.fetchval(
        "SELECT state FROM pg_catalog.pg_stat_activity WHERE pid = $1", pid
    )
    return state


async def in_transaction_pids(admin: asyncpg.Connection, application_name: str) -> list[int]:
    """Backends of ``application_name`` inside a transaction (open or aborted)."""
    rows = await admin.fetch(
        "SELECT pid FROM pg_catalog.pg_stat_activity "
        "WHERE application_name = $1 AND xact_start IS NOT NULL ORDER BY pid",
        application_name,
    )
    return [row["pid"] for row in rows]
