"""Which handle an ``__aexit__`` belongs to.

Every lock spec of aiopglock (``advisory()``, ``table()``, ``rows()``, the
timeout scopes, ``prioritize()``, ``Locker.advisory()``) holds only
configuration, so one instance may be entered by several tasks at once, and
nested in one task. ``__aenter__`` creates a handle per entry; ``__aexit__``
must find the one it is closing: the innermost of the exiting task.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any, Generic, TypeVar

from . import _otel

__all__ = ["Entered", "ExitsEntered"]

T = TypeVar("T")


def _current_task() -> Any:
    return asyncio.current_task()


class Entered(Generic[T]):
    """The handles of one spec that are entered and not yet exited, per task."""

    __slots__ = ("_by_task",)

    def __init__(self) -> None:
        self._by_task: dict[Any, list[T]] = {}

    def push(self, handle: T, task: Any = None) -> None:
        """Record ``handle`` as entered by ``task`` (default: the current one)."""
        if task is None:
            task = _current_task()
        self._by_task.setdefault(task, []).append(handle)

    def pop(self) -> T:
        """The innermost handle entered by the current task, forgotten."""
        by_task = self._by_task
        if len(by_task) == 1:
            # The only task inside this spec is the one exiting it (no
            # current_task() lookup, which costs a getpid() system call).
            task, stack = next(iter(by_task.items()))
        else:
            task = _current_task()
            found = by_task.get(task)
            if found is None:
                task, found = self._entered_elsewhere()
            stack = found
        handle = stack.pop()
        if not stack:
            del by_task[task]
        return handle

    def _entered_elsewhere(self) -> tuple[Any, list[T]]:
        """The stack an exit from a task that entered nothing closes: a block
        entered in one task and exited in another (an async fixture's
        teardown, an ``AsyncExitStack`` closed elsewhere) while other tasks
        are inside the same spec. The entering task has usually finished (a
        fixture's setup task has): the latest such task; else the task that
        entered last."""
        tasks = list(self._by_task)
        finished = [task for task in tasks if getattr(task, "done", lambda: False)()]
        task = (finished or tasks)[-1]
        return task, self._by_task[task]


class ExitsEntered:
    """The ``__aexit__`` of a spec whose entries are kept in ``_active``: the
    exiting task's innermost handle is left (``await handle._exit(exc)``), and
    a recorded hold ends (OpenTelemetry) however that exit ends."""

    __slots__ = ()

    _active: Entered[Any]

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        lock = self._active.pop()
        try:
            await lock._exit(exc)
        finally:
            if _otel.holds:
                _otel.released(lock)
