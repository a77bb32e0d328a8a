"""Where a lock is about to be taken, and how aiopglock's own connections are opened.

Two kinds of server make a lock meaningless, and both are refused with
:class:`aiopglock.UsageError` before anything is held:

- **A pooler in transaction mode** (PgBouncer, pgcat, Supavisor, RDS Proxy)
  hands each transaction to whichever server session is free, so a
  session-level lock is taken on one backend and checked or released on
  another. Seen from the client, the pid the server announced at startup
  (``get_server_pid()``; a pooler makes one up) differs from
  ``pg_backend_pid()``. ``aiopglock.configure(session_pooler=True)``
  declares a session-mode pooler, where each client keeps one backend and
  session locks are valid.
- **A hot standby** (a server in recovery): its locks exclude nothing on the
  primary. PostgreSQL 14 and later report ``in_hot_standby`` at startup and
  whenever it changes (asyncpg: ``get_settings()``), at no cost.

Cost: the pid comparison needs one query, ``pg_backend_pid()`` (with
``pg_is_in_recovery()`` for servers older than 14), sent once per physical
connection and remembered for that connection's life (weakly, keyed by the
raw asyncpg Connection, so a pool's connections are asked once each). The
answer cannot change while the connection lives: it goes through a pooler or
it does not. Folding the check into every lock statement would save that one
query per connection, at the price of a second form of every statement
(plain, try, timed, in a transaction, the Locker's batches); a check beside
them covers every form with one call.

Connections aiopglock opens itself (``prioritize(via=dsn)``, ``Watchdog``
via a DSN, the command line) ask the server for TCP keepalives
(:data:`KEEPALIVE_SETTINGS`): a client that vanishes without closing its
socket (a killed VM, a dropped network) is noticed by the server, which ends
its session and releases its locks, within about a minute (30 s idle, then
3 probes 10 s apart) instead of the kernel's default of more than two hours.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Mapping
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from ._concurrency import Cleanup, mark_retrieved
from ._conntypes import Conn, Pool
from ._db import CLEANUP_STATEMENT_TIMEOUT, raw_connection
from ._db import session_pooler as session_pooler_declared
from ._errors import UsageError

__all__ = ["KEEPALIVE_SETTINGS", "check_lock_target", "check_pooled", "connect_owned"]

logger = logging.getLogger("aiopglock")

#: The server settings of every connection aiopglock opens itself: the server
#: probes an idle client after 30 s, every 10 s, and gives up after 3 missed
#: answers, so a vanished client's session (and its locks) ends within about
#: a minute. Ignored by the server on a Unix-domain socket.
KEEPALIVE_SETTINGS: Mapping[str, str] = {
    "tcp_keepalives_idle": "30",
    "tcp_keepalives_interval": "10",
    "tcp_keepalives_count": "3",
}

# One round trip per physical connection: the backend that serves it, and
# whether the server is in recovery (servers older than 14 do not report it).
PROBE = "SELECT pg_catalog.pg_backend_pid(), pg_catalog.pg_is_in_recovery()"


class _Probe:
    __slots__ = ("backend_pid", "in_recovery", "startup_pid")

    def __init__(self, startup_pid: int, backend_pid: int, in_recovery: bool) -> None:
        self.startup_pid = startup_pid
        self.backend_pid = backend_pid
        self.in_recovery = in_recovery

    @property
    def pooled(self) -> bool:
        return self.startup_pid != self.backend_pid


_probes: weakref.WeakKeyDictionary[asyncpg.Connection[Any], _Probe] = weakref.WeakKeyDictionary()


def _standby_error() -> UsageError:
    return UsageError(
        "the server is a hot standby (in recovery): a lock taken there excludes "
        "nothing on the primary or on other replicas; take locks on the primary"
    )


def _pooler_error(probe: _Probe) -> UsageError:
    return UsageError(
        "this connection goes through a connection pooler (the server process is "
        f"pid {probe.backend_pid}, the pid announced at startup was {probe.startup_pid}): "
        "in transaction mode it hands each transaction to any server session, so a "
        "session-level advisory lock would exclude nothing; use a transaction-level "
        "lock, aiopglock.advisory(..., xact=True) (or table() / rows()), or, if the "
        "pooler runs in session mode, declare it with "
        "aiopglock.configure(session_pooler=True)"
    )


async def _probe(conn: Conn, raw: asyncpg.Connection[Any]) -> _Probe:
    """Ask the server once. The query runs to its end even if the caller is
    cancelled meanwhile (so no CancelRequest can land on a later statement,
    and a caller's transaction is never aborted by it); the cancellation is
    re-raised afterwards."""
    # A Record: with no FROM the query returns one row, always (never None).
    fut: asyncio.Future[Any] = asyncio.ensure_future(
        conn.fetchrow(PROBE, timeout=CLEANUP_STATEMENT_TIMEOUT)
    )
    fut.add_done_callback(mark_retrieved)
    failure: Exception | None = None
    with Cleanup(lazy=True) as cleanup:
        try:
            row = await cleanup.wait(fut)
        except Exception as exc:
            failure = exc
    # Raised after the cleanup's exit, which raises a cancellation met
    # meanwhile: that outranks the failure.
    if failure is not None:
        raise failure
    probe = _Probe(raw.get_server_pid(), int(row[0]), bool(row[1]))
    if probe.pooled:
        logger.debug(
            "aiopglock: connection pid %s is served by backend %s: a pooler",
            probe.startup_pid,
            probe.backend_pid,
        )
    return probe


async def check_lock_target(conn: Conn, *, session: bool) -> None:
    """Refuse (``UsageError``) a lock that would exclude nothing on ``conn``:
    any lock on a hot standby, and a session-level lock (``session``) behind
    a pooler, unless ``configure(session_pooler=True)`` declared one that
    works in session mode. No round trip once ``conn``'s physical connection
    has been asked (a server of version 14 or later reports standby status
    itself, so transaction-level locks never need one there).

    Example::

        await check_lock_target(conn, session=not xact)  # before the lock statement
    """
    raw = raw_connection(conn)
    if raw is None:
        return  # a released proxy: the lock statement raises asyncpg's own error
    standby = getattr(raw.get_settings(), "in_hot_standby", None)
    if standby == "on":
        raise _standby_error()
    check_pooler = session and not session_pooler_declared()
    if standby is not None and not check_pooler:
        return
    probe = _probes.get(raw)
    if probe is None:
        probe = await _probe(conn, raw)
        # A standby of an old server may be promoted: remember only a primary.
        if not probe.in_recovery:
            _probes[raw] = probe
    if standby is None and probe.in_recovery:
        raise _standby_error()
    if check_pooler and probe.pooled:
        raise _pooler_error(probe)


async def check_pooled(pool: Pool | None, conn: Conn, *, session: bool = True) -> None:
    """:func:`check_lock_target` for a connection just taken from ``pool``
    (or a caller's, with ``pool`` None); on refusal (or any failure) a
    pool's connection goes back to it first.

    Example::

        conn = await pool.acquire()
        await check_pooled(pool, conn)  # a Locker's holder connection
    """
    if pool is None:
        await check_lock_target(conn, session=session)
        return
    try:
        await check_lock_target(conn, session=session)
    except BaseException:
        with Cleanup() as cleanup:
            if isinstance(conn, PoolConnectionProxy):  # a pool's lease
                await cleanup.give_back(pool, conn, discard=False)
            raise  # the exception in flight outranks a cancellation met here


def owned_settings(server_settings: Mapping[str, str] | None = None) -> dict[str, str]:
    """:data:`KEEPALIVE_SETTINGS` with ``server_settings`` on top."""
    settings = dict(KEEPALIVE_SETTINGS)
    if server_settings:
        settings.update(server_settings)
    return settings


async def connect_owned(dsn: str | None, **kwargs: Any) -> asyncpg.Connection[Any]:
    """``asyncpg.connect(dsn, **kwargs)`` for a connection aiopglock opens
    itself: with :data:`KEEPALIVE_SETTINGS` added to ``server_settings``.
    A pooler that refuses unknown startup parameters (PgBouncer without
    ``ignore_startup_parameters``) gets a second try without them: its own
    ``tcp_keepalive`` settings then apply.

    Example::

        conn = await connect_owned(dsn, server_settings={"application_name": "x"})
    """
    given = kwargs.pop("server_settings", None)
    try:
        conn: asyncpg.Connection[Any] = await asyncpg.connect(
            dsn, server_settings=owned_settings(given), **kwargs
        )
    except asyncpg.ProtocolViolationError as exc:
        if "startup parameter" not in str(exc):
            raise
        logger.debug("aiopglock: the server refused keepalive settings (%s): retrying", exc)
        conn = await asyncpg.connect(dsn, server_settings=given, **kwargs)
    return conn
