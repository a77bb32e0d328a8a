"""The command line's connection: one per command, opened with one readable
line for every way that fails (see :class:`ConnectFailed`)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import anyio
import asyncpg

from .._server import connect_owned

__all__ = [
    "CONNECT_TIMEOUT",
    "ConnectFailed",
    "connect",
    "with_connection",
]

CONNECT_TIMEOUT = 10.0

T = TypeVar("T")


class ConnectFailed(Exception):
    """Raised when the server cannot be reached, or the DSN cannot be read."""


async def connect(dsn: str | None) -> asyncpg.Connection[Any]:
    """A new connection to ``dsn``; :class:`ConnectFailed` when the server
    cannot be reached or the DSN cannot be used."""
    try:
        conn: asyncpg.Connection[Any] = await connect_owned(dsn, timeout=CONNECT_TIMEOUT)
    except asyncpg.PostgresError:
        raise  # the server answered (no such database, authentication failed, …)
    except (OSError, asyncio.TimeoutError) as exc:
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, asyncio.TimeoutError) and not str(exc):
            reason = f"no answer within {CONNECT_TIMEOUT:g} s"
        raise ConnectFailed(f"cannot connect to PostgreSQL: {reason}") from None
    except ValueError as exc:  # asyncpg's ClientConfigurationError is one too
        raise ConnectFailed(f"cannot use the DSN: {exc}") from None
    except asyncpg.exceptions.TargetServerAttributeNotMatched as exc:
        # target_session_attrs=standby (or primary...) and no server matched
        raise ConnectFailed(f"cannot connect to PostgreSQL: {exc}") from None
    return conn


def _ports(dsn: str | None) -> list[tuple[str, str]]:
    """The ports a connection would use, as written, each with where it comes
    from: the DSN's hosts (``host:port,host:port``), its ``?port=``, else
    ``PGPORT`` (asyncpg's rules). A DSN that cannot be split is left to asyncpg."""
    found: list[tuple[str, str]] = []
    if dsn:
        try:
            parts = urlsplit(dsn)
        except ValueError:
            return []
        for spec in parts.netloc.rpartition("@")[2].split(","):
            if spec.startswith("["):  # [IPv6]:port
                port = spec.partition("]")[2].removeprefix(":")
            else:
                port = spec.partition(":")[2]
            if port:
                found.append(("the DSN", unquote(port)))
        for value in parse_qs(parts.query).get("port", []):
            found.extend(("the DSN", port) for port in value.split(","))
    if not found and os.environ.get("PGPORT"):
        found.extend(("PGPORT", port) for port in os.environ["PGPORT"].split(","))
    return found


def _check_ports(dsn: str | None) -> None:
    for source, port in _ports(dsn):
        if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            raise ConnectFailed(
                f"cannot use {source}: port {port!r} is not a number from 1 to 65535"
            )


def with_connection(dsn: str | None, work: Callable[[asyncpg.Connection[Any]], Awaitable[T]]) -> T:
    """Run ``work(connection)`` on a new connection, in a fresh event loop."""
    _check_ports(dsn)

    async def go() -> T:
        try:
            conn = await connect(dsn)
        except OverflowError as exc:  # a port out of range that _check_ports missed
            raise ConnectFailed(f"cannot use the DSN: {exc}") from None
        try:
            return await work(conn)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await conn.close()

    return asyncio.run(go())
