"""Liveness of a held lock's connection: is it still there to hold the lock?

Three sources tell, and :class:`Liveness` keeps them for one hold (an
``advisory()`` lock, a Locker's holder connection, a Locker's contended key on
its dedicated connection):

- the connection's termination listener (asyncpg calls it when the socket
  closes), registered once per connection for its whole life, rather than
  once per lock: registering a listener costs asyncpg an ``inspect`` call;
- a heartbeat (``SELECT 1`` every half interval, each allowed half an
  interval) for a connection aiopglock owns, started by the loop's
  :class:`~aiopglock._concurrency.Sweeper` only once the lock has been held a
  quarter interval, so short locks never pay for it (a connection that runs
  other statements meanwhile, a Locker's holder, sends :meth:`Liveness.beat`
  itself between them);
- a look at the connection itself (:meth:`Liveness.check`), since the
  listener runs a loop turn after the socket closes.

It also bounds the cleanup statements of the hold with the same sweeper
(:meth:`Liveness.arm_deadline`): past the deadline the connection is
terminated, which ends the statement with an error.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable

import anyio

from . import _names, _sql
from ._concurrency import Cleanup, Sweeper, sweeper
from ._conntypes import Conn, RawConn
from ._db import CLEANUP_STATEMENT_TIMEOUT, heartbeat_interval, terminate

__all__ = ["Liveness"]


class _ConnWatch:
    """The termination listener of one connection, for every hold on it."""

    __slots__ = ("holders", "key", "ref")

    def __init__(self, raw: RawConn) -> None:
        self.key = id(raw)
        self.ref = weakref.ref(raw)
        self.holders: set[Liveness] = set()

    def __call__(self, _conn: object) -> None:
        # asyncpg drops its listeners once they have been called.
        if _watches.get(self.key) is self:
            del _watches[self.key]
        holders, self.holders = self.holders, set()
        for liveness in holders:
            liveness.lose("its connection was closed")


_watches: dict[int, _ConnWatch] = {}


def _watch(raw: RawConn) -> _ConnWatch:
    watch = _watches.get(id(raw))
    if watch is None or watch.ref() is not raw:
        watch = _watches[id(raw)] = _ConnWatch(raw)
        raw.add_termination_listener(watch)
    return watch


class Liveness:
    """Tells one hold (through ``on_lost(reason)``) that its connection died.

    Example::

        liveness = Liveness(lock.mark_lost)
        liveness.start(conn, raw, heartbeat=True)  # after the grant
        ...
        await liveness.stop(cleanup)                       # at exit
        liveness.check()                                   # closed meanwhile?
    """

    __slots__ = (
        "_beat",
        "_conn",
        "_hb_stop",
        "_hb_task",
        "_lost",
        "_on_lost",
        "_raw",
        "_sweeper",
        "expired",
    )

    def __init__(self, on_lost: Callable[[str], None]) -> None:
        self._on_lost = on_lost
        self._beat = _sql.HEARTBEAT
        self._lost = False
        self._conn: Conn | None = None
        self._raw: RawConn | None = None
        self._sweeper: Sweeper | None = None
        self._hb_task: asyncio.Task[None] | None = None
        self._hb_stop: asyncio.Event | None = None
        # A cleanup statement ran past its deadline (its connection was
        # terminated, alive but unresponsive).
        self.expired = False

    def start(
        self, conn: Conn, raw: RawConn | None, *, heartbeat: bool, beat: str = _sql.HEARTBEAT
    ) -> None:
        """Watch ``raw`` (the connection behind ``conn``) while held;
        ``heartbeat`` for a connection aiopglock owns that nothing else uses
        meanwhile (a connection shared with other statements calls
        :meth:`beat` itself, between them). ``beat``: the heartbeat's
        statement, without parameters (a named lock's names it, so that the
        holder's query keeps showing the name)."""
        self._beat = beat
        self._conn = conn
        self._raw = raw
        if raw is not None:
            _watch(raw).holders.add(self)
        if heartbeat:
            self._sweeper = sweeper(asyncio.get_running_loop())
            self._sweeper.hold(self, self._start_heartbeat)

    def check(self) -> None:
        """Report a connection that is closed (or gone) now."""
        raw = self._raw
        if raw is None or raw.is_closed():
            self.lose("its connection was closed")

    def lose(self, reason: str) -> None:
        """Report the loss (every later check reports it again: ``on_lost``
        is idempotent)."""
        self._lost = True
        self._on_lost(reason)

    async def stop(self, cleanup: Cleanup) -> None:
        """Stop watching: no heartbeat and no listener call after this."""
        if self._sweeper is not None:
            self._sweeper.unhold(self)
        task = self._hb_task
        if task is not None and self._hb_stop is not None:
            self._hb_stop.set()
            await cleanup.wait(task)
            self._hb_task = None
        self.unwatch()

    def unwatch(self) -> None:
        """Stop watching a hold that has no heartbeat (see :meth:`stop`)."""
        self._conn = None
        raw = self._raw
        if raw is not None:
            watch = _watches.get(id(raw))
            if watch is not None and watch.ref() is raw:
                watch.holders.discard(self)

    def _start_heartbeat(self) -> None:
        if self._lost or self._conn is None:
            return
        self._hb_stop = asyncio.Event()
        # Started lazily, only for locks held longer than a quarter interval,
        # and always awaited in stop() before the hold's exit completes.
        self._hb_task = asyncio.get_running_loop().create_task(self._heartbeat(self._hb_stop))

    async def _heartbeat(self, stop: asyncio.Event) -> None:
        # A beat every half interval, each allowed half an interval: a silent
        # death is noticed within one interval of happening.
        half = heartbeat_interval() / 2
        while not stop.is_set():
            if not await self.beat():
                return
            with anyio.move_on_after(half):
                await stop.wait()

    async def beat(self) -> bool:
        """One heartbeat, allowed half an interval: False when the connection
        did not answer (it is then lost, and terminated).

        Example::

            if not await liveness.beat():
                ...  # on_lost has been called
        """
        conn = self._conn
        if conn is None:
            return False
        try:
            # configure(server_names=False) takes effect on held locks too.
            beat = self._beat if _names.enabled() else _sql.HEARTBEAT
            await conn.execute(beat, timeout=heartbeat_interval() / 2)
        except Exception as exc:
            self.lose(f"its connection stopped answering ({exc!r})")
            terminate(conn)
            return False
        return True

    # -- bounding a cleanup statement ------------------------------------------

    def arm_deadline(self, conn: Conn) -> Sweeper:
        """Terminate ``conn`` (and set :attr:`expired`) unless the sweeper
        returned is ``clear(self)``-ed within the cleanup statement timeout."""
        sweep = self._sweeper
        if sweep is None:
            sweep = sweeper(asyncio.get_running_loop())
        sweep.deadline(self, conn, CLEANUP_STATEMENT_TIMEOUT, self._on_expired)
        return sweep

    def _on_expired(self) -> None:
        self.expired = True
