"""``Watchdog``: for a service's lifetime, act on the sessions that keep
others waiting for a lock longer than ``max_wait``.

A monitor (:mod:`aiopglock._monitor`) looks every ``interval`` for the
watched sessions that have waited at least ``max_wait`` and cancels or
terminates the holders that keep them waiting; :class:`_Culprits` decides
which holders are due, :class:`Watchdog` is the configuration and the
lifecycle (its own task, or :meth:`Watchdog.run` in the caller's task group).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import logging
import warnings
import weakref
from collections.abc import Callable, Collection, Iterable
from datetime import datetime, timedelta, timezone
from types import TracebackType
from typing import Any

import anyio
import anyio.abc

from . import _otel, _sql_monitor
from ._conntypes import Conn, Pool
from ._db import DB, check_db, resolve_db
from ._errors import UsageError
from ._monitor import (
    PAST,
    RETRIED,
    Action,
    BackgroundTask,
    Blocker,
    MonitorConnection,
    blocker_from_row,
    call,
    cancel_hint,
    check_action,
    check_source,
    describe_blocker,
    session_key,
    signal,
)
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

__all__ = ["Intervention", "Watchdog"]

logger = logging.getLogger("aiopglock")

# How long an async Watchdog callback may still run once the watchdog is stopping.
_CALLBACK_GRACE = 5.0


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


# --------------------------------------------------------------------------- which holders are due


class _Culprits:
    """Which holders a :class:`Watchdog` acts on, look after look (no I/O).

    A holder is a culprit once IT has kept a watched session waiting for
    ``max_wait``: timed from the first look that found it blocking, not from
    when its waiters began to wait (they may have queued behind an earlier
    holder). One is acted on once per :func:`session_key`, and forgotten
    once it no longer blocks, so a dry run reports a new blocking episode
    again and its time is counted afresh. A look that fails half way leaves
    the record as the previous look made it.
    """

    __slots__ = ("_handled", "_seen", "_since", "_since_now")

    def __init__(self) -> None:
        self._handled: set[tuple[Any, ...]] = set()
        # (pid, backend_start) of each blocker -> when a look first found it
        # blocking a watched wait (server clock), for as long as it keeps doing so
        self._since: dict[tuple[Any, ...], datetime] = {}
        # What the current look sees, kept by end_look().
        self._since_now: dict[tuple[Any, ...], datetime] = {}
        self._seen: set[tuple[Any, ...]] = set()

    def due(
        self, rows: list[Any], action: Action, max_wait: timedelta
    ) -> list[tuple[Blocker, list[int], tuple[Any, ...]]]:
        """The holders to act on now, each with its waiters past ``max_wait``
        and its session key (for :meth:`acted`).

        ``rows``: one look's rows, every holder (never a session that is
        itself waiting: the query leaves those out) blocking a watched wait
        with each of its waiters, longest wait first, so a holder's first row
        names its longest waiter.
        """
        found: dict[int, tuple[Blocker, dict[int, timedelta | None]]] = {}
        for row in rows:
            entry = found.get(row["pid"])
            if entry is None:
                entry = found[row["pid"]] = (blocker_from_row(row), {})
            entry[1].setdefault(row["blocked_pid"], row["wait_duration"])
        now = rows[0]["observed_at"] if rows else None
        self._since_now, self._seen = {}, set()
        due = []
        for blocker, waits in found.values():
            assert now is not None
            holder = (blocker.pid, blocker.backend_start)
            first = self._since_now[holder] = self._since.get(holder, now)
            key = session_key(action, blocker)
            self._seen.add(key)
            if key in self._handled or now - first < max_wait:
                continue
            overdue = [pid for pid, wait in waits.items() if wait is not None and wait >= max_wait]
            if overdue:
                due.append((blocker, overdue, key))
        return due

    def acted(self, key: tuple[Any, ...]) -> None:
        """The holder of ``key`` was acted on (or reported): never again while it blocks."""
        self._handled.add(key)

    def end_look(self) -> None:
        """Keep what the look saw; forget the holders that no longer block."""
        self._handled &= self._seen
        self._since = self._since_now


# --------------------------------------------------------------------------- validation


def _check_pid_collection(value: object, name: str) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{name}: expected a collection of pids, got {describe(value)}")
    return tuple(check_pids(value, name))


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
        "_background",
        "_callback",
        "_culprits",
        "_databases",
        "_db",
        "_exclude_application_names",
        "_exclude_pids",
        "_max_wait",
        "_monitor_application_name",
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
            check_source(db, "db")
        else:
            check_db(db)
        self._db = db
        self._max_wait = check_seconds(max_wait, "max_wait", allow_zero=True)
        self.max_wait = timedelta(seconds=self._max_wait)
        self.action = check_action(action)
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
        self._culprits = _Culprits()
        self._background: BackgroundTask | None = None

    def __repr__(self) -> str:
        state = f"running pid={self.monitor_pid}" if self.running else "stopped"
        dry = " dry_run" if self.dry_run else ""
        return (
            f"<Watchdog max_wait={self._max_wait} {self.action!r} interval={self.interval}{dry} "
            f"{state} polls={self.polls} interventions={len(self.interventions)}>"
        )

    def __del__(self) -> None:
        background = getattr(self, "_background", None)
        if background is not None and background.running:
            # Dropped while its own task runs: say so, and stop that task (it
            # gives its connection back on the way out).
            background.cancel_soon()
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
        monitor = MonitorConnection(self._source(), self._monitor_application_name)
        self.running = True
        background = BackgroundTask()
        try:
            task = await background.start(
                functools.partial(_watch, weakref.ref(self), monitor),
                f"aiopglock.Watchdog {self._monitor_application_name}",
            )
        except BaseException:
            self.running = False
            raise
        task.add_done_callback(_log_failure)
        self._background = background

    async def aclose(self) -> None:
        """Stop the task :meth:`start` (or ``async with``) began, and give its
        connection back; wait for both. Idempotent; a no-op for a watchdog
        run by :meth:`run` in a task group of yours (cancel that instead).

        Example::

            await watchdog.aclose()
            assert not watchdog.running
        """
        background, self._background = self._background, None
        if background is None:
            return
        failure = await background.stop()
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

    def _source(self) -> Pool | str | Conn:
        if isinstance(self._db, str):
            return self._db
        resolved: Pool | Conn = resolve_db(self._db)
        return resolved

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
        monitor = MonitorConnection(self._source(), self._monitor_application_name)
        self.running = True
        try:
            await _watch(weakref.ref(self), monitor, task_status.started)
        finally:
            self.running = False


# --------------------------------------------------------------------------- the watchdog's task


def _log_failure(task: asyncio.Task[None]) -> None:
    """Say at once that a watchdog's own task failed (:meth:`Watchdog.aclose`
    raises it too): a service may not close it for a long time."""
    if not task.cancelled() and task.exception() is not None:
        logger.error("aiopglock: %s stopped", task.get_name(), exc_info=task.exception())


async def _watch(
    ref: weakref.ref[Watchdog], monitor: MonitorConnection, ready: Callable[[], None]
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
            await _look(watchdog, monitor)
            interval = watchdog.interval
            del watchdog
            await anyio.sleep(interval)
    finally:
        await monitor.release()
        watchdog = ref()
        if watchdog is not None:
            watchdog.running = False
            watchdog.monitor_pid = None


async def _look(watchdog: Watchdog, monitor: MonitorConnection) -> None:
    """One look; the server's errors are logged, not raised."""
    try:
        await _poll(watchdog, monitor)
    except RETRIED as exc:
        await monitor.look_failed(
            "aiopglock watchdog: looking for blocked sessions", watchdog.interval, exc
        )


async def _poll(watchdog: Watchdog, monitor: MonitorConnection) -> None:
    conn = await monitor.get()
    watchdog.monitor_pid = conn.get_server_pid()
    rows = await conn.fetch(
        _sql_monitor.WATCHDOG_BLOCKERS,
        None if watchdog._databases is None else list(watchdog._databases),
        None if watchdog._application_names is None else list(watchdog._application_names),
        None if watchdog._users is None else list(watchdog._users),
        list(watchdog._exclude_pids),
        list(watchdog._exclude_application_names),
    )
    watchdog.polls += 1
    culprits = watchdog._culprits
    for blocker, overdue, key in culprits.due(rows, watchdog.action, watchdog.max_wait):
        if watchdog._predicate is not None:
            try:
                chosen = await call(watchdog._predicate, blocker)
            except Exception:
                logger.exception("aiopglock watchdog: the predicate failed on %r; spared", blocker)
                continue
            if not chosen:
                continue
        if watchdog.dry_run:
            signalled = False
        else:
            result = await signal(conn, watchdog.action, blocker, overdue)
            if result is None:
                continue  # it let go since the look: look again next time
            signalled = result
        culprits.acted(key)
        intervention = Intervention(
            blocker=blocker,
            waiter_pids=tuple(overdue),
            wait_duration=blocker.wait_duration,
            action=watchdog.action,
            dry_run=watchdog.dry_run,
            signalled=signalled,
            at=datetime.now(timezone.utc),
        )
        watchdog.interventions.append(intervention)
        if intervention.dry_run or intervention.signalled:
            _otel.monitor_action(
                "watchdog", "dry_run" if intervention.dry_run else watchdog.action.value
            )
        _log(intervention, watchdog.max_wait)
        await _report(watchdog._callback, intervention)
    culprits.end_look()


def _log(intervention: Intervention, max_wait: timedelta) -> None:
    blocker, action = intervention.blocker, intervention.action
    if intervention.dry_run:
        done = f"(dry run) would {action.value}"
    elif intervention.signalled:
        done = PAST[action]
    else:
        done = f"could not {action.value}"
    logger.warning(
        "aiopglock watchdog: %s %s, which held up backend %d (application %r) for %s "
        "(max_wait %s)%s; its query: %r",
        done,
        describe_blocker(blocker),
        blocker.blocked_pid,
        blocker.blocked_application_name,
        intervention.wait_duration,
        max_wait,
        cancel_hint(action, blocker),
        blocker.query,
        extra=_otel.log_fields(
            pid=blocker.pid,
            kind="watchdog",
            outcome=(
                "dry_run"
                if intervention.dry_run
                else action.value
                if intervention.signalled
                else "not_signalled"
            ),
            waited=_otel.seconds(intervention.wait_duration),
            blocked_pid=blocker.blocked_pid,
            signalled=intervention.signalled,
        ),
    )


async def _report(
    callback: Callable[[Intervention], object] | None, intervention: Intervention
) -> None:
    if callback is None:
        return
    try:
        # An action taken is reported even when the watchdog is stopping
        # meanwhile (its own signal may have ended the wait that kept the
        # service's block running); a callback that hangs is given up on.
        with anyio.move_on_after(_CALLBACK_GRACE, shield=True):
            await call(callback, intervention)
    except Exception:
        logger.exception("aiopglock watchdog: the callback failed on %r", intervention)
