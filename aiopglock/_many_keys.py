"""The key set of ``aiopglock.advisory_many``: validated, deduplicated and
sorted into the one order every set is taken in, shown short in messages,
and sent to the server as arrays."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ._keys import AdvisoryKey, advisory_key
from ._validate import describe

__all__ = ["key_arrays", "keys_text", "sorted_keys"]


def _order(key: AdvisoryKey) -> tuple[int, int, int]:
    """The order keys are taken in: int8 keys by value, then pairs by value."""
    if isinstance(key, tuple):
        return (1, key[0], key[1])
    return (0, key, 0)


def sorted_keys(keys: object) -> tuple[AdvisoryKey, ...]:
    """Validate ``keys`` (an iterable of str, int or (int, int)) and return
    them as :func:`aiopglock.advisory_key` does, deduplicated, in the order
    they are taken: every int8 key by value, then every pair by value.

    Example::

        >>> sorted_keys([(1, 2), 5, 5, -3])
        (-3, 5, (1, 2))
    """
    if isinstance(keys, (str, bytes, tuple)) and not _is_key_list(keys):
        raise TypeError(
            f"keys: expected an iterable of keys (str, int or (int, int)), got {describe(keys)}; "
            "for one key use aiopglock.advisory()"
        )
    if not isinstance(keys, Iterable):
        raise TypeError(f"keys: expected an iterable of keys, got {describe(keys)}")
    out: set[AdvisoryKey] = set()
    for key in keys:
        try:
            out.add(advisory_key(key))
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"keys: {exc}") from None
    if not out:
        raise ValueError("keys: expected at least one key, got none")
    return tuple(sorted(out, key=_order))


def _is_key_list(keys: object) -> bool:
    """A tuple of keys (not one pair key, which is ambiguous: refused)."""
    if not isinstance(keys, tuple):
        return False
    return not (len(keys) == 2 and all(isinstance(part, int) for part in keys))


def keys_text(keys: tuple[AdvisoryKey, ...]) -> str:
    """The keys for a message or a repr: all of a short set, the first few of
    a long one (a set may hold thousands)."""
    if len(keys) <= 8:
        return repr(list(keys))
    shown = ", ".join(repr(key) for key in keys[:5])
    return f"[{shown}, ... ({len(keys)} keys)]"


def key_arrays(keys: tuple[AdvisoryKey, ...], pairs: bool) -> tuple[list[Any], ...]:
    """The parameters of :func:`aiopglock._sql.many_statements` for ``keys``."""
    if not pairs:
        return (list(keys),)
    pair = [isinstance(key, tuple) for key in keys]
    single = [0 if isinstance(key, tuple) else key for key in keys]
    high = [key[0] if isinstance(key, tuple) else 0 for key in keys]
    low = [key[1] if isinstance(key, tuple) else 0 for key in keys]
    return pair, single, high, low
