"""The bookkeeping of a :class:`aiopglock.Locker`, without I/O.

``LockerState`` knows, for every key in use, what the server holds on the
Locker's behalf (an :class:`EntryState`), which handles hold it locally, and
who waits for it (requests, each in a :class:`RequestState`). It decides
hand-overs, grants, refusals and abandonment; it never awaits and never
talks to PostgreSQL. The driver (``_locker.py``) sends what ``locks`` and
``unlocks`` hold, and reports the server's answers back through
:meth:`LockerState.locked`, :meth:`LockerState.released` and the ``dedicated_*``
methods. Futures and timers come from the event loop, which is the only
thing the state needs to run (tests drive it without a server).

Example (a driver's view)::

    state = LockerState()
    state.attach(loop, wake=event.set, holder_ready=lambda: True)
    req = state.request(handle)          # a Request: the key goes to ``locks``
    locks, unlocks = state.take_batch()  # what the next round trip sends
    state.locked(locks[0], holder, pid, True)   # the server granted it
    assert await req.fut
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import enum
from collections.abc import Callable
from typing import Any, Protocol

from ._errors import UsageError
from ._keys import AdvisoryKey

__all__ = [
    "HANDOFF_LIMIT",
    "Dedicated",
    "Entry",
    "EntryState",
    "Handle",
    "LockerState",
    "Request",
    "RequestState",
    "closed_error",
]

#: Consecutive local hand-overs of an exclusive key before it is released to
#: the server (where other sessions may be queued for it).
HANDOFF_LIMIT = 16


class EntryState(enum.Enum):
    """What the server holds for a key, on the Locker's behalf."""

    IDLE = "idle"
    ACQUIRING = "acquiring"
    HELD = "held"
    RELEASING = "releasing"


class RequestState(enum.Enum):
    """Where one handle's request for a key stands."""

    QUEUED = "queued"  # behind local holders of the key
    INFLIGHT = "inflight"  # a try-lock to send, or sent
    WAITING = "waiting"  # contended: waiting on a dedicated connection
    GRANTED = "granted"
    DONE = "done"  # answered (refused, failed, expired) or withdrawn
    ABANDONED = "abandoned"  # the caller left; the Locker settles it


def closed_error() -> UsageError:
    """The error of using a closed Locker."""
    return UsageError(
        "this Locker is closed (by aclose() or at the end of its `async with`): "
        "create a new Locker to take more locks"
    )


class Handle(Protocol):
    """What the state reads and sets on a lock handle (``LockerLock``)."""

    key: AdvisoryKey
    shared: bool
    acquired: bool
    pid: int | None
    _timeout: float | None
    _entry: Entry | None

    def _mark_lost(self, reason: str) -> None: ...


class Dedicated:
    """A contended key held on a connection of its own, by a task of the
    Locker, until ``release`` is set (or the connection dies)."""

    __slots__ = ("dead", "release")

    def __init__(self) -> None:
        self.release = asyncio.Event()
        # Why the connection is gone, once it is.
        self.dead: str | None = None


class Request:
    """One handle's request for a key, owned by the Locker."""

    __slots__ = ("context", "deadline", "fut", "handle", "settled", "state", "task", "timer")

    def __init__(self, handle: Handle, loop: asyncio.AbstractEventLoop) -> None:
        self.handle = handle
        timeout = handle._timeout
        self.deadline: float | None = None if not timeout else loop.time() + timeout
        self.fut: asyncio.Future[bool] = loop.create_future()
        self.state = RequestState.QUEUED
        self.timer: asyncio.TimerHandle | None = None
        # The caller's context: a contended wait runs in it, and a grant is
        # recorded in it (a prioritize() block of the caller protects both).
        self.context = contextvars.copy_context()
        # The task of a contended wait on a dedicated connection.
        self.task: asyncio.Task[None] | None = None
        # Set once nothing of an abandoned request is held on the server.
        self.settled: asyncio.Future[None] | None = None

    def gone(self) -> bool:
        """The caller gave up (or is about to: its wait was cancelled)."""
        return self.state is RequestState.ABANDONED or self.fut.cancelled()


class Entry:
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
        self.state = EntryState.IDLE
        self.holders: set[Handle] = set()
        self.waiters: collections.deque[Request] = collections.deque()
        # Where the server holds it: the holder connection, or a Dedicated.
        self.where: object | None = None
        self.pid: int | None = None
        # The request whose try-lock or wait is under way.
        self.req: Request | None = None
        self.release: asyncio.Future[bool] | None = None
        # The last release's future and answer (for a caller cancelled meanwhile).
        self.last_release: tuple[asyncio.Future[bool] | None, bool] = (None, True)
        self.handoffs = 0
        self.lost = False


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class LockerState:
    """Every key of a Locker: entries, local queues, the pending batch."""

    __slots__ = ("_holder_ready", "_wake", "closed", "entries", "locks", "loop", "unlocks")

    def __init__(self) -> None:
        self.entries: dict[AdvisoryKey, Entry] = {}
        # Try-locks and unlocks for the holder connection's next round trip.
        self.locks: list[Entry] = []
        self.unlocks: list[Entry] = []
        self.closed = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._wake: Callable[[], None] = _nothing
        self._holder_ready: Callable[[], bool] = _no

    def attach(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        wake: Callable[[], None],
        holder_ready: Callable[[], bool],
    ) -> None:
        """Run on ``loop``; ``wake()`` when ``locks`` or ``unlocks`` grew;
        ``holder_ready()``: whether a holder connection can send them now."""
        self.loop = loop
        self._wake = wake
        self._holder_ready = holder_ready

    def _loop(self) -> asyncio.AbstractEventLoop:
        assert self.loop is not None, "attach() first"
        return self.loop

    # -- requests (in the caller's task) ------------------------------------

    def request(self, handle: Handle) -> bool | Request:
        """Grant at once (True), refuse at once (False), or a request to await."""
        loop = self._loop()
        entry = self.entries.get(handle.key)
        if entry is None:
            entry = self.entries[handle.key] = Entry(handle.key, handle.shared)
            req = Request(handle, loop)
            self._start(entry, req)
            return req
        if (
            entry.state is EntryState.HELD
            and entry.shared
            and handle.shared
            and not entry.waiters
            and not entry.lost
        ):
            self._hold(entry, handle)
            return True
        if handle._timeout == 0:
            return False
        req = Request(handle, loop)
        entry.waiters.append(req)
        if req.deadline is not None:
            req.timer = loop.call_at(req.deadline, self.expire, entry, req)
        return req

    def abandon(self, req: Request) -> asyncio.Future[Any] | None:
        """The caller of ``req`` stopped waiting (cancelled, or failed). Returns
        what to await until nothing of the request is held on the server."""
        state = req.state
        if state is RequestState.QUEUED:
            entry = req.handle._entry or self.entries.get(req.handle.key)
            if entry is not None and req in entry.waiters:
                entry.waiters.remove(req)
            self._disarm(req)
            req.state = RequestState.DONE
            return None
        if state in (RequestState.INFLIGHT, RequestState.WAITING, RequestState.ABANDONED):
            settled = self._abandoned(req)
            if state is RequestState.WAITING and req.task is not None:
                # The wait on a dedicated connection: its task resolves it.
                req.task.cancel()
            return settled
        if state is RequestState.GRANTED:
            # Granted as the caller gave up: the grant is the Locker's to undo.
            req.state = RequestState.DONE
            return self.release(req.handle)
        return None

    def release(self, handle: Handle) -> asyncio.Future[bool] | None:
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

    def rewait(
        self, entry: Entry | None, wait: asyncio.Future[bool]
    ) -> bool | asyncio.Future[bool]:
        """The caller's wait for its unlock was interrupted: the answer, or a
        future of its own to wait on (the first one was cancelled with it)."""
        if wait.done() and not wait.cancelled():
            return wait.result()
        assert entry is not None
        if entry.release is not wait:
            # Answered between the cancellation and now.
            done, ok = entry.last_release
            return ok if done is wait else True
        again: asyncio.Future[bool] = self._loop().create_future()
        entry.release = again
        return again

    # -- timers -------------------------------------------------------------

    @staticmethod
    def _disarm(req: Request) -> None:
        """The one way a request's timer is disarmed."""
        if req.timer is not None:
            req.timer.cancel()
            req.timer = None

    def expire(self, entry: Entry, req: Request) -> None:
        """A queued request's timeout ran out before its turn."""
        req.timer = None
        if req.state is not RequestState.QUEUED:
            return
        if req in entry.waiters:
            entry.waiters.remove(req)
        req.state = RequestState.DONE
        if not req.fut.done():
            req.fut.set_result(False)

    def arm_unsent(self, entry: Entry, req: Request) -> None:
        """While there is no holder connection, a try-lock waits for one
        within its timeout (``timeout`` covers the wait for a connection)."""
        if req.timer is None and req.deadline is not None:
            req.timer = self._loop().call_at(req.deadline, self.expire_unsent, entry, req)

    def expire_unsent(self, entry: Entry, req: Request) -> None:
        """A try-lock's timeout ran out before a holder connection could send it."""
        req.timer = None
        if req.state is not RequestState.INFLIGHT or entry.req is not req:
            return
        if entry not in self.locks:
            return  # sent meanwhile: its answer decides
        self.locks.remove(entry)
        self.refuse(entry, req)

    def remaining(self, req: Request) -> float | None:
        """Seconds left of the request's timeout (None: no limit; 0: none left)."""
        if req.deadline is None:
            return None
        return max(req.deadline - self._loop().time(), 0.0)

    # -- transitions --------------------------------------------------------

    def _abandoned(self, req: Request) -> asyncio.Future[None]:
        """The one place a request is marked abandoned. Returns its
        ``settled`` future (set once nothing of it is held on the server)."""
        req.state = RequestState.ABANDONED
        if req.settled is None:
            req.settled = self._loop().create_future()
        return req.settled

    def _drop(self, req: Request) -> None:
        """A request whose caller is already gone, and nothing held for it."""
        _settle(self._abandoned(req))

    def _give(self, entry: Entry, req: Request) -> None:
        """``req`` joins the holders of ``entry``, which the server holds."""
        self._disarm(req)
        req.state = RequestState.GRANTED
        self._hold(entry, req.handle)
        req.fut.set_result(True)

    def _hold(self, entry: Entry, handle: Handle) -> None:
        entry.holders.add(handle)
        handle._entry = entry
        handle.pid = entry.pid
        handle.acquired = True

    def _start(self, entry: Entry, req: Request) -> None:
        """Ask the server for ``entry`` on behalf of ``req``: a try-lock first."""
        self._disarm(req)
        entry.state = EntryState.ACQUIRING
        entry.shared = req.handle.shared
        entry.req = req
        req.state = RequestState.INFLIGHT
        self.locks.append(entry)
        if req.deadline is not None and not self._holder_ready():
            self.arm_unsent(entry, req)
        self._wake()

    def grant(self, entry: Entry, req: Request) -> None:
        """The server granted ``entry`` (for ``req``)."""
        entry.state = EntryState.HELD
        entry.req = None
        if req.gone():
            settled = self._abandoned(req)
            wait = self._last_out(entry)
            if wait is None:
                _settle(settled)
            else:
                wait.add_done_callback(lambda _: _settle(settled))
            return
        self._give(entry, req)
        if entry.shared:
            # The shared requests at the head of the queue join it.
            waiters = entry.waiters
            while waiters and waiters[0].handle.shared:
                queued = waiters.popleft()
                self._disarm(queued)
                if queued.gone():
                    self._drop(queued)
                else:
                    self._give(entry, queued)

    def refuse(self, entry: Entry, req: Request, error: BaseException | None = None) -> None:
        """``req`` was not granted (``error``: why, if it was a failure)."""
        entry.req = None
        if req.gone():
            self._drop(req)
        else:
            req.state = RequestState.DONE
            if error is None:
                req.fut.set_result(False)
            else:
                req.fut.set_exception(error)
        self.idle(entry)

    def idle(self, entry: Entry) -> None:
        """Nothing is held for ``entry`` on the server: next request, if any."""
        entry.state = EntryState.IDLE
        entry.where = None
        entry.pid = None
        entry.lost = False
        entry.handoffs = 0
        waiters = entry.waiters
        while waiters:
            req = waiters.popleft()
            self._disarm(req)
            if req.gone():
                self._drop(req)
            elif self.closed:
                req.state = RequestState.DONE
                req.fut.set_exception(closed_error())
            else:
                self._start(entry, req)
                return
        if self.entries.get(entry.key) is entry:
            del self.entries[entry.key]

    def _last_out(self, entry: Entry) -> asyncio.Future[bool] | None:
        """The last local holder left: hand over, or release on the server."""
        if entry.lost or entry.where is None:
            self.idle(entry)
            return None
        waiters = entry.waiters
        if not entry.shared and entry.handoffs < HANDOFF_LIMIT:
            while waiters and waiters[0].gone():
                self._drop(waiters.popleft())
            if waiters and not waiters[0].handle.shared:
                entry.handoffs += 1
                self._give(entry, waiters.popleft())
                return None
        entry.state = EntryState.RELEASING
        fut: asyncio.Future[bool] = self._loop().create_future()
        entry.release = fut
        where = entry.where
        if isinstance(where, Dedicated):
            where.release.set()
        else:
            self.unlocks.append(entry)
            self._wake()
        return fut

    def released(self, entry: Entry, ok: bool) -> None:
        """The server answered an unlock (``ok``: it was held)."""
        fut = entry.release
        entry.release = None
        entry.last_release = (fut, ok)
        self.idle(entry)
        if fut is not None and not fut.done():
            fut.set_result(ok)

    def lose(self, entry: Entry, reason: str) -> None:
        """The server no longer holds ``entry``: its handles are told."""
        entry.lost = True
        for handle in list(entry.holders):
            handle._mark_lost(reason)

    # -- the holder connection's batches -------------------------------------

    def take_batch(self) -> tuple[list[Entry], list[Entry]]:
        """The try-locks and unlocks of the next round trip."""
        locks, self.locks = self.locks, []
        unlocks, self.unlocks = self.unlocks, []
        return locks, unlocks

    def batch_undone(self, locks: list[Entry], unlocks: list[Entry]) -> None:
        """A batch's connection died with it: its try-locks are asked again
        (on the next holder), its unlocks were undone with the connection."""
        self.locks[:0] = locks
        for entry in unlocks:
            self.released(entry, False)

    def locked(self, entry: Entry, where: object, pid: int, granted: bool) -> Request | None:
        """The server answered the try-lock of ``entry``. Returns the request
        that must now wait on a connection of its own (contended), or None."""
        req = entry.req
        assert req is not None
        self._disarm(req)
        if granted:
            entry.where = where
            entry.pid = pid
            self.grant(entry, req)
            return None
        remaining = self.remaining(req)
        if req.gone() or req.handle._timeout == 0 or remaining == 0:
            self.refuse(entry, req)
            return None
        if self.closed:
            self.refuse(entry, req, closed_error())
            return None
        req.state = RequestState.WAITING
        return req

    def fail_locks(self, error: BaseException) -> None:
        """The try-locks waiting to be sent fail with ``error``."""
        locks, self.locks = self.locks, []
        for entry in locks:
            if entry.req is not None:
                self.refuse(entry, entry.req, error)

    def holds_on(self, where: object) -> bool:
        return any(e.where is where for e in self.entries.values())

    def lose_on(self, where: object, reason: str) -> None:
        """A connection died: every key held on it is lost."""
        for entry in list(self.entries.values()):
            if entry.where is where and entry.state is EntryState.HELD:
                self.lose(entry, reason)

    def retire(self, where: object) -> None:
        """Unlocks queued for a dead connection: its locks went with it."""
        for entry in [e for e in self.unlocks if e.where is where]:
            self.unlocks.remove(entry)
            self.released(entry, False)

    # -- contended keys, on dedicated connections ----------------------------

    def wait_ended(self, entry: Entry, req: Request, error: BaseException | None) -> None:
        """A dedicated wait ended without the lock (``error``: why, if it failed)."""
        if entry.req is req:
            if error is None and self.closed and not req.gone():
                error = closed_error()
            self.refuse(entry, req, error)

    def dedicated_held(self, entry: Entry, req: Request, where: Dedicated, pid: int) -> None:
        entry.where = where
        entry.pid = pid
        self.grant(entry, req)

    def dedicated_died(self, entry: Entry, where: Dedicated, reason: str) -> None:
        """The connection of a contended lock died: its handles are told at
        once; its task (woken) gives the connection back."""
        if where.dead is not None:
            return
        where.dead = reason
        where.release.set()
        if entry.where is where and entry.state is EntryState.HELD:
            self.lose(entry, reason)

    def dedicated_done(self, entry: Entry, where: Dedicated, released: bool) -> None:
        """The connection of a contended lock went back to the pool."""
        if entry.where is not where:
            return  # lost and already moved on
        if entry.state is EntryState.RELEASING:
            self.released(entry, released and where.dead is None)
        else:
            # Lost, or the Locker closes with the lock held: the handles are told.
            self.lose(entry, where.dead or "the Locker was closed")
            if not entry.holders:
                self.idle(entry)

    # -- closing ------------------------------------------------------------

    def close(self) -> list[Entry]:
        """The Locker closes: held keys are lost, unsent try-locks fail.
        Returns the unlocks not sent (the holder's reset releases them)."""
        self.closed = True
        for entry in list(self.entries.values()):
            if entry.holders:
                self.lose(entry, "the Locker was closed")
        self.fail_locks(closed_error())
        unlocks, self.unlocks = self.unlocks, []
        return unlocks

    def closed_down(self, unlocks: list[Entry]) -> None:
        """The holder connection is back in the pool: ``unlocks`` are done,
        and every request still queued fails."""
        for entry in unlocks:
            self.released(entry, True)
        for entry in list(self.entries.values()):
            for req in list(entry.waiters):
                entry.waiters.remove(req)
                self._disarm(req)
                if req.gone():
                    self._drop(req)
                else:
                    req.state = RequestState.DONE
                    req.fut.set_exception(closed_error())


def _nothing() -> None:
    pass


def _no() -> bool:
    return False
