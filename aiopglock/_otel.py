"""OpenTelemetry metrics and spans, and the structured fields of log records.

aiopglock records through ``opentelemetry-api`` when it is installed (the
``otel`` extra) and an SDK is set up; otherwise every function here returns
at once. Which one applies is read from OpenTelemetry's global providers at
each call, so an SDK set up after ``import aiopglock`` is picked up, and an
application without one pays one attribute read per lock.

What is recorded (attribute names under ``aiopglock.``):

- ``aiopglock.lock.wait.duration`` (histogram, s): from asking to the
  answer, by ``aiopglock.lock.kind`` (advisory, advisory_many, semaphore,
  table, rows), ``aiopglock.lock.mode`` and ``aiopglock.lock.outcome``
  (acquired, not_acquired, cancelled, error);
- ``aiopglock.lock.hold.duration`` (histogram, s): from the grant to the
  release, outcome released or lost;
- ``aiopglock.locks.held`` (up-down counter): locks held now, by kind and mode;
- ``aiopglock.locks.lost`` (counter): locks lost, by kind;
- ``aiopglock.monitor.actions`` (counter): backends the prioritizer or the
  watchdog signalled, by ``aiopglock.monitor`` (prioritize, watchdog) and
  ``aiopglock.monitor.action`` (cancel, terminate, dry_run);
- a span ``aiopglock.wait`` per wait, with the kind, mode and the key sent
  to the server (``aiopglock.lock.key``: an int, or a list of two for the
  two-int form; never the name, unless :func:`aiopglock.configure`'s
  ``record_names=True``), and the outcome as its status.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Any

__all__ = [
    "Wait",
    "begin",
    "failed",
    "granted",
    "hold_ended",
    "hold_started",
    "lock_lost",
    "log_fields",
    "monitor_action",
    "record_names",
    "released",
    "seconds",
    "set_record_names",
    "wait_ended",
    "wait_started",
]

logger = logging.getLogger("aiopglock")

ACQUIRED = "acquired"
NOT_ACQUIRED = "not_acquired"
CANCELLED = "cancelled"
ERROR = "error"
RELEASED = "released"
LOST = "lost"

_metrics: Any = None
_metrics_state: Any = None
_trace: Any = None
# The providers OpenTelemetry hands out while no SDK is set up.
_UNSET_PROVIDERS: tuple[type, ...] = ()
try:  # the otel extra
    from opentelemetry import metrics as _metrics
    from opentelemetry import trace as _trace
    from opentelemetry.metrics import NoOpMeterProvider
    from opentelemetry.trace import NoOpTracerProvider, ProxyTracerProvider, Status, StatusCode

    # The meter provider's proxy and global are private to the API: looked
    # up, not imported (see _provider_set).
    _metrics_state = getattr(_metrics, "_internal", None)
    _proxy = getattr(_metrics_state, "_ProxyMeterProvider", None)
    _UNSET_PROVIDERS = (NoOpMeterProvider, NoOpTracerProvider, ProxyTracerProvider)
    if isinstance(_proxy, type):
        _UNSET_PROVIDERS += (_proxy,)
    # A provider named in the environment is loaded by the first call of the
    # public getter, which sets the global read above: make that call now.
    if "OTEL_PYTHON_METER_PROVIDER" in os.environ:
        _metrics.get_meter_provider()
    if "OTEL_PYTHON_TRACER_PROVIDER" in os.environ:
        _trace.get_tracer_provider()
except ImportError:  # the install without the otel extra
    pass

_record_names = False


def set_record_names(value: bool) -> None:
    global _record_names
    _record_names = value


def record_names() -> bool:
    return _record_names


class _Instruments:
    """The meter's instruments, made once from the global meter provider
    (OpenTelemetry's proxy instruments forward to a provider set later)."""

    def __init__(self) -> None:
        assert _metrics is not None
        from aiopglock import __version__

        meter = _metrics.get_meter("aiopglock", __version__)
        self.wait = meter.create_histogram(
            "aiopglock.lock.wait.duration",
            unit="s",
            description="Time from asking for a lock to the answer",
        )
        self.hold = meter.create_histogram(
            "aiopglock.lock.hold.duration",
            unit="s",
            description="Time a lock was held, from the grant to the release",
        )
        self.held = meter.create_up_down_counter(
            "aiopglock.locks.held", unit="{lock}", description="Locks held now"
        )
        self.lost = meter.create_counter(
            "aiopglock.locks.lost",
            unit="{lock}",
            description="Locks whose holding connection died while held",
        )
        self.actions = meter.create_counter(
            "aiopglock.monitor.actions",
            unit="{backend}",
            description="Backends the prioritizer or the watchdog signalled (or would have)",
        )
        assert _trace is not None
        self.tracer = _trace.get_tracer("aiopglock", __version__)


_instruments: _Instruments | None = None


_MISSING = object()
# Whether an SDK provider has been seen: set once, it stays (OpenTelemetry
# lets a global provider be set only once).
_meter_seen = False
_tracer_seen = False


def _provider_set(module: Any, name: str, public: Callable[[], Any]) -> bool:
    """Whether a real provider is set: the API's own global, read directly
    (its public getter consults the environment on every call, which costs
    more than a lock's Python work); the getter when that global is gone."""
    provider = getattr(module, name, _MISSING)
    if provider is None:
        return False
    if provider is _MISSING:
        provider = public()
    return not isinstance(provider, _UNSET_PROVIDERS)


def _meter() -> _Instruments | None:
    """The instruments when an SDK meter provider is set, else None."""
    global _meter_seen
    if not _meter_seen:
        if _metrics is None or not _provider_set(
            _metrics_state, "_METER_PROVIDER", _metrics.get_meter_provider
        ):
            return None
        _meter_seen = True
    return _made()


def _tracing() -> _Instruments | None:
    """The instruments when an SDK tracer provider is set, else None."""
    global _tracer_seen
    if not _tracer_seen:
        if _trace is None or not _provider_set(
            _trace, "_TRACER_PROVIDER", _trace.get_tracer_provider
        ):
            return None
        _tracer_seen = True
    return _made()


def _made() -> _Instruments:
    global _instruments
    if _instruments is None:
        _instruments = _Instruments()
    return _instruments


def _key_attribute(key: object) -> Any:
    if isinstance(key, tuple):
        return list(key)
    return key


class Wait:
    """One wait being recorded: made by :func:`wait_started`, ended once by
    :func:`wait_ended`."""

    __slots__ = ("attributes", "span", "start")

    def __init__(self, attributes: dict[str, Any], span: Any) -> None:
        self.attributes = attributes
        self.span = span
        self.start = time.perf_counter()


def wait_started(kind: str, mode: str, key: object = None, name: str | None = None) -> Wait | None:
    """Start recording a wait for a lock of ``kind`` in ``mode`` on ``key``
    (the value sent to the server; ``name`` is the text it was made from,
    recorded only with ``configure(record_names=True)``). None when nothing
    is set up to receive it."""
    meter = _meter()
    tracer = _tracing()
    if meter is None and tracer is None:
        return None
    attributes: dict[str, Any] = {"aiopglock.lock.kind": kind, "aiopglock.lock.mode": mode}
    span = None
    if tracer is not None:
        span_attributes = dict(attributes)
        if key is not None:
            span_attributes["aiopglock.lock.key"] = _key_attribute(key)
        if name is not None and _record_names:
            span_attributes["aiopglock.lock.name"] = name
        span = tracer.tracer.start_span("aiopglock.wait", attributes=span_attributes)
    return Wait(attributes, span)


def wait_ended(wait: Wait | None, outcome: str, error: BaseException | None = None) -> float:
    """End the wait with ``outcome``; returns the seconds waited (0.0 when not recorded)."""
    if wait is None:
        return 0.0
    waited = time.perf_counter() - wait.start
    meter = _meter()
    if meter is not None:
        meter.wait.record(waited, {**wait.attributes, "aiopglock.lock.outcome": outcome})
    span = wait.span
    if span is not None:
        span.set_attribute("aiopglock.lock.outcome", outcome)
        if outcome == ACQUIRED:
            span.set_status(Status(StatusCode.OK))
        else:
            span.set_status(Status(StatusCode.ERROR, outcome))
        if error is not None and outcome == ERROR:
            span.record_exception(error)
        span.end()
        wait.span = None
    return waited


def hold_started(kind: str, mode: str) -> float | None:
    """A lock of ``kind`` in ``mode`` was granted; returns the token for
    :func:`hold_ended` (None when nothing is set up)."""
    meter = _meter()
    if meter is None:
        return None
    meter.held.add(1, {"aiopglock.lock.kind": kind, "aiopglock.lock.mode": mode})
    return time.perf_counter()


def hold_ended(kind: str, mode: str, started: float | None, outcome: str = RELEASED) -> None:
    """The hold that :func:`hold_started` returned ``started`` for ended."""
    if started is None:
        return
    meter = _meter()
    if meter is None:
        return
    attributes = {"aiopglock.lock.kind": kind, "aiopglock.lock.mode": mode}
    meter.held.add(-1, attributes)
    meter.hold.record(
        time.perf_counter() - started, {**attributes, "aiopglock.lock.outcome": outcome}
    )


def lock_lost(kind: str) -> None:
    meter = _meter()
    if meter is not None:
        meter.lost.add(1, {"aiopglock.lock.kind": kind})


def monitor_action(monitor: str, action: str, count: int = 1) -> None:
    """``count`` backends were signalled by ``monitor`` (prioritize or
    watchdog) with ``action`` (cancel, terminate, or dry_run)."""
    meter = _meter()
    if meter is not None and count:
        meter.actions.add(count, {"aiopglock.monitor": monitor, "aiopglock.monitor.action": action})


# Holds being recorded: id(handle) -> (handle, kind, mode, start). Filled
# only while a meter provider is set; the handle is kept until its exit.
holds: dict[int, tuple[Any, str, str, float]] = {}


def begin(kind: str, mode: str, key: object, text: object = None) -> Wait | None:
    """Start recording the wait of a lock spec's entry (None: nothing set up).
    Called on every entry: while no SDK is set up it reads two globals and
    returns."""
    if not (_meter_seen or _tracer_seen) and _nothing_set():
        return None
    return wait_started(kind, mode, key, text if isinstance(text, str) else None)


def _nothing_set() -> bool:
    """Whether neither a meter nor a tracer provider is set: the API's two
    globals, None until set, read directly (when the API no longer has
    them, the getters decide in :func:`wait_started`)."""
    if _metrics is None:
        return True
    return (
        getattr(_metrics_state, "_METER_PROVIDER", _MISSING) is None
        and getattr(_trace, "_TRACER_PROVIDER", _MISSING) is None
    )


def granted(wait: Wait | None, handle: Any) -> None:
    """The entry's wait ended with ``handle``: acquired or not; an acquired
    handle's hold is recorded until :func:`released`."""
    if wait is None:
        return
    acquired = bool(handle.acquired)
    wait_ended(wait, ACQUIRED if acquired else NOT_ACQUIRED)
    # A nested entry (the task holds the key already) adds no server lock.
    if acquired and getattr(handle, "_outer", None) is None:
        kind = wait.attributes["aiopglock.lock.kind"]
        mode = wait.attributes["aiopglock.lock.mode"]
        start = hold_started(kind, mode)
        if start is not None:
            holds[id(handle)] = (handle, kind, mode, start)


def failed(wait: Wait | None, exc: BaseException) -> None:
    """The entry's wait ended with ``exc`` raised."""
    if wait is None:
        return
    from ._errors import LockNotAcquired

    if isinstance(exc, LockNotAcquired):
        wait_ended(wait, NOT_ACQUIRED)
    elif isinstance(exc, asyncio.CancelledError):
        wait_ended(wait, CANCELLED)
    else:
        wait_ended(wait, ERROR, exc)


def released(handle: Any) -> None:
    """The entry of ``handle`` exited: its hold (if recorded) ends, released or lost."""
    if not holds:
        return
    found = holds.pop(id(handle), None)
    if found is None or found[0] is not handle:
        return
    _, kind, mode, start = found
    # The loss itself is counted when it is noticed (lock_lost), not here.
    hold_ended(kind, mode, start, LOST if getattr(handle, "lost", False) else RELEASED)


def seconds(value: Any) -> float | None:
    """A duration (``timedelta`` or seconds) as seconds, for log fields."""
    if value is None:
        return None
    total = getattr(value, "total_seconds", None)
    return float(total() if total is not None else value)


def log_fields(
    *,
    key: object = None,
    pid: int | None = None,
    kind: str | None = None,
    outcome: str | None = None,
    waited: float | None = None,
    **more: Any,
) -> dict[str, Any]:
    """The ``extra=`` of a log record: the fields every aiopglock record
    carries (None where they do not apply), under their plain names.

    Example::

        logger.warning("lock %r lost", key, extra=log_fields(key=key, pid=pid, kind="advisory",
                                                          outcome="lost"))
    """
    return {"key": key, "pid": pid, "kind": kind, "outcome": outcome, "waited": waited, **more}
