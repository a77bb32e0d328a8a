"""Leader election: ``aiopglock.Leader``.

A term is one fenced session lock, ``advisory(key, db=..., fence=True)``,
taken with a server-side wait (no polling): whoever PostgreSQL grants the key
is the leader until it releases it or its session dies. ``fn`` runs inside
the lock's block, in the task that called :meth:`Leader.run`, so the
advisory lock's guarantees carry over unchanged: a lost lock cancels ``fn``
once and surfaces as :class:`~aiopglock.LockLost`, and any exit (return,
error, cancellation) releases the key before ``run()`` goes on. No task,
cancel scope or connection of the Leader outlives a ``run()`` call, so a
Leader can be started in one task and stopped (cancelled) from another.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar, cast

import anyio
import asyncpg

from . import _otel
from ._advisory import advisory
from ._db import DB, check_db
from ._errors import LockLost, UsageError
from ._keys import AdvisoryKey, Key, advisory_key
from ._validate import check_seconds, describe

__all__ = ["Leader"]

logger = logging.getLogger("aiopglock")

T = TypeVar("T")

# Raised by a campaign whose connection failed before the term began (a
# terminated backend, a restarted server, a pool that cannot connect): the
# campaign starts again after retry_interval, as after a lost term.
# An operator's intervention (a terminated or cancelled wait) is retried too.
_CONNECTION_ERRORS = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    # A pool connection whose backend was just terminated, handed out while
    # asyncpg still winds down its last statement.
    asyncpg.exceptions.InternalClientError,
)


class Leader:
    """Leader election on one advisory key, across every process of the cluster.

    ``await leader.run(fn, *args)`` campaigns for ``key`` (a server-side wait,
    no polling), then runs ``await fn(*args)`` while leader. If leadership is
    lost (the lock's connection died), ``fn`` is cancelled, and after
    ``retry_interval`` seconds the campaign starts again and ``fn`` is called
    afresh. ``fn`` returning ends ``run()`` with its value, ``fn`` raising
    propagates; either way, and when ``run()`` is cancelled, leadership is
    released before ``run()`` ends.

    - ``key``: as for :func:`aiopglock.advisory` (``str``, ``int`` or a pair).
    - ``db``: a Pool, a Connection, a zero-argument callable or a ``Locker``
      (whose fenced locks are taken on its pool), or the configured default.
      A session lock: refused behind a transaction-mode pooler.
    - ``retry_interval``: seconds (or a ``timedelta``) between a lost term,
      or a campaign whose connection failed, and the next campaign.

    ``is_leader`` is True while ``fn`` runs as leader (until the loss of
    the term is noticed: the fence covers that gap); ``term``
    counts the terms this Leader won; ``fence`` is the current term's
    fencing token (see :func:`aiopglock.advisory`'s ``fence``), None
    between terms. One ``run()`` at a time per Leader.

    Example::

        leader = aiopglock.Leader("scheduler", db=pool)

        async def schedule() -> None:
            while True:
                await enqueue_due_jobs(fence=leader.fence)
                await anyio.sleep(10)

        async with anyio.create_task_group() as tg:
            tg.start_soon(leader.run, schedule)  # for the service's lifetime
    """

    __slots__ = ("_db", "_key", "_retry_interval", "_running", "fence", "is_leader", "term")

    def __init__(self, key: Key, *, db: DB | None = None, retry_interval: float = 1.0) -> None:
        self._key: AdvisoryKey = advisory_key(key)
        check_db(db)
        self._db = db
        self._retry_interval = check_seconds(retry_interval, "retry_interval", allow_zero=True)
        self._running = False
        #: True exactly while ``fn`` runs as leader.
        self.is_leader = False
        #: How many terms this Leader has won.
        self.term = 0
        #: The current term's fencing token; None between terms.
        self.fence: int | None = None

    @property
    def key(self) -> AdvisoryKey:
        """The advisory key campaigned for (as :func:`aiopglock.advisory_key` returns it)."""
        return self._key

    def __repr__(self) -> str:
        state = f"leader fence={self.fence}" if self.is_leader else "follower"
        return f"<Leader key={self._key!r} {state} term={self.term}>"

    async def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Campaign, run ``await fn(*args)`` while leader, campaign again after a
        lost term; return ``fn``'s value. See :class:`Leader`.

        Example::

            result = await leader.run(migrate, "v42")  # runs once, on one node
        """
        if not callable(fn):
            raise TypeError(f"fn: expected an async function, got {describe(fn)}")
        if self._running:
            raise UsageError(
                f"{self!r} is already running: one run() at a time per Leader; "
                "create another Leader to campaign twice"
            )
        self._running = True
        try:
            while True:
                lock: Any = None
                term: _Term[T] = _Term()
                try:
                    async with advisory(self._key, db=self._db, fence=True) as lock:
                        if lock:
                            return await self._serve(lock.fence, fn, args, term)
                    # Not granted: a lock_timeout of the session (a role's or the
                    # pool's setting) ended the wait. Never lead without the lock.
                    logger.info(
                        "aiopglock: the wait for leadership of %r ended without the lock "
                        "(lock_timeout?): campaigning again",
                        self._key,
                    )
                except LockLost as exc:
                    if term.ended:
                        return term.outcome()  # fn ended before the loss was noticed
                    if lock is None or not lock.lost:
                        raise  # fn's own error (another lock it held): it propagates
                    logger.info("aiopglock: leadership of %r lost: %s", self._key, exc)
                except _CONNECTION_ERRORS as exc:
                    if term.ended:
                        return term.outcome()  # fn ended; its exit met the dead connection
                    if lock is not None and lock.acquired and not lock.lost:
                        raise  # fn's own error: it propagates
                    logger.warning(
                        "aiopglock: campaign for leadership of %r failed: %r",
                        self._key,
                        exc,
                        extra=_otel.log_fields(key=self._key, kind="leader", outcome="error"),
                    )
                await anyio.sleep(self._retry_interval)
        finally:
            self._running = False

    async def _serve(
        self, fence: int | None, fn: Callable[..., Awaitable[T]], args: Any, term: _Term[T]
    ) -> T:
        """One term: ``fn`` runs with ``is_leader`` set; how it ended is kept
        in ``term`` (a loss noticed after it ended must not undo its outcome)."""
        self.term += 1
        self.fence = fence
        self.is_leader = True
        try:
            value = await fn(*args)
        except asyncio.CancelledError:
            raise  # the loss (or the caller) cancelled it: not an outcome of fn
        except BaseException as exc:
            term.error = exc
            term.ended = True
            raise
        finally:
            self.is_leader = False
            self.fence = None
        term.value = value
        term.ended = True
        return value


class _Term(Generic[T]):
    """How one term's ``fn`` ended: its value or its error."""

    __slots__ = ("ended", "error", "value")

    def __init__(self) -> None:
        self.ended = False
        self.error: BaseException | None = None
        self.value: T | None = None

    def outcome(self) -> T:
        if self.error is not None:
            raise self.error
        return cast(T, self.value)
