"""The per-key transitions of a :class:`aiopglock.Locker`, without I/O.

``KeyTransitions`` moves an :class:`Entry` through its states (idle,
acquiring, held, releasing) and its requests through theirs: a try-lock
queued for the holder connection, a grant to the request and the shared
requests behind it, a refusal, a local hand-over of an exclusive key (at
most ``HANDOFF_LIMIT`` in a row), an unlock queued for the server, the next
request once the key is idle again; and the timers of requests (expiry
while queued locally, or while no holder connection can send a try-lock).

``LockerState`` (``_locker_state.py``) builds the callers' and the driver's
interface on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ._keys import AdvisoryKey
from ._locker_entry import (
    HANDOFF_LIMIT,
    Dedicated,
    Entry,
    EntryState,
    Request,
    RequestState,
    closed_error,
    settle,
)

__all__ = ["KeyTransitions"]


class KeyTransitions:
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

    # -- timers -------------------------------------------------------------

    def expire(self, entry: Entry, req: Request) -> None:
        """A queued request's timeout ran out before its turn."""
        req.timer = None
        if req.state is not RequestState.QUEUED:
            return
        if req in entry.waiters:
            entry.waiters.remove(req)
        if not req.fut.done():
            req.answer(False)
        else:
            req.state = RequestState.DONE

    def arm_unsent(self, entry: Entry, req: Request) -> None:
        """While there is no holder connection, a try-lock waits for one
        within its timeout (``timeout`` covers the wait for a connection)."""
        req.arm(self._loop(), self.expire_unsent, entry)

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
        return req.remaining(self._loop())

    # -- transitions --------------------------------------------------------

    def _abandoned(self, req: Request) -> asyncio.Future[None]:
        return req.abandoned(self._loop())

    def _drop(self, req: Request) -> None:
        """A request whose caller is already gone, and nothing held for it."""
        settle(self._abandoned(req))

    def _give(self, entry: Entry, req: Request) -> None:
        """``req`` joins the holders of ``entry``, which the server holds."""
        entry.hold(req.handle)
        req.answer(True)

    def _start(self, entry: Entry, req: Request) -> None:
        """Ask the server for ``entry`` on behalf of ``req``: a try-lock first."""
        req.disarm()
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
                settle(settled)
            else:
                wait.add_done_callback(lambda _: settle(settled))
            return
        self._give(entry, req)
        if entry.shared:
            # The shared requests at the head of the queue join it.
            waiters = entry.waiters
            while waiters and waiters[0].handle.shared:
                queued = waiters.popleft()
                queued.disarm()
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
            req.answer(False, error)
        self.idle(entry)

    def idle(self, entry: Entry) -> None:
        """Nothing is held for ``entry`` on the server: next request, if any."""
        entry.reset()
        waiters = entry.waiters
        while waiters:
            req = waiters.popleft()
            req.disarm()
            if req.gone():
                self._drop(req)
            elif self.closed:
                req.answer(False, closed_error())
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


def _nothing() -> None:
    pass


def _no() -> bool:
    return False
