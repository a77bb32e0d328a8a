"""What the command line prints: server text made safe to show, and failures.

Everything that comes from the server (queries, application, user, database
and table names, error messages) is shown as plain text: never read as rich
markup, and with control characters (escape sequences, carriage returns,
bidirectional overrides) shown as Python escapes (``\\x1b``), so that nobody
who can name a session or send a query can hide, spoof or restyle the output.
"""

from __future__ import annotations

import re
from typing import Any

import click
from rich.console import Console
from rich.text import Text

__all__ = ["PROG", "console", "fail", "one_line", "plain", "visible"]

PROG = "aiopglock"


def one_line(text: str) -> str:
    return " ".join(str(text).split())


# What a terminal would act on rather than show: C0 and C1 controls, DEL, and
# the bidirectional marks, embeddings, overrides and isolates, and the Unicode
# line and paragraph separators.
_CONTROLS = re.compile(
    r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029]"
)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: str, keep: str = "") -> str:
    """``text`` with every control character (except those in ``keep``) shown
    as a Python escape: ``"\\x1b[31m"`` is printed as those eight characters."""
    return _CONTROLS.sub(lambda m: m.group() if m.group() in keep else _escape(m), text)


def plain(text: str | None, **options: Any) -> Text:
    """Text from the server, as a rich ``Text``: no markup, no emoji codes, and
    no control characters."""
    return Text(visible(text or ""), **options)


def fail(message: str) -> None:
    """``message`` as one line on stderr, after the program's name."""
    click.echo(f"{PROG}: {visible(one_line(message))}", err=True)


def console() -> Console:
    # Width: the terminal's, else $COLUMNS, else 80 (rich's rules).
    return Console(highlight=False, soft_wrap=False)
