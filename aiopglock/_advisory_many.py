"""``aiopglock.advisory_many``: several advisory keys, all or nothing.

The keys are validated, deduplicated and sorted (every int8 key first, by
value, then every ``(int, int)`` pair, by value), and always taken in that
order, so two callers with overlapping sets never deadlock: each waits only
for a key greater than every key it holds.

One round trip takes the set when none of it is contended: a statement tries
the keys in order and stops at the first busy one (a ``LIMIT 1`` over the
keys not granted, which ends the scan there), returning how many it took,
always a prefix of the list. Nothing
past the first busy key is ever taken, so nothing has to be given back but
the prefix. The first missing key is then waited for on the server (the
single-key :class:`~aiopglock._advisory_steps.LockSteps`, with
``lock_timeout`` = what is left of the deadline), and the try goes on from
the key after it.

Any outcome but the whole set (timeout, cancellation, an error) leaves none
held: in a transaction the savepoint taken first is rolled back (that ends
transaction-level grants), and session grants are resolved on the server:
every key of the set that ``pg_locks`` shows this backend holding is
unlocked, in one statement, whatever was or was not answered. A connection
whose state cannot be confirmed is terminated.

The handle keeps the driver (enter, exit, liveness, re-entry) and delegates:
the key set to ``_many_keys``, the statements (begin, take, undo, unlock,
end aiopglock's transaction) to ``_advisory_many_steps``.

Reused from the single-key core: ``Deadline``/``lease``, ``KeyClaim``
(exclusion between tasks sharing a Connection, taken per key in the same
sorted order), ``check_lock_target`` (standby, transaction-mode pooler),
``check_xact_left``, ``Liveness`` and ``BlockCanceller`` (``LockLost``),
``Cleanup``, the re-entry registry and the ``_AdvisorySpec`` plumbing
(``async with``, the decorator, ``side_effect``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

import asyncpg

from . import _otel
from ._advisory_many_steps import ManySteps, not_held, release_set
from ._claims import KeyClaim
from ._concurrency import BlockCanceller, Cleanup, deliver_lost
from ._db import (
    DB,
    Deadline,
    PoolFront,
    check_db,
    lease,
    lock_table_full,
    raw_connection,
    resolve_db,
)
from ._errors import LockLost, LockNotAcquired, UsageError
from ._handle import SideEffect, _AdvisorySpec
from ._keys import AdvisoryKey, Key
from ._liveness import Liveness
from ._many_keys import keys_text, sorted_keys
from ._reentry import advisory_holds as holds
from ._reentry import check_xact_left
from ._server import check_lock_target
from ._timeouts import Timeout

__all__ = ["AdvisoryMany", "AdvisoryManyLock", "advisory_many"]

logger = logging.getLogger("aiopglock")


class AdvisoryManyLock:
    """The handle of one ``advisory_many`` acquisition.

    ``bool(lock)`` is True iff every key is held (when False, none is).
    Attributes: ``keys`` (as :func:`aiopglock.advisory_key` returns them, in
    the order taken), ``shared``, ``xact``, ``acquired``, ``lost``, ``pid``,
    ``connection`` (as for :class:`aiopglock.AdvisoryLock`) and ``fence``
    (with ``fence=True``: one token for the whole set, else None).

    Example::

        async with aiopglock.advisory_many(["a", "b"], db=pool, timeout=5) as lock:
            if lock:
                print(lock.keys, lock.pid)
    """

    __slots__ = (
        "_cancel_on_lost",
        "_canceller",
        "_claims",
        "_conn",
        "_liveness",
        "_lost",
        "_lost_reason",
        "_owned",
        "_pool",
        "_raw",
        "_registered",
        "_steps",
        "_task",
        "_timeout",
        "acquired",
        "fence",
        "keys",
        "pid",
        "shared",
        "xact",
    )

    def __init__(
        self,
        keys: tuple[AdvisoryKey, ...],
        *,
        shared: bool,
        xact: bool,
        timeout: float | None,
        cancel_on_lost: bool,
        fence: bool,
    ) -> None:
        self.keys = keys
        self.shared = shared
        self.xact = xact
        self.acquired = False
        self.pid: int | None = None
        self.fence: int | None = None
        self._timeout = timeout
        self._cancel_on_lost = cancel_on_lost
        self._steps = ManySteps(keys, shared=shared, xact=xact, fence=fence)
        self._claims = [KeyClaim(key, shared) for key in keys]
        self._lost = False
        self._lost_reason = ""
        self._conn: Any = None
        self._raw: Any = None
        self._pool: Any = None
        self._owned = False
        self._registered: list[AdvisoryKey] = []
        self._task: asyncio.Task[Any] | None = None
        self._canceller: BlockCanceller | None = None
        self._liveness = Liveness(self._mark_lost)

    # -- what a nested advisory() of one of the keys reads (it joins this hold)

    _outer = None

    def __bool__(self) -> bool:
        return self.acquired

    @property
    def lost(self) -> bool:
        """True once the connection holding the keys has died."""
        return self._lost

    @property
    def connection(self) -> Any:
        """As :attr:`aiopglock.AdvisoryLock.connection`: the connection whose
        transaction holds the keys (``xact=True``), the caller's Connection
        (a session lock on one), None for a session lock on a Pool, before
        acquisition and after the block.

        Example::

            async with aiopglock.advisory_many(["a", "b"], db=pool, xact=True) as lock:
                await lock.connection.execute("UPDATE t SET n = n + 1")
        """
        if not self.acquired or (self._pool is not None and not self.xact):
            return None
        return self._conn

    def __repr__(self) -> str:
        mode = "shared" if self.shared else "exclusive"
        scope = "xact" if self.xact else "session"
        state = "lost" if self._lost else "acquired" if self.acquired else "not acquired"
        pid = f" pid={self.pid}" if self.pid is not None else ""
        return f"<AdvisoryManyLock keys={keys_text(self.keys)} {mode} {scope} {state}{pid}>"

    def _lost_error(self) -> LockLost:
        return LockLost(
            f"advisory keys {keys_text(self.keys)} were lost while held: {self._lost_reason}",
            key=self.keys,
            pid=self.pid,
        )

    def _mark_lost(self, reason: str) -> None:
        if self._lost or not self.acquired:
            return
        self._lost = True
        self._lost_reason = reason
        logger.warning(
            "advisory keys %s lost (pid %s): %s",
            keys_text(self.keys),
            self.pid,
            reason,
            extra=_otel.log_fields(
                key=list(self.keys) if len(self.keys) <= 8 else keys_text(self.keys),
                pid=self.pid,
                kind="advisory_many",
                outcome="lost",
            ),
        )
        _otel.lock_lost("advisory_many")
        if self._canceller is not None:
            self._canceller.fire(f"aiopglock: advisory keys {keys_text(self.keys)} lost: {reason}")

    # -- acquiring -----------------------------------------------------------

    def _check_reentry(self, task: asyncio.Task[Any]) -> None:
        for key in self.keys:
            if holds.held(task, key) is not None:
                raise UsageError(
                    f"advisory_many: this task already holds advisory key {key!r}; a set "
                    "may not contain a key its task holds (take the set first, and "
                    "nest advisory() for one of its keys inside it, or release the key)"
                )

    def _release_claims(self) -> None:
        for claim in self._claims:
            claim.release()

    async def _enter(self, target: Any, task: asyncio.Task[Any]) -> None:
        """Take every key on ``target`` (a Pool or a Connection) for ``task``.
        On return ``acquired`` tells; unless it is True nothing is held, no
        transaction of ours is open and no connection is leased."""
        self._task = task
        self._check_reentry(task)
        deadline = Deadline(self._timeout)
        is_pool = isinstance(target, asyncpg.Pool)
        if is_pool:
            for claim in self._claims:
                claim.want()
            try:
                conn = await lease(target, self._timeout)
            except BaseException:
                self._release_claims()
                raise
            if conn is None:
                self._release_claims()
                return
            self._pool = target
        else:
            conn = target
            raw = raw_connection(conn)
            try:
                for claim in self._claims:  # in the sorted order: no deadlock here either
                    left = await claim.claim_on(raw, task, deadline.remaining())
                    if left is not None and left < 0:
                        self._release_claims()
                        return
            except BaseException:
                self._release_claims()
                raise
        self._conn = conn
        self._owned = self.xact and (is_pool or not conn.is_in_transaction())
        try:
            await check_lock_target(conn, session=not self.xact)
            for key in self.keys:
                await check_xact_left(conn, task, key)
            if self._owned:
                await self._steps.begin(conn)
            granted = await self._steps.take(conn, deadline)
        except asyncpg.exceptions.OutOfMemoryError as exc:
            await not_held(self, raising=True)
            raise lock_table_full(exc) from exc
        except BaseException:
            await not_held(self, raising=True)
            raise
        if not granted:
            await not_held(self, raising=False)
            return
        self.acquired = True
        self._after_grant(task)

    def _after_grant(self, task: asyncio.Task[Any]) -> None:
        conn = self._conn
        self.pid = conn.get_server_pid()
        self.fence = self._steps.fence
        for key in self.keys:
            # A nested advisory() of one of the keys joins this hold.
            if holds.register(task, key, self):
                self._registered.append(key)
        self._raw = raw_connection(conn)
        heartbeat = self._pool is not None and not self.xact
        self._liveness.start(conn, self._raw, heartbeat=heartbeat)
        if self._cancel_on_lost:
            self._canceller = BlockCanceller(task)
        self._liveness.check()

    # -- releasing -------------------------------------------------------------

    async def _exit(self, exc: BaseException | None) -> None:
        """Release every key. Raises LockLost when they were lost while held
        (in place of the cancellation aiopglock delivered for that)."""
        canceller, self._canceller = self._canceller, None
        ours = canceller.settle(exc) if canceller is not None else False
        if not self.acquired:
            return
        task = self._task
        if task is not None:
            for key in self._registered:
                holds.unregister(task, key, self)
        self._registered = []
        conn = self._conn
        failure: BaseException | None = None
        with Cleanup(lazy=exc is None) as cleanup:
            try:
                failure = await release_set(self, conn, exc, cleanup)
            finally:
                self._release_claims()
                self._conn = None
                self.acquired = False
            if self._lost:
                await deliver_lost(self._lost_error(), exc, ours, canceller, cleanup, task)
        if failure is not None:
            raise failure


class AdvisoryMany(_AdvisorySpec[AdvisoryManyLock]):
    """An ``advisory_many`` request: an async context manager and a decorator.

    Built by :func:`aiopglock.advisory_many`; holds only configuration.

    Example::

        both = aiopglock.advisory_many(["acct:1", "acct:2"], db=pool, timeout=5)

        async with both as lock:
            if lock:
                ...
    """

    __slots__ = ("_db", "_keys")

    _name = "aiopglock.advisory_many"
    #: The kind in metrics and spans (a span's key is the set's first key).
    _kind = "advisory_many"

    def __init__(
        self,
        keys: Iterable[Key],
        *,
        db: DB | None = None,
        shared: bool = False,
        xact: bool = False,
        timeout: Timeout = None,
        side_effect: SideEffect | None = None,
        cancel_on_lost: bool = True,
        fence: bool = False,
    ) -> None:
        self._keys = sorted_keys(keys)
        # The plumbing wants one key to be set: the first (it is not used).
        self._configure(self._keys[0], shared, xact, timeout, side_effect, cancel_on_lost, fence)
        check_db(db)
        self._db = db

    def __repr__(self) -> str:
        return (
            f"aiopglock.advisory_many({keys_text(self._keys)}, shared={self._shared}, "
            f"xact={self._xact}, timeout={self._timeout}, side_effect={self._side_effect!r})"
        )

    def _not_acquired(self, key: AdvisoryKey) -> LockNotAcquired:
        return LockNotAcquired(
            f"advisory keys {keys_text(self._keys)} not acquired (timeout={self._timeout})",
            key=self._keys,
        )

    async def _acquire(
        self, key: AdvisoryKey, side_effect: SideEffect, task: Any, text: str | None = None
    ) -> Any:
        # A Locker is taken as its pool: the set on a connection of its pool,
        # leased for the set's lifetime (as Locker xact/fence requests are).
        front = resolve_db(self._db, front=True)
        # A key the task holds through the Locker is in the one re-entry
        # registry: the set refuses it as it refuses any held key.
        target = front.pool if isinstance(front, PoolFront) else front
        lock = AdvisoryManyLock(
            self._keys,
            shared=self._shared,
            xact=self._xact,
            timeout=self._timeout,
            cancel_on_lost=self._cancel_on_lost,
            fence=self._fence,
        )
        await lock._enter(target, task)
        if not lock.acquired and side_effect is SideEffect.RAISE:
            raise self._not_acquired(key)
        return lock


def advisory_many(
    keys: Iterable[Key],
    *,
    db: DB | None = None,
    shared: bool = False,
    xact: bool = False,
    timeout: Timeout = None,
    side_effect: SideEffect | None = None,
    cancel_on_lost: bool = True,
    fence: bool = False,
) -> AdvisoryMany:
    """Several advisory locks, all or nothing, as an async context manager or
    a decorator.

    The handle is truthy iff every key is held; when it is falsy none is.

    - ``keys``: an iterable of ``str``, ``int`` or ``(int, int)`` (see
      :func:`aiopglock.advisory_key`); duplicates collapse, an empty set is a
      ValueError. They are taken in one order (int8 keys by value, then
      pairs by value: ``lock.keys``), so overlapping sets never deadlock.
    - ``db``: Pool (a connection leased for the set's lifetime), Connection,
      a ``Locker`` (the set is taken on a connection of its pool), a
      zero-argument callable or the configured default.
    - ``shared``, ``xact``, ``side_effect``, ``cancel_on_lost``: as for
      :func:`aiopglock.advisory`. ``xact=True`` inside the caller's
      transaction takes the set under a savepoint, rolled back unless every
      key is granted.
    - ``timeout``: bounds the whole set (pool connection included);
      ``0`` tries once and is falsy if any key is busy.
    - ``fence``: ``lock.fence``, one fencing token for the set, taken once
      every key is held (see docs/fencing.md).

    When nothing is contended the set costs one round trip. A task that
    holds one of the keys already may not ask for a set containing it
    (:class:`aiopglock.UsageError`); inside the set's block, ``advisory()``
    of one of its keys nests in the set's hold.

    Example::

        async with aiopglock.advisory_many(["acct:1", "acct:2"], db=pool, timeout=5) as lock:
            if lock:
                await transfer(1, 2)

        @aiopglock.advisory_many([1, 2], db=lambda: pool, timeout=0, side_effect=aiopglock.Skip)
        async def rebalance() -> None: ...
    """
    return AdvisoryMany(
        keys,
        db=db,
        shared=shared,
        xact=xact,
        timeout=timeout,
        side_effect=side_effect,
        cancel_on_lost=cancel_on_lost,
        fence=fence,
    )
