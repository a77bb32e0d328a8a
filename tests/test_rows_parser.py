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


# --------------------------------------------------------------------------- FROM clauses

# (kind, SQL, lockable): FROM items added to "FROM jobs AS j"; {g} is the
# tags table, {a} the item's alias. Every lockable item reads tag 105 only.
# The query templates hold JOBS and TAGS (NUL, which no generated text holds).
JOBS, TAGS = "\x00J", "\x00G"
FROM_ITEMS = [
    ("table", ", {g} AS {a}", True),
    ("join", " JOIN {g} AS {a} ON {a}.tid = 105", True),
    ("cross join", " CROSS JOIN {g} AS {a}", True),
    ("subquery", ", (SELECT tid FROM {g} WHERE tid = 105) AS {a}", True),
    ("lateral", ", LATERAL (SELECT tid FROM {g} AS x WHERE x.tid = 100 + j.id) AS {a}", True),
    (
        "parenthesised join",
        " JOIN ({g} AS {a} JOIN {g} AS {a}b USING (tid)) ON {a}.tid = 105",
        True,
    ),
    ("function", ", generate_series(1, 1) AS {a}", False),
    ("lateral function", " CROSS JOIN LATERAL unnest(ARRAY[5]) AS {a}", False),
    ("rows from", ", ROWS FROM (generate_series(1, 1)) AS {a}", False),
    ("values", ", (VALUES (1)) AS {a} (c)", False),
    ("cte", ", (WITH c AS (SELECT tid FROM {g} WHERE tid = 105) SELECT tid FROM c) AS {a}", False),
    ("no from", ", (SELECT 1 AS c) AS {a}", False),
    ("subquery with a function", ", (SELECT * FROM generate_series(1, 1)) AS {a}", False),
]


@st.composite
def from_clauses(draw: st.DrawFn) -> tuple[str, bool, list[str]]:
    """``(query template, accepted?, aliases reading tags)`` for a random
    mix of FROM items, with hostile comments and literals between them."""
    picked = draw(st.lists(st.sampled_from(FROM_ITEMS), max_size=3))
    sql, lockable, tag_aliases = f"SELECT j.id FROM {JOBS} AS j", True, []
    where = ["j.id = 5"]
    for n, (kind, item, ok) in enumerate(picked):
        alias = f"a{n}"
        sql += draw(comments()) + item.format(g=TAGS, a=alias)
        lockable = lockable and ok
        if ok:
            tag_aliases.append(alias)
            if kind in ("table", "cross join"):
                where.append(f"{alias}.tid = 105")
    sql += f" WHERE {' AND '.join(where)} AND {draw(literals())[0]} IS NOT NULL"
    return sql, lockable, tag_aliases


@PURE
@given(clause=from_clauses())
def test_from_items_are_accepted_exactly_when_lockable(
    clause: tuple[str, bool, list[str]],
) -> None:
    template, lockable, _ = clause
    query = template.replace(JOBS, '"jobs"').replace(TAGS, '"tags"')
    if lockable:
        assert check_query(query) == query
    else:
        with pytest.raises(ValueError, match=r"function|ROWS FROM|VALUES|WITH|without FROM"):
            check_query(query)


@pytest.fixture
async def two_tables(tables: Tables, admin: asyncpg.Connection) -> tuple[str, str]:
    jobs, tags = unique_name("pjobs"), unique_name("ptags")
    await tables.create(jobs, columns="id int PRIMARY KEY")
    await tables.create(tags, columns="tid int PRIMARY KEY, job int NOT NULL")
    await admin.execute(f"INSERT INTO {quote(jobs)} SELECT generate_series(1, 9)")
    await admin.execute(f"INSERT INTO {quote(tags)} SELECT 100 + n, n FROM generate_series(1, 9) n")
    return jobs, tags


@SERVER
@given(clause=from_clauses().filter(lambda c: c[1]))
async def test_accepted_from_clauses_lock_what_they_read(
    clause: tuple[str, bool, list[str]],
    pool: asyncpg.Pool,
    connect: Connect,
    two_tables: tuple[str, str],
) -> None:
    """Whatever mix of tables, joins and subqueries the check accepts, the
    server locks what it returns: job 5, and tag 105 when a tag is read."""
    jobs, tags = two_tables
    query = clause[0].replace(JOBS, quote(jobs)).replace(TAGS, quote(tags))
    other = await connect()
    try:
        async with aiopglock.rows(query, db=pool) as lock:
            assert lock and {r["id"] for r in lock} == {5}
            probes = [f"SELECT 1 FROM {quote(jobs)} WHERE id = 5 FOR KEY SHARE NOWAIT"]
            if clause[2]:
                probes.append(f"SELECT 1 FROM {quote(tags)} WHERE tid = 105 FOR KEY SHARE NOWAIT")
            for probe in probes:
                with pytest.raises(asyncpg.LockNotAvailableError):
                    async with other.transaction():
                        await other.execute(probe)
    finally:
        await other.close()
