"""``aiopglock cancel|terminate PID…``: shows what each backend runs and asks
before signalling, unless ``--yes``; only the sessions shown are signalled."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg
import click
from rich.console import Console
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from .._introspect import cancel, describe_backends, signal_sessions, terminate
from ._connection import with_connection
from ._options import Pid, dsn_of, dsn_option
from ._output import console as new_console
from ._output import fail, one_line, plain, visible
from ._render import NARROW, cut, fitted_table, pid_list

__all__ = ["cancel_command", "terminate_command"]

# What each backend runs: the columns that give way when the table is too
# wide, in this order, with the narrowest each goes to.
BACKENDS_SHRINK = (("QUERY", 10), ("APP", 10), ("LOCKS", 8), ("DATABASE", 8), ("USER", 8))


class Declined(Exception):
    """Raised when a confirmation is answered no (or not at all)."""


def _locks_summary(backend: dict[str, Any]) -> str:
    held, waiting = backend["locks_held"], backend["locks_waiting"]
    summary = f"{held} held"
    if waiting:
        summary += f", {waiting} waiting"
        if backend["blocking_pids"]:
            summary += f" (blocked by {pid_list(backend['blocking_pids'])})"
    return summary


def _backends_table(backends: dict[int, dict[str, Any]], width: int) -> Table:
    rows: list[dict[str, Text]] = []
    for pid, backend in backends.items():
        rows.append(
            {
                "PID": Text(str(pid)),
                "USER": plain(backend["user"]),
                "DATABASE": plain(backend["database"]),
                "APP": cut(backend["application_name"]),
                "STATE": plain(backend["state"] or backend["backend_type"]),
                "LOCKS": Text(_locks_summary(backend)),
                "QUERY": cut(backend["query"]),
            }
        )
    return fitted_table(rows, width, BACKENDS_SHRINK)


def _backends_blocks(console: Console, backends: dict[int, dict[str, Any]]) -> None:
    """What each backend runs, one block each (a terminal too narrow for the table)."""
    for number, (pid, backend) in enumerate(backends.items(), 1):
        console.print(Rule(f"BACKEND {number}", align="left", characters="-"))
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column(overflow="fold")
        fields = {
            "pid": str(pid),
            "user": backend["user"] or "",
            "database": backend["database"] or "",
            "application": backend["application_name"] or "",
            "state": backend["state"] or backend["backend_type"] or "",
            "locks": _locks_summary(backend),
        }
        for name, value in fields.items():
            grid.add_row(Text(name), Text(visible(value)))
        grid.add_row(Text("query"), Text(visible(backend["query"] or "", "\n\t")))
        console.print(grid)


def _signal_command(ctx: click.Context, action: str, pids: tuple[int, ...], yes: bool) -> int:
    """``cancel`` / ``terminate``: exit 0 only when every pid given was signalled."""
    wanted = list(dict.fromkeys(pids))
    dsn = dsn_of(ctx)
    signal = cancel if action == "cancel" else terminate
    done = "cancelled" if action == "cancel" else "terminated"
    targets = wanted
    # Without --yes: the sessions shown, as (pid, backend_start), and only those
    # are signalled; a pid whose session ended or changed meanwhile is not.
    shown: dict[int, datetime] | None = None
    if not yes:
        backends = with_connection(dsn, lambda conn: describe_backends(conn, wanted))
        missing = [pid for pid in wanted if pid not in backends]
        if missing:
            fail(
                f"no backend of this server with pid {pid_list(missing)} "
                "(or it is this command's own)"
            )
        if not backends:
            return 1
        console = new_console()
        if console.width < NARROW:
            _backends_blocks(console, backends)
        else:
            console.print(_backends_table(backends, console.width))
        # A role that may signal a session but not read its statistics (a member
        # of pg_signal_backend only) sees no backend_start: such a session cannot
        # be told from a new one that took its pid, so it is not signalled.
        shown = {
            pid: backend["backend_start"]
            for pid, backend in backends.items()
            if backend["backend_start"] is not None
        }
        unknown = [pid for pid in backends if pid not in shown]
        if unknown:
            fail(
                f"not {done}: {pid_list(unknown)} (its backend_start is not visible to this "
                "role, so a new session that took its pid could not be told apart: "
                "grant it pg_read_all_stats, or use --yes)"
            )
        if not shown:
            return 1
        targets = list(shown)
        what = "the current query of" if action == "cancel" else ""
        question = f"{action.capitalize()} {what} {len(targets)} backend(s) ({pid_list(targets)})?"
        try:
            if not click.confirm(one_line(question), default=False, err=True):
                raise Declined
        except (click.Abort, Declined):
            click.echo(err=True)
            fail(f"not confirmed: nothing {done}")
            return 1

    async def go(conn: asyncpg.Connection[Any]) -> list[int]:
        if shown is not None:
            return await signal_sessions(conn, action, shown)
        return await signal(conn, *targets)

    signalled = with_connection(dsn, go)
    for pid in signalled:
        click.echo(f"{done} {pid}")
    if shown is not None:
        changed = [pid for pid in shown if pid not in signalled]
        if changed:
            fail(
                f"not {done}: {pid_list(changed)} (the session shown has ended, or its pid "
                "now belongs to another session, or no permission)"
            )
        return 0 if len(signalled) == len(wanted) else 1
    failed = [pid for pid in wanted if pid not in signalled]
    if failed:
        fail(
            f"not {done}: {pid_list(failed)} (no such backend on this server, "
            "or this command's own, or no permission)"
        )
        return 1
    return 0


_PID_ARGUMENT = click.argument("pids", metavar="PID...", nargs=-1, required=True, type=Pid())
_YES_OPTION = click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")

_CONFIRMATION = (
    "Without --yes, shows what each backend runs and asks; the answer is read from "
    "standard input (a terminal prompt, or one line when piped: y or yes confirms; "
    "anything else, or no input, declines). Exits 0 only when every PID was signalled."
)


@click.command(
    "cancel", help="Cancel the current query of backends (pg_cancel_backend). " + _CONFIRMATION
)
@dsn_option
@_YES_OPTION
@_PID_ARGUMENT
@click.pass_context
def cancel_command(ctx: click.Context, yes: bool, pids: tuple[int, ...]) -> int:
    return _signal_command(ctx, "cancel", pids, yes)


@click.command(
    "terminate",
    help="Terminate backends (pg_terminate_backend); their locks are released. " + _CONFIRMATION,
)
@dsn_option
@_YES_OPTION
@_PID_ARGUMENT
@click.pass_context
def terminate_command(ctx: click.Context, yes: bool, pids: tuple[int, ...]) -> int:
    return _signal_command(ctx, "terminate", pids, yes)
