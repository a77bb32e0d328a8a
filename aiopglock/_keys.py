"""Advisory keys: validation, hashing of text keys, and how ``pg_locks`` shows them."""

from __future__ import annotations

import hashlib
import re

from ._validate import describe, is_int

__all__ = [
    "SEMAPHORE_PREFIX",
    "AdvisoryKey",
    "Key",
    "advisory_key",
    "key_from_text",
    "lock_ids",
    "slot_key",
]

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


#: What a semaphore's slot keys and channel are hashed under, apart from
#: ``advisory_key()``'s text keys.
SEMAPHORE_PREFIX = b"aiopglock.semaphore\0"


def slot_key(name: str, slot: int) -> tuple[int, int]:
    """The two-int4 advisory key of ``slot`` of semaphore ``name``.

    Example::

        >>> a, b = slot_key("reports", 0)
        >>> -(2**31) <= a < 2**31 and -(2**31) <= b < 2**31
        True
    """
    digest = hashlib.sha256(SEMAPHORE_PREFIX + name.encode() + b"\0" + str(slot).encode()).digest()
    return (
        int.from_bytes(digest[:4], "little", signed=True),
        int.from_bytes(digest[4:8], "little", signed=True),
    )


_INT = r"[+-]?[0-9]+"
_TEXT_INT = re.compile(rf"\s*({_INT})\s*", re.ASCII)
_TEXT_PAIR = re.compile(rf"\s*({_INT})\s*,\s*({_INT})\s*", re.ASCII)
# Bare text that reads as a number or a pair: "42", " -7", "1,2", "(1, 2)".
_LOOKS_INT = re.compile(rf"\s*\(?\s*({_INT})\s*\)?\s*", re.ASCII)
_LOOKS_PAIR = re.compile(rf"\s*\(?\s*({_INT})\s*,\s*({_INT})\s*\)?\s*", re.ASCII)


def key_from_text(text: str) -> Key:
    """The key a command-line argument names (``aiopglock locks --key TEXT``).

    - ``NAME``: the text key ``"NAME"`` (hashed by :func:`aiopglock.advisory_key`);
    - ``int:N``: the int8 key ``N`` (decimal, optional sign);
    - ``pair:A,B``: the two-int4 key ``(A, B)``;
    - ``str:NAME``: the text key ``"NAME"``, whatever it looks like
      (``str:42``, ``str:int:7``).

    Bare text that reads as a number or a pair (``42``, ``1,2``, ``(1, 2)``) is a
    ValueError rather than a guess: the text key ``"42"`` and the int key 42 are
    different locks. So is a malformed ``int:`` or ``pair:`` form, and a value out
    of range.

    Example::

        >>> key_from_text("invoice:42"), key_from_text("int:42"), key_from_text("pair:1,-2")
        ('invoice:42', 42, (1, -2))
    """
    if not isinstance(text, str):
        raise TypeError(f"key: expected str, got {describe(text)}")
    key: Key
    if text.startswith("str:"):
        key = text[len("str:") :]
    elif text.startswith("int:"):
        number = _TEXT_INT.fullmatch(text[len("int:") :])
        if number is None:
            raise ValueError(
                f"key: {text!r}: int: takes a decimal integer (int:42); "
                f"for the text key write {'str:' + text!r}"
            )
        key = int(number[1], 10)
    elif text.startswith("pair:"):
        pair = _TEXT_PAIR.fullmatch(text[len("pair:") :])
        if pair is None:
            raise ValueError(
                f"key: {text!r}: pair: takes two integers (pair:1,2); "
                f"for the text key write {'str:' + text!r}"
            )
        key = (int(pair[1], 10), int(pair[2], 10))
    elif looks := _LOOKS_INT.fullmatch(text):
        raise ValueError(
            f"key: {text!r} is ambiguous: write {'int:' + looks[1]!r} for the integer key, "
            f"or {'str:' + text!r} for the text key"
        )
    elif looks := _LOOKS_PAIR.fullmatch(text):
        raise ValueError(
            f"key: {text!r} is ambiguous: write {f'pair:{looks[1]},{looks[2]}'!r} for the "
            f"two-int4 key, or {'str:' + text!r} for the text key"
        )
    else:
        key = text
    advisory_key(key)  # the range and emptiness checks, with their messages
    return key
