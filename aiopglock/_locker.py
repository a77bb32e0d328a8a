"""``aiopglock.Locker``: many advisory locks on few connections.

A session lock taken through ``advisory(db=pool)`` pins one pooled connection
for its whole life. A Locker instead owns one *holder* connection and a
background task that multiplexes every lock of this process onto it:

1. **Local exclusion first.** Each key has an in-process entry: its local
   holders (one exclusive handle, or a count of shared ones) and a FIFO of
   local waiters. Only the first local holder of a key touches the server, so
   PostgreSQL's per-session re-entrancy never lets two tasks share a key.
2. **Batching.** Uncontended requests are try-locked on the holder connection
   and releases unlocked there, everything pending sent in one statement
   (``unnest`` over arrays) per round trip. A caller's exit returns once the
   server confirmed its unlock.
3. **Contention.** A try-lock that fails (another session holds the key)
   moves the wait to a dedicated pool connection, through
   ``aiopglock.advisory`` itself (a fair queue in PostgreSQL, ``timeout`` as a
   scoped ``lock_timeout``, cancellation-safe); the lock then lives on that
   connection until released. An exclusive key released while local tasks
   wait for it is handed to the next one without a round trip, at most
   ``HANDOFF_LIMIT`` times in a row, then released to the server so that
   other sessions waiting there get their turn.
4. **Ownership.** Requests belong to the Locker, not to the calling task: a
   caller cancelled at any point withdraws its request, and whatever the
   server grants late is released by the Locker before the caller's
   cancellation propagates.
5. **Losing the holder.** When the holder connection dies (termination
   listener, or a heartbeat when it is silent) every handle on it is lost at
   once (``LockLost``, ``cancel_on_lost`` as with ``advisory``); the Locker
   takes a new holder from the pool and keeps serving.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar, cast

import anyio
import anyio.abc
import asyncpg

from . import _sql
from ._advisory import Raise, SideEffect, _AdvisorySpec, _LockHandle, advisory
from ._db import (
    CLEANUP_STATEMENT_TIMEOUT,
    Cleanup,
    PoolFront,
    heartbeat_interval,
    raw_connection,
    terminate,
)
from ._errors import LockLost, UsageError
from ._keys import AdvisoryKey, Key
from ._server import check_pooled
from ._timeouts import Timeout

__all__ = ["Locker", "LockerAdvisory", "LockerLock"]

logger = logging.getLogger("aiopglock")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

#: Consecutive local hand-overs of an exclusive key before it is released to
#: the server (where other sessions may be queued for it).
HANDOFF_LIMIT = 16

# Entry states: what the server holds for a key, on the Locker's behalf.
_IDLE, _ACQUIRING, _HELD, _RELEASING = range(4)
# Request states.
_QUEUED, _INFLIGHT, _WAITING, _GRANTED, _DONE, _ABANDONED = range(6)


def _current_task() -> asyncio.Task[Any]:
    task = asyncio.current_task()
    if task is None:  # pragma: no cover - asyncpg needs a running task anyway
        raise UsageError("aiopglock must be used from within an asyncio task")
    return task


def _pair(key: AdvisoryKey) -> tuple[int, int]:
    return cast("tuple[int, int]", key)


class _Holder:
    """One holder connection (a new one after each loss)."""

    __slots__ = ("alive", "conn", "listener", "pid", "raw")

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.raw = raw_connection(conn)
        self.pid: int = conn.get_server_pid()
        self.alive = True
        self.listener: Callable[[Any], None] | None = None


class _Dedicated:
    """A contended key held on a connection of its own (by an ``advisory()``
    in a task of the Locker) until ``release`` is set."""

    __slots__ = ("release",)

    def __init__(self) -> None:
        self.release = asyncio.Event()


class _Request:
    """One handle's request for a key, owned by the Locker."""

    __slots__ = ("deadline", "fut", "handle", "scope", "settled", "state", "timeout", "timer")

    def __init__(self, handle: LockerLock, timeout: float | None, loop: Any) -> None:
        self.handle = handle
        self.timeout = timeout
        self.deadline: float | None = None if not timeout else loop.time() + timeout
        self.fut: asyncio.Future[bool] = loop.create_future()
        self.state = _QUEUED
        self.timer: asyncio.TimerHandle | None = None
        self.scope: anyio.CancelScope | None = None
        # Set once nothing of an abandoned request is held on the server.
        self.settled: asyncio.Future[None] | None = None

    def gone(self) -> bool:
        """The caller gave up (or is about to: its wait was cancelled)."""
        return self.state == _ABANDONED or self.fut.cancelled()


class _Entry:
    """The local state of one key."""

    __slots__ = (
        "handoffs",
        "holders",
        "key",
        "last_release",
        "lost",
        "pid",
        "release",
        "req",
        "shared",
        "state",
        "waiters",
        "where",
    )

    def __init__(self, key: AdvisoryKey, shared: bool) -> None:
        self.key = key
        self.shared = shared
        self.state = _IDLE
        self.holders: set[LockerLock] = set()
        self.waiters: collections.deque[_Request] = collections.deque()
        self.where: _Holder | _Dedicated | None = None
        self.pid: int | None = None
        self.req: _Request | None = None
        self.release: asyncio.Future[bool] | None = None
        # The last release's future and answer (for a caller cancelled meanwhile).
        self.last_release: tuple[asyncio.Future[bool] | None, bool] = (None, True)
        self.handoffs = 0
        self.lost = False


class LockerLock(_LockHandle):
    """The handle of one lock taken through a :class:`aiopglock.Locker`.

    The same attributes as :class:`aiopglock.AdvisoryLock`: ``bool(lock)`` is
    True iff acquired; ``key``, ``shared``, ``xact`` (always False),
    ``acquired``, ``lost``, ``pid`` (the server process holding it: the
    Locker's holder connection, or the dedicated one of a contended wait).

    Example::

        async with locker.advisory("invoice:42", timeout=5) as lock:
            if lock:
                print(lock.pid, lock.key)
    """

    __slots__ = (
        "_cancel_on_lost",
        "_cancelled",
        "_entry",
        "_in_block",
        "_locker",
        "_lost",
        "_lost_reason",
        "_outer",
        "_task",
        "_timeout",
        "acquired",
        "key",
        "pid",
        "shared",
        "xact",
    )

    def __init__(
        self,
        locker: Locker,
        key: AdvisoryKey,
        *,
        shared: bool,
        timeout: float | None,
        cancel_on_lost: bool,
    ) -> None:
        self.key = key
        self.shared = shared
        self.xact = False
        self.acquired = False
        self.pid: int | None = None
        self._locker = locker
        self._timeout = timeout
        self._cancel_on_lost = cancel_on_lost
        self._lost = False
        self._lost_reason = ""
        self._outer: LockerLock | None = None
        self._entry: _Entry | None = None
        self._task: asyncio.Task[Any] | None = None
        # The block is running (and is to be cancelled if the lock is lost),
        # and whether aiopglock cancelled it.
        self._in_block = False
        self._cancelled = False

    def _mark_lost(self, reason: str) -> None:
        if self._lost or not self.acquired:
            return
        self._lost = True
        self._lost_reason = reason
        logger.warning("advisory lock %r lost (pid %s): %s", self.key, self.pid, reason)
        if self._in_block:
            self._cancel_block()

    def _cancel_block(self) -> None:
        # The task's own cancellation, as asyncio.timeout() does it (an anyio
        # cancel scope per lock would cost a quarter of a Locker lock cycle):
        # the exit takes the request back and raises LockLost instead.
        if not self._cancelled and self._task is not None:
            self._cancelled = True
            self._task.cancel(f"aiopglock: advisory lock {self.key!r} lost")

    async def _enter(self) -> None:
        task = _current_task()
        self._task = task
        locker = self._locker
        holds = locker._task_holds.get(task)
        outer = holds.get(self.key) if holds else None
        if outer is not None:
            if outer.shared and not self.shared:
                raise UsageError(
                    f"this task holds advisory key {self.key!r} shared and asks for it "
                    "exclusive: upgrading in place would deadlock against itself; "
                    "release the shared hold first"
                )
            self._outer = outer
            self.acquired = True
            self.pid = outer.pid
            return
        got = locker._request(self)
        if isinstance(got, _Request):
            req = got
            try:
                granted = await req.fut
            except BaseException:
                settle = locker._abandon(req)
                if settle is not None:
                    with Cleanup() as cleanup:
                        await cleanup.wait(settle)
                raise
        else:
            granted = got
        if not granted:
            return
        locker._task_holds.setdefault(task, {})[self.key] = self
        if self._cancel_on_lost:
            self._in_block = True
            if self._lost:
                self._cancel_block()

    async def _exit(self, exc: BaseException | None) -> None:
        if self._outer is not None:
            self.acquired = False
            if self._outer.lost:
                raise self._outer._lost_error() from exc
            return
        if not self.acquired:
            return
        locker = self._locker
        task = self._task
        holds = locker._task_holds.get(task) if task is not None else None
        if holds is not None:
            holds.pop(self.key, None)
            if not holds and task is not None:
                del locker._task_holds[task]
        self._in_block = False
        swallowed = False
        if self._cancelled:
            # Take back the cancellation aiopglock requested: LockLost replaces it.
            uncancel = getattr(task, "uncancel", None)  # Python 3.11+
            if uncancel is not None:
                uncancel()
            swallowed = isinstance(exc, asyncio.CancelledError)
        cancelled: BaseException | None = None
        try:
            entry = self._entry
            wait = locker._release(self)
            if wait is not None:
                try:
                    released = await wait
                except asyncio.CancelledError as cancel:
                    # The unlock belongs to the Locker and goes on: wait for
                    # the server's answer all the same, then re-raise.
                    cancelled = None if self._cancelled else cancel
                    released = await locker._finish_release(entry, wait)
                if not released:
                    self._mark_lost("it was no longer held when the block exited")
        finally:
            self.acquired = False
        if self._lost:
            raise self._lost_error() from (None if swallowed else exc)
        if cancelled is not None:
            raise cancelled


class LockerAdvisory(_AdvisorySpec[LockerLock]):
    """An advisory lock request on a :class:`aiopglock.Locker`: an async
    context manager and a decorator, built by :meth:`Locker.advisory`.

    Holds only configuration: one instance can be entered by many tasks at
    once, and every call of a decorated function gets its own handle.

    Example::

        invoices = locker.advisory("invoices", timeout=5)

        async with invoices as lock:
            if lock:
                ...
    """

    __slots__ = ("_locker",)

    _name = "Locker.advisory"

    def __init__(
        self,
        locker: Locker,
        key: Key | None,
        *,
        shared: bool,
        xact: bool,
        timeout: Timeout,
        side_effect: SideEffect | None,
        cancel_on_lost: bool,
    ) -> None:
        self._locker = locker
        self._configure(key, shared, xact, timeout, side_effect, cancel_on_lost)

    def __repr__(self) -> str:
        return (
            f"<Locker.advisory({self._key!r}, shared={self._shared}, "
            f"timeout={self._timeout}, side_effect={self._side_effect!r})>"
        )

    async def _acquire(self, key: AdvisoryKey, side_effect: SideEffect, task: Any) -> LockerLock:
        if self._xact:
            raise UsageError(
                "xact=True needs a Connection inside an open transaction, not a Locker"
            )
        lock = LockerLock(
            self._locker,
            key,
            shared=self._shared,
            timeout=self._timeout,
            cancel_on_lost=self._cancel_on_lost,
        )
        await lock._enter()
        if not lock.acquired and side_effect is Raise:
            raise self._not_acquired(key)
        return lock


class Locker(PoolFront):
    """Many advisory locks on few connections: an async context manager that
    owns a background task and its connections.

    On entry it takes one *holder* connection from ``pool`` for its lifetime.
    :meth:`advisory` takes the same arguments as :func:`aiopglock.advisory`
    (without ``db``); uncontended locks are try-locked on the holder
    connection, concurrent requests and releases batched into one round trip;
    a contended wait moves to a dedicated connection of the pool and queues
    fairly in PostgreSQL; exclusion between tasks of this process is kept in
    process. A Locker is accepted as ``db=`` wherever a pool is.

    The trade-off: the holder connection holds every uncontended lock, so
    losing it (or terminating its backend) loses all of them at once: every
    handle gets :class:`aiopglock.LockLost`, and the Locker reconnects.

    Example::

        async with aiopglock.Locker(pool) as locker:
            async with locker.advisory("invoice:42", timeout=5) as lock:
                if lock:
                    ...
    """

    __slots__ = (
        "_batch_started",
        "_batches",
        "_beat_due",
        "_closed",
        "_entries",
        "_holder",
        "_locks",
        "_loop",
        "_pool",
        "_scopes",
        "_task_holds",
        "_tg",
        "_ticked",
        "_ticker",
        "_unlocks",
        "_wake",
    )

    def __init__(self, pool: asyncpg.Pool[Any]) -> None:
        if not isinstance(pool, asyncpg.Pool):
            raise TypeError(f"pool: expected an asyncpg Pool, got {type(pool).__name__} {pool!r}")
        self._pool = pool
        self._entries: dict[AdvisoryKey, _Entry] = {}
        self._locks: list[_Entry] = []
        self._unlocks: list[_Entry] = []
        self._holder: _Holder | None = None
        self._task_holds: dict[asyncio.Task[Any], dict[AdvisoryKey, LockerLock]] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        # Cancel scopes of the running dedicated waits and holds.
        self._scopes: set[anyio.CancelScope] = set()
        self._ticker: asyncio.TimerHandle | None = None
        self._batches = 0
        self._ticked = 0
        self._batch_started: float | None = None
        self._beat_due = False

    @property
    def pool(self) -> asyncpg.Pool[Any]:
        """The pool this Locker takes its connections from."""
        return self._pool

    def __repr__(self) -> str:
        state = "open" if self._tg is not None and not self._closed else "closed"
        held = sum(1 for e in self._entries.values() if e.state == _HELD)
        waiting = sum(len(e.waiters) for e in self._entries.values())
        holder = self._holder
        pid = f" holder pid={holder.pid}" if holder is not None and holder.alive else ""
        return f"<aiopglock.Locker {state} [held: {held} keys, queued: {waiting}]{pid}>"

    def advisory(
        self,
        key: Key | None = None,
        *,
        shared: bool = False,
        xact: bool = False,
        timeout: Timeout = None,
        side_effect: SideEffect | None = None,
        cancel_on_lost: bool = True,
    ) -> LockerAdvisory:
        """An advisory lock on this Locker, as an async context manager or a decorator.

        The arguments of :func:`aiopglock.advisory` (without ``db``), with the
        same validation and meaning. ``xact=True`` is a :class:`UsageError` when
        used: a transaction-level lock needs a Connection in a transaction.

        Example::

            async with locker.advisory("invoice:42", timeout=5) as lock:
                if lock:
                    ...

            @locker.advisory(timeout=0, side_effect=aiopglock.Skip)
            async def nightly() -> None: ...
        """
        return LockerAdvisory(
            self,
            key,
            shared=shared,
            xact=xact,
            timeout=timeout,
            side_effect=side_effect,
            cancel_on_lost=cancel_on_lost,
        )

    async def enter_advisory(
        self,
        key: AdvisoryKey,
        *,
        shared: bool,
        xact: bool,
        timeout: float | None,
        side_effect: SideEffect,
        cancel_on_lost: bool,
    ) -> LockerLock:
        """``aiopglock.advisory(db=locker)``: take the lock here. Returns the
        handle (left with ``await handle._exit(exc)``)."""
        spec = LockerAdvisory(
            self,
            None,
            shared=shared,
            xact=xact,
            timeout=timeout,
            side_effect=side_effect,
            cancel_on_lost=cancel_on_lost,
        )
        return await spec._acquire(key, side_effect, None)

    # -- lifetime ----------------------------------------------------------

    async def __aenter__(self) -> Locker:
        if self._tg is not None or self._closed:
            raise UsageError("a Locker can be entered only once")
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        tg = anyio.create_task_group()
        await tg.__aenter__()
        try:
            await tg.start(self._serve)
        except BaseException as exc:
            # Taking the holder connection failed: that error, unwrapped.
            self._closed = True
            tg.cancel_scope.cancel()
            try:
                await tg.__aexit__(None, None, None)
            except BaseException as tg_exc:
                raise exc from tg_exc
            raise
        self._tg = tg
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        self._closed = True
        tg = self._tg
        assert tg is not None
        assert self._wake is not None
        self._wake.set()
        for scope in list(self._scopes):
            scope.cancel()
        # The block's own exception is not the task group's business: it
        # propagates as it is, never wrapped in an exception group.
        try:
            await tg.__aexit__(None, None, None)
        except BaseException:
            if exc is None:
                raise
        return None

    def _closed_error(self) -> UsageError:
        return UsageError("this Locker is not open: use it inside `async with Locker(pool)`")

    # -- requests (synchronous, in the caller's task) ------------------------

    def _request(self, handle: LockerLock) -> bool | _Request:
        """Grant at once (True), refuse at once (False), or a request to await."""
        if self._closed or self._tg is None:
            raise self._closed_error()
        key = handle.key
        timeout = handle._timeout
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(key, handle.shared)
            req = _Request(handle, timeout, self._loop)
            self._start(entry, req)
            return req
        if (
            entry.state == _HELD
            and entry.shared
            and handle.shared
            and not entry.waiters
            and not entry.lost
        ):
            self._hold(entry, handle)
            return True
        if timeout == 0:
            return False
        req = _Request(handle, timeout, self._loop)
        entry.waiters.append(req)
        if req.deadline is not None:
            assert self._loop is not None
            req.timer = self._loop.call_at(req.deadline, self._expire, entry, req)
        return req

    def _abandon(self, req: _Request) -> asyncio.Future[Any] | None:
        """The caller of ``req`` stopped waiting (cancelled, or failed). Returns
        what to await until nothing of the request is held on the server."""
        state = req.state
        if state == _QUEUED:
            entry = req.handle._entry or self._entries.get(req.handle.key)
            if entry is not None and req in entry.waiters:
                entry.waiters.remove(req)
            if req.timer is not None:
                req.timer.cancel()
            req.state = _DONE
            return None
        if state in (_INFLIGHT, _WAITING, _ABANDONED):
            req.state = _ABANDONED
            if req.scope is not None:
                req.scope.cancel()
            return self._settled(req)
        if state == _GRANTED:
            # Granted as the caller gave up: the grant is the Locker's to undo.
            req.state = _DONE
            return self._release(req.handle)
        return None

    def _settled(self, req: _Request) -> asyncio.Future[None]:
        if req.settled is None:
            assert self._loop is not None
            req.settled = self._loop.create_future()
        return req.settled

    def _expire(self, entry: _Entry, req: _Request) -> None:
        """A queued request's timeout ran out before its turn."""
        req.timer = None
        if req.state != _QUEUED:
            return
        if req in entry.waiters:
            entry.waiters.remove(req)
        req.state = _DONE
        if not req.fut.done():
            req.fut.set_result(False)

    def _release(self, handle: LockerLock) -> asyncio.Future[bool] | None:
        """``handle`` leaves the key. Returns what to await until the server
        confirmed (True: released, False: it was not held), or None."""
        entry = handle._entry
        handle._entry = None
        if entry is None:
            return None
        entry.holders.discard(handle)
        if entry.holders:
            return None
        return self._last_out(entry)

    # -- the state machine ----------------------------------------------------

    def _hold(self, entry: _Entry, handle: LockerLock) -> None:
        entry.holders.add(handle)
        handle._entry = entry
        handle.pid = entry.pid
        handle.acquired = True

    def _start(self, entry: _Entry, req: _Request) -> None:
        """Ask the server for ``entry`` on behalf of ``req``: a try-lock first."""
        if req.timer is not None:
            req.timer.cancel()
            req.timer = None
        entry.state = _ACQUIRING
        entry.shared = req.handle.shared
        entry.req = req
        req.state = _INFLIGHT
        self._locks.append(entry)
        assert self._wake is not None
        self._wake.set()

    def _grant(self, entry: _Entry, req: _Request) -> None:
        """The server granted ``entry`` (for ``req``)."""
        entry.state = _HELD
        entry.req = None
        if req.gone():
            req.state = _ABANDONED
            settled = self._settled(req)
            wait = self._last_out(entry)
            if wait is None:
                settled.set_result(None)
            else:
                wait.add_done_callback(lambda _: settled.set_result(None))
            return
        req.state = _GRANTED
        self._hold(entry, req.handle)
        req.fut.set_result(True)
        if entry.shared:
            self._join_shared(entry)

    def _join_shared(self, entry: _Entry) -> None:
        """Grant the shared requests at the head of the queue a held shared key."""
        waiters = entry.waiters
        while waiters and waiters[0].handle.shared:
            req = waiters.popleft()
            if req.timer is not None:
                req.timer.cancel()
                req.timer = None
            if req.gone():
                self._drop(req)
                continue
            req.state = _GRANTED
            self._hold(entry, req.handle)
            req.fut.set_result(True)

    def _drop(self, req: _Request) -> None:
        """A queued request whose caller is already gone."""
        req.state = _ABANDONED
        settled = self._settled(req)
        if not settled.done():
            settled.set_result(None)

    def _refuse(self, entry: _Entry, req: _Request, error: BaseException | None = None) -> None:
        """``req`` was not granted (``error``: why, if it was a failure)."""
        entry.req = None
        if req.gone():
            self._drop(req)
        else:
            req.state = _DONE
            if error is None:
                req.fut.set_result(False)
            else:
                req.fut.set_exception(error)
        self._idle(entry)

    def _idle(self, entry: _Entry) -> None:
        """Nothing is held for ``entry`` on the server: next request, if any."""
        entry.state = _IDLE
        entry.where = None
        entry.pid = None
        entry.lost = False
        entry.handoffs = 0
        waiters = entry.waiters
        while waiters:
            req = waiters.popleft()
            if req.timer is not None:
                req.timer.cancel()
                req.timer = None
            if req.gone():
                self._drop(req)
            elif self._closed:
                req.state = _DONE
                req.fut.set_exception(self._closed_error())
            else:
                self._start(entry, req)
                return
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]

    def _last_out(self, entry: _Entry) -> asyncio.Future[bool] | None:
        """The last local holder left: hand over, or release on the server."""
        if entry.lost or entry.where is None:
            self._idle(entry)
            return None
        waiters = entry.waiters
        if not entry.shared and entry.handoffs < HANDOFF_LIMIT:
            while waiters and waiters[0].gone():
                self._drop(waiters.popleft())
            if waiters and not waiters[0].handle.shared:
                req = waiters.popleft()
                if req.timer is not None:
                    req.timer.cancel()
                    req.timer = None
                entry.handoffs += 1
                req.state = _GRANTED
                self._hold(entry, req.handle)
                req.fut.set_result(True)
                return None
        entry.state = _RELEASING
        assert self._loop is not None
        fut: asyncio.Future[bool] = self._loop.create_future()
        entry.release = fut
        where = entry.where
        if isinstance(where, _Dedicated):
            where.release.set()
        else:
            self._unlocks.append(entry)
            assert self._wake is not None
            self._wake.set()
        return fut

    async def _finish_release(self, entry: _Entry | None, wait: asyncio.Future[bool]) -> bool:
        """After the caller's wait for its unlock was interrupted: wait again,
        shielded, on a future of its own (the first one was cancelled with
        the caller's wait)."""
        if wait.done() and not wait.cancelled():
            return wait.result()
        assert self._loop is not None and entry is not None
        if entry.release is not wait:
            # Answered between the cancellation and now.
            done, ok = entry.last_release
            return ok if done is wait else True
        again: asyncio.Future[bool] = self._loop.create_future()
        entry.release = again
        with Cleanup() as cleanup:
            released = await cleanup.wait(again)
        return released

    def _released(self, entry: _Entry, ok: bool) -> None:
        fut = entry.release
        entry.release = None
        entry.last_release = (fut, ok)
        self._idle(entry)
        if fut is not None and not fut.done():
            fut.set_result(ok)

    def _lose(self, entry: _Entry, reason: str) -> None:
        entry.lost = True
        for handle in list(entry.holders):
            handle._mark_lost(reason)

    # -- the holder connection --------------------------------------------------

    async def _connect(self) -> _Holder:
        conn = await self._pool.acquire()
        await check_pooled(self._pool, conn)
        holder = _Holder(conn)
        raw = holder.raw

        def listener(_conn: Any) -> None:
            self._holder_died(holder, "its connection was closed")

        holder.listener = listener
        raw.add_termination_listener(listener)
        if raw.is_closed():
            self._holder_died(holder, "its connection was closed")
        return holder

    def _holder_died(self, holder: _Holder, reason: str) -> None:
        if not holder.alive:
            return
        holder.alive = False
        for entry in list(self._entries.values()):
            if entry.where is holder and entry.state == _HELD:
                self._lose(entry, reason)
        if self._wake is not None:
            self._wake.set()

    async def _drop_holder(self, holder: _Holder) -> None:
        if holder.listener is not None:
            holder.raw.remove_termination_listener(holder.listener)
            holder.listener = None
        with Cleanup() as cleanup:
            await cleanup.give_back(self._pool, holder.conn, discard=not holder.alive)

    async def _serve(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """The background task: sends the batches, keeps a holder connection.
        It runs until the Locker closes (not cancelled, so that a batch is never
        interrupted on the way; if it is, the holder connection is discarded)."""
        self._holder = await self._connect()
        self._tick()
        task_status.started()
        wake = self._wake
        assert wake is not None
        try:
            while not self._closed:
                holder = self._holder
                if holder is None or not holder.alive:
                    await self._replace_holder()
                elif self._locks or self._unlocks:
                    await self._batch(holder)
                elif self._beat_due:
                    self._beat_due = False
                    await self._heartbeat(holder)
                else:
                    wake.clear()
                    await wake.wait()
        finally:
            self._closed = True
            if self._ticker is not None:
                self._ticker.cancel()
                self._ticker = None
            with anyio.CancelScope(shield=True):
                await self._shutdown()

    def _tick(self) -> None:
        """Every half heartbeat interval: ask for a heartbeat when the holder
        connection has been idle since the last tick, and discard it when a
        batch has been running for longer than a cleanup statement may."""
        assert self._loop is not None
        self._ticker = self._loop.call_later(heartbeat_interval() / 2, self._tick)
        holder = self._holder
        if holder is None or not holder.alive:
            return
        started = self._batch_started
        if started is not None:
            if self._loop.time() - started > CLEANUP_STATEMENT_TIMEOUT:
                logger.warning("aiopglock.Locker: the holder connection stopped answering")
                terminate(holder.conn)
                self._holder_died(holder, "its connection stopped answering")
        elif self._batches == self._ticked and self._entries:
            self._beat_due = True
            assert self._wake is not None
            self._wake.set()
        self._ticked = self._batches

    async def _replace_holder(self) -> None:
        old = self._holder
        self._holder = None
        # Unlocks queued for the dead connection: its locks are gone with it.
        for entry in [e for e in self._unlocks if e.where is old]:
            self._unlocks.remove(entry)
            self._released(entry, False)
        if old is not None:
            await self._drop_holder(old)
        try:
            self._holder = await self._connect()
        except Exception as exc:
            logger.warning("aiopglock.Locker: cannot take a new holder connection: %r", exc)
            # Fail what waits for the holder; try again when asked again.
            locks, self._locks = self._locks, []
            for entry in locks:
                if entry.req is not None:
                    self._refuse(entry, entry.req, exc)
            assert self._wake is not None
            self._wake.clear()
            await self._wake.wait()

    async def _heartbeat(self, holder: _Holder) -> None:
        if not any(e.where is holder for e in self._entries.values()):
            return
        try:
            await holder.conn.fetchval(_sql.HEARTBEAT, timeout=heartbeat_interval() / 2)
        except BaseException as exc:
            terminate(holder.conn)
            self._holder_died(holder, f"its connection stopped answering ({exc!r})")
            if not isinstance(exc, Exception):
                raise

    async def _batch(self, holder: _Holder) -> None:
        """One round trip: every pending unlock and try-lock."""
        locks, self._locks = self._locks, []
        unlocks, self._unlocks = self._unlocks, []
        lock_ints = [e for e in locks if not isinstance(e.key, tuple)]
        lock_pairs = [e for e in locks if isinstance(e.key, tuple)]
        unlock_ints = [e for e in unlocks if not isinstance(e.key, tuple)]
        unlock_pairs = [e for e in unlocks if isinstance(e.key, tuple)]
        conn = holder.conn
        self._batches += 1
        assert self._loop is not None
        self._batch_started = self._loop.time()
        try:
            if lock_pairs or unlock_pairs:
                row = await conn.fetchrow(
                    _sql.LOCKER_BATCH,
                    [e.key for e in unlock_ints],
                    [e.shared for e in unlock_ints],
                    [_pair(e.key)[0] for e in unlock_pairs],
                    [_pair(e.key)[1] for e in unlock_pairs],
                    [e.shared for e in unlock_pairs],
                    [e.key for e in lock_ints],
                    [e.shared for e in lock_ints],
                    [_pair(e.key)[0] for e in lock_pairs],
                    [_pair(e.key)[1] for e in lock_pairs],
                    [e.shared for e in lock_pairs],
                )
                unlocked_ints, unlocked_pairs, locked_ints, locked_pairs = row
            else:
                unlocked_ints, locked_ints = await conn.fetchrow(
                    _sql.LOCKER_BATCH_INT8,
                    [e.key for e in unlock_ints],
                    [e.shared for e in unlock_ints],
                    [e.key for e in lock_ints],
                    [e.shared for e in lock_ints],
                )
                unlocked_pairs = locked_pairs = ()
        except Exception as exc:
            self._batch_started = None
            await self._batch_failed(holder, locks, unlocks, exc)
            return
        except BaseException:
            # Interrupted (the Locker's task cancelled from outside): what the
            # statement did is unknown, so the connection goes, with its locks.
            self._batch_started = None
            terminate(conn)
            self._holder_died(holder, "its connection was discarded")
            self._locks[:0] = locks
            for entry in unlocks:
                self._released(entry, False)
            raise
        self._batch_started = None
        for entry, ok in zip(unlock_ints, unlocked_ints, strict=True):
            self._released(entry, ok)
        for entry, ok in zip(unlock_pairs, unlocked_pairs, strict=True):
            self._released(entry, ok)
        for entry, ok in zip(lock_ints, locked_ints, strict=True):
            self._locked(entry, holder, ok)
        for entry, ok in zip(lock_pairs, locked_pairs, strict=True):
            self._locked(entry, holder, ok)

    def _locked(self, entry: _Entry, holder: _Holder, granted: bool) -> None:
        req = entry.req
        assert req is not None
        if granted:
            entry.where = holder
            entry.pid = holder.pid
            self._grant(entry, req)
            return
        timeout = req.timeout
        remaining = timeout
        if req.deadline is not None:
            assert self._loop is not None
            remaining = req.deadline - self._loop.time()
        if req.gone() or timeout == 0 or (remaining is not None and remaining <= 0):
            self._refuse(entry, req)
            return
        tg = self._tg
        if self._closed or tg is None:
            self._refuse(entry, req, self._closed_error())
            return
        # Contended: wait in PostgreSQL's queue on a connection of its own.
        req.state = _WAITING
        req.scope = anyio.CancelScope()
        if self._closed:
            req.scope.cancel()
        tg.start_soon(self._wait_dedicated, entry, req, remaining)

    async def _batch_failed(
        self, holder: _Holder, locks: list[_Entry], unlocks: list[_Entry], exc: Exception
    ) -> None:
        if not holder.alive or holder.raw.is_closed():
            # The connection died: what it held is gone; ask again on the next one.
            self._holder_died(holder, "its connection was closed")
            self._locks[:0] = locks
            for entry in unlocks:
                self._released(entry, False)
            return
        # An error of the statement (or its timeout): grants made before the
        # error are still held; release every hold on these keys, then report.
        entries = locks + unlocks
        ints = [e for e in entries if not isinstance(e.key, tuple)]
        pairs = [e for e in entries if isinstance(e.key, tuple)]
        with Cleanup() as cleanup:

            async def resolve(attempt: int) -> None:
                await holder.conn.fetchval(
                    _sql.LOCKER_RESOLVE,
                    [e.key for e in ints],
                    [e.shared for e in ints],
                    [_pair(e.key)[0] for e in pairs],
                    [_pair(e.key)[1] for e in pairs],
                    [e.shared for e in pairs],
                    timeout=CLEANUP_STATEMENT_TIMEOUT,
                )

            ok, _ = await cleanup.run(resolve)
        if not ok:
            logger.warning(
                "aiopglock.Locker: could not confirm the state of the holder connection "
                "after %r; terminating it",
                exc,
            )
            terminate(holder.conn)
            self._holder_died(holder, f"its connection was discarded after {exc!r}")
        for entry in unlocks:
            self._released(entry, ok)
        for entry in locks:
            req = entry.req
            assert req is not None
            self._refuse(entry, req, exc)

    async def _wait_dedicated(self, entry: _Entry, req: _Request, timeout: float | None) -> None:
        """A contended request, in a task of the Locker: wait for the key on a
        connection of its own, hold it there until released."""
        dedicated = _Dedicated()
        granted = False
        lost = False
        error: BaseException | None = None
        scope = req.scope
        assert scope is not None
        self._scopes.add(scope)
        try:
            with scope:
                async with advisory(
                    entry.key, db=self._pool, shared=entry.shared, timeout=timeout
                ) as lock:
                    if lock:
                        granted = True
                        entry.where = dedicated
                        entry.pid = lock.pid
                        self._grant(entry, req)
                        try:
                            await dedicated.release.wait()
                        except BaseException:
                            if lock.lost:
                                self._lose(entry, "its connection was closed")
                            raise
        except LockLost:
            lost = True
        except Exception as exc:
            error = exc
        finally:
            self._scopes.discard(scope)
            if granted:
                if entry.state == _RELEASING:
                    self._released(entry, not lost)
                else:
                    # Lost, or the Locker is closing: the handles are told.
                    self._lose(entry, "its connection was closed")
            elif entry.req is req:
                if error is None and self._closed and not req.gone():
                    error = self._closed_error()
                self._refuse(entry, req, error)

    async def _shutdown(self) -> None:
        """The Locker exits: every lock it held goes with its connections."""
        self._closed = True
        for entry in list(self._entries.values()):
            if entry.holders:
                self._lose(entry, "the Locker was closed")
        locks, self._locks = self._locks, []
        for entry in locks:
            if entry.req is not None:
                self._refuse(entry, entry.req, self._closed_error())
        unlocks, self._unlocks = self._unlocks, []
        holder, self._holder = self._holder, None
        if holder is not None:
            # The pool's reset (pg_advisory_unlock_all) releases everything.
            await self._drop_holder(holder)
        for entry in unlocks:
            self._released(entry, True)
        for entry in list(self._entries.values()):
            for req in list(entry.waiters):
                entry.waiters.remove(req)
                if req.timer is not None:
                    req.timer.cancel()
                if req.gone():
                    self._drop(req)
                else:
                    req.state = _DONE
                    req.fut.set_exception(self._closed_error())
