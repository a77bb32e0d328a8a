"""The argument checks live in one leaf module, ``aiopglock._validate``, and
every public function words its errors through it.

The table below pins each message to the byte: it was recorded from the
modules' own checkers before they were merged into ``_validate``. Every call
gets a ``db=`` that fails the test if it is ever resolved, so each error is
raised before any connection is looked at.
"""

from __future__ import annotations

import ast
import asyncio
import functools
import math
import re
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

import aiopglock
from aiopglock import _introspect, _validate

PACKAGE = Path(aiopglock.__file__).parent


def _untouched_db() -> Any:
    raise AssertionError("db= was resolved before the arguments were checked")


DB = _untouched_db
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _sync() -> None:
    pass


Case = tuple[str, Callable[[], Any], type[Exception], str]

CASES: list[Case] = [
    # advisory()
    (
        "advisory shared",
        lambda: aiopglock.advisory("k", db=DB, shared=1),
        TypeError,
        "shared: expected True or False, got int 1",
    ),
    (
        "advisory xact",
        lambda: aiopglock.advisory("k", db=DB, xact="yes"),
        TypeError,
        "xact: expected True or False, got str 'yes'",
    ),
    (
        "advisory cancel_on_lost",
        lambda: aiopglock.advisory("k", db=DB, cancel_on_lost=None),
        TypeError,
        "cancel_on_lost: expected True or False, got NoneType None",
    ),
    (
        "advisory timeout type",
        lambda: aiopglock.advisory("k", db=DB, timeout="1"),
        TypeError,
        "timeout: expected None, a number of seconds or a timedelta, got str '1'",
    ),
    (
        "advisory timeout bool",
        lambda: aiopglock.advisory("k", db=DB, timeout=True),
        TypeError,
        "timeout: expected None, a number of seconds or a timedelta, got bool True",
    ),
    (
        "advisory timeout negative",
        lambda: aiopglock.advisory("k", db=DB, timeout=-1),
        ValueError,
        "timeout: -1 is negative; use 0 to never wait, None for no limit",
    ),
    (
        "advisory timeout nan",
        lambda: aiopglock.advisory("k", db=DB, timeout=math.nan),
        ValueError,
        "timeout: NaN is not a timeout; use None for no limit",
    ),
    (
        "advisory timeout inf",
        lambda: aiopglock.advisory("k", db=DB, timeout=math.inf),
        ValueError,
        "timeout: inf is longer than PostgreSQL's limit of 2147483647 ms; use None for no limit",
    ),
    (
        "advisory timeout timedelta too long",
        lambda: aiopglock.advisory("k", db=DB, timeout=timedelta(days=30)),
        ValueError,
        "timeout: datetime.timedelta(days=30) is longer than PostgreSQL's limit of "
        "2147483647 ms; use None for no limit",
    ),
    (
        "advisory side_effect",
        lambda: aiopglock.advisory("k", db=DB, side_effect="raise"),
        ValueError,
        "side_effect: expected aiopglock.Return, aiopglock.Raise or aiopglock.Skip, got 'raise'",
    ),
    (
        "advisory key float",
        lambda: aiopglock.advisory(1.5, db=DB),
        TypeError,
        "key: expected str, int or (int, int), got float 1.5",
    ),
    (
        "advisory key bool pair",
        lambda: aiopglock.advisory((True, 1), db=DB),
        TypeError,
        "key: a tuple key must be two ints, got (True, 1)",
    ),
    (
        "advisory decorates a sync function",
        lambda: aiopglock.advisory("k", db=DB)(_sync),
        TypeError,
        "aiopglock.advisory decorates coroutine functions (async def); '_sync' is not one",
    ),
    (
        "advisory decorates a partial of a sync function",
        lambda: aiopglock.advisory("k", db=DB)(functools.partial(_sync)),
        TypeError,
        "aiopglock.advisory decorates coroutine functions (async def); "
        "functools.partial of '_sync' is not one",
    ),
    (
        "advisory_key bool",
        lambda: aiopglock.advisory_key(True),
        TypeError,
        "key: expected str, int or (int, int), got bool True",
    ),
    # configure()
    (
        "configure heartbeat bool",
        lambda: aiopglock.configure(heartbeat=True),
        TypeError,
        "heartbeat: expected a number of seconds, got bool True",
    ),
    (
        "configure heartbeat zero",
        lambda: aiopglock.configure(heartbeat=0),
        ValueError,
        "heartbeat: expected a positive number of seconds, got 0",
    ),
    (
        "configure heartbeat nan",
        lambda: aiopglock.configure(heartbeat=math.nan),
        ValueError,
        "heartbeat: expected a positive number of seconds, got nan",
    ),
    (
        "configure session_pooler",
        lambda: aiopglock.configure(session_pooler=1),
        TypeError,
        "session_pooler: expected True or False, got int 1",
    ),
    (
        "configure db",
        lambda: aiopglock.configure(db=5),
        TypeError,
        "db: expected an asyncpg Pool, an asyncpg Connection or a zero-argument callable "
        "returning one, got int 5",
    ),
    # locks(), cancel(), terminate()
    (
        "locks blocked",
        lambda: aiopglock.locks(DB, blocked=1),
        TypeError,
        "blocked: expected True or False, got int 1",
    ),
    (
        "locks all_databases",
        lambda: aiopglock.locks(DB, all_databases="y"),
        TypeError,
        "all_databases: expected True or False, got str 'y'",
    ),
    (
        "locks include_self",
        lambda: aiopglock.locks(DB, include_self=None),
        TypeError,
        "include_self: expected True or False, got NoneType None",
    ),
    (
        "locks pids str",
        lambda: aiopglock.locks(DB, pids="12"),
        TypeError,
        "pids: expected an iterable of ints, got str '12'",
    ),
    (
        "locks pids bool item",
        lambda: aiopglock.locks(DB, pids=[True]),
        TypeError,
        "pids: expected ints, got bool True",
    ),
    (
        "locks pids negative",
        lambda: aiopglock.locks(DB, pids=-1),
        ValueError,
        "pids: -1 is not a process id",
    ),
    (
        "locks pids too large",
        lambda: aiopglock.locks(DB, pids=[2**31]),
        ValueError,
        "pids: 2147483648 is not a process id",
    ),
    (
        "locks locktype",
        lambda: aiopglock.locks(DB, locktype=5),
        TypeError,
        "locktype: expected a str or an iterable of str, got int 5",
    ),
    (
        "locks database",
        lambda: aiopglock.locks(DB, database=5),
        TypeError,
        "database: expected a database name, got int 5",
    ),
    (
        "cancel pid zero",
        lambda: aiopglock.cancel(DB, 0),
        ValueError,
        "pids: 0 is not a process id",
    ),
    (
        "terminate pid str",
        lambda: aiopglock.terminate(DB, "42"),
        TypeError,
        "pids: expected ints, got str '42'",
    ),
    (
        "describe_backends pid",
        lambda: _introspect.describe_backends(DB, [1.0]),
        TypeError,
        "pids: expected ints, got float 1.0",
    ),
    (
        "signal_sessions pid",
        lambda: _introspect.signal_sessions(DB, "cancel", {True: NOW}),
        TypeError,
        "pids: expected ints, got bool True",
    ),
    (
        "signal_sessions start",
        lambda: _introspect.signal_sessions(DB, "cancel", {42: "now"}),
        TypeError,
        "sessions: expected datetimes, got str 'now'",
    ),
    # prioritize()
    (
        "prioritize interval zero",
        lambda: aiopglock.prioritize(DB, interval=0),
        ValueError,
        "interval: expected a positive number of seconds, got 0",
    ),
    (
        "prioritize interval type",
        lambda: aiopglock.prioritize(DB, interval="1"),
        TypeError,
        "interval: expected a number of seconds or a timedelta, got str '1'",
    ),
    (
        "prioritize interval nan",
        lambda: aiopglock.prioritize(DB, interval=math.nan),
        ValueError,
        "interval: expected a finite number of seconds, got nan",
    ),
    (
        "prioritize min_age negative",
        lambda: aiopglock.prioritize(DB, min_age=timedelta(seconds=-1)),
        ValueError,
        "min_age: expected zero or more seconds, got datetime.timedelta(days=-1, seconds=86399)",
    ),
    (
        "prioritize action",
        lambda: aiopglock.prioritize(DB, action="cancel"),
        TypeError,
        "action: expected aiopglock.Cancel or aiopglock.Terminate, got str 'cancel'",
    ),
    (
        "prioritize via",
        lambda: aiopglock.prioritize(DB, via=5),
        TypeError,
        "via: expected an asyncpg Pool or a DSN string, got int 5",
    ),
    (
        "prioritize via empty",
        lambda: aiopglock.prioritize(DB, via=""),
        ValueError,
        "via: the DSN is empty",
    ),
    (
        "prioritize predicate",
        lambda: aiopglock.prioritize(DB, predicate=5),
        TypeError,
        "predicate: expected a callable or None, got int 5",
    ),
    (
        "prioritize include_other_databases",
        lambda: aiopglock.prioritize(DB, include_other_databases=1),
        TypeError,
        "include_other_databases: expected True or False, got int 1",
    ),
    (
        "prioritize monitor_application_name",
        lambda: aiopglock.prioritize(DB, monitor_application_name="a\x00b"),
        ValueError,
        "monitor_application_name: expected a non-empty name without NUL, got 'a\\x00b'",
    ),
    # Watchdog()
    (
        "Watchdog max_wait",
        lambda: aiopglock.Watchdog(DB, max_wait=-1),
        ValueError,
        "max_wait: expected zero or more seconds, got -1",
    ),
    (
        "Watchdog interval inf",
        lambda: aiopglock.Watchdog(DB, max_wait=1, interval=math.inf),
        ValueError,
        "interval: expected a finite number of seconds, got inf",
    ),
    (
        "Watchdog dry_run",
        lambda: aiopglock.Watchdog(DB, max_wait=1, dry_run="no"),
        TypeError,
        "dry_run: expected True or False, got str 'no'",
    ),
    (
        "Watchdog database empty collection",
        lambda: aiopglock.Watchdog(DB, max_wait=1, database=[]),
        ValueError,
        "database: an empty collection matches nothing; use None for no filter",
    ),
    (
        "Watchdog user bytes",
        lambda: aiopglock.Watchdog(DB, max_wait=1, user=b"u"),
        TypeError,
        "user: expected a name or a collection of names, got bytes b'u'",
    ),
    (
        "Watchdog application_name item",
        lambda: aiopglock.Watchdog(DB, max_wait=1, application_name=["a", 5]),
        TypeError,
        "application_name: expected a str, got int 5",
    ),
    (
        "Watchdog exclude_pids str",
        lambda: aiopglock.Watchdog(DB, max_wait=1, exclude_pids="42"),
        TypeError,
        "exclude_pids: expected a collection of pids, got str '42'",
    ),
    (
        "Watchdog exclude_pids zero",
        lambda: aiopglock.Watchdog(DB, max_wait=1, exclude_pids=[0]),
        ValueError,
        "exclude_pids: 0 is not a process id",
    ),
    (
        "Watchdog exclude_pids bool",
        lambda: aiopglock.Watchdog(DB, max_wait=1, exclude_pids=[False]),
        TypeError,
        "exclude_pids: expected ints, got bool False",
    ),
    (
        "Watchdog exclude_application_names",
        lambda: aiopglock.Watchdog(DB, max_wait=1, exclude_application_names=None),
        TypeError,
        "exclude_application_names: expected a name or a collection of names, got NoneType None",
    ),
    (
        "Watchdog callback",
        lambda: aiopglock.Watchdog(DB, max_wait=1, callback="print"),
        TypeError,
        "callback: expected a callable or None, got str 'print'",
    ),
    (
        "Watchdog history bool",
        lambda: aiopglock.Watchdog(DB, max_wait=1, history=True),
        TypeError,
        "history: expected an int, got bool True",
    ),
    (
        "Watchdog history negative",
        lambda: aiopglock.Watchdog(DB, max_wait=1, history=-1),
        ValueError,
        "history: expected 0 or more, got -1",
    ),
    (
        "Watchdog db DSN empty",
        lambda: aiopglock.Watchdog("", max_wait=1),
        ValueError,
        "db: the DSN is empty",
    ),
    # table(), rows(), lock_timeout(), statement_timeout(), Locker()
    (
        "table name",
        lambda: aiopglock.table(5, db=DB),
        TypeError,
        'tables: expected "name", "schema.name" or ("schema", "name"), got int 5',
    ),
    (
        "table mode",
        lambda: aiopglock.table("t", mode=5, db=DB),
        TypeError,
        "mode: expected an aiopglock.TableLockMode or its name, got int 5",
    ),
    (
        "table timeout",
        lambda: aiopglock.table("t", db=DB, timeout=[1]),
        TypeError,
        "timeout: expected None, a number of seconds or a timedelta, got list [1]",
    ),
    (
        "rows of",
        lambda: aiopglock.rows("SELECT 1 FROM t", db=DB, of=5),
        TypeError,
        "of: expected a table name or a list of them, got int 5",
    ),
    (
        "rows skip_locked",
        lambda: aiopglock.rows("SELECT 1 FROM t", db=DB, skip_locked=1),
        TypeError,
        "skip_locked: expected True or False, got int 1",
    ),
    (
        "rows strength",
        lambda: aiopglock.rows("SELECT 1 FROM t", db=DB, strength=5),
        TypeError,
        "strength: expected an aiopglock.RowLockStrength or its name, got int 5",
    ),
    (
        "lock_timeout type",
        lambda: aiopglock.lock_timeout("1s", db=DB),
        TypeError,
        "timeout: expected None, a number of seconds or a timedelta, got str '1s'",
    ),
    (
        "statement_timeout negative",
        lambda: aiopglock.statement_timeout(-0.5, db=DB),
        ValueError,
        "timeout: -0.5 is negative; use 0 to never wait, None for no limit",
    ),
    (
        "Locker pool",
        lambda: aiopglock.Locker(5),
        TypeError,
        "pool: expected an asyncpg Pool, got int 5",
    ),
]


@pytest.mark.parametrize(
    ("call", "error", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_each_check_words_its_error_as_before(
    call: Callable[[], Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as raised:
        result = call()
        if asyncio.iscoroutine(result):
            asyncio.run(result)
    assert str(raised.value) == message


def _aiopglock_imports(path: Path) -> set[str]:
    """The aiopglock modules ``path`` imports, as dotted names."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                found.add("." * node.level + (node.module or ""))
            elif (node.module or "").startswith("aiopglock"):
                found.add(node.module or "")
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("aiopglock")}
    return found


def test_validate_is_a_leaf_module() -> None:
    assert _aiopglock_imports(PACKAGE / "_validate.py") <= {"._errors"}


# The checks _validate owns, under the names their old copies had too.
OWNED = {name for name in _validate.__all__ if callable(getattr(_validate, name))}
COPIES = OWNED | {f"_{name}" for name in OWNED}


def test_no_module_keeps_its_own_copy_of_a_shared_check() -> None:
    copies = []
    describe_by_hand = re.compile(r"type\((\w+)\)\.__name__\} \{\1!r\}")
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "_validate.py":
            continue
        text = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in COPIES:
                copies.append(f"{path.relative_to(PACKAGE)}:{node.lineno} def {node.name}")
        copies += [
            f"{path.relative_to(PACKAGE)}: {match.group(0)}"
            for match in describe_by_hand.finditer(text)
        ]
    assert copies == []


def test_every_module_that_checks_arguments_uses_validate() -> None:
    # advisory()'s arguments are checked in _handle.py (the spec it shares with the Locker).
    for name in ("_handle", "_db", "_introspect", "_keys", "_prioritize", "_rows", "_tables"):
        assert "._validate" in _aiopglock_imports(PACKAGE / f"{name}.py"), name
    # The command line checks its options in cli/_options.py.
    assert ".._validate" in _aiopglock_imports(PACKAGE / "cli" / "_options.py")


def test_validate_exports_what_it_defines() -> None:
    functions = {
        name
        for name, value in vars(_validate).items()
        if callable(value) and getattr(value, "__module__", None) == _validate.__name__
    }
    assert {name for name in functions if not name.startswith("_")} == OWNED
    assert all(hasattr(_validate, name) for name in _validate.__all__)
    assert {"check_bool", "describe", "parse_timeout", "PID_MAX"} <= set(_validate.__all__)
