"""Readable lock names: ``LockInfo.name`` and ``aiopglock locks`` read the
leading comment that names a ``str`` key (``aiopglock._names``) back from
``pg_stat_activity``, and trust it only when the name hashes to the key.

The named sessions send the statement text the library sends, by hand
(``comment(name) + "SELECT pg_catalog.pg_advisory_lock(<key>)"``), on raw
connections of the test's own; what they hold and wait for is read from
``pg_locks``, what they ran from ``pg_stat_activity``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aiopglock
from aiopglock import _names, advisory_key
from aiopglock._keys import AdvisoryKey
from aiopglock._names import MAX_COMMENT, MAX_NAME, comment, parse
from aiopglock._semaphore import slot_key
from tests._helpers import Connect, PgServer, holders, wait_until, waiters

APP = "aiopglock-tests-lock-names"

# No example database on disk (the work tree stays clean); no deadline (the
# server round trips vary).
PURE = settings(database=None, deadline=None, max_examples=300)
SERVER = settings(
    database=None,
    deadline=None,
    max_examples=50,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

HOSTILE = [
    "a */ b",
    "/* nested",
    "*/ SELECT pg_catalog.pg_terminate_backend(1); /*",
    "it's",
    'say "hi"',
    "back\\slash\\",
    "nul\x00byte",
    "grüße, 東京, 🔒",
    "semi;colon",
    "$$ dollar $q$",
    "\u202eoverride\x1b[31m red",
    "line\nbreak\ttab",
    "x" * MAX_NAME,
    "é" * 150,  # 900 characters as escapes: the comment still fits
]


def _unique(label: str = "name") -> str:
    return f"tests.test_lock_names_view:{label}:{uuid.uuid4().hex}"


def _lock_sql(key: AdvisoryKey) -> str:
    """The lock statement, its key as a literal (as the named statement sends it)."""
    if isinstance(key, tuple):
        return f"SELECT pg_catalog.pg_advisory_lock({key[0]}, {key[1]})"
    return f"SELECT pg_catalog.pg_advisory_lock({key})"


def _named(name: str, key: AdvisoryKey, slot: int | None = None) -> str:
    text = comment(name, slot)
    assert text is not None
    return text + _lock_sql(key)


class _Sessions:
    """Sessions that hold or wait for advisory keys; all let go at teardown."""

    def __init__(self, connect: Connect, admin: asyncpg.Connection) -> None:
        self.connect, self.admin = connect, admin
        self.conns: list[asyncpg.Connection] = []
        self.tasks: dict[int, asyncio.Task[Any]] = {}

    async def session(self) -> asyncpg.Connection:
        conn: asyncpg.Connection = await self.connect(server_settings={"application_name": APP})
        self.conns.append(conn)
        return conn

    async def hold(self, statement: str, key: AdvisoryKey) -> asyncpg.Connection:
        conn = await self.session()
        await conn.execute(statement)
        assert conn.get_server_pid() in await holders(self.admin, key)
        return conn

    async def wait(self, statement: str, key: AdvisoryKey) -> int:
        conn = await self.session()
        pid = conn.get_server_pid()
        self.tasks[pid] = asyncio.ensure_future(conn.execute(statement))

        async def queued() -> bool:
            return pid in await waiters(self.admin, key)

        await wait_until(queued, message=f"backend {pid} to wait for {key!r}")
        return pid

    async def close(self) -> None:
        # The waits still queued are cancelled (each would be granted in turn
        # only once the one before it let go); then every session lets go.
        waiting = [pid for pid, task in self.tasks.items() if not task.done()]
        await self.admin.execute(
            "SELECT pg_catalog.pg_cancel_backend(p) FROM unnest($1::int4[]) AS p", waiting
        )
        for task in self.tasks.values():
            with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError):
                await asyncio.wait_for(task, 10)
        for conn in self.conns:
            with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError):
                await conn.execute("SELECT pg_catalog.pg_advisory_unlock_all()")


@pytest.fixture
async def sessions(connect: Connect, admin: asyncpg.Connection) -> AsyncIterator[_Sessions]:
    made = _Sessions(connect, admin)
    try:
        yield made
    finally:
        await made.close()


async def _activity(admin: asyncpg.Connection, pid: int) -> str:
    query: str = await admin.fetchval(
        "SELECT query FROM pg_catalog.pg_stat_activity WHERE pid = $1", pid
    )
    return query


def _names_by_pid(infos: list[aiopglock.LockInfo]) -> dict[tuple[int, bool], str | None]:
    return {(info.pid, info.granted): info.name for info in infos}


# --------------------------------------------------------------------------- locks()


async def test_a_holder_is_named_through_its_named_waiter(
    sessions: _Sessions, admin: asyncpg.Connection
) -> None:
    name = _unique("orders")
    key = advisory_key(name)
    holder = await sessions.hold(_named(name, key), key)
    # The holder moves on: its activity no longer names the key.
    await holder.execute("SELECT 1")
    assert await _activity(admin, holder.get_server_pid()) == "SELECT 1"
    assert [i.name for i in await aiopglock.locks(admin, key=name)] == [None]

    waiter = await sessions.wait(_named(name, key), key)
    assert _names.parse(await _activity(admin, waiter)) == (name, None)
    infos = await aiopglock.locks(admin, key=name)
    assert _names_by_pid(infos) == {(holder.get_server_pid(), True): name, (waiter, False): name}
    # Unfiltered too, and the name is the key's only.
    every = await aiopglock.locks(admin)
    assert {(i.pid, i.granted) for i in every if i.name == name} == set(_names_by_pid(infos))
    assert all(i.key == key for i in every if i.name == name)
    assert await holders(admin, key) == [holder.get_server_pid()]
    assert await waiters(admin, key) == [waiter]


async def test_a_waiter_is_named_through_its_named_holder(
    sessions: _Sessions, admin: asyncpg.Connection
) -> None:
    name = _unique("reports")
    key = advisory_key(name)
    holder = await sessions.hold(_named(name, key), key)
    waiter = await sessions.wait(_lock_sql(key), key)  # no comment
    infos = await aiopglock.locks(admin, key=key)  # by the int key: the same rows
    assert _names_by_pid(infos) == {(holder.get_server_pid(), True): name, (waiter, False): name}
    # Another key of the same sessions is not named by this one.
    other = advisory_key(_unique("other"))
    await holder.execute(f"SELECT pg_catalog.pg_advisory_lock({other})")
    assert [i.name for i in await aiopglock.locks(admin, key=other)] == [None]


async def test_a_forged_comment_is_not_trusted(
    sessions: _Sessions, admin: asyncpg.Connection
) -> None:
    real, fake = _unique("real"), _unique("fake")
    key = advisory_key(real)
    forger = await sessions.hold(_named(fake, key), key)
    assert _names.parse(await _activity(admin, forger.get_server_pid())) == (fake, None)
    # Comments that do not parse, or name nothing a key can hash from.
    hand_made = [
        '/* aiopglock "\\ud800" */ ',  # a lone surrogate: no UTF-8, no key
        '/* aiopglock "" */ ',  # the empty text is no key
        '/* aiopglock "unclosed */ ',
        f'/* aiopglock "{real}" slot 0 */ ',  # a slot comment on an int8 key
    ]
    for forged in hand_made:
        waiter = await sessions.wait(forged + _lock_sql(key), key)
        assert await _activity(admin, waiter) == forged + _lock_sql(key)
    infos = await aiopglock.locks(admin, key=key)
    assert len(infos) == 1 + len(hand_made)
    assert [i.name for i in infos] == [None] * len(infos)
    assert [i.name for i in await aiopglock.locks(admin) if i.key == key] == [None] * len(infos)


async def test_a_semaphore_slot_comment_names_that_slot_only(
    sessions: _Sessions, admin: asyncpg.Connection
) -> None:
    name = _unique("sem")
    two, three, four = (slot_key(name, slot) for slot in (2, 3, 4))
    await sessions.hold(_named(name, two, slot=2), two)
    # Slot 3 held by a session whose comment says slot 2; slot 4 by one whose
    # comment names the semaphore without a slot (the int8 key of the name).
    await sessions.hold(_named(name, three, slot=2), three)
    await sessions.hold(_named(name, four), four)
    assert [i.name for i in await aiopglock.locks(admin, key=two)] == [name]
    assert [i.name for i in await aiopglock.locks(admin, key=three)] == [None]
    assert [i.name for i in await aiopglock.locks(admin, key=four)] == [None]
    # A waiter whose comment is right names slot 3, its holder included.
    waiter = await sessions.wait(_named(name, three, slot=3), three)
    infos = await aiopglock.locks(admin, key=three)
    assert [(i.granted, i.name) for i in infos] == [(True, name), (False, name)]
    assert infos[1].pid == waiter
    assert await waiters(admin, three) == [waiter]


async def test_a_name_stays_in_its_database(
    sessions: _Sessions, connect: Connect, admin: asyncpg.Connection
) -> None:
    """Advisory locks are per database: the same key in another database is
    another lock, and a name found in one does not name it."""
    name = _unique("db")
    key = advisory_key(name)
    other_db = await admin.fetchval(
        "SELECT datname FROM pg_catalog.pg_database WHERE datname <> current_database() "
        "AND datallowconn ORDER BY datname LIMIT 1"
    )
    here = await sessions.hold(_named(name, key), key)
    there: asyncpg.Connection = await connect(database=other_db)
    try:
        await there.execute(_lock_sql(key))
        infos = await aiopglock.locks(admin, key=key, all_databases=True)
        assert {(i.pid, i.database, i.name) for i in infos} == {
            (here.get_server_pid(), await admin.fetchval("SELECT current_database()"), name),
            (there.get_server_pid(), other_db, None),
        }
    finally:
        await there.execute("SELECT pg_catalog.pg_advisory_unlock_all()")


@pytest.mark.parametrize("name", HOSTILE, ids=range(len(HOSTILE)))
async def test_hostile_names_survive_the_server(
    name: str, sessions: _Sessions, admin: asyncpg.Connection
) -> None:
    key = advisory_key(name)
    conn = await sessions.hold(_named(name, key), key)
    # Exactly the text sent, read back: the comment did not end early.
    query = await _activity(admin, conn.get_server_pid())
    assert query == _named(name, key)
    assert parse(query) == (name, None)
    assert [i.name for i in await aiopglock.locks(admin, key=key)] == [name]


# --------------------------------------------------------------------------- the command line


def _locks(dsn: str, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "COLUMNS", "LINES") and not k.startswith(("PG", "AIOPGLOCK_"))
    }
    done = subprocess.run(
        [sys.executable, "-m", "aiopglock", "locks", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "DATABASE_URL": dsn, **extra},
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return done


async def test_the_command_line_shows_the_name(
    sessions: _Sessions, admin: asyncpg.Connection, pg_server: PgServer
) -> None:
    name = f"orders:{uuid.uuid4().hex[:12]}"
    key = advisory_key(name)
    holder = (await sessions.hold(_named(name, key), key)).get_server_pid()
    await (await sessions.session()).execute(_lock_sql(advisory_key(_unique())))  # unnamed
    waiter = await sessions.wait(_named(name, key), key)
    hostile = "evil\x1b[31m 'x'"
    await sessions.hold(_named(hostile, advisory_key(hostile)), advisory_key(hostile))

    documents = json.loads(_locks(pg_server.dsn, "--json", "--key", name).stdout)
    assert sorted((d["pid"], d["granted"], d["name"], d["key"]) for d in documents) == sorted(
        [(holder, True, name, key), (waiter, False, name, key)]
    )
    table = _locks(pg_server.dsn, "--key", name, COLUMNS="100").stdout
    lines = {
        int(line.split()[0]): line for line in table.splitlines() if line[:6].strip().isdigit()
    }
    assert set(lines) == {holder, waiter}
    for line in lines.values():
        assert f"advisory {name!r}" in line
    assert "2 locks, 1 waiting" in table
    # Every lock of the test's sessions: only the named key shows a name.
    table = _locks(pg_server.dsn, "--locktype", "advisory", COLUMNS="100").stdout
    assert table.count(f"advisory {name!r}") == 2
    # A name is shown as a Python literal: no escape sequence reaches the terminal.
    assert f"advisory {hostile!r}" in table
    assert "\x1b" not in table
    assert await holders(admin, key) == [holder]
    assert await waiters(admin, key) == [waiter]


# --------------------------------------------------------------------------- comment() and parse()


# Text heavy in what could end a comment, open a nested one or break the
# JSON string; and any text.
_MARKS = st.sampled_from(["/", "*", "*/", "/*", '"', "\\", "\\u002a", "'", "$$", ";", "\x00"])
names = st.text(max_size=MAX_NAME) | st.lists(_MARKS | st.characters(), max_size=MAX_NAME).map(
    lambda parts: "".join(parts)[:MAX_NAME]
)


def _plain_ascii(name: str) -> bool:
    """Each character one or two in the comment: a name that always fits."""
    return all(" " <= c <= "~" and c != "*" for c in name)


@PURE
@given(name=names, slot=st.none() | st.integers(0, 2**31))
def test_comment_round_trips(name: str, slot: int | None) -> None:
    text = comment(name, slot)
    if text is None:  # too long once escaped
        assert not _plain_ascii(name)
        return
    assert len(text) <= MAX_COMMENT
    assert text.startswith("/* aiopglock ") and text.endswith(" */ ")
    body = text[len("/* ") : -len(" */ ")]
    assert "*/" not in body and "/*" not in body
    assert text.isascii() and text.isprintable()
    assert parse(text + "SELECT 1") == (name, slot)
    assert parse(text) == (name, slot)


@PURE
@given(name=st.text(min_size=MAX_NAME + 1, max_size=MAX_NAME + 40))
def test_a_long_name_is_not_sent(name: str) -> None:
    assert comment(name) is None
    assert comment(name, 1) is None


@PURE
@given(query=st.text() | st.text().map(lambda t: "/* aiopglock " + t))
def test_parse_takes_any_text(query: str) -> None:
    parsed = parse(query)
    assert parsed is None or isinstance(parsed[0], str)


def test_a_name_whose_comment_would_be_cut_is_not_sent() -> None:
    assert comment("🔒" * MAX_NAME) is None  # 12 characters each as escapes
    assert comment("🔒" * 80) is not None


def test_names_off_sends_no_comment() -> None:
    _names.set_enabled(False)
    try:
        assert comment("x") is None
    finally:
        _names.set_enabled(True)
    assert comment("x") == '/* aiopglock "x" */ '


@pytest.fixture
async def pair(connect: Connect) -> tuple[asyncpg.Connection, asyncpg.Connection]:
    return await connect(), await connect()


@pytest.mark.embedded_only
@SERVER
@given(name=names)
async def test_any_name_round_trips_through_pg_stat_activity(
    name: str, pair: tuple[asyncpg.Connection, asyncpg.Connection]
) -> None:
    sender, reader = pair
    text = comment(name)
    if text is None:
        return
    assert await sender.execute(text + "SELECT 1") == "SELECT 1"
    # The sender is idle: its query is its last statement.
    query = await _activity(reader, sender.get_server_pid())
    assert query == text + "SELECT 1"[: MAX_COMMENT - len(text)]  # what the server keeps
    assert parse(query) == (name, None)
