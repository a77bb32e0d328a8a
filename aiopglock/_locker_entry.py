"""The records of a :class:`aiopglock.Locker`'s bookkeeping, without I/O.

An :class:`Entry` is one key in use: what the server holds for it (an
:class:`EntryState`), its local holders and its queue. A :class:`Request`
is one handle's request for a key (a :class:`RequestState`), with its
timer (:meth:`Request.arm` and :meth:`Request.disarm`, the one way to
disarm one) and its abandonment (:meth:`Request.abandoned`, the one place
a request is marked abandoned). ``LockerState`` moves them between states.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import enum
from collections.abc import Callable
from typing import Protocol

from ._errors import UsageError
from ._keys import AdvisoryKey

__all__ = [
    "HANDOFF_LIMIT",
    "Dedicated",
    "Entry",
    "EntryState",
    "Handle",
    "Request",
    "RequestState",
    "closed_error",
    "settle",
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


def settle(fut: asyncio.Future[None]) -> None:
    """Set a request's ``settled`` future (nothing of it is held any more)."""
    if not fut.done():
        fut.set_result(None)


class Handle(Protocol):
    """What the state reads and sets on a lock handle (``LockerLock``)."""

    key: AdvisoryKey
    shared: bool
    acquired: bool
    pid: int | None
    _timeout: float | None
    _entry: Entry | None
    _name: str | None

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

    def arm(
        self,
        loop: asyncio.AbstractEventLoop,
        expire: Callable[[Entry, Request], None],
        entry: Entry,
    ) -> None:
        """``expire(entry, self)`` at the deadline, unless disarmed first
        (no deadline, or a timer armed already: nothing to do)."""
        if self.timer is None and self.deadline is not None:
            self.timer = loop.call_at(self.deadline, expire, entry, self)

    def disarm(self) -> None:
        """The one way a request's timer is disarmed."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def remaining(self, loop: asyncio.AbstractEventLoop) -> float | None:
        """Seconds left of the timeout (None: no limit; 0: none left)."""
        if self.deadline is None:
            return None
        return max(self.deadline - loop.time(), 0.0)

    def abandoned(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """The one place a request is marked abandoned. Returns its
        ``settled`` future (set once nothing of it is held on the server)."""
        self.state = RequestState.ABANDONED
        if self.settled is None:
            self.settled = loop.create_future()
        return self.settled

    def answer(self, granted: bool, error: BaseException | None = None) -> None:
        """The caller's answer: granted, refused, or ``error``."""
        self.disarm()
        if error is not None:
            self.state = RequestState.DONE
            self.fut.set_exception(error)
        else:
            self.state = RequestState.GRANTED if granted else RequestState.DONE
            self.fut.set_result(granted)


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

    def hold(self, handle: Handle) -> None:
        """``handle`` joins the local holders of the key."""
        self.holders.add(handle)
        handle._entry = self
        handle.pid = self.pid
        handle.acquired = True

    def reset(self) -> None:
        """Nothing is held for the key on the server any more."""
        self.state = EntryState.IDLE
        self.where = None
        self.pid = None
        self.lost = False
        self.handoffs = 0
