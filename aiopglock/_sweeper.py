"""One periodic timer per event loop for everything time-based about held locks.

A timer per lock (``loop.call_later`` for the heartbeat, a statement timeout
on every unlock) costs a heap push and a cancelled handle per lock cycle,
which showed up as a tenth of a lock cycle's Python time. Instead, each held
lock and each cleanup statement in flight registers here (a dict insert), and
one timer per loop, armed only while something is registered, looks at them
every quarter heartbeat interval:

- a lock held for at least a quarter interval gets its heartbeat started
  (:meth:`Sweeper.hold`), so it starts within half an interval of the grant
  and a silent death is noticed within one interval;
- a cleanup statement running past its deadline gets its connection
  terminated, which ends the statement with an error and makes the caller
  discard the connection (:meth:`Sweeper.deadline`).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Any

from ._db import heartbeat_interval, terminate

__all__ = ["Sweeper", "sweeper"]


class Sweeper:
    """The timer of one event loop; see the module docstring."""

    __slots__ = ("__weakref__", "_deadlines", "_handle", "_held", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._handle: asyncio.TimerHandle | None = None
        # token -> (since, start_heartbeat)
        self._held: dict[object, tuple[float, Callable[[], None]]] = {}
        # token -> (deadline, connection, expired)
        self._deadlines: dict[object, tuple[float, Any, Callable[[], None]]] = {}

    def hold(self, token: object, start_heartbeat: Callable[[], None]) -> None:
        """Call ``start_heartbeat()`` once ``token`` has been held a quarter
        interval, unless :meth:`unhold` comes first."""
        self._held[token] = (self._loop.time(), start_heartbeat)
        if self._handle is None:
            self._arm()

    def unhold(self, token: object) -> None:
        self._held.pop(token, None)

    def deadline(
        self, token: object, conn: Any, seconds: float, expired: Callable[[], None]
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
