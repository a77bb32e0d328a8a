"""The statements a :class:`aiopglock.Locker` sends on its holder connection.

Every pending try-lock and unlock goes in one statement (``unnest`` over
arrays, ``bigint`` keys and ``(int, int)`` pairs apart); after a failed
batch, the holder session's holds on a set of keys are asked for or
released. These functions only talk to the server: what the answers mean
is ``LockerState``'s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from . import _sql
from ._concurrency import Cleanup
from ._db import CLEANUP_STATEMENT_TIMEOUT
from ._keys import AdvisoryKey
from ._locker_entry import Entry

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

__all__ = ["held_on", "release_on", "send_batch"]


def _pair(key: AdvisoryKey) -> tuple[int, int]:
    return cast("tuple[int, int]", key)


def _split(entries: list[Entry]) -> tuple[list[Entry], list[Entry]]:
    """``bigint`` keys, then ``(int, int)`` pairs."""
    return (
        [e for e in entries if not isinstance(e.key, tuple)],
        [e for e in entries if isinstance(e.key, tuple)],
    )


def _arrays(ints: list[Entry], pairs: list[Entry]) -> list[list[Any]]:
    return [
        [e.key for e in ints],
        [e.shared for e in ints],
        [_pair(e.key)[0] for e in pairs],
        [_pair(e.key)[1] for e in pairs],
        [e.shared for e in pairs],
    ]


async def send_batch(
    conn: PoolConnectionProxy[Any], locks: list[Entry], unlocks: list[Entry]
) -> tuple[list[tuple[Entry, bool]], list[tuple[Entry, bool]]]:
    """One round trip: every unlock and try-lock. Returns each unlock with
    whether it was held, and each try-lock with whether it was granted."""
    if len(locks) + len(unlocks) == 1:
        one = await _send_one(conn, locks, unlocks)
        if one is not None:
            return one
    lock_ints, lock_pairs = _split(locks)
    unlock_ints, unlock_pairs = _split(unlocks)
    if lock_pairs or unlock_pairs:
        row = await conn.fetchrow(
            _sql.LOCKER_BATCH,
            *_arrays(unlock_ints, unlock_pairs),
            *_arrays(lock_ints, lock_pairs),
            timeout=CLEANUP_STATEMENT_TIMEOUT,
        )
        assert row is not None  # a SELECT without FROM: always one row
        unlocked_ints, unlocked_pairs, locked_ints, locked_pairs = row
    else:
        row = await conn.fetchrow(
            _sql.LOCKER_BATCH_INT8,
            [e.key for e in unlock_ints],
            [e.shared for e in unlock_ints],
            [e.key for e in lock_ints],
            [e.shared for e in lock_ints],
            timeout=CLEANUP_STATEMENT_TIMEOUT,
        )
        assert row is not None
        unlocked_ints, locked_ints = row
        unlocked_pairs = locked_pairs = ()
    unlocked = list(zip(unlock_ints, unlocked_ints, strict=True))
    unlocked += zip(unlock_pairs, unlocked_pairs, strict=True)
    locked = list(zip(lock_ints, locked_ints, strict=True))
    locked += zip(lock_pairs, locked_pairs, strict=True)
    return unlocked, locked


async def _send_one(
    conn: PoolConnectionProxy[Any], locks: list[Entry], unlocks: list[Entry]
) -> tuple[list[tuple[Entry, bool]], list[tuple[Entry, bool]]] | None:
    """A batch of one ``bigint`` key (what a sequential caller sends): a
    plain statement, cheaper to encode and to run than the arrays. None for
    an ``(int, int)`` pair."""
    entry = locks[0] if locks else unlocks[0]
    if isinstance(entry.key, tuple):
        return None
    sql = _sql.LOCKER_TRY_LOCK_ONE if locks else _sql.LOCKER_UNLOCK_ONE
    ok = bool(await conn.fetchval(sql, entry.key, entry.shared, timeout=CLEANUP_STATEMENT_TIMEOUT))
    return ([], [(entry, ok)]) if locks else ([(entry, ok)], [])


async def release_on(conn: PoolConnectionProxy[Any], entries: list[Entry]) -> bool:
    """Release every hold the session of ``conn`` has on these keys. False
    when that could not be confirmed."""
    arrays = _arrays(*_split(entries))

    async def resolve(attempt: int) -> None:
        await conn.fetchval(_sql.LOCKER_RESOLVE, *arrays, timeout=CLEANUP_STATEMENT_TIMEOUT)

    with Cleanup() as cleanup:
        ok, _ = await cleanup.run(resolve)
    return ok


async def held_on(conn: PoolConnectionProxy[Any], entries: list[Entry]) -> dict[int, bool] | None:
    """Whether the session of ``conn`` holds each key, by ``id()`` of its
    entry; None when the server could not tell."""
    ints, pairs = _split(entries)
    arrays = _arrays(ints, pairs)

    async def ask(attempt: int) -> tuple[list[bool], list[bool]]:
        row = await conn.fetchrow(_sql.LOCKER_HELD, *arrays, timeout=CLEANUP_STATEMENT_TIMEOUT)
        assert row is not None  # a SELECT without FROM: always one row
        return list(row[0]), list(row[1])

    with Cleanup() as cleanup:
        ok, answer = await cleanup.run(ask)
    if not ok or answer is None:
        return None
    held = dict(zip(map(id, ints), answer[0], strict=True))
    held.update(zip(map(id, pairs), answer[1], strict=True))
    return held
