"""Every SQL statement aiopglock sends, as constants.

Values always travel as ``$n`` parameters. The only text ever composed here
comes from fixed fragments chosen by flags (function names, argument lists),
never from user input.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

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


@cache
def advisory_statements(*, shared: bool, xact: bool, pair: bool) -> AdvisoryStatements:
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
    return AdvisoryStatements(
        try_lock=f"SELECT pg_try_advisory{scope}_lock{mode}({args})",
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
