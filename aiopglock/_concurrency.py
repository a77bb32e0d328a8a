"""Concurrency helpers, in one place: shielded cleanup, the one way a lost
lock is delivered into a block, and the per-loop background timer.

- :class:`Cleanup`: a shielded stretch of cleanup that runs to its end
  despite cancellation and delivers a cancellation met inside when it ends;
  :func:`run_through` runs one statement to its end inside it.
- :class:`BlockCanceller`: delivers ``LockLost`` into a block as one
  cancellation, as ``asyncio.timeout()`` does. When the connection holding a
  lock dies, the block that relies on it is cancelled once with a raw
  ``Task.cancel()`` (no cancel scope: an ``async with`` may be entered in one
  task and exited in another, and a scope must be exited in the task that
  entered it). The block's ``except``/``finally`` awaits run normally; at
  exit the handle consumes the cancellation it delivered
  (``Task.uncancel()``) and raises ``LockLost`` instead. A cancellation from
  anyone else is left alone and propagates.
- :class:`Sweeper`: one periodic timer per event loop for everything
  time-based about held locks. A timer per lock (``loop.call_later`` for the
  heartbeat, a statement timeout on every unlock) costs a heap push and a
  cancelled handle per lock cycle. Instead, each held lock and each cleanup
  statement in flight registers here (a dict insert), and one timer per
  loop, armed only while something is registered, looks at them every
  quarter heartbeat interval: a lock held for at least a quarter interval
  gets its heartbeat started (:meth:`Sweeper.hold`), so it starts within
  half an interval of the grant and a silent death is noticed within one
  interval; a cleanup statement running past its deadline gets its
  connection terminated, which ends the statement with an error and makes
  the caller discard the connection (:meth:`Sweeper.deadline`).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar

import anyio
import asyncpg

from ._conntypes import Conn, Pool, Proxy
from ._db import CLEANUP_ATTEMPTS, CLEANUP_STATEMENT_TIMEOUT, heartbeat_interval, terminate

__all__ = [
    "BlockCanceller",
    "Cleanup",
    "Sweeper",
    "deliver_lost",
    "foreign_cancel",
    "mark_retrieved",
    "run_through",
    "sweeper",
]

logger = logging.getLogger("aiopglock")

T = TypeVar("T")


class Cleanup:
    """A shielded stretch of cleanup that runs to completion despite cancellation.

    ``with Cleanup() as cleanup:`` enters one anyio shield for everything
    inside. A raw ``Task.cancel()`` (which a shield does not stop;
    ``asyncio.timeout`` uses it) is remembered and the interrupted step is
    tried again; so is a ``QueryCanceledError`` from a CancelRequest that
    landed late. Leaving the ``with`` delivers a remembered cancellation,
    unless an exception is raised out of the block: that one outranks it.
    To let a cancellation outrank a failure, keep the failure and raise it
    after the ``with``.

    ``Cleanup(lazy=True)`` is for the common exit, when no cancellation is
    expected: the shield is entered only when a step is first interrupted,
    and every later step runs under it. Entering a cancel scope costs about as
    much as a tenth of a lock cycle's Python work, so the exit that meets no
    cancellation does without it. A step tried unshielded must be safe to
    interrupt and retry (the retry of an interrupted unlock asks the server).
    """

    __slots__ = ("_entered", "_scope", "cancelled")

    def __init__(self, *, lazy: bool = False) -> None:
        self.cancelled: BaseException | None = None
        self._scope: anyio.CancelScope | None = None if lazy else anyio.CancelScope(shield=True)
        self._entered = False

    def __enter__(self) -> Cleanup:
        if self._scope is not None:
            self._scope.__enter__()
            self._entered = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._entered:
            assert self._scope is not None
            self._entered = False
            self._scope.__exit__(exc_type, exc, tb)
        if exc_type is None and self.cancelled is not None:
            # Nothing else in flight: the cancellation met inside is delivered
            # now. An exception raised in the block outranks it (it is dropped).
            cancelled, self.cancelled = self.cancelled, None
            raise cancelled

    def shield(self) -> None:
        """Enter the shield now, if it is not entered yet (lazy cleanups)."""
        if not self._entered:
            if self._scope is None:
                self._scope = anyio.CancelScope(shield=True)
            self._scope.__enter__()
            self._entered = True

    async def run(self, step: Callable[[int], Awaitable[T]]) -> tuple[bool, T | None]:
        """``(True, result)`` when a try of ``step(attempt)`` completed, else ``(False, None)``."""
        for attempt in range(CLEANUP_ATTEMPTS):
            try:
                return True, await step(attempt)
            except asyncpg.QueryCanceledError:
                self.shield()
                continue
            except asyncio.CancelledError as exc:
                self.cancelled = exc
                self.shield()
                continue
            except Exception as exc:
                logger.debug("aiopglock cleanup step failed: %r", exc)
                return False, None
        return False, None

    async def wait(self, fut: asyncio.Future[T]) -> T:
        """Await ``fut`` to its end even through raw cancellation."""
        while True:
            try:
                return await asyncio.shield(fut)
            except asyncio.CancelledError as exc:
                if fut.cancelled():
                    raise
                self.cancelled = exc
                self.shield()

    async def give_back(self, pool: Pool, conn: Proxy, *, discard: bool) -> None:
        """Return a leased connection to its pool; ``discard`` terminates it
        first (its backend's locks go when the process exits). Never raises."""
        if discard:
            terminate(conn)
        try:
            await pool.release(conn)
        except asyncio.CancelledError as exc:
            # asyncpg shields the release itself; it completes in the background.
            self.cancelled = exc
        except Exception as exc:  # the pool terminates a connection whose reset failed
            logger.debug("aiopglock: returning a connection to its pool failed: %r", exc)
            terminate(conn)

    def forget(self) -> None:
        """Drop the remembered cancellation: the caller has taken delivery of
        it in another form (``LockLost`` in place of aiopglock's own cancel)."""
        self.cancelled = None


def mark_retrieved(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


async def run_through(conn: Conn, sql: str, cleanup: Cleanup) -> str:
    """Run ``sql`` to its end: a cancellation meanwhile neither interrupts it
    nor sends a CancelRequest; it is remembered in ``cleanup`` instead. For
    savepoint statements inside the caller's transaction, which a cancelled
    half-run would leave in an unknown state."""
    fut = asyncio.ensure_future(conn.execute(sql, timeout=CLEANUP_STATEMENT_TIMEOUT))
    # Its outcome is always read by cleanup.wait(); this only keeps asyncio
    # from reporting it as never retrieved if the task is torn down first.
    fut.add_done_callback(mark_retrieved)
    return await cleanup.wait(fut)


# -- delivering LockLost into a block ------------------------------------------


class BlockCanceller:
    """Cancels the task running a block at most once, and tells at exit
    whether the ``CancelledError`` in flight is the one it delivered.

    Example::

        canceller = BlockCanceller(task)     # when the block starts
        ...
        canceller.fire("lock lost")           # from a termination listener
        ...
        ours = canceller.settle(exc)          # first thing in __aexit__
        if lost:
            raise LockLost(...) from exc      # replaces our CancelledError
    """

    __slots__ = ("_armed", "_baseline", "_fired", "_task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self._task = task
        # Cancellations already requested when the block starts are not ours.
        cancelling = getattr(task, "cancelling", None)
        self._baseline: int = cancelling() if cancelling is not None else 0
        self._fired = False
        self._armed = True

    @property
    def fired(self) -> bool:
        return self._fired

    def fire(self, message: str) -> None:
        """Cancel the block's task, once, while the block runs."""
        if self._armed and not self._fired and not self._task.done():
            self._fired = True
            self._task.cancel(message)

    def others(self) -> bool:
        """Whether the task has a cancellation request pending besides the
        one delivered here (always False on Python 3.10, which keeps no count)."""
        cancelling = getattr(self._task, "cancelling", None)
        if cancelling is None:
            return False
        return bool(cancelling() - (1 if self._fired else 0) > self._baseline)

    def settle(self, exc: BaseException | None) -> bool:
        """Stop delivering; True when a cancellation was delivered and no
        other cancellation of the task is pending, i.e. ``exc`` (or a
        ``CancelledError`` still to come in the exit's own awaits) is ours
        and is to be replaced by ``LockLost``."""
        self._armed = False
        if not self._fired:
            return False
        self._fired = False
        uncancel = getattr(self._task, "uncancel", None)
        if uncancel is None:  # Python 3.10: no count to consult
            return exc is None or isinstance(exc, asyncio.CancelledError)
        return bool(uncancel() <= self._baseline)


def foreign_cancel(exc: BaseException | None, canceller: BlockCanceller | None) -> bool:
    """Whether ``exc`` is a cancellation from someone else than ``canceller``
    (not yet settled)."""
    if not isinstance(exc, asyncio.CancelledError):
        return False
    return canceller is None or not canceller.fired or canceller.others()


async def deliver_lost(
    error: BaseException,
    exc: BaseException | None,
    ours: bool,
    canceller: BlockCanceller | None,
    cleanup: Cleanup,
    task: asyncio.Task[Any] | None,
) -> bool:
    """At the end of the exit's ``cleanup`` of a lost lock: raise ``error``
    (its ``LockLost``) in place of the cancellation delivered for the loss
    (``ours``: what :meth:`BlockCanceller.settle` said). Someone else's
    cancellation propagates instead: False when it is the one in flight
    (``exc``), True when it was met during the cleanup (the ``with`` of
    ``cleanup`` delivers it: return from it).

    Example::

        with Cleanup() as cleanup:
            ...  # release
            if lost and await deliver_lost(error, exc, ours, canceller, cleanup, task):
                return
    """
    cancelled = isinstance(exc, asyncio.CancelledError)
    if cancelled and not ours:
        return False  # not ours: it propagates out of the ``async with``
    if cleanup.cancelled is not None:
        # Met during the cleanup: ours arriving late, unless another
        # cancellation is pending too.
        if canceller is None or not ours or canceller.others():
            return True
        cleanup.forget()
    elif canceller is not None and ours and not cancelled and task is asyncio.current_task():
        # The block never awaited after the cancellation was delivered: take
        # delivery here (it would hit the caller's next await).
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            if canceller.others():
                raise
    raise error from (None if cancelled else exc)


# -- the per-loop timer -------------------------------------------------------


class Sweeper:
    """The timer of one event loop; see the module docstring."""

    __slots__ = ("__weakref__", "_deadlines", "_handle", "_held", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._handle: asyncio.TimerHandle | None = None
        # token -> (since, start_heartbeat)
        self._held: dict[object, tuple[float, Callable[[], None]]] = {}
        # token -> (deadline, connection, expired)
        self._deadlines: dict[object, tuple[float, Conn, Callable[[], None]]] = {}

    def hold(self, token: object, start_heartbeat: Callable[[], None]) -> None:
        """Call ``start_heartbeat()`` once ``token`` has been held a quarter
        interval, unless :meth:`unhold` comes first."""
        self._held[token] = (self._loop.time(), start_heartbeat)
        if self._handle is None:
            self._arm()

    def unhold(self, token: object) -> None:
        self._held.pop(token, None)

    def deadline(
        self, token: object, conn: Conn, seconds: float, expired: Callable[[], None]
    ) -> None:
        """Call ``expired()`` and terminate ``conn`` if :meth:`clear` for
        ``token`` has not come within ``seconds`` (checked at the next sweep
        after that)."""
        self._deadlines[token] = (self._loop.time() + seconds, conn, expired)
        if self._handle is None:
            self._arm()

    def clear(self, token: object) -> None:
        self._deadlines.pop(token, None)

    def _arm(self) -> None:
        self._handle = self._loop.call_later(heartbeat_interval() / 4, self._sweep)

    def _sweep(self) -> None:
        self._handle = None
        now = self._loop.time()
        quarter = heartbeat_interval() / 4
        if self._held:
            due = [t for t, (since, _) in self._held.items() if now - since >= quarter]
            for token in due:
                _, start = self._held.pop(token)
                start()
        if self._deadlines:
            late = [t for t, (when, _, _) in self._deadlines.items() if now >= when]
            for token in late:
                _, conn, expired = self._deadlines.pop(token)
                expired()
                terminate(conn)
        if self._held or self._deadlines:
            self._arm()


_sweepers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Sweeper] = (
    weakref.WeakKeyDictionary()
)


_last: Sweeper | None = None


def sweeper(loop: asyncio.AbstractEventLoop) -> Sweeper:
    """The sweeper of ``loop`` (the running one: callers pass it in, as
    ``asyncio.get_running_loop()`` costs a ``getpid()`` system call)."""
    global _last
    last = _last
    if last is not None and last._loop is loop:
        return last
    found = _sweepers.get(loop)
    if found is None:
        found = _sweepers[loop] = Sweeper(loop)
    _last = found
    return found
