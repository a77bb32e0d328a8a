"""``aiopglock locks``: the locks of the server, held and waited for, with
who blocks whom; once, or refreshed until stopped (``--watch``)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import sys
from datetime import datetime
from typing import Any

import anyio
import asyncpg
import click

from .._introspect import LOCK_TYPES, _check_relation, locks
from .._keys import key_from_text
from ._connection import with_connection
from ._lockview import print_locks
from ._options import Pid, dsn_of, dsn_option
from ._output import console as new_console

__all__ = ["locks_command"]


def _check_relation_option(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> str | None:
    """``--relation`` read as :func:`aiopglock.locks` reads it, before connecting."""
    if value is not None:
        try:
            _check_relation(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc).removeprefix("relation: "), ctx, param) from None
    return value


@click.command("locks")
@dsn_option
@click.option("--blocked", is_flag=True, help="Only lock requests still waiting.")
@click.option(
    "--pid",
    "pids",
    multiple=True,
    type=Pid(minimum=0),
    help="Only this backend (repeatable; 0: prepared transactions).",
)
@click.option(
    "--relation",
    metavar="[SCHEMA.]TABLE",
    callback=_check_relation_option,
    help="Only locks on this table (relation, page and tuple locks). Names are taken "
    "as written; a name that holds a dot goes in double quotes: '\"my.table\"', "
    '\'"my schema"."t"\'.',
)
@click.option(
    "--locktype",
    "locktypes",
    multiple=True,
    type=click.Choice(LOCK_TYPES),
    metavar="TYPE",
    help="Only this lock type of pg_locks (repeatable): " + ", ".join(LOCK_TYPES) + ".",
)
@click.option(
    "--key",
    metavar="KEY",
    help="Only advisory locks on this key, held and waited for: NAME (the text key, hashed as "
    "advisory_key() does), int:N (the int8 key), pair:A,B (the two-int4 key), or str:NAME "
    "(a text key that reads like a number or starts with int:, pair: or str:).",
)
@click.option("--database", metavar="NAME", help="Sessions of this database (default: the DSN's).")
@click.option(
    "-a", "--all-databases", is_flag=True, help="Sessions of every database of the server."
)
@click.option("--json", "as_json", is_flag=True, help="JSON: one object per lock, every field.")
@click.option("-x", "--expanded", is_flag=True, help="One block per lock, every field.")
@click.option(
    "--watch",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Refresh every SECONDS until Ctrl-C (or SIGTERM); exits 0.",
)
@click.pass_context
def locks_command(
    ctx: click.Context,
    blocked: bool,
    pids: tuple[int, ...],
    relation: str | None,
    locktypes: tuple[str, ...],
    key: str | None,
    database: str | None,
    all_databases: bool,
    as_json: bool,
    expanded: bool,
    watch: float | None,
) -> int:
    """Show the locks of the server: every type, held and waited for, with who blocks whom.

    Sessions of the DSN's database by default; the command's own locks are left out.
    """
    if as_json and expanded:
        raise click.UsageError("--json and --expanded cannot be used together", ctx)
    if database is not None and all_databases:
        raise click.UsageError("--database and --all-databases cannot be used together", ctx)
    if watch is not None and not math.isfinite(watch):
        raise click.BadParameter("expected a finite number of seconds", ctx, param_hint="--watch")
    lock_key = None
    if key is not None:
        if relation:
            raise click.UsageError("--key and --relation cannot be used together", ctx)
        if locktypes and "advisory" not in locktypes:
            raise click.UsageError("--key needs --locktype advisory among the lock types", ctx)
        try:
            lock_key = key_from_text(key)
        except ValueError as exc:
            message = str(exc).removeprefix("key: ")
            raise click.BadParameter(message, ctx, param_hint="--key") from None
    filters: dict[str, Any] = {
        "pids": list(pids) or None,
        "blocked": blocked,
        "relation": relation or None,
        "locktype": list(locktypes) or None,
        "database": database,
        "all_databases": all_databases,
        "key": lock_key,
    }
    dsn = dsn_of(ctx)
    if watch is None:

        async def once(conn: asyncpg.Connection[Any]) -> None:
            infos = await locks(conn, **filters)
            print_locks(infos, as_json=as_json, expanded=expanded, compact=False)

        with_connection(dsn, once)
        return 0

    interval = watch

    async def forever(conn: asyncpg.Connection[Any]) -> None:
        # SIGTERM (`timeout`, a service manager) ends the watch as Ctrl-C does:
        # after the refresh under way, the connection closed, exit status 0.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # (No signal handlers on Windows' event loops: Ctrl-C still works there.)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, stop.set)
        console = new_console()
        try:
            while not stop.is_set():
                infos = await locks(conn, **filters)
                if as_json:
                    print_locks(infos, as_json=True, expanded=False, compact=True)
                else:
                    if console.is_terminal:
                        console.clear()
                    stamp = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S")
                    console.print(
                        f"Every {interval:g}s: aiopglock locks    {stamp}   (Ctrl-C to stop)"
                    )
                    print_locks(infos, as_json=False, expanded=expanded, compact=False)
                sys.stdout.flush()
                with anyio.move_on_after(interval):
                    await stop.wait()
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signal.SIGTERM)

    try:
        with_connection(dsn, forever)
    except KeyboardInterrupt:
        return 0
    return 0
