"""Row locks: ``aiopglock.rows``, its handle ``RowLock`` and ``RowLockStrength``.

The caller writes one ``SELECT``; aiopglock appends the locking clause
(``FOR UPDATE | NO KEY UPDATE | SHARE | KEY SHARE [OF ...] [NOWAIT | SKIP
LOCKED]``) on a line of its own. Every row the handle yields is locked: the
query is checked first (``_rowquery.check_query``), and a shape whose rows
PostgreSQL's locking clause would skip (a ``WITH``, a function or ``VALUES``
in ``FROM``, no ``FROM`` at all) is refused with a ``ValueError`` before
anything is sent. The transaction handling lives in ``_transaction.py``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from typing import Any

from . import _sql
from ._advisory import SideEffect
from ._conntypes import Conn
from ._db import DB, check_db
from ._rowquery import check_query
from ._tables import TableName, check_side_effect, parse_member, parse_names
from ._timeouts import Timeout
from ._transaction import TransactionLock, TransactionLockSpec
from ._validate import check_bool, describe, parse_timeout

__all__ = ["RowLock", "RowLockStrength", "Rows", "check_query", "rows"]


class RowLockStrength(enum.Enum):
    """The four row-lock strengths of ``SELECT ... FOR``, strongest first.

    ``strength=`` also takes them as text in any case, with spaces or
    underscores: ``"no key update"``, ``"NO_KEY_UPDATE"``, ``"Key Share"``.

    Example::

        async with aiopglock.rows("SELECT * FROM orders WHERE id = $1", 7, db=pool,
                                  strength=aiopglock.RowLockStrength.NO_KEY_UPDATE):
            ...
    """

    UPDATE = "UPDATE"
    NO_KEY_UPDATE = "NO KEY UPDATE"
    SHARE = "SHARE"
    KEY_SHARE = "KEY SHARE"

    def __repr__(self) -> str:
        return f"aiopglock.RowLockStrength.{self.name}"


def parse_strength(value: object) -> RowLockStrength:
    strength = parse_member(value, RowLockStrength, "strength")
    if strength is None:
        names = ", ".join(repr(m.value.lower()) for m in RowLockStrength)
        raise ValueError(f"strength: {value!r} is not a row-lock strength; expected one of {names}")
    return strength


# -- the lock ----------------------------------------------------------------


class RowLock(TransactionLock):
    """The handle of one ``SELECT ... FOR <strength>`` (what ``async with
    aiopglock.rows(...)`` yields).

    Iterating it, ``len()`` and indexing give the locked records (also
    ``records``, a list). ``bool(lock)`` is True iff the lock statement
    succeeded: with ``skip_locked=True`` that is always so, even when every
    matching row was taken by others and ``records`` is empty; test
    ``lock.records`` (or ``len(lock)``) for "claimed something".
    ``connection`` is the connection whose transaction holds the locks.

    Example::

        async with aiopglock.rows("SELECT id FROM jobs WHERE NOT done LIMIT 10",
                                  db=pool, skip_locked=True) as claimed:
            for job in claimed:
                ...
    """

    __slots__ = ("_args", "_query", "_sql", "records", "strength")

    _what = "row lock"

    def __init__(
        self,
        query: str,
        sql: tuple[str, str],
        args: tuple[Any, ...],
        strength: RowLockStrength,
        timeout: float | None,
    ) -> None:
        super().__init__(timeout)
        self._query = query
        self._sql = sql
        self._args = args
        self.strength = strength
        self.records: list[Any] = []

    async def _statement(self, conn: Conn, *, nowait: bool) -> None:
        if not _standard_conforming(conn):
            # This server reads backslashes in '...' as escapes: check the
            # query as it reads it (the setting is known without a round trip).
            check_query(self._query, standard_conforming=False)
        self.records = list(await conn.fetch(self._sql[nowait], *self._args))

    def __iter__(self) -> Iterator[Any]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Any:
        return self.records[index]

    def __repr__(self) -> str:
        pid = f" pid={self.pid}" if self.pid is not None and not self._done else ""
        return f"<RowLock FOR {self.strength.value} {self._state()} {len(self.records)} rows{pid}>"


def _standard_conforming(conn: Conn) -> bool:
    """``standard_conforming_strings`` as the server last reported it (a
    setting it sends with every change)."""
    value = getattr(conn.get_settings(), "standard_conforming_strings", "on")
    return value != "off"


class Rows(TransactionLockSpec[RowLock]):
    """A row lock request: an async context manager, built by :func:`aiopglock.rows`.

    Holds only configuration: one instance may be entered by many tasks at
    once, each entry yielding its own :class:`aiopglock.RowLock`.

    Example::

        next_jobs = aiopglock.rows("SELECT id FROM jobs WHERE NOT done LIMIT 5",
                                   db=pool, skip_locked=True)

        async def worker() -> None:
            async with next_jobs as claimed:
                ...
    """

    __slots__ = ("_args", "_query", "_sql", "_strength")

    def __init__(
        self,
        query: str,
        *args: Any,
        db: DB | None = None,
        strength: RowLockStrength | str = RowLockStrength.UPDATE,
        of: TableName | Sequence[TableName] | None = None,
        skip_locked: bool = False,
        timeout: Timeout = None,
        side_effect: SideEffect | None = None,
    ) -> None:
        body = check_query(query)
        self._strength = parse_strength(strength)
        if of is None:
            of_names: tuple[tuple[str, ...], ...] = ()
        elif isinstance(of, (str, tuple)):
            of_names = parse_names([of], "of", qualified=False)
        elif isinstance(of, (list, frozenset, set)) or (
            isinstance(of, Sequence) and not isinstance(of, (bytes, bytearray))
        ):
            of_names = parse_names(list(of), "of", qualified=False)
            if not of_names:
                raise ValueError("of: empty; use None to lock rows of every table")
        else:
            raise TypeError(f"of: expected a table name or a list of them, got {describe(of)}")
        check_bool(skip_locked, "skip_locked")
        timeout_s = parse_timeout(timeout)
        if skip_locked and timeout_s == 0:
            raise ValueError(
                "timeout=0 (NOWAIT) and skip_locked=True exclude each other: "
                "SKIP LOCKED never waits for a row already"
            )
        check_db(db)
        self._configure(db, timeout_s, check_side_effect(side_effect))
        of_parts = tuple(parts[0] for parts in of_names)
        # (statement, its NOWAIT form); SKIP LOCKED never waits, and timeout=0
        # with it was refused above, so it has one form.
        waiting = (
            body
            + "\n"
            + _sql.locking_clause(
                self._strength.value, of_parts, nowait=False, skip_locked=skip_locked
            )
        )
        nowait = (
            waiting
            if skip_locked
            else body
            + "\n"
            + _sql.locking_clause(self._strength.value, of_parts, nowait=True, skip_locked=False)
        )
        self._sql = (waiting, nowait)
        self._args = args
        self._query = query

    def __repr__(self) -> str:
        return (
            f"aiopglock.rows(<{self._sql[0]!r}>, strength={self._strength!r}, "
            f"timeout={self._timeout}, side_effect={self._side_effect!r})"
        )

    _kind = "rows"

    def _new_lock(self) -> RowLock:
        return RowLock(self._query, self._sql, self._args, self._strength, self._timeout)

    def _otel_mode(self, lock: RowLock) -> str:
        return str(lock.strength.value)

    def _not_acquired(self, lock: RowLock) -> str:
        return f"row lock (FOR {self._strength.value}) not acquired (timeout={self._timeout})"


def rows(
    query: str,
    *args: Any,
    db: DB | None = None,
    strength: RowLockStrength | str = RowLockStrength.UPDATE,
    of: TableName | Sequence[TableName] | None = None,
    skip_locked: bool = False,
    timeout: Timeout = None,
    side_effect: SideEffect | None = None,
) -> Rows:
    """Row locks as an async context manager: ``query`` plus a locking clause.

    - ``query``, ``args``: one ``SELECT ... FROM`` without a locking clause,
      with ``$n`` parameters; aiopglock appends ``FOR <strength> [OF ...]
      [NOWAIT | SKIP LOCKED]``. Every row the handle yields is locked: a
      query whose rows the locking clause would skip (``WITH``, a function
      or ``VALUES`` in ``FROM``, no ``FROM``) or cannot lock (``DISTINCT``,
      ``GROUP BY``, ``UNION`` ...) is a ``ValueError`` saying why, before
      anything is sent.
    - ``strength``: ``"update"`` (default), ``"no key update"``, ``"share"``,
      ``"key share"``, or a :class:`aiopglock.RowLockStrength`.
    - ``of``: lock rows of these tables (or aliases) only: a name or a list
      of names, unqualified as PostgreSQL requires, always quoted.
    - ``skip_locked``: skip rows locked by others instead of waiting (the
      job-queue pattern); the handle is truthy even when nothing was left.
    - ``timeout``: the whole wait, a Pool's connection included: ``None``,
      ``0`` (never waits: a busy pool is "not acquired", a busy row
      ``NOWAIT``) or ``> 0`` seconds (the rest after the pool wait becomes a
      scoped ``lock_timeout``). ``0`` with ``skip_locked`` is a ``ValueError``.
    - ``db``, ``side_effect``: as for :func:`aiopglock.table` (the same
      transaction rules: aiopglock's own transaction, committed at the end of
      the block, in which ``lock.connection.transaction()`` nests, or the
      caller's).

    Example::

        async with aiopglock.rows(
            "SELECT id, payload FROM jobs WHERE NOT done ORDER BY id LIMIT 10",
            db=pool, skip_locked=True,
        ) as claimed:
            for job in claimed:
                await claimed.connection.execute(
                    "UPDATE jobs SET done = true WHERE id = $1", job["id"])
    """
    return Rows(
        query,
        *args,
        db=db,
        strength=strength,
        of=of,
        skip_locked=skip_locked,
        timeout=timeout,
        side_effect=side_effect,
    )
