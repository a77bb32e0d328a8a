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
   moves the wait to a dedicated pool connection, in a task of the Locker: a
   fair queue in PostgreSQL, ``timeout`` covering the pool wait and then the
   lock wait (a scoped ``lock_timeout``). A wait that ends ambiguously
   (cancelled, or ``lock_timeout`` firing as the lock is granted) is resolved
   on the server: ``pg_locks`` for that backend, and the hold released. The
   lock then lives on that connection until released. An exclusive key
   released while local tasks wait for it is handed to the next one without
   a round trip, at most ``HANDOFF_LIMIT`` times in a row, then released to
   the server so that other sessions waiting there get their turn.
4. **Ownership.** Requests belong to the Locker, not to the calling task: a
   caller cancelled at any point withdraws its request, and whatever the
   server grants late is released by the Locker before the caller's
   cancellation propagates.
5. **Losing the holder.** When the holder connection dies (termination
   listener, or a heartbeat when it is silent) every handle on it is lost at
   once (``LockLost``, delivered into each block as one cancellation, see
   ``_cancel.py``); the Locker takes a new holder from the pool and keeps
   serving.
6. **Lifetime.** Like ``asyncpg.Pool``: usable after construction (it starts
   on first use) or with ``async with``; it owns its tasks (created on the
   loop, no task group or cancel scope spans the caller's ``async with``, so
   it may be entered in one task and closed in another); ``aclose()`` is
   idempotent, cancels and awaits them, and leaves no connection leased. The
   background task holds the Locker only weakly while idle, so a Locker
   dropped while open is collected: it warns (``ResourceWarning``) and the
   task gives its connection back.
7. **A full lock table** (SQLSTATE 53200) in a batch: the server is asked
   which of the batch's try-locks were granted before the table filled; those
   are granted, the rest fail with an error naming
   ``max_locks_per_transaction``, and the holder keeps serving.

Where each part lives: the bookkeeping (entries, local queues, hand-overs,
abandonment, timers) is ``_locker_state.LockerState``, which does no I/O;
the handles are in ``_locker_handle.py``, the holder connection's statements
in ``_locker_batch.py``, the contended waits in ``_locker_dedicated.py``.
This module drives them: the holder connection, its batches and failures,
and the Locker's lifetime.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any

import anyio
import asyncpg

from . import _sql
from ._advisory import SideEffect
from ._asyncpg import pool_has_free as _pool_has_free
from ._concurrency import Cleanup, mark_retrieved
from ._db import (
    PoolFront,
    check_loop,
    heartbeat_interval,
    lock_table_full,
    raw_connection,
    terminate,
)
from ._errors import UsageError
from ._keys import AdvisoryKey, Key
from ._locker_batch import held_on, release_on, send_batch
from ._locker_dedicated import wait_dedicated
from ._locker_handle import LockerAdvisory, LockerLock
from ._locker_state import Entry as _Entry
from ._locker_state import EntryState, LockerState, closed_error
from ._locker_state import Request as _Request
from ._protect import granted as protect_granted
from ._server import check_pooled
from ._timeouts import Timeout
from ._validate import describe

__all__ = ["Locker", "LockerAdvisory", "LockerLock"]

logger = logging.getLogger("aiopglock")


class _Holder:
    """One holder connection (a new one after each loss)."""

    __slots__ = ("alive", "conn", "listener", "pid", "raw")

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.raw = raw_connection(conn)
        self.pid: int = conn.get_server_pid()
        self.alive = True
        self.listener: Callable[[Any], None] | None = None


class _Shared:
    """What the Locker and its background task share. The task refers to the
    Locker only weakly while it waits, and to this strongly: when the Locker
    is dropped open, the task still finds the holder connection to give back."""

    __slots__ = ("dropped", "holder", "pool", "timed_out", "wake")

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.holder: _Holder | None = None
        self.wake = asyncio.Event()
        self.timed_out = False
        # Set by Locker.__del__: the task stops even if something (a recorded
        # warning, a debugger) brings the Locker back to life afterwards.
        self.dropped = False

    def holder_ready(self) -> bool:
        holder = self.holder
        return holder is not None and holder.alive


async def _serve(ref: weakref.ReferenceType[Locker], shared: _Shared) -> None:
    """The Locker's background task: sends the batches, keeps a holder
    connection. It ends when the Locker closes (``aclose()`` lets a batch on
    the way finish) or is garbage-collected; either way its holder connection
    goes back to the pool, whose reset releases every lock on it."""
    beat_due = False
    try:
        while True:
            locker = ref()
            if locker is None or locker._closed or shared.dropped:
                return
            holder = shared.holder
            if holder is not None and not holder.alive:
                await locker._retire(holder)
            elif holder is None:
                if locker._state.locks or locker._want_holder:
                    await locker._connect()
                else:
                    shared.wake.clear()
                    del locker  # a Locker dropped here wakes us at once
                    await _idle_wait(shared, None)
            elif locker._state.locks or locker._state.unlocks:
                beat_due = False
                await locker._batch(holder)
            elif beat_due:
                beat_due = False
                await locker._heartbeat(holder)
            else:
                # Idle: a heartbeat every half interval while locks are held
                # on the holder (a silent death is noticed within one).
                # (The heartbeat itself looks whether locks are held on it.)
                interval = heartbeat_interval() / 2 if locker._entries else None
                shared.wake.clear()
                del locker  # a Locker dropped here wakes us at once
                beat_due = await _idle_wait(shared, interval)
    finally:
        locker = ref()
        with anyio.CancelScope(shield=True):
            if locker is not None:
                await locker._shutdown()
            else:
                await _give_back_holder(shared)


async def _idle_wait(shared: _Shared, interval: float | None) -> bool:
    """Wait to be woken (the caller cleared the event before it let go of
    the Locker); True when ``interval`` passed without a wake-up. A plain
    timer rather than a cancel scope: this runs twice per lock cycle."""
    wake = shared.wake
    if interval is None:
        await wake.wait()
        return False
    shared.timed_out = False
    timer = asyncio.get_running_loop().call_later(interval, _time_out, shared)
    try:
        await wake.wait()
    finally:
        timer.cancel()
    return shared.timed_out


def _time_out(shared: _Shared) -> None:
    shared.timed_out = True
    shared.wake.set()


async def _give_back_holder(shared: _Shared) -> None:
    holder, shared.holder = shared.holder, None
    if holder is None:
        return
    if holder.listener is not None:
        holder.raw.remove_termination_listener(holder.listener)
        holder.listener = None
    with Cleanup() as cleanup:
        await cleanup.give_back(shared.pool, holder.conn, discard=not holder.alive)


def _on_holder_closed(ref: weakref.ReferenceType[Locker], holder: _Holder) -> Callable[[Any], None]:
    """A termination listener that keeps the Locker collectable."""

    def listener(_conn: Any) -> None:
        locker = ref()
        if locker is not None:
            locker._holder_died(holder, "its connection was closed")
        else:
            holder.alive = False

    return listener


class Locker(PoolFront):
    """Many advisory locks on few connections.

    Long-lived, like the pool it wraps: use it as ``async with
    aiopglock.Locker(pool) as locker:``, or create it once, use it (it starts
    on first use) and ``await locker.aclose()`` at shutdown. It may be
    entered in one task and closed in another (a pytest-asyncio fixture, an
    ``AsyncExitStack`` on an application object): it owns its background
    tasks, and ``aclose()`` (idempotent) cancels and awaits them and gives
    every connection back. A Locker dropped while open warns
    (``ResourceWarning``). After closing, using it is a :class:`UsageError`.

    It takes one *holder* connection from ``pool`` while open.
    :meth:`advisory` takes the same arguments as :func:`aiopglock.advisory`
    (without ``db``); uncontended locks are try-locked on the holder
    connection, concurrent requests and releases batched into one round trip;
    a contended wait moves to a dedicated connection of the pool and queues
    fairly in PostgreSQL (``timeout`` covers the wait for that connection
    too); exclusion between tasks of this process is kept in process. A
    Locker is accepted as ``db=`` wherever a pool is.

    The trade-off: the holder connection holds every uncontended lock, so
    losing it (or terminating its backend) loses all of them at once: every
    handle gets :class:`aiopglock.LockLost`, and the Locker reconnects.

    Example::

        async with aiopglock.Locker(pool) as locker:
            async with locker.advisory("invoice:42", timeout=5) as lock:
                if lock:
                    ...

        locker = aiopglock.Locker(pool)      # or: no async with at all
        async with locker.advisory("invoice:42") as lock:
            ...
        await locker.aclose()
    """

    __slots__ = (
        "__weakref__",
        "_closing",
        "_entered",
        "_in_batch",
        "_loop",
        "_pool",
        "_ready",
        "_serve_task",
        "_shared",
        "_state",
        "_task_holds",
        "_waits",
        "_want_holder",
    )

    def __init__(self, pool: asyncpg.Pool[Any]) -> None:
        if not isinstance(pool, asyncpg.Pool):
            raise TypeError(f"pool: expected an asyncpg Pool, got {describe(pool)}")
        self._pool = pool
        # Every key's bookkeeping; this class is the I/O around it.
        self._state = LockerState()
        self._task_holds: dict[asyncio.Task[Any], dict[AdvisoryKey, LockerLock]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shared: _Shared | None = None
        self._serve_task: asyncio.Task[None] | None = None
        # The tasks of contended waits (and holds) on dedicated connections.
        self._waits: set[asyncio.Task[None]] = set()
        self._closing: asyncio.Future[None] | None = None
        self._entered = False
        self._want_holder = False
        # The outcome of the last attempt to take a holder connection.
        self._ready: asyncio.Future[None] | None = None
        self._in_batch = False

    @property
    def pool(self) -> asyncpg.Pool[Any]:
        """The pool this Locker takes its connections from."""
        return self._pool

    @property
    def _closed(self) -> bool:
        return self._state.closed

    @property
    def _entries(self) -> dict[AdvisoryKey, _Entry]:
        return self._state.entries

    @property
    def _holder(self) -> _Holder | None:
        return self._shared.holder if self._shared is not None else None

    def __repr__(self) -> str:
        if self._closed:
            state = "closed"
        elif self._serve_task is None:
            state = "not started"
        else:
            state = "open"
        entries = list(getattr(self, "_entries", {}).values())
        held = sum(1 for e in entries if e.state is EntryState.HELD)
        waiting_ = sum(len(e.waiters) for e in entries)
        holder = self._holder
        pid = f" holder pid={holder.pid}" if holder is not None and holder.alive else ""
        return f"<aiopglock.Locker {state} [held: {held} keys, queued: {waiting_}]{pid}>"

    def __del__(self) -> None:
        # Cheap and without I/O: warn, and wake the background task, which
        # finds the Locker gone and gives its connection back to the pool.
        if getattr(self, "_serve_task", None) is None or getattr(self, "_closed", True):
            return
        loop = self._loop
        if self._shared is not None:
            self._shared.dropped = True
        if self._shared is not None and loop is not None and not loop.is_closed():
            wake = self._shared.wake
            if loop is _running_loop():
                wake.set()
            else:
                loop.call_soon_threadsafe(wake.set)
        warnings.warn(
            f"unclosed {self!r}: close it with `await locker.aclose()` or use "
            "`async with aiopglock.Locker(pool)`",
            ResourceWarning,
            stacklevel=2,
        )

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
        same validation and meaning. ``xact=True`` takes the lock as
        ``aiopglock.advisory(key, db=locker.pool, xact=True)`` does: in a
        transaction aiopglock opens on a connection of the pool, with the
        block inside it (the handle's ``.connection``).

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
    ) -> Any:
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

    def _open(self) -> None:
        """Start the background task (on first use, or on entry)."""
        check_loop(self._pool)  # another loop's pool: refused, nothing touched
        loop = asyncio.get_running_loop()
        self._loop = loop
        shared = self._shared = _Shared(self._pool)
        # Closures over the shared part only: the Locker stays collectable.
        self._state.attach(loop, wake=shared.wake.set, holder_ready=shared.holder_ready)
        self._ready = loop.create_future()
        self._serve_task = loop.create_task(_serve(weakref.ref(self), shared))

    async def __aenter__(self) -> Locker:
        """Start (if not started by an earlier use) and take the holder
        connection; a failure to take it is raised here, and the Locker is closed."""
        if self._closed:
            raise self._closed_error()
        if self._entered:
            raise UsageError("a Locker can be entered only once")
        self._entered = True
        if self._serve_task is None:
            self._open()
        assert self._shared is not None and self._loop is not None
        if self._holder is None:
            if self._ready is None or self._ready.done():
                self._ready = self._loop.create_future()
            ready = self._ready
            self._want_holder = True
            self._shared.wake.set()
            try:
                await asyncio.shield(ready)
            except BaseException:
                await self.aclose()
                raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the Locker: every lock still held through it is lost (its
        handle raises :class:`aiopglock.LockLost`), waits are withdrawn, the
        background tasks are cancelled and awaited, and every connection goes
        back to the pool. Idempotent; safe to call from several tasks at once
        (each returns once the Locker is closed).

        Example::

            locker = aiopglock.Locker(pool)
            try:
                ...
            finally:
                await locker.aclose()
        """
        if self._loop is not None and self._loop is not asyncio.get_running_loop():
            self._state.closed = True
            if self._loop.is_closed():
                return  # its tasks ended with that loop, its connections with its pool
            raise UsageError(
                "this Locker runs on another event loop: close it in that loop "
                "(asyncio.run_coroutine_threadsafe(locker.aclose(), loop))"
            )
        if self._closing is None:
            self._state.closed = True
            loop = asyncio.get_running_loop()
            self._closing = loop.create_future()
            self._closing.add_done_callback(mark_retrieved)
            tasks = list(self._waits)
            serve = self._serve_task
            if serve is not None:
                tasks.append(serve)
                assert self._shared is not None
                self._shared.wake.set()
                if not self._in_batch:
                    # Waiting for a wake-up or a connection: nothing to finish.
                    serve.cancel()
            for task in self._waits:
                task.cancel()
            closing = self._closing
            if tasks:
                gathered = asyncio.gather(*tasks, return_exceptions=True)
                gathered.add_done_callback(lambda _: closing.set_result(None))
            else:
                closing.set_result(None)
        with Cleanup() as cleanup:
            await cleanup.wait(self._closing)

    def _closed_error(self) -> UsageError:
        return closed_error()

    # -- requests (in the caller's task; the bookkeeping is LockerState's) ----

    def _request(self, handle: LockerLock) -> bool | _Request:
        """Grant at once (True), refuse at once (False), or a request to await."""
        if self._closed:
            raise self._closed_error()
        if self._serve_task is None:
            self._open()
        if (
            handle._timeout == 0
            and handle.key not in self._state.entries
            and not self._holder_ready()
            and not _pool_has_free(self._pool)
        ):
            # No holder connection, and none free to take: never wait for one.
            return False
        return self._state.request(handle)

    def _abandon(self, req: _Request) -> asyncio.Future[Any] | None:
        return self._state.abandon(req)

    def _release(self, handle: LockerLock) -> asyncio.Future[bool] | None:
        return self._state.release(handle)

    async def _finish_release(self, entry: _Entry | None, wait: asyncio.Future[bool]) -> bool:
        """After the caller's wait for its unlock was interrupted: wait again,
        shielded, on a future of its own."""
        again = self._state.rewait(entry, wait)
        if isinstance(again, bool):
            return again
        with Cleanup() as cleanup:
            released = await cleanup.wait(again)
        return released

    def _holder_ready(self) -> bool:
        holder = self._holder
        return holder is not None and holder.alive

    # -- the holder connection (in the background task) ------------------------

    async def _connect(self) -> None:
        """Take a holder connection for the requests waiting for one. On
        failure, fail them; the next request tries again."""
        shared = self._shared
        assert shared is not None
        self._want_holder = False
        state = self._state
        for entry in state.locks:
            if entry.req is not None:
                state.arm_unsent(entry, entry.req)
        try:
            conn = await self._pool.acquire()
            # A pooler or a hot standby is refused before anything is held.
            await check_pooled(self._pool, conn)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.warning("aiopglock.Locker: cannot take a holder connection: %r", exc)
            state.fail_locks(exc)
            ready = self._ready
            if ready is not None and not ready.done():
                ready.add_done_callback(mark_retrieved)
                ready.set_exception(exc)
            return
        holder = _Holder(conn)
        holder.listener = _on_holder_closed(weakref.ref(self), holder)
        holder.raw.add_termination_listener(holder.listener)
        shared.holder = holder
        if holder.raw.is_closed():
            self._holder_died(holder, "its connection was closed")
        ready = self._ready
        if ready is not None and not ready.done():
            ready.set_result(None)

    def _holder_died(self, holder: _Holder, reason: str) -> None:
        if not holder.alive:
            return
        holder.alive = False
        self._state.lose_on(holder, reason)
        if self._shared is not None:
            self._shared.wake.set()

    async def _retire(self, holder: _Holder) -> None:
        """The holder connection died: its locks went with it; give it back."""
        self._state.retire(holder)
        assert self._shared is not None
        await _give_back_holder(self._shared)

    async def _heartbeat(self, holder: _Holder) -> None:
        if not self._state.holds_on(holder):
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
        state = self._state
        locks, unlocks = state.take_batch()
        self._in_batch = True
        try:
            unlocked, locked = await send_batch(holder.conn, locks, unlocks)
        except asyncio.TimeoutError:
            # No answer within a cleanup statement's time: the connection is
            # discarded, with its locks.
            self._in_batch = False
            logger.warning("aiopglock.Locker: the holder connection stopped answering")
            self._discard_holder(holder, locks, unlocks, "its connection stopped answering")
            return
        except Exception as exc:
            self._in_batch = False
            await self._batch_failed(holder, locks, unlocks, exc)
            return
        except BaseException:
            # Interrupted (the Locker's task cancelled from outside): what the
            # statement did is unknown, so the connection goes, with its locks.
            self._in_batch = False
            self._discard_holder(holder, locks, unlocks, "its connection was discarded")
            raise
        self._in_batch = False
        for entry, ok in unlocked:
            state.released(entry, ok)
        for entry, ok in locked:
            self._locked(entry, holder, ok)

    def _discard_holder(
        self, holder: _Holder, locks: list[_Entry], unlocks: list[_Entry], reason: str
    ) -> None:
        terminate(holder.conn)
        self._holder_died(holder, reason)
        self._state.batch_undone(locks, unlocks)

    def _locked(self, entry: _Entry, holder: _Holder, granted: bool) -> None:
        req = entry.req
        if granted and req is not None:
            # A prioritize() block of the caller never signals the holder.
            req.context.run(protect_granted, holder.conn)
        contended = self._state.locked(entry, holder, holder.pid, granted)
        if contended is None:
            return
        # Contended: wait in PostgreSQL's queue on a connection of its own, in
        # a task of the Locker that runs in the caller's context.
        assert self._loop is not None
        task = contended.context.run(self._loop.create_task, self._wait_dedicated(entry, contended))
        contended.task = task
        self._waits.add(task)
        task.add_done_callback(self._waits.discard)

    async def _batch_failed(
        self, holder: _Holder, locks: list[_Entry], unlocks: list[_Entry], exc: Exception
    ) -> None:
        if not holder.alive or holder.raw.is_closed():
            # The connection died: what it held is gone; ask again on the next one.
            self._holder_died(holder, "its connection was closed")
            self._state.batch_undone(locks, unlocks)
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
            self._holder_died(holder, f"its connection was discarded after {exc!r}")
        state = self._state
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
        self, holder: _Holder, locks: list[_Entry], unlocks: list[_Entry], exc: Exception
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
        state = self._state
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

    # -- contended waits, on dedicated connections (tasks of the Locker) --------

    async def _wait_dedicated(self, entry: _Entry, req: _Request) -> None:
        # A method, so that the task keeps the Locker alive while it runs.
        await wait_dedicated(self._pool, self._state, entry, req)

    async def _shutdown(self) -> None:
        """The Locker closes: every lock it held goes with its connections."""
        unlocks = self._state.close()
        ready = self._ready
        if ready is not None and not ready.done():
            ready.add_done_callback(mark_retrieved)
            ready.set_exception(self._closed_error())
        assert self._shared is not None
        # The pool's reset (pg_advisory_unlock_all) releases everything.
        await _give_back_holder(self._shared)
        self._state.closed_down(unlocks)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
