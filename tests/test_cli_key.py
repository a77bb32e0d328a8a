"""``aiopglock locks --key``: the holders and waiters of one advisory key, from
the command line, against real sessions (plain SQL on connections of the test's
own). Usage errors run in-process (no server is reached: the DSN given is
unreachable); the scene runs ``python -m aiopglock`` as a user would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from aiopglock import advisory_key
from aiopglock._keys import AdvisoryKey, lock_ids
from aiopglock.cli._app import run
from tests._helpers import Connect, PgServer, holders, wait_until, waiters

APP = "aiopglock-tests-cli-key"
UNREACHABLE = "postgresql://postgres@127.0.0.1:1/nowhere"


def _env(dsn: str, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "COLUMNS", "LINES") and not k.startswith(("PG", "AIOPGLOCK_"))
    }
    return {**env, "DATABASE_URL": dsn, **extra}


def _locks(dsn: str, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "aiopglock", "locks", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(dsn, **extra),
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return done


def _json(dsn: str, *args: str) -> set[tuple[int, bool, str, Any]]:
    documents = json.loads(_locks(dsn, "--json", *args).stdout)
    seen = {(d["pid"], d["granted"], d["mode"], json.dumps(d["key"])) for d in documents}
    assert len(seen) == len(documents)
    return seen


def _statement(key: AdvisoryKey, *, shared: bool = False, unlock: bool = False) -> str:
    suffix = "_shared" if shared else ""
    args = "$1::int4, $2::int4" if isinstance(key, tuple) else "$1::int8"
    return f"pg_advisory_{'unlock' if unlock else 'lock'}{suffix}({args})"


def _args(key: AdvisoryKey) -> tuple[int, ...]:
    return key if isinstance(key, tuple) else (key,)


class _Scene:
    def __init__(self, connect: Connect, admin: asyncpg.Connection) -> None:
        self.connect, self.admin = connect, admin
        self.tasks: list[asyncio.Task[Any]] = []
        self.sessions: list[asyncpg.Connection] = []

    async def session(self) -> tuple[asyncpg.Connection, int]:
        conn: asyncpg.Connection = await self.connect(server_settings={"application_name": APP})
        self.sessions.append(conn)
        return conn, conn.get_server_pid()

    async def hold(self, key: AdvisoryKey, *, shared: bool = False) -> int:
        conn, pid = await self.session()
        await conn.execute(f"SELECT {_statement(key, shared=shared)}", *_args(key))
        return pid

    async def wait(self, key: AdvisoryKey, *, shared: bool = False) -> int:
        """A session waiting for ``key`` that lets go as soon as it is granted."""
        conn, pid = await self.session()
        before = len(await waiters(self.admin, key))
        statement = (
            f"SELECT {_statement(key, shared=shared, unlock=True)} "
            f"FROM {_statement(key, shared=shared)} AS granted"
        )
        self.tasks.append(asyncio.ensure_future(conn.execute(statement, *_args(key))))

        async def queued() -> bool:
            return pid in await waiters(self.admin, key) and (
                len(await waiters(self.admin, key)) > before
            )

        await wait_until(queued, message=f"backend {pid} to wait for {key!r}")
        return pid

    async def close(self) -> None:
        for conn in self.sessions:
            with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError):
                await conn.execute("SELECT pg_advisory_unlock_all()")
        for task in self.tasks:
            with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError):
                await asyncio.wait_for(task, 10)


@pytest.fixture
async def scene(connect: Connect, admin: asyncpg.Connection) -> AsyncIterator[_Scene]:
    made = _Scene(connect, admin)
    try:
        yield made
    finally:
        await made.close()


def _text(key: AdvisoryKey) -> str:
    return json.dumps(list(key) if isinstance(key, tuple) else key)


async def test_locks_key_finds_holders_and_waiters_of_each_key_form(
    scene: _Scene, admin: asyncpg.Connection, pg_server: PgServer
) -> None:
    dsn = pg_server.dsn
    name = f"tests.test_cli_key:{uuid.uuid4().hex}"
    text_key = advisory_key(name)
    # An int key with high half 0: the pair (0, number) has its classid and objid.
    number = 2**30 + secrets.randbits(30)
    pair = (2**20 + secrets.randbits(30), -(2**20 + secrets.randbits(30)))
    unsigned = (pair[0] & 0xFFFFFFFF) << 32 | (pair[1] & 0xFFFFFFFF)
    joined = unsigned - 2**64 if unsigned >= 2**63 else unsigned  # the int8 of pair's halves
    assert lock_ids(joined)[:2] == lock_ids(pair)[:2]
    assert lock_ids(number)[:2] == lock_ids((0, number))[:2]

    # A text key: a holder and two waiters.
    holder = await scene.hold(text_key)
    first, second = await scene.wait(text_key), await scene.wait(text_key)
    # An int key: two shared holders and an exclusive waiter.
    share1 = await scene.hold(number, shared=True)
    share2 = await scene.hold(number, shared=True)
    excluder = await scene.wait(number)
    # A pair key: an exclusive holder, a shared and an exclusive waiter.
    pair_holder = await scene.hold(pair)
    pair_sharer = await scene.wait(pair, shared=True)
    pair_excluder = await scene.wait(pair)
    # Look-alikes, each on a session of its own.
    twin_pair = await scene.hold((0, number))
    twin_text = await scene.hold(advisory_key(str(number)))
    twin_joined = await scene.hold(joined)

    exclusive, share = "ExclusiveLock", "ShareLock"
    assert _json(dsn, "--key", name) == {
        (holder, True, exclusive, _text(text_key)),
        (first, False, exclusive, _text(text_key)),
        (second, False, exclusive, _text(text_key)),
    }
    assert _json(dsn, "--key", f"int:{number}") == {
        (share1, True, share, _text(number)),
        (share2, True, share, _text(number)),
        (excluder, False, exclusive, _text(number)),
    }
    assert _json(dsn, "--key", f"pair:{pair[0]},{pair[1]}") == {
        (pair_holder, True, exclusive, _text(pair)),
        (pair_sharer, False, share, _text(pair)),
        (pair_excluder, False, exclusive, _text(pair)),
    }
    # The look-alikes are found under their own keys only.
    assert _json(dsn, "--key", f"pair:0,{number}") == {
        (twin_pair, True, exclusive, _text((0, number)))
    }
    assert _json(dsn, "--key", f"str:{number}") == {
        (twin_text, True, exclusive, _text(advisory_key(str(number))))
    }
    assert _json(dsn, "--key", f"int:{joined}") == {(twin_joined, True, exclusive, _text(joined))}
    # With another filter; and as a table.
    assert _json(dsn, "--key", name, "--blocked") == {
        (first, False, exclusive, _text(text_key)),
        (second, False, exclusive, _text(text_key)),
    }
    table = _locks(dsn, "--key", f"int:{number}", COLUMNS="200").stdout
    assert "3 locks, 1 waiting" in table
    rows = [line.split() for line in table.splitlines() if line.strip()]
    assert rows[-1][:2] == ["3", "locks,"]  # the footer
    assert sorted(int(row[0]) for row in rows[:-1] if row[0].isdigit()) == sorted(
        [share1, share2, excluder]
    )
    # What the command showed is what the server has.
    assert await holders(admin, text_key) == [holder]
    assert await waiters(admin, number) == [excluder]
    assert await waiters(admin, pair) == sorted([pair_sharer, pair_excluder])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--key", "42"], "ambiguous: write 'int:42' for the integer key, or 'str:42'"),
        (["--key", "1,2"], "ambiguous: write 'pair:1,2'"),
        (["--key", "int:x"], "int: takes a decimal integer"),
        (["--key", "pair:1"], "pair: takes two integers"),
        (["--key", "int:9223372036854775808"], "does not fit a signed 64-bit integer"),
        (["--key", "pair:0,2147483648"], "does not fit a signed 32-bit integer"),
        (["--key", ""], "empty string"),
        (["--key", "k", "--relation", "t"], "--key and --relation cannot be used together"),
        (["--key", "k", "--locktype", "relation"], "--key needs --locktype advisory"),
    ],
)
def test_locks_key_usage_errors_come_before_connecting(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["--dsn", UNREACHABLE, "locks", *args]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aiopglock: "), err
    assert message in lines[0]
    assert "cannot connect" not in err


def test_locks_help_names_the_key_forms(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["locks", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for form in ("--key KEY", "int:N", "pair:A,B", "str:NAME"):
        assert form in out
