"""Advisory keys: validation, hashing of text keys, and how ``pg_locks`` shows them."""

from __future__ import annotations

import hashlib

from ._validate import describe, is_int

__all__ = ["AdvisoryKey", "Key", "advisory_key", "lock_ids"]

Key = str | int | tuple[int, int]
"""What users pass: text, a signed 64-bit integer, or a pair of signed 32-bit integers."""

AdvisoryKey = int | tuple[int, int]
"""What is sent to the server: one int8, or two int4."""

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def advisory_key(key: Key) -> AdvisoryKey:
    """Return what aiopglock sends to the server for ``key``.

    - ``str``: the first 8 bytes of the SHA-256 of its UTF-8 text, read as a
      little-endian signed 64-bit integer (the scheme of django-pglock, so both
      lock the same resource under the same name). Empty text is a ValueError.
    - ``int``: itself; it must fit a signed 64-bit integer.
    - ``(int, int)``: itself, the two-int4 form; each must fit a signed 32-bit integer.

    ``bool``, ``float``, ``None`` and anything else are a TypeError.

    Example::

        >>> aiopglock.advisory_key(42)
        42
        >>> aiopglock.advisory_key((1, -2))
        (1, -2)
        >>> isinstance(aiopglock.advisory_key("invoice:42"), int)
        True
    """
    if isinstance(key, str):
        if not key:
            raise ValueError("key: an empty string is not a lock key")
        try:
            encoded = key.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"key: {key!r} cannot be encoded as UTF-8 ({exc.reason})") from None
        digest = hashlib.sha256(encoded).digest()
        return int.from_bytes(digest[:8], "little", signed=True)
    if is_int(key):
        assert isinstance(key, int)
        if not INT64_MIN <= key <= INT64_MAX:
            raise ValueError(f"key: {key} does not fit a signed 64-bit integer")
        return key
    if isinstance(key, tuple):
        if len(key) != 2 or not all(is_int(part) for part in key):
            raise TypeError(f"key: a tuple key must be two ints, got {key!r}")
        for part in key:
            if not INT32_MIN <= part <= INT32_MAX:
                raise ValueError(f"key: {part} in {key!r} does not fit a signed 32-bit integer")
        return (key[0], key[1])
    raise TypeError(f"key: expected str, int or (int, int), got {describe(key)}")


def lock_ids(key: AdvisoryKey) -> tuple[int, int, int]:
    """``(classid, objid, objsubid)`` as ``pg_locks`` shows the advisory lock ``key``.

    An int8 key is split into its high and low 32 bits (objsubid 1); a pair of
    int4 is shown as both halves (objsubid 2). OIDs are unsigned.
    """
    if isinstance(key, tuple):
        return key[0] & 0xFFFFFFFF, key[1] & 0xFFFFFFFF, 2
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    return unsigned >> 32, unsigned & 0xFFFFFFFF, 1
