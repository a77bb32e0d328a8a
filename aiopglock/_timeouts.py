"""One meaning of ``timeout`` everywhere, and its translation to ``lock_timeout``."""

from __future__ import annotations

import math
from datetime import timedelta

__all__ = ["Timeout", "parse_timeout", "to_milliseconds"]

Timeout = int | float | timedelta | None

# lock_timeout is an int4 number of milliseconds.
_MAX_MS = 2**31 - 1


def parse_timeout(value: object, name: str = "timeout") -> float | None:
    """Validate a timeout: ``None`` (no limit of ours), ``0`` (never wait) or
    a positive number of seconds / ``timedelta``. Returns seconds or ``None``."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise TypeError(
            f"{name}: expected None, a number of seconds or a timedelta, "
            f"got {type(value).__name__} {value!r}"
        )
    if math.isnan(seconds):
        raise ValueError(f"{name}: NaN is not a timeout; use None for no limit")
    if seconds < 0:
        raise ValueError(f"{name}: {value!r} is negative; use 0 to never wait, None for no limit")
    if math.isinf(seconds) or seconds * 1000 > _MAX_MS:
        raise ValueError(
            f"{name}: {value!r} is longer than PostgreSQL's limit of {_MAX_MS} ms; "
            "use None for no limit"
        )
    return seconds


def to_milliseconds(seconds: float) -> str:
    """A positive timeout as a ``lock_timeout`` setting: whole milliseconds,
    rounded up and at least 1 (``0`` would mean *no* timeout to PostgreSQL)."""
    return f"{max(1, math.ceil(seconds * 1000))}ms"
