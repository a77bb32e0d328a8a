"""The command line, run as a user would: a subprocess against a real server."""

from __future__ import annotations

import os
import subprocess
import sys
from urllib.parse import urlsplit, urlunsplit

from tests._helpers import PgServer


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiopglock", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_demo_runs_against_the_server(pg_server: PgServer) -> None:
    done = _run("--dsn", pg_server.dsn, "demo")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "aiopglock     :   0 of 300 races left a lock held" in out
    assert "LockLost after" in out
    assert "(ran: 1, skipped: 2)" in out
    assert "advisory locks on the server now: 0" in out


def test_demo_starts_an_embedded_server_without_a_dsn() -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "DATABASE_URL" and not k.startswith("PG") and not k.startswith("AIOPGLOCK_")
    }
    done = _run("demo", env=env)
    assert done.returncode == 0, done.stderr
    assert "starting an embedded PostgreSQL" in done.stdout
    assert "Connected to PostgreSQL 18" in done.stdout
    assert "Embedded PostgreSQL stopped and deleted." in done.stdout


def test_unreachable_server_is_one_line_and_non_zero() -> None:
    done = _run("--dsn", "postgresql://postgres@127.0.0.1:1/nowhere", "demo")
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("aiopglock: ")
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_server_error_is_one_line_and_non_zero(pg_server: PgServer) -> None:
    parts = urlsplit(pg_server.dsn)
    dsn = urlunsplit(parts._replace(path="/aiopglock_no_such_database"))
    done = _run("--dsn", dsn, "demo")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("aiopglock: ")
    assert "aiopglock_no_such_database" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_usage_error_exits_2() -> None:
    done = _run("no-such-command")
    assert done.returncode == 2
    assert "usage: aiopglock" in done.stderr
