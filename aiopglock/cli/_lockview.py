"""How ``aiopglock locks`` shows :class:`aiopglock.LockInfo` records: a table
that fits the terminal, one block per lock (``--expanded``), or JSON."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from datetime import datetime, timedelta

import click
from rich.console import Console
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from .._introspect import LockInfo
from ._output import console as new_console
from ._output import plain, visible
from ._render import NARROW, cut, fitted_table, pid_list, plural, seconds

__all__ = ["lock_json", "print_locks"]

WIDE = 120  # columns from which the table shows the application name too
# The columns that give way when the table is too wide, in this order, with
# the narrowest each goes to; after that the query is left out.
LOCKS_SHRINK = (("QUERY", 10), ("LOCK", 10), ("BLOCKED BY", 7))
NAME = 60  # the longest key name the table shows whole (JSON and -x show it all)


def _object(info: LockInfo) -> str:
    """What the lock is on, in a few words."""
    relation = info.relation
    if relation is None and info.relation_oid is not None:
        relation = f"oid {info.relation_oid}"
    if info.locktype == "advisory":
        if info.name is not None:  # the text key, in quotes (its int is in -x and --json)
            return repr(info.name if len(info.name) <= NAME else info.name[: NAME - 1] + "…")
        return f"{info.key!r}" if info.key is not None else f"{info.classid}/{info.objid}"
    if info.locktype == "tuple":
        return f"{relation} ({info.page},{info.tuple})"
    if info.locktype == "page":
        return f"{relation} page {info.page}"
    if relation is not None:
        return relation
    if info.locktype == "transactionid":
        return str(info.transactionid)
    if info.locktype == "virtualxid":
        return str(info.virtualxid)
    if info.classid is not None:
        return f"{info.classid}/{info.objid}/{info.objsubid}"
    return ""


def _mode(mode: str) -> str:
    return mode[: -len("Lock")] if mode.endswith("Lock") and mode != "Lock" else mode


def _status(info: LockInfo) -> Text:
    if info.granted:
        return Text("held")
    waited = seconds(info.wait_duration) if info.wait_duration is not None else "?"
    return Text(f"wait {waited}", style="bold red")


def _locks_table(infos: Sequence[LockInfo], width: int) -> Table:
    """Fits ``width``: pid, mode and status keep their width; the query is cut
    with an ellipsis, then the lock and its blockers wrap, and on a terminal too
    narrow for all that the query is left out. The application column is shown
    on a wide terminal only."""
    with_app = width >= WIDE
    rows: list[dict[str, Text]] = []
    for info in infos:
        row = {
            "PID": Text(str(info.pid)),
            "MODE": Text(_mode(info.mode)),
            "STATUS": _status(info),
            "LOCK": plain(f"{info.locktype} {_object(info)}".rstrip()),
            "BLOCKED BY": Text(pid_list(info.blocking_pids)),
        }
        if with_app:
            row["APP"] = cut(info.application_name)
        row["QUERY"] = cut(info.query)
        rows.append(row)
    waiting = sum(not info.granted for info in infos)
    caption = f"{plural(len(infos), 'lock')}, {waiting} waiting"
    return fitted_table(rows, width, LOCKS_SHRINK, caption)


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, timedelta):
        return f"{value.total_seconds():.3f} s"
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, list):
        return pid_list(value)
    return str(value)


def _expanded(console: Console, infos: Sequence[LockInfo]) -> None:
    """One block per lock, every field, like psql's ``\\x``."""
    if not infos:
        console.print("(no locks)")
    for number, info in enumerate(infos, 1):
        console.print(Rule(f"RECORD {number}", align="left", characters="-"))
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column(overflow="fold")
        for field in dataclasses.fields(info):
            # A query keeps its lines (and tabs); every other value is one line.
            keep = "\n\t" if field.name == "query" else ""
            grid.add_row(Text(field.name), Text(visible(_text(getattr(info, field.name)), keep)))
        console.print(grid)


def _jsonable(value: object) -> object:
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, tuple):
        return list(value)
    return value


def lock_json(info: LockInfo) -> dict[str, object]:
    """Every field of ``info``: timedeltas as seconds, datetimes in ISO 8601,
    a key pair as a list."""
    return {field.name: _jsonable(getattr(info, field.name)) for field in dataclasses.fields(info)}


def print_locks(infos: Sequence[LockInfo], *, as_json: bool, expanded: bool, compact: bool) -> None:
    """``infos`` on stdout: JSON (one line when ``compact``), one block per
    lock, or a table (blocks too on a terminal narrower than NARROW)."""
    if as_json:
        documents = [lock_json(info) for info in infos]
        if compact:
            click.echo(json.dumps(documents, separators=(",", ":")))
        else:
            click.echo(json.dumps(documents, indent=2))
        return
    console = new_console()
    if expanded or (infos and console.width < NARROW):
        _expanded(console, infos)
    elif infos:
        console.print(_locks_table(infos, console.width))
    else:
        console.print("(no locks)")
