"""The statements that take and release locks, as constants (those of
introspection and of the monitors are in :mod:`aiopglock._sql_monitor`).

Values travel as ``$n`` parameters. Text composed here comes from fixed
fragments chosen by flags (function names, argument lists), with one
exception: :func:`named_statements`, for the simple query protocol, writes
an advisory key as an integer literal after a comment naming it, which
:func:`aiopglock._names.comment` escapes so that it cannot end early.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from ._validate import describe

__all__ = ["HEARTBEAT", "SAVEPOINT", "AdvisoryStatements", "advisory_statements"]

HEARTBEAT = "SELECT 1"

SAVEPOINT = "SAVEPOINT aiopglock_advisory"
RELEASE_SAVEPOINT = "RELEASE SAVEPOINT aiopglock_advisory"
ROLLBACK_TO_SAVEPOINT = (
    "ROLLBACK TO SAVEPOINT aiopglock_advisory; RELEASE SAVEPOINT aiopglock_advisory"
)
RESTORE_LOCK_TIMEOUT_LOCAL = "SELECT set_config('lock_timeout', $1, true)"

_MASK32 = "4294967295"


@dataclass(frozen=True)
class AdvisoryStatements:
    """The statements for one flavour of advisory lock (mode x scope x key form).

    Key arguments come first (``$1`` or ``$1, $2``); a timeout, where taken,
    is the last parameter, in ``lock_timeout`` syntax.
    """

    try_lock: str
    lock: str
    # Outside a transaction block: set_config(..., true) lasts exactly one
    # statement (its implicit transaction), so nothing needs restoring.
    lock_with_timeout: str
    # Inside a transaction (under aiopglock's savepoint): also returns the
    # previous lock_timeout, restored after the grant.
    lock_with_timeout_in_tx: str
    unlock: str
    # After an interrupted lock or unlock: ask pg_locks whether this session
    # holds the key in this mode, and release that hold if so.
    resolve: str


# fence=True: the fencing token, the transaction's xid, assigned by this very
# call. It is appended as the last column of a lock statement, after the lock
# function (a target list is evaluated left to right), so the xid is taken
# after the grant; in a try statement it replaces the result (NULL: not granted).
_FENCE = "pg_catalog.pg_current_xact_id()::text::int8"
# Inside a caller's transaction: whether it already has an xid (which would
# predate the grant and is refused).
XACT_ID_ASSIGNED = "SELECT pg_catalog.pg_current_xact_id_if_assigned() IS NOT NULL"


@cache
def advisory_statements(
    *, shared: bool, xact: bool, pair: bool, fence: bool = False
) -> AdvisoryStatements:
    scope = "_xact" if xact else ""
    mode = "_shared" if shared else ""
    args = "$1::int4, $2::int4" if pair else "$1::int8"
    timeout_param = "$3" if pair else "$2"
    lock_fn = f"pg_advisory{scope}_lock{mode}({args})"
    unlock_fn = f"pg_advisory_unlock{mode}({args})"
    if pair:
        ids = (
            f"classid::int8 = ($1::int4::int8 & {_MASK32}) "
            f"AND objid::int8 = ($2::int4::int8 & {_MASK32}) AND objsubid = 2"
        )
    else:
        ids = (
            f"classid::int8 = (($1::int8 >> 32) & {_MASK32}) "
            f"AND objid::int8 = ($1::int8 & {_MASK32}) AND objsubid = 1"
        )
    pg_mode = "ShareLock" if shared else "ExclusiveLock"
    try_fn = f"pg_try_advisory{scope}_lock{mode}({args})"
    if fence:
        try_lock = f"SELECT CASE WHEN {try_fn} THEN {_FENCE} END"
        lock_fn += f", {_FENCE}"
    else:
        try_lock = f"SELECT {try_fn}"
    return AdvisoryStatements(
        try_lock=try_lock,
        lock=f"SELECT {lock_fn}",
        lock_with_timeout=(f"SELECT set_config('lock_timeout', {timeout_param}, true), {lock_fn}"),
        lock_with_timeout_in_tx=(
            "SELECT current_setting('lock_timeout'), "
            f"set_config('lock_timeout', {timeout_param}, true), {lock_fn}"
        ),
        unlock=f"SELECT {unlock_fn}",
        resolve=(
            "SELECT CASE WHEN EXISTS (SELECT FROM pg_catalog.pg_locks "
            "WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted "
            f"AND mode = '{pg_mode}' AND {ids}) "
            f"THEN {unlock_fn} ELSE false END"
        ),
    )


ADVISORY_STATEMENTS: dict[tuple[bool, bool, bool], AdvisoryStatements] = {
    (shared, xact, pair): advisory_statements(shared=shared, xact=xact, pair=pair)
    for shared in (False, True)
    for xact in (False, True)
    for pair in (False, True)
}
"""Every flavour, by ``(shared, xact, pair)``: a plain dict lookup on the hot path."""

FENCED_STATEMENTS: dict[tuple[bool, bool, bool], AdvisoryStatements] = {
    flavour: advisory_statements(shared=flavour[0], xact=flavour[1], pair=flavour[2], fence=True)
    for flavour in ADVISORY_STATEMENTS
}
"""The same with ``fence=True``: each lock statement also returns the fencing token."""


@dataclass(frozen=True, slots=True)
class NamedStatements:
    """The lock statements of one ``str`` key, led by the comment that names
    it (see :mod:`aiopglock._names`), for the simple query protocol: the key
    is a literal, nothing is a parameter, and no result is read but the
    status (``try_lock`` says ``SELECT 1`` when granted). Not for
    ``fence=True``, whose token is a result column."""

    try_lock: str
    lock: str
    # "<comment> SELECT " and the lock function call, for the timed forms.
    head: str
    lock_fn: str
    # The holder's heartbeat, naming the key still.
    heartbeat: str

    def lock_with_timeout(self, timeout: str) -> str:
        """Outside a transaction block: the setting lasts this one statement."""
        return f"{self.head}set_config('lock_timeout', '{timeout}', true), {self.lock_fn}"

    def lock_with_timeout_in_tx(self, timeout: str) -> str:
        """In a transaction: the previous ``lock_timeout`` is kept in a
        setting of our own for :data:`RESTORE_SAVED_LOCK_TIMEOUT` (the
        parameterised form returns it instead)."""
        return (
            f"{self.head}set_config('aiopglock.lock_timeout', current_setting('lock_timeout'), "
            f"true), set_config('lock_timeout', '{timeout}', true), {self.lock_fn}"
        )


RESTORE_SAVED_LOCK_TIMEOUT = (
    "SELECT set_config('lock_timeout', current_setting('aiopglock.lock_timeout'), true)"
)


def named_statements(
    comment: str, key: tuple[int, ...], *, shared: bool, xact: bool
) -> NamedStatements:
    """:class:`NamedStatements` for ``key`` (one int8 or two int4), led by
    ``comment`` (from :func:`aiopglock._names.comment`, which escapes the
    name). The key is written as a quoted literal, so the smallest int8 parses."""
    scope = "_xact" if xact else ""
    mode = "_shared" if shared else ""
    if len(key) == 2:
        args = f"'{int(key[0])}'::int4, '{int(key[1])}'::int4"
    else:
        args = f"'{int(key[0])}'::int8"
    lock_fn = f"pg_catalog.pg_advisory{scope}_lock{mode}({args})"
    head = f"{comment}SELECT "
    return NamedStatements(
        try_lock=f"{head}1 WHERE pg_catalog.pg_try_advisory{scope}_lock{mode}({args})",
        lock=f"{head}{lock_fn}",
        head=head,
        lock_fn=lock_fn,
        heartbeat=f"{head}1",
    )


# -- table locks, row locks, setting scopes ---------------------------------
# (aiopglock.table, aiopglock.rows, aiopglock.lock_timeout/statement_timeout)
# Identifiers reach SQL only through quote_ident(); lock modes and row-lock
# strengths only as one of the fixed fragments below, checked again here.

BEGIN = "BEGIN"
COMMIT = "COMMIT"
ROLLBACK = "ROLLBACK"
LOCK_SAVEPOINT = "SAVEPOINT aiopglock_lock"
LOCK_RELEASE_SAVEPOINT = "RELEASE SAVEPOINT aiopglock_lock"
LOCK_ROLLBACK_TO_SAVEPOINT = (
    "ROLLBACK TO SAVEPOINT aiopglock_lock; RELEASE SAVEPOINT aiopglock_lock"
)
# Inside a transaction: lock_timeout for the rest of it ($1, in lock_timeout
# syntax); returns the previous value, restored with RESTORE_LOCK_TIMEOUT_LOCAL.
SET_LOCK_TIMEOUT_LOCAL = (
    "SELECT pg_catalog.current_setting('lock_timeout'), "
    "pg_catalog.set_config('lock_timeout', $1, true)"
)

# Setting scopes. $1 is the setting's name, always one aiopglock chose.
CURRENT_SETTING = "SELECT pg_catalog.current_setting($1)"
# Inside a transaction: the value and the transaction's start (identifies it).
CURRENT_SETTING_AND_NOW = "SELECT pg_catalog.current_setting($1), pg_catalog.now()"
SET_SETTING = "SELECT pg_catalog.set_config($1, $2, $3)"
# Restores a transaction-local value only in the transaction that set it ($3
# is that transaction's now()): in any other, the local value is gone already.
RESTORE_LOCAL_SETTING = (
    "SELECT CASE WHEN pg_catalog.now() = $3 THEN pg_catalog.set_config($1, $2, true) END"
)

TABLE_LOCK_MODES = (
    "ACCESS SHARE",
    "ROW SHARE",
    "ROW EXCLUSIVE",
    "SHARE UPDATE EXCLUSIVE",
    "SHARE",
    "SHARE ROW EXCLUSIVE",
    "EXCLUSIVE",
    "ACCESS EXCLUSIVE",
)
ROW_LOCK_STRENGTHS = ("UPDATE", "NO KEY UPDATE", "SHARE", "KEY SHARE")


def quote_ident(name: str) -> str:
    """``name`` as one SQL identifier, always quoted (so taken verbatim, case
    included): ``my"t`` -> ``"my""t"``."""
    if not isinstance(name, str):
        raise TypeError(f"identifier: expected str, got {describe(name)}")
    if not name or "\x00" in name:
        raise ValueError(f"identifier: {name!r} is not a valid PostgreSQL name")
    return '"' + name.replace('"', '""') + '"'


def qualified_name(parts: tuple[str, ...]) -> str:
    """``("schema", "t")`` -> ``"schema"."t"``; ``("t",)`` -> ``"t"``."""
    return ".".join(quote_ident(part) for part in parts)


def lock_table(tables: tuple[tuple[str, ...], ...], mode: str, *, nowait: bool) -> str:
    """``LOCK TABLE "s"."t", ... IN <mode> MODE [NOWAIT]``."""
    if mode not in TABLE_LOCK_MODES:
        raise ValueError(f"mode: {mode!r} is not a PostgreSQL table lock mode")
    if not tables:
        raise ValueError("tables: at least one table is needed")
    names = ", ".join(qualified_name(parts) for parts in tables)
    return f"LOCK TABLE {names} IN {mode} MODE" + (" NOWAIT" if nowait else "")


def locking_clause(strength: str, of: tuple[str, ...], *, nowait: bool, skip_locked: bool) -> str:
    """``FOR <strength> [OF "a", ...] [NOWAIT | SKIP LOCKED]``, appended to a
    validated SELECT on a line of its own."""
    if strength not in ROW_LOCK_STRENGTHS:
        raise ValueError(f"strength: {strength!r} is not a PostgreSQL row-lock strength")
    if nowait and skip_locked:
        raise ValueError("NOWAIT and SKIP LOCKED exclude each other")
    clause = f"FOR {strength}"
    if of:
        clause += " OF " + ", ".join(quote_ident(name) for name in of)
    if nowait:
        clause += " NOWAIT"
    elif skip_locked:
        clause += " SKIP LOCKED"
    return clause


# -- aiopglock.Locker: many advisory locks on one holder connection ----------
# One round trip per batch. $1/$2: int8 keys to unlock and their shared
# flags; $3/$4/$5: int4 pairs to unlock and their shared flags; $6..$10 the
# same for keys to try-lock. Each ARRAY keeps its input's order. A key never
# appears in both halves of one batch, so their order does not matter.
LOCKER_BATCH = (
    "SELECT ARRAY(SELECT CASE WHEN s THEN pg_advisory_unlock_shared(k) "
    "ELSE pg_advisory_unlock(k) END FROM unnest($1::int8[], $2::bool[]) AS t(k, s)), "
    "ARRAY(SELECT CASE WHEN s THEN pg_advisory_unlock_shared(a, b) "
    "ELSE pg_advisory_unlock(a, b) END "
    "FROM unnest($3::int4[], $4::int4[], $5::bool[]) AS t(a, b, s)), "
    "ARRAY(SELECT CASE WHEN s THEN pg_try_advisory_lock_shared(k) "
    "ELSE pg_try_advisory_lock(k) END FROM unnest($6::int8[], $7::bool[]) AS t(k, s)), "
    "ARRAY(SELECT CASE WHEN s THEN pg_try_advisory_lock_shared(a, b) "
    "ELSE pg_try_advisory_lock(a, b) END "
    "FROM unnest($8::int4[], $9::int4[], $10::bool[]) AS t(a, b, s))"
)
# The common batch, only int8 keys: $1/$2 to unlock, $3/$4 to try-lock.
LOCKER_BATCH_INT8 = (
    "SELECT ARRAY(SELECT CASE WHEN s THEN pg_advisory_unlock_shared(k) "
    "ELSE pg_advisory_unlock(k) END FROM unnest($1::int8[], $2::bool[]) AS t(k, s)), "
    "ARRAY(SELECT CASE WHEN s THEN pg_try_advisory_lock_shared(k) "
    "ELSE pg_try_advisory_lock(k) END FROM unnest($3::int8[], $4::bool[]) AS t(k, s))"
)
# A batch of one bigint key (a sequential caller's): the same as
# LOCKER_BATCH_INT8 of one element, without the arrays. $1 the key, $2 shared.
LOCKER_UNLOCK_ONE = (
    "SELECT CASE WHEN $2::bool THEN pg_advisory_unlock_shared($1::int8) "
    "ELSE pg_advisory_unlock($1::int8) END"
)
LOCKER_TRY_LOCK_ONE = (
    "SELECT CASE WHEN $2::bool THEN pg_try_advisory_lock_shared($1::int8) "
    "ELSE pg_try_advisory_lock($1::int8) END"
)
# After a batch that failed or was interrupted: release every hold this
# session has on the given keys, in the given modes (same parameters as the
# first half of LOCKER_BATCH), as pg_locks shows them.
LOCKER_RESOLVE = (
    "SELECT (SELECT count(*) FILTER (WHERE CASE WHEN EXISTS (SELECT FROM pg_catalog.pg_locks AS l "
    "WHERE l.locktype = 'advisory' AND l.pid = pg_backend_pid() AND l.granted "
    "AND l.mode = CASE WHEN s THEN 'ShareLock' ELSE 'ExclusiveLock' END "
    f"AND l.classid::int8 = ((k >> 32) & {_MASK32}) AND l.objid::int8 = (k & {_MASK32}) "
    "AND l.objsubid = 1) "
    "THEN CASE WHEN s THEN pg_advisory_unlock_shared(k) ELSE pg_advisory_unlock(k) END "
    "ELSE false END) FROM unnest($1::int8[], $2::bool[]) AS t(k, s)) "
    "+ (SELECT count(*) FILTER (WHERE CASE WHEN EXISTS (SELECT FROM pg_catalog.pg_locks AS l "
    "WHERE l.locktype = 'advisory' AND l.pid = pg_backend_pid() AND l.granted "
    "AND l.mode = CASE WHEN s THEN 'ShareLock' ELSE 'ExclusiveLock' END "
    f"AND l.classid::int8 = (a::int8 & {_MASK32}) AND l.objid::int8 = (b::int8 & {_MASK32}) "
    "AND l.objsubid = 2) "
    "THEN CASE WHEN s THEN pg_advisory_unlock_shared(a, b) ELSE pg_advisory_unlock(a, b) END "
    "ELSE false END) FROM unnest($3::int4[], $4::int4[], $5::bool[]) AS t(a, b, s))"
)
# After a batch failed with a full lock table (SQLSTATE 53200): which of the
# given keys this session holds, in the given modes (same parameters as
# LOCKER_RESOLVE), one boolean per key in input order: int8 keys, then pairs.
# One hash join against pg_locks, not one scan of it per key.
LOCKER_HELD = (
    "SELECT ARRAY(SELECT l.objid IS NOT NULL "
    "FROM unnest($1::int8[], $2::bool[]) WITH ORDINALITY AS t(k, s, i) "
    "LEFT JOIN (SELECT classid::int8 AS c, objid::int8 AS objid, mode "
    "FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND objsubid = 1 "
    "AND pid = pg_backend_pid() AND granted) AS l "
    f"ON l.c = ((t.k >> 32) & {_MASK32}) AND l.objid = (t.k & {_MASK32}) "
    "AND l.mode = CASE WHEN t.s THEN 'ShareLock' ELSE 'ExclusiveLock' END "
    "ORDER BY t.i), "
    "ARRAY(SELECT l.objid IS NOT NULL "
    "FROM unnest($3::int4[], $4::int4[], $5::bool[]) WITH ORDINALITY AS t(a, b, s, i) "
    "LEFT JOIN (SELECT classid::int8 AS c, objid::int8 AS objid, mode "
    "FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND objsubid = 2 "
    "AND pid = pg_backend_pid() AND granted) AS l "
    f"ON l.c = (t.a::int8 & {_MASK32}) AND l.objid = (t.b::int8 & {_MASK32}) "
    "AND l.mode = CASE WHEN t.s THEN 'ShareLock' ELSE 'ExclusiveLock' END "
    "ORDER BY t.i)"
)


# Whether backend $1 holds (granted) the advisory lock shown in pg_locks as
# ($2, $3, $4) = (classid, objid, objsubid), in the current database.
HELD_BY_BACKEND = """
SELECT EXISTS (
    SELECT 1 FROM pg_catalog.pg_locks
    WHERE locktype = 'advisory' AND granted AND pid = $1
      AND database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())
      AND classid = $2::oid AND objid = $3::oid AND objsubid = $4::int2
)
"""


# -- semaphores (aiopglock.semaphore) ----------------------------------------
# The slots of $1::int4[] / $2::int4[] (the two-int4 keys of the slots, in
# slot order) that nobody holds, as 0-based slot numbers: the candidates a
# waiter try-locks, instead of trying every slot in turn.
SEMAPHORE_FREE_SLOTS = (
    "SELECT (t.i - 1)::int4 FROM unnest($1::int4[], $2::int4[]) WITH ORDINALITY AS t(a, b, i) "
    "WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_locks AS l "
    "WHERE l.locktype = 'advisory' AND l.objsubid = 2 AND l.granted "
    "AND l.database = (SELECT d.oid FROM pg_catalog.pg_database AS d "
    "WHERE d.datname = current_database()) "
    f"AND l.classid::int8 = (t.a::int8 & {_MASK32}) AND l.objid::int8 = (t.b::int8 & {_MASK32})) "
    "ORDER BY t.i"
)

# Wakes the waiters of a semaphore (LISTENing on channel $1) after a release.
SEMAPHORE_NOTIFY = "SELECT pg_catalog.pg_notify($1, '')"

# The UNLISTEN asyncpg's remove_listener() sends, finished after an
# interruption ({} is the channel: aiopglock's own name, letters, digits and _).
SEMAPHORE_UNLISTEN = 'UNLISTEN "{}"'

# -- advisory_many: a sorted set of keys ----------------------------------------
# Every key an int8: $1 int8[]. Else $1 bool[] (true: the n-th key is a
# pair), $2 int8[] (the int8 keys, 0 for a pair), $3 int4[] and $4 int4[]
# (the pairs' halves, 0 for an int8 key). One entry per key, in the order
# taken, read back row by row through unnest().
_MANY_INT8_KEYS = "unnest($1::int8[]) WITH ORDINALITY AS u(k, n)"
_MANY_KEYS = (
    "unnest($1::bool[], $2::int8[], $3::int4[], $4::int4[]) WITH ORDINALITY AS u(p, k, a, b, n)"
)
_MANY_KEY = "CASE WHEN u.p THEN {fn}(u.a, u.b) ELSE {fn}(u.k) END"


@dataclass(frozen=True)
class ManyStatements:
    """The statements of ``advisory_many`` for one mode and scope (see above
    for the parameters)."""

    # Try the keys in order and stop at the first one not granted: the filter
    # runs row by row as the LIMIT pulls them, and the first row it lets
    # through (a key not granted) ends the scan. Returns how many were
    # granted, a prefix of the list; nothing past the first busy key is taken.
    try_prefix: str
    # Session locks: release each key (returns how many were not held).
    unlock: str
    # After an interrupted or failed statement: release each key that
    # pg_locks shows this session holding in this mode (returns how many).
    resolve: str


@cache
def many_statements(*, shared: bool, xact: bool, pairs: bool) -> ManyStatements:
    """``pairs``: some key is an ``(int, int)`` pair (four array parameters)."""
    scope = "_xact" if xact else ""
    mode = "_shared" if shared else ""
    key = _MANY_KEY if pairs else "{fn}(u.k)"
    keys = _MANY_KEYS if pairs else _MANY_INT8_KEYS
    try_key = key.format(fn=f"pg_catalog.pg_try_advisory{scope}_lock{mode}")
    unlock_key = key.format(fn=f"pg_catalog.pg_advisory_unlock{mode}")
    pg_mode = "ShareLock" if shared else "ExclusiveLock"
    # Each key as pg_locks shows it: (classid, objid, objsubid).
    if pairs:
        ids = (
            f"CASE WHEN u.p THEN u.a::int8 & {_MASK32} ELSE (u.k >> 32) & {_MASK32} END, "
            f"CASE WHEN u.p THEN u.b::int8 & {_MASK32} ELSE u.k & {_MASK32} END, "
            "CASE WHEN u.p THEN 2 ELSE 1 END"
        )
    else:
        ids = f"(u.k >> 32) & {_MASK32}, u.k & {_MASK32}, 1"
    return ManyStatements(
        try_prefix=(
            f"SELECT coalesce((SELECT u.n - 1 FROM {keys} WHERE NOT {try_key} LIMIT 1), "
            "cardinality($1))"
        ),
        unlock=f"SELECT count(*) FILTER (WHERE NOT {unlock_key}) FROM {keys}",
        resolve=(
            # pg_locks read once (each read copies the server's lock table),
            # joined on equal ids (a hash join, not a scan per key).
            "WITH mine AS MATERIALIZED (SELECT l.classid::int8 AS c, l.objid::int8 AS o, "
            "l.objsubid::int4 AS s FROM pg_catalog.pg_locks AS l "
            "WHERE l.locktype = 'advisory' "
            f"AND l.pid = pg_catalog.pg_backend_pid() AND l.granted AND l.mode = '{pg_mode}' "
            "AND l.database = (SELECT oid FROM pg_catalog.pg_database "
            "WHERE datname = pg_catalog.current_database())) "
            f"SELECT count(*) FILTER (WHERE {unlock_key}) "
            f"FROM (SELECT u.*, {ids} FROM {keys}) AS u("
            + ("p, k, a, b, n" if pairs else "k, n")
            + ", c, o, s) WHERE (u.c, u.o, u.s) IN (SELECT c, o, s FROM mine)"
        ),
    )


FENCE_NOW = f"SELECT {_FENCE}"
"""advisory_many's fencing token, taken once every key is held."""
