"""Tables that fit the terminal, and the small formats the commands share
(durations, pid lists, counts)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from rich import box
from rich.table import Table
from rich.text import Text

from ._output import one_line, plain

__all__ = ["NARROW", "cut", "fitted_table", "pid_list", "plural", "seconds"]

NARROW = 60  # below this, each record is shown as a block (like psql's \\x auto)
GAP = 2  # between two columns: one of padding, one of the (blank) rule
# Columns whose cells wrap; every other column is one line, cut with an ellipsis.
WRAPPED = frozenset({"LOCK", "BLOCKED BY", "LOCKS", "DATABASE", "USER"})


def seconds(value: timedelta) -> str:
    total = value.total_seconds()
    if total < 60:
        return f"{total:.1f}s"
    minutes, secs = divmod(int(total), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    return f"{hours // 24}d{hours % 24:02d}h"


def pid_list(numbers: Sequence[int]) -> str:
    return ", ".join(str(pid) for pid in numbers)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def cut(text: str | None) -> Text:
    """One line, cut with an ellipsis where the column is narrower (the widest
    columns give way first when the table must fit the terminal)."""
    return plain(one_line(text or ""), no_wrap=True, overflow="ellipsis")


def _table(caption: str | None = None) -> Table:
    return Table(
        box=box.SIMPLE_HEAD,
        padding=(0, 1, 0, 0),
        pad_edge=False,
        show_edge=False,
        header_style="bold",
        caption=caption,
        caption_justify="left",
    )


def _column_widths(
    natural: dict[str, int], width: int, shrink: Sequence[tuple[str, int]]
) -> dict[str, int]:
    """Each column's width for a table of at most ``width`` columns: the natural
    widths (the widest cell or header) where they fit; else the ``shrink``
    columns give way in order, each down to its narrowest; then the QUERY
    column goes and what it leaves is given back. The other columns keep their
    width (rich squeezes the rest if even they do not fit)."""
    widths = dict(natural)

    def excess() -> int:
        return sum(widths.values()) + GAP * (len(widths) - 1) - width

    for name, narrowest in shrink:
        if excess() > 0 and name in widths:
            widths[name] = max(min(narrowest, natural[name]), widths[name] - excess())
    if excess() > 0 and "QUERY" in widths:
        del widths["QUERY"]
        for name, _ in reversed(shrink):
            if name in widths and excess() < 0:
                widths[name] = min(natural[name], widths[name] - excess())
    return widths


def fitted_table(
    rows: Sequence[dict[str, Text]],
    width: int,
    shrink: Sequence[tuple[str, int]],
    caption: str | None = None,
) -> Table:
    """A table of ``rows`` (column name -> cell, every row the same names) no
    wider than ``width``: one-line cells are cut with an ellipsis, the WRAPPED
    columns wrap."""
    natural = {name: len(name) for name in rows[0]} if rows else {}
    for row in rows:
        for name, cell in row.items():
            natural[name] = max(natural[name], cell.cell_len)
    if "APP" in natural:
        natural["APP"] = min(natural["APP"], 24)
    widths = _column_widths(natural, width, shrink)
    table = _table(caption)
    for name, column_width in widths.items():
        table.add_column(
            name,
            width=column_width,
            justify="right" if name == "PID" else "left",
            no_wrap=name not in WRAPPED,
            overflow="fold" if name in WRAPPED else "ellipsis",
        )
    for row in rows:
        table.add_row(*(row[name] for name in widths))
    return table
