"""A ``timeout`` (its one meaning is :func:`aiopglock._validate.parse_timeout`)
translated to ``lock_timeout``, and the setting scopes ``lock_timeout()`` /
``statement_timeout()``."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, TypeVar, cast

import asyncpg

from . import _otel, _sql
from ._concurrency import Cleanup
from ._conntypes import Conn, Pool
from ._db import CLEANUP_STATEMENT_TIMEOUT, DB, check_db, resolve_db, terminate
from ._decorate import target
from ._errors import UsageError
from ._handles import Entered
from ._validate import parse_timeout

__all__ = [
    "Timeout",
    "TimeoutScope",
    "lock_timeout",
    "statement_timeout",
    "to_milliseconds",
]

logger = logging.getLogger("aiopglock")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

Timeout = int | float | timedelta | None


def to_milliseconds(seconds: float) -> str:
    """A positive timeout as a ``lock_timeout`` setting: whole milliseconds,
    rounded up and at least 1 (``0`` would mean *no* timeout to PostgreSQL)."""
    return f"{max(1, math.ceil(seconds * 1000))}ms"


# -- setting scopes: aiopglock.lock_timeout / aiopglock.statement_timeout ----


def _scope_value(value: object, name: str) -> str:
    """A scope's timeout as the setting's text: ``None`` -> ``"0"`` (no limit)."""
    seconds = parse_timeout(value, "timeout")
    if seconds is None:
        return "0"
    if seconds == 0:
        raise ValueError(
            f"timeout: 0 is ambiguous for {name}() (elsewhere in aiopglock it means "
            "'never wait', to PostgreSQL it means 'no limit'); pass None for no limit "
            "or a positive number of seconds"
        )
    return to_milliseconds(seconds)


class _ScopeState:
    """One entry of a scope: what to restore, and where."""

    __slots__ = ("conn", "local", "previous", "started")

    def __init__(self, conn: Conn, local: bool) -> None:
        self.conn = conn
        self.local = local
        self.previous: str | None = None
        self.started: datetime | None = None  # the transaction's now(), for a local setting


class TimeoutScope:
    """A setting (``lock_timeout`` or ``statement_timeout``) scoped to a block,
    built by :func:`aiopglock.lock_timeout` / :func:`aiopglock.statement_timeout`.

    An async context manager and a decorator for coroutine functions; it holds
    only configuration, so every entry and every call has its own state.
    ``setting`` names the setting, ``value`` is the text it is set to.

    Example::

        @aiopglock.statement_timeout(30, db=lambda: conn)
        async def report() -> None: ...

        async with aiopglock.lock_timeout(2, db=conn):
            await conn.execute("ALTER TABLE t ADD COLUMN c int")
    """

    __slots__ = ("_active", "_db", "setting", "value")

    def __init__(self, setting: str, timeout: Timeout, db: DB | None) -> None:
        if setting not in ("lock_timeout", "statement_timeout"):  # pragma: no cover
            raise ValueError(f"setting: {setting!r} cannot be scoped")
        self.setting = setting
        self.value = _scope_value(timeout, setting)
        if isinstance(db, asyncpg.Pool):
            raise TypeError(_pool_message(setting))
        check_db(db)
        self._db = db
        self._active: Entered[_ScopeState] = Entered()

    def __repr__(self) -> str:
        return f"aiopglock.{self.setting}({self.value!r})"

    def _connection(self) -> Conn:
        conn: Conn | Pool = resolve_db(self._db)
        if isinstance(conn, asyncpg.Pool):
            raise UsageError(_pool_message(self.setting))
        return conn

    async def _enter(self) -> _ScopeState:
        conn = self._connection()
        state = _ScopeState(conn, local=conn.is_in_transaction())
        # Read the previous value first: if setting it is then interrupted,
        # what to restore is known.
        if state.local:
            # One row, always (no FROM): a Record, never None.
            state.previous, state.started = cast(
                asyncpg.Record, await conn.fetchrow(_sql.CURRENT_SETTING_AND_NOW, self.setting)
            )
        else:
            state.previous = await conn.fetchval(_sql.CURRENT_SETTING, self.setting)
        try:
            await conn.fetchval(_sql.SET_SETTING, self.setting, self.value, state.local)
        except BaseException:
            # Maybe set, maybe not: restore (the exception in flight outranks
            # a cancellation met here).
            with Cleanup() as cleanup:
                await self._restore(state, cleanup)
                raise
        return state

    async def _exit(self, state: _ScopeState) -> None:
        with Cleanup() as cleanup:
            await self._restore(state, cleanup)

    async def _restore(self, state: _ScopeState, cleanup: Cleanup) -> None:
        """Put the previous value back. A session value that cannot be put back
        makes the connection unusable: it is terminated, never reused."""
        conn = state.conn
        setting = self.setting
        if state.local:
            if not conn.is_in_transaction():
                return  # the transaction ended, and its local value with it

            async def local_step(attempt: int) -> None:
                # An aborted transaction's local value ends with it.
                with contextlib.suppress(asyncpg.InFailedSQLTransactionError):
                    await conn.fetchval(
                        _sql.RESTORE_LOCAL_SETTING,
                        setting,
                        state.previous,
                        state.started,
                        timeout=CLEANUP_STATEMENT_TIMEOUT,
                    )

            ok, _ = await cleanup.run(local_step)
        else:
            if conn.is_in_transaction():
                logger.warning(
                    "%s scope exits inside a transaction opened in the block: "
                    "restoring the session value there (a rollback would undo it)",
                    setting,
                    extra=_otel.log_fields(kind=setting, outcome="restored_in_transaction"),
                )

            async def session_step(attempt: int) -> None:
                await conn.fetchval(
                    _sql.SET_SETTING,
                    setting,
                    state.previous,
                    False,
                    timeout=CLEANUP_STATEMENT_TIMEOUT,
                )

            ok, _ = await cleanup.run(session_step)
        if not ok and not conn.is_closed():
            logger.warning(
                "could not restore %s to %r; terminating its connection",
                setting,
                state.previous,
                extra=_otel.log_fields(kind=setting, outcome="discarded"),
            )
            terminate(conn)

    async def __aenter__(self) -> TimeoutScope:
        state = await self._enter()
        self._active.push(state)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._exit(self._active.pop())

    def __call__(self, fn: F) -> F:
        # A functools.partial, a staticmethod or a classmethod is accepted too.
        decorated = target(fn, f"aiopglock.{self.setting}")
        scope = self
        call = decorated.fn

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            state = await scope._enter()
            try:
                return await call(*args, **kwargs)
            finally:
                await scope._exit(state)

        return cast(F, decorated.finish(wrapper))


def _pool_message(setting: str) -> str:
    return (
        f"db: {setting}() scopes a setting of one connection, and a Pool would "
        "lend a random one; pass a Connection (e.g. from `async with pool.acquire() "
        "as conn`)"
    )


def lock_timeout(timeout: Timeout, *, db: DB | None = None) -> TimeoutScope:
    """Scope ``lock_timeout`` to a block (async context manager or decorator).

    ``timeout``: seconds (int/float) or a ``timedelta`` > 0, rounded up to
    whole milliseconds; ``None`` for no limit (the setting's ``0``); ``0`` is
    a ``ValueError`` (PostgreSQL reads it as "no limit", aiopglock elsewhere
    as "never wait"). ``db``: a Connection (a pool's proxy too), or a callable
    returning one, or the configured default; a Pool is refused.

    Inside a transaction the value is set with ``set_config(..., true)`` (it
    ends with the transaction at the latest); outside, as the session's value.
    Either way the exact previous value is restored at exit, through nested
    scopes, errors and cancellation; a session value that cannot be restored
    gets the connection terminated rather than reused.

    Example::

        async with pool.acquire() as conn:
            async with aiopglock.lock_timeout(2, db=conn):
                await conn.execute("ALTER TABLE orders ADD COLUMN note text")
    """
    return TimeoutScope("lock_timeout", timeout, db)


def statement_timeout(timeout: Timeout, *, db: DB | None = None) -> TimeoutScope:
    """Scope ``statement_timeout`` to a block (async context manager or decorator).

    Same rules as :func:`aiopglock.lock_timeout`: a positive timeout or
    ``None`` (no limit); ``0`` is a ``ValueError``; a Connection, never a
    Pool; the exact previous value restored at exit.

    Example::

        async with aiopglock.statement_timeout(0.5, db=conn):
            rows = await conn.fetch("SELECT * FROM big_report")
    """
    return TimeoutScope("statement_timeout", timeout, db)
