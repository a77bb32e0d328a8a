"""Argument checks shared by every public function.

Each check returns the value it accepts (converted where it says so) and
raises ``TypeError`` for a wrong type, ``ValueError`` for a wrong value, with a
message that starts with the argument's name; every public function runs its
checks before any SQL. Checks that belong to one concept (lock keys, table
names, ``db=``) live with that concept and word their messages with
:func:`describe`.

This module is a leaf: it imports nothing from aiopglock.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any, TypeGuard, cast

__all__ = [
    "MAX_TIMEOUT_MS",
    "PID_MAX",
    "check_bool",
    "check_callable",
    "check_name",
    "check_names",
    "check_pids",
    "check_seconds",
    "describe",
    "is_int",
    "is_number",
    "parse_timeout",
]

# A server process id is a positive int4.
PID_MAX = 2**31 - 1

# lock_timeout and statement_timeout are int4 numbers of milliseconds.
MAX_TIMEOUT_MS = 2**31 - 1


def describe(value: object) -> str:
    """``value`` as a message shows what was passed: its type and its repr.

    Example::

        >>> describe(1.5)
        'float 1.5'
    """
    return f"{type(value).__name__} {value!r}"


def is_int(value: object) -> TypeGuard[int]:
    """Whether ``value`` is an int and not a bool (``True`` is an int to Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> TypeGuard[int | float]:
    """Whether ``value`` is an int or a float and not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_bool(value: object, name: str) -> bool:
    """``value`` if it is ``True`` or ``False`` (not merely truthy).

    Example::

        >>> check_bool(1, "shared")
        Traceback (most recent call last):
        TypeError: shared: expected True or False, got int 1
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {describe(value)}")
    return value


def check_callable(value: object, name: str) -> Callable[..., Any] | None:
    """``value`` if it is callable or ``None``."""
    if value is None:
        return None
    if not callable(value):
        raise TypeError(f"{name}: expected a callable or None, got {describe(value)}")
    return cast(Callable[..., Any], value)


def check_name(value: object, name: str) -> str:
    """``value`` if it is a non-empty str without NUL (what a server name can hold)."""
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected a str, got {describe(value)}")
    if not value or "\x00" in value:
        raise ValueError(f"{name}: expected a non-empty name without NUL, got {value!r}")
    return value


def check_names(value: object, name: str, *, none_ok: bool = True) -> tuple[str, ...] | None:
    """A filter on names: ``None`` (no filter, when ``none_ok``), one name, or a
    collection of names (not empty, when ``none_ok``: use ``None`` instead).

    Example::

        >>> check_names("worker", "application_name")
        ('worker',)
    """
    if value is None and none_ok:
        return None
    if isinstance(value, str):
        return (check_name(value, name),)
    if not isinstance(value, Iterable) or isinstance(value, (bytes, bytearray)):
        raise TypeError(f"{name}: expected a name or a collection of names, got {describe(value)}")
    names = tuple(check_name(item, name) for item in value)
    if not names and none_ok:
        raise ValueError(f"{name}: an empty collection matches nothing; use None for no filter")
    return names


def check_pids(values: Iterable[object], name: str, *, minimum: int = 1) -> list[int]:
    """Each of ``values`` as a server process id, from ``minimum`` to
    :data:`PID_MAX`. The caller checks that ``values`` is a collection (its
    message says which forms it takes).

    Example::

        >>> check_pids([4242], "pids")
        [4242]
    """
    pids: list[int] = []
    for pid in values:
        if not is_int(pid):
            raise TypeError(f"{name}: expected ints, got {describe(pid)}")
        if not minimum <= pid <= PID_MAX:
            raise ValueError(f"{name}: {pid} is not a process id")
        pids.append(pid)
    return pids


def _to_seconds(value: object, name: str, expected: str) -> float:
    """A number of seconds or a timedelta as float seconds; TypeError naming
    ``expected`` for anything else."""
    if isinstance(value, timedelta):
        return value.total_seconds()
    if is_number(value):
        return float(value)
    raise TypeError(f"{name}: expected {expected}, got {describe(value)}")


def check_seconds(value: object, name: str, *, allow_zero: bool) -> float:
    """A finite duration (a number of seconds or a timedelta) as seconds:
    positive, or zero too with ``allow_zero``.

    Example::

        >>> check_seconds(timedelta(milliseconds=250), "interval", allow_zero=False)
        0.25
    """
    seconds = _to_seconds(value, name, "a number of seconds or a timedelta")
    if math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"{name}: expected a finite number of seconds, got {value!r}")
    if seconds < 0 or (seconds == 0 and not allow_zero):
        what = "zero or more" if allow_zero else "a positive number of"
        raise ValueError(f"{name}: expected {what} seconds, got {value!r}")
    return seconds


def parse_timeout(value: object, name: str = "timeout") -> float | None:
    """The one meaning of a lock's ``timeout``: ``None`` (no limit of ours),
    ``0`` (never wait) or a positive number of seconds / ``timedelta``, at most
    PostgreSQL's limit. Returns seconds or ``None``.

    Example::

        >>> parse_timeout(timedelta(seconds=2))
        2.0
    """
    if value is None:
        return None
    seconds = _to_seconds(value, name, "None, a number of seconds or a timedelta")
    if math.isnan(seconds):
        raise ValueError(f"{name}: NaN is not a timeout; use None for no limit")
    if seconds < 0:
        raise ValueError(f"{name}: {value!r} is negative; use 0 to never wait, None for no limit")
    if math.isinf(seconds) or seconds * 1000 > MAX_TIMEOUT_MS:
        raise ValueError(
            f"{name}: {value!r} is longer than PostgreSQL's limit of {MAX_TIMEOUT_MS} ms; "
            "use None for no limit"
        )
    return seconds
