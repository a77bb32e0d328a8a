"""Lock introspection: ``locks()`` and ``LockInfo``; ``cancel()`` and ``terminate()``."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any, cast

import asyncpg

from . import _names, _sql_monitor
from ._conntypes import Conn, Pool
from ._db import DB, check_db, resolve_db
from ._keys import AdvisoryKey, Key, advisory_key, key_from_text, lock_ids
from ._validate import check_bool, check_pids, describe, is_int

__all__ = [
    "LOCK_TYPES",
    "LockInfo",
    "cancel",
    "describe_backends",
    "key_from_text",
    "locks",
    "signal_sessions",
    "terminate",
]

#: Every ``locktype`` of ``pg_locks`` (``applytransaction`` exists from PostgreSQL 16 on).
LOCK_TYPES = (
    "relation",
    "extend",
    "frozenid",
    "page",
    "tuple",
    "transactionid",
    "virtualxid",
    "spectoken",
    "object",
    "userlock",
    "advisory",
    "applytransaction",
)


@dataclasses.dataclass(frozen=True, slots=True)
class LockInfo:
    """One row of ``pg_locks``, decoded, with the session's activity.

    - ``pid``, ``locktype``, ``mode``, ``granted`` as in ``pg_locks``.
    - ``relation``: ``"schema.table"`` for relation and tuple/page locks (the
      names as stored, not quoted: ``'public.My "odd".table'``), else None.
    - ``key``: for an advisory lock, the key as :func:`aiopglock.advisory_key`
      returns it (an int, or a pair of ints), else None.
    - ``blocking_pids``: the sessions this one waits for (``pg_blocking_pids``;
      empty for a granted lock).
    - ``wait_duration``: how long the lock has been waited for (from
      ``waitstart`` to ``clock_timestamp()``), None when granted.
    - the session's ``query``, ``state``, ``application_name``, ``database``,
      ``user``, ``backend_start``, ``xact_start``, ``query_start``.
    - the raw identity columns: ``page``, ``tuple``, ``virtualxid``,
      ``transactionid``, ``classid``, ``objid``, ``objsubid``,
      ``virtualtransaction``, ``fastpath``; ``relation_oid`` (``pg_locks.relation``,
      set even where the name cannot be resolved: a relation of another database).
    - ``backend_type`` (``"client backend"``, ``"autovacuum worker"``, …).
    - ``name``: for an advisory lock on a ``str`` key, that text (a semaphore's
      name for one of its slots), when known; else None. aiopglock starts each
      statement taking such a key with a comment naming it
      (``/* aiopglock "orders:42" */ SELECT …``), which ``query`` shows while
      the session waits and until its next statement. A comment is trusted
      only when its name hashes to the row's key; a name so found names every
      row of that key in the result, so a holder that has run other
      statements since is named through its named waiters, and the other way
      round.

    ``pid`` is 0 for a lock of a prepared transaction (no session holds it; this
    is also how ``pg_blocking_pids`` reports one). ``wait_duration`` is 0 in the
    instant before the server records ``waitstart``.

    Example::

        for info in await aiopglock.locks(pool, blocked=True):
            print(info.pid, info.locktype, info.mode, info.relation or info.key,
                  "waits for", info.blocking_pids, "since", info.wait_duration)
    """

    pid: int
    locktype: str
    mode: str
    granted: bool
    relation: str | None = None
    key: AdvisoryKey | None = None
    blocking_pids: list[int] = dataclasses.field(default_factory=list)
    wait_duration: timedelta | None = None
    query: str | None = None
    state: str | None = None
    application_name: str | None = None
    database: str | None = None
    user: str | None = None
    backend_start: datetime | None = None
    xact_start: datetime | None = None
    query_start: datetime | None = None
    page: int | None = None
    tuple: int | None = None
    virtualxid: str | None = None
    transactionid: int | None = None
    classid: int | None = None
    objid: int | None = None
    objsubid: int | None = None
    virtualtransaction: str | None = None
    fastpath: bool = False
    relation_oid: int | None = None
    backend_type: str | None = None
    name: str | None = None


async def _signal(db: DB | None, statement: str, pids: tuple[object, ...]) -> list[int]:
    checked = check_pids(pids, "pids")
    check_db(db)
    target: Conn | Pool = resolve_db(db)
    if not checked:
        return []
    if isinstance(target, asyncpg.Pool):
        async with target.acquire() as conn:
            rows = await conn.fetch(statement, checked)
    else:
        rows = await target.fetch(statement, checked)
    return sorted(row[0] for row in rows)


async def cancel(db: DB | None, *pids: int) -> list[int]:
    """Cancel the current query of each backend in ``pids``
    (``pg_cancel_backend``); return the pids actually signalled, sorted.

    Pids that are not sessions of this server, the backend running this call,
    and sessions the current user may not signal (a superuser's, unless the
    user is one; else those of roles it is not a member of, unless it has
    ``pg_signal_backend``) are skipped rather than failing the call. The
    session survives: a lock wait is abandoned, the statement fails with
    ``QueryCanceledError``, and locks it held before the statement stay held.

    Example::

        signalled = await aiopglock.cancel(pool, 4242, 4243)
    """
    return await _signal(db, _sql_monitor.CANCEL_BACKENDS, pids)


async def terminate(db: DB | None, *pids: int) -> list[int]:
    """Terminate each backend in ``pids`` (``pg_terminate_backend``); return
    the pids actually signalled, sorted.

    Pids are skipped as by :func:`cancel`. Every lock of a terminated session
    is released when its process exits, a moment after this returns.

    Example::

        signalled = await aiopglock.terminate(pool, 4242)
    """
    return await _signal(db, _sql_monitor.TERMINATE_BACKENDS, pids)


async def signal_sessions(
    db: DB | None, action: str, sessions: Mapping[int, datetime]
) -> list[int]:
    """Cancel (``action="cancel"``) or terminate (``"terminate"``) each session
    of ``sessions`` (pid -> its ``backend_start``, as :func:`describe_backends`
    showed it); return the pids actually signalled, sorted.

    A pid is signalled only while it still runs the session that started at
    that instant: one whose session ended, or whose pid now belongs to a
    session started since (the operating system reuses pids), is skipped,
    as are the pids :func:`cancel` skips. For the command line's confirmation,
    which can be answered long after the sessions were shown.
    """
    statements = {
        "cancel": _sql_monitor.CANCEL_SESSIONS,
        "terminate": _sql_monitor.TERMINATE_SESSIONS,
    }
    if action not in statements:
        raise ValueError(f"action: expected 'cancel' or 'terminate', got {action!r}")
    pids = check_pids(sessions, "pids")
    starts = list(sessions.values())
    for start in starts:
        if not isinstance(start, datetime):
            raise TypeError(f"sessions: expected datetimes, got {describe(start)}")
    check_db(db)
    target: Conn | Pool = resolve_db(db)
    if not pids:
        return []
    if isinstance(target, asyncpg.Pool):
        async with target.acquire() as conn:
            rows = await conn.fetch(statements[action], pids, starts)
    else:
        rows = await target.fetch(statements[action], pids, starts)
    return sorted(row[0] for row in rows)


# --------------------------------------------------------------------------- locks()


def _signed32(value: int) -> int:
    return value - 2**32 if value >= 2**31 else value


def _advisory_key(classid: int, objid: int, objsubid: int) -> AdvisoryKey | None:
    """The key as :func:`aiopglock.advisory_key` returns it, from ``pg_locks``' columns
    (the inverse of :func:`aiopglock._keys.lock_ids`)."""
    if objsubid == 1:
        unsigned = (classid << 32) | objid
        return unsigned - 2**64 if unsigned >= 2**63 else unsigned
    if objsubid == 2:
        return _signed32(classid), _signed32(objid)
    return None  # not a key aiopglock could have sent (objsubid is 1 or 2 for advisory locks)


def _check_pid_filter(pids: object) -> list[int] | None:
    if pids is None:
        return None
    if is_int(pids):
        items: Iterable[object] = (pids,)
    elif isinstance(pids, (str, bytes)) or not isinstance(pids, Iterable):
        raise TypeError(f"pids: expected an iterable of ints, got {describe(pids)}")
    else:
        items = pids
    return check_pids(items, "pids", minimum=0)


def _relation_parts(text: str) -> list[str]:
    """The dot-separated names of ``text``: a name in double quotes is taken as
    SQL reads it (it may hold dots; ``""`` is a quote); an unquoted name is
    taken as written (no case folding) and may hold neither a dot nor a quote."""
    parts: list[str] = []
    at = 0
    while True:
        if text.startswith('"', at):
            pieces = []
            start = at + 1
            while True:
                close = text.find('"', start)
                if close < 0:
                    raise ValueError(f"relation: {text!r} has a double quote that is not closed")
                pieces.append(text[start:close])
                if not text.startswith('"', close + 1):
                    break
                pieces.append('"')  # "" inside quotes
                start = close + 2
            part = "".join(pieces)
            at = close + 1
        else:
            dot = text.find(".", at)
            end = len(text) if dot < 0 else dot
            part = text[at:end]
            if '"' in part:
                raise ValueError(
                    f"relation: {text!r} has a double quote inside a name; put the whole "
                    'name in double quotes, doubling its quotes ("my ""odd"" table")'
                )
            at = end
        if not part:
            raise ValueError(f"relation: {text!r} is not a table name (an empty name)")
        parts.append(part)
        if at == len(text):
            return parts
        if text[at] != ".":
            raise ValueError(f"relation: {text!r}: expected a dot after the name in quotes")
        at += 1
        if at == len(text):
            raise ValueError(f"relation: {text!r} is not a table name (it ends with a dot)")


def _quoted(name: str) -> str:
    """``name`` as :func:`_relation_parts` reads it back."""
    if "." in name or '"' in name:
        return '"' + name.replace('"', '""') + '"'
    return name


def _check_relation(relation: object) -> tuple[str | None, str] | None:
    """``(schema or None, name)``: ``"name"``, ``"schema.name"`` (either in
    double quotes as in SQL: ``'"my.table"'``) or ``("schema", "name")``."""
    if relation is None:
        return None
    if isinstance(relation, tuple):
        if len(relation) != 2 or not all(isinstance(part, str) for part in relation):
            raise TypeError(f"relation: a tuple must be (schema, name) strings, got {relation!r}")
        schema, name = relation
        if not schema or not name:
            raise ValueError(f"relation: empty schema or name in {relation!r}")
        return schema, name
    if not isinstance(relation, str):
        raise TypeError(
            f"relation: expected 'name', 'schema.name' or (schema, name), got {describe(relation)}"
        )
    parts = _relation_parts(relation)
    if len(parts) > 2:
        raise ValueError(
            f"relation: {relation!r} has {len(parts)} dot-separated names; expected "
            "name or schema.name, with a name that holds a dot in double quotes: "
            '\'"my.table"\' or \'"my schema"."my.table"\''
        )
    if len(parts) == 1:
        return None, parts[0]
    return parts[0], parts[1]


def _check_locktype(locktype: object) -> list[str] | None:
    if locktype is None:
        return None
    if isinstance(locktype, str):
        items: Iterable[object] = (locktype,)
    elif isinstance(locktype, bytes) or not isinstance(locktype, Iterable):
        raise TypeError(f"locktype: expected a str or an iterable of str, got {describe(locktype)}")
    else:
        items = locktype
    checked: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"locktype: expected str, got {describe(item)}")
        if item not in LOCK_TYPES:
            raise ValueError(
                f"locktype: {item!r} is not a lock type of pg_locks; expected one of "
                + ", ".join(LOCK_TYPES)
            )
        checked.append(item)
    return checked


def _check_database(database: object) -> str | None:
    if database is None:
        return None
    if not isinstance(database, str):
        raise TypeError(f"database: expected a database name, got {describe(database)}")
    if not database:
        raise ValueError("database: an empty string is not a database name")
    return database


def _check_key(
    key: object, relation: object, locktypes: list[str] | None
) -> tuple[int, int, int] | None:
    """``(classid, objid, objsubid)`` of ``key`` as ``pg_locks`` shows it, or None."""
    if key is None:
        return None
    ids = lock_ids(advisory_key(cast(Key, key)))  # advisory_key checks the type itself
    if relation is not None:
        raise ValueError("key: an advisory key and a relation never match the same lock")
    if locktypes is not None and "advisory" not in locktypes:
        raise ValueError(
            f"key: only advisory locks have keys, and locktype {locktypes!r} leaves them out"
        )
    return ids


def _lock_info(row: asyncpg.Record) -> LockInfo:
    locktype: str = row["locktype"]
    granted: bool = row["granted"]
    key = None
    if locktype == "advisory":
        key = _advisory_key(row["classid"], row["objid"], row["objsubid"])
    return LockInfo(
        pid=row["pid"],
        locktype=locktype,
        mode=row["mode"],
        granted=granted,
        relation=row["relation"],
        key=key,
        # pg_blocking_pids lists a pid once per lock of its parallel workers.
        blocking_pids=sorted(set(row["blocking_pids"] or ())),
        wait_duration=None if granted else row["wait_duration"],
        query=row["query"],
        state=row["state"],
        application_name=row["application_name"],
        database=row["database"],
        user=row["user"],
        backend_start=row["backend_start"],
        xact_start=row["xact_start"],
        query_start=row["query_start"],
        page=row["page"],
        tuple=row["tuple"],
        virtualxid=row["virtualxid"],
        transactionid=row["transactionid"],
        classid=row["classid"],
        objid=row["objid"],
        objsubid=row["objsubid"],
        virtualtransaction=row["virtualtransaction"],
        fastpath=bool(row["fastpath"]),
        relation_oid=row["relation_oid"],
        backend_type=row["backend_type"],
    )


def _with_names(infos: list[LockInfo]) -> list[LockInfo]:
    """``infos`` with ``name`` set on every advisory row whose key a session's
    statement names (see :func:`aiopglock._names.names_of`)."""
    names = _names.names_of((info.database, info.key, info.query) for info in infos)
    if not names:
        return infos
    return [
        dataclasses.replace(info, name=names[info.database, info.key])
        if info.key is not None and (info.database, info.key) in names
        else info
        for info in infos
    ]


async def _fetch_locks(
    conn: Conn,
    *,
    pids: list[int] | None,
    blocked: bool,
    relation: tuple[str | None, str] | None,
    locktypes: list[str] | None,
    database: str | None,
    all_databases: bool,
    include_self: bool,
    key_ids: tuple[int, int, int] | None,
) -> list[LockInfo]:
    relation_oid = None
    if relation is not None:
        relation_oid = await conn.fetchval(_sql_monitor.LOCKS_RELATION_OID, *relation)
        if relation_oid is None:
            shown = ".".join(_quoted(part) for part in relation if part is not None)
            raise ValueError(f"relation: no table {shown} in the current database")
    if database is not None and not await conn.fetchval(
        _sql_monitor.LOCKS_DATABASE_EXISTS, database
    ):
        raise ValueError(f"database: no database named {database!r}")
    rows = await conn.fetch(
        _sql_monitor.LOCKS,
        pids,
        blocked,
        relation_oid,
        locktypes,
        database,
        all_databases,
        include_self,
        *(key_ids or (None, None, None)),
    )
    return _with_names([_lock_info(row) for row in rows])


async def locks(
    db: DB | None = None,
    *,
    pids: Iterable[int] | int | None = None,
    blocked: bool = False,
    relation: str | tuple[str, str] | None = None,
    locktype: str | Iterable[str] | None = None,
    database: str | None = None,
    all_databases: bool = False,
    include_self: bool = False,
    key: Key | None = None,
) -> list[LockInfo]:
    """Every lock on the server as :class:`LockInfo`: one per row of ``pg_locks``.

    All lock types, held and waited for: relation locks named ``"schema.table"``,
    advisory locks with their key decoded, row locks (``tuple``, and
    ``transactionid`` for a wait on the transaction holding a row), virtual
    transactions, objects… Waiting rows carry the pids blocking them
    (``pg_blocking_pids``) and how long they have waited (``clock_timestamp()``
    minus ``waitstart``); every row carries its session's activity
    (``pg_stat_activity``: query, state, application, user, timings), and
    an advisory lock on a ``str`` key its ``name`` when a session's statement
    names it.

    Filters (all optional, combined with AND):

    - ``pids``: only these sessions (an int or an iterable of ints).
    - ``blocked=True``: only lock requests still waiting (not granted).
    - ``relation``: only locks on this table (relation, page and tuple locks):
      ``"name"`` (found through the ``search_path``), ``"schema.name"`` or
      ``("schema", "name")``, matched exactly (no case folding); a name that
      holds a dot goes in double quotes, as in SQL (``'"my.table"'``,
      ``'"my schema"."t"'``; ``""`` is a quote inside them); a table that
      does not exist is a ValueError.
    - ``locktype``: one of :data:`LOCK_TYPES` or an iterable of them.
    - ``database``: sessions connected to this database (a name that does not
      exist is a ValueError). The default is the current database of ``db``;
      ``all_databases=True`` shows every database. Relation names are
      resolved in the current database only (``pg_class`` is per database):
      locks on tables of another database have ``relation`` None and their
      ``relation_oid`` set.
    - ``include_self=True``: also the locks of the session running this query
      (by default left out: they are the locks of the query itself).
    - ``key``: only the advisory locks on this key, held and waited for, shared
      and exclusive: any key form (a ``str`` is hashed as
      :func:`aiopglock.advisory_key` does; an ``int`` is the int8 key; an
      ``(int, int)`` pair the two-int4 key, a different lock from any int8 key).
      Matched on the server by ``pg_locks``' ``classid``/``objid``/``objsubid``.
      The session running the query is included here whatever
      ``include_self`` says: the query takes no advisory lock, so a row of it
      on the key is a lock that session really holds or waits for. With
      ``relation``, or a ``locktype`` without ``"advisory"``, it is a
      ValueError (nothing could match).

    Rows are ordered by pid, held before waiting, then by lock type and object.
    Locks of prepared transactions (no session) have pid 0.

    Example::

        for info in await aiopglock.locks(pool, blocked=True):
            print(info.pid, "waits", info.wait_duration, "for", info.mode,
                  info.relation or info.key, "held by", info.blocking_pids)

        # Who holds "invoice:42", who waits for it, and for whom:
        for info in await aiopglock.locks(pool, key="invoice:42"):
            print(info.pid, "holds" if info.granted else "waits for", info.mode,
                  info.blocking_pids)
    """
    checked_pids = _check_pid_filter(pids)
    check_bool(blocked, "blocked")
    checked_relation = _check_relation(relation)
    locktypes = _check_locktype(locktype)
    checked_database = _check_database(database)
    check_bool(all_databases, "all_databases")
    check_bool(include_self, "include_self")
    if checked_database is not None and all_databases:
        raise ValueError("database: pass either a database name or all_databases=True")
    key_ids = _check_key(key, checked_relation, locktypes)
    check_db(db)
    target: Conn | Pool = resolve_db(db)
    options: dict[str, Any] = {
        "pids": checked_pids,
        "blocked": blocked,
        "relation": checked_relation,
        "locktypes": locktypes,
        "database": checked_database,
        "all_databases": all_databases,
        "include_self": include_self or key_ids is not None,
        "key_ids": key_ids,
    }
    if isinstance(target, asyncpg.Pool):
        async with target.acquire() as conn:
            return await _fetch_locks(conn, **options)
    return await _fetch_locks(target, **options)


async def describe_backends(db: DB | None, pids: Iterable[int]) -> dict[int, dict[str, Any]]:
    """``pg_stat_activity`` of each backend in ``pids`` (that exists, and is not the
    one running this query), with counts of its locks held and waited for; keyed by pid."""
    checked = check_pids(pids, "pids", minimum=0)
    check_db(db)
    target: Conn | Pool = resolve_db(db)
    if isinstance(target, asyncpg.Pool):
        async with target.acquire() as conn:
            rows = await conn.fetch(_sql_monitor.DESCRIBE_BACKENDS, checked)
    else:
        rows = await target.fetch(_sql_monitor.DESCRIBE_BACKENDS, checked)
    return {row["pid"]: dict(row.items()) for row in rows}
