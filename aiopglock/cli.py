"""The ``aiopglock`` command line (also ``python -m aiopglock``).

The only module of the package that prints.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

import asyncpg

from ._errors import Error

__all__ = ["main"]


def _dsn(args: argparse.Namespace) -> str | None:
    """--dsn, else DATABASE_URL, else None (asyncpg then reads libpq's PG* variables)."""
    return args.dsn or os.environ.get("DATABASE_URL") or None


def _uses_libpq_env() -> bool:
    return any(os.environ.get(name) for name in ("PGHOST", "PGPORT", "PGDATABASE", "PGUSER"))


def _demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo
    from ._embedded import embedded_postgres

    def say(line: str) -> None:
        print(line, flush=True)

    dsn = _dsn(args)
    if dsn is None and not _uses_libpq_env():
        say("No DSN given (--dsn, DATABASE_URL or PG* variables): starting an embedded PostgreSQL.")
        with embedded_postgres() as embedded:
            asyncio.run(run_demo(embedded, say))
        say("Embedded PostgreSQL stopped and deleted.")
    else:
        asyncio.run(run_demo(dsn, say))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aiopglock", description="PostgreSQL locks for asyncio services."
    )
    parser.add_argument("--dsn", help="PostgreSQL DSN (default: DATABASE_URL, then PG* variables)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="a narrated run of every feature (embedded PostgreSQL when no DSN is given)"
    )
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Example::

        $ aiopglock demo
        $ python -m aiopglock --dsn postgresql://postgres@localhost/test demo
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="  (log) %(name)s: %(message)s")
    try:
        return int(args.run(args))
    except (
        Error,
        OSError,
        asyncio.TimeoutError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
    ) as exc:
        print(f"aiopglock: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
