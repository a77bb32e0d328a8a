"""The command line against hostile input: what sessions name themselves and
run, pids that change hands before a confirmation, bad DSNs and table names.

Everything from the server is shown as plain text: rich markup is printed
literally, never interpreted, and control characters (terminal escape
sequences, bidirectional overrides, bells) are shown as Python escapes
(``\\x1b``), never sent to the terminal.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

import aiopglock
from aiopglock._introspect import signal_sessions
from tests._helpers import Connect, PgServer, wait_until
from tests._relations import Tables, quote, unique_name
from tests.test_cli import _alive, _env, _lines_fit, _one_error_line, _run, _wait_gone, _watch

# Short enough for the APP column of a wide table (24 columns). PostgreSQL
# itself shows a control character of application_name as \xNN.
HOSTILE_APPS = [
    "[/oops]",
    "[link=http://x]s[/link]",
    "[conceal]c[/conceal]",
    "[bold]b",
    ":smile: [red]r",
]
# What a query may hold: markup, escape sequences (colour, clear screen, a
# hyperlink), a bidirectional override, a bell, a carriage return.
HOSTILE_QUERY = (
    "/* [/oops] [link=http://x]spoof[/link] [conceal]secret[/conceal] [bold]b "
    "\x1b[31mred\x1b[0m \x1b[2J \x1b]8;;http://x\x07link\x1b]8;;\x07 \u202eevil \x07 a\rb */ "
)
RAW = ("\x1b", "\x07", "\u202e", "\r", "\x9b")


def shown(text: str) -> str:
    """``text`` as the command line shows it."""
    return (
        text.replace("\x1b", "\\x1b")
        .replace("\x07", "\\x07")
        .replace("\u202e", "\\u202e")
        .replace("\r", "\\x0d")
    )


def _no_raw_controls(out: str) -> None:
    for char in RAW:
        assert char not in out, f"{char!r} reached the terminal"


@dataclass
class Hostile:
    conns: list[asyncpg.Connection]
    pids: list[int]
    query: str


@pytest.fixture
async def hostile(connect: Connect) -> AsyncIterator[Hostile]:
    """One session per hostile application name, each holding an advisory lock
    taken by a hostile query (a very long one: 600 characters)."""
    query = HOSTILE_QUERY + "SELECT pg_advisory_lock($1) -- " + "x" * 500
    conns: list[asyncpg.Connection] = []
    for app in HOSTILE_APPS:
        conn: asyncpg.Connection = await connect(server_settings={"application_name": app})
        key = int.from_bytes(uuid.uuid4().bytes[:7], "big")
        await conn.execute(query, key)
        conns.append(conn)
    try:
        yield Hostile(conns, [conn.get_server_pid() for conn in conns], query)
    finally:
        for conn in conns:
            if not conn.is_closed():
                await conn.execute("SELECT pg_advisory_unlock_all()")


def _pid_args(pids: list[int]) -> list[str]:
    return [arg for pid in pids for arg in ("--pid", str(pid))]


@pytest.mark.parametrize("columns", [40, 80, 200])
@pytest.mark.parametrize("view", ["table", "expanded"])
async def test_locks_shows_hostile_text_as_plain_text(
    hostile: Hostile, pg_server: PgServer, columns: int, view: str
) -> None:
    args = ["locks", *_pid_args(hostile.pids)] + (["-x"] if view == "expanded" else [])
    done = _run(*args, env=_env(pg_server.dsn, COLUMNS=str(columns)))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    out = done.stdout
    _no_raw_controls(out)
    _lines_fit(out, columns)
    if view == "expanded" or columns < 60:  # blocks: every field
        assert out.count("RECORD ") == len(HOSTILE_APPS)
    if columns == 200:
        # Every application name is there exactly as the session set it, and
        # so is the query's hostile part (as Python escapes for the controls).
        for app in HOSTILE_APPS:
            assert app in out, app
        if view == "expanded":
            assert shown(HOSTILE_QUERY).strip() in out
        else:
            assert "/* [/oops] [link=http://x]spoof[/link] [conceal]secret" in out
    elif columns == 80 and view == "table":
        assert "/* [/oops]" in out  # the query, cut to fit
    else:
        assert "[/oops]" in out


async def test_locks_json_keeps_the_exact_text(hostile: Hostile, pg_server: PgServer) -> None:
    done = _run("locks", "--json", *_pid_args(hostile.pids), env=_env(pg_server.dsn))
    assert done.returncode == 0, done.stderr
    _no_raw_controls(done.stdout)  # JSON escapes them itself
    docs = json.loads(done.stdout)
    assert sorted(doc["application_name"] for doc in docs) == sorted(HOSTILE_APPS)
    assert {doc["query"] for doc in docs} == {hostile.query}


async def test_watch_shows_hostile_text_as_plain_text(
    hostile: Hostile, pg_server: PgServer
) -> None:
    import signal

    args = ["locks", "--watch", "0.05", *_pid_args(hostile.pids)]
    out = _watch(args, _env(pg_server.dsn, COLUMNS="200"), "Every 0.05s", signal.SIGTERM)
    _no_raw_controls(out)
    _lines_fit(out, 200)
    for app in HOSTILE_APPS:
        assert app in out, app


@pytest.mark.parametrize("columns", [40, 80, 200])
async def test_confirmation_shows_hostile_text_as_plain_text(
    hostile: Hostile, pg_server: PgServer, admin: asyncpg.Connection, columns: int
) -> None:
    pids = [str(pid) for pid in hostile.pids]
    done = _run("terminate", *pids, env=_env(pg_server.dsn, COLUMNS=str(columns)), input="n\n")
    assert done.returncode == 1
    assert "not confirmed" in done.stderr and "Traceback" not in done.stderr
    _no_raw_controls(done.stdout + done.stderr)
    _lines_fit(done.stdout, columns)
    for pid in hostile.pids:
        assert str(pid) in done.stdout
        assert await _alive(admin, pid)
    if columns == 200:
        for app in HOSTILE_APPS:
            assert app in done.stdout, app
        assert "/* [/oops] [link=http://x]spoof[/link]" in done.stdout


def test_server_text_in_an_error_line_is_plain(pg_server: PgServer) -> None:
    database = "\x1b[31mno_such_db\u202e[/oops]"
    parts = urlsplit(pg_server.dsn)
    # (A database name can be anything; spelled with %-escapes in the DSN.)
    quoted = "".join(f"%{byte:02X}" for byte in database.encode())
    dsn = urlunsplit(parts._replace(path="/" + quoted))
    done = _run("--dsn", dsn, "locks")
    assert done.returncode == 1
    line = _one_error_line(done)
    _no_raw_controls(done.stderr)
    assert shown(database) in line
    done = _run("locks", "--database", database, env=_env(pg_server.dsn))
    assert done.returncode == 1
    _no_raw_controls(_one_error_line(done))


# --------------------------------------------------------------------------- cancel/terminate


async def _backend_start(admin: asyncpg.Connection, pid: int) -> object:
    return await admin.fetchval("SELECT backend_start FROM pg_stat_activity WHERE pid = $1", pid)


@pytest.mark.parametrize("action", ["cancel", "terminate"])
async def test_a_stale_session_is_not_signalled(
    connect: Connect, admin: asyncpg.Connection, action: str
) -> None:
    """The pid is right but its backend_start is not the one shown: the pid
    belongs to another session now, which is left alone."""
    conn: asyncpg.Connection = await connect()
    pid = conn.get_server_pid()
    started = await _backend_start(admin, pid)
    assert started is not None
    waiting = asyncio.ensure_future(conn.execute("SELECT pg_sleep(60)"))
    try:
        for stale in (started - timedelta(microseconds=1), started + timedelta(seconds=1)):
            assert await signal_sessions(admin, action, {pid: stale}) == []
        assert not waiting.done()
        assert await _alive(admin, pid)
        # The session shown is signalled.
        assert await signal_sessions(admin, action, {pid: started}) == [pid]
        with pytest.raises((asyncpg.QueryCanceledError, asyncpg.ConnectionDoesNotExistError)):
            await asyncio.wait_for(waiting, 30)
    finally:
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)


def test_signal_sessions_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="action"):
        asyncio.run(signal_sessions(None, "kill", {}))


class Confirmation:
    """``aiopglock terminate PID`` waiting at its prompt."""

    def __init__(self, pid: int, dsn: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aiopglock", "terminate", str(pid)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_env(dsn, COLUMNS="200"),
        )

    def wait_for_prompt(self) -> None:
        assert self.proc.stderr is not None
        seen = b""
        while b"[y/N]: " not in seen:
            byte = self.proc.stderr.read(1)
            assert byte, (seen, self.proc.poll())
            seen += byte

    def answer(self, text: str) -> tuple[int, str, str]:
        out, err = self.proc.communicate(text.encode(), timeout=60)
        return self.proc.returncode, out.decode(), err.decode()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


async def test_confirming_after_the_session_ended_signals_nothing(
    connect: Connect, admin: asyncpg.Connection, pg_server: PgServer
) -> None:
    shown_conn: asyncpg.Connection = await connect()
    pid = shown_conn.get_server_pid()
    prompt = Confirmation(pid, pg_server.dsn)
    try:
        await asyncio.to_thread(prompt.wait_for_prompt)
        # Meanwhile the session shown ends and another one starts.
        await admin.execute("SELECT pg_terminate_backend($1)", pid)
        await _wait_gone(admin, pid)
        other: asyncpg.Connection = await connect()
        code, out, err = await asyncio.to_thread(prompt.answer, "y\n")
    finally:
        prompt.close()
    assert code == 1
    assert f"terminated {pid}" not in out.splitlines()
    assert "not terminated" in err and str(pid) in err and "Traceback" not in err
    assert await other.fetchval("SELECT 1") == 1


NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")


def _set_last_pid(pid: int) -> bool:
    try:
        NS_LAST_PID.write_text(str(pid))
    except OSError:
        return False
    return True


async def _reuse_pid(connect: Connect, pid: int, tries: int = 200) -> asyncpg.Connection | None:
    """A new session whose backend gets ``pid`` (Linux: the next fork in this pid
    namespace takes ns_last_pid + 1; other processes forking meanwhile make a
    try miss), or None."""
    for _ in range(tries):
        if not _set_last_pid(pid - 1):
            return None
        conn: asyncpg.Connection = await connect()
        if conn.get_server_pid() == pid:
            return conn
        await conn.close()
    return None


async def test_a_reused_pid_is_not_signalled(
    connect: Connect, admin: asyncpg.Connection, pg_server: PgServer
) -> None:
    """The case the check exists for: the pid shown now belongs to a new session."""
    if not os.access(NS_LAST_PID, os.W_OK):
        pytest.skip("pid reuse cannot be forced here (needs a writable ns_last_pid)")
    shown_conn: asyncpg.Connection = await connect()
    pid = shown_conn.get_server_pid()
    prompt = Confirmation(pid, pg_server.dsn)
    try:
        await asyncio.to_thread(prompt.wait_for_prompt)
        await admin.execute("SELECT pg_terminate_backend($1)", pid)
        await _wait_gone(admin, pid)
        reused = await _reuse_pid(connect, pid)
        if reused is None:
            pytest.skip("the server's backends are in another pid namespace, or pid reuse lost")
        code, out, err = await asyncio.to_thread(prompt.answer, "y\n")
    finally:
        prompt.close()
    assert code == 1
    assert f"terminated {pid}" not in out.splitlines()
    assert "not terminated" in err
    assert await reused.fetchval("SELECT 1") == 1  # the new session is alive
    assert await _alive(admin, pid)


# --------------------------------------------------------------------------- bad DSNs


@pytest.mark.parametrize(
    ("netloc", "expected"),
    [
        ("127.0.0.1:99999", "port '99999'"),
        ("127.0.0.1:65536", "port '65536'"),
        ("127.0.0.1:0", "port '0'"),
        ("127.0.0.1:-1", "port '-1'"),
        ("127.0.0.1:abc", "port 'abc'"),
        ("[::1]:99999", "port '99999'"),
        ("127.0.0.1:5432,127.0.0.1:99999", "port '99999'"),
    ],
)
def test_a_bad_port_is_one_line(netloc: str, expected: str) -> None:
    done = _run("--dsn", f"postgresql://postgres@{netloc}/db", "locks")
    assert done.returncode == 1
    line = _one_error_line(done)
    assert expected in line and "1 to 65535" in line
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("dsn", "env", "expected"),
    [
        ("postgresql://postgres@127.0.0.1/db?port=70000", {}, "port '70000'"),
        ("postgresql://postgres@127.0.0.1/db", {"PGPORT": "99999"}, "PGPORT"),
        ("http://127.0.0.1/db", {}, "scheme"),
        ("postgresql://postgres@no-such-host.invalid/db", {}, "cannot connect"),
        ("postgresql://postgres@[::1/db", {}, "DSN"),
    ],
)
def test_other_bad_dsns_are_one_line(dsn: str, env: dict[str, str], expected: str) -> None:
    done = _run("--dsn", dsn, "locks", env=_env(**env))
    assert done.returncode == 1
    assert expected in _one_error_line(done)


# --------------------------------------------------------------------------- --relation


@pytest.fixture
async def dotted_tables(tables: Tables) -> tuple[str, str, str]:
    """Tables ``"<t>.dot"`` in the public schema and ``"<s> x"."<t>.a""b"`` (a
    space, a dot and a quote)."""
    plain = unique_name("aiopglock_t") + ".dot"
    schema = await tables.schema(unique_name("aiopglock s") + " x")
    odd = unique_name("aiopglock_t") + '.a"b'
    await tables.create("public", plain)
    await tables.create(schema, odd)
    return plain, schema, odd


async def test_relation_with_a_dot_in_quotes(
    dotted_tables: tuple[str, str, str],
    connect: Connect,
    admin: asyncpg.Connection,
    pg_server: PgServer,
) -> None:
    plain, schema, odd = dotted_tables
    holder: asyncpg.Connection = await connect()
    env = _env(pg_server.dsn)
    async with holder.transaction():
        await holder.execute(f"LOCK TABLE {quote('public', plain)} IN SHARE MODE")
        await holder.execute(f"LOCK TABLE {quote(schema, odd)} IN EXCLUSIVE MODE")
        pid = holder.get_server_pid()
        for arg, relation, mode in [
            (quote(plain), f"public.{plain}", "ShareLock"),
            (f"public.{quote(plain)}", f"public.{plain}", "ShareLock"),
            (quote(schema, odd), f"{schema}.{odd}", "ExclusiveLock"),
        ]:
            done = _run("locks", "--json", "--relation", arg, env=env)
            assert done.returncode == 0, (arg, done.stderr)
            docs = json.loads(done.stdout)
            assert [(d["pid"], d["relation"], d["mode"]) for d in docs] == [
                (pid, relation, mode)
            ], arg
            infos = await aiopglock.locks(admin, relation=arg)
            assert [(i.pid, i.relation, i.mode) for i in infos] == [(pid, relation, mode)]
        # The unquoted spelling is three names, not this table.
        done = _run("locks", "--relation", f"public.{plain}", env=env)
        assert done.returncode == 2
        line = _one_error_line(done)
        assert "double quotes" in line and "tuple" not in line


@pytest.mark.parametrize("relation", ["a.b.c", 'a"b', '"open', '"a"b', "t.", ".t", '""'])
def test_a_bad_relation_is_a_one_line_usage_error(relation: str) -> None:
    from tests.test_cli import UNREACHABLE

    done = _run("locks", "--relation", relation, env=_env(UNREACHABLE))
    assert done.returncode == 2  # before connecting
    line = _one_error_line(done)
    assert "--relation" in line and "tuple" not in line


@pytest.mark.parametrize("columns", [40, 80, 200])
async def test_a_hostile_table_name_is_plain_text(
    tables: Tables, connect: Connect, pg_server: PgServer, columns: int
) -> None:
    name = unique_name("[/oops][link=http://x]t[/link]\x1b[31m")
    await tables.create("public", name)
    holder: asyncpg.Connection = await connect()
    env = _env(pg_server.dsn, COLUMNS=str(columns))
    async with holder.transaction():
        await holder.execute(f"LOCK TABLE {quote('public', name)} IN SHARE MODE")
        pid = str(holder.get_server_pid())
        for extra in ([], ["-x"]):
            done = _run("locks", "--pid", pid, "--locktype", "relation", *extra, env=env)
            assert done.returncode == 0, done.stderr
            _no_raw_controls(done.stdout)
            _lines_fit(done.stdout, columns)
            assert "[/oops][link=" in done.stdout
            if columns == 200:
                assert f"public.{shown(name)}" in done.stdout


def _as_user(dsn: str, user: str) -> str:
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}"))


async def test_a_session_whose_start_is_hidden_is_not_signalled_after_a_confirmation(
    connect: Connect, admin: asyncpg.Connection, pg_server: PgServer
) -> None:
    """A member of pg_signal_backend may signal another role's session but not
    see its backend_start: the confirmation cannot pin the session it shows, so
    it signals nothing and says why; --yes still signals by pid."""
    if not await admin.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
        pytest.skip("needs a superuser to create roles")
    signaller, target = unique_name("aiopglock_sig"), unique_name("aiopglock_tgt")
    await admin.execute(f"CREATE ROLE {quote(signaller)} LOGIN IN ROLE pg_signal_backend")
    await admin.execute(f"CREATE ROLE {quote(target)} LOGIN")
    try:
        victim: asyncpg.Connection = await connect(user=target)
        pid = victim.get_server_pid()
        dsn = _as_user(pg_server.dsn, signaller)
        done = _run("terminate", str(pid), env=_env(dsn), input="y\n")
        assert done.returncode == 1
        assert "backend_start is not visible" in _one_error_line(done)
        assert await _alive(admin, pid)
        done = _run("terminate", "--yes", str(pid), env=_env(dsn))
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == [f"terminated {pid}"]
        await _wait_gone(admin, pid)
    finally:
        for role in (signaller, target):
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
            )

        async def no_sessions() -> bool:
            return not await admin.fetchval(
                "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE usename = ANY($1::text[]))",
                [signaller, target],
            )

        await wait_until(no_sessions, message="the test roles' sessions to exit")
        await admin.execute(f"DROP ROLE {quote(signaller)}, {quote(target)}")


async def test_a_server_that_never_answers_is_one_readable_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A TimeoutError has no message of its own: the line says what happened."""
    from aiopglock.cli import _connection as _cli

    # A listening socket never accepted: the kernel completes the handshake,
    # nobody ever answers the startup message.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    monkeypatch.setattr(_cli, "CONNECT_TIMEOUT", 0.2)
    try:
        with pytest.raises(
            _cli.ConnectFailed, match=r"^cannot connect to PostgreSQL: no answer within 0\.2 s$"
        ):
            await _cli.connect(f"postgresql://postgres@127.0.0.1:{port}/db")
    finally:
        listener.close()


def test_no_server_matching_target_session_attrs_is_one_line(pg_server: PgServer) -> None:
    """The test server is a primary: ``target_session_attrs=standby`` matches
    none, which asyncpg raises as an InternalClientError of its own."""
    sep = "&" if "?" in pg_server.dsn else "?"
    done = _run("--dsn", f"{pg_server.dsn}{sep}target_session_attrs=standby", "locks")
    assert done.returncode == 1
    assert "cannot connect to PostgreSQL" in _one_error_line(done)
    assert "Traceback" not in done.stderr
