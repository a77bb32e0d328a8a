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
the handles are in ``_locker_handle.py``; the holder connection, its
background task, batches and failures in ``_locker_holder.py`` (its
statements in ``_locker_batch.py``); the contended waits in
``_locker_dedicated.py``; start, entry, closing and dropping in
``_locker_life.py``. This module is the public face that ties them together.
"""

from __future__ import annotations

import asyncio
import warnings
from types import TracebackType
from typing import Any

import asyncpg

from ._advisory import SideEffect
from ._asyncpg import pool_has_free as _pool_has_free
from ._concurrency import Cleanup
from ._db import PoolFront
from ._errors import UsageError
from ._keys import AdvisoryKey, Key
from ._locker_dedicated import wait_dedicated
from ._locker_entry import Entry as _Entry
from ._locker_entry import EntryState, closed_error
from ._locker_entry import Request as _Request
from ._locker_handle import LockerAdvisory, LockerLock
from ._locker_holder import Holder
from ._locker_life import Lifetime
from ._locker_state import LockerState
from ._timeouts import Timeout
from ._validate import describe

__all__ = ["Locker", "LockerAdvisory", "LockerLock"]

#: Specs of plain arguments a Locker keeps validated (``Locker.advisory``).
SPEC_CACHE_SIZE = 512


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

    __slots__ = ("__weakref__", "_life", "_pool", "_specs", "_state")

    def __init__(self, pool: asyncpg.Pool[Any]) -> None:
        if not isinstance(pool, asyncpg.Pool):
            raise TypeError(f"pool: expected an asyncpg Pool, got {describe(pool)}")
        self._pool = pool
        # Every key's bookkeeping; the holder service is the I/O around it.
        self._state = LockerState()
        self._life = Lifetime(pool, self._state)
        # Validated specs of plain arguments, by those arguments (see advisory()).
        self._specs: dict[tuple[Any, ...], LockerAdvisory] = {}

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
    def _loop(self) -> asyncio.AbstractEventLoop | None:
        return self._life.loop

    @property
    def _serve_task(self) -> asyncio.Task[None] | None:
        return self._life.task

    @property
    def _waits(self) -> set[asyncio.Task[None]]:
        return self._life.waits

    @property
    def _holder(self) -> Holder | None:
        service = self._life.service
        return service.holder if service is not None else None

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
        life = getattr(self, "_life", None)
        if life is None or not life.dropped():
            return
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
        fence: bool = False,
    ) -> LockerAdvisory:
        """An advisory lock on this Locker, as an async context manager or a decorator.

        The arguments of :func:`aiopglock.advisory` (without ``db``), with the
        same validation and meaning. ``xact=True`` takes the lock as
        ``aiopglock.advisory(key, db=locker.pool, xact=True)`` does: in a
        transaction aiopglock opens on a connection of the pool, with the
        block inside it (the handle's ``.connection``). ``fence=True`` takes
        the lock the same way as ``aiopglock.advisory(key, db=locker.pool,
        fence=True)`` does, on a connection of the pool (not the shared holder
        connection: the token is the xid of the lock statement's own
        transaction), and the handle's ``.fence`` is its token.

        Example::

            async with locker.advisory("invoice:42", timeout=5) as lock:
                if lock:
                    ...

            @locker.advisory(timeout=0, side_effect=aiopglock.Skip)
            async def nightly() -> None: ...
        """
        plain = (
            (type(key) is int or type(key) is str)
            and side_effect is None
            and xact is False
            and fence is False
            and (shared is False or shared is True)
            and (cancel_on_lost is True or cancel_on_lost is False)
            and (timeout is None or type(timeout) is float or type(timeout) is int)
        )
        # A spec holds only configuration (and, per task, the handles entered
        # through it), so one serves every call with the same plain arguments:
        # validated once, not per lock. Exact types only, so that True never
        # finds the spec of 1.
        specs = self._specs
        cached = (key, shared, timeout, cancel_on_lost) if plain else None
        spec = specs.get(cached) if cached is not None else None
        if spec is None:
            spec = LockerAdvisory(
                self,
                key,
                shared=shared,
                xact=xact,
                timeout=timeout,
                side_effect=side_effect,
                cancel_on_lost=cancel_on_lost,
                fence=fence,
            )
            if cached is not None:
                if len(specs) >= SPEC_CACHE_SIZE:
                    specs.clear()
                specs[cached] = spec
        return spec

    async def enter_advisory(
        self,
        key: AdvisoryKey,
        *,
        shared: bool,
        xact: bool,
        timeout: float | None,
        side_effect: SideEffect,
        cancel_on_lost: bool,
        fence: bool = False,
        text: str | None = None,
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
            fence=fence,
        )
        return await spec._acquire(key, side_effect, None, text)

    # -- lifetime (``_locker_life.py``) ---------------------------------------

    async def __aenter__(self) -> Locker:
        """Start (if not started by an earlier use) and take the holder
        connection; a failure to take it is raised here, and the Locker is closed."""
        await self._life.enter(self)
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
        await self._life.close()

    def _closed_error(self) -> UsageError:
        return closed_error()

    # -- requests (in the caller's task; the bookkeeping is LockerState's) ----

    def _request(self, handle: LockerLock) -> bool | _Request:
        """Grant at once (True), refuse at once (False), or a request to await."""
        if self._closed:
            raise self._closed_error()
        life = self._life
        if life.task is None:
            life.start(self)
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

    async def _finish_release(
        self, entry: _Entry | None, wait: asyncio.Future[bool], cleanup: Cleanup
    ) -> bool:
        """After the caller's wait for its unlock was interrupted: wait again,
        shielded (a cancellation meanwhile is remembered in ``cleanup``), on a
        future of its own."""
        again = self._state.rewait(entry, wait)
        if isinstance(again, bool):
            return again
        cleanup.shield()
        return await cleanup.wait(again)

    def _holder_ready(self) -> bool:
        service = self._life.service
        return service is not None and service.holder_ready()

    async def _wait_dedicated(self, entry: _Entry, req: _Request) -> None:
        """A contended wait on a dedicated connection (``_locker_dedicated.py``).
        A method, so that its task keeps the Locker alive while it runs."""
        await wait_dedicated(self._pool, self._state, entry, req)
