"""Delivering ``LockLost`` into a block: one cancellation, as ``asyncio.timeout()`` does.

When the connection holding a lock dies, the block that relies on it is
cancelled once with a raw ``Task.cancel()`` (no cancel scope: an ``async
with`` may be entered in one task and exited in another, and a scope must be
exited in the task that entered it). The block's ``except``/``finally``
awaits run normally; at exit the handle consumes the cancellation it
delivered (``Task.uncancel()``) and raises ``LockLost`` instead. A
cancellation from anyone else is left alone and propagates.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["BlockCanceller"]


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
