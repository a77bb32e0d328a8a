"""The bookkeeping of a :class:`aiopglock.Locker`, without I/O.

``LockerState`` knows, for every key in use, what the server holds on the
Locker's behalf (an :class:`EntryState`), which handles hold it locally, and
who waits for it (requests, each in a :class:`RequestState`). It decides
hand-overs, grants, refusals and abandonment; it never awaits and never
talks to PostgreSQL. The driver (``_locker_holder.py``) sends what ``locks`` and
``unlocks`` hold, and reports the server's answers back through
:meth:`LockerState.locked`, :meth:`LockerState.released` and the ``dedicated_*``
methods. Futures and timers come from the event loop, which is the only
thing the state needs to run (tests drive it without a server).

It is built in layers: the records (:class:`Entry`, :class:`Request`, their
timers and abandonment) are in ``_locker_entry.py``, the per-key transitions
(grant, refuse, hand-over, idle, the timers' expiry) in ``_locker_keys.py``;
this module adds what callers ask (request, abandon, release) and what the
driver reports (batches, dead connections, dedicated connections, closing).

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
from typing import Any

from ._locker_entry import (
    Dedicated,
    Entry,
    EntryState,
    Handle,
    Request,
    RequestState,
    closed_error,
)
from ._locker_keys import KeyTransitions

__all__ = ["LockerState"]


class LockerState(KeyTransitions):
    """Every key of a Locker: what callers ask, and what the driver reports."""

    __slots__ = ()

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
            entry.hold(handle)
            return True
        if handle._timeout == 0:
            return False
        req = Request(handle, loop)
        entry.waiters.append(req)
        req.arm(loop, self.expire, entry)
        return req

    def abandon(self, req: Request) -> asyncio.Future[Any] | None:
        """The caller of ``req`` stopped waiting (cancelled, or failed). Returns
        what to await until nothing of the request is held on the server."""
        state = req.state
        if state is RequestState.QUEUED:
            entry = req.handle._entry or self.entries.get(req.handle.key)
            if entry is not None and req in entry.waiters:
                entry.waiters.remove(req)
            req.disarm()
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
        req.disarm()
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
                req.disarm()
                if req.gone():
                    self._drop(req)
                else:
                    req.answer(False, closed_error())
