"""``aiopglock.locks``, ``cancel`` and ``terminate``, against the real server.

Every lock is made with plain SQL on connections of the test's own, and every
claim of ``locks()`` is compared with what the server says through the admin
connection (``pg_locks``, ``pg_blocking_pids``, ``pg_stat_activity``). Keys,
tables and application names are unique per test, and every assertion is
narrowed to the test's own pids, so runs sharing one server never meet.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aiopglock
from aiopglock import LockInfo, advisory_key
from aiopglock._keys import AdvisoryKey, lock_ids
from tests._helpers import (
    Connect,
    PgServer,
    holders,
    wait_for_release,
    wait_for_waiter,
    wait_until,
    waiters,
)

APP = "aiopglock-tests-introspect"
NO_SUCH_PID = 2**31 - 1  # above every kernel's pid_max: never a backend


def _key() -> str:
    return f"tests.test_introspect:{uuid.uuid4().hex}"


def _quote(*parts: str) -> str:
    return ".".join('"' + part.replace('"', '""') + '"' for part in parts)


async def _session(connect: Connect) -> asyncpg.Connection:
    conn: asyncpg.Connection = await connect(server_settings={"application_name": APP})
    return conn


async def _blocking_pids(admin: asyncpg.Connection, pid: int) -> list[int]:
    pids: list[int] = await admin.fetchval("SELECT pg_blocking_pids($1)", pid)
    return sorted(set(pids))


async def _alive(admin: asyncpg.Connection, pid: int) -> bool:
    found: bool = await admin.fetchval(
        "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE pid = $1)", pid
    )
    return found


async def _wait_until_blocked_by(admin: asyncpg.Connection, pid: int, blocker: int) -> None:
    async def blocked() -> bool:
        return blocker in await _blocking_pids(admin, pid)

    await wait_until(blocked, message=f"backend {pid} to wait for {blocker}")


@contextlib.asynccontextmanager
async def _running(query: Awaitable[Any]) -> AsyncIterator[asyncio.Task[Any]]:
    """Run ``query`` (one that will wait for a lock) as a task; at exit, the
    test has let it through or cancelled it: wait for it, whatever it raised."""
    task: asyncio.Task[Any] = asyncio.ensure_future(query)
    try:
        yield task
    finally:
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(task, 10)


def _only(infos: list[LockInfo], **fields: object) -> LockInfo:
    found = [
        info
        for info in infos
        if all(getattr(info, name) == value for name, value in fields.items())
    ]
    assert len(found) == 1, (fields, infos)
    return found[0]


class _Tables:
    def __init__(self, admin: asyncpg.Connection) -> None:
        self.admin = admin
        self.made: list[str] = []

    async def schema(self, name: str) -> None:
        await self.admin.execute(f"CREATE SCHEMA {_quote(name)}")
        self.made.append(f"SCHEMA {_quote(name)}")

    async def create(self, *parts: str) -> int:
        qualified = _quote(*parts)
        await self.admin.execute(f"CREATE TABLE {qualified} (id int PRIMARY KEY, v text)")
        await self.admin.execute(f"INSERT INTO {qualified} VALUES (1, 'one'), (2, 'two')")
        self.made.append(f"TABLE {qualified}")
        oid: int = await self.admin.fetchval("SELECT to_regclass($1)::oid", qualified)
        return oid


@pytest.fixture
async def tables(admin: asyncpg.Connection) -> AsyncIterator[_Tables]:
    made = _Tables(admin)
    try:
        yield made
    finally:
        for what in reversed(made.made):
            await admin.execute(f"DROP {what} CASCADE")


def _unique(prefix: str) -> str:
    return f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"


# --------------------------------------------------------------------------- advisory waits


async def test_an_advisory_waiter_and_its_blocker(
    connect: Connect, admin: asyncpg.Connection
) -> None:
    key = _key()
    holder, waiter = await _session(connect), await _session(connect)
    hpid, wpid = holder.get_server_pid(), waiter.get_server_pid()
    await holder.execute("SELECT pg_advisory_lock($1)", advisory_key(key))
    async with _running(waiter.fetchval("SELECT pg_advisory_lock($1)", advisory_key(key))):
        await wait_for_waiter(admin, advisory_key(key))
        assert await _blocking_pids(admin, wpid) == [hpid]

        async def waited() -> LockInfo | None:
            infos = await aiopglock.locks(admin, pids=[wpid], locktype="advisory")
            info = _only(infos, pid=wpid)
            assert info.wait_duration is not None
            return info if info.wait_duration > timedelta(0) else None

        first = await wait_until(waited, message="a wait_duration above 0")
        assert first.locktype == "advisory"
        assert first.mode == "ExclusiveLock"
        assert first.granted is False
        assert first.key == advisory_key(key)
        assert first.relation is None
        assert first.blocking_pids == [hpid]
        assert first.state == "active"
        assert first.query == "SELECT pg_advisory_lock($1)"
        assert first.application_name == APP
        assert first.database == await admin.fetchval("SELECT current_database()")
        assert first.user == await admin.fetchval("SELECT current_user")
        assert first.backend_type == "client backend"
        assert first.query_start is not None and first.backend_start is not None

        # The duration comes from the server's clock and grows while the wait lasts.
        async def later() -> LockInfo | None:
            again = _only(await aiopglock.locks(admin, pids=wpid, locktype="advisory"), pid=wpid)
            assert again.wait_duration is not None and first.wait_duration is not None
            return again if again.wait_duration > first.wait_duration else None

        await wait_until(later, message="a growing wait_duration")

        held = _only(await aiopglock.locks(admin, pids=[hpid], locktype="advisory"), pid=hpid)
        assert held.granted is True
        assert held.key == advisory_key(key)
        assert held.blocking_pids == []
        assert held.wait_duration is None
        assert held.state == "idle"

        # blocked=True: the wait and nothing held.
        blocked = [
            info for info in await aiopglock.locks(admin, blocked=True) if info.pid in (hpid, wpid)
        ]
        assert [(info.pid, info.key, info.granted) for info in blocked] == [
            (wpid, advisory_key(key), False)
        ]
        await holder.execute("SELECT pg_advisory_unlock($1)", advisory_key(key))
    assert await holders(admin, advisory_key(key)) == [wpid]
    assert await aiopglock.locks(admin, pids=[wpid], blocked=True) == []


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(_key(), id="str"),
        pytest.param(secrets.randbits(62) + 1, id="int"),
        pytest.param(-(secrets.randbits(62) + 1), id="negative-int"),
        pytest.param(2**63 - 1 - secrets.randbits(16), id="near-int8-max"),
        pytest.param(-(2**63) + secrets.randbits(16), id="near-int8-min"),
        pytest.param((secrets.randbits(30), -(secrets.randbits(30) + 1)), id="pair"),
        pytest.param((-(2**31), 2**31 - 1 - secrets.randbits(8)), id="pair-extremes"),
    ],
)
async def test_advisory_keys_are_decoded_as_advisory_key_returns_them(
    connect: Connect, admin: asyncpg.Connection, key: aiopglock._keys.Key
) -> None:
    conn = await _session(connect)
    pid = conn.get_server_pid()
    sent = advisory_key(key)
    if isinstance(sent, tuple):
        await conn.execute("SELECT pg_advisory_lock($1::int4, $2::int4)", *sent)
        await conn.execute("SELECT pg_advisory_lock_shared($1::int4, $2::int4)", *sent)
    else:
        await conn.execute("SELECT pg_advisory_lock($1::int8)", sent)
        await conn.execute("SELECT pg_advisory_lock_shared($1::int8)", sent)
    infos = await aiopglock.locks(admin, pids=pid, locktype="advisory")
    assert [(info.key, info.mode, info.granted) for info in infos] == [
        (sent, "ExclusiveLock", True),
        (sent, "ShareLock", True),
    ]
    assert type(infos[0].key) is type(sent)
    # And the raw columns are pg_locks' own.
    rows = await admin.fetch(
        "SELECT classid::int8, objid::int8, objsubid::int4 FROM pg_locks "
        "WHERE pid = $1 AND locktype = 'advisory' ORDER BY mode",
        pid,
    )
    assert {(row[0], row[1], row[2]) for row in rows} == {
        (info.classid, info.objid, info.objsubid) for info in infos
    }


# --------------------------------------------------------------------------- row and table waits


async def test_a_row_waiter_and_its_blocker(
    connect: Connect, admin: asyncpg.Connection, tables: _Tables
) -> None:
    name = _unique("aiopglock_rows")
    await tables.create("public", name)
    holder, waiter = await _session(connect), await _session(connect)
    hpid, wpid = holder.get_server_pid(), waiter.get_server_pid()
    select = f"SELECT * FROM {_quote('public', name)} WHERE id = 1 FOR UPDATE"
    await holder.execute("BEGIN")
    await holder.fetch(select)
    xid = int(await holder.fetchval("SELECT pg_current_xact_id()::text"))
    await waiter.execute("BEGIN")
    async with _running(waiter.fetch(select)) as task:
        await _wait_until_blocked_by(admin, wpid, hpid)
        infos = await aiopglock.locks(admin, pids=[hpid, wpid])

        # The waiter waits for the holder's transaction, and says for whom.
        wait = _only(infos, pid=wpid, granted=False)
        assert wait.locktype == "transactionid"
        assert wait.mode == "ShareLock"
        assert wait.transactionid == xid
        assert wait.blocking_pids == [hpid]
        assert wait.wait_duration is not None
        assert wait.query == select
        assert wait.xact_start is not None
        # ... holding the row's tuple lock, named with its table.
        row = _only(infos, pid=wpid, locktype="tuple")
        assert row.granted and row.mode == "AccessExclusiveLock"
        assert row.relation == f"public.{name}"
        assert (row.page, row.tuple) == (0, 1)
        # The holder: its transaction id, its virtual transaction, the table.
        assert _only(infos, pid=hpid, locktype="transactionid").transactionid == xid
        own = _only(infos, pid=hpid, locktype="virtualxid")
        assert own.granted and own.virtualxid == own.virtualtransaction
        table = _only(infos, pid=hpid, locktype="relation", relation=f"public.{name}")
        assert table.mode == "RowShareLock" and table.granted
        # Every row the server has for these two pids, no more, no less.
        count = await admin.fetchval(
            "SELECT count(*) FROM pg_locks WHERE pid = ANY($1::int4[])", [hpid, wpid]
        )
        assert len(infos) == count

        async def grown() -> bool:
            again = await aiopglock.locks(admin, pids=wpid, blocked=True)
            duration = _only(again, pid=wpid).wait_duration
            assert duration is not None and wait.wait_duration is not None
            return duration > wait.wait_duration

        await wait_until(grown, message="a growing wait_duration")
        await holder.execute("ROLLBACK")
        assert len(await asyncio.wait_for(task, 10)) == 1
    assert await aiopglock.locks(admin, pids=wpid, blocked=True) == []
    await waiter.execute("ROLLBACK")
    assert await aiopglock.locks(admin, pids=[hpid, wpid]) == []


async def test_a_table_wait_names_schema_and_table_with_odd_characters(
    connect: Connect, admin: asyncpg.Connection, tables: _Tables
) -> None:
    schema = _unique('aiopglock "odd" schema')
    name = _unique('Odd "table".with dot')
    await tables.schema(schema)
    oid = await tables.create(schema, name)
    holder, waiter = await _session(connect), await _session(connect)
    hpid, wpid = holder.get_server_pid(), waiter.get_server_pid()
    qualified = _quote(schema, name)
    await holder.execute("BEGIN")
    await holder.execute(f"LOCK TABLE {qualified} IN SHARE ROW EXCLUSIVE MODE")
    await waiter.execute("BEGIN")
    async with _running(waiter.execute(f"LOCK TABLE {qualified}")) as task:
        await _wait_until_blocked_by(admin, wpid, hpid)
        infos = await aiopglock.locks(admin, relation=(schema, name))
        assert [(i.pid, i.mode, i.granted, i.blocking_pids) for i in infos] == [
            (hpid, "ShareRowExclusiveLock", True, []),
            (wpid, "AccessExclusiveLock", False, [hpid]),
        ]
        assert {info.relation for info in infos} == {f"{schema}.{name}"}
        assert {info.relation_oid for info in infos} == {oid}
        assert {info.locktype for info in infos} == {"relation"}
        assert infos[1].wait_duration is not None
        await holder.execute("COMMIT")
        await asyncio.wait_for(task, 10)
    infos = await aiopglock.locks(admin, relation=(schema, name))
    assert [(i.pid, i.mode, i.granted) for i in infos] == [(wpid, "AccessExclusiveLock", True)]
    await waiter.execute("COMMIT")
    assert await aiopglock.locks(admin, relation=(schema, name)) == []


async def test_the_relation_filter_takes_every_form(
    connect: Connect, admin: asyncpg.Connection, tables: _Tables
) -> None:
    schema, name = _unique("aiopglock_s"), _unique("MixedCase")
    await tables.schema(schema)
    await tables.create(schema, name)
    public_name = _unique("aiopglock_t")
    await tables.create("public", public_name)
    conn = await _session(connect)
    pid = conn.get_server_pid()
    async with conn.transaction():
        await conn.execute(f"LOCK TABLE {_quote(schema, name)} IN SHARE MODE")
        await conn.execute(f"LOCK TABLE {_quote('public', public_name)} IN EXCLUSIVE MODE")
        for relation in ((schema, name), f"{schema}.{name}"):
            infos = await aiopglock.locks(admin, relation=relation)
            assert [(i.pid, i.mode, i.relation) for i in infos] == [
                (pid, "ShareLock", f"{schema}.{name}")
            ]
        # A bare name goes through the search_path (public), matched exactly.
        infos = await aiopglock.locks(admin, relation=public_name)
        assert [(i.pid, i.mode, i.relation) for i in infos] == [
            (pid, "ExclusiveLock", f"public.{public_name}")
        ]
        with pytest.raises(ValueError, match="relation"):
            await aiopglock.locks(admin, relation=f"{schema}.{name.lower()}")
        with pytest.raises(ValueError, match="relation"):
            await aiopglock.locks(admin, relation=name)  # not on the search_path


# --------------------------------------------------------------------------- filters


async def test_filters(
    connect: Connect, admin: asyncpg.Connection, pool: asyncpg.Pool, pg_server: PgServer
) -> None:
    key = _key()
    holder, waiter = await _session(connect), await _session(connect)
    hpid, wpid = holder.get_server_pid(), waiter.get_server_pid()
    ours = {hpid, wpid}
    await holder.execute("SELECT pg_advisory_lock($1)", advisory_key(key))
    async with _running(waiter.fetchval("SELECT pg_advisory_lock($1)", advisory_key(key))):
        await wait_for_waiter(admin, advisory_key(key))

        def mine(infos: list[LockInfo]) -> list[tuple[int, str, bool]]:
            return [(i.pid, i.locktype, i.granted) for i in infos if i.pid in ours]

        everything = mine(await aiopglock.locks(admin))
        assert (hpid, "advisory", True) in everything
        assert (wpid, "advisory", False) in everything
        assert (wpid, "virtualxid", True) in everything  # the waiter's statement
        # pids: an int, a list, a generator.
        assert mine(await aiopglock.locks(admin, pids=hpid)) == [(hpid, "advisory", True)]
        assert mine(await aiopglock.locks(admin, pids=(p for p in [hpid]))) == [
            (hpid, "advisory", True)
        ]
        assert {i.pid for i in await aiopglock.locks(admin, pids=[hpid, wpid])} == ours
        assert await aiopglock.locks(admin, pids=[]) == []
        # blocked
        assert mine(await aiopglock.locks(admin, blocked=True)) == [(wpid, "advisory", False)]
        # locktype: a name or several.
        assert mine(await aiopglock.locks(admin, locktype="virtualxid")) == [
            (wpid, "virtualxid", True)
        ]
        assert mine(await aiopglock.locks(admin, locktype=["advisory", "virtualxid"])) == [
            (hpid, "advisory", True),
            (wpid, "virtualxid", True),  # held before waiting
            (wpid, "advisory", False),
        ]
        assert mine(await aiopglock.locks(admin, locktype=("relation",))) == []
        # database: the current one by default; another shows none of ours.
        current = await admin.fetchval("SELECT current_database()")
        assert mine(await aiopglock.locks(admin, database=current)) == everything
        other = await admin.fetchval(
            "SELECT datname FROM pg_database WHERE datname <> current_database() "
            "AND datallowconn ORDER BY datname LIMIT 1"
        )
        assert mine(await aiopglock.locks(admin, database=other)) == []
        assert mine(await aiopglock.locks(admin, all_databases=True)) == everything
        with pytest.raises(ValueError, match="database"):
            await aiopglock.locks(admin, database=f"aiopglock_no_such_db_{uuid.uuid4().hex}")
        # include_self: the querying session's own locks (pg_locks itself, its vxid).
        own = admin.get_server_pid()
        assert all(info.pid != own for info in await aiopglock.locks(admin))
        mine_too = await aiopglock.locks(admin, pids=own, include_self=True)
        assert {info.locktype for info in mine_too} >= {"relation", "virtualxid"}
        assert "pg_catalog.pg_locks" in {info.relation for info in mine_too}
        # A pool works as db= (and gives its connection back).
        via_pool = await aiopglock.locks(pool, pids=[hpid, wpid], locktype="advisory")
        assert [(i.pid, i.granted) for i in via_pool] == [(hpid, True), (wpid, False)]
        assert pool.get_idle_size() == pool.get_size()
        await holder.execute("SELECT pg_advisory_unlock_all()")


# --------------------------------------------------------------------------- key lookups

_U32 = 0xFFFFFFFF


def _signed32(value: int) -> int:
    return value - 2**32 if value >= 2**31 else value


def _halves(key: int) -> tuple[int, int]:
    """The pair key whose ints are ``key``'s high and low 32 bits: the same
    classid and objid in ``pg_locks`` as the int8 ``key``, another objsubid."""
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    return _signed32(unsigned >> 32), _signed32(unsigned & _U32)


def _joined(pair: tuple[int, int]) -> int:
    """The int8 key whose high and low 32 bits are ``pair``'s ints."""
    unsigned = ((pair[0] & _U32) << 32) | (pair[1] & _U32)
    return unsigned - 2**64 if unsigned >= 2**63 else unsigned


def _statement(key: AdvisoryKey, *, shared: bool = False, unlock: bool = False) -> str:
    suffix = "_shared" if shared else ""
    call = "unlock" if unlock else "lock"
    args = "$1::int4, $2::int4" if isinstance(key, tuple) else "$1::int8"
    return f"SELECT pg_advisory_{call}{suffix}({args})"


def _args(key: AdvisoryKey) -> tuple[int, ...]:
    return key if isinstance(key, tuple) else (key,)


async def _hold(conn: asyncpg.Connection, key: AdvisoryKey, *, shared: bool = False) -> None:
    await conn.execute(_statement(key, shared=shared), *_args(key))


def _wait_for(conn: asyncpg.Connection, key: AdvisoryKey, *, shared: bool = False) -> Any:
    """A lock request that, once granted, lets go in the same statement (so that
    one release lets every waiter through in turn): FROM runs before the list."""
    lock = _statement(key, shared=shared).removeprefix("SELECT ")
    unlock = _statement(key, shared=shared, unlock=True).removeprefix("SELECT ")
    return conn.execute(f"SELECT {unlock} FROM {lock} AS granted", *_args(key))


def _seen(infos: list[LockInfo]) -> set[tuple[int, bool, str]]:
    return {(info.pid, info.granted, info.mode) for info in infos}


async def _check_waiters_blockers(admin: asyncpg.Connection, infos: list[LockInfo]) -> None:
    """Every waiting row names the blockers the server names, every held row none."""
    for info in infos:
        if info.granted:
            assert info.blocking_pids == [] and info.wait_duration is None
        else:
            assert info.blocking_pids == await _blocking_pids(admin, info.pid)
            assert info.wait_duration is not None


async def test_key_lookup_a_text_key_its_holder_and_two_waiters(
    connect: Connect, admin: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    name = _key()
    sent = advisory_key(name)
    assert isinstance(sent, int)
    holder, first, second, other = [await _session(connect) for _ in range(4)]
    hpid, pid1, pid2, opid = (c.get_server_pid() for c in (holder, first, second, other))
    await _hold(holder, sent)
    # Look-alikes on another session: the pair with the same classid and objid,
    # the text "42"-style twin (the key's decimal text), the neighbouring int.
    await _hold(other, _halves(sent))
    await _hold(other, advisory_key(str(sent)))
    await _hold(other, sent ^ 1)
    async with _running(_wait_for(first, sent)) as wait1:
        await wait_for_waiter(admin, sent)
        async with _running(_wait_for(second, sent)) as wait2:

            async def both_wait() -> bool:
                return await waiters(admin, sent) == sorted([pid1, pid2])

            await wait_until(both_wait, message="two waiters")
            infos = await aiopglock.locks(admin, key=name)
            assert _seen(infos) == {
                (hpid, True, "ExclusiveLock"),
                (pid1, False, "ExclusiveLock"),
                (pid2, False, "ExclusiveLock"),
            }
            assert len(infos) == 3
            assert {(i.locktype, i.key, i.objsubid) for i in infos} == {("advisory", sent, 1)}
            # The server agrees: the same holder and waiters in pg_locks.
            assert await holders(admin, sent) == [hpid]
            assert await waiters(admin, sent) == sorted([pid1, pid2])
            await _check_waiters_blockers(admin, infos)
            assert hpid in _only(infos, pid=pid1).blocking_pids
            assert hpid in _only(infos, pid=pid2).blocking_pids
            # The text and the int it hashes to are one key; a pool works as db=.
            assert _seen(await aiopglock.locks(admin, key=sent)) == _seen(infos)
            assert _seen(await aiopglock.locks(pool, key=name)) == _seen(infos)
            assert pool.get_idle_size() == pool.get_size()
            # Combined with the other filters (AND).
            assert _seen(await aiopglock.locks(admin, key=name, blocked=True)) == {
                (pid1, False, "ExclusiveLock"),
                (pid2, False, "ExclusiveLock"),
            }
            assert _seen(await aiopglock.locks(admin, key=name, pids=[hpid, pid2])) == {
                (hpid, True, "ExclusiveLock"),
                (pid2, False, "ExclusiveLock"),
            }
            assert await aiopglock.locks(admin, key=name, pids=opid) == []
            assert len(await aiopglock.locks(admin, key=name, locktype=["advisory"])) == 3
            current = await admin.fetchval("SELECT current_database()")
            assert len(await aiopglock.locks(admin, key=name, database=current)) == 3
            assert len(await aiopglock.locks(admin, key=name, all_databases=True)) == 3
            # The look-alikes are other keys, each found on its own.
            for twin in (_halves(sent), str(sent), sent ^ 1):
                found = await aiopglock.locks(admin, key=twin)
                assert [(i.pid, i.key) for i in found] == [(opid, advisory_key(twin))]
            await holder.execute(_statement(sent, unlock=True), sent)
            await asyncio.wait_for(wait2, 10)
        await asyncio.wait_for(wait1, 10)
    assert await aiopglock.locks(admin, key=name) == []
    assert await holders(admin, sent) == []


async def test_key_lookup_an_int_key_shared_holders_and_an_exclusive_waiter(
    connect: Connect, admin: asyncpg.Connection
) -> None:
    # High half 0: the pair (0, key) has the very classid and objid of the int8 key.
    key = 2**30 + secrets.randbits(30)
    lookalike = (0, key)
    assert lock_ids(key)[:2] == lock_ids(lookalike)[:2]
    share1, share2, waiter, other = [await _session(connect) for _ in range(4)]
    s1, s2, wpid, opid = (c.get_server_pid() for c in (share1, share2, waiter, other))
    await _hold(share1, key, shared=True)
    await _hold(share2, key, shared=True)
    await _hold(other, lookalike)
    await _hold(other, lookalike, shared=True)
    async with _running(_wait_for(waiter, key)) as wait:
        await wait_for_waiter(admin, key)
        infos = await aiopglock.locks(admin, key=key)
        assert len(infos) == 3
        assert _seen(infos) == {
            (s1, True, "ShareLock"),
            (s2, True, "ShareLock"),
            (wpid, False, "ExclusiveLock"),
        }
        assert {i.key for i in infos} == {key}
        assert _only(infos, pid=wpid).blocking_pids == sorted([s1, s2])
        await _check_waiters_blockers(admin, infos)
        assert await holders(admin, key) == sorted([s1, s2])
        # The pair with the same halves: another lock, held by `other` only.
        found = await aiopglock.locks(admin, key=lookalike)
        assert _seen(found) == {(opid, True, "ExclusiveLock"), (opid, True, "ShareLock")}
        assert {(i.key, i.objsubid) for i in found} == {(lookalike, 2)}
        # The key's decimal text is a third key: nobody holds it.
        assert await aiopglock.locks(admin, key=str(key)) == []
        # Shared holders only: blocked=True leaves the one exclusive waiter.
        assert _seen(await aiopglock.locks(admin, key=key, blocked=True)) == {
            (wpid, False, "ExclusiveLock")
        }
        await share1.execute(_statement(key, shared=True, unlock=True), key)
        assert _seen(await aiopglock.locks(admin, key=key)) == {
            (s2, True, "ShareLock"),
            (wpid, False, "ExclusiveLock"),
        }
        await share2.execute(_statement(key, shared=True, unlock=True), key)
        await asyncio.wait_for(wait, 10)
    assert await aiopglock.locks(admin, key=key) == []
    assert len(await aiopglock.locks(admin, key=lookalike)) == 2


async def test_key_lookup_a_pair_key_shared_and_exclusive_waiters(
    connect: Connect, admin: asyncpg.Connection
) -> None:
    a, b = 2**20 + secrets.randbits(30), -(2**20 + secrets.randbits(30))
    pair = (a, b)
    # Look-alikes: the int8 key of the same two halves, the swapped pair, the
    # ints alone, the pair's text.
    lookalikes: list[aiopglock._keys.Key] = [_joined(pair), (b, a), a, b, f"{a},{b}"]
    assert lock_ids(_joined(pair))[:2] == lock_ids(pair)[:2]
    holder, sharer, excluder, other = [await _session(connect) for _ in range(4)]
    hpid, spid, xpid, opid = (c.get_server_pid() for c in (holder, sharer, excluder, other))
    await _hold(holder, pair)
    for lookalike in lookalikes:
        await _hold(other, advisory_key(lookalike))
    async with _running(_wait_for(sharer, pair, shared=True)) as shared_wait:
        await wait_for_waiter(admin, pair)
        async with _running(_wait_for(excluder, pair)) as exclusive_wait:

            async def both_wait() -> bool:
                return await waiters(admin, pair) == sorted([spid, xpid])

            await wait_until(both_wait, message="two waiters")
            infos = await aiopglock.locks(admin, key=pair)
            assert len(infos) == 3
            assert _seen(infos) == {
                (hpid, True, "ExclusiveLock"),
                (spid, False, "ShareLock"),
                (xpid, False, "ExclusiveLock"),
            }
            assert {(i.key, i.objsubid) for i in infos} == {(pair, 2)}
            assert all(type(i.key) is tuple for i in infos)
            await _check_waiters_blockers(admin, infos)
            assert _only(infos, pid=spid).blocking_pids == [hpid]
            assert hpid in _only(infos, pid=xpid).blocking_pids
            for lookalike in lookalikes:
                found = await aiopglock.locks(admin, key=lookalike)
                assert [(i.pid, i.key) for i in found] == [(opid, advisory_key(lookalike))]
            await holder.execute(_statement(pair, unlock=True), *pair)
            await asyncio.wait_for(exclusive_wait, 10)
        await asyncio.wait_for(shared_wait, 10)
    assert await aiopglock.locks(admin, key=pair) == []
    assert len(await aiopglock.locks(admin, key=_joined(pair))) == 1


async def test_key_lookup_shows_the_querying_session_s_own_locks(connect: Connect) -> None:
    """The query takes no advisory lock: on a key, its own session's rows are real
    holds (session or transaction level), shown whatever include_self says."""
    name = _key()
    conn = await _session(connect)
    pid = conn.get_server_pid()
    await conn.execute("SELECT pg_advisory_lock($1)", advisory_key(name))
    assert _seen(await aiopglock.locks(conn, key=name)) == {(pid, True, "ExclusiveLock")}
    assert _seen(await aiopglock.locks(conn, key=name, include_self=True)) == {
        (pid, True, "ExclusiveLock")
    }
    # Without key=, the querying session is left out, as before.
    assert await aiopglock.locks(conn, pids=pid) == []
    await conn.execute("SELECT pg_advisory_unlock($1)", advisory_key(name))
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", advisory_key(name))
        assert _seen(await aiopglock.locks(conn, key=name)) == {(pid, True, "ShareLock")}
    assert await aiopglock.locks(conn, key=name) == []


_KEYS = st.one_of(
    st.text(min_size=1, max_size=40),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.tuples(
        st.integers(min_value=-(2**31), max_value=2**31 - 1),
        st.integers(min_value=-(2**31), max_value=2**31 - 1),
    ),
)


@settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(key=_KEYS)
async def test_key_lookup_round_trip_through_pg_locks(
    connect: Connect, admin: asyncpg.Connection, key: aiopglock._keys.Key
) -> None:
    """Whatever the key, the server's encoding of it is found by key= and
    decoded back to advisory_key(key); its look-alike of the other form is not."""
    conn = await _session(connect)  # one session per example: none left over
    pid = conn.get_server_pid()
    sent = advisory_key(key)
    lookalike: AdvisoryKey = _joined(sent) if isinstance(sent, tuple) else _halves(sent)
    await _hold(conn, sent)
    try:
        everything = await aiopglock.locks(admin, pids=pid, locktype="advisory")
        assert [(i.key, i.granted) for i in everything] == [(sent, True)]
        # Other sessions on a shared server may hold the same small key: every
        # row found must be on the key, and ours among them exactly once.
        found = await aiopglock.locks(admin, key=key)
        assert {(i.locktype, i.key) for i in found} == {("advisory", sent)}
        assert [i.pid for i in found].count(pid) == 1
        mine = await aiopglock.locks(admin, key=key, pids=pid)
        assert [(i.pid, i.key) for i in mine] == [(pid, sent)]
        assert (mine[0].classid, mine[0].objid, mine[0].objsubid) == lock_ids(sent)
        others = await aiopglock.locks(admin, key=lookalike)
        assert pid not in {i.pid for i in others}
        assert {i.key for i in others} <= {lookalike}
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("invoice:42", "invoice:42"),
        ("42a", "42a"),
        ("int:42", 42),
        ("int:-9223372036854775808", -(2**63)),
        ("int: +7 ", 7),
        ("pair:1,-2", (1, -2)),
        ("pair: -2147483648 , 2147483647", (-(2**31), 2**31 - 1)),
        ("str:42", "42"),
        ("str:1,2", "1,2"),
        ("str:int:7", "int:7"),
        ("str:str:x", "str:x"),
        ("INT:7", "INT:7"),
    ],
)
def test_key_from_text(text: str, key: aiopglock._keys.Key) -> None:
    assert aiopglock._introspect.key_from_text(text) == key


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("42", "ambiguous: write 'int:42' for the integer key, or 'str:42' for the text key"),
        (" -7 ", "ambiguous: write 'int:-7'"),
        ("(42)", "ambiguous: write 'int:42'"),
        ("1,2", "ambiguous: write 'pair:1,2' for the two-int4 key, or 'str:1,2'"),
        ("(1, -2)", "ambiguous: write 'pair:1,-2'"),
        ("int:x", "int: takes a decimal integer"),
        ("int:", "int: takes a decimal integer"),
        ("int:0x10", "int: takes a decimal integer"),
        ("int:\uff14\uff12", "int: takes a decimal integer"),
        ("int:1_000", "int: takes a decimal integer"),
        ("pair:1", "pair: takes two integers"),
        ("pair:1,2,3", "pair: takes two integers"),
        ("int:9223372036854775808", "does not fit a signed 64-bit integer"),
        ("pair:2147483648,0", "does not fit a signed 32-bit integer"),
        ("", "empty string"),
        ("str:", "empty string"),
    ],
)
def test_key_from_text_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="^key: .*" + re.escape(message)):
        aiopglock._introspect.key_from_text(text)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"pids": "12"}, TypeError, "pids"),
        ({"pids": [True]}, TypeError, "pids"),
        ({"pids": [1.0]}, TypeError, "pids"),
        ({"pids": [-1]}, ValueError, "pids"),
        ({"pids": 2**31}, ValueError, "pids"),
        ({"blocked": 1}, TypeError, "blocked"),
        ({"blocked": None}, TypeError, "blocked"),
        ({"relation": 3}, TypeError, "relation"),
        ({"relation": ("public",)}, TypeError, "relation"),
        ({"relation": ("public", "")}, ValueError, "relation"),
        ({"relation": "a.b.c"}, ValueError, "relation"),
        ({"relation": "a."}, ValueError, "relation"),
        ({"relation": ""}, ValueError, "relation"),
        ({"locktype": "row"}, ValueError, "locktype"),
        ({"locktype": ["advisory", 1]}, TypeError, "locktype"),
        ({"locktype": 1}, TypeError, "locktype"),
        ({"database": 1}, TypeError, "database"),
        ({"database": ""}, ValueError, "database"),
        ({"database": "test", "all_databases": True}, ValueError, "database"),
        ({"all_databases": "yes"}, TypeError, "all_databases"),
        ({"include_self": 1}, TypeError, "include_self"),
        ({"key": True}, TypeError, "key"),
        ({"key": 1.0}, TypeError, "key"),
        ({"key": b"k"}, TypeError, "key"),
        ({"key": [1, 2]}, TypeError, "key"),
        ({"key": (1, 2, 3)}, TypeError, "key"),
        ({"key": (1, "2")}, TypeError, "key"),
        ({"key": (1, False)}, TypeError, "key"),
        ({"key": ""}, ValueError, "key"),
        ({"key": "\ud800"}, ValueError, "key"),
        ({"key": 2**63}, ValueError, "key"),
        ({"key": -(2**63) - 1}, ValueError, "key"),
        ({"key": (2**31, 0)}, ValueError, "key"),
        ({"key": (0, -(2**31) - 1)}, ValueError, "key"),
        ({"key": "k", "relation": "t"}, ValueError, "key"),
        ({"key": "k", "relation": ("public", "t")}, ValueError, "key"),
        ({"key": "k", "locktype": "relation"}, ValueError, "key"),
        ({"key": 7, "locktype": ["relation", "tuple"]}, ValueError, "key"),
        ({"key": (1, 2), "pids": "1"}, TypeError, "pids"),
    ],
)
async def test_locks_rejects_bad_arguments_before_any_sql(
    pg_server: PgServer, kwargs: dict[str, Any], error: type[Exception], name: str
) -> None:
    # A closed connection: any statement sent would be an InterfaceError.
    conn = await asyncpg.connect(pg_server.dsn)
    await conn.close()
    with pytest.raises(error, match=f"^{name}: "):
        await aiopglock.locks(conn, **kwargs)


SignalFn = Callable[..., Awaitable[list[int]]]


@pytest.mark.parametrize("signal", [aiopglock.cancel, aiopglock.terminate])
@pytest.mark.parametrize(
    ("pids", "error"),
    [(("12",), TypeError), ((True,), TypeError), ((1.5,), TypeError), ((0,), ValueError)],
)
async def test_signals_reject_bad_pids_before_any_sql(
    pg_server: PgServer, signal: SignalFn, pids: tuple[object, ...], error: type[Exception]
) -> None:
    conn = await asyncpg.connect(pg_server.dsn)
    await conn.close()
    with pytest.raises(error, match=r"^pids: "):
        await signal(conn, 4242, *pids)
    with pytest.raises(TypeError, match=r"^db: "):
        await signal("postgresql://", 4242)
    with pytest.raises(TypeError, match=r"^db: "):
        await aiopglock.locks("postgresql://")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- cancel / terminate


async def test_cancel_cancels_the_wait_and_leaves_the_session_alive(
    connect: Connect, admin: asyncpg.Connection
) -> None:
    key = _key()
    holder, waiter = await _session(connect), await _session(connect)
    hpid, wpid = holder.get_server_pid(), waiter.get_server_pid()
    await holder.execute("SELECT pg_advisory_lock($1)", advisory_key(key))
    async with _running(waiter.fetchval("SELECT pg_advisory_lock($1)", advisory_key(key))) as task:
        await wait_for_waiter(admin, advisory_key(key))
        signalled = await aiopglock.cancel(admin, wpid, wpid, NO_SUCH_PID, admin.get_server_pid())
        assert signalled == [wpid]
        with pytest.raises(asyncpg.QueryCanceledError):
            await asyncio.wait_for(task, 10)
    # The wait is gone, the session is not: same backend, still usable.
    assert await waiters(admin, advisory_key(key)) == []
    assert await _alive(admin, wpid)
    assert await waiter.fetchval("SELECT pg_backend_pid()") == wpid
    assert await holders(admin, advisory_key(key)) == [hpid]
    assert await _alive(admin, hpid)


async def test_terminate_ends_the_session_and_frees_its_locks(
    connect: Connect, admin: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    key = _key()
    holder, bystander = await _session(connect), await _session(connect)
    hpid, bpid = holder.get_server_pid(), bystander.get_server_pid()
    await holder.execute("SELECT pg_advisory_lock($1)", advisory_key(key))
    signalled = await aiopglock.terminate(pool, NO_SUCH_PID, hpid)
    assert signalled == [hpid]

    async def gone() -> bool:
        return not await _alive(admin, hpid)

    await wait_until(gone, message=f"backend {hpid} to exit")
    await wait_for_release(admin, advisory_key(key))
    assert await _alive(admin, bpid)
    assert await bystander.fetchval("SELECT 1") == 1
    assert pool.get_idle_size() == pool.get_size()
    # Signalling it again does nothing: it is no longer a backend.
    assert await aiopglock.terminate(admin, hpid) == []
    assert await aiopglock.cancel(admin, hpid) == []


async def test_the_caller_s_own_backend_is_never_signalled(admin: asyncpg.Connection) -> None:
    own = admin.get_server_pid()
    assert await aiopglock.cancel(admin, own) == []
    assert await aiopglock.terminate(admin, own) == []
    assert await admin.fetchval("SELECT pg_backend_pid()") == own
    assert await aiopglock.cancel(admin) == []


async def test_a_session_the_user_may_not_signal_is_skipped(
    connect: Connect, admin: asyncpg.Connection
) -> None:
    if not await admin.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
        pytest.skip("needs a superuser to create a role")
    role = _unique("aiopglock_test_role")
    await admin.execute(f"CREATE ROLE {_quote(role)} LOGIN")
    try:
        superuser = await _session(connect)
        plain = await connect(user=role, server_settings={"application_name": APP})
        peer = await connect(user=role, server_settings={"application_name": APP})
        spid, ppid = superuser.get_server_pid(), peer.get_server_pid()
        # A superuser's session: skipped, not an error; a session of its own role: signalled.
        assert await aiopglock.terminate(plain, spid, ppid) == [ppid]
        assert await superuser.fetchval("SELECT 1") == 1

        async def gone() -> bool:
            return not await _alive(admin, ppid)

        await wait_until(gone, message=f"backend {ppid} to exit")
        await plain.close()
    finally:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
        )

        async def no_sessions() -> bool:
            return not await admin.fetchval(
                "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE usename = $1)", role
            )

        await wait_until(no_sessions, message=f"the sessions of {role} to exit")
        await admin.execute(f"DROP ROLE {_quote(role)}")
