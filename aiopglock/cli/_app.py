"""The commands of ``aiopglock`` (see :mod:`aiopglock.cli`), on click and rich.

- ``aiopglock locks``: a table of :func:`aiopglock.locks` that fits the
  terminal, ``--expanded`` (one record per block), ``--json``, ``--watch``
  (:mod:`._locks`, shown by :mod:`._lockview`).
- ``aiopglock cancel|terminate PID…``: shows what each backend runs and asks
  before signalling, unless ``--yes`` (:mod:`._signal`).
- ``aiopglock demo``: the narrated demo.

The DSN comes from ``--dsn``, then ``DATABASE_URL``, then libpq's ``PG*``
variables (:mod:`._options`). Every failure is one line on stderr (here, in
:func:`run`), and everything that comes from the server is shown as plain
text (:mod:`._output`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Sequence

import asyncpg
import click

from .._errors import Error
from ._connection import ConnectFailed, with_connection
from ._locks import locks_command
from ._options import dsn_of, dsn_option, uses_libpq_env
from ._output import PROG, fail
from ._signal import cancel_command, terminate_command

__all__ = ["run"]


@click.group(
    name=PROG,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="PostgreSQL locks for asyncio services: see and free the locks of a server.",
)
@dsn_option
@click.version_option(package_name="aiopglock", prog_name=PROG)
def app() -> None:
    pass


app.add_command(locks_command)
app.add_command(cancel_command)
app.add_command(terminate_command)


@app.command("demo")
@dsn_option
@click.pass_context
def demo_command(ctx: click.Context) -> int:
    """A narrated run of every feature (an embedded PostgreSQL when no DSN is given)."""
    from ._demo import run_demo
    from ._embedded import embedded_postgres

    def say(line: str) -> None:
        print(line, flush=True)

    dsn = dsn_of(ctx)
    if dsn is None and not uses_libpq_env():
        say("No DSN given (--dsn, DATABASE_URL or PG* variables): starting an embedded PostgreSQL.")
        with embedded_postgres() as embedded:
            asyncio.run(run_demo(embedded, say))
        say("Embedded PostgreSQL stopped and deleted.")
    else:
        # Reach the server first, so that a wrong DSN fails as every command does.
        with_connection(dsn, lambda conn: conn.fetchval("SELECT 1"))
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
        fail(f"{exc.format_message()} (see '{where} --help')")
        return exc.exit_code
    except click.ClickException as exc:
        fail(exc.format_message())
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
        fail(str(exc) or type(exc).__name__)
        return 1
    except KeyboardInterrupt:
        return 130
    return result if isinstance(result, int) else 0
