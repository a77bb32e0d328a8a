"""Every read of asyncpg's private attributes, behind small named functions.

aiopglock relies on a few details of asyncpg that it does not document: how
a pool's reset runs, when a proxy lets go of its connection, which loop an
object belongs to. Each is read here and nowhere else, defensively: when an
asyncpg release lacks an attribute, the function falls back to the answer
that needs no internals (an explicit unlock, no loop check, ...) and says so
once in the ``aiopglock`` logger at debug level. ``tests/test_asyncpg_internals.py``
pins the behaviour relied on, against a real server.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

__all__ = [
    "forget_top_transaction",
    "lease_of",
    "listening",
    "loop_of",
    "pool_has_free",
    "proxy_connection",
    "reset_unlocks",
    "wait_released",
]

logger = logging.getLogger("aiopglock")

_reported: set[str] = set()


def _private(obj: object, name: str) -> Any:
    """``obj.<name>``, an attribute asyncpg's stubs do not declare
    (AttributeError when this asyncpg lacks it)."""
    return getattr(obj, name)


def _set_private(obj: object, name: str, value: object) -> None:
    setattr(obj, name, value)


def _fallback(what: str, instead: str) -> None:
    """Say once per process that asyncpg lacked ``what``."""
    if what not in _reported:
        _reported.add(what)
        logger.debug("aiopglock: this asyncpg has no %s; %s", what, instead)


def proxy_connection(
    proxy: PoolConnectionProxy[Any],
) -> asyncpg.Connection[Any] | None:
    """The Connection behind a pool's proxy; None once the proxy is released
    (asyncpg clears ``_con`` on release)."""
    try:
        con: asyncpg.Connection[Any] | None = _private(proxy, "_con")
    except AttributeError:
        _fallback("PoolConnectionProxy._con", "the proxy is used as the connection")
        return None
    return con


def loop_of(db: object) -> asyncio.AbstractEventLoop | None:
    """The event loop a Pool or Connection (a pool's proxy too) belongs to, or
    None when asyncpg does not say (``_loop``, on Pool and Connection alike)."""
    if isinstance(db, PoolConnectionProxy):
        db = proxy_connection(db)
        if db is None:  # released
            return None
    loop = getattr(db, "_loop", None)
    if loop is None:
        _fallback("_loop on Pool and Connection", "the event loop is not checked")
    return loop if isinstance(loop, asyncio.AbstractEventLoop) else None


def pool_has_free(pool: asyncpg.Pool[Any]) -> bool:
    """Whether ``pool.acquire()`` would get a connection without waiting for
    another user to release one (it may still have to connect)."""
    queue = getattr(pool, "_queue", None)
    if isinstance(queue, asyncio.Queue):
        return not queue.empty()
    _fallback("Pool._queue", "free connections are counted from the public sizes")
    # Holders that are connected and in use cannot be handed out.
    in_use = pool.get_size() - pool.get_idle_size()
    return bool(pool.get_max_size() - in_use > 0)


def reset_unlocks(
    pool: asyncpg.Pool[Any],
    conn: PoolConnectionProxy[Any] | asyncpg.Connection[Any],
    raw: asyncpg.Connection[Any] | None,
) -> bool:
    """Whether returning ``conn`` to ``pool`` runs asyncpg's default reset,
    whose ``pg_advisory_unlock_all()`` releases the session's advisory locks
    before the connection can be handed out again. Not so with a custom
    ``reset=`` callback, a connection class whose reset query leaves advisory
    locks alone, or a connection the pool closes instead of resetting (used up
    by ``max_queries``, or expired)."""
    if raw is None:
        return False
    try:
        holder = _private(conn, "_holder")
        return bool(
            _private(pool, "_reset") is None
            and "pg_advisory_unlock_all()" in raw.get_reset_query()
            and _private(raw, "_protocol").queries_count < holder._max_queries
            and holder._generation == _private(pool, "_generation")
        )
    except AttributeError:
        _fallback(
            "pool holder, _reset, _max_queries, _generation or protocol queries_count",
            "locks are unlocked explicitly before the connection goes back",
        )
        return False


def wait_released(conn: PoolConnectionProxy[Any]) -> Awaitable[None] | None:
    """Something to await until a release of ``conn`` started by
    ``pool.release()`` (which asyncpg shields) has completed, or None when
    asyncpg does not say."""
    holder = getattr(conn, "_holder", None)
    wait = getattr(holder, "wait_until_released", None)
    if wait is None:
        _fallback("holder.wait_until_released()", "a shielded release is not waited for")
        return None
    released: Awaitable[None] = wait()
    return released


def lease_of(raw: asyncpg.Connection[Any]) -> object:
    """The pool's proxy through which ``raw`` is leased right now, or None.

    ``Connection._proxy`` is set when a pool hands the connection out and
    cleared once it is back in the pool, after the pool's reset has run."""
    if not hasattr(raw, "_proxy"):
        _fallback("Connection._proxy", "a lease is not told from the next one")
        return None
    return _private(raw, "_proxy")


def listening(raw: asyncpg.Connection[Any], channel: str) -> bool:
    """Whether asyncpg has a callback registered for ``channel`` on ``raw``
    (``Connection._listeners``), so its LISTEN stands. asyncpg registers a
    channel after LISTEN and forgets it before UNLISTEN; an interrupted
    ``add_listener()`` or ``remove_listener()`` leaves the LISTEN on the
    server with no callback. Without it: False (an UNLISTEN is sent)."""
    listeners = getattr(raw, "_listeners", None)
    if not isinstance(listeners, dict):
        _fallback("Connection._listeners", "the channel is unlistened after an interruption")
        return False
    return bool(listeners.get(channel))


def forget_top_transaction(raw: asyncpg.Connection[Any], tx: object) -> None:
    """Make asyncpg forget ``tx`` as the connection's top transaction.

    asyncpg records it (``Connection._top_xact``) before sending BEGIN and
    keeps it when BEGIN fails, after which every ``conn.transaction()`` would
    be taken for a savepoint outside any transaction."""
    if not hasattr(raw, "_top_xact"):
        _fallback("Connection._top_xact", "a failed BEGIN is not forgotten")
        return
    if _private(raw, "_top_xact") is tx:
        _set_private(raw, "_top_xact", None)
