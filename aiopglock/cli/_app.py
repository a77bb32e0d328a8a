"""The commands of ``aiopglock`` (see :mod:`aiopglock.cli`), on click and rich.

- ``aiopglock locks``: a table of :func:`aiopglock.locks` that fits the
  terminal, ``--expanded`` (one record per block), ``--json``, ``--watch``.
- ``aiopglock cancel|terminate PID…``: shows what each backend runs and asks
  before signalling, unless ``--yes``.
- ``aiopglock demo``: the narrated demo.

The DSN comes from ``--dsn``, then ``DATABASE_URL``, then libpq's ``PG*``
variables (asyncpg reads them). Every failure is one line on stderr.

Everything that comes from the server (queries, application, user, database
and table names, error messages) is shown as plain text: never read as rich
markup, and with control characters (escape sequences, carriage returns,
bidirectional overrides) shown as Python escapes (``\\x1b``), so that nobody
who can name a session or send a query can hide, spoof or restyle the output.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import anyio
import asyncpg
import click
from rich import box
from rich.console import Console
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from .._errors import Error
from .._introspect import (
    LOCK_TYPES,
    LockInfo,
    _check_relation,
    cancel,
    describe_backends,
    key_from_text,
    locks,
    signal_sessions,
    terminate,
)
from .._server import connect_owned
from .._validate import PID_MAX, is_int

__all__ = ["run"]

PROG = "aiopglock"
CONNECT_TIMEOUT = 10.0
WIDE = 120  # columns from which `locks` shows the application name too
NARROW = 60  # below this, `locks` shows each lock as a block (like psql's \\x auto)

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class Declined(Exception):
    """Raised when a confirmation is answered no (or not at all)."""


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


# --------------------------------------------------------------------------- plumbing


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# What a terminal would act on rather than show: C0 and C1 controls, DEL, and
# the bidirectional marks, embeddings, overrides and isolates, and the Unicode
# line and paragraph separators.
_CONTROLS = re.compile(
    r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029]"
)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _visible(text: str, keep: str = "") -> str:
    """``text`` with every control character (except those in ``keep``) shown
    as a Python escape: ``"\\x1b[31m"`` is printed as those eight characters."""
    return _CONTROLS.sub(lambda m: m.group() if m.group() in keep else _escape(m), text)


def _plain(text: str | None, **options: Any) -> Text:
    """Text from the server, as a rich ``Text``: no markup, no emoji codes, and
    no control characters."""
    return Text(_visible(text or ""), **options)


def _fail(message: str) -> None:
    click.echo(f"{PROG}: {_visible(_one_line(message))}", err=True)


def _console() -> Console:
    # Width: the terminal's, else $COLUMNS, else 80 (rich's rules).
    return Console(highlight=False, soft_wrap=False)


def _dsn(ctx: click.Context) -> str | None:
    """--dsn, else DATABASE_URL, else None (asyncpg then reads libpq's PG* variables)."""
    dsn: str | None = ctx.obj.get("dsn") if ctx.obj else None
    return dsn or os.environ.get("DATABASE_URL") or None


def _uses_libpq_env() -> bool:
    return any(os.environ.get(name) for name in ("PGHOST", "PGPORT", "PGDATABASE", "PGUSER"))


class ConnectFailed(Exception):
    """Raised when the server cannot be reached, or the DSN cannot be read."""


async def _connect(dsn: str | None) -> asyncpg.Connection[Any]:
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


def _with_connection(dsn: str | None, work: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``work(connection)`` on a new connection, in a fresh event loop."""
    _check_ports(dsn)

    async def go() -> T:
        try:
            conn = await _connect(dsn)
        except OverflowError as exc:  # a port out of range that _check_ports missed
            raise ConnectFailed(f"cannot use the DSN: {exc}") from None
        try:
            return await work(conn)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await conn.close()

    return asyncio.run(go())


def _store_dsn(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        ctx.ensure_object(dict)["dsn"] = value
    return value


def _dsn_option(fn: F) -> F:
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


# --------------------------------------------------------------------------- formatting


def _seconds(value: timedelta) -> str:
    total = value.total_seconds()
    if total < 60:
        return f"{total:.1f}s"
    minutes, seconds = divmod(int(total), 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    return f"{hours // 24}d{hours % 24:02d}h"


def _object(info: LockInfo) -> str:
    """What the lock is on, in a few words."""
    relation = info.relation
    if relation is None and info.relation_oid is not None:
        relation = f"oid {info.relation_oid}"
    if info.locktype == "advisory":
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
    waited = _seconds(info.wait_duration) if info.wait_duration is not None else "?"
    return Text(f"wait {waited}", style="bold red")


def _pids(pids: Sequence[int]) -> str:
    return ", ".join(str(pid) for pid in pids)


def _cut(text: str | None) -> Text:
    """One line, cut with an ellipsis where the column is narrower (the widest
    columns give way first when the table must fit the terminal)."""
    return _plain(_one_line(text or ""), no_wrap=True, overflow="ellipsis")


def _table(caption: str | None = None) -> Table:
    return Table(
        box=box.SIMPLE_HEAD,
        padding=(0, 1, 0, 0),
        pad_edge=False,
        show_edge=False,
        header_style="bold",
        caption=caption,
        caption_justify="left",
    )


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


GAP = 2  # between two columns: one of padding, one of the (blank) rule
# `locks`: the columns that give way when the table is too wide, in this order,
# with the narrowest each goes to; after that the query is left out.
LOCKS_SHRINK = (("QUERY", 10), ("LOCK", 10), ("BLOCKED BY", 7))
# `cancel` / `terminate`: what each backend runs.
BACKENDS_SHRINK = (("QUERY", 10), ("APP", 10), ("LOCKS", 8), ("DATABASE", 8), ("USER", 8))
WRAPPED = frozenset({"LOCK", "BLOCKED BY", "LOCKS", "DATABASE", "USER"})


def _column_widths(
    natural: dict[str, int], width: int, shrink: Sequence[tuple[str, int]]
) -> dict[str, int]:
    """Each column's width for a table of at most ``width`` columns: the natural
    widths (the widest cell or header) where they fit; else the ``shrink``
    columns give way in order, each down to its narrowest; then the QUERY
    column goes and what it leaves is given back. The other columns keep their
    width (rich squeezes the rest if even they do not fit)."""
    widths = dict(natural)

    def excess() -> int:
        return sum(widths.values()) + GAP * (len(widths) - 1) - width

    for name, narrowest in shrink:
        if excess() > 0 and name in widths:
            widths[name] = max(min(narrowest, natural[name]), widths[name] - excess())
    if excess() > 0 and "QUERY" in widths:
        del widths["QUERY"]
        for name, _ in reversed(shrink):
            if name in widths and excess() < 0:
                widths[name] = min(natural[name], widths[name] - excess())
    return widths


def _fitted_table(
    rows: Sequence[dict[str, Text]],
    width: int,
    shrink: Sequence[tuple[str, int]],
    caption: str | None = None,
) -> Table:
    """A table of ``rows`` (column name -> cell, every row the same names) no
    wider than ``width``: one-line cells are cut with an ellipsis, the WRAPPED
    columns wrap."""
    natural = {name: len(name) for name in rows[0]} if rows else {}
    for row in rows:
        for name, cell in row.items():
            natural[name] = max(natural[name], cell.cell_len)
    if "APP" in natural:
        natural["APP"] = min(natural["APP"], 24)
    widths = _column_widths(natural, width, shrink)
    table = _table(caption)
    for name, column_width in widths.items():
        table.add_column(
            name,
            width=column_width,
            justify="right" if name == "PID" else "left",
            no_wrap=name not in WRAPPED,
            overflow="fold" if name in WRAPPED else "ellipsis",
        )
    for row in rows:
        table.add_row(*(row[name] for name in widths))
    return table


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
            "LOCK": _plain(f"{info.locktype} {_object(info)}".rstrip()),
            "BLOCKED BY": Text(_pids(info.blocking_pids)),
        }
        if with_app:
            row["APP"] = _cut(info.application_name)
        row["QUERY"] = _cut(info.query)
        rows.append(row)
    waiting = sum(not info.granted for info in infos)
    caption = f"{_plural(len(infos), 'lock')}, {waiting} waiting"
    return _fitted_table(rows, width, LOCKS_SHRINK, caption)


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, timedelta):
        return f"{value.total_seconds():.3f} s"
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, list):
        return _pids(value)
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
            grid.add_row(Text(field.name), Text(_visible(_text(getattr(info, field.name)), keep)))
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


def _print_locks(
    infos: Sequence[LockInfo], *, as_json: bool, expanded: bool, compact: bool
) -> None:
    if as_json:
        documents = [lock_json(info) for info in infos]
        if compact:
            click.echo(json.dumps(documents, separators=(",", ":")))
        else:
            click.echo(json.dumps(documents, indent=2))
        return
    console = _console()
    if expanded or (infos and console.width < NARROW):
        _expanded(console, infos)
    elif infos:
        console.print(_locks_table(infos, console.width))
    else:
        console.print("(no locks)")


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


# --------------------------------------------------------------------------- commands


@click.group(
    name=PROG,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="PostgreSQL locks for asyncio services: see and free the locks of a server.",
)
@_dsn_option
@click.version_option(package_name="aiopglock", prog_name=PROG)
def app() -> None:
    pass


@app.command("locks")
@_dsn_option
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
    dsn = _dsn(ctx)
    if watch is None:

        async def once(conn: Any) -> None:
            infos = await locks(conn, **filters)
            _print_locks(infos, as_json=as_json, expanded=expanded, compact=False)

        _with_connection(dsn, once)
        return 0

    interval = watch

    async def forever(conn: Any) -> None:
        # SIGTERM (`timeout`, a service manager) ends the watch as Ctrl-C does:
        # after the refresh under way, the connection closed, exit status 0.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # (No signal handlers on Windows' event loops: Ctrl-C still works there.)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, stop.set)
        console = _console()
        try:
            while not stop.is_set():
                infos = await locks(conn, **filters)
                if as_json:
                    _print_locks(infos, as_json=True, expanded=False, compact=True)
                else:
                    if console.is_terminal:
                        console.clear()
                    stamp = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S")
                    console.print(
                        f"Every {interval:g}s: aiopglock locks    {stamp}   (Ctrl-C to stop)"
                    )
                    _print_locks(infos, as_json=False, expanded=expanded, compact=False)
                sys.stdout.flush()
                with anyio.move_on_after(interval):
                    await stop.wait()
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signal.SIGTERM)

    try:
        _with_connection(dsn, forever)
    except KeyboardInterrupt:
        return 0
    return 0


def _locks_summary(backend: dict[str, Any]) -> str:
    held, waiting = backend["locks_held"], backend["locks_waiting"]
    summary = f"{held} held"
    if waiting:
        summary += f", {waiting} waiting"
        if backend["blocking_pids"]:
            summary += f" (blocked by {_pids(backend['blocking_pids'])})"
    return summary


def _backends_table(backends: dict[int, dict[str, Any]], width: int) -> Table:
    rows: list[dict[str, Text]] = []
    for pid, backend in backends.items():
        rows.append(
            {
                "PID": Text(str(pid)),
                "USER": _plain(backend["user"]),
                "DATABASE": _plain(backend["database"]),
                "APP": _cut(backend["application_name"]),
                "STATE": _plain(backend["state"] or backend["backend_type"]),
                "LOCKS": Text(_locks_summary(backend)),
                "QUERY": _cut(backend["query"]),
            }
        )
    return _fitted_table(rows, width, BACKENDS_SHRINK)


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
            grid.add_row(Text(name), Text(_visible(value)))
        grid.add_row(Text("query"), Text(_visible(backend["query"] or "", "\n\t")))
        console.print(grid)


def _signal_command(ctx: click.Context, action: str, pids: tuple[int, ...], yes: bool) -> int:
    """``cancel`` / ``terminate``: exit 0 only when every pid given was signalled."""
    wanted = list(dict.fromkeys(pids))
    dsn = _dsn(ctx)
    signal = cancel if action == "cancel" else terminate
    done = "cancelled" if action == "cancel" else "terminated"
    targets = wanted
    # Without --yes: the sessions shown, as (pid, backend_start), and only those
    # are signalled; a pid whose session ended or changed meanwhile is not.
    shown: dict[int, datetime] | None = None
    if not yes:
        backends = _with_connection(dsn, lambda conn: describe_backends(conn, wanted))
        missing = [pid for pid in wanted if pid not in backends]
        if missing:
            _fail(
                f"no backend of this server with pid {_pids(missing)} (or it is this command's own)"
            )
        if not backends:
            return 1
        console = _console()
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
            _fail(
                f"not {done}: {_pids(unknown)} (its backend_start is not visible to this "
                "role, so a new session that took its pid could not be told apart: "
                "grant it pg_read_all_stats, or use --yes)"
            )
        if not shown:
            return 1
        targets = list(shown)
        what = "the current query of" if action == "cancel" else ""
        question = f"{action.capitalize()} {what} {len(targets)} backend(s) ({_pids(targets)})?"
        try:
            if not click.confirm(_one_line(question), default=False, err=True):
                raise Declined
        except (click.Abort, Declined):
            click.echo(err=True)
            _fail(f"not confirmed: nothing {done}")
            return 1

    async def go(conn: Any) -> list[int]:
        if shown is not None:
            return await signal_sessions(conn, action, shown)
        return await signal(conn, *targets)

    signalled = _with_connection(dsn, go)
    for pid in signalled:
        click.echo(f"{done} {pid}")
    if shown is not None:
        changed = [pid for pid in shown if pid not in signalled]
        if changed:
            _fail(
                f"not {done}: {_pids(changed)} (the session shown has ended, or its pid "
                "now belongs to another session, or no permission)"
            )
        return 0 if len(signalled) == len(wanted) else 1
    failed = [pid for pid in wanted if pid not in signalled]
    if failed:
        _fail(
            f"not {done}: {_pids(failed)} (no such backend on this server, "
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


@app.command(
    "cancel", help="Cancel the current query of backends (pg_cancel_backend). " + _CONFIRMATION
)
@_dsn_option
@_YES_OPTION
@_PID_ARGUMENT
@click.pass_context
def cancel_command(ctx: click.Context, yes: bool, pids: tuple[int, ...]) -> int:
    return _signal_command(ctx, "cancel", pids, yes)


@app.command(
    "terminate",
    help="Terminate backends (pg_terminate_backend); their locks are released. " + _CONFIRMATION,
)
@_dsn_option
@_YES_OPTION
@_PID_ARGUMENT
@click.pass_context
def terminate_command(ctx: click.Context, yes: bool, pids: tuple[int, ...]) -> int:
    return _signal_command(ctx, "terminate", pids, yes)


@app.command("demo")
@_dsn_option
@click.pass_context
def demo_command(ctx: click.Context) -> int:
    """A narrated run of every feature (an embedded PostgreSQL when no DSN is given)."""
    from ._demo import run_demo
    from ._embedded import embedded_postgres

    def say(line: str) -> None:
        print(line, flush=True)

    dsn = _dsn(ctx)
    if dsn is None and not _uses_libpq_env():
        say("No DSN given (--dsn, DATABASE_URL or PG* variables): starting an embedded PostgreSQL.")
        with embedded_postgres() as embedded:
            asyncio.run(run_demo(embedded, say))
        say("Embedded PostgreSQL stopped and deleted.")
    else:
        # Reach the server first, so that a wrong DSN fails as every command does.
        _with_connection(dsn, lambda conn: conn.fetchval("SELECT 1"))
        asyncio.run(run_demo(dsn, say))
    return 0


# --------------------------------------------------------------------------- entry


# Failures shown as one line on stderr with exit status 1. ValueError covers a
# malformed DSN and arguments the library rejects after looking at the server
# (a table or database that does not exist).
FAILURES: tuple[type[Exception], ...] = (
    ConnectFailed,
    Error,
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    ValueError,
)


def run(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command, return the exit status."""
    logging.basicConfig(level=logging.WARNING, format="  (log) %(name)s: %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        result = app.main(args, prog_name=PROG, standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        exc.show()
        return exc.exit_code
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else PROG
        _fail(f"{exc.format_message()} (see '{where} --help')")
        return exc.exit_code
    except click.ClickException as exc:
        _fail(exc.format_message())
        return exc.exit_code
    except click.Abort:
        return 130
    except BrokenPipeError:
        # The reader went away (`aiopglock locks --watch 1 | head`): stop quietly,
        # and keep the interpreter's final flush of stdout from failing too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141  # 128 + SIGPIPE, as a shell reports a writer killed by it
    except FAILURES as exc:
        _fail(str(exc) or type(exc).__name__)
        return 1
    except KeyboardInterrupt:
        return 130
    return result if isinstance(result, int) else 0
