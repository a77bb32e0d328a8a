"""``prioritize()``: free the lock waits of a block by signalling their blockers.

For the duration of a block, on behalf of the work in that block (one
Connection's backend, or every lock wait aiopglock issues inside the block:
see :mod:`aiopglock._protect`), a monitor (:mod:`aiopglock._monitor`) looks
for the sessions blocking it and cancels or terminates them.

Lifecycle: the monitor task is owned by the :class:`Prioritizer` handle, so
the block may be entered in one task and exited in another. Entry returns
once the task has its connection (a failure to get one is raised there);
its connection is released (or closed) under a shield at exit.

A backend is signalled only if it is still the session that was found,
never the monitor's own backend, never a protected backend, and once per
session for ``Terminate`` (once per running statement for ``Cancel``).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
from collections.abc import Awaitable, Callable
from datetime import timedelta
from types import TracebackType
from typing import Any, TypeVar, cast

import anyio
import asyncpg

from . import _otel, _protect, _sql_monitor
from ._concurrency import BlockCanceller
from ._conntypes import Conn, Pool
from ._db import DB, check_db, resolve_db
from ._decorate import target
from ._errors import UsageError
from ._handles import Entered
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
from ._validate import check_bool, check_callable, check_name, check_seconds

__all__ = ["Prioritize", "Prioritizer", "prioritize"]

logger = logging.getLogger("aiopglock")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

# After a protected wait begins (or a blocker was signalled), look again after
# this long, doubling up to ``interval``: the wait's statement may not have
# reached the server yet, and a terminated blocker takes a moment to exit.
_RECHECK = 0.005


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
        "_background",
        "_canceller",
        "_handled",
        "_monitor",
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
        self._token: contextvars.Token[_protect.Protection | None] | None = None
        self._wakeup = anyio.Event()
        self._monitor: MonitorConnection | None = None
        self._background: BackgroundTask | None = None
        self._canceller: BlockCanceller | None = None

    @property
    def signalled(self) -> list[int]:
        """The pids actually signalled, each once, in the order they were."""
        return list(dict.fromkeys(blocker.pid for blocker in self.blockers))

    @property
    def running(self) -> bool:
        return self._background is not None

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

    def _monitor_source(self, target: Conn | Pool | None) -> Pool | str:
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
        target: Conn | Pool | None = None if spec._db is None else resolve_db(spec._db)
        if isinstance(target, asyncpg.Connection):
            self.protected_pid = target.get_server_pid()
        self._monitor = MonitorConnection(
            self._monitor_source(target), spec._monitor_application_name
        )
        if self.protected_pid is None:
            self._protection = _protect.Protection(parent=_protect.current.get())
            self._protection.listener = self._on_wait
        task = asyncio.current_task()
        assert task is not None
        background = BackgroundTask()
        try:
            monitor_task = await background.start(self._run, "aiopglock.prioritize monitor")
        except BaseException:
            if self._protection is not None:
                self._protection.close()
            raise
        # The monitor failing (a predicate raising) ends the block: the task
        # that entered it is cancelled once, as asyncio.timeout() would, and
        # the failure is raised at exit in place of that cancellation.
        self._canceller = BlockCanceller(task)
        monitor_task.add_done_callback(self._on_monitor_done)
        self._background = background
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
        background, self._background = self._background, None
        if background is None:
            return None
        failure = await background.stop()
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

    async def _watch(self, monitor: MonitorConnection) -> None:
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
            except RETRIED as exc:
                await monitor.look_failed(
                    "aiopglock.prioritize: looking for blockers", self.interval, exc
                )
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
        self, monitor: MonitorConnection, pids: frozenset[int]
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
            _sql_monitor.PRIORITIZE_BLOCKERS, sorted(pids), spec._include_other_databases
        )
        self.polls += 1
        seen: set[int] = set()
        found: dict[int, Blocker] = {}
        for row in rows:
            seen.add(row["blocked_pid"])
            found.setdefault(row["pid"], blocker_from_row(row))
        if protection is not None:
            own |= protection.since_mark()
        acted = False
        for blocker in found.values():
            key = session_key(self.action, blocker)
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
            if spec._predicate is not None and not await call(spec._predicate, blocker):
                continue
            signalled = await signal(conn, self.action, blocker, self._protected())
            if signalled is None:
                acted = True  # the look was stale: look again soon
                continue
            self._handled.add(key)
            if not signalled:
                continue
            acted = True
            self.blockers.append(blocker)
            _otel.monitor_action("prioritize", self.action.value)
            logger.warning(
                "aiopglock.prioritize: %s %s, which blocked protected backend %d%s; its query: %r",
                PAST[self.action],
                describe_blocker(blocker),
                blocker.blocked_pid,
                cancel_hint(self.action, blocker),
                blocker.query,
                extra=_otel.log_fields(
                    pid=blocker.pid,
                    kind="prioritize",
                    outcome=self.action.value,
                    waited=_otel.seconds(blocker.wait_duration),
                    blocked_pid=blocker.blocked_pid,
                ),
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
        self._action = check_action(action)
        self._via = check_source(via, "via")
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
