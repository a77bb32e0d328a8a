"""``prioritize()`` and ``Watchdog``: act on the sessions that block lock waits.

Both run a background task on a connection of their own that polls
``pg_blocking_pids()`` (every lock type: relation, tuple/transactionid row
waits, advisory, ...) joined to ``pg_stat_activity``, and cancels
(``pg_cancel_backend``) or terminates (``pg_terminate_backend``) the
blockers found:

- :func:`prioritize` for the duration of a block, on behalf of the work in
  that block (one Connection's backend, or every lock wait aiopglock issues
  inside the block: see :mod:`aiopglock._protect`);
- :class:`Watchdog` for a service's lifetime, on behalf of any session that
  has waited longer than ``max_wait``.

Lifecycles: the background task is owned by the object (:class:`_Owned`):
created on the loop, referenced, cancelled and awaited at exit, so no task
group or cancel scope spans the caller's ``async with`` and the block (or
the watchdog) may be entered in one task and exited in another (a
pytest-asyncio fixture, an ``AsyncExitStack``). Entry returns once the task
has its connection (a failure to get one is raised there); its connection is
released (or closed) under a shield. ``Watchdog.run`` runs in the caller's
task group instead.

A monitor never waits for a pool connection that another user holds: the
sessions it is there to signal may be the ones holding them.

A backend is signalled only if it is still the session that was found (same
pid *and* ``backend_start``), never the monitor's own backend, never a
protected backend, and once per session for ``Terminate`` (once per running
statement for ``Cancel``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import functools
import inspect
import logging
import math
import warnings
import weakref
from collections.abc import Awaitable, Callable, Collection, Coroutine, Iterable
from datetime import datetime, timedelta, timezone
from types import TracebackType
from typing import Any, TypeVar, cast

import anyio
import anyio.abc
import asyncpg

from . import _protect, _sql
from ._cancel import BlockCanceller
from ._db import (
    CLEANUP_STATEMENT_TIMEOUT,
    DB,
    check_db,
    check_loop,
    lease,
    raw_connection,
    resolve_db,
    terminate,
)
from ._decorate import target
from ._errors import UsageError
from ._handles import Entered
from ._server import connect_owned
from ._validate import (
    check_bool,
    check_callable,
    check_name,
    check_names,
    check_pids,
    check_seconds,
    describe,
    is_int,
)

__all__ = [
    "Action",
    "Blocker",
    "Cancel",
    "Intervention",
    "Prioritize",
    "Prioritizer",
    "Terminate",
    "Watchdog",
    "prioritize",
]

logger = logging.getLogger("aiopglock")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

# After a protected wait begins (or a blocker was signalled), look again after
# this long, doubling up to ``interval``: the wait's statement may not have
# reached the server yet, and a terminated blocker takes a moment to exit.
_RECHECK = 0.005

# How long an async Watchdog callback may still run once the watchdog is stopping.
_CALLBACK_GRACE = 5.0

_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, asyncio.TimeoutError)
# Logged and tried again at the next look: the server's errors, and no free
# pool connection for a monitor connection that has to be replaced.
_RETRIED = (*_DB_ERRORS, UsageError)


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

_PAST = {Action.CANCEL: "cancelled", Action.TERMINATE: "terminated"}


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


@dataclasses.dataclass(frozen=True, slots=True)
class Intervention:
    """One action of a :class:`Watchdog` (what its ``callback`` receives).

    - ``blocker``: the blocking session (a :class:`Blocker`; its
      ``blocked_pid`` and ``wait_duration`` are those of the longest waiter).
    - ``waiter_pids``: every watched session it held up past ``max_wait``.
    - ``wait_duration``: the longest of those waits.
    - ``action``: ``aiopglock.Cancel`` or ``aiopglock.Terminate``.
    - ``dry_run``: True when the watchdog only reports.
    - ``signalled``: True iff the server confirmed the signal (always False
      in a dry run; False too when the watchdog's role may not signal it).
      A blocker that let go (or ended) between the look and the signal is
      neither signalled nor reported.
    - ``at``: when it happened (UTC, client clock).

    Example::

        def report(action: aiopglock.Intervention) -> None:
            print(action.action, action.blocker.pid, action.wait_duration, action.signalled)

        watchdog = aiopglock.Watchdog(pool, max_wait=30, callback=report)
    """

    blocker: Blocker
    waiter_pids: tuple[int, ...]
    wait_duration: timedelta | None
    action: Action
    dry_run: bool
    signalled: bool
    at: datetime


# --------------------------------------------------------------------------- validation


def _check_action(value: object) -> Action:
    if not isinstance(value, Action):
        raise TypeError(
            f"action: expected aiopglock.Cancel or aiopglock.Terminate, got {describe(value)}"
        )
    return value


def _check_pid_collection(value: object, name: str) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{name}: expected a collection of pids, got {describe(value)}")
    return tuple(check_pids(value, name))


def _check_source(value: object, name: str) -> Any:
    """A monitor connection's source: a Pool or a DSN string (or None)."""
    if value is None or isinstance(value, asyncpg.Pool):
        return value
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{name}: the DSN is empty")
        return value
    raise TypeError(f"{name}: expected an asyncpg Pool or a DSN string, got {describe(value)}")


# --------------------------------------------------------------------------- helpers


def _blocker(row: Any) -> Blocker:
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


def _session_key(action: Action, blocker: Blocker) -> tuple[Any, ...]:
    """What one signal is spent on: a session (Terminate), or one running
    statement of it (Cancel: a new statement may be cancelled again)."""
    if action is Action.CANCEL:
        return (blocker.pid, blocker.backend_start, blocker.query_start)
    return (blocker.pid, blocker.backend_start)


def _describe_blocker(blocker: Blocker) -> str:
    return (
        f"backend {blocker.pid} (application {blocker.application_name!r}, "
        f"user {blocker.user!r}, database {blocker.database!r}, state {blocker.state!r}, "
        f"age {blocker.age})"
    )


def _cancel_hint(action: Action, blocker: Blocker) -> str:
    if action is Action.CANCEL and blocker.state != "active":
        return " (it is not running a statement: Cancel does not free this wait)"
    return ""


async def _call(fn: Callable[..., Any], arg: Any) -> Any:
    """Call a sync or async callable."""
    result = fn(arg)
    if inspect.isawaitable(result):
        result = await result
    return result


async def _signal(
    conn: Any, action: Action, blocker: Blocker, waiters: Collection[int]
) -> bool | None:
    """Signal ``blocker`` if it is still the session found and still blocks
    one of ``waiters``: True iff the server sent the signal, False when it
    did not (the role may not), None when a check failed (the look is stale:
    look again)."""
    statement = _sql.CANCEL_BLOCKER if action is Action.CANCEL else _sql.TERMINATE_BLOCKER
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
            )
            done = False
    if done is None:
        logger.debug("aiopglock: backend %d no longer blocks as found: not signalled", blocker.pid)
    return done


class _MonitorConnection:
    """A monitor's own connection: leased from a Pool, opened from a DSN, or
    a caller's Connection used as is (never closed here)."""

    __slots__ = ("_application_name", "_source", "conn")

    def __init__(self, source: Any, application_name: str) -> None:
        self._source = source
        self._application_name = application_name
        self.conn: Any = None

    def lost(self) -> bool:
        """Whether the connection is gone: closed, or (leased from a Pool)
        taken back by the pool itself when its backend died."""
        if self.conn is None:
            return False
        raw = raw_connection(self.conn)
        return raw is None or bool(raw.is_closed())

    async def get(self) -> Any:
        """The connection, (re)opened if there is none or it was lost."""
        if self.lost():
            await self.release()
        if self.conn is None:
            self.conn = await self._open()
        return self.conn

    async def _open(self) -> Any:
        source = self._source
        if isinstance(source, str):
            return await connect_owned(
                source, server_settings={"application_name": self._application_name}
            )
        if isinstance(source, asyncpg.Pool):
            check_loop(source)  # another loop's pool: refused, nothing touched
            conn = await lease(source, 0)
            if conn is None:
                raise UsageError(
                    f"{self._application_name}: every connection of the pool "
                    f"(max_size {source.get_max_size()}) is in use, and the monitor never "
                    "waits for one: the sessions it is there to signal may be the ones "
                    "holding them. Give it a pool with room, or a DSN (a connection of its own)"
                )
            try:
                await conn.fetchval(_sql.SET_APPLICATION_NAME, self._application_name)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._give_back(conn)
                raise
            return conn
        return source  # a caller's Connection

    async def _give_back(self, conn: Any) -> None:
        source = self._source
        if isinstance(source, asyncpg.Pool):
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

    async def release(self) -> None:
        """Give the connection back (shielded). Never raises but a cancellation."""
        conn, self.conn = self.conn, None
        if conn is None:
            return
        with anyio.CancelScope(shield=True):
            await self._give_back(conn)


class _Owned:
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


# --------------------------------------------------------------------------- prioritize


class Prioritizer:
    """The handle of one running :func:`aiopglock.prioritize` block.

    Attributes:

    - ``signalled``: the pids actually signalled (the server confirmed it),
      each once, in order; ``blockers``: one :class:`Blocker` per signal.
    - ``action``, ``interval``.
    - ``protected_pid``: the backend protected (``db`` a Connection), else None.
    - ``monitor_pid``: the monitor connection's backend while the block runs.
    - ``polls``: how many times the monitor has looked for blockers.

    Example::

        async with aiopglock.prioritize(via=pool) as prioritizer:
            async with aiopglock.advisory("report", db=pool):
                ...
        print("terminated", prioritizer.signalled)
    """

    __slots__ = (
        "_canceller",
        "_handled",
        "_monitor",
        "_owned",
        "_protection",
        "_spec",
        "_token",
        "_wakeup",
        "action",
        "blockers",
        "interval",
        "monitor_pid",
        "polls",
        "protected_pid",
    )

    def __init__(self, spec: Prioritize) -> None:
        self._spec = spec
        self.action = spec._action
        self.interval = spec._interval
        self.blockers: list[Blocker] = []
        self.polls = 0
        self.monitor_pid: int | None = None
        self.protected_pid: int | None = None
        self._handled: set[tuple[Any, ...]] = set()
        self._protection: _protect.Protection | None = None
        self._token: Any = None
        self._wakeup = anyio.Event()
        self._monitor: _MonitorConnection | None = None
        self._owned: _Owned | None = None
        self._canceller: BlockCanceller | None = None

    @property
    def signalled(self) -> list[int]:
        """The pids actually signalled, each once, in the order they were."""
        return list(dict.fromkeys(blocker.pid for blocker in self.blockers))

    @property
    def running(self) -> bool:
        return self._owned is not None

    def __repr__(self) -> str:
        state = f"running monitor_pid={self.monitor_pid}" if self.running else "stopped"
        if self.protected_pid is not None:
            protects = f"protecting pid={self.protected_pid}"
        elif self._protection is not None:
            protects = f"protecting waits={sorted(self._protection.pids())}"
        else:
            protects = "protecting waits"
        return (
            f"<Prioritizer {self.action!r} interval={self.interval} {state} {protects} "
            f"polls={self.polls} signalled={self.signalled}>"
        )

    # -- lifecycle

    def _monitor_source(self, target: Any) -> Any:
        via = self._spec._via
        if via is not None:
            return via
        if isinstance(target, asyncpg.Pool):
            return target
        what = "db is a Connection, and " if target is not None else ""
        try:
            default = resolve_db(None)
        except UsageError:
            default = None
        if isinstance(default, asyncpg.Pool):
            return default
        raise UsageError(
            f"prioritize() needs a connection of its own for its monitor: {what}no via= "
            "(an asyncpg Pool or a DSN) was given and the configured default "
            "(aiopglock.configure(db=...)) is not a Pool"
        )

    async def _enter(self) -> Prioritizer:
        spec = self._spec
        target = None if spec._db is None else resolve_db(spec._db)
        if isinstance(target, asyncpg.Connection):
            self.protected_pid = target.get_server_pid()
        self._monitor = _MonitorConnection(
            self._monitor_source(target), spec._monitor_application_name
        )
        if self.protected_pid is None:
            self._protection = _protect.Protection(parent=_protect.current.get())
            self._protection.listener = self._on_wait
        task = asyncio.current_task()
        assert task is not None
        owned = _Owned()
        try:
            monitor_task = await owned.start(self._run, "aiopglock.prioritize monitor")
        except BaseException:
            if self._protection is not None:
                self._protection.close()
            raise
        # The monitor failing (a predicate raising) ends the block: the task
        # that entered it is cancelled once, as asyncio.timeout() would, and
        # the failure is raised at exit in place of that cancellation.
        self._canceller = BlockCanceller(task)
        monitor_task.add_done_callback(self._on_monitor_done)
        self._owned = owned
        if self._protection is not None:
            self._token = _protect.current.set(self._protection)
        return self

    def _on_monitor_done(self, task: asyncio.Task[None]) -> None:
        canceller = self._canceller
        if canceller is not None and not task.cancelled() and task.exception() is not None:
            canceller.fire("aiopglock.prioritize: the monitor failed")

    async def _exit(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        canceller, self._canceller = self._canceller, None
        ours = canceller.settle(exc) if canceller is not None else False
        if self._token is not None:
            token, self._token = self._token, None
            try:
                _protect.current.reset(token)
            except ValueError:
                # Exited in another context than the one that entered (another
                # task): leave this one as the enclosing block had it.
                if _protect.current.get() is self._protection:
                    _protect.current.set(self._protection.parent if self._protection else None)
        if self._protection is not None:
            self._protection.close()
        owned, self._owned = self._owned, None
        if owned is None:
            return None
        failure = await owned.stop()
        if failure is None:
            return None
        if exc is not None and not ours and isinstance(exc, asyncio.CancelledError):
            # Somebody else cancelled the block: that cancellation goes on.
            logger.error("aiopglock.prioritize: the monitor failed", exc_info=failure)
            return None
        if exc is not None and not ours:
            failure.__context__ = exc
        raise failure

    # -- the monitor

    def _on_wait(self) -> None:
        self._wakeup.set()

    def _protected(self) -> frozenset[int]:
        if self.protected_pid is not None:
            return frozenset((self.protected_pid,))
        assert self._protection is not None
        return self._protection.pids()

    async def _run(self, ready: Callable[[], None]) -> None:
        monitor = self._monitor
        assert monitor is not None
        try:
            conn = await monitor.get()  # a bad DSN fails here, raised at entry
            self.monitor_pid = conn.get_server_pid()
            ready()
            await self._watch(monitor)
        finally:
            await monitor.release()
            self.monitor_pid = None

    async def _watch(self, monitor: _MonitorConnection) -> None:
        delay = 0.0  # the first look is immediate
        recheck = _RECHECK
        while True:
            if delay > 0:
                wakeup = self._wakeup
                with anyio.move_on_after(delay):
                    await wakeup.wait()
                if wakeup.is_set():
                    recheck = _RECHECK  # a new wait began: look at it promptly
            self._wakeup = anyio.Event()
            pids = self._protected()
            if not pids:
                delay = math.inf  # until a protected wait begins
                continue
            try:
                acted, seen = await self._poll(monitor, pids)
            except _RETRIED as exc:
                logger.warning(
                    "aiopglock.prioritize: looking for blockers failed, trying again in %s s: %r",
                    self.interval,
                    exc,
                )
                if monitor.lost():
                    await monitor.release()
                delay = self.interval
                continue
            if acted or pids - seen:
                # A blocker is exiting, or a wait has not reached the server
                # yet (or has just been granted): look again soon.
                delay = min(recheck, self.interval)
                recheck = min(recheck * 2, self.interval)
            else:
                delay = self.interval

    async def _poll(
        self, monitor: _MonitorConnection, pids: frozenset[int]
    ) -> tuple[bool, set[int]]:
        spec = self._spec
        conn = await monitor.get()
        self.monitor_pid = conn.get_server_pid()
        protection = self._protection
        # The block's own backends (waiting or exempt) from now until the
        # decision: the rows are a snapshot, and one of them may have let go
        # and gone back to its pool meanwhile.
        own = protection.mark() if protection is not None else frozenset()
        rows = await conn.fetch(
            _sql.PRIORITIZE_BLOCKERS, sorted(pids), spec._include_other_databases
        )
        self.polls += 1
        seen: set[int] = set()
        found: dict[int, Blocker] = {}
        for row in rows:
            seen.add(row["blocked_pid"])
            found.setdefault(row["pid"], _blocker(row))
        if protection is not None:
            own |= protection.since_mark()
        acted = False
        for blocker in found.values():
            key = _session_key(self.action, blocker)
            if key in self._handled:
                acted = True  # signalled already, still on its way out
                continue
            if blocker.pid in own or blocker.pid in self._protected():
                # It holds (or may hold) a lock of the block's own work, or it
                # is a protected wait that began while the query ran.
                continue
            if spec._min_age is not None and (
                blocker.age is None or blocker.age.total_seconds() < spec._min_age
            ):
                continue
            if spec._predicate is not None and not await _call(spec._predicate, blocker):
                continue
            signalled = await _signal(conn, self.action, blocker, self._protected())
            if signalled is None:
                acted = True  # the look was stale: look again soon
                continue
            self._handled.add(key)
            if not signalled:
                continue
            acted = True
            self.blockers.append(blocker)
            logger.warning(
                "aiopglock.prioritize: %s %s, which blocked protected backend %d%s; its query: %r",
                _PAST[self.action],
                _describe_blocker(blocker),
                blocker.blocked_pid,
                _cancel_hint(self.action, blocker),
                blocker.query,
            )
        return acted, seen


class Prioritize:
    """A :func:`aiopglock.prioritize` request: an async context manager and a decorator.

    Holds only configuration: every ``async with`` and every call of a
    decorated function gets its own :class:`Prioritizer` (its own monitor
    task and connection).

    Example::

        urgent = aiopglock.prioritize(via=pool, interval=0.5)

        @urgent
        async def migrate() -> None:
            async with aiopglock.advisory("migrations", db=pool):
                ...
    """

    __slots__ = (
        "_action",
        "_active",
        "_db",
        "_include_other_databases",
        "_interval",
        "_min_age",
        "_monitor_application_name",
        "_predicate",
        "_via",
    )

    def __init__(
        self,
        db: DB | None = None,
        *,
        interval: float | timedelta = 1.0,
        action: Action = Action.TERMINATE,
        via: asyncpg.Pool[Any] | str | None = None,
        min_age: float | timedelta | None = None,
        predicate: Callable[[Blocker], object] | None = None,
        include_other_databases: bool = False,
        monitor_application_name: str = "aiopglock-prioritize",
    ) -> None:
        check_db(db)
        self._db = db
        self._interval = check_seconds(interval, "interval", allow_zero=False)
        self._action = _check_action(action)
        self._via = _check_source(via, "via")
        self._min_age = (
            None if min_age is None else check_seconds(min_age, "min_age", allow_zero=True)
        )
        self._predicate = check_callable(predicate, "predicate")
        self._include_other_databases = check_bool(
            include_other_databases, "include_other_databases"
        )
        self._monitor_application_name = check_name(
            monitor_application_name, "monitor_application_name"
        )
        self._active: Entered[Prioritizer] = Entered()

    def __repr__(self) -> str:
        return (
            f"aiopglock.prioritize(interval={self._interval}, action={self._action!r}, "
            f"min_age={self._min_age}, include_other_databases={self._include_other_databases})"
        )

    async def __aenter__(self) -> Prioritizer:
        handle = Prioritizer(self)
        await handle._enter()
        self._active.push(handle)
        return handle

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        return await self._active.pop()._exit(exc_type, exc, tb)

    def __call__(self, fn: F) -> F:
        # A functools.partial, a staticmethod or a classmethod is accepted too.
        decorated = target(fn, "aiopglock.prioritize")
        spec = self
        call = decorated.fn

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            handle = Prioritizer(spec)
            await handle._enter()
            try:
                result = await call(*args, **kwargs)
            except BaseException as exc:
                await handle._exit(type(exc), exc, exc.__traceback__)
                raise
            await handle._exit(None, None, None)
            return result

        return cast(F, decorated.finish(wrapper))


def prioritize(
    db: DB | None = None,
    *,
    interval: float | timedelta = 1.0,
    action: Action = Action.TERMINATE,
    via: asyncpg.Pool[Any] | str | None = None,
    min_age: float | timedelta | None = None,
    predicate: Callable[[Blocker], object] | None = None,
    include_other_databases: bool = False,
    monitor_application_name: str = "aiopglock-prioritize",
) -> Prioritize:
    """Free the lock waits of a block: cancel or terminate the sessions blocking them.

    While the block runs, a background task on a connection of its own finds
    the backends blocking the protected work (``pg_blocking_pids()``: every
    lock type — relation, row (tuple/transactionid), advisory) and signals them.

    - ``db``: what is protected. A Connection (a pool's proxy too): that
      connection's backend, whatever it waits for (raw SQL included). None or
      a Pool: every lock wait aiopglock itself issues inside the block — in
      this task, and in tasks started inside the block while it runs.
    - ``via``: where the monitor's own connection comes from: a Pool (one
      connection is leased for the block) or a DSN string (a connection is
      opened and closed). Default: ``db`` when it is a Pool, else the
      configured default (``aiopglock.configure(db=pool)``) when it is a
      Pool; otherwise :class:`aiopglock.UsageError` at entry (a new
      connection cannot be derived from a Connection). A connection that
      cannot be had raises at entry: a bad DSN, or a Pool with every
      connection in use (:class:`aiopglock.UsageError`, at once: the monitor
      never waits for one, since the blockers may be holding them).
    - ``interval``: seconds (or ``timedelta``) between looks. The first look
      is immediate, a new protected wait is looked at at once, and after a
      signal the monitor looks again within milliseconds.
    - ``action``: ``aiopglock.Terminate`` (default) or ``aiopglock.Cancel``
      (cancels the blocker's running statement: frees a wait only when the
      blocker is running one; see :class:`aiopglock.Action`).
    - ``min_age``: blockers younger than this (seconds or ``timedelta``;
      :attr:`Blocker.age`) are left alone, until they are old enough.
    - ``predicate``: called with a :class:`Blocker`, sync or async; the
      blocker is signalled only if it returns a true value. An exception it
      raises ends the block with that exception.
    - ``include_other_databases``: also signal blockers in another database
      than the waiter's (default False).
    - ``monitor_application_name``: the monitor connection's
      ``application_name``.

    Never signalled: the monitor's own backend, a protected backend, a
    backend holding a lock that aiopglock took inside the block (until that
    connection goes back to its pool, or the lock is reported released), and
    a pid that no longer belongs to the session found, nor a session that no
    longer blocks a protected wait when the signal is sent (the server
    checks it then: a look is a snapshot). Sessions queued
    *ahead* of a protected wait for the same lock block it too and are
    signalled (the protected work goes first); those queued behind it are
    not. ``Terminate`` signals a
    session once; ``Cancel`` once per statement. Each signal is logged on the
    ``"aiopglock"`` logger (warning) with the blocker's query and recorded on
    the :class:`Prioritizer` handle (``signalled``, ``blockers``).

    The monitor is a task the block owns (no task group spans the block, so
    it may be entered in one task and exited in another); it stops when the
    block exits, cancellation included, and its task and connection do not
    outlive the ``async with``. Errors talking to the server are logged and
    retried each interval (a closed monitor connection is replaced). A
    ``predicate`` that raises ends the block: its task is cancelled once (as
    ``asyncio.timeout()`` does) and that exception comes out of the
    ``async with``.

    Example::

        async with aiopglock.prioritize(db=conn, via=pool) as prioritizer:
            async with conn.transaction():
                await conn.execute("LOCK TABLE orders IN EXCLUSIVE MODE")
        print(prioritizer.signalled)
    """
    return Prioritize(
        db,
        interval=interval,
        action=action,
        via=via,
        min_age=min_age,
        predicate=predicate,
        include_other_databases=include_other_databases,
        monitor_application_name=monitor_application_name,
    )


# --------------------------------------------------------------------------- Watchdog


class Watchdog:
    """A service-lifetime task that acts on sessions waiting too long for a lock.

    Every ``interval`` it finds the sessions that have waited for a lock at
    least ``max_wait`` (``pg_locks.waitstart``) and cancels or terminates
    the holders that keep them waiting (``pg_blocking_pids``):

    - a session that is itself waiting for a lock is a victim, never acted
      on (``pg_blocking_pids`` also lists the sessions queued ahead);
    - a holder is acted on only once it has itself kept a watched session
      waiting for ``max_wait``, timed from the first look that found it
      blocking (so up to one ``interval`` late; a holder blocking already
      when the watchdog starts is timed from its first look). A queue of
      short holders behind an old wait is healthy and left alone.

    - ``db``: where its connection comes from: a Pool (one connection is
      leased while it runs; it never waits for one another user holds:
      with all in use, :meth:`start` raises :class:`aiopglock.UsageError`
      at once, and a connection lost later is replaced at the next look
      that finds one free), a DSN string (opened and closed), a Connection
      (used as is and left open: it must not be used by anything else
      meanwhile), a zero-argument callable returning one, or None for the
      configured default.
    - ``max_wait``: seconds or ``timedelta`` (0 or more).
    - ``action``: ``aiopglock.Terminate`` (default) or ``aiopglock.Cancel``.
    - ``interval``: seconds between looks (default 1.0).
    - ``dry_run``: log and report what would be done; signal nothing.
    - Which **waiting** sessions are watched: ``database`` (a name or names;
      default: the database the watchdog is connected to), and, if given,
      ``application_name`` and ``user`` (a name or names each).
    - Which **blockers** are acted on: only those in the watched databases,
      never the watchdog's own session, never ``exclude_pids`` nor a session
      whose ``application_name`` is in ``exclude_application_names``, and, if
      given, only those for which ``predicate(blocker)`` (sync or async,
      given a :class:`Blocker`) returns a true value (one that raises is
      logged, and that blocker spared).
    - ``callback``: called (sync or async) with an :class:`Intervention` for
      every action, dry runs included; one that is running when the watchdog
      stops may finish (for up to 5 s). An exception it raises is logged and
      the watchdog goes on.
    - ``history``: how many interventions ``interventions`` keeps (newest last).
    - ``monitor_application_name``: its connection's ``application_name``
      (with a Pool or a DSN).

    Terminate acts once per blocking session, Cancel once per running
    statement; a dry run reports a blocker once for as long as it keeps
    blocking. Each action is logged (warning, ``"aiopglock"`` logger).
    Errors talking to the server are logged and retried each interval.

    Run it with ``async with Watchdog(...) as watchdog:``, or ``await
    watchdog.start()`` and later ``await watchdog.aclose()`` (idempotent):
    either way it runs in a task of its own, tied to no task group, so it
    may be started in one task and closed in another (a pytest-asyncio
    fixture, an ``AsyncExitStack``); one dropped while running warns
    (``ResourceWarning``) and stops. Or ``await tg.start(watchdog.run)`` /
    ``tg.start_soon(watchdog.run)`` in a task group of yours (it runs until
    cancelled). Attributes: ``interventions``, ``polls``, ``running``,
    ``monitor_pid``.

    Example::

        async with aiopglock.Watchdog(pool, max_wait=30, application_name="api") as watchdog:
            await serve_forever()
    """

    __slots__ = (
        "__weakref__",
        "_application_names",
        "_blocking_since",
        "_callback",
        "_databases",
        "_db",
        "_exclude_application_names",
        "_exclude_pids",
        "_handled",
        "_max_wait",
        "_monitor_application_name",
        "_owned",
        "_predicate",
        "_users",
        "action",
        "dry_run",
        "interval",
        "interventions",
        "max_wait",
        "monitor_pid",
        "polls",
        "running",
    )

    def __init__(
        self,
        db: DB | str | None,
        *,
        max_wait: float | timedelta,
        action: Action = Action.TERMINATE,
        interval: float | timedelta = 1.0,
        dry_run: bool = False,
        database: str | Collection[str] | None = None,
        application_name: str | Collection[str] | None = None,
        user: str | Collection[str] | None = None,
        exclude_pids: Collection[int] = (),
        exclude_application_names: Collection[str] = (),
        predicate: Callable[[Blocker], object] | None = None,
        callback: Callable[[Intervention], object] | None = None,
        history: int = 1000,
        monitor_application_name: str = "aiopglock-watchdog",
    ) -> None:
        if isinstance(db, str):
            _check_source(db, "db")
        else:
            check_db(db)
        self._db = db
        self._max_wait = check_seconds(max_wait, "max_wait", allow_zero=True)
        self.max_wait = timedelta(seconds=self._max_wait)
        self.action = _check_action(action)
        self.interval = check_seconds(interval, "interval", allow_zero=False)
        self.dry_run = check_bool(dry_run, "dry_run")
        self._databases = check_names(database, "database")
        self._application_names = check_names(application_name, "application_name")
        self._users = check_names(user, "user")
        self._exclude_pids = _check_pid_collection(exclude_pids, "exclude_pids")
        excluded = check_names(
            exclude_application_names, "exclude_application_names", none_ok=False
        )
        self._exclude_application_names = excluded or ()
        self._predicate = check_callable(predicate, "predicate")
        self._callback = check_callable(callback, "callback")
        if not is_int(history):
            raise TypeError(f"history: expected an int, got {describe(history)}")
        if history < 0:
            raise ValueError(f"history: expected 0 or more, got {history!r}")
        self._monitor_application_name = check_name(
            monitor_application_name, "monitor_application_name"
        )
        self.interventions: collections.deque[Intervention] = collections.deque(maxlen=history)
        self.polls = 0
        self.running = False
        self.monitor_pid: int | None = None
        self._handled: set[tuple[Any, ...]] = set()
        # (pid, backend_start) of each blocker -> when a look first found it
        # blocking a watched wait (server clock), for as long as it keeps doing so
        self._blocking_since: dict[tuple[Any, ...], datetime] = {}
        self._owned: _Owned | None = None

    def __repr__(self) -> str:
        state = f"running pid={self.monitor_pid}" if self.running else "stopped"
        dry = " dry_run" if self.dry_run else ""
        return (
            f"<Watchdog max_wait={self._max_wait} {self.action!r} interval={self.interval}{dry} "
            f"{state} polls={self.polls} interventions={len(self.interventions)}>"
        )

    def __del__(self) -> None:
        owned = getattr(self, "_owned", None)
        if owned is not None and owned.running:
            # Dropped while its own task runs: say so, and stop that task (it
            # gives its connection back on the way out).
            owned.cancel_soon()
            warnings.warn(
                f"unclosed {self!r}: call 'await watchdog.aclose()' or use 'async with'",
                ResourceWarning,
                stacklevel=2,
                source=self,
            )

    async def start(self) -> None:
        """Start watching in a task of the watchdog's own; return once its
        connection is had (a failure to get one is raised here).

        The task is tied to no task group or cancel scope of the caller: the
        watchdog may be started in one task (a pytest-asyncio fixture, an
        ``AsyncExitStack``) and closed in another. Stop it with
        :meth:`aclose`; ``async with watchdog:`` does both. Raises
        :class:`aiopglock.UsageError` when it is already running.

        Example::

            watchdog = aiopglock.Watchdog(pool, max_wait=30)
            await watchdog.start()
            try:
                await serve_forever()
            finally:
                await watchdog.aclose()
        """
        if self.running:
            raise UsageError("this Watchdog is already running")
        monitor = _MonitorConnection(self._source(), self._monitor_application_name)
        self.running = True
        owned = _Owned()
        try:
            task = await owned.start(
                functools.partial(_watch, weakref.ref(self), monitor),
                f"aiopglock.Watchdog {self._monitor_application_name}",
            )
        except BaseException:
            self.running = False
            raise
        task.add_done_callback(_log_failure)
        self._owned = owned

    async def aclose(self) -> None:
        """Stop the task :meth:`start` (or ``async with``) began, and give its
        connection back; wait for both. Idempotent; a no-op for a watchdog
        run by :meth:`run` in a task group of yours (cancel that instead).

        Example::

            await watchdog.aclose()
            assert not watchdog.running
        """
        owned, self._owned = self._owned, None
        if owned is None:
            return
        failure = await owned.stop()
        if failure is not None:
            raise failure

    async def __aenter__(self) -> Watchdog:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _source(self) -> Any:
        if isinstance(self._db, str):
            return self._db
        return resolve_db(self._db)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Watch until cancelled, in the calling task (a task group of yours).
        With ``await tg.start(watchdog.run)`` a failure to get its connection
        is raised by ``start``.

        Example::

            async with anyio.create_task_group() as tg:
                await tg.start(watchdog.run)
                ...
                tg.cancel_scope.cancel()
        """
        if self.running:
            raise UsageError("this Watchdog is already running")
        monitor = _MonitorConnection(self._source(), self._monitor_application_name)
        self.running = True
        try:
            await _watch(weakref.ref(self), monitor, task_status.started)
        finally:
            self.running = False

    async def _look(self, monitor: _MonitorConnection) -> None:
        """One look; the server's errors are logged, not raised."""
        try:
            await self._poll(monitor)
        except _RETRIED as exc:
            logger.warning(
                "aiopglock watchdog: looking for blocked sessions failed, trying again in %s s: %r",
                self.interval,
                exc,
            )
            if monitor.lost():
                await monitor.release()

    async def _poll(self, monitor: _MonitorConnection) -> None:
        conn = await monitor.get()
        self.monitor_pid = conn.get_server_pid()
        rows = await conn.fetch(
            _sql.WATCHDOG_BLOCKERS,
            None if self._databases is None else list(self._databases),
            None if self._application_names is None else list(self._application_names),
            None if self._users is None else list(self._users),
            list(self._exclude_pids),
            list(self._exclude_application_names),
        )
        self.polls += 1
        # Every holder (never a session that is itself waiting: the query
        # leaves those out) blocking a watched wait, with its waiters; rows
        # come longest wait first, so a holder's first row names its longest
        # waiter.
        found: dict[int, tuple[Blocker, dict[int, timedelta | None]]] = {}
        for row in rows:
            entry = found.get(row["pid"])
            if entry is None:
                entry = found[row["pid"]] = (_blocker(row), {})
            entry[1].setdefault(row["blocked_pid"], row["wait_duration"])
        now = rows[0]["observed_at"] if rows else None
        since: dict[tuple[Any, ...], datetime] = {}
        current: set[tuple[Any, ...]] = set()
        for blocker, waits in found.values():
            assert now is not None
            # A holder is a culprit once IT has kept a watched session waiting
            # for max_wait: from the first look that found it blocking, not
            # from when its waiters began to wait (they may have queued behind
            # an earlier holder).
            holder = (blocker.pid, blocker.backend_start)
            first = since[holder] = self._blocking_since.get(holder, now)
            key = _session_key(self.action, blocker)
            current.add(key)
            if key in self._handled or now - first < self.max_wait:
                continue
            overdue = [
                pid for pid, wait in waits.items() if wait is not None and wait >= self.max_wait
            ]
            if not overdue:
                continue
            if self._predicate is not None:
                try:
                    chosen = await _call(self._predicate, blocker)
                except Exception:
                    logger.exception(
                        "aiopglock watchdog: the predicate failed on %r; spared", blocker
                    )
                    continue
                if not chosen:
                    continue
            if self.dry_run:
                signalled = False
            else:
                result = await _signal(conn, self.action, blocker, overdue)
                if result is None:
                    continue  # it let go since the look: look again next time
                signalled = result
            self._handled.add(key)
            intervention = Intervention(
                blocker=blocker,
                waiter_pids=tuple(overdue),
                wait_duration=blocker.wait_duration,
                action=self.action,
                dry_run=self.dry_run,
                signalled=signalled,
                at=datetime.now(timezone.utc),
            )
            self.interventions.append(intervention)
            self._log(intervention)
            await self._report(intervention)
        # Forget sessions that no longer block: a dry run reports a new
        # blocking episode again, and its time is counted afresh.
        self._handled &= current
        self._blocking_since = since

    def _log(self, intervention: Intervention) -> None:
        blocker = intervention.blocker
        if intervention.dry_run:
            done = f"(dry run) would {self.action.value}"
        elif intervention.signalled:
            done = _PAST[self.action]
        else:
            done = f"could not {self.action.value}"
        logger.warning(
            "aiopglock watchdog: %s %s, which held up backend %d (application %r) for %s "
            "(max_wait %s)%s; its query: %r",
            done,
            _describe_blocker(blocker),
            blocker.blocked_pid,
            blocker.blocked_application_name,
            intervention.wait_duration,
            self.max_wait,
            _cancel_hint(self.action, blocker),
            blocker.query,
        )

    async def _report(self, intervention: Intervention) -> None:
        if self._callback is None:
            return
        try:
            # An action taken is reported even when the watchdog is stopping
            # meanwhile (its own signal may have ended the wait that kept the
            # service's block running); a callback that hangs is given up on.
            with anyio.move_on_after(_CALLBACK_GRACE, shield=True):
                await _call(self._callback, intervention)
        except Exception:
            logger.exception("aiopglock watchdog: the callback failed on %r", intervention)


def _log_failure(task: asyncio.Task[None]) -> None:
    """Say at once that a watchdog's own task failed (:meth:`Watchdog.aclose`
    raises it too): a service may not close it for a long time."""
    if not task.cancelled() and task.exception() is not None:
        logger.error("aiopglock: %s stopped", task.get_name(), exc_info=task.exception())


async def _watch(
    ref: weakref.ref[Watchdog], monitor: _MonitorConnection, ready: Callable[[], None]
) -> None:
    """A watchdog's loop. Holds the watchdog only weakly between looks, so
    one dropped while its own task runs is collected (and warns)."""
    try:
        conn = await monitor.get()
        watchdog = ref()
        if watchdog is None:
            return
        watchdog.monitor_pid = conn.get_server_pid()
        del watchdog
        ready()
        while True:
            watchdog = ref()
            if watchdog is None:
                return
            await watchdog._look(monitor)
            interval = watchdog.interval
            del watchdog
            await anyio.sleep(interval)
    finally:
        await monitor.release()
        watchdog = ref()
        if watchdog is not None:
            watchdog.running = False
            watchdog.monitor_pid = None
