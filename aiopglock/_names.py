"""Readable lock names on the server.

When a ``str`` key is locked, the statement that takes it starts with a
comment naming it::

    /* aiopglock "orders:42" */ SELECT pg_catalog.pg_advisory_lock(-8526348519375613040)
    /* aiopglock "reports" slot 3 */ SELECT 1 WHERE pg_catalog.pg_try_advisory_lock(...)

so ``pg_stat_activity.query`` shows the name while the session waits (and,
until the session runs its next statement, while it holds), and
:func:`aiopglock.locks` reads it back into ``LockInfo.name``.

Such a statement is sent with the simple query protocol (asyncpg's
``execute()`` without arguments): one round trip, like the parameterised
form, and never prepared, so asyncpg's statement cache is not touched
however many names a service locks. The key travels as an integer literal;
the name as a JSON string in which every ``*`` is escaped (``\\u002a``), so the
comment can neither end early (``*/``) nor open a nested one (``/*``: the
server nests block comments, and a backslash means nothing inside one), and
every character outside printable ASCII is a ``\\uXXXX`` escape (the text is
valid in any server encoding). Names longer than :data:`MAX_NAME`
characters are not sent, nor those whose comment would not fit the
:data:`MAX_COMMENT` bytes ``pg_stat_activity`` keeps: the statement is then
the parameterised one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

from ._keys import AdvisoryKey, advisory_key, slot_key

__all__ = [
    "MAX_COMMENT",
    "MAX_NAME",
    "comment",
    "enabled",
    "names_of",
    "parse",
    "set_enabled",
]

#: The longest name put in a statement (``pg_stat_activity.query`` keeps the
#: first ``track_activity_query_size`` bytes, 1024 by default).
MAX_NAME = 200

#: The longest comment sent: ``pg_stat_activity.query`` keeps the first
#: ``track_activity_query_size - 1`` bytes (1023 by default), and a comment
#: cut short names nothing. (200 characters written as ``\\uXXXX`` escapes
#: would take 1,200.)
MAX_COMMENT = 1023

_enabled = True


def set_enabled(value: bool) -> None:
    """``configure(server_names=...)``."""
    global _enabled
    _enabled = value


def enabled() -> bool:
    return _enabled


def comment(name: str, slot: int | None = None) -> str | None:
    """The leading comment naming ``name`` (a semaphore's ``slot`` too), or
    None when names are off or ``name`` is too long.

    Example::

        >>> comment('a */ b')
        '/* aiopglock "a \\\\u002a/ b" */ '
    """
    if not _enabled or len(name) > MAX_NAME:
        return None
    text = json.dumps(name, ensure_ascii=True).replace("*", "\\u002a")
    if slot is not None:
        made = f"/* aiopglock {text} slot {int(slot)} */ "
    else:
        made = f"/* aiopglock {text} */ "
    return made if len(made) <= MAX_COMMENT else None


_COMMENT = re.compile(r'/\* aiopglock ("(?:[^"\\]|\\.)*")(?: slot (\d+))? \*/ ')


def parse(query: str | None) -> tuple[str, int | None] | None:
    """The name (and semaphore slot) a statement's leading comment carries,
    or None.

    Example::

        >>> parse('/* aiopglock "orders:42" */ SELECT 1')
        ('orders:42', None)
    """
    if not query or not query.startswith("/* aiopglock "):
        return None
    match = _COMMENT.match(query)
    if match is None:
        return None
    try:
        name = json.loads(match.group(1))
    except ValueError:
        return None
    if not isinstance(name, str):
        return None
    slot = match.group(2)
    return name, None if slot is None else int(slot)


def _claim(query: str | None) -> tuple[AdvisoryKey, str] | None:
    """The key the leading comment of ``query`` names, and the name: what
    the name hashes to, not what the comment says (it can be typed by anyone)."""
    named = parse(query)
    if named is None:
        return None
    name, slot = named
    try:
        key: AdvisoryKey = advisory_key(name) if slot is None else slot_key(name, slot)
    except ValueError:  # empty, or not encodable as UTF-8 (a lone surrogate)
        return None
    return key, name


def names_of(
    rows: Iterable[tuple[str | None, AdvisoryKey | None, str | None]],
) -> dict[tuple[str | None, AdvisoryKey], str]:
    """The names of advisory keys, by ``(database, key)``, from lock rows
    given as ``(database, key, the session's query)``: a row names its own
    key when its session's statement names that key. Advisory locks are per
    database, and so are names.

    Example::

        >>> query = '/* aiopglock "orders:42" */ SELECT 1'
        >>> key = advisory_key("orders:42")
        >>> names_of([("db", key, query), ("db", key, "SELECT now()")])[("db", key)]
        'orders:42'
    """
    claims: dict[str, tuple[AdvisoryKey, str] | None] = {}
    names: dict[tuple[str | None, AdvisoryKey], str] = {}
    for database, key, query in rows:
        if key is None or query is None:
            continue
        if query not in claims:
            claims[query] = _claim(query)
        claim = claims[query]
        if claim is not None and claim[0] == key:
            names.setdefault((database, key), claim[1])
    return names
