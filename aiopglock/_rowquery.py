"""The query check of ``aiopglock.rows``: which ``SELECT`` may get a locking clause.

The rule: every row the handle yields is locked. PostgreSQL's ``FOR UPDATE``
(``SHARE``, ...) locks the rows of the *tables* a ``SELECT`` reads in its
``FROM`` clause, pushed down into subqueries in ``FROM``; it silently skips
everything else: a common table expression referenced in ``FROM`` (``WITH j
AS (...) SELECT ... FROM j``, materialized or not), a function (``FROM
generate_series(...)``), ``VALUES``, and a ``SELECT`` without ``FROM``. A
data-modifying ``WITH`` would even run (its ``DELETE`` deleting) and lock
nothing. So the check accepts one shape, read with a small lexer and parser:

    SELECT [ALL] <targets> FROM <from items> [WHERE ...] [ORDER BY ...]
        [LIMIT ...] [OFFSET ...] [FETCH ...]

where a from item is a table (``name``, ``schema.name``, ``ONLY name``,
``name *``, with an alias and ``TABLESAMPLE``), a subquery in parentheses that
follows the same rules (``LATERAL`` too), or a parenthesised join of those;
joined with ``,`` or ``[NATURAL] [INNER | LEFT | RIGHT | FULL | CROSS]
JOIN ... [ON ... | USING (...)]``. Refused before anything is sent, with a
``ValueError`` that says why:

- ``WITH`` (top level, or in a subquery in ``FROM``), ``VALUES``, ``TABLE``,
  a parenthesised query, a function or ``ROWS FROM (...)`` in ``FROM``, a
  ``SELECT`` without ``FROM``: their rows would come back unlocked;
- ``DISTINCT``, ``GROUP BY``, ``HAVING``, ``WINDOW``, ``UNION`` /
  ``INTERSECT`` / ``EXCEPT``: PostgreSQL cannot lock those rows (it would
  refuse the statement itself; refusing it here says so earlier);
- a locking clause already present (``FOR UPDATE``, ``FOR NO KEY UPDATE``,
  ``FOR SHARE``, ``FOR KEY SHARE``, ``FOR READ ONLY``) at the level of the
  query or of a subquery in ``FROM`` (``FOR`` inside an expression's
  parentheses, as in ``substring(s from 1 for 3)``, is not one);
- ``SELECT ... INTO``, several statements, unterminated literals or
  comments, unbalanced parentheses.

Left to PostgreSQL, which refuses them before returning any row:
aggregates, window functions and set-returning functions in the select
list, a lock on the nullable side of an outer join. Beyond the reach of a
check of the text: a *view* is expanded by PostgreSQL and locked as its own
query would be (a view over a CTE or a function yields unlocked rows), and
values read by subqueries outside ``FROM`` (in the select list or ``WHERE``)
are not locked.

The lexer follows PostgreSQL's (``scan.l``) for what matters here: standard
strings (``'...'``, ``''`` repeats a quote, no backslash escapes with
``standard_conforming_strings = on``, the default since 9.1; a server that
reports it off gets the query checked again as it reads it) and their
``N``/``B``/``X``/``U&`` forms, escape strings (``E'...'``, backslash
escapes), each continued by another quote after whitespace holding a newline
(an ``E'...'`` continues as an escape string), dollar quotes, quoted
identifiers (``""`` repeats a quote), ``--`` comments to the end of the line
(``\\n`` or ``\\r``) and nested ``/* */`` comments.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["check_query"]

_IDENT_START = r"A-Za-z_\u0080-\U0010ffff"
_WORD = re.compile(rf"[{_IDENT_START}][{_IDENT_START}0-9$]*")
_DOLLAR_QUOTE = re.compile(rf"\$(?:[{_IDENT_START}][{_IDENT_START}0-9]*)?\$")
_PARAM = re.compile(r"\$[0-9]+")
# PostgreSQL's whitespace; any other character >= 0x80 can be part of a name.
_SPACE = frozenset(" \t\n\r\f\v")
_LINE_END = re.compile(r"[\n\r]")
_DIGITS = frozenset("0123456789")
_NUMBER = re.compile(r"[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?|[0-9]+\.")
# A string continues after its closing quote with whitespace that holds a
# newline (comments allowed) and another quote: scan.l's {quotecontinue}.
_CONTINUATION = re.compile(r"(?:[ \t\f\v]|--[^\n\r]*)*[\n\r](?:[ \t\n\r\f\v]+|--[^\n\r]*[\n\r])*'")
# Deeper than this, the check gives up (clearly) rather than recurse on.
_MAX_NESTING = 64


class _Token:
    __slots__ = ("depth", "kind", "start", "text")

    def __init__(self, kind: str, text: str, start: int, depth: int) -> None:
        # "word" (lower-cased), "ident" (a quoted identifier), "(", ")", ",",
        # ";", "." or "other" (literals, numbers, parameters, operators).
        self.kind = kind
        self.text = text
        self.start = start
        # The nesting of ( and [ around the token; a bracket itself has the
        # depth of what surrounds it.
        self.depth = depth

    def __repr__(self) -> str:
        return f"<{self.kind} {self.text!r} @{self.start} depth={self.depth}>"


def _unclosed(what: str, at: int) -> ValueError:
    return ValueError(f"query: unterminated {what} starting at offset {at}")


def _end_of_quoted(query: str, start: int, quote: str, *, backslash: bool) -> int:
    """The index just past the quote closing the literal whose opening quote
    is at ``start`` (a doubled quote stands for one; with ``backslash``, a
    backslash escapes the next character)."""
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


def _end_of_string(query: str, start: int, *, backslash: bool) -> int:
    """The index just past a string literal and its continuations (each in
    the same mode: an escape string continues as one)."""
    end = _end_of_quoted(query, start, "'", backslash=backslash)
    while (more := _CONTINUATION.match(query, end)) is not None:
        end = _end_of_quoted(query, more.end() - 1, "'", backslash=backslash)
    return end


def tokens(query: str, *, standard_conforming: bool = True) -> list[_Token]:
    """The significant tokens of ``query``: comments and whitespace skipped,
    literals reduced to one "other" token. ValueError for an unterminated
    literal or comment, or unbalanced brackets. ``standard_conforming=False``
    reads ``'...'`` as a server with ``standard_conforming_strings = off``
    does: with backslash escapes."""
    escapes = not standard_conforming
    out: list[_Token] = []
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
            end = _end_of_string(query, i, backslash=escapes)
            out.append(_Token("other", "'", i, depth))
            i = end
        elif ch == '"':
            end = _end_of_quoted(query, i, '"', backslash=False)
            out.append(_Token("ident", query[i + 1 : end - 1].replace('""', '"'), i, depth))
            i = end
        elif ch == "$":
            quote = _DOLLAR_QUOTE.match(query, i)
            if quote is not None:
                tag = quote.group()
                end = query.find(tag, quote.end())
                if end < 0:
                    raise _unclosed("dollar-quoted string", i)
                out.append(_Token("other", "$", i, depth))
                i = end + len(tag)
            else:
                param = _PARAM.match(query, i)
                out.append(_Token("other", "$", i, depth))
                i = param.end() if param is not None else i + 1
        elif ch in _DIGITS or (ch == "." and i + 1 < n and query[i + 1] in _DIGITS):
            match = _NUMBER.match(query, i)
            out.append(_Token("other", "0", i, depth))
            i = match.end() if match is not None else i + 1
        elif (word := _WORD.match(query, i)) is not None:
            text = word.group()
            if text in ("e", "E") and word.end() < n and query[word.end()] == "'":
                end = _end_of_string(query, word.end(), backslash=True)
                out.append(_Token("other", "'", i, depth))
                i = end
            else:
                # PostgreSQL folds ASCII letters only; a word with any other
                # character is never a keyword.
                out.append(_Token("word", text.lower() if text.isascii() else text, i, depth))
                i = word.end()
        elif ch in "([":
            out.append(_Token("(", ch, i, depth))
            depth += 1
            i += 1
        elif ch in ")]":
            if depth == 0:
                raise ValueError(f"query: unbalanced parentheses at offset {i}")
            depth -= 1
            out.append(_Token(")", ch, i, depth))
            i += 1
        elif ch in ",;.":
            out.append(_Token(ch, ch, i, depth))
            i += 1
        else:
            out.append(_Token("other", ch, i, depth))
            i += 1
    if depth:
        raise ValueError("query: unbalanced parentheses")
    return out


# -- the shape of the SELECT ---------------------------------------------------

# Words that end the FROM clause (at the query's own level).
_AFTER_FROM = frozenset(
    {
        "where",
        "group",
        "having",
        "window",
        "order",
        "limit",
        "offset",
        "fetch",
        "for",
        "union",
        "intersect",
        "except",
        "into",
    }
)
# Reserved and type/function-name keywords that cannot be a table alias.
_NOT_ALIAS = _AFTER_FROM | {
    "as",
    "on",
    "using",
    "join",
    "natural",
    "cross",
    "inner",
    "left",
    "right",
    "full",
    "outer",
    "lateral",
    "only",
    "tablesample",
    "select",
    "from",
    "with",
}
_LOCKING_CLAUSES = (
    ("update",),
    ("no", "key", "update"),
    ("share",),
    ("key", "share"),
    ("read", "only"),
)


def _refuse(why: str) -> ValueError:
    return ValueError(f"query: {why}")


def _cannot_read(tok: _Token | None) -> ValueError:
    where = "at its end" if tok is None else f"at offset {tok.start}"
    return _refuse(
        f"aiopglock could not read the FROM clause {where}; rows() takes "
        "'SELECT ... FROM <tables, joins, subqueries in FROM> [WHERE ...] [ORDER BY ...] "
        "[LIMIT ...]', so that every row it returns is locked"
    )


_WITH = (
    "WITH is not accepted: PostgreSQL's locking clause does not lock rows read through a "
    "common table expression (MATERIALIZED or not), and a data-modifying WITH would run "
    "and lock nothing; name the table in FROM instead (a subquery in FROM is locked: "
    "SELECT ... FROM (SELECT ...) AS s)"
)
_CANNOT_LOCK = (
    "PostgreSQL cannot lock the rows of a query with {what}: its rows are not table "
    "rows; lock the rows with a plain SELECT and compute on lock.connection inside the block"
)


class _Parser:
    """Checks the token list of one statement (its trailing ``;`` removed)."""

    __slots__ = ("closing", "toks")

    def __init__(self, toks: Sequence[_Token]) -> None:
        self.toks = toks
        # closing[i]: for "(" at i, the index of its ")".
        self.closing: dict[int, int] = {}
        stack: list[int] = []
        for i, tok in enumerate(toks):
            if tok.kind == "(":
                stack.append(i)
            elif tok.kind == ")":
                self.closing[stack.pop()] = i

    def word(self, i: int, *texts: str, end: int | None = None) -> bool:
        """Whether token ``i`` (before ``end``) is an unquoted word among ``texts``."""
        limit = len(self.toks) if end is None else end
        return 0 <= i < limit and self.toks[i].kind == "word" and self.toks[i].text in texts

    def kind(self, i: int, kind: str, end: int) -> bool:
        return 0 <= i < end and self.toks[i].kind == kind

    def keyword(self, j: int, depth: int) -> str | None:
        """Token ``j`` as a keyword of the query at ``depth``: None when it is
        deeper, not a word, or a label (after ``.`` or ``AS``, where
        PostgreSQL takes any word as a name)."""
        tok = self.toks[j]
        if tok.depth != depth or tok.kind != "word":
            return None
        if j > 0:
            prev = self.toks[j - 1]
            if prev.kind == "." or (prev.kind == "word" and prev.text == "as"):
                return None
        return tok.text

    def select(self, a: int, b: int, nesting: int) -> None:
        """``toks[a:b]`` is one SELECT (``toks[a]`` is its word SELECT)."""
        if nesting > _MAX_NESTING:
            raise _refuse("nested too deeply for aiopglock to check")
        toks = self.toks
        depth = toks[a].depth
        if self.word(a + 1, "distinct", end=b):
            raise _refuse(_CANNOT_LOCK.format(what="DISTINCT"))
        from_at: int | None = None
        from_end = b
        for j in range(a + 1, b):
            word = self.keyword(j, depth)
            if word is None:
                continue
            if word in ("union", "intersect", "except"):
                raise _refuse(_CANNOT_LOCK.format(what=word.upper()))
            if word == "group" and self.word(j + 1, "by", end=b):
                raise _refuse(_CANNOT_LOCK.format(what="GROUP BY"))
            if word in ("having", "window"):
                raise _refuse(_CANNOT_LOCK.format(what=word.upper()))
            if word == "into":
                raise _refuse("SELECT ... INTO creates a table; expected a plain SELECT")
            if word == "for" and self._locking_clause(j + 1, b):
                raise _refuse(
                    "it already has a locking clause (FOR UPDATE/SHARE/...); leave it out: "
                    "aiopglock appends it from strength=, of=, skip_locked= and timeout="
                )
            if word == "select":
                raise _cannot_read(toks[j])
            if word == "from" and from_at is None and not self._distinct_from(j):
                from_at = j
            elif word in _AFTER_FROM and from_at is not None and from_end == b:
                from_end = j
        if from_at is None:
            raise _refuse(
                "a SELECT without FROM returns rows no lock covers; rows() locks the rows "
                "of the tables a SELECT reads in FROM"
            )
        self.from_list(from_at + 1, from_end, depth, nesting)

    def _distinct_from(self, j: int) -> bool:
        """Whether the FROM at ``j`` ends ``IS [NOT] DISTINCT FROM`` (an
        operator, not the FROM clause)."""
        return self.word(j - 1, "distinct") and self.word(j - 2, "is", "not")

    def _locking_clause(self, i: int, end: int) -> bool:
        for words in _LOCKING_CLAUSES:
            if all(self.word(i + k, w, end=end) for k, w in enumerate(words)):
                return True
        return False

    def from_list(self, i: int, end: int, depth: int, nesting: int) -> None:
        """``toks[i:end]`` is a FROM list at ``depth``."""
        while True:
            i = self.item(i, end, nesting)
            while self._join_start(i, end, depth):
                natural_or_cross = self.word(i, "natural", "cross", end=end)
                while i < end and not self.word(i, "join", end=end):
                    i += 1
                i = self.item(i + 1, end, nesting)
                if natural_or_cross:
                    continue
                if self.word(i, "on", end=end):
                    i += 1
                    while i < end and not (
                        self.toks[i].depth == depth
                        and (self.toks[i].kind == "," or self._join_start(i, end, depth))
                    ):
                        i += 1
                elif self.word(i, "using", end=end) and self.kind(i + 1, "(", end):
                    i = self.closing[i + 1] + 1
                    if self.word(i, "as", end=end):
                        i = self.alias(i, end)
                else:
                    raise _cannot_read(self.toks[i] if i < end else None)
            if i >= end:
                return
            if self.toks[i].kind != ",":
                raise _cannot_read(self.toks[i])
            i += 1

    def _join_start(self, i: int, end: int, depth: int) -> bool:
        if i >= end or self.toks[i].depth != depth:
            return False
        if self.word(i, "join", "natural", end=end):
            return True
        if self.word(i, "cross", "inner", end=end):
            return self.word(i + 1, "join", end=end)
        if self.word(i, "left", "right", "full", end=end):
            return self.word(i + 1, "join", "outer", end=end)
        return False

    def item(self, i: int, end: int, nesting: int) -> int:
        """One from item starting at ``toks[i]``; the index just past it."""
        toks = self.toks
        if i >= end:
            raise _cannot_read(None)
        if self.word(i, "lateral", end=end):
            i += 1
            if i >= end:
                raise _cannot_read(None)
        tok = toks[i]
        if tok.kind == "(" and tok.text == "(":
            close = self.closing[i]
            if close == i + 1:
                raise _cannot_read(tok)
            first = toks[i + 1]
            if first.kind == "word" and first.text == "select":
                self.select(i + 1, close, nesting + 1)
            elif first.kind == "word" and first.text == "with":
                raise _refuse(_WITH)
            elif first.kind == "word" and first.text in ("values", "table"):
                raise _refuse(
                    f"{first.text.upper()} in FROM: rows() takes SELECT ... FROM tables, "
                    "so that every row it returns is locked"
                )
            else:  # a parenthesised join
                if nesting + 1 > _MAX_NESTING:
                    raise _refuse("nested too deeply for aiopglock to check")
                self.from_list(i + 1, close, first.depth, nesting + 1)
            return self.alias(close + 1, end)
        if self.word(i, "only", end=end):
            i += 1
            if self.kind(i, "(", end):
                close = self.closing[i]
                self.name(i + 1, close)
                return self.alias(close + 1, end)
        if self.word(i, "rows", end=end) and self.word(i + 1, "from", end=end):
            raise _refuse(
                "ROWS FROM (...) in FROM: the rows of a function come back unlocked; "
                "rows() locks the rows of tables"
            )
        start = i
        i = self.name(i, end)
        bare = toks[start].kind == "word" and i == start + 1
        if self.kind(i, "(", end) or (
            bare
            and (
                toks[start].text in _VALUE_FUNCTIONS
                or (
                    toks[start].text == "collation"
                    and i < len(toks)
                    and toks[i].kind == "word"
                    and toks[i].text == "for"
                )
            )
        ):
            raise _refuse(
                f"a function in FROM (at offset {toks[start].start}): its rows come back "
                "unlocked, PostgreSQL's locking clause locks rows of tables only; filter the "
                "table instead (e.g. WHERE id = ANY($1::int[]))"
            )
        if i < end and toks[i].kind == "other" and toks[i].text == "*":
            i += 1
        i = self.alias(i, end)
        if self.word(i, "tablesample", end=end):
            i = self.name(i + 1, end)
            if not self.kind(i, "(", end):
                raise _cannot_read(toks[i] if i < end else None)
            i = self.closing[i] + 1
            if self.word(i, "repeatable", end=end):
                if not self.kind(i + 1, "(", end):
                    raise _cannot_read(toks[i])
                i = self.closing[i + 1] + 1
        return i

    def name(self, i: int, end: int) -> int:
        """A possibly qualified name at ``toks[i]``; the index just past it."""
        while True:
            if i >= end or not (
                self.toks[i].kind == "ident"
                or (self.toks[i].kind == "word" and self.toks[i].text not in _NOT_ALIAS)
            ):
                raise _cannot_read(self.toks[i] if i < end else None)
            i += 1
            if not self.kind(i, ".", end):
                return i
            i += 1

    def alias(self, i: int, end: int) -> int:
        """An optional ``[AS] alias [(columns)]`` at ``toks[i]``."""
        explicit = self.word(i, "as", end=end)
        if explicit:
            i += 1
        if i < end and (
            self.toks[i].kind == "ident"
            or (self.toks[i].kind == "word" and self.toks[i].text not in _NOT_ALIAS)
        ):
            i += 1
            if self.kind(i, "(", end):
                i = self.closing[i] + 1
        elif explicit:
            raise _cannot_read(self.toks[i] if i < end else None)
        return i


# SQL's value functions written without parentheses (``current_date``,
# ``current_user``...), and ``collation for (...)``: in FROM they are functions,
# not tables, and their rows come back unlocked. Quoted, they are names again.
_VALUE_FUNCTIONS = frozenset(
    {
        "current_catalog",
        "current_date",
        "current_role",
        "current_schema",
        "current_time",
        "current_timestamp",
        "current_user",
        "localtime",
        "localtimestamp",
        "session_user",
        "system_user",
        "user",
    }
)


def check_query(query: object, *, standard_conforming: bool = True) -> str:
    """Validate ``query`` for ``aiopglock.rows`` (see the module docstring);
    return it without its trailing ``;``, ready for a locking clause on a
    line of its own. TypeError for a non-str, ValueError saying why for a
    query whose rows would not all be locked. ``standard_conforming=False``:
    as read by a server with ``standard_conforming_strings = off``.

    Example::

        check_query("SELECT id FROM jobs WHERE NOT done ORDER BY id LIMIT 5")
        check_query("WITH j AS (SELECT id FROM jobs) SELECT id FROM j")  # ValueError
    """
    if not isinstance(query, str):
        raise TypeError(f"query: expected a SELECT statement as str, got {type(query).__name__}")
    toks = tokens(query, standard_conforming=standard_conforming)
    if not toks:
        raise _refuse("empty; expected one SELECT statement")
    semicolons = [t for t in toks if t.kind == ";"]
    if semicolons:
        if len(semicolons) > 1 or toks[-1] is not semicolons[0]:
            raise _refuse("several statements; expected one SELECT (one trailing ';' is allowed)")
        query = query[: semicolons[0].start]
        toks.pop()
        if not toks:
            raise _refuse("empty; expected one SELECT statement")
    first = toks[0]
    if first.kind == "word" and first.text == "with":
        raise _refuse(_WITH)
    if first.kind != "word" or first.text != "select":
        raise _refuse(
            "expected one SELECT statement (not a parenthesised query, VALUES or TABLE); "
            "aiopglock appends the locking clause to it"
        )
    _Parser(toks).select(0, len(toks), 0)
    return query
