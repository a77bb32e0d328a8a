"""``aiopglock.advisory_key``: validation, django-pglock's hashing of text keys,
and what the server actually locks for each key form."""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import asyncpg
import pytest

import aiopglock
from tests._helpers import Connect, advisory_locks, holders, split_key

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def django_pglock_key(text: str) -> int:
    """The reference scheme, written independently of aiopglock: the first 8
    bytes of SHA-256 of the UTF-8 text, as a little-endian signed int64."""
    (value,) = struct.unpack("<q", hashlib.sha256(text.encode("utf-8")).digest()[:8])
    return int(value)


# The same scheme computed by PostgreSQL itself (sha256() exists since 11):
# bytes 7..0 of the digest as hex, read as a two's complement int8.
SERVER_HASH = """\
SELECT ('x' || string_agg(lpad(to_hex(get_byte(d, 7 - i)), 2, '0'), '' ORDER BY i))
       ::bit(64)::int8
FROM (SELECT sha256(convert_to($1::text, 'UTF8')) AS d) AS s, generate_series(0, 7) AS i
"""


# --------------------------------------------------------------------------- text keys

TEXTS = [
    "a",
    " ",
    "\x00",
    "invoice:42",
    "Invoice:42",
    "invoice:42 ",
    "tests.test_keys.some_function",
    "façade",
    "facade",
    "ключ",
    "🔒 lock",
    "日本語のキー",
    "e\u0301",  # "é" decomposed: hashed as its code points, no normalisation
    "\u00e9",
    "x" * 10_000,
    "mod.qualname " * 100,
]


@pytest.mark.parametrize("text", TEXTS, ids=lambda t: repr(t[:20]))
def test_text_key_matches_django_pglock(text: str) -> None:
    key = aiopglock.advisory_key(text)
    assert type(key) is int
    assert key == django_pglock_key(text)
    assert INT64_MIN <= key <= INT64_MAX


# Computed once with django_pglock_key() and pinned, so that any change to the
# hashing (byte order, signedness, encoding, digest) is caught even if the
# reference function above were changed along with it.
PINNED = [
    ("a", -3837880752741967926),
    ("invoice:42", 5270647782619664988),
    ("aiopglock", -4313539644916525031),
    (" ", -35364924160497354),
    ("\x00", -7459451922369792914),
    ("façade", 640621977219975976),
    ("ключ", -6877707262552775907),
    ("🔒 lock", -1315635304337475923),
    ("日本語のキー", 5775535447779872108),
    ("x" * 10_000, -3294058608608153884),
    ("mod.qualname " * 100, 6627750111442027877),
]


@pytest.mark.parametrize(("text", "expected"), PINNED, ids=lambda v: repr(v)[:20])
def test_text_key_pinned_values(text: str, expected: int) -> None:
    assert aiopglock.advisory_key(text) == expected
    assert django_pglock_key(text) == expected


def test_distinct_texts_give_distinct_keys() -> None:
    keys = {aiopglock.advisory_key(text) for text in TEXTS}
    assert len(keys) == len(TEXTS)


def test_text_key_is_not_an_int_parse() -> None:
    # "42" is text like any other: hashed, never read as the number 42.
    assert aiopglock.advisory_key("42") == django_pglock_key("42") != 42


def test_str_subclass_hashes_like_its_text() -> None:
    class Name(str):
        pass

    assert aiopglock.advisory_key(Name("invoice:42")) == 5270647782619664988


async def test_server_computes_the_same_text_keys(admin: asyncpg.Connection) -> None:
    for text, expected in PINNED:
        if "\x00" in text:
            continue  # PostgreSQL text cannot hold NUL
        assert await admin.fetchval(SERVER_HASH, text) == expected, text


def test_empty_text_is_rejected() -> None:
    with pytest.raises(ValueError, match="key"):
        aiopglock.advisory_key("")


def test_text_that_is_not_utf8_encodable_is_a_value_error_naming_key() -> None:
    # A lone surrogate cannot be encoded as UTF-8, so it cannot be hashed.
    with pytest.raises(ValueError, match="key"):
        aiopglock.advisory_key("\ud800")


# --------------------------------------------------------------------------- int keys


@pytest.mark.parametrize(
    "key", [0, 1, -1, 42, 2**31, -(2**31) - 1, 2**32, 2**62, INT64_MIN, INT64_MAX]
)
def test_int_key_is_itself(key: int) -> None:
    result = aiopglock.advisory_key(key)
    assert result == key
    assert isinstance(result, int) and not isinstance(result, bool)


@pytest.mark.parametrize("key", [INT64_MAX + 1, INT64_MIN - 1, 2**64, -(2**64), 10**30])
def test_int_key_out_of_int64_is_rejected(key: int) -> None:
    with pytest.raises(ValueError, match="key") as info:
        aiopglock.advisory_key(key)
    assert "64" in str(info.value)


@pytest.mark.parametrize(
    "key",
    [True, False, 1.0, 0.5, float("nan"), None, b"invoice", bytearray(b"x"), [1, 2], {1: 2}, {1}],
    ids=repr,
)
def test_non_key_types_are_type_errors(key: object) -> None:
    with pytest.raises(TypeError, match="key"):
        aiopglock.advisory_key(key)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- pair keys


@pytest.mark.parametrize(
    "key",
    [(0, 0), (1, 2), (-1, -1), (-7, 5), (INT32_MIN, INT32_MAX), (INT32_MAX, INT32_MIN)],
)
def test_pair_key_is_itself_as_a_tuple(key: tuple[int, int]) -> None:
    result = aiopglock.advisory_key(key)
    assert type(result) is tuple
    assert result == key


def test_pair_key_subclass_comes_back_as_a_plain_tuple() -> None:
    class Pair(tuple[int, int]):
        pass

    result = aiopglock.advisory_key(Pair((3, -4)))
    assert type(result) is tuple
    assert result == (3, -4)


@pytest.mark.parametrize(
    "key",
    [
        (INT32_MAX + 1, 0),
        (0, INT32_MAX + 1),
        (INT32_MIN - 1, 0),
        (0, INT32_MIN - 1),
        (2**40, 1),
        (INT64_MIN, INT64_MAX),
    ],
)
def test_pair_key_out_of_int32_is_rejected(key: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="key") as info:
        aiopglock.advisory_key(key)
    assert "32" in str(info.value)


@pytest.mark.parametrize(
    "key",
    [(), (1,), (1, 2, 3), (1.0, 2), (1, 2.0), ("a", 1), (1, None), (True, 1), (1, False)],
    ids=repr,
)
def test_malformed_pair_key_is_a_type_error(key: tuple[Any, ...]) -> None:
    with pytest.raises(TypeError, match="key"):
        aiopglock.advisory_key(key)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- on the server

ROUND_TRIP: list[Any] = [
    "aiopglock-tests:keys:invoice:42",
    "aiopglock-tests:keys:ключ",
    "aiopglock-tests:keys:🔒",
    -987_654_321_012,
    -1,
    0,
    INT64_MIN,
    INT64_MAX,
    (0, 0),
    (-1, -2),
    (-7_000_001, 7_000_002),
    (INT32_MIN, INT32_MAX),
    (INT32_MAX, INT32_MIN),
]


@pytest.mark.parametrize("key", ROUND_TRIP, ids=repr)
async def test_server_holds_exactly_that_key(
    key: Any, pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    expected = aiopglock.advisory_key(key)
    async with aiopglock.advisory(key, db=pool, timeout=30) as lock:
        assert lock, "not acquired (is another test holding the key?)"
        assert lock.key == expected
        assert await holders(admin, expected) == [lock.pid]
        rows = await advisory_locks(admin, pid=lock.pid)
        assert [(r["classid"], r["objid"], r["objsubid"]) for r in rows] == [split_key(expected)]
        assert [(r["mode"], r["granted"]) for r in rows] == [("ExclusiveLock", True)]
        pid = lock.pid
    assert await advisory_locks(admin, pid=pid) == []


async def test_text_key_and_its_hash_are_one_server_lock(
    pool: asyncpg.Pool, connect: Connect, admin: asyncpg.Connection
) -> None:
    text = "aiopglock-tests:keys:same-lock"
    as_int = django_pglock_key(text)
    other = await connect()
    async with aiopglock.advisory(text, db=pool, timeout=30) as lock:
        assert lock
        assert await holders(admin, as_int) == [lock.pid]
        assert await other.fetchval("SELECT pg_try_advisory_lock($1::int8)", as_int) is False
        server_key = await other.fetchval(SERVER_HASH, text)
        assert server_key == as_int
        assert await other.fetchval("SELECT pg_try_advisory_lock($1::int8)", server_key) is False
        assert await other.fetchval("SELECT pg_try_advisory_lock_shared($1::int8)", as_int) is False
    assert await other.fetchval("SELECT pg_try_advisory_lock($1::int8)", as_int) is True
    assert await holders(admin, as_int) == [other.get_server_pid()]
    assert await other.fetchval("SELECT pg_advisory_unlock($1::int8)", as_int) is True


async def test_int_held_elsewhere_blocks_its_text_key(
    pool: asyncpg.Pool, connect: Connect, admin: asyncpg.Connection
) -> None:
    text = "aiopglock-tests:keys:held-as-int"
    as_int = django_pglock_key(text)
    other = await connect()
    assert await other.fetchval("SELECT pg_try_advisory_lock($1::int8)", as_int) is True
    try:
        async with aiopglock.advisory(text, db=pool, timeout=0) as lock:
            assert not lock
            assert lock.key == as_int
        with pytest.raises(aiopglock.LockNotAcquired) as info:
            async with aiopglock.advisory(text, db=pool, timeout=0, side_effect=aiopglock.Raise):
                pytest.fail("the block ran without the lock")
        assert info.value.key == as_int
        assert await holders(admin, as_int) == [other.get_server_pid()]
    finally:
        await other.execute("SELECT pg_advisory_unlock($1::int8)", as_int)


async def test_pair_key_is_not_the_int8_with_the_same_halves(
    pool: asyncpg.Pool, connect: Connect, admin: asyncpg.Connection
) -> None:
    # (a, b) is pg_advisory_lock(int4, int4): objsubid 2. The int8 whose high and
    # low halves are a and b is shown with the same classid/objid but objsubid 1,
    # and is a different lock: packing pairs into one int8 would be a bug.
    pair = (7_100_001, 7_100_002)
    packed = (pair[0] << 32) | pair[1]
    assert split_key(packed)[:2] == split_key(pair)[:2]
    other = await connect()
    async with aiopglock.advisory(pair, db=pool, timeout=30) as lock:
        assert lock
        assert await holders(admin, pair) == [lock.pid]
        assert await holders(admin, packed) == []
        assert (
            await other.fetchval("SELECT pg_try_advisory_lock($1::int4, $2::int4)", *pair) is False
        )
        assert await other.fetchval("SELECT pg_try_advisory_lock($1::int8)", packed) is True
        await other.execute("SELECT pg_advisory_unlock($1::int8)", packed)
