"""Resolving ``db=``, the configured default, and leasing and closing connections."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from typing import Any, TypeVar, Union

import anyio
import asyncpg
from asyncpg.pool import PoolConnectionProxy

from . import _names, _otel
from ._asyncpg import loop_of, pool_has_free, proxy_connection
from ._conntypes import Conn, Pool, Proxy, RawConn
from ._errors import UsageError
from ._validate import check_bool, describe, is_number

__all__ = [
    "DB",
    "check_db",
    "check_loop",
    "configure",
    "heartbeat_interval",
    "resolve_db",
]

logger = logging.getLogger("aiopglock")

DB = Union[
    "asyncpg.Pool[Any]",
    "asyncpg.Connection[Any]",
    "PoolConnectionProxy[Any]",
    Callable[[], Any],
]
"""``db=``: a Pool, a Connection (a pool's proxy too) or a zero-argument callable returning one."""

T = TypeVar("T")

_UNSET: Any = object()
_default_db: Any = None
_heartbeat: float = 5.0
_session_pooler = False

# How long one cleanup statement may take before the connection is discarded,
# and how many times a cleanup step is tried (a late CancelRequest can cancel
# the statement that follows the one it was meant for).
CLEANUP_STATEMENT_TIMEOUT = 10.0
CLEANUP_ATTEMPTS = 4


class PoolFront:
    """Base of objects accepted as ``db=`` wherever a Pool is (``aiopglock.Locker``).

    :func:`resolve_db` turns one into its ``pool``; with ``front=True`` it is
    returned itself, for callers that route to it (advisory locks).
    """

    __slots__ = ()

    @property
    def pool(self) -> Pool:
        raise NotImplementedError

    async def enter_advisory(
        self,
        key: Any,
        *,
        shared: bool,
        xact: bool,
        timeout: float | None,
        side_effect: Any,
        cancel_on_lost: bool,
        fence: bool = False,
        text: str | None = None,
    ) -> Any:
        """Take the lock of ``aiopglock.advisory(key, db=self, ...)`` (arguments
        already validated); returns its handle, left with ``await handle._exit(exc)``."""
        raise NotImplementedError


def check_db(db: object, name: str = "db") -> None:
    """Raise TypeError unless ``db`` can be resolved at call time."""
    if db is None or isinstance(db, (asyncpg.Pool, asyncpg.Connection, PoolFront)):
        return
    if callable(db):
        return
    raise TypeError(
        f"{name}: expected an asyncpg Pool, an asyncpg Connection or a zero-argument "
        f"callable returning one, got {describe(db)}"
    )


def configure(
    *,
    db: Any = _UNSET,
    heartbeat: Any = _UNSET,
    session_pooler: Any = _UNSET,
    record_names: Any = _UNSET,
    server_names: Any = _UNSET,
) -> None:
    """Set process-wide defaults.

    - ``db``: used by every call that omits ``db=`` (a Pool, Connection or
      zero-argument callable; ``None`` clears it).
    - ``heartbeat``: a connection aiopglock owns that stops answering while it
      holds a lock is noticed within this many seconds (default 5.0; it is
      checked every half interval, lazily: short locks never are).
    - ``session_pooler``: ``True`` declares that connections go through a
      pooler in *session* mode (each client keeps one server session), where
      session-level locks are valid; by default a session lock through a
      pooler is refused with :class:`aiopglock.UsageError` (default False).
    - ``record_names``: ``True`` adds the text of a ``str`` key to the
      OpenTelemetry span of each wait (``aiopglock.lock.name``); by default
      only the int key is recorded, so attributes stay bounded and names
      that hold user data stay out of traces (default False).
    - ``server_names``: ``False`` keeps the text of ``str`` keys off the
      server. By default a ``str`` key's lock statement starts with a comment
      naming it (``/* aiopglock "orders:42" */``), so ``pg_stat_activity``
      and :func:`aiopglock.locks` show which name a session waits for or
      holds; anyone who may read the session's query (and the server log,
      where statements are logged) sees the name (default True).

    Example::

        pool = await asyncpg.create_pool(dsn)
        aiopglock.configure(db=pool)

        @aiopglock.advisory(timeout=0, side_effect=aiopglock.Skip)
        async def nightly_report() -> None: ...
    """
    global _default_db, _heartbeat, _session_pooler
    # Validate everything before changing anything.
    if db is not _UNSET:
        check_db(db)
    if heartbeat is not _UNSET:
        if not is_number(heartbeat):
            raise TypeError(f"heartbeat: expected a number of seconds, got {describe(heartbeat)}")
        if not heartbeat > 0 or heartbeat == float("inf"):
            raise ValueError(f"heartbeat: expected a positive number of seconds, got {heartbeat!r}")
    if session_pooler is not _UNSET:
        check_bool(session_pooler, "session_pooler")
    if record_names is not _UNSET:
        check_bool(record_names, "record_names")
    if server_names is not _UNSET:
        check_bool(server_names, "server_names")
    if record_names is not _UNSET:
        _otel.set_record_names(record_names)
    if server_names is not _UNSET:
        _names.set_enabled(server_names)
    if db is not _UNSET:
        _default_db = db
    if session_pooler is not _UNSET:
        _session_pooler = session_pooler
    if heartbeat is not _UNSET:
        _heartbeat = float(heartbeat)


def heartbeat_interval() -> float:
    return _heartbeat


def session_pooler() -> bool:
    """Whether ``configure(session_pooler=True)`` declared a session-mode pooler."""
    return _session_pooler


def resolve_db(db: Any, *, front: bool = False) -> Any:
    """Turn ``db=`` into a Pool or a Connection, at call time. A
    :class:`PoolFront` (a Locker) becomes its pool, unless ``front``.

    A Pool or Connection of another event loop than the running one is a
    :class:`UsageError` (see :func:`check_loop`): nothing is sent on it."""
    if db is None:
        db = _default_db
        if db is None:
            raise UsageError(
                "no database given: pass db= (an asyncpg Pool or Connection) "
                "or call aiopglock.configure(db=...) first"
            )
    if isinstance(db, (asyncpg.Pool, asyncpg.Connection)):
        check_loop(db)
        return db
    if isinstance(db, PoolFront):
        check_loop(db.pool)
        return db if front else db.pool
    if callable(db):
        resolved = db()
        if isinstance(resolved, (asyncpg.Pool, asyncpg.Connection)):
            check_loop(resolved)
            return resolved
        if isinstance(resolved, PoolFront):
            check_loop(resolved.pool)
            return resolved if front else resolved.pool
        if inspect.iscoroutine(resolved):
            resolved.close()  # never awaited: say so once, as a TypeError
        raise TypeError(
            f"db: the callable returned {describe(resolved)}, "
            "expected an asyncpg Pool or Connection"
        )
    raise TypeError(f"db: expected an asyncpg Pool or Connection, got {describe(db)}")


def check_loop(db: Pool | Conn) -> None:
    """Raise :class:`UsageError` when ``db`` (a Pool or Connection) belongs to
    another event loop than the running one (made in another thread, or in an
    earlier ``asyncio.run()``). asyncpg would fail with a RuntimeError half-way
    through a statement, and cleanup would then close that loop's connection
    from the wrong thread: refused before anything is sent, nothing touched.
    Outside a running loop, or when asyncpg does not say its loop, nothing is
    checked."""
    loop = loop_of(db)
    if loop is None:
        return
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        return
    if loop is not running:
        kind = "Pool" if isinstance(db, asyncpg.Pool) else "Connection"
        raise UsageError(
            f"db: this asyncpg {kind} belongs to another event loop than the running one "
            "(it was made in another thread or another asyncio.run()); asyncpg objects "
            f"work only in their own loop: create the {kind} in this loop, or run this "
            "call in its loop (asyncio.run_coroutine_threadsafe); nothing was sent on it"
        )


def raw_connection(conn: Conn) -> RawConn | None:
    """The asyncpg Connection behind a pool's proxy (None once the proxy is released)."""
    if isinstance(conn, PoolConnectionProxy):
        return proxy_connection(conn)
    return conn


def terminate(conn: Conn) -> None:
    """Close ``conn`` at once without a round trip; safe on a closed or released one."""
    raw = raw_connection(conn)
    if raw is not None and not raw.is_closed():
        raw.terminate()


# -- leasing a pool connection within a timeout -------------------------------


async def lease(pool: Pool, timeout: float | None) -> Proxy | None:
    """A connection from ``pool`` within ``timeout`` (the one meaning of
    ``timeout=``: ``None`` waits as asyncpg does, ``0`` never waits for
    another user's connection, ``> 0`` waits at most that long), or None.

    Never passes ``timeout`` to ``pool.acquire()``: asyncpg would also apply
    it to the connection's reset when it is released, and a short lock
    timeout must not cut that short. The wait runs inline in the calling task
    (no extra task), so a connection handed over as the deadline passes is
    never lost: asyncpg's queue keeps it when the wait is interrupted.

    Example::

        conn = await lease(pool, 0.5)
        if conn is None:
            ...  # every connection stayed in use for 0.5 s
    """
    if timeout is None:
        return await pool.acquire()
    if timeout == 0:
        if not pool_has_free(pool):
            return None
        return await pool.acquire()
    conn = None
    with anyio.move_on_after(timeout):
        conn = await pool.acquire()
    return conn


class Deadline:
    """The rest of one ``timeout`` across several waits (a pool connection,
    then the lock). ``remaining()`` keeps ``None`` and ``0`` as they are."""

    __slots__ = ("_end", "timeout")

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self._end = (
            None if timeout is None or timeout == 0 else asyncio.get_running_loop().time() + timeout
        )

    def remaining(self) -> float | None:
        """Seconds left (at least 1 ms while the wait is still on, so a
        server-side ``lock_timeout`` is never 0, which would mean no limit)."""
        if self._end is None:
            return self.timeout
        return max(self._end - asyncio.get_running_loop().time(), 0.001)

    def expired(self) -> bool:
        return self._end is not None and asyncio.get_running_loop().time() >= self._end


# -- a full lock table --------------------------------------------------------


def lock_table_full(exc: BaseException) -> BaseException:
    """SQLSTATE 53200 ("out of shared memory") as raised by a lock statement,
    with a message naming the setting that sizes the lock table; any other
    exception unchanged. The class stays ``asyncpg.OutOfMemoryError``, so
    code that catches it still does; raise the result ``from exc``."""
    if not isinstance(exc, asyncpg.exceptions.OutOfMemoryError):
        return exc
    return asyncpg.exceptions.OutOfMemoryError(
        "PostgreSQL's shared lock table is full (SQLSTATE 53200): it holds about "
        "max_locks_per_transaction x (max_connections + max_prepared_transactions) "
        "locks for the whole server; raise max_locks_per_transaction (needs a restart) "
        f"or hold fewer locks at once. Server said: {exc}"
    )
