"""The statements of lock introspection and of the monitors: signalling
backends (``cancel()``/``terminate()``), ``locks()``, and the blocker queries
of ``prioritize()`` and the ``Watchdog``. As in :mod:`aiopglock._sql`, values
travel as ``$n`` parameters; text is composed only from fixed fragments."""

from __future__ import annotations

# -- signalling backends (aiopglock.cancel / aiopglock.terminate) -----------
# $1: int4[] of pids; each distinct pid is signalled at most once, and only
# when it is a session of pg_stat_activity, not the backend running the
# statement, and one the current user may signal (the rules of
# pg_signal_backend: a superuser's session or a process with no role only by a
# superuser; else a member of its role or of pg_signal_backend), so that one
# pid never fails the call. The checks sit in a CASE: in a WHERE clause the
# planner would evaluate the cheap signalling function first.
_SIGNAL = (
    "SELECT p.pid FROM {source} AS p "
    "WHERE CASE WHEN p.pid <> pg_catalog.pg_backend_pid() AND EXISTS ("
    "SELECT FROM pg_catalog.pg_stat_activity AS a "
    "LEFT JOIN pg_catalog.pg_roles AS r ON r.oid = a.usesysid "
    "WHERE a.pid = p.pid {session}AND ("
    "(SELECT s.rolsuper FROM pg_catalog.pg_roles AS s WHERE s.rolname = current_user) "
    "OR (r.oid IS NOT NULL AND NOT r.rolsuper "
    "AND (pg_catalog.pg_has_role(r.oid, 'USAGE') "
    "OR pg_catalog.pg_has_role('pg_signal_backend', 'USAGE'))))) "
    "THEN pg_catalog.{fn}(p.pid) ELSE false END "
    "ORDER BY p.pid"
)
_PIDS = "(SELECT DISTINCT u.pid FROM unnest($1::int4[]) AS u(pid))"
CANCEL_BACKENDS = _SIGNAL.format(source=_PIDS, session="", fn="pg_cancel_backend")
TERMINATE_BACKENDS = _SIGNAL.format(source=_PIDS, session="", fn="pg_terminate_backend")
# The same for sessions identified by (pid, backend_start): $1 int4[] of
# pids, $2 timestamptz[] of their backend_start, pair by pair. A pid whose
# session ended, or that now belongs to a session started since, is skipped:
# a pid alone may have been reused by the time a confirmation is answered.
_SESSIONS = (
    "(SELECT DISTINCT u.pid, u.started "
    "FROM unnest($1::int4[], $2::timestamptz[]) AS u(pid, started))"
)
_SAME_SESSION = "AND a.backend_start = p.started "
CANCEL_SESSIONS = _SIGNAL.format(source=_SESSIONS, session=_SAME_SESSION, fn="pg_cancel_backend")
TERMINATE_SESSIONS = _SIGNAL.format(
    source=_SESSIONS, session=_SAME_SESSION, fn="pg_terminate_backend"
)


# -- lock introspection (aiopglock.locks, the `aiopglock` command line) -------
# pg_class is per database: a relation oid is named only when the lock is on
# this database (or on a shared catalog, database 0); an oid of another
# database could name an unrelated table here.
_CURRENT_DATABASE_OID = (
    "(SELECT d.oid FROM pg_catalog.pg_database AS d "
    "WHERE d.datname = pg_catalog.current_database())"
)

# $1: schema or NULL (search_path), $2: name; both quoted, never case-folded.
LOCKS_RELATION_OID = (
    "SELECT pg_catalog.to_regclass("
    "CASE WHEN $1::text IS NULL THEN '' ELSE pg_catalog.quote_ident($1::text) || '.' END "
    "|| pg_catalog.quote_ident($2::text))::oid"
)
LOCKS_DATABASE_EXISTS = "SELECT EXISTS (SELECT FROM pg_catalog.pg_database WHERE datname = $1)"

# Every row of pg_locks, LEFT JOINed (an inner join with pg_class would hide
# advisory, tuple, transactionid and virtualxid rows). Filters, each NULL or
# false to disable: $1 int4[] pids (0: prepared transactions), $2 bool only
# waiting rows, $3 oid relation (of the current database), $4 text[] lock
# types, $5 database name (NULL: the current one), $6 bool every database,
# $7 bool include the querying backend's own rows, $8 oid classid, $9 oid
# objid, $10 int2 objsubid: one advisory key as pg_locks encodes it (an int8
# key: its high and low 32 bits, objsubid 1; an int4 pair: objsubid 2), all
# NULL for any lock. A session's database is
# pg_stat_activity.datid; rows with no session (prepared transactions) go by
# pg_locks.database; rows tied to no database at all are always shown.
LOCKS = f"""
SELECT
    COALESCE(l.pid, 0) AS pid,
    l.locktype,
    l.mode,
    l.granted,
    l.fastpath,
    l.relation::int8 AS relation_oid,
    CASE WHEN c.oid IS NOT NULL THEN n.nspname || '.' || c.relname END AS relation,
    l.page,
    l.tuple::int4 AS tuple,
    l.virtualxid,
    l.transactionid::text::int8 AS transactionid,
    l.classid::int8 AS classid,
    l.objid::int8 AS objid,
    l.objsubid::int4 AS objsubid,
    l.virtualtransaction,
    CASE WHEN NOT l.granted AND l.pid IS NOT NULL
        THEN pg_catalog.pg_blocking_pids(l.pid) END AS blocking_pids,
    CASE WHEN NOT l.granted
        THEN GREATEST(pg_catalog.clock_timestamp() - l.waitstart, interval '0') END
        AS wait_duration,
    a.query,
    a.state,
    a.application_name,
    COALESCE(a.datname, ld.datname) AS database,
    a.usename::text AS "user",
    a.backend_start,
    a.xact_start,
    a.query_start,
    a.backend_type
FROM pg_catalog.pg_locks AS l
LEFT JOIN pg_catalog.pg_stat_activity AS a ON a.pid = l.pid
LEFT JOIN pg_catalog.pg_database AS ld ON ld.oid = l.database
LEFT JOIN pg_catalog.pg_class AS c
    ON c.oid = l.relation AND l.database IN (0, {_CURRENT_DATABASE_OID})
LEFT JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
WHERE ($1::int4[] IS NULL OR COALESCE(l.pid, 0) = ANY($1::int4[]))
  AND (NOT $2::bool OR NOT l.granted)
  AND ($3::oid IS NULL
       OR (l.relation = $3::oid AND l.database IN (0, {_CURRENT_DATABASE_OID})))
  AND ($4::text[] IS NULL OR l.locktype = ANY($4::text[]))
  AND ($6::bool
       OR COALESCE(a.datid, NULLIF(l.database, 0)) IS NULL
       OR COALESCE(a.datid, NULLIF(l.database, 0)) = (
           SELECT d.oid FROM pg_catalog.pg_database AS d
           WHERE d.datname = COALESCE($5::text, pg_catalog.current_database())))
  AND ($7::bool OR l.pid IS DISTINCT FROM pg_catalog.pg_backend_pid())
  AND ($8::oid IS NULL
       OR (l.locktype = 'advisory' AND l.classid = $8::oid AND l.objid = $9::oid
           AND l.objsubid = $10::int2))
ORDER BY pid, granted DESC, locktype, relation_oid, relation, page, tuple,
    classid, objid, objsubid, virtualxid, transactionid, mode, virtualtransaction
"""

# $1: int4[] of pids. What `aiopglock cancel|terminate` shows before asking.
DESCRIBE_BACKENDS = """
SELECT
    a.pid,
    a.usename::text AS "user",
    a.datname::text AS database,
    a.application_name,
    a.backend_type,
    a.state,
    a.query,
    a.backend_start,
    a.xact_start,
    a.query_start,
    (SELECT count(*) FROM pg_catalog.pg_locks AS l WHERE l.pid = a.pid AND l.granted)
        AS locks_held,
    (SELECT count(*) FROM pg_catalog.pg_locks AS l WHERE l.pid = a.pid AND NOT l.granted)
        AS locks_waiting,
    pg_catalog.pg_blocking_pids(a.pid) AS blocking_pids
FROM pg_catalog.pg_stat_activity AS a
WHERE a.pid = ANY($1::int4[]) AND a.pid <> pg_catalog.pg_backend_pid()
ORDER BY a.pid
"""


# -- prioritize() and Watchdog ----------------------------------------------
# Blockers are found with pg_blocking_pids() (every lock type: relation,
# tuple/transactionid, advisory, ...) and described from pg_stat_activity
# ("a" the blocker, "wa" the session it blocks). age: since the blocker's
# transaction began; outside a transaction since its latest statement began
# (a lower bound of how long it has held a session lock).
_BLOCKER_COLUMNS = (
    "b.pid, w.pid AS blocked_pid, a.query, a.state, a.application_name, "
    "a.usename::text AS usename, a.datname::text AS datname, a.backend_type, "
    "a.backend_start, a.xact_start, a.query_start, "
    "pg_catalog.clock_timestamp() - coalesce(a.xact_start, a.query_start, a.backend_start) "
    "AS age, "
    "wa.query AS blocked_query, wa.application_name AS blocked_application_name, "
    "wa.usename::text AS blocked_usename, wa.datname::text AS blocked_datname"
)

# $1: int4[] of protected (waiting) pids; $2: bool, include blockers in other
# databases than the waiter's. Never the running backend, never a protected pid.
PRIORITIZE_BLOCKERS = (
    f"SELECT {_BLOCKER_COLUMNS}, "
    "(SELECT pg_catalog.clock_timestamp() - min(l.waitstart) FROM pg_catalog.pg_locks AS l "
    "WHERE l.pid = w.pid AND NOT l.granted) AS wait_duration "
    "FROM unnest($1::int4[]) AS w(pid) "
    "JOIN pg_catalog.pg_stat_activity AS wa ON wa.pid = w.pid "
    "CROSS JOIN LATERAL unnest(pg_catalog.pg_blocking_pids(w.pid)) AS b(pid) "
    "JOIN pg_catalog.pg_stat_activity AS a ON a.pid = b.pid "
    "WHERE b.pid <> pg_catalog.pg_backend_pid() "
    "AND b.pid <> ALL ($1::int4[]) "
    "AND ($2::bool OR a.datid = wa.datid) "
    "ORDER BY wait_duration DESC NULLS LAST, w.pid, b.pid"
)

# Every session waiting for a lock (with how long: NULL for an instant after
# the wait began), and the sessions blocking it that are not waiting for a
# lock themselves (a session queued ahead of the waiter is a victim, never a
# culprit), with the server's clock. $1: text[] of databases (NULL: the
# current one), for waiter and blocker; $2: text[] of the waiters'
# application_names, $3: of their users (NULL: any); $4: int4[] of blocker
# pids and $5: text[] of blocker application_names never acted on. Never the
# running backend, as waiter or blocker.
WATCHDOG_BLOCKERS = (
    "WITH waits AS MATERIALIZED ("
    "SELECT l.pid, pg_catalog.clock_timestamp() - min(l.waitstart) AS wait_duration "
    "FROM pg_catalog.pg_locks AS l "
    "WHERE NOT l.granted AND l.pid IS NOT NULL "
    "GROUP BY l.pid) "
    f"SELECT {_BLOCKER_COLUMNS}, w.wait_duration, "
    "pg_catalog.clock_timestamp() AS observed_at "
    "FROM waits AS w "
    "JOIN pg_catalog.pg_stat_activity AS wa ON wa.pid = w.pid "
    "CROSS JOIN LATERAL unnest(pg_catalog.pg_blocking_pids(w.pid)) AS b(pid) "
    "JOIN pg_catalog.pg_stat_activity AS a ON a.pid = b.pid "
    "WHERE w.pid <> pg_catalog.pg_backend_pid() "
    "AND b.pid <> pg_catalog.pg_backend_pid() "
    "AND NOT EXISTS (SELECT FROM waits AS x WHERE x.pid = b.pid) "
    "AND wa.datname::text = ANY (coalesce($1::text[], "
    "ARRAY[pg_catalog.current_database()::text])) "
    "AND a.datname::text = ANY (coalesce($1::text[], "
    "ARRAY[pg_catalog.current_database()::text])) "
    "AND ($2::text[] IS NULL OR wa.application_name = ANY ($2::text[])) "
    "AND ($3::text[] IS NULL OR wa.usename::text = ANY ($3::text[])) "
    "AND b.pid <> ALL ($4::int4[]) "
    "AND a.application_name <> ALL ($5::text[]) "
    "ORDER BY w.wait_duration DESC NULLS LAST, w.pid, b.pid"
)

# Signal one backend, only if it is still the session that was found
# ($1 pid, $2 its backend_start: a pid can be reused), not the running
# backend, and it still blocks one of the waiters $3 (int4[]): a look is a
# snapshot, and the blocker may have let go since (its connection even
# handed to someone else). NULL when a check fails, else whether the server
# sent the signal. CASE fixes the order: nothing is signalled unless the
# checks pass.
_SIGNAL_IF_SAME = (
    "SELECT CASE WHEN $1::int4 <> pg_catalog.pg_backend_pid() "
    "AND EXISTS (SELECT FROM pg_catalog.pg_stat_activity AS a "
    "WHERE a.pid = $1::int4 AND a.backend_start = $2::timestamptz) "
    "AND EXISTS (SELECT FROM unnest($3::int4[]) AS w(pid) "
    "WHERE $1::int4 = ANY (pg_catalog.pg_blocking_pids(w.pid))) "
    "THEN pg_catalog.{fn}($1::int4) END"
)
CANCEL_BLOCKER = _SIGNAL_IF_SAME.format(fn="pg_cancel_backend")
TERMINATE_BLOCKER = _SIGNAL_IF_SAME.format(fn="pg_terminate_backend")

# A monitor connection leased from a pool names itself (the pool's reset,
# RESET ALL, restores the previous name on release).
SET_APPLICATION_NAME = "SELECT pg_catalog.set_config('application_name', $1, false)"
