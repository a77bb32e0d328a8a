"""Helpers for tests that look at the real server.

Import them as ``from tests._helpers import holders, wait_for_waiter``.

Everything here observes PostgreSQL through an *admin* connection (the
``admin`` fixture): a connection of its own, so that looking at ``pg_locks``
never disturbs the sessions under test. ``wait_until`` is the sanctioned way
to wait for server state: never ``asyncio.sleep`` and hope.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import anyio
import asyncpg
import pytest

__all__ = [
    "AdvisoryKey",
    "Connect",
    "PgServer",
    "RestartServer",
    "advisory_locks",
    "check_local_backend",
    "holders",
    "process_title",
    "split_key",
    "wait_for_release",
    "wait_for_waiter",
    "wait_until",
    "waiters",
]

T = TypeVar("T")

#: An advisory key as PostgreSQL takes it: one int8, or a pair of int4.
AdvisoryKey = int | tuple[int, int]
#: The ``connect`` fixture: ``await connect(**asyncpg_connect_kwargs)``.
Connect = Callable[..., Awaitable[asyncpg.Connection]]
#: The ``restart_server`` fixture: ``await restart_server()``.
RestartServer = Callable[[], Awaitable[None]]

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_U32 = 0xFFFF_FFFF


class PgServer:
    """The PostgreSQL server of this test session (the ``pg_server`` fixture).

    ``kind`` is ``"external"`` (``AIOPGLOCK_TEST_DSN``), ``"docker"``
    (``AIOPGLOCK_TEST_DOCKER=1``) or ``"embedded"``. Only the embedded server
    can be restarted.
    """

    __slots__ = ("_restart", "dsn", "kind", "version")

    def __init__(
        self,
        dsn: str,
        *,
        kind: str,
        version: int,
        restart: Callable[[], None] | None = None,
    ) -> None:
        self.dsn = dsn
        self.kind = kind
        #: ``server_version_num``, e.g. 150019 or 180006.
        self.version = version
        self._restart = restart

    @property
    def embedded(self) -> bool:
        return self.kind == "embedded"

    def restart(self) -> None:
        """Restart the server (``pg_ctl restart -m fast -w``): blocking, embedded only.

        Every session is terminated; new connections work once this returns.
        From async code use the ``restart_server`` fixture instead.
        """
        if self._restart is None:
            raise RuntimeError(
                f"the {self.kind} PostgreSQL server cannot be restarted by the tests: "
                "only the embedded one can"
            )
        self._restart()

    def __repr__(self) -> str:
        return f"<PgServer {self.kind} v{self.version} {self.dsn}>"


def split_key(key: AdvisoryKey) -> tuple[int, int, int]:
    """``(classid, objid, objsubid)`` under which ``pg_locks`` shows an advisory key.

    An int8 key ``k`` is shown as its high and low 32 bits, each read as
    unsigned, with ``objsubid = 1``; an int4 pair ``(a, b)`` as ``a`` and
    ``b`` read as unsigned 32-bit numbers, with ``objsubid = 2``.

    >>> split_key(-1)
    (4294967295, 4294967295, 1)
    >>> split_key((1, -2))
    (1, 4294967294, 2)
    """
    if isinstance(key, bool):
        raise TypeError(f"advisory key must be int or (int, int), not {key!r}")
    if isinstance(key, int):
        if not _INT64_MIN <= key <= _INT64_MAX:
            raise ValueError(f"advisory key {key} does not fit int8")
        unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
        return unsigned >> 32, unsigned & _U32, 1
    if isinstance(key, tuple) and len(key) == 2:
        for half in key:
            if isinstance(half, bool) or not isinstance(half, int):
                raise TypeError(f"advisory key pair must hold two ints, not {key!r}")
            if not _INT32_MIN <= half <= _INT32_MAX:
                raise ValueError(f"advisory key pair {key} does not fit int4")
        return key[0] & _U32, key[1] & _U32, 2
    raise TypeError(f"advisory key must be int or (int, int), not {key!r}")


_ADVISORY_LOCKS = """\
SELECT l.*
FROM pg_catalog.pg_locks AS l
WHERE l.locktype = 'advisory'
  AND l.database = (
      SELECT d.oid FROM pg_catalog.pg_database AS d WHERE d.datname = current_database()
  )
  AND l.pid IS DISTINCT FROM pg_backend_pid()
  AND ($1::int4 IS NULL OR l.pid = $1::int4)
  AND ($2::bool IS NULL OR l.granted = $2::bool)
  AND ($3::oid IS NULL OR (l.classid = $3::oid AND l.objid = $4::oid AND l.objsubid = $5::int2))
  AND ($6::text IS NULL OR l.mode = $6::text)
ORDER BY l.pid, l.classid, l.objid, l.objsubid, l.mode
"""


async def advisory_locks(
    admin: asyncpg.Connection,
    *,
    pid: int | None = None,
    granted: bool | None = None,
    key: AdvisoryKey | None = None,
    mode: str | None = None,
) -> list[asyncpg.Record]:
    """Rows of ``pg_locks`` for advisory locks in the current database.

    The admin connection's own locks are left out. Filters: ``pid``,
    ``granted`` (False: waits), ``key`` (int8 or int4 pair) and ``mode``
    (``"ExclusiveLock"`` or ``"ShareLock"``). Rows are ordered by pid, then key.
    """
    parts: tuple[int | None, int | None, int | None] = (None, None, None)
    if key is not None:
        parts = split_key(key)
    rows: list[asyncpg.Record] = await admin.fetch(_ADVISORY_LOCKS, pid, granted, *parts, mode)
    return rows


async def holders(
    admin: asyncpg.Connection, key: AdvisoryKey, *, mode: str | None = None
) -> list[int]:
    """Pids of the backends holding advisory ``key`` (granted), sorted."""
    rows = await advisory_locks(admin, key=key, granted=True, mode=mode)
    return sorted({row["pid"] for row in rows})


async def waiters(
    admin: asyncpg.Connection, key: AdvisoryKey, *, mode: str | None = None
) -> list[int]:
    """Pids of the backends waiting for advisory ``key`` (not granted), sorted."""
    rows = await advisory_locks(admin, key=key, granted=False, mode=mode)
    return sorted({row["pid"] for row in rows})


async def wait_until(
    predicate: Callable[[], Awaitable[T]],
    *,
    timeout: float = 10.0,
    interval: float = 0.01,
    message: str | None = None,
) -> T:
    """Await ``predicate()`` every ``interval`` seconds until it returns something truthy.

    Returns that value. After ``timeout`` seconds: ``AssertionError`` naming
    ``message`` (or the predicate) and its last value.
    """
    deadline = anyio.current_time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if anyio.current_time() >= deadline:
            what = message or getattr(predicate, "__qualname__", repr(predicate))
            raise AssertionError(
                f"timed out after {timeout} s waiting for {what}; last value: {value!r}"
            )
        await anyio.sleep(interval)


async def wait_for_waiter(
    admin: asyncpg.Connection, key: AdvisoryKey, timeout: float = 10.0
) -> int:
    """Wait until some backend waits for advisory ``key``; return its pid (lowest if several)."""
    pids = await wait_until(
        lambda: waiters(admin, key),
        timeout=timeout,
        message=f"a backend waiting for advisory key {key!r}",
    )
    return pids[0]


async def wait_for_release(
    admin: asyncpg.Connection, key: AdvisoryKey, timeout: float = 10.0
) -> None:
    """Wait until no backend holds advisory ``key`` (a terminated backend lets go a moment late)."""

    async def released() -> bool:
        return not await holders(admin, key)

    await wait_until(released, timeout=timeout, message=f"advisory key {key!r} to be released")


def process_title(pid: int) -> bytes:
    """The command line of local process ``pid`` (a backend shows its process title)."""
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")


async def check_local_backend(admin: asyncpg.Connection, pid: int) -> None:
    """Skip unless ``pid`` is, on this machine, the very backend the server
    reports (never signal an unrelated process of the same number)."""
    row = await admin.fetchrow("SELECT client_port FROM pg_stat_activity WHERE pid = $1", pid)
    assert row is not None, f"backend {pid} is not in pg_stat_activity"
    try:
        title = process_title(pid)
    except OSError as exc:
        pytest.skip(f"the server's backend {pid} is not a process of this machine: {exc!r}")
    port = row["client_port"]
    where = b"[local]" if port is None or port == -1 else f"({port})".encode()
    if not title.startswith(b"postgres") or where not in title:
        pytest.skip(f"process {pid} on this machine is not the server's backend: {title!r}")
