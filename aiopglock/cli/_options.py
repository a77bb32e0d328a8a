"""Options and arguments shared by the commands: ``--dsn`` and process ids.

The DSN comes from ``--dsn`` (accepted before the command and after it), then
``DATABASE_URL``, then libpq's ``PG*`` variables (asyncpg reads them).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import click

from .._validate import PID_MAX, is_int

__all__ = ["Pid", "dsn_of", "dsn_option", "uses_libpq_env"]

F = TypeVar("F", bound=Callable[..., Any])


class Pid(click.ParamType[int]):
    """A server process id: an integer from ``minimum`` to 2**31 - 1."""

    name = "pid"

    def __init__(self, minimum: int = 1) -> None:
        self.minimum = minimum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if is_int(value):
            number = value
        else:
            try:
                number = int(str(value).strip(), 10)
            except ValueError:
                self.fail(f"{value!r} is not a process id", param, ctx)
        if not self.minimum <= number <= PID_MAX:
            self.fail(f"{value!r} is not a process id", param, ctx)
        return number


def dsn_of(ctx: click.Context) -> str | None:
    """--dsn, else DATABASE_URL, else None (asyncpg then reads libpq's PG* variables)."""
    dsn: str | None = ctx.obj.get("dsn") if ctx.obj else None
    return dsn or os.environ.get("DATABASE_URL") or None


def uses_libpq_env() -> bool:
    return any(os.environ.get(name) for name in ("PGHOST", "PGPORT", "PGDATABASE", "PGUSER"))


def _store_dsn(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        ctx.ensure_object(dict)["dsn"] = value
    return value


def dsn_option(fn: F) -> F:
    """``--dsn``, accepted before the command and after it."""
    option = click.option(
        "--dsn",
        metavar="DSN",
        expose_value=False,
        is_eager=True,
        callback=_store_dsn,
        help="PostgreSQL DSN (default: DATABASE_URL, then libpq's PG* variables).",
    )
    return option(fn)
