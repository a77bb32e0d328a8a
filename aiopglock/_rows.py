"""Row locks: ``aiopglock.rows``, its handle ``RowLock`` and ``RowLockStrength``.

The caller writes one ``SELECT``; aiopglock appends the locking clause
(``FOR UPDATE | NO KEY UPDATE | SHARE | KEY SHARE [OF ...] [NOWAIT | SKIP
LOCKED]``) on a line of its own, after checking the query with a small lexer
that knows PostgreSQL's string literals (``'...'``, ``E'...'``,
``$tag$...$tag$``), quoted identifiers and comments (``--``, nested ``/* */``):

- it must be one statement (one trailing ``;`` is dropped);
- it must begin with ``SELECT``, or with ``WITH`` whose common table
  expressions are followed by ``SELECT`` (a ``WITH`` using ``SEARCH`` or
  ``CYCLE`` is not accepted; neither are a parenthesised query, ``VALUES``
  or ``TABLE``);
- it must not carry a locking clause already (``FOR UPDATE``, ``FOR NO KEY
  UPDATE``, ``FOR SHARE``, ``FOR KEY SHARE``, ``FOR READ ONLY``, at any
  depth), nor ``SELECT ... INTO``;
- literals and comments must be closed (an open one would swallow the clause).

The lexer assumes ``standard_conforming_strings = on`` (PostgreSQL's default
since 9.1). It exists to give clear errors before any SQL is sent; the server
remains the final judge (asyncpg sends the query as one prepared statement,
which PostgreSQL refuses to hold more than one command). Restrictions of
PostgreSQL's own (no locking with ``DISTINCT``, ``GROUP BY``, ``UNION``,
aggregates ...) are reported by PostgreSQL, after the transaction's rollback.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator, Sequence
from typing import Any

from . import _sql
from ._advisory import SideEffect
from ._db import DB, check_db
from ._tables import TableName, check_side_effect, parse_member, parse_names
from ._timeouts import Timeout, parse_timeout
from ._transaction import TransactionLock, TransactionLockSpec

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


# -- the query check ----------------------------------------------------------

_IDENT_START = r"A-Za-z_\u0080-\U0010ffff"
_WORD = re.compile(rf"[{_IDENT_START}][{_IDENT_START}0-9$]*")
_DOLLAR_QUOTE = re.compile(rf"\$(?:[{_IDENT_START}][{_IDENT_START}0-9]*)?\$")
_PARAM = re.compile(r"\$[0-9]+")
# PostgreSQL's whitespace; any other character >= 0x80 can be part of a name.
_SPACE = frozenset(" \t\n\r\f\v")
_LINE_END = re.compile(r"[\n\r]")
_DIGITS = frozenset("0123456789")
_NUMBER = re.compile(r"[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?|[0-9]+\.")


class _Token:
    __slots__ = ("depth", "kind", "start", "text")

    def __init__(self, kind: str, text: str, start: int, depth: int) -> None:
        self.kind = kind  # "word" (lower-cased), "ident", "(", ")", ",", ";", "other"
        self.text = text
        self.start = start
        self.depth = depth  # nesting of ( and [ outside this token


def _unclosed(what: str, at: int) -> ValueError:
    return ValueError(f"query: unterminated {what} starting at offset {at}")


def _end_of_quoted(query: str, start: int, quote: str, *, backslash: bool) -> int:
    """The index just past the literal opened at ``start`` ('' or "" repeat it)."""
    i = start + 1
    n = len(query)
    while i < n:
        ch = query[i]
        if backslash and ch == "\\":
            i += 2
            continue
        if ch == quote:
            if i + 1 < n and query[i + 1] == quote:
                i += 2
                continue
            return i + 1
        i += 1
    raise _unclosed("string literal" if quote == "'" else "quoted identifier", start)


def _tokens(query: str) -> Iterator[_Token]:
    """The significant tokens of ``query``: comments and whitespace skipped,
    literals reduced to one "other" token."""
    i, n, depth = 0, len(query), 0
    while i < n:
        ch = query[i]
        if ch in _SPACE:
            i += 1
        elif query.startswith("--", i):
            # A comment runs to the end of the line: \n or \r, as PostgreSQL reads it.
            match = _LINE_END.search(query, i)
            i = n if match is None else match.end()
        elif query.startswith("/*", i):
            start, level, i = i, 1, i + 2
            while level:
                if i >= n:
                    raise _unclosed("comment", start)
                if query.startswith("/*", i):
                    level, i = level + 1, i + 2
                elif query.startswith("*/", i):
                    level, i = level - 1, i + 2
                else:
                    i += 1
        elif ch == "'":
            end = _end_of_quoted(query, i, "'", backslash=False)
            yield _Token("other", "", i, depth)
            i = end
        elif ch == '"':
            end = _end_of_quoted(query, i, '"', backslash=False)
            yield _Token("ident", query[i + 1 : end - 1].replace('""', '"'), i, depth)
            i = end
        elif ch == "$":
            quote = _DOLLAR_QUOTE.match(query, i)
            if quote is not None:
                tag = quote.group()
                end = query.find(tag, quote.end())
                if end < 0:
                    raise _unclosed("dollar-quoted string", i)
                yield _Token("other", "", i, depth)
                i = end + len(tag)
            else:
                param = _PARAM.match(query, i)
                yield _Token("other", "", i, depth)
                i = param.end() if param is not None else i + 1
        elif ch in _DIGITS or (ch == "." and i + 1 < n and query[i + 1] in _DIGITS):
            match = _NUMBER.match(query, i)
            yield _Token("other", "", i, depth)
            i = match.end() if match is not None else i + 1
        elif (word := _WORD.match(query, i)) is not None:
            text = word.group()
            if text in ("e", "E") and word.end() < n and query[word.end()] == "'":
                end = _end_of_quoted(query, word.end(), "'", backslash=True)
                yield _Token("other", "", i, depth)
                i = end
            else:
                yield _Token("word", text.lower(), i, depth)
                i = word.end()
        elif ch in "([":
            yield _Token("(", ch, i, depth)
            depth += 1
            i += 1
        elif ch in ")]":
            if depth == 0:
                raise ValueError(f"query: unbalanced parentheses at offset {i}")
            depth -= 1
            yield _Token(")", ch, i, depth)
            i += 1
        elif ch in ",;":
            yield _Token(ch, ch, i, depth)
            i += 1
        else:
            yield _Token("other", ch, i, depth)
            i += 1
    if depth:
        raise ValueError("query: unbalanced parentheses")


_LOCKING = {"update", "share", "no", "key", "read"}


def _skip_group(tokens: Sequence[_Token], i: int) -> int:
    """``tokens[i]`` opens a group: the index just past its closing token."""
    depth = tokens[i].depth
    for j in range(i + 1, len(tokens)):
        if tokens[j].kind == ")" and tokens[j].depth == depth:
            return j + 1
    raise ValueError("query: unbalanced parentheses")


def _main_statement_after_with(tokens: Sequence[_Token]) -> _Token:
    """Walk ``WITH [RECURSIVE] name [(cols)] AS [NOT] [MATERIALIZED] (...) , ...``."""
    bad = ValueError(
        "query: a WITH query must be 'WITH name AS (...)[, ...] SELECT ...'; "
        "aiopglock could not read it as one (SEARCH and CYCLE are not supported)"
    )
    i = 1
    if i < len(tokens) and tokens[i].kind == "word" and tokens[i].text == "recursive":
        i += 1
    while True:
        if i >= len(tokens) or tokens[i].kind not in ("word", "ident"):
            raise bad
        i += 1
        if i < len(tokens) and tokens[i].kind == "(":
            i = _skip_group(tokens, i)
        if i >= len(tokens) or tokens[i].kind != "word" or tokens[i].text != "as":
            raise bad
        i += 1
        for optional in ("not", "materialized"):
            if i < len(tokens) and tokens[i].kind == "word" and tokens[i].text == optional:
                i += 1
        if i >= len(tokens) or tokens[i].kind != "(":
            raise bad
        i = _skip_group(tokens, i)
        if i < len(tokens) and tokens[i].kind == ",":
            i += 1
            continue
        if i >= len(tokens) or tokens[i].kind != "word":
            raise bad
        return tokens[i]


def check_query(query: object) -> str:
    """Validate ``query`` (see the module docstring); return it without its
    trailing ``;``, ready for a locking clause on a line of its own."""
    if not isinstance(query, str):
        raise TypeError(f"query: expected a SELECT statement as str, got {type(query).__name__}")
    tokens = list(_tokens(query))
    if not tokens:
        raise ValueError("query: empty; expected one SELECT statement")
    semicolons = [t for t in tokens if t.kind == ";"]
    if semicolons:
        if len(semicolons) > 1 or tokens[-1] is not semicolons[0]:
            raise ValueError(
                "query: several statements; expected one SELECT (one trailing ';' is allowed)"
            )
        query = query[: semicolons[0].start]
        tokens.pop()
        if not tokens:
            raise ValueError("query: empty; expected one SELECT statement")
    first = tokens[0]
    if first.kind == "word" and first.text == "with":
        main = _main_statement_after_with(tokens)
    else:
        main = first
    if main.kind != "word" or main.text != "select":
        raise ValueError(
            "query: expected one SELECT (or WITH ... SELECT) statement; "
            "aiopglock appends the locking clause to it"
        )
    for i, t in enumerate(tokens):
        if t.kind != "word":
            continue
        if t.text == "into" and t.depth == 0:
            raise ValueError("query: SELECT ... INTO creates a table; expected a plain SELECT")
        if t.text == "for" and i + 1 < len(tokens):
            nxt = tokens[i + 1]
            if nxt.kind == "word" and nxt.text in _LOCKING:
                raise ValueError(
                    "query: it already has a locking clause (FOR UPDATE/SHARE/...); "
                    "leave it out: aiopglock appends it from strength=, of=, "
                    "skip_locked= and timeout="
                )
    return query


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

    __slots__ = ("_args", "_sql", "records", "strength")

    _what = "row lock"

    def __init__(
        self,
        sql: tuple[str, str],
        args: tuple[Any, ...],
        strength: RowLockStrength,
        timeout: float | None,
    ) -> None:
        super().__init__(timeout)
        self._sql = sql
        self._args = args
        self.strength = strength
        self.records: list[Any] = []

    async def _statement(self, conn: Any, *, nowait: bool) -> None:
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

    __slots__ = ("_args", "_sql", "_strength")

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
            raise TypeError(
                f"of: expected a table name or a list of them, got {type(of).__name__} {of!r}"
            )
        if not isinstance(skip_locked, bool):
            raise TypeError(
                f"skip_locked: expected True or False, got {type(skip_locked).__name__} "
                f"{skip_locked!r}"
            )
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

    def __repr__(self) -> str:
        return (
            f"aiopglock.rows(<{self._sql[0]!r}>, strength={self._strength!r}, "
            f"timeout={self._timeout}, side_effect={self._side_effect!r})"
        )

    def _new_lock(self) -> RowLock:
        return RowLock(self._sql, self._args, self._strength, self._timeout)

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

    - ``query``, ``args``: one ``SELECT`` without a locking clause, with
      ``$n`` parameters; aiopglock appends ``FOR <strength> [OF ...] [NOWAIT
      | SKIP LOCKED]``.
    - ``strength``: ``"update"`` (default), ``"no key update"``, ``"share"``,
      ``"key share"``, or a :class:`aiopglock.RowLockStrength`.
    - ``of``: lock rows of these tables (or aliases) only: a name or a list
      of names, unqualified as PostgreSQL requires, always quoted.
    - ``skip_locked``: skip rows locked by others instead of waiting (the
      job-queue pattern); the handle is truthy even when nothing was left.
    - ``timeout``: ``None``, ``0`` (``NOWAIT``) or ``> 0`` seconds (a scoped
      ``lock_timeout``). ``0`` with ``skip_locked`` is a ``ValueError``.
    - ``db``, ``side_effect``: as for :func:`aiopglock.table` (the same
      transaction rules: aiopglock's own transaction, committed at the end of
      the block, or the caller's).

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
