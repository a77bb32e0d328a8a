"""What every advisory handle shares: ``SideEffect``, the handle's face
(``_LockHandle``) and the ``async with``/decorator plumbing of a lock request
(``_AdvisorySpec``), used by ``advisory()`` and ``Locker.advisory()`` alike."""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar, cast

from . import _otel
from ._concurrency import BlockCanceller
from ._decorate import target
from ._errors import LockLost, LockNotAcquired, UsageError
from ._handles import Entered, ExitsEntered
from ._keys import AdvisoryKey, Key, advisory_key
from ._timeouts import Timeout
from ._validate import check_bool, parse_timeout

__all__ = ["Raise", "Return", "SideEffect", "Skip"]

logger = logging.getLogger("aiopglock")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


class SideEffect(enum.Enum):
    """What happens when a lock is not acquired.

    - ``Return``: the handle is falsy (context-manager default).
    - ``Raise``: raise :class:`aiopglock.LockNotAcquired` (decorator default).
    - ``Skip``: the decorated function is not run and the call returns ``None``
      (decorators only).

    Example::

        @aiopglock.advisory(timeout=0, side_effect=aiopglock.Skip)
        async def refresh_cache() -> None: ...
    """

    RETURN = "return"
    RAISE = "raise"
    SKIP = "skip"

    def __repr__(self) -> str:
        return f"aiopglock.{self.name.capitalize()}"


Return = SideEffect.RETURN
Raise = SideEffect.RAISE
Skip = SideEffect.SKIP


def _check_side_effect(value: object) -> SideEffect | None:
    if value is None or isinstance(value, SideEffect):
        return value
    raise ValueError(
        f"side_effect: expected aiopglock.Return, aiopglock.Raise or aiopglock.Skip, got {value!r}"
    )


def _current_task() -> asyncio.Task[Any]:
    task = asyncio.current_task()
    if task is None:  # pragma: no cover - asyncpg needs a running task anyway
        raise UsageError("aiopglock must be used from within an asyncio task")
    return task


class _LockHandle:
    """What the handles of ``advisory()`` and ``Locker.advisory()`` show alike:
    truth, ``lost`` (through the outermost handle when nested), the repr,
    the ``LockLost`` they raise and how a loss reaches the block."""

    __slots__ = ("_lost", "_lost_reason")

    #: The kind of lock in metrics and log records (a semaphore's slot says so).
    _kind = "advisory"

    key: AdvisoryKey
    shared: bool
    xact: bool
    acquired: bool
    pid: int | None
    _lost: bool
    _lost_reason: str
    _outer: Any
    _canceller: BlockCanceller | None
    # How a task holding the key this way takes it at transaction level in a
    # transaction of its own on another connection (a UsageError says it).
    _xact_elsewhere_fix = (
        "take it on the connection holding the session lock, or release that first"
    )

    def __bool__(self) -> bool:
        return self.acquired

    @property
    def lost(self) -> bool:
        """True once the connection holding this lock has died."""
        if self._outer is not None:
            return bool(self._outer.lost)
        return self._lost

    def __repr__(self) -> str:
        mode = "shared" if self.shared else "exclusive"
        scope = "xact" if self.xact else "session"
        if self.lost:
            state = "lost"
        elif self.acquired:
            state = "acquired" if self._outer is None else "acquired (nested)"
        else:
            state = "not acquired"
        pid = f" pid={self.pid}" if self.pid is not None else ""
        return f"<{type(self).__name__} key={self.key!r} {mode} {scope} {state}{pid}>"

    def _mark_lost(self, reason: str) -> None:
        if self._lost or not self.acquired:
            return
        self._lost = True
        self._lost_reason = reason
        kind = self._kind
        logger.warning(
            "advisory lock %r lost (pid %s): %s",
            self.key,
            self.pid,
            reason,
            extra=_otel.log_fields(key=self.key, pid=self.pid, kind=kind, outcome="lost"),
        )
        _otel.lock_lost(kind)
        if self._canceller is not None:
            self._canceller.fire(f"aiopglock: advisory lock {self.key!r} lost: {reason}")

    def _lost_error(self) -> LockLost:
        return LockLost(
            f"advisory lock {self.key!r} was lost while held: {self._lost_reason}",
            key=self.key,
            pid=self.pid,
        )


class _Handle(Protocol):
    acquired: bool

    async def _exit(self, exc: BaseException | None) -> None: ...


H = TypeVar("H", bound=_Handle)


class _AdvisorySpec(ExitsEntered, Generic[H]):
    """What ``advisory()`` and ``Locker.advisory()`` share: the validated
    arguments, ``async with`` and the decorator. A subclass says how a lock is
    taken (:meth:`_acquire`)."""

    __slots__ = (
        "_active",
        "_cancel_on_lost",
        "_fence",
        "_key",
        "_shared",
        "_side_effect",
        "_text",
        "_timeout",
        "_xact",
    )

    #: How the decorator names itself in its TypeError.
    _name = "aiopglock.advisory"
    #: The kind of lock in metrics and spans.
    _kind = "advisory"

    def _configure(
        self,
        key: Key | None,
        shared: bool,
        xact: bool,
        timeout: Timeout,
        side_effect: SideEffect | None,
        cancel_on_lost: bool,
        fence: bool = False,
    ) -> None:
        self._key: AdvisoryKey | None = None if key is None else advisory_key(key)
        # The name a str key was made from (recorded only when asked for).
        self._text = key if isinstance(key, str) else None
        self._fence = check_bool(fence, "fence")
        self._shared = check_bool(shared, "shared")
        self._xact = check_bool(xact, "xact")
        self._timeout = parse_timeout(timeout)
        self._side_effect = _check_side_effect(side_effect)
        self._cancel_on_lost = check_bool(cancel_on_lost, "cancel_on_lost")
        self._active: Entered[H] = Entered()

    async def _acquire(
        self, key: AdvisoryKey, side_effect: SideEffect, task: Any, text: str | None = None
    ) -> H:
        """Take ``key`` for ``task`` (the current one); the handle says
        whether. ``text``: the ``str`` the key was made from, if any."""
        raise NotImplementedError

    def _not_acquired(self, key: AdvisoryKey) -> LockNotAcquired:
        return LockNotAcquired(
            f"advisory lock {key!r} not acquired (timeout={self._timeout})", key=key
        )

    async def __aenter__(self) -> H:
        if self._key is None:
            raise ValueError("key: required when advisory() is used as a context manager")
        side_effect = self._side_effect or Return
        if side_effect is Skip:
            raise ValueError(
                "side_effect: aiopglock.Skip only applies to decorated functions; "
                "use aiopglock.Return or aiopglock.Raise with async with"
            )
        # asyncio.current_task() costs a getpid() system call: ask once.
        task = _current_task()
        wait = _otel.begin(
            self._kind, "shared" if self._shared else "exclusive", self._key, self._text
        )
        try:
            lock = await self._acquire(self._key, side_effect, task, self._text)
        except BaseException as exc:
            _otel.failed(wait, exc)
            raise
        if wait is not None:
            _otel.granted(wait, lock)
        self._active.push(lock, task)
        return lock

    def __call__(self, fn: F) -> F:
        # A functools.partial, a staticmethod or a classmethod is accepted too
        # (see aiopglock._decorate); the default key names the function that runs.
        decorated = target(fn, self._name)
        side_effect = self._side_effect or Raise
        if side_effect is Return:
            raise ValueError(
                "side_effect: aiopglock.Return does not apply to a decorated function "
                "(it cannot see the handle); use aiopglock.Raise or aiopglock.Skip"
            )
        key = self._key
        if key is None:
            key = advisory_key(decorated.default_name(self._name))
        spec = self
        call = decorated.fn
        text = self._text if self._key is not None else decorated.default_name(self._name)

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            wait = _otel.begin(spec._kind, "shared" if spec._shared else "exclusive", key, text)
            try:
                lock = await spec._acquire(key, side_effect, _current_task(), text)
            except BaseException as exc:
                _otel.failed(wait, exc)
                raise
            if wait is not None:
                _otel.granted(wait, lock)
            if not lock.acquired:
                return None  # Skip
            try:
                result = await call(*args, **kwargs)
            except BaseException as exc:
                try:
                    await lock._exit(exc)
                finally:
                    if _otel.holds:
                        _otel.released(lock)
                raise
            try:
                await lock._exit(None)
            finally:
                if _otel.holds:
                    _otel.released(lock)
            return result

        return cast(F, decorated.finish(wrapper))
