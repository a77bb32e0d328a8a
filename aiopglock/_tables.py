"""Table locks: ``aiopglock.table``, its handle ``TableLock`` and ``TableLockMode``.

``LOCK TABLE`` inside a transaction: one aiopglock opens and ends (``db`` a
Pool, or a Connection outside a transaction), or the caller's (held until it
ends). The transaction handling and its cancellation safety live in
``_transaction.py``; this module validates names and modes and builds the
statement, with every name quoted as an identifier.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any, TypeVar

from . import _sql
from ._advisory import Return, SideEffect, Skip
from ._conntypes import Conn
from ._db import DB, check_db
from ._timeouts import Timeout
from ._transaction import TransactionLock, TransactionLockSpec
from ._validate import describe, parse_timeout

__all__ = [
    "Table",
    "TableLock",
    "TableLockMode",
    "TableName",
    "check_side_effect",
    "parse_names",
    "table",
]

TableName = str | tuple[str] | tuple[str, str]
"""A table: ``"name"``, ``"schema.name"``, ``("name",)`` or ``("schema", "name")``."""


class TableLockMode(enum.Enum):
    """The eight PostgreSQL table lock modes, weakest first.

    ``mode=`` also takes their names as text, in any case, with spaces or
    underscores: ``"row exclusive"``, ``"ROW_EXCLUSIVE"``, ``"Row Exclusive"``.
    ``pg_mode`` is the name ``pg_locks`` shows (``"RowExclusiveLock"``).

    Example::

        async with aiopglock.table("ledger", db=pool,
                                   mode=aiopglock.TableLockMode.SHARE_ROW_EXCLUSIVE):
            ...
    """

    ACCESS_SHARE = "ACCESS SHARE"
    ROW_SHARE = "ROW SHARE"
    ROW_EXCLUSIVE = "ROW EXCLUSIVE"
    SHARE_UPDATE_EXCLUSIVE = "SHARE UPDATE EXCLUSIVE"
    SHARE = "SHARE"
    SHARE_ROW_EXCLUSIVE = "SHARE ROW EXCLUSIVE"
    EXCLUSIVE = "EXCLUSIVE"
    ACCESS_EXCLUSIVE = "ACCESS EXCLUSIVE"

    def __repr__(self) -> str:
        return f"aiopglock.TableLockMode.{self.name}"

    @property
    def pg_mode(self) -> str:
        """The mode as ``pg_locks.mode`` names it, e.g. ``"ShareRowExclusiveLock"``."""
        return "".join(word.capitalize() for word in self.value.split()) + "Lock"


E = TypeVar("E", bound=enum.Enum)


def parse_member(value: object, members: type[E], arg: str) -> E | None:
    """``value`` as a member of ``members`` (whose values are upper-case SQL
    words): the member itself, or its words in any case with spaces or
    underscores. None when the text names none (the caller words that
    ValueError); anything but a member or text: a TypeError naming ``arg``."""
    if isinstance(value, members):
        return value
    if not isinstance(value, str):
        raise TypeError(
            f"{arg}: expected an aiopglock.{members.__name__} or its name, got {describe(value)}"
        )
    words = " ".join(value.replace("_", " ").split()).upper()
    for member in members:
        if member.value == words:
            return member
    return None


def parse_mode(value: object) -> TableLockMode:
    mode = parse_member(value, TableLockMode, "mode")
    if mode is None:
        names = ", ".join(repr(m.value) for m in TableLockMode)
        raise ValueError(
            f"mode: {value!r} is not a PostgreSQL table lock mode; expected one of {names}"
        )
    return mode


def _parse_name(value: object, name: str, *, qualified: bool) -> tuple[str, ...]:
    if isinstance(value, str):
        parts: tuple[Any, ...] = tuple(value.split("."))
        if len(parts) > 2:
            raise ValueError(
                f"{name}: {value!r} has more than one dot; for a name containing dots "
                'use the tuple form, ("schema", "na.me") or ("na.me",)'
            )
    elif isinstance(value, tuple):
        parts = value
        if len(parts) not in (1, 2) or not all(isinstance(p, str) for p in parts):
            raise TypeError(
                f'{name}: a tuple must be ("name",) or ("schema", "name") of str, got {value!r}'
            )
    else:
        raise TypeError(
            f'{name}: expected "name", "schema.name" or ("schema", "name"), got {describe(value)}'
        )
    for part in parts:
        if not part or "\x00" in part:
            raise ValueError(f"{name}: {value!r} holds an empty or invalid name")
    if not qualified and len(parts) > 1:
        raise ValueError(
            f"{name}: {value!r} is schema-qualified; PostgreSQL takes unqualified "
            "table names or aliases here (for a name containing a dot: (name,))"
        )
    return tuple(parts)


def parse_names(
    values: Iterable[object], name: str, *, qualified: bool
) -> tuple[tuple[str, ...], ...]:
    return tuple(_parse_name(value, name, qualified=qualified) for value in values)


def check_side_effect(value: object) -> SideEffect:
    """A context manager's side effect: ``Return`` (default) or ``Raise``."""
    if value is None:
        return Return
    if not isinstance(value, SideEffect):
        raise ValueError(
            f"side_effect: expected aiopglock.Return or aiopglock.Raise, got {value!r}"
        )
    if value is Skip:
        raise ValueError(
            "side_effect: aiopglock.Skip only applies to decorated functions; "
            "use aiopglock.Return or aiopglock.Raise with async with"
        )
    return value


class TableLock(TransactionLock):
    """The handle of one ``LOCK TABLE`` (what ``async with aiopglock.table(...)`` yields).

    ``bool(lock)`` is True iff the tables were locked. ``connection`` is the
    connection whose transaction holds the lock: run the block's statements
    on it. ``tables`` (the names as sent, quoted), ``mode``
    (:class:`aiopglock.TableLockMode`), ``pid`` (the holding backend),
    ``owns_transaction`` (aiopglock opened the transaction and ends it).

    Example::

        async with aiopglock.table("ledger", db=pool, mode="exclusive") as lock:
            await lock.connection.execute("INSERT INTO ledger VALUES (1)")
        # committed here
    """

    __slots__ = ("_sql", "mode", "tables")

    _what = "table lock"

    def __init__(
        self, tables: tuple[tuple[str, ...], ...], mode: TableLockMode, timeout: float | None
    ) -> None:
        super().__init__(timeout)
        self.tables = tuple(_sql.qualified_name(parts) for parts in tables)
        self.mode = mode
        self._sql = (
            _sql.lock_table(tables, mode.value, nowait=False),
            _sql.lock_table(tables, mode.value, nowait=True),
        )

    async def _statement(self, conn: Conn, *, nowait: bool) -> None:
        await conn.execute(self._sql[nowait])

    def __repr__(self) -> str:
        pid = f" pid={self.pid}" if self.pid is not None and not self._done else ""
        return f"<TableLock {', '.join(self.tables)} {self.mode.value} {self._state()}{pid}>"


class Table(TransactionLockSpec[TableLock]):
    """A table lock request: an async context manager, built by :func:`aiopglock.table`.

    Holds only configuration: one instance may be entered by many tasks at
    once, each entry yielding its own :class:`aiopglock.TableLock`.

    Example::

        ledger = aiopglock.table("ledger", db=pool, mode="share row exclusive", timeout=5)

        async def post() -> None:
            async with ledger as lock:
                ...
    """

    __slots__ = ("_mode", "_tables")

    def __init__(
        self,
        *tables: TableName,
        db: DB | None = None,
        mode: TableLockMode | str = TableLockMode.ACCESS_EXCLUSIVE,
        timeout: Timeout = None,
        side_effect: SideEffect | None = None,
    ) -> None:
        if not tables:
            raise TypeError("tables: name at least one table")
        self._tables = parse_names(tables, "tables", qualified=True)
        check_db(db)
        self._mode = parse_mode(mode)
        self._configure(db, parse_timeout(timeout), check_side_effect(side_effect))

    def __repr__(self) -> str:
        names = ", ".join(_sql.qualified_name(parts) for parts in self._tables)
        return (
            f"aiopglock.table({names}, mode={self._mode!r}, timeout={self._timeout}, "
            f"side_effect={self._side_effect!r})"
        )

    _kind = "table"

    def _new_lock(self) -> TableLock:
        return TableLock(self._tables, self._mode, self._timeout)

    def _otel_mode(self, lock: TableLock) -> str:
        return str(lock.mode.value)

    def _not_acquired(self, lock: TableLock) -> str:
        return (
            f"table lock on {', '.join(lock.tables)} ({self._mode.value}) "
            f"not acquired (timeout={self._timeout})"
        )


def table(
    *tables: TableName,
    db: DB | None = None,
    mode: TableLockMode | str = TableLockMode.ACCESS_EXCLUSIVE,
    timeout: Timeout = None,
    side_effect: SideEffect | None = None,
) -> Table:
    """``LOCK TABLE`` as an async context manager.

    - ``tables``: ``"name"``, ``"schema.name"``, ``("schema", "name")`` or
      ``("name",)``; always quoted as identifiers, so taken verbatim (case
      included) and never pasted into SQL raw.
    - ``db``: a Pool or a Connection outside a transaction: the block runs in
      a transaction aiopglock opens (with ``conn.transaction()``, so
      ``lock.connection.transaction()`` nests in it as a savepoint), committed
      when the block succeeds and rolled back on error or cancellation. A
      Connection inside a transaction: the lock is taken in it (under a
      savepoint) and held until it ends.
    - ``mode``: a :class:`aiopglock.TableLockMode` or its name in any case,
      with spaces or underscores (default ``ACCESS EXCLUSIVE``).
    - ``timeout``: the whole wait, a Pool's connection included. ``None``
      (the session's ``lock_timeout`` applies), ``0`` (never waits: a pool
      with no free connection is "not acquired", a busy table ``NOWAIT``),
      ``> 0`` seconds or ``timedelta`` (the pool wait plus the lock wait; the
      rest after the pool wait is a ``lock_timeout`` scoped to the lock).
    - ``side_effect``: ``aiopglock.Return`` (default: the handle is falsy when
      not acquired) or ``aiopglock.Raise`` (:class:`aiopglock.LockNotAcquired`).

    Example::

        async with aiopglock.table("accounts", db=pool, mode="share", timeout=2) as lock:
            if lock:
                total = await lock.connection.fetchval("SELECT sum(balance) FROM accounts")
    """
    return Table(*tables, db=db, mode=mode, timeout=timeout, side_effect=side_effect)
