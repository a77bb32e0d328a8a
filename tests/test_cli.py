"""The command line, run as a user would: a subprocess against a real server.

Locks are held by connections of the test's own (plain SQL); what the command
reports is compared with the held lock, and what it does to a backend is
checked in ``pg_stat_activity`` and ``pg_locks``. Both entry points run:
``python -m aiopglock`` and the ``aiopglock`` console script.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import asyncpg
import pytest

from aiopglock import advisory_key
from tests._helpers import (
    Connect,
    PgServer,
    holders,
    wait_for_release,
    wait_for_waiter,
    wait_until,
    waiters,
)

APP = "aiopglock-tests-cli"
NO_SUCH_PID = 2**31 - 1
UNREACHABLE = "postgresql://postgres@127.0.0.1:1/nowhere"
SCRIPT = shutil.which("aiopglock", path=str(Path(sys.executable).parent))


def _env(dsn: str | None = None, **extra: str) -> dict[str, str]:
    """The environment without any DSN of the caller's; DATABASE_URL=dsn if given."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "COLUMNS", "LINES") and not k.startswith(("PG", "AIOPGLOCK_"))
    }
    if dsn is not None:
        env["DATABASE_URL"] = dsn
    env.update(extra)
    return env


def _command(script: bool = False) -> list[str]:
    if script:
        assert SCRIPT is not None, "the aiopglock console script is not installed"
        return [SCRIPT]
    return [sys.executable, "-m", "aiopglock"]


def _run(
    *args: str,
    env: dict[str, str] | None = None,
    input: str | None = None,
    script: bool = False,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_command(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env if env is not None else _env(),
        input=input if input is not None else "",
    )


def _one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("aiopglock: "), done.stderr
    return lines[0]


def _lines_fit(text: str, width: int) -> None:
    lines = text.splitlines()
    assert lines
    too_wide = [line for line in lines if len(line) > width]
    assert too_wide == [], f"wider than {width} columns:\n" + "\n".join(too_wide)


async def _alive(admin: asyncpg.Connection, pid: int) -> bool:
    found: bool = await admin.fetchval(
        "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE pid = $1)", pid
    )
    return found


async def _wait_gone(admin: asyncpg.Connection, pid: int) -> None:
    async def gone() -> bool:
        return not await _alive(admin, pid)

    await wait_until(gone, message=f"backend {pid} to exit")


@dataclass
class Held:
    """A session holding advisory ``key`` (``key`` as advisory_key returns it)."""

    conn: asyncpg.Connection
    pid: int
    key: int


@pytest.fixture
async def held(connect: Connect) -> Held:
    key = advisory_key(f"tests.test_cli:{uuid.uuid4().hex}")
    assert isinstance(key, int)
    conn: asyncpg.Connection = await connect(server_settings={"application_name": APP})
    await conn.execute("SELECT pg_advisory_lock($1)", key)
    return Held(conn, conn.get_server_pid(), key)


@dataclass
class Waiting:
    """``held`` plus a second session waiting for the same key."""

    held: Held
    conn: asyncpg.Connection
    pid: int


@pytest.fixture
async def waiting(
    held: Held, connect: Connect, admin: asyncpg.Connection
) -> AsyncIterator[Waiting]:
    conn: asyncpg.Connection = await connect(server_settings={"application_name": APP})
    task = asyncio.ensure_future(conn.execute("SELECT pg_advisory_lock($1)", held.key))
    await wait_for_waiter(admin, held.key)
    try:
        yield Waiting(held, conn, conn.get_server_pid())
    finally:
        if not held.conn.is_closed():
            await held.conn.execute("SELECT pg_advisory_unlock_all()")
        # (The wait may have been cancelled or its session terminated by the test.)
        with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError):
            await asyncio.wait_for(task, 10)


def _pg_env(dsn: str) -> dict[str, str]:
    """The DSN as libpq's PG* variables."""
    parts = urlsplit(dsn)
    query = parse_qs(parts.query)
    env = {
        "PGHOST": query.get("host", [parts.hostname or ""])[0],
        "PGUSER": parts.username or "postgres",
        "PGDATABASE": parts.path.lstrip("/") or parts.username or "postgres",
    }
    if parts.port:
        env["PGPORT"] = str(parts.port)
    if parts.password:
        env["PGPASSWORD"] = parts.password
    return env


def _mine(documents: list[dict[str, Any]], *pids: int) -> list[dict[str, Any]]:
    return [doc for doc in documents if doc["pid"] in pids]


# --------------------------------------------------------------------------- locks


@pytest.mark.parametrize("script", [False, True], ids=["python-m", "console-script"])
@pytest.mark.parametrize("source", ["--dsn", "--dsn-after-command", "DATABASE_URL", "PG*"])
async def test_locks_json_lists_a_held_lock(
    held: Held, pg_server: PgServer, script: bool, source: str
) -> None:
    if source == "--dsn":
        done = _run("--dsn", pg_server.dsn, "locks", "--json", script=script)
    elif source == "--dsn-after-command":
        done = _run("locks", "--json", "--dsn", pg_server.dsn, script=script)
    elif source == "DATABASE_URL":
        done = _run("locks", "--json", env=_env(pg_server.dsn), script=script)
    else:
        done = _run("locks", "--json", env=_env(**_pg_env(pg_server.dsn)), script=script)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    mine = _mine(json.loads(done.stdout), held.pid)
    assert len(mine) == 1, mine
    (doc,) = mine
    assert doc["locktype"] == "advisory"
    assert doc["key"] == held.key
    assert doc["mode"] == "ExclusiveLock"
    assert doc["granted"] is True
    assert doc["blocking_pids"] == []
    assert doc["wait_duration"] is None
    assert doc["application_name"] == APP
    assert doc["query"] == "SELECT pg_advisory_lock($1)"


async def test_locks_blocked_shows_the_waiter_and_its_blocker(
    waiting: Waiting, pg_server: PgServer
) -> None:
    env = _env(pg_server.dsn)
    hpid, wpid = waiting.held.pid, waiting.pid
    done = _run("locks", "--blocked", "--json", env=env)
    assert done.returncode == 0, done.stderr
    mine = _mine(json.loads(done.stdout), hpid, wpid)
    assert [(d["pid"], d["key"], d["granted"], d["blocking_pids"]) for d in mine] == [
        (wpid, waiting.held.key, False, [hpid])
    ]
    assert mine[0]["wait_duration"] >= 0

    done = _run("locks", "--blocked", env={**env, "COLUMNS": "100"})
    assert done.returncode == 0, done.stderr
    _lines_fit(done.stdout, 100)
    rows = [line.split() for line in done.stdout.splitlines()]
    waiter_rows = [row for row in rows if row and row[0] == str(wpid)]
    assert len(waiter_rows) == 1
    assert "wait" in waiter_rows[0] and str(hpid) in waiter_rows[0]
    assert not [row for row in rows if row and row[0] == str(hpid)]  # nothing held is shown


@pytest.mark.parametrize("columns", [60, 80, 200])
async def test_the_table_fits_the_terminal(
    waiting: Waiting, pg_server: PgServer, columns: int
) -> None:
    done = _run(
        "locks", "--pid", str(waiting.held.pid), "--pid", str(waiting.pid),
        env=_env(pg_server.dsn, COLUMNS=str(columns)),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    _lines_fit(done.stdout, columns)
    header = done.stdout.split("\u2500")[0]  # above the rule
    assert {"PID", "MODE", "STATUS", "LOCK", "BLOCKED"} <= set(header.split())
    firsts = [line.split()[0] for line in done.stdout.splitlines() if line.strip()]
    assert firsts.count(str(waiting.held.pid)) == 1  # its advisory lock
    assert firsts.count(str(waiting.pid)) == 2  # its wait and its virtualxid
    assert "3 locks, 1 waiting" in done.stdout


async def test_expanded_shows_every_field_and_fits(held: Held, pg_server: PgServer) -> None:
    done = _run(
        "locks", "--expanded", "--pid", str(held.pid),
        env=_env(pg_server.dsn, COLUMNS="60"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    _lines_fit(done.stdout, 60)
    assert done.stdout.count("RECORD ") == 1
    pairs = [line.split(None, 1) for line in done.stdout.splitlines()]
    fields = {pair[0]: pair[1].strip() for pair in pairs if len(pair) == 2}
    assert fields["pid"] == str(held.pid)
    assert fields["key"] == str(held.key)
    assert fields["mode"] == "ExclusiveLock"
    assert fields["application_name"] == APP
    # Narrower than 60 columns, the plain command shows blocks too.
    done = _run("locks", "--pid", str(held.pid), env=_env(pg_server.dsn, COLUMNS="40"))
    assert done.returncode == 0, done.stderr
    _lines_fit(done.stdout, 40)
    assert "RECORD 1" in done.stdout


async def test_locks_filters(
    waiting: Waiting, pg_server: PgServer, admin: asyncpg.Connection
) -> None:
    env = _env(pg_server.dsn)
    hpid, wpid = waiting.held.pid, waiting.pid

    def listed(*args: str) -> list[tuple[int, str, bool]]:
        done = _run("locks", "--json", *args, env=env)
        assert done.returncode == 0, done.stderr
        return [
            (d["pid"], d["locktype"], d["granted"])
            for d in _mine(json.loads(done.stdout), hpid, wpid)
        ]

    assert listed("--pid", str(hpid)) == [(hpid, "advisory", True)]
    assert listed("--locktype", "virtualxid") == [(wpid, "virtualxid", True)]
    assert listed("--locktype", "advisory", "--locktype", "virtualxid") == [
        (hpid, "advisory", True),
        (wpid, "virtualxid", True),
        (wpid, "advisory", False),
    ]
    assert listed("--relation", "pg_catalog.pg_class") == []
    current = await admin.fetchval("SELECT current_database()")
    assert len(listed("--database", current)) == 3
    other = await admin.fetchval(
        "SELECT datname FROM pg_database WHERE datname <> current_database() "
        "AND datallowconn ORDER BY datname LIMIT 1"
    )
    assert listed("--database", other) == []
    assert len(listed("--all-databases")) == 3
    done = _run("locks", "--relation", f"no_such_table_{uuid.uuid4().hex}", env=env)
    assert done.returncode == 1
    assert "relation" in _one_error_line(done)
    done = _run("locks", "--database", f"no_such_db_{uuid.uuid4().hex}", env=env)
    assert done.returncode == 1
    assert "database" in _one_error_line(done)


@pytest.mark.parametrize(
    "args",
    [
        ("locks", "--pid", "abc"),
        ("locks", "--pid", "-5"),
        ("locks", "--locktype", "row"),
        ("locks", "--watch", "0"),
        ("locks", "--watch", "nan"),
        ("locks", "--json", "--expanded"),
        ("locks", "--database", "x", "--all-databases"),
        ("terminate",),
        ("terminate", "abc"),
        ("terminate", "0"),
        ("cancel", "12x"),
        ("cancel", str(2**31)),
        ("no-such-command",),
        ("--dsn",),
    ],
)
def test_bad_input_is_a_usage_error(args: tuple[str, ...]) -> None:
    # Against an unreachable server: nothing is tried before the arguments are good.
    done = _run(*args, env=_env(UNREACHABLE))
    assert done.returncode == 2, done.stderr
    line = _one_error_line(done)
    assert "--help" in line
    assert done.stdout == ""


@pytest.mark.parametrize(
    "args",
    [
        ("locks",),
        ("locks", "--json"),
        ("terminate", "4242"),
        ("cancel", "4242", "--yes"),
        ("demo",),
    ],
)
def test_unreachable_server_is_one_line_and_non_zero(args: tuple[str, ...]) -> None:
    done = _run("--dsn", UNREACHABLE, *args)
    assert done.returncode == 1
    assert "cannot connect" in _one_error_line(done)
    assert done.stdout == ""


def test_a_malformed_dsn_is_one_line() -> None:
    done = _run("--dsn", "mysql://nowhere/x", "locks")
    assert done.returncode == 1
    assert "DSN" in _one_error_line(done)


def test_a_server_error_is_one_line_and_non_zero(pg_server: PgServer) -> None:
    parts = urlsplit(pg_server.dsn)
    dsn = urlunsplit(parts._replace(path="/aiopglock_no_such_database"))
    for args in (("locks",), ("demo",)):
        done = _run("--dsn", dsn, *args)
        assert done.returncode == 1
        assert "aiopglock_no_such_database" in _one_error_line(done)


def test_without_the_cli_extra_one_line_says_so() -> None:
    program = (
        "import sys; sys.modules['click'] = None\n"
        "from aiopglock.cli import main\n"
        "sys.exit(main(['locks']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, env=_env()
    )
    assert done.returncode == 1
    assert "pip install 'aiopglock[cli]'" in _one_error_line(done)


# --------------------------------------------------------------------------- --watch


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _watch(args: list[str], env: dict[str, str], marker: str, stop: signal.Signals) -> str:
    """Run ``aiopglock *args`` until its output has shown ``marker`` twice (read
    from the pipe: no sleeping and hoping), then send ``stop``; return stdout."""
    proc = subprocess.Popen(
        [*_command(), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
        # A shell's background job starts with SIGINT ignored, and Python then
        # installs no KeyboardInterrupt handler: give the child the default
        # disposition, as a terminal would, wherever the suite itself runs.
        preexec_fn=_default_sigint,
    )
    try:
        assert proc.stdout is not None
        seen: list[str] = []
        deadline = time.monotonic() + 60
        while sum(marker in line for line in seen) < 2 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
        assert sum(marker in line for line in seen) >= 2, (seen, proc.poll())
        proc.send_signal(stop)
        rest, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert err == ""
    return "".join(seen) + rest


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
async def test_watch_refreshes_until_stopped(
    held: Held, pg_server: PgServer, stop: signal.Signals, as_json: bool
) -> None:
    args = ["locks", "--watch", "0.05", "--pid", str(held.pid)] + (["--json"] if as_json else [])
    env = _env(pg_server.dsn, COLUMNS="100")
    out = _watch(args, env, '"pid"' if as_json else "Every 0.05s", stop)
    if as_json:
        for line in out.splitlines():
            docs = json.loads(line)  # one JSON document per refresh
            assert [(d["pid"], d["key"]) for d in docs] == [(held.pid, held.key)]
    else:
        _lines_fit(out, 100)
        assert str(held.key) in out


# --------------------------------------------------------------------------- cancel / terminate


@pytest.mark.parametrize("answer", ["n\n", "no\n", "", "maybe\n"], ids=["n", "no", "EOF", "maybe"])
async def test_terminate_declined_leaves_the_backend_alone(
    held: Held, pg_server: PgServer, admin: asyncpg.Connection, answer: str
) -> None:
    done = _run("terminate", str(held.pid), env=_env(pg_server.dsn), input=answer)
    assert done.returncode == 1
    assert "not confirmed" in done.stderr
    assert "Traceback" not in done.stderr
    assert "Terminate 1 backend(s)" in done.stderr  # the question
    assert str(held.pid) in done.stdout and APP in done.stdout  # what it would hit
    assert await _alive(admin, held.pid)
    assert await holders(admin, held.key) == [held.pid]
    assert await held.conn.fetchval("SELECT 1") == 1


@pytest.mark.parametrize("script", [False, True], ids=["python-m", "console-script"])
@pytest.mark.parametrize("how", ["y", "yes", "--yes", "-y"])
async def test_terminate_confirmed_terminates(
    held: Held, pg_server: PgServer, admin: asyncpg.Connection, how: str, script: bool
) -> None:
    if how.startswith("-"):
        done = _run("terminate", str(held.pid), how, env=_env(pg_server.dsn), script=script)
    else:
        done = _run(
            "terminate", str(held.pid), env=_env(pg_server.dsn), input=f"{how}\n", script=script
        )
    assert done.returncode == 0, done.stderr
    assert f"terminated {held.pid}" in done.stdout.splitlines()
    await _wait_gone(admin, held.pid)
    await wait_for_release(admin, held.key)


async def test_cancel_cancels_the_wait_without_terminating(
    waiting: Waiting, pg_server: PgServer, admin: asyncpg.Connection
) -> None:
    done = _run("cancel", "--yes", str(waiting.pid), env=_env(pg_server.dsn))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"cancelled {waiting.pid}"]

    async def no_wait() -> bool:
        return not await waiters(admin, waiting.held.key)

    await wait_until(no_wait, message="the wait to be cancelled")
    assert await _alive(admin, waiting.pid)
    assert await _alive(admin, waiting.held.pid)
    assert await holders(admin, waiting.held.key) == [waiting.held.pid]


async def test_nothing_matched_exits_non_zero(
    held: Held, pg_server: PgServer, admin: asyncpg.Connection
) -> None:
    env = _env(pg_server.dsn)
    for args in (("terminate", str(NO_SUCH_PID)), ("terminate", "--yes", str(NO_SUCH_PID))):
        done = _run(*args, env=env, input="y\n")
        assert done.returncode == 1
        assert str(NO_SUCH_PID) in _one_error_line(done)
    # One of two pids matched: that one is signalled, and the exit says the other was not.
    done = _run("cancel", "--yes", str(held.pid), str(NO_SUCH_PID), env=env)
    assert done.returncode == 1
    assert done.stdout.splitlines() == [f"cancelled {held.pid}"]
    assert str(NO_SUCH_PID) in _one_error_line(done)
    assert await _alive(admin, held.pid)


# --------------------------------------------------------------------------- demo


def test_demo_runs_against_the_server(pg_server: PgServer) -> None:
    done = _run("--dsn", pg_server.dsn, "demo")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "aiopglock     :   0 of 300 races left a lock held" in out
    assert "LockLost after" in out
    assert "(ran: 1, skipped: 2)" in out
    assert "FOR UPDATE alone: 5 rows for 'home'" in out
    assert "1 row for 'about', n = 5" in out
    assert "never two at once (0 overlaps)" in out
    assert "at most 2 at once" in out
    assert "a write with the deposed leader's fence: UPDATE 0 (refused)" in out
    assert "advisory locks on the server now: 0" in out


def test_demo_starts_an_embedded_server_without_a_dsn() -> None:
    done = _run("demo")
    assert done.returncode == 0, done.stderr
    assert "starting an embedded PostgreSQL" in done.stdout
    assert "Connected to PostgreSQL 18" in done.stdout
    assert "Embedded PostgreSQL stopped and deleted." in done.stdout
