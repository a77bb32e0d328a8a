"""The monitor: what ``prioritize()`` and ``Watchdog`` share.

Both run a background task on a connection of their own that polls
``pg_blocking_pids()`` (every lock type: relation, tuple/transactionid row
waits, advisory, ...) joined to ``pg_stat_activity``, and cancels
(``pg_cancel_backend``) or terminates (``pg_terminate_backend``) the
blockers found. This module holds what they have in common:

- the vocabulary: :class:`Action` (what to do to a blocker) and
  :class:`Blocker` (a blocking session as a look finds it);
- :func:`signal`: the one way a blocker is signalled, only if it is still
  the session that was found (same pid *and* ``backend_start``) and still
  blocks one of the waits it was found blocking;
- :class:`MonitorConnection`: the monitor's own connection. It never waits
  for a pool connection that another user holds: the sessions it is there
  to signal may be the ones holding them;
- :class:`BackgroundTask`: the monitor's task, owned by the object that runs it
  (created on the loop, referenced, cancelled and awaited at exit), so no
  task group or cancel scope spans the caller's ``async with`` and a block
  (or a watchdog) may be entered in one task and exited in another (a
  pytest-asyncio fixture, an ``AsyncExitStack``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import inspect
import logging
from collections.abc import Callable, Collection, Coroutine
from datetime import datetime, timedelta
from typing import Any

import anyio
import asyncpg
from asyncpg.pool import PoolConnectionProxy

from . import _otel, _sql_monitor
from ._conntypes import Conn, Pool
from ._db import CLEANUP_STATEMENT_TIMEOUT, check_loop, lease, raw_connection, terminate
from ._errors import UsageError
from ._server import connect_owned
from ._validate import describe

__all__ = [
    "PAST",
    "RETRIED",
    "Action",
    "BackgroundTask",
    "Blocker",
    "Cancel",
    "MonitorConnection",
    "Terminate",
    "blocker_from_row",
    "call",
    "cancel_hint",
    "check_action",
    "check_source",
    "describe_blocker",
    "session_key",
    "signal",
]

logger = logging.getLogger("aiopglock")

# Logged and tried again at the next look: the server's errors, and no free
# pool connection for a monitor connection that has to be replaced.
RETRIED = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    asyncio.TimeoutError,
    UsageError,
)


class Action(enum.Enum):
    """What to do to a blocking session: ``aiopglock.Cancel`` or ``aiopglock.Terminate``.

    - ``Terminate`` (``pg_terminate_backend``): the session ends; every lock it
      held, session-level advisory locks included, is released when its
      process exits. Frees any wait.
    - ``Cancel`` (``pg_cancel_backend``): the session's *running statement* is
      cancelled; inside a transaction that aborts the transaction, which
      releases the transaction's locks. It frees a wait only when the blocker
      is running a statement: an idle session (``idle in transaction``, or
      idle holding a session-level advisory lock) is not affected.

    Example::

        async with aiopglock.prioritize(db=conn, via=pool, action=aiopglock.Cancel):
            await conn.execute("LOCK TABLE orders")
    """

    CANCEL = "cancel"
    TERMINATE = "terminate"

    def __repr__(self) -> str:
        return f"aiopglock.{self.name.capitalize()}"


Cancel = Action.CANCEL
Terminate = Action.TERMINATE

PAST = {Action.CANCEL: "cancelled", Action.TERMINATE: "terminated"}


@dataclasses.dataclass(frozen=True, slots=True)
class Blocker:
    """A session blocking a lock wait, as ``prioritize()`` and ``Watchdog`` see it.

    - ``pid``: the blocking backend (from ``pg_blocking_pids``);
      ``blocked_pid``: the waiting backend it holds up.
    - the blocker's activity (``pg_stat_activity``): ``query`` (its current or
      latest statement), ``state``, ``application_name``, ``user``,
      ``database``, ``backend_type``, ``backend_start``, ``xact_start``,
      ``query_start``.
    - ``age``: how long the blocker has been in its current transaction
      (since ``xact_start``); outside a transaction, since its latest
      statement began (``query_start``) — a lower bound of how long it has
      held a session-level lock, so ``min_age`` errs towards sparing it.
    - ``wait_duration``: how long ``blocked_pid`` has waited for its lock
      (``pg_locks.waitstart`` to ``clock_timestamp()``; None for an instant
      after the wait began).
    - the waiter's ``blocked_query``, ``blocked_application_name``,
      ``blocked_user``, ``blocked_database``.

    Example::

        def only_reports(blocker: aiopglock.Blocker) -> bool:
            return blocker.application_name == "reports"

        async with aiopglock.prioritize(predicate=only_reports, via=pool):
            ...
    """

    pid: int
    blocked_pid: int
    query: str | None = None
    state: str | None = None
    application_name: str | None = None
    user: str | None = None
    database: str | None = None
    backend_type: str | None = None
    backend_start: datetime | None = None
    xact_start: datetime | None = None
    query_start: datetime | None = None
    age: timedelta | None = None
    wait_duration: timedelta | None = None
    blocked_query: str | None = None
    blocked_application_name: str | None = None
    blocked_user: str | None = None
    blocked_database: str | None = None


def check_action(value: object) -> Action:
    if not isinstance(value, Action):
        raise TypeError(
            f"action: expected aiopglock.Cancel or aiopglock.Terminate, got {describe(value)}"
        )
    return value


def check_source(value: object, name: str) -> Pool | str | None:
    """A monitor connection's source: a Pool or a DSN string (or None)."""
    if value is None or isinstance(value, asyncpg.Pool):
        return value
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{name}: the DSN is empty")
        return value
    raise TypeError(f"{name}: expected an asyncpg Pool or a DSN string, got {describe(value)}")


# --------------------------------------------------------------------------- helpers


def blocker_from_row(row: asyncpg.Record) -> Blocker:
    return Blocker(
        pid=row["pid"],
        blocked_pid=row["blocked_pid"],
        query=row["query"],
        state=row["state"],
        application_name=row["application_name"],
        user=row["usename"],
        database=row["datname"],
        backend_type=row["backend_type"],
        backend_start=row["backend_start"],
        xact_start=row["xact_start"],
        query_start=row["query_start"],
        age=row["age"],
        wait_duration=row["wait_duration"],
        blocked_query=row["blocked_query"],
        blocked_application_name=row["blocked_application_name"],
        blocked_user=row["blocked_usename"],
        blocked_database=row["blocked_datname"],
    )


def session_key(action: Action, blocker: Blocker) -> tuple[Any, ...]:
    """What one signal is spent on: a session (Terminate), or one running
    statement of it (Cancel: a new statement may be cancelled again)."""
    if action is Action.CANCEL:
        return (blocker.pid, blocker.backend_start, blocker.query_start)
    return (blocker.pid, blocker.backend_start)


def describe_blocker(blocker: Blocker) -> str:
    return (
        f"backend {blocker.pid} (application {blocker.application_name!r}, "
        f"user {blocker.user!r}, database {blocker.database!r}, state {blocker.state!r}, "
        f"age {blocker.age})"
    )


def cancel_hint(action: Action, blocker: Blocker) -> str:
    if action is Action.CANCEL and blocker.state != "active":
        return " (it is not running a statement: Cancel does not free this wait)"
    return ""


async def call(fn: Callable[..., Any], arg: Any) -> Any:
    """Call a sync or async callable."""
    result = fn(arg)
    if inspect.isawaitable(result):
        result = await result
    return result


async def signal(
    conn: Conn, action: Action, blocker: Blocker, waiters: Collection[int]
) -> bool | None:
    """Signal ``blocker`` if it is still the session found and still blocks
    one of ``waiters``: True iff the server sent the signal, False when it
    did not (the role may not), None when a check failed (the look is stale:
    look again)."""
    statement = (
        _sql_monitor.CANCEL_BLOCKER if action is Action.CANCEL else _sql_monitor.TERMINATE_BLOCKER
    )
    # Shielded: a signal the server sent is known and recorded, even when the
    # block ends (its wait freed by this very signal) meanwhile.
    done: bool | None
    with anyio.CancelScope(shield=True):
        try:
            done = await conn.fetchval(
                statement,
                blocker.pid,
                blocker.backend_start,
                sorted(waiters),
                timeout=CLEANUP_STATEMENT_TIMEOUT,
            )
        except asyncpg.InsufficientPrivilegeError as exc:
            logger.warning(
                "aiopglock: may not %s backend %d (%s): %s",
                action.value,
                blocker.pid,
                blocker.user,
                exc,
                extra=_otel.log_fields(pid=blocker.pid, kind="monitor", outcome="refused"),
            )
            done = False
    if done is None:
        logger.debug("aiopglock: backend %d no longer blocks as found: not signalled", blocker.pid)
    return done


class MonitorConnection:
    """A monitor's own connection: leased from a Pool, opened from a DSN, or
    a caller's Connection used as is (never closed here)."""

    __slots__ = ("_application_name", "_source", "conn")

    def __init__(self, source: Pool | str | Conn, application_name: str) -> None:
        self._source = source
        self._application_name = application_name
        self.conn: Conn | None = None

    def lost(self) -> bool:
        """Whether the connection is gone: closed, or (leased from a Pool)
        taken back by the pool itself when its backend died."""
        if self.conn is None:
            return False
        raw = raw_connection(self.conn)
        return raw is None or bool(raw.is_closed())

    async def get(self) -> Conn:
        """The connection, (re)opened if there is none or it was lost."""
        if self.lost():
            await self.release()
        if self.conn is None:
            self.conn = await self._open()
        return self.conn

    async def _open(self) -> Conn:
        source = self._source
        if isinstance(source, str):
            return await connect_owned(
                source, server_settings={"application_name": self._application_name}
            )
        if isinstance(source, asyncpg.Pool):
            check_loop(source)  # another loop's pool: refused, nothing touched
            conn: PoolConnectionProxy[Any] | None = await lease(source, 0)
            if conn is None:
                raise UsageError(
                    f"{self._application_name}: every connection of the pool "
                    f"(max_size {source.get_max_size()}) is in use, and the monitor never "
                    "waits for one: the sessions it is there to signal may be the ones "
                    "holding them. Give it a pool with room, or a DSN (a connection of its own)"
                )
            try:
                await conn.fetchval(_sql_monitor.SET_APPLICATION_NAME, self._application_name)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._give_back(conn)
                raise
            return conn
        return source  # a caller's Connection

    async def _give_back(self, conn: Conn) -> None:
        source = self._source
        if isinstance(source, asyncpg.Pool):
            assert isinstance(conn, PoolConnectionProxy)  # leased from that pool
            try:
                await source.release(conn, timeout=CLEANUP_STATEMENT_TIMEOUT)
            except Exception as exc:  # the pool could not reset it: never reuse it
                logger.debug("aiopglock: releasing a monitor connection failed: %r", exc)
                terminate(conn)
        elif isinstance(source, str):
            try:
                await conn.close(timeout=CLEANUP_STATEMENT_TIMEOUT)
            except Exception as exc:
                logger.debug("aiopglock: closing a monitor connection failed: %r", exc)
            finally:
                terminate(conn)  # a no-op once closed; interrupted close: drop it

    async def look_failed(self, what: str, interval: float, exc: BaseException) -> None:
        """Log a look that failed (``what``: who looked for what; it is tried
        again in ``interval``) and give back a connection that was lost, so
        that the next look gets a new one."""
        logger.warning("%s failed, trying again in %s s: %r", what, interval, exc)
        if self.lost():
            await self.release()

    async def release(self) -> None:
        """Give the connection back (shielded). Never raises but a cancellation."""
        conn, self.conn = self.conn, None
        if conn is None:
            return
        with anyio.CancelScope(shield=True):
            await self._give_back(conn)


class BackgroundTask:
    """One background task an object owns, started and stopped from any task.

    No task group or cancel scope spans the caller's ``async with``: the task
    is created on the running loop and referenced here; its body runs inside
    a cancel scope of its own (entered and left in that task), which
    :meth:`stop` cancels, so the body's shielded steps (a signal being sent,
    a connection being released) run to their end. :meth:`stop` then awaits
    the task, whichever task calls it.
    """

    __slots__ = ("_scope", "task")

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        self._scope: anyio.CancelScope | None = None

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    async def start(
        self, body: Callable[[Callable[[], None]], Coroutine[Any, Any, None]], name: str
    ) -> asyncio.Task[None]:
        """Run ``body(ready)`` in a new task; return once it calls ``ready()``.
        A failure before that is raised here (and the task is gone)."""
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        scope = anyio.CancelScope()

        def set_ready() -> None:
            if not ready.done():
                ready.set_result(None)

        async def main() -> None:
            with scope:
                await body(set_ready)

        task = loop.create_task(main(), name=name)
        self.task, self._scope = task, scope
        try:
            await asyncio.wait((ready, task), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            await self.stop()  # the caller was cancelled while it started
            raise
        if not ready.done():
            self.task = self._scope = None
            ready.cancel()
            if task.cancelled():
                raise asyncio.CancelledError(f"{name} was cancelled as it started")
            failure = task.exception()
            assert failure is not None
            raise failure
        return task

    def cancel_soon(self) -> None:
        """Ask the task to stop, from anywhere (a finaliser): thread-safe, never raises."""
        task, scope = self.task, self._scope
        if task is None or scope is None or task.done():
            return
        # A closed loop (RuntimeError) never runs the task again anyway.
        with contextlib.suppress(RuntimeError):
            task.get_loop().call_soon_threadsafe(scope.cancel)

    async def stop(self) -> BaseException | None:
        """Stop the task and wait for its end, even through the caller's own
        cancellation (re-raised afterwards). Returns the exception the task
        failed with, if it failed. Idempotent."""
        task, scope = self.task, self._scope
        self.task = self._scope = None
        if task is None or scope is None:
            return None
        scope.cancel()
        interrupted: BaseException | None = None
        with anyio.CancelScope(shield=True):
            while not task.done():
                try:
                    await asyncio.wait((task,))
                except asyncio.CancelledError as exc:  # a raw cancel: finish first
                    interrupted = exc
        failure = None if task.cancelled() else task.exception()
        if interrupted is not None:
            if failure is not None:
                logger.error("aiopglock: %s failed", task.get_name(), exc_info=failure)
            raise interrupted
        return failure
