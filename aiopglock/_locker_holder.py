"""The holder connection of a :class:`aiopglock.Locker`, and the background
task that serves it.

``HolderService`` is what the Locker and its background task share: the
pool, the ``LockerState``, the current holder connection and the wake-up
event. It refers to the Locker only weakly, so that a Locker dropped while
open is collected (it warns, and the task gives its connection back).

The task (:func:`serve`) takes a holder connection when a request needs
one, sends every pending try-lock and unlock in one round trip, heartbeats
the connection while locks are held on it and idle, and replaces it when it
dies. What the server's answers mean is ``LockerState``'s; the statements
are in ``_locker_batch.py``.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
import asyncpg

from ._concurrency import Cleanup, mark_retrieved
from ._conntypes import Proxy, RawConn
from ._db import heartbeat_interval, lock_table_full, raw_connection, terminate
from ._liveness import Liveness
from ._locker_batch import held_on, release_on, send_batch
from ._locker_entry import Entry, closed_error
from ._locker_state import LockerState
from ._protect import granted as protect_granted
from ._server import check_pooled

if TYPE_CHECKING:
    from ._locker import Locker

__all__ = ["Holder", "HolderService", "serve"]

logger = logging.getLogger("aiopglock")


class Holder:
    """One holder connection (a new one after each loss), watched by a
    :class:`~aiopglock._liveness.Liveness` of its own."""

    __slots__ = ("alive", "conn", "liveness", "pid", "raw")

    def __init__(self, conn: Proxy, on_lost: Callable[[Holder, str], None]) -> None:
        self.conn = conn
        raw = raw_connection(conn)
        assert raw is not None  # a proxy still leased
        self.raw: RawConn = raw
        self.pid: int = conn.get_server_pid()
        self.alive = True
        self.liveness = Liveness(lambda reason: on_lost(self, reason))


class HolderService:
    """The holder connection's side of a Locker: taking a connection, the
    batches and their failures, heartbeats, giving the connection back."""

    __slots__ = (
        "dropped",
        "holder",
        "in_batch",
        "loop",
        "owner",
        "pool",
        "ready",
        "state",
        "timed_out",
        "waits",
        "wake",
        "want_holder",
    )

    def __init__(
        self,
        owner: weakref.ReferenceType[Locker],
        pool: asyncpg.Pool[Any],
        state: LockerState,
        loop: asyncio.AbstractEventLoop,
        waits: set[asyncio.Task[None]],
    ) -> None:
        self.owner = owner
        self.pool = pool
        self.state = state
        self.loop = loop
        # The tasks of contended waits (and holds) on dedicated connections.
        self.waits = waits
        self.holder: Holder | None = None
        self.wake = asyncio.Event()
        self.timed_out = False
        # Set by Locker.__del__: the task stops even if something (a recorded
        # warning, a debugger) brings the Locker back to life afterwards.
        self.dropped = False
        # A Locker being entered asks for a holder connection before any lock.
        self.want_holder = False
        # The outcome of the last attempt to take a holder connection.
        self.ready: asyncio.Future[None] = loop.create_future()
        self.in_batch = False

    def holder_ready(self) -> bool:
        holder = self.holder
        return holder is not None and holder.alive

    async def idle_wait(self, interval: float | None) -> bool:
        """Wait to be woken (the caller cleared the event before it let go of
        the Locker); True when ``interval`` passed without a wake-up. A plain
        timer rather than a cancel scope: this runs twice per lock cycle."""
        wake = self.wake
        if interval is None:
            await wake.wait()
            return False
        self.timed_out = False
        timer = self.loop.call_later(interval, self._time_out)
        try:
            await wake.wait()
        finally:
            timer.cancel()
        return self.timed_out

    def _time_out(self) -> None:
        self.timed_out = True
        self.wake.set()

    # -- the connection ------------------------------------------------------

    async def connect(self) -> None:
        """Take a holder connection for the requests waiting for one. On
        failure, fail them; the next request tries again."""
        self.want_holder = False
        state = self.state
        for entry in state.locks:
            if entry.req is not None:
                state.arm_unsent(entry, entry.req)
        try:
            conn = await self.pool.acquire()
            # A pooler or a hot standby is refused before anything is held.
            await check_pooled(self.pool, conn)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.warning("aiopglock.Locker: cannot take a holder connection: %r", exc)
            state.fail_locks(exc)
            self.set_ready(exc)
            return
        holder = Holder(conn, self.died)
        # Its heartbeat is sent by serve() between batches (one connection
        # runs one statement at a time).
        holder.liveness.start(conn, holder.raw, heartbeat=False)
        self.holder = holder
        holder.liveness.check()
        self.set_ready(None)

    def set_ready(self, error: BaseException | None) -> None:
        """Answer whoever waits for a holder connection (``Locker.__aenter__``)."""
        ready = self.ready
        if ready.done():
            return
        if error is None:
            ready.set_result(None)
        else:
            ready.add_done_callback(mark_retrieved)
            ready.set_exception(error)

    def died(self, holder: Holder, reason: str) -> None:
        """``holder``'s connection is gone: every key held on it is lost."""
        if not holder.alive:
            return
        holder.alive = False
        self.state.lose_on(holder, reason)
        self.wake.set()

    async def retire(self, holder: Holder) -> None:
        """The holder connection died: its locks went with it; give it back."""
        self.state.retire(holder)
        await self.give_back()

    async def give_back(self) -> None:
        holder, self.holder = self.holder, None
        if holder is None:
            return
        holder.liveness.unwatch()
        with Cleanup() as cleanup:
            await cleanup.give_back(self.pool, holder.conn, discard=not holder.alive)

    async def heartbeat(self, holder: Holder) -> None:
        if not self.state.holds_on(holder):
            return
        try:
            await holder.liveness.beat()
        except BaseException:
            # Interrupted (the Locker's task cancelled from outside): the
            # connection's state is unknown, so it goes, with its locks.
            terminate(holder.conn)
            self.died(holder, "its connection was discarded")
            raise

    async def shutdown(self) -> None:
        """The Locker closes: every lock it held goes with its connections."""
        unlocks = self.state.close()
        self.set_ready(closed_error())
        # The pool's reset (pg_advisory_unlock_all) releases everything.
        await self.give_back()
        self.state.closed_down(unlocks)

    # -- batches -------------------------------------------------------------

    async def batch(self, holder: Holder) -> None:
        """One round trip: every pending unlock and try-lock."""
        state = self.state
        locks, unlocks = state.take_batch()
        self.in_batch = True
        try:
            unlocked, locked = await send_batch(holder.conn, locks, unlocks)
        except asyncio.TimeoutError:
            # No answer within a cleanup statement's time: the connection is
            # discarded, with its locks.
            self.in_batch = False
            logger.warning("aiopglock.Locker: the holder connection stopped answering")
            self._discard(holder, locks, unlocks, "its connection stopped answering")
            return
        except Exception as exc:
            self.in_batch = False
            await self._failed(holder, locks, unlocks, exc)
            return
        except BaseException:
            # Interrupted (the Locker's task cancelled from outside): what the
            # statement did is unknown, so the connection goes, with its locks.
            self.in_batch = False
            self._discard(holder, locks, unlocks, "its connection was discarded")
            raise
        self.in_batch = False
        for entry, ok in unlocked:
            state.released(entry, ok)
        for entry, ok in locked:
            self._locked(entry, holder, ok)

    def _discard(
        self, holder: Holder, locks: list[Entry], unlocks: list[Entry], reason: str
    ) -> None:
        terminate(holder.conn)
        self.died(holder, reason)
        self.state.batch_undone(locks, unlocks)

    def _locked(self, entry: Entry, holder: Holder, granted: bool) -> None:
        req = entry.req
        if granted and req is not None:
            # A prioritize() block of the caller never signals the holder.
            req.context.run(protect_granted, holder.conn)
        contended = self.state.locked(entry, holder, holder.pid, granted)
        if contended is None:
            return
        # Contended: wait in PostgreSQL's queue on a connection of its own, in
        # a task of the Locker that runs in the caller's context. The task
        # keeps the Locker alive while it runs (the background task holds
        # it during a batch).
        owner = self.owner()
        assert owner is not None
        task = contended.context.run(self.loop.create_task, owner._wait_dedicated(entry, contended))
        contended.task = task
        self.waits.add(task)
        task.add_done_callback(self.waits.discard)

    async def _failed(
        self, holder: Holder, locks: list[Entry], unlocks: list[Entry], exc: Exception
    ) -> None:
        if not holder.alive or holder.raw.is_closed():
            # The connection died: what it held is gone; ask again on the next one.
            self.died(holder, "its connection was closed")
            self.state.batch_undone(locks, unlocks)
            return
        # The lock table filled up part-way through the batch: keep the
        # grants the server made, fail the rest.
        if isinstance(exc, asyncpg.exceptions.OutOfMemoryError) and await self._lock_table_full(
            holder, locks, unlocks, exc
        ):
            return
        # An error of the statement: grants made before the error are still
        # held; release every hold on these keys, then report.
        ok = await release_on(holder.conn, locks + unlocks)
        if not ok:
            logger.warning(
                "aiopglock.Locker: could not confirm the state of the holder connection "
                "after %r; terminating it",
                exc,
            )
            terminate(holder.conn)
            self.died(holder, f"its connection was discarded after {exc!r}")
        state = self.state
        for entry in unlocks:
            state.released(entry, ok)
        error = lock_table_full(exc)
        if error is not exc:
            error.__cause__ = exc
        for entry in locks:
            req = entry.req
            assert req is not None
            state.refuse(entry, req, error)

    async def _lock_table_full(
        self, holder: Holder, locks: list[Entry], unlocks: list[Entry], exc: Exception
    ) -> bool:
        """A batch failed with SQLSTATE 53200. Ask the server which of its keys
        the holder session holds: a try-lock that got in before the table
        filled is granted, the others fail with an error naming the setting;
        an unlock not done yet is sent again. False when the server could
        not tell (the caller then releases everything)."""
        held = await held_on(holder.conn, locks + unlocks)
        if held is None:
            return False
        error = lock_table_full(exc)
        error.__cause__ = exc
        state = self.state
        for entry in unlocks:
            if held[id(entry)]:
                state.unlocks.append(entry)  # the next batch
            else:
                state.released(entry, True)
        refused = 0
        for entry in locks:
            if held[id(entry)]:
                self._locked(entry, holder, True)
            else:
                refused += 1
                req = entry.req
                assert req is not None
                state.refuse(entry, req, error)
        logger.warning(
            "aiopglock.Locker: the lock table is full: %d of %d lock requests failed (%s)",
            refused,
            len(locks),
            exc,
        )
        return True


async def serve(service: HolderService) -> None:
    """The Locker's background task: sends the batches, keeps a holder
    connection. It ends when the Locker closes (``aclose()`` lets a batch on
    the way finish) or is garbage-collected; either way its holder connection
    goes back to the pool, whose reset releases every lock on it. It holds
    the Locker (``service.owner``) only while it works, never while idle."""
    state = service.state
    beat_due = False
    try:
        while True:
            locker = service.owner()
            if locker is None or state.closed or service.dropped:
                return
            holder = service.holder
            if holder is not None and not holder.alive:
                await service.retire(holder)
            elif holder is None:
                if state.locks or service.want_holder:
                    await service.connect()
                else:
                    service.wake.clear()
                    del locker  # a Locker dropped here wakes us at once
                    await service.idle_wait(None)
            elif state.locks or state.unlocks:
                beat_due = False
                await service.batch(holder)
            elif beat_due:
                beat_due = False
                await service.heartbeat(holder)
            else:
                # Idle: a heartbeat every half interval while locks are held
                # on the holder (a silent death is noticed within one).
                # (The heartbeat itself looks whether locks are held on it.)
                interval = heartbeat_interval() / 2 if state.entries else None
                service.wake.clear()
                del locker  # a Locker dropped here wakes us at once
                beat_due = await service.idle_wait(interval)
    finally:
        locker = service.owner()
        with anyio.CancelScope(shield=True):
            if locker is not None:
                await service.shutdown()
            else:
                await service.give_back()
