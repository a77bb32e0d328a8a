"""Property-based tests of the query check of ``aiopglock.rows`` (``_rowquery``).

- literals, quoted identifiers and comments holding ``FOR UPDATE`` (and
  quotes, backslashes, dollar signs, comment marks, newlines) never count as
  a locking clause, and the server reads each literal back exactly as the
  check delimited it;
- a real locking clause at the top level of the query, in any case, spread
  over lines and comments, wherever PostgreSQL takes one, is always found;
- the check never fails on arbitrary text with anything but a ``ValueError``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aiopglock
from aiopglock._rowquery import check_query, tokens
from tests._helpers import Connect
from tests._relations import Tables, quote, unique_name

# No example database on disk (the work tree stays clean); no deadline (the
# server round trips vary).
PURE = settings(database=None, deadline=None, max_examples=300)
SERVER = settings(
    database=None,
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

HOSTILE = [
    "FOR UPDATE",
    "for share",
    "FOR NO KEY UPDATE",
    "For Key Share",
    "FOR UPDATE SKIP LOCKED",
    "'",
    "''",
    "\\",
    "\\'",
    '"',
    '""',
    "$$",
    "$q$",
    "$1",
    "*/",
    "/*",
    "--",
    "\n",
    "\r",
    ";",
    "(",
    ")",
    "E'",
    "WITH j AS (SELECT 1)",
    "FROM generate_series(1, 3)",
    " ",
]

# Text without NUL (PostgreSQL text cannot hold it).
_chars = st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))
content = st.lists(
    st.one_of(st.sampled_from(HOSTILE), st.text(_chars, max_size=4)), max_size=8
).map("".join)


def standard(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def escape(value: str) -> str:
    return "E'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@st.composite
def literals(draw: st.DrawFn) -> tuple[str, str]:
    """``(sql, value)``: a string literal in one of PostgreSQL's spellings."""
    value = draw(content)
    kind = draw(st.sampled_from(["standard", "escape", "continued", "dollar", "prefixed"]))
    if kind == "standard":
        return standard(value), value
    if kind == "escape":
        return escape(value), value
    if kind == "prefixed":
        # In U&'...' the backslash starts a Unicode escape; doubled, it is itself.
        return "U&" + standard(value.replace("\\", "\\\\")), value
    if kind == "continued":
        # Split in two, the second part after whitespace holding a newline
        # (and maybe a comment): read as one literal of the first part's kind.
        cut = draw(st.integers(0, len(value)))
        gap = draw(st.sampled_from(["\n", " \n  ", "\r", " -- c 'x' FOR UPDATE\n", "\n--c\n\t"]))
        if draw(st.booleans()):
            first = escape(value[:cut])
            second = escape(value[cut:])[1:]  # continued without the E
        else:
            first, second = standard(value[:cut]), standard(value[cut:])
        return first + gap + second, value
    tag = draw(st.sampled_from(["", "q", "tag_1", "FOR"]))
    delimiter = f"${tag}$"
    if (value + delimiter).find(delimiter) != len(value):
        value = value.replace("$", "")
    return delimiter + value + delimiter, value


@st.composite
def comments(draw: st.DrawFn) -> str:
    text = draw(content)
    if draw(st.booleans()):
        return "-- " + text.replace("\n", " ").replace("\r", " ") + "\n"
    return "/* " + text.replace("*/", "* /").replace("/*", "/ *") + " */"


@st.composite
def identifiers(draw: st.DrawFn) -> str:
    text = draw(content.filter(lambda s: 0 < len(s.encode()) <= 60))
    return '"' + text.replace('"', '""') + '"'


def _query(table: str, literal: str, alias: str, comment: str) -> str:
    return (
        f"SELECT id, {literal} AS {alias} {comment} FROM {table} {comment}"
        f"WHERE id = 5 {comment} AND {literal} = {literal} ORDER BY id {comment}"
    )


# --------------------------------------------------------------------------- no false positives


@PURE
@given(literal=literals(), alias=identifiers(), comment=comments())
def test_literals_identifiers_comments_never_count(
    literal: tuple[str, str], alias: str, comment: str
) -> None:
    query = _query('"t"', literal[0], alias, comment)
    assert check_query(query) == query


@PURE
@given(inner=content, column=st.sampled_from(["name", "key", "share", "update", '"for"']))
def test_for_inside_parentheses_is_no_locking_clause(inner: str, column: str) -> None:
    """``substring(... for ...)``, ``overlay(... for ...)``: FOR inside an
    expression's parentheses, whatever follows it (a column named ``key``
    or ``share`` too), is no locking clause (10.11)."""
    for query in [
        f"SELECT substring(name from 1 for {column}) FROM t",
        f"SELECT overlay(name placing {standard(inner)} from 1 for {column}) FROM t",
        f"SELECT id FROM t WHERE substring(name for 3) = {escape(inner)} ORDER BY id",
    ]:
        assert check_query(query) == query


@pytest.fixture
async def parser_table(tables: Tables, admin: asyncpg.Connection) -> str:
    name = unique_name("parser")
    await tables.create(name, columns="id int PRIMARY KEY")
    await admin.execute(f"INSERT INTO {quote(name)} SELECT generate_series(1, 9)")
    return name


@SERVER
@given(literal=literals(), alias=identifiers(), comment=comments())
async def test_the_server_reads_each_literal_as_the_check_does(
    literal: tuple[str, str],
    alias: str,
    comment: str,
    pool: asyncpg.Pool,
    connect: Connect,
    parser_table: str,
) -> None:
    """Run through rows() on the server: it returns the literal's value
    exactly (so the check delimited it as PostgreSQL does) and row 5 is
    locked (so the clause appended is the query's own)."""
    sql, value = literal
    other = await connect()
    try:
        query = _query(quote(parser_table), sql, alias, comment)
        async with aiopglock.rows(query, db=pool) as lock:
            assert [tuple(r) for r in lock] == [(5, value)]
            with pytest.raises(asyncpg.LockNotAvailableError):
                async with other.transaction():
                    await other.execute(
                        f"SELECT 1 FROM {quote(parser_table)} WHERE id = 5 FOR KEY SHARE NOWAIT"
                    )
    finally:
        await other.close()


# --------------------------------------------------------------------------- no false negatives

_space = st.sampled_from([" ", "\n", "\t", "  ", " /* FOR x */ ", " -- c\n", "\r\n", "/**/"])


@st.composite
def locking_clauses(draw: st.DrawFn) -> str:
    words = draw(
        st.sampled_from(
            [
                ["FOR", "UPDATE"],
                ["FOR", "NO", "KEY", "UPDATE"],
                ["FOR", "SHARE"],
                ["FOR", "KEY", "SHARE"],
            ]
        )
    )
    words = [draw(st.sampled_from([w, w.lower(), w.capitalize()])) for w in words]
    tail = draw(st.sampled_from(["", " OF t", ' OF "t", u', " NOWAIT", " SKIP LOCKED"]))
    out = ""
    for word in words:
        out += draw(_space) + word
    return out + tail


@PURE
@given(
    clause=locking_clauses(),
    literal=literals(),
    where=st.sampled_from(["end", "before limit", "after limit", "twice"]),
    comment=comments(),
)
def test_a_top_level_locking_clause_is_always_found(
    clause: str, literal: tuple[str, str], where: str, comment: str
) -> None:
    base = f"SELECT id, {literal[0]} AS v FROM t {comment} WHERE v = {literal[0]} ORDER BY id"
    if where == "end":
        query = base + clause
    elif where == "before limit":
        query = base + clause + " LIMIT 3"
    elif where == "after limit":
        query = base + " LIMIT 3 OFFSET 1" + clause
    else:
        query = base + clause + " LIMIT 1" + clause
    with pytest.raises(ValueError, match="already has a locking clause"):
        check_query(query)
    with pytest.raises(ValueError, match="already has a locking clause"):
        check_query(f"SELECT * FROM ({query}) AS s")


# --------------------------------------------------------------------------- robustness


@PURE
@given(
    text=st.one_of(
        st.text(), content, st.lists(st.sampled_from([*HOSTILE, "SELECT", "FROM t"])).map(" ".join)
    )
)
def test_never_crashes(text: str) -> None:
    """Arbitrary text: a str back, or a ValueError; never anything else."""
    try:
        tokens(text)
        result: Any = check_query(text)
    except ValueError:
        return
    assert isinstance(result, str)


@PURE
@given(text=st.text())
def test_never_crashes_after_select_from(text: str) -> None:
    with contextlib.suppress(ValueError):
        check_query("SELECT * FROM " + text)
