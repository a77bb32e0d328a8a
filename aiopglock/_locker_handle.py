"""The handles of :class:`aiopglock.Locker`: ``LockerLock`` (one lock taken
through a Locker) and ``LockerAdvisory`` (what ``locker.advisory()`` returns).

A handle asks its Locker for the key (``Locker._request``), waits for the
answer, and gives the key back at exit (``Locker._release``), waiting for the
server's confirmation even when the caller is cancelled meanwhile.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from ._advisory import (
    AdvisoryLock,
    Raise,
    SideEffect,
    _AdvisorySpec,
    _LockHandle,
    check_xact_left,
    has_xact_left,
)
from ._concurrency import BlockCanceller, Cleanup, deliver_lost, foreign_cancel
from ._conntypes import RawConn
from ._errors import UsageError
from ._keys import AdvisoryKey, Key
from ._locker_entry import Entry, Request
from ._reentry import advisory_holds as holds
from ._timeouts import Timeout

if TYPE_CHECKING:
    from ._locker import Locker

__all__ = ["LockerAdvisory", "LockerLock"]


def current_task() -> asyncio.Task[Any]:
    task = asyncio.current_task()
    if task is None:  # pragma: no cover - asyncpg needs a running task anyway
        raise UsageError("aiopglock must be used from within an asyncio task")
    return task


class LockerLock(_LockHandle):
    """The handle of one lock taken through a :class:`aiopglock.Locker`.

    The same attributes as :class:`aiopglock.AdvisoryLock`: ``bool(lock)`` is
    True iff acquired; ``key``, ``shared``, ``xact`` (always False),
    ``acquired``, ``lost``, ``pid`` (the server process holding it: the
    Locker's holder connection, or the dedicated one of a contended wait),
    ``fence`` (always None: ``fence=True`` takes an ``AdvisoryLock``).

    Example::

        async with locker.advisory("invoice:42", timeout=5) as lock:
            if lock:
                print(lock.pid, lock.key)
    """

    __slots__ = (
        "_cancel_on_lost",
        "_canceller",
        "_entry",
        "_locker",
        "_name",
        "_outer",
        "_raw",
        "_registered",
        "_task",
        "_timeout",
        "acquired",
        "fence",
        "key",
        "pid",
        "shared",
        "xact",
    )

    _xact_elsewhere_fix = (
        "release that first, or ask for it on a Pool (db=pool, or this Locker's "
        "advisory(..., xact=True)), where a transaction of aiopglock's own nests in the hold"
    )

    def __init__(
        self,
        locker: Locker,
        key: AdvisoryKey,
        *,
        shared: bool,
        timeout: float | None,
        cancel_on_lost: bool,
        name: str | None = None,
    ) -> None:
        self.key = key
        # The str the key was made from: a contended wait names it on the server.
        self._name = name
        self.shared = shared
        self.xact = False
        self.acquired = False
        self.pid: int | None = None
        self._locker = locker
        self._timeout = timeout
        self._cancel_on_lost = cancel_on_lost
        self._lost = False
        self._lost_reason = ""
        self.fence: int | None = None
        # The task's outermost hold of the key when this one nests in it: a
        # LockerLock or an AdvisoryLock (one registry, ``_reentry``).
        self._outer: Any = None
        # Whether this handle is the task's registered (outermost) hold.
        self._registered = False
        # No connection of the caller's holds it: an AdvisoryLock nesting in
        # it is always on another session.
        self._raw: RawConn | None = None
        self._entry: Entry | None = None
        self._task: asyncio.Task[Any] | None = None
        # Set while the block runs with cancel_on_lost: losing the lock
        # cancels the block once, as asyncio.timeout() does.
        self._canceller: BlockCanceller | None = None

    async def _enter(self, task: asyncio.Task[Any]) -> None:
        self._task = task
        locker = self._locker
        if locker._loop is not None and task.get_loop() is not locker._loop:
            raise UsageError(
                "this Locker runs on another event loop (the one it was first used or "
                "entered on): create one Locker per event loop"
            )
        if locker._closed:
            raise locker._closed_error()
        # Held by this task already, through this or another Locker or
        # advisory(): asking the server again would wait for ourselves.
        outer = holds.outer(task, self.key, shared=self.shared)
        if outer is not None:
            self._outer = outer
            self.acquired = True
            self.pid = outer.pid
            return
        got = locker._request(self)
        if isinstance(got, Request):
            req = got
            try:
                granted = await req.fut
            except BaseException:
                settle = locker._abandon(req)
                if settle is not None:
                    with Cleanup() as cleanup:
                        await cleanup.wait(settle)
                raise
        else:
            granted = got
        if not granted:
            return
        self._registered = holds.register(task, self.key, self)
        if self._cancel_on_lost:
            self._canceller = BlockCanceller(task)
            if self._lost:
                self._canceller.fire(
                    f"aiopglock: advisory lock {self.key!r} lost: {self._lost_reason}"
                )

    async def _exit(self, exc: BaseException | None) -> None:
        canceller, self._canceller = self._canceller, None
        # First, before any await: stop delivering, and tell whether the
        # cancellation in flight (or still to come) is the one delivered here.
        ours = canceller.settle(exc) if canceller is not None else False
        outer = self._outer
        if outer is not None:
            self.acquired = False
            if outer.lost and not foreign_cancel(exc, outer._canceller):
                raise outer._lost_error() from exc
            return
        if not self.acquired:
            return
        if self._registered:
            self._registered = False
            assert self._task is not None
            holds.unregister(self._task, self.key, self)
        entry = self._entry
        wait = self._locker._release(self)
        released = True
        cancel: asyncio.CancelledError | None = None
        try:
            if wait is not None:
                released = await wait
        except asyncio.CancelledError as met:
            cancel = met
        except BaseException:
            self.acquired = False
            raise
        if cancel is None and released and not self._lost:
            self.acquired = False  # the common exit: no Cleanup built
            return
        with Cleanup(lazy=True) as cleanup:
            try:
                if cancel is not None:
                    # The unlock belongs to the Locker and goes on: wait for
                    # the server's answer all the same; the cancellation is
                    # delivered after (or replaced by LockLost when it is the
                    # one delivered for a loss).
                    assert wait is not None
                    cleanup.cancelled = cancel
                    released = await self._locker._finish_release(entry, wait, cleanup)
                if not released:
                    self._mark_lost("it was no longer held when the block exited")
            finally:
                self.acquired = False
            if self._lost:
                await deliver_lost(self._lost_error(), exc, ours, canceller, cleanup, self._task)


class LockerAdvisory(_AdvisorySpec[LockerLock]):
    """An advisory lock request on a :class:`aiopglock.Locker`: an async
    context manager and a decorator, built by :meth:`Locker.advisory`.

    Holds only configuration: one instance can be entered by many tasks at
    once, and every call of a decorated function gets its own handle.

    Example::

        invoices = locker.advisory("invoices", timeout=5)

        async with invoices as lock:
            if lock:
                ...
    """

    __slots__ = ("_locker",)

    _name = "Locker.advisory"

    def __init__(
        self,
        locker: Locker,
        key: Key | None,
        *,
        shared: bool,
        xact: bool,
        timeout: Timeout,
        side_effect: SideEffect | None,
        cancel_on_lost: bool,
        fence: bool = False,
    ) -> None:
        self._locker = locker
        self._configure(key, shared, xact, timeout, side_effect, cancel_on_lost, fence)

    def __repr__(self) -> str:
        return (
            f"<Locker.advisory({self._key!r}, shared={self._shared}, "
            f"timeout={self._timeout}, side_effect={self._side_effect!r})>"
        )

    async def _acquire(
        self, key: AdvisoryKey, side_effect: SideEffect, task: Any, text: str | None = None
    ) -> Any:
        task = task or current_task()
        if has_xact_left(task, key):
            # This task took the key with xact=True in a transaction that may
            # still hold it: ask the server before waiting for ourselves.
            async with self._locker.pool.acquire() as conn:
                await check_xact_left(conn, task, key)
        if self._xact or self._fence:
            # A transaction-level lock lives in a transaction of its own, not
            # on the shared holder connection: it is taken exactly as
            # advisory(key, db=pool, xact=True) takes it, on this Locker's pool.
            # So is a fenced one: its token is its lock statement's own xid.
            if self._locker._closed:
                raise self._locker._closed_error()
            xlock = AdvisoryLock(
                key,
                shared=self._shared,
                xact=self._xact,
                timeout=self._timeout,
                cancel_on_lost=self._cancel_on_lost,
                fence=self._fence,
                name=text,
            )
            # A hold of the key by this task (through a Locker or advisory())
            # is found in the one registry: the transaction opens and the
            # hold nests, or a UsageError says why it cannot.
            await xlock._enter(self._locker.pool, task)
            if not xlock.acquired and side_effect is Raise:
                raise self._not_acquired(key)
            return xlock
        lock = LockerLock(
            self._locker,
            key,
            shared=self._shared,
            timeout=self._timeout,
            cancel_on_lost=self._cancel_on_lost,
            name=text,
        )
        await lock._enter(task)
        if not lock.acquired and side_effect is Raise:
            raise self._not_acquired(key)
        return lock
