"""Counting semaphores across processes: ``aiopglock.semaphore`` and its handle.

A semaphore ``name`` of ``limit`` has ``limit`` slots; each slot is a session
advisory lock, and a holder holds exactly one slot on one connection.

Keys. Slot ``i`` of ``name`` is the two-int4 key made of the first 8 bytes of
``sha256(b"aiopglock.semaphore\\0" + name + b"\\0" + str(i))`` (two
little-endian signed 32-bit halves). ``pg_locks`` shows two-int4 keys with
``objsubid = 2`` and int8 keys with ``objsubid = 1``: PostgreSQL keeps the two
forms apart, so a slot never conflicts with ``advisory(name)`` (a text key is
always an int8), and two semaphores share a slot only if 64 bits of SHA-256
collide.

Acquiring, on one connection (leased from the pool for the slot's lifetime,
or the caller's): each slot is tried with ``AdvisoryLock`` at ``timeout=0``
(so cancellation safety, the resolution of an interrupted try-lock and
``LockLost`` are advisory's own). An attempt try-locks one slot chosen at
random (one round trip when the semaphore is not full); if that one is
taken, one read of ``pg_locks`` lists the free slots, and those are tried in
turn (usually the first succeeds). A full semaphore costs two round trips
per attempt, whatever its ``limit``.

Waking. A waiter LISTENs on the semaphore's channel (named after a hash of
``name``) before it tries again, so no release between its try and its wait is
missed. A holder's release unlocks the slot, then sends ``pg_notify`` on the
channel: the notification is sent after the unlock has completed, and every
waiter re-tries at once. A holder whose backend dies (or whose connection is
cut) sends nothing: waiters re-try every :data:`BACKSTOP_INTERVAL` seconds
as well, so a slot freed that way is taken within that interval.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import random
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar, cast

import anyio
import asyncpg
from asyncpg.pool import PoolConnectionProxy

from . import _otel, _sql
from ._advisory import AdvisoryLock, Raise, Return, SideEffect, Skip
from ._asyncpg import listening
from ._concurrency import Cleanup, mark_retrieved, run_through
from ._conntypes import Conn, Pool
from ._db import DB, Deadline, check_db, lease, raw_connection, resolve_db
from ._decorate import target
from ._errors import LockNotAcquired, UsageError
from ._handle import _check_side_effect
from ._handles import Entered
from ._keys import SEMAPHORE_PREFIX, slot_key
from ._server import check_lock_target
from ._timeouts import Timeout
from ._validate import check_bool, describe, is_int, parse_timeout

__all__ = ["BACKSTOP_INTERVAL", "Semaphore", "SemaphoreSlot", "semaphore"]

logger = logging.getLogger("aiopglock")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

#: Seconds between a waiter's re-tries when no release is announced: the
#: longest a slot freed by a dead holder (which sends no notification) stays free.
BACKSTOP_INTERVAL = 1.0

#: The largest ``limit``: every slot is a lock in PostgreSQL's shared lock
#: table (about 64 per connection by default), and a waiter's scan lists them all.
MAX_LIMIT = 10_000


# The slots each task holds, per semaphore name: a task entering the same
# semaphore again takes another slot, never its own one a second time (which
# advisory re-entry would grant without the server).
_own: dict[asyncio.Task[Any], dict[str, set[int]]] = {}


@functools.lru_cache(maxsize=64)
def _slot_arrays(name: str, limit: int) -> tuple[list[int], list[int]]:
    """The two int4 arrays of every slot's key, in slot order (for the scan)."""
    keys = [slot_key(name, slot) for slot in range(limit)]
    return [k[0] for k in keys], [k[1] for k in keys]


def channel(name: str) -> str:
    """The LISTEN/NOTIFY channel of semaphore ``name`` (38 characters).

    Example::

        >>> channel("reports").startswith("aiopglock_sem_")
        True
    """
    return "aiopglock_sem_" + hashlib.sha256(SEMAPHORE_PREFIX + name.encode()).hexdigest()[:24]


def _semaphore_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"name: expected a non-empty str, got {describe(name)}")
    if not name:
        raise ValueError("name: an empty string is not a semaphore name")
    try:
        name.encode()
    except UnicodeEncodeError as exc:
        raise ValueError(f"name: {name!r} cannot be encoded as UTF-8 ({exc.reason})") from None
    return name


def _check_limit(limit: object) -> int:
    if not is_int(limit):
        raise TypeError(f"limit: expected an int, got {describe(limit)}")
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit: expected 1 to {MAX_LIMIT}, got {limit}")
    return limit


class _Listening:
    """The waiter's LISTEN on its connection, undone whatever happens."""

    __slots__ = ("_added", "_channel", "_conn", "_on", "woken")

    def __init__(self, conn: Conn, name: str) -> None:
        self._conn = conn
        self._channel = channel(name)
        self.woken = asyncio.Event()
        # A fresh callable per waiter: asyncpg removes callbacks by equality.
        self._on = lambda *_: self.woken.set()
        self._added = False

    async def start(self) -> None:
        try:
            await self._conn.add_listener(self._channel, self._on)
        except BaseException:
            # LISTEN may have run on the server before the interruption,
            # though asyncpg never registered the callback.
            await self.stop()
            raise
        self._added = True

    async def stop(self) -> None:
        """Remove the callback and, when it was the channel's last one on
        this connection, UNLISTEN; a late CancelRequest or a raw cancellation
        retries, and a cancellation is re-raised after."""
        conn, chan, on = self._conn, self._channel, self._on

        async def step(attempt: int) -> None:
            # Each try runs to its end (a raw cancellation meanwhile is
            # remembered, not obeyed), so a storm of them cannot use up the tries.
            if attempt == 0 and self._added:
                fut = asyncio.ensure_future(conn.remove_listener(chan, on))
                fut.add_done_callback(mark_retrieved)
                await cleanup.wait(fut)
                return
            # An interrupted add_listener() or remove_listener(): asyncpg
            # registers a channel after LISTEN and forgets it before UNLISTEN.
            raw = raw_connection(conn)
            if raw is not None and not listening(raw, chan):
                await run_through(conn, _sql.SEMAPHORE_UNLISTEN.format(chan), cleanup)

        with Cleanup() as cleanup:
            ok, _ = await cleanup.run(step)
            if not ok:
                logger.warning(
                    "aiopglock.semaphore: could not UNLISTEN %s on its connection",
                    chan,
                    extra=_otel.log_fields(kind="semaphore", outcome="listening"),
                )
            self._added = False  # a cancellation met meanwhile is re-raised after


class _SlotLock(AdvisoryLock):
    """A slot's advisory lock: counted and logged as a semaphore's."""

    __slots__ = ()
    _kind = "semaphore"


class SemaphoreSlot:
    """The handle of one semaphore entry (what ``async with`` yields).

    ``bool(slot)`` is True iff a slot is held. Attributes: ``name``,
    ``limit``, ``slot`` (``0 <= slot < limit``, or None), ``key`` (the slot's
    advisory key), ``pid`` (the server process holding it), ``lost`` (the
    holding connection died while held).

    Example::

        async with aiopglock.semaphore("exports", 3, db=pool, timeout=10) as slot:
            if slot:
                print("running in slot", slot.slot, "of", slot.limit)
    """

    __slots__ = (
        "_cancel_on_lost",
        "_conn",
        "_fence",
        "_lock",
        "_pool",
        "_task",
        "_timeout",
        "limit",
        "name",
        "slot",
    )

    def __init__(
        self,
        name: str,
        limit: int,
        timeout: float | None,
        cancel_on_lost: bool,
        fence: bool = False,
    ) -> None:
        self.name = name
        self._fence = fence
        self.limit = limit
        self.slot: int | None = None
        self._timeout = timeout
        self._cancel_on_lost = cancel_on_lost
        self._lock: AdvisoryLock | None = None
        self._conn: Conn | None = None
        self._pool: Pool | None = None
        self._task: asyncio.Task[Any] | None = None

    def __bool__(self) -> bool:
        return self._lock is not None and self._lock.acquired

    @property
    def acquired(self) -> bool:
        return bool(self)

    @property
    def key(self) -> tuple[int, int] | None:
        return None if self.slot is None else slot_key(self.name, self.slot)

    @property
    def pid(self) -> int | None:
        return None if self._lock is None else self._lock.pid

    @property
    def fence(self) -> int | None:
        """The slot's fencing token with ``fence=True`` (see
        :func:`aiopglock.advisory`), else None."""
        lock = self._lock
        return lock.fence if lock is not None and lock.acquired else None

    @property
    def lost(self) -> bool:
        """True once the connection holding the slot has died."""
        return self._lock is not None and self._lock.lost

    def __repr__(self) -> str:
        if self.lost:
            state = "lost"
        elif self:
            state = f"slot={self.slot} pid={self.pid}"
        else:
            state = "not acquired"
        return f"<SemaphoreSlot name={self.name!r} limit={self.limit} {state}>"

    # -- acquiring ---------------------------------------------------------

    def _own_slots(self) -> set[int]:
        assert self._task is not None
        return _own.get(self._task, {}).get(self.name, set())

    async def _try(self, conn: Conn, slot: int) -> bool:
        lock = _SlotLock(
            slot_key(self.name, slot),
            shared=False,
            xact=False,
            timeout=0,
            cancel_on_lost=self._cancel_on_lost,
            fence=self._fence,
            name=self.name,
            slot=slot,
        )
        assert self._task is not None
        await lock._enter(conn, self._task)
        if not lock.acquired:
            return False
        self._lock = lock
        self.slot = slot
        return True

    async def _attempt(self, conn: Conn) -> bool:
        """One attempt: a random slot, then the free ones ``pg_locks`` lists."""
        own = self._own_slots()
        first = random.randrange(self.limit)
        while first in own:  # fewer than limit: _enter refused a task holding all
            first = random.randrange(self.limit)
        if await self._try(conn, first):
            return True
        if self.limit - len(own) == 1:
            return False
        free = await conn.fetch(_sql.SEMAPHORE_FREE_SLOTS, *_slot_arrays(self.name, self.limit))
        for row in free:
            slot = row[0]
            if slot != first and slot not in own and await self._try(conn, slot):
                return True
        return False

    async def _wait(self, conn: Conn, deadline: Deadline) -> bool:
        """Attempt on every release announced (and every backstop interval)
        until a slot is held or ``deadline`` passes."""
        listening = _Listening(conn, self.name)
        await listening.start()
        try:
            while True:
                listening.woken.clear()
                # Listening before this attempt: a release after it is announced.
                if await self._attempt(conn):
                    return True
                remaining = deadline.remaining()
                if deadline.expired():
                    return False
                wait = BACKSTOP_INTERVAL if remaining is None else min(BACKSTOP_INTERVAL, remaining)
                with anyio.move_on_after(wait):
                    await listening.woken.wait()
                if deadline.expired() and not listening.woken.is_set():
                    return False
        finally:
            await listening.stop()

    async def _enter(self, db: Any, task: asyncio.Task[Any]) -> None:
        self._task = task
        if len(self._own_slots()) >= self.limit:
            if self._timeout == 0:
                return  # no slot left for this task: not acquired
            raise UsageError(
                f"this task holds all {self.limit} slots of semaphore {self.name!r}: "
                "waiting for another would wait for itself"
            )
        deadline = Deadline(self._timeout)
        if isinstance(db, asyncpg.Pool):
            conn = await lease(db, self._timeout)
            if conn is None:
                return  # every connection stayed in use: not acquired
            self._pool = db
        else:
            conn = db
        try:
            await check_lock_target(conn, session=True)
            held = await self._attempt(conn)
            if not held and self._timeout != 0:
                held = await self._wait(conn, deadline)
        except BaseException:
            # A slot taken before the interruption is released first.
            await self._give_back(conn, None, held=self._lock is not None)
            raise
        if not held:
            await self._give_back(conn, None, held=False)
            return
        self._conn = conn
        _own.setdefault(task, {}).setdefault(self.name, set()).add(cast(int, self.slot))

    # -- releasing ---------------------------------------------------------

    async def _give_back(self, conn: Conn, exc: BaseException | None, *, held: bool) -> None:
        """Release the slot (if ``held``), announce it, return a pool's
        connection. Raises what the slot's release raises (``LockLost``)."""
        lock = self._lock
        try:
            if held and lock is not None:
                await lock._exit(exc)
        finally:
            with Cleanup() as cleanup:
                if held and lock is not None and not lock.lost:

                    async def notify(_attempt: int) -> None:
                        await conn.execute(_sql.SEMAPHORE_NOTIFY, channel(self.name))

                    await cleanup.run(notify)
                if self._pool is not None:
                    assert isinstance(conn, PoolConnectionProxy)  # leased from the pool
                    lost = lock is not None and lock.lost
                    await cleanup.give_back(self._pool, conn, discard=lost)
            # Leaving the Cleanup re-raises a cancellation met in it, which
            # outranks what the slot's release raised.

    async def _exit(self, exc: BaseException | None) -> None:
        if self._lock is None or self._conn is None:
            return
        try:
            await self._exit_slot(exc)
        finally:
            _otel.released(self)

    async def _exit_slot(self, exc: BaseException | None) -> None:
        task = self._task
        owned = _own.get(task) if task is not None else None
        if owned is not None and self.slot is not None:
            slots = owned.get(self.name)
            if slots is not None:
                slots.discard(self.slot)
                if not slots:
                    del owned[self.name]
            if not owned:
                _own.pop(cast(asyncio.Task[Any], task), None)
        conn, self._conn = self._conn, None
        assert conn is not None  # _exit checked, no await since
        await self._give_back(conn, exc, held=True)


class Semaphore:
    """A semaphore request: an async context manager and a decorator.

    Built by :func:`aiopglock.semaphore`; holds only configuration, so one
    instance can be entered by many tasks at once, each entry taking its own
    slot (:class:`SemaphoreSlot`).

    Example::

        exports = aiopglock.semaphore("exports", 3, db=pool)

        async def export() -> None:
            async with exports as slot:  # at most 3 at once, database-wide
                ...
    """

    __slots__ = (
        "_active",
        "_cancel_on_lost",
        "_db",
        "_fence",
        "_limit",
        "_name",
        "_side_effect",
        "_timeout",
    )

    def __init__(
        self,
        name: str,
        limit: int,
        *,
        db: DB | None = None,
        timeout: Timeout = None,
        side_effect: SideEffect | None = None,
        cancel_on_lost: bool = True,
        fence: bool = False,
    ) -> None:
        self._name = _semaphore_name(name)
        self._limit = _check_limit(limit)
        check_db(db)
        self._db = db
        self._timeout = parse_timeout(timeout)
        self._side_effect = _check_side_effect(side_effect)
        self._cancel_on_lost = check_bool(cancel_on_lost, "cancel_on_lost")
        self._fence = check_bool(fence, "fence")
        self._active: Entered[SemaphoreSlot] = Entered()

    def __repr__(self) -> str:
        return (
            f"aiopglock.semaphore({self._name!r}, {self._limit}, timeout={self._timeout}, "
            f"side_effect={self._side_effect!r})"
        )

    async def _acquire(self, side_effect: SideEffect, task: asyncio.Task[Any]) -> SemaphoreSlot:
        db = resolve_db(self._db)
        handle = SemaphoreSlot(
            self._name, self._limit, self._timeout, self._cancel_on_lost, self._fence
        )
        wait = _otel.begin("semaphore", "exclusive", None, self._name)
        try:
            await handle._enter(db, task)
            if not handle and side_effect is Raise:
                raise LockNotAcquired(
                    f"no slot of semaphore {self._name!r} (limit {self._limit}) acquired "
                    f"(timeout={self._timeout})"
                )
        except BaseException as exc:
            _otel.failed(wait, exc)
            raise
        _otel.granted(wait, handle)
        return handle

    async def __aenter__(self) -> SemaphoreSlot:
        side_effect = self._side_effect or Return
        if side_effect is Skip:
            raise ValueError(
                "side_effect: aiopglock.Skip only applies to decorated functions; "
                "use aiopglock.Return or aiopglock.Raise with async with"
            )
        task = asyncio.current_task()
        assert task is not None
        handle = await self._acquire(side_effect, task)
        self._active.push(handle, task)
        return handle

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._active.pop()._exit(exc)

    def __call__(self, fn: F) -> F:
        decorated = target(fn, "aiopglock.semaphore")
        side_effect = self._side_effect or Raise
        if side_effect is Return:
            raise ValueError(
                "side_effect: aiopglock.Return does not apply to a decorated function "
                "(it cannot see the handle); use aiopglock.Raise or aiopglock.Skip"
            )
        spec = self
        call = decorated.fn

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            task = asyncio.current_task()
            assert task is not None
            handle = await spec._acquire(side_effect, task)
            if not handle:
                return None  # Skip
            try:
                result = await call(*args, **kwargs)
            except BaseException as exc:
                await handle._exit(exc)
                raise
            await handle._exit(None)
            return result

        return cast(F, decorated.finish(wrapper))


def semaphore(
    name: str,
    limit: int,
    *,
    db: DB | None = None,
    timeout: Timeout = None,
    side_effect: SideEffect | None = None,
    cancel_on_lost: bool = True,
    fence: bool = False,
) -> Semaphore:
    """At most ``limit`` holders of ``name`` at once, across every process and
    connection: an async context manager and a decorator.

    - ``name``: a non-empty ``str``; its slots' keys never equal
      ``advisory(name)``'s (see ``docs/semaphore.md``).
    - ``limit``: an ``int`` from 1 to 10,000 (not a ``bool``).
    - ``db``: Pool (a connection is leased for the slot's lifetime),
      Connection, zero-argument callable, or the configured default.
    - ``timeout``: ``None`` waits without a limit, ``0`` tries once and never
      waits for a pool connection either, ``> 0`` bounds the whole wait, pool
      connection included. A waiter wakes when a holder releases (LISTEN/NOTIFY),
      and re-tries every second in case a holder died without a word.
    - ``side_effect`` and ``cancel_on_lost``: as for :func:`aiopglock.advisory`;
      a lost slot raises :class:`aiopglock.LockLost`.
    - ``fence``: ``True`` gives the handle a fencing token (``slot.fence``),
      taken on the server after the slot's grant, as ``advisory(fence=True)`` does.

    Each entry takes its own slot, also when the same task enters again (like
    ``asyncio.Semaphore``); a task already holding every slot gets a
    ``UsageError`` instead of waiting for itself (with ``timeout=0``: not
    acquired).

    Example::

        async with aiopglock.semaphore("exports", 3, db=pool, timeout=0) as slot:
            if not slot:
                return "three exports already running"
            await export()

        @aiopglock.semaphore("thumbnails", 4, db=lambda: pool)
        async def thumbnail(image_id: int) -> None: ...
    """
    return Semaphore(
        name,
        limit,
        db=db,
        timeout=timeout,
        side_effect=side_effect,
        cancel_on_lost=cancel_on_lost,
        fence=fence,
    )
