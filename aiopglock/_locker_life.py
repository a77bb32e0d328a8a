"""The lifetime of a :class:`aiopglock.Locker`, as ``asyncpg.Pool`` has one.

A Locker is usable after construction (it starts on first use) or with
``async with``. It owns its tasks: they are created on the loop, and no task
group or cancel scope spans the caller's ``async with``, so it may be entered
in one task and closed in another. ``aclose()`` is idempotent, cancels and
awaits them, and leaves no connection leased. A Locker dropped while open
warns, and its background task gives its connection back.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import TYPE_CHECKING, Any

import asyncpg

from ._concurrency import Cleanup, mark_retrieved
from ._db import check_loop
from ._errors import UsageError
from ._locker_entry import closed_error
from ._locker_holder import HolderService, serve
from ._locker_state import LockerState

if TYPE_CHECKING:
    from ._locker import Locker

__all__ = ["Lifetime"]


class Lifetime:
    """Start, entry, closing and dropping of one Locker: its loop, its
    background task (``serve``), the tasks of its contended waits."""

    __slots__ = ("closing", "entered", "loop", "pool", "service", "state", "task", "waits")

    def __init__(self, pool: asyncpg.Pool[Any], state: LockerState) -> None:
        self.pool = pool
        self.state = state
        self.loop: asyncio.AbstractEventLoop | None = None
        self.service: HolderService | None = None
        self.task: asyncio.Task[None] | None = None
        # The tasks of contended waits (and holds) on dedicated connections.
        self.waits: set[asyncio.Task[None]] = set()
        self.closing: asyncio.Future[None] | None = None
        self.entered = False

    def start(self, owner: Locker) -> None:
        """Start the background task (on first use, or on entry)."""
        check_loop(self.pool)  # another loop's pool: refused, nothing touched
        loop = asyncio.get_running_loop()
        self.loop = loop
        service = HolderService(weakref.ref(owner), self.pool, self.state, loop, self.waits)
        self.service = service
        # Closures over the service only: the Locker stays collectable.
        self.state.attach(loop, wake=service.wake.set, holder_ready=service.holder_ready)
        self.task = loop.create_task(serve(service))

    async def enter(self, owner: Locker) -> None:
        """``async with locker``: start, and wait for the holder connection."""
        if self.state.closed:
            raise closed_error()
        if self.entered:
            raise UsageError("a Locker can be entered only once")
        self.entered = True
        if self.task is None:
            self.start(owner)
        service = self.service
        assert service is not None
        if service.holder is None:
            if service.ready.done():
                service.ready = service.loop.create_future()
            ready = service.ready
            service.want_holder = True
            service.wake.set()
            try:
                await asyncio.shield(ready)
            except BaseException:
                await self.close()
                raise

    async def close(self) -> None:
        """``aclose()``: see :meth:`aiopglock.Locker.aclose`."""
        state = self.state
        if self.loop is not None and self.loop is not asyncio.get_running_loop():
            state.closed = True
            if self.loop.is_closed():
                return  # its tasks ended with that loop, its connections with its pool
            raise UsageError(
                "this Locker runs on another event loop: close it in that loop "
                "(asyncio.run_coroutine_threadsafe(locker.aclose(), loop))"
            )
        if self.closing is None:
            state.closed = True
            self.closing = closing = asyncio.get_running_loop().create_future()
            closing.add_done_callback(mark_retrieved)
            tasks = list(self.waits)
            serve_task, service = self.task, self.service
            if serve_task is not None and service is not None:
                tasks.append(serve_task)
                service.wake.set()
                if not service.in_batch:
                    # Waiting for a wake-up or a connection: nothing to finish.
                    serve_task.cancel()
            for task in self.waits:
                task.cancel()
            if tasks:
                gathered = asyncio.gather(*tasks, return_exceptions=True)
                gathered.add_done_callback(lambda _: closing.set_result(None))
            else:
                closing.set_result(None)
        with Cleanup() as cleanup:
            await cleanup.wait(self.closing)

    def dropped(self) -> bool:
        """The Locker is being collected: wake the background task, which
        finds it gone and gives its connection back. Cheap and without I/O.
        True when it was open (the caller warns)."""
        if self.task is None or self.state.closed:
            return False
        service, loop = self.service, self.loop
        if service is not None:
            service.dropped = True
            if loop is not None and not loop.is_closed():
                if loop is _running_loop():
                    service.wake.set()
                else:
                    loop.call_soon_threadsafe(service.wake.set)
        return True


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
