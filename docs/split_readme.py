"""Split a README of the old shape (every feature a ``##`` section) into the
pages of docs/, as this round's move did: one page per section, headings one
level up (``##`` -> ``#``, ``###`` -> ``##``), code blocks untouched.

For the merges of this round: a branch that edited a section of the old README
re-applies its edit to the page with a three-way merge (then this file can go)::

    git show BASE:README.md > /tmp/old.md     # BASE: the branch's merge base
    git show BRANCH:README.md > /tmp/new.md
    python docs/split_readme.py /tmp/old.md /tmp/old
    python docs/split_readme.py /tmp/new.md /tmp/new
    for page in /tmp/new/*.md; do
        git merge-file docs/$(basename $page) /tmp/old/$(basename $page) $page
    done
"""

from __future__ import annotations

import sys
from pathlib import Path

PAGES = {
    "Advisory locks": "advisory.md",
    "Prioritizer": "prioritizer.md",
    "Watchdog": "watchdog.md",
    "Locker": "locker.md",
    "Lock introspection": "introspection.md",
    "Table locks": "tables.md",
    "Row locks": "rows.md",
    "Timeout scopes": "timeouts.md",
    "Command line": "cli.md",
    "Production checklist": "production.md",
    "Benchmarks": "benchmarks.md",
    "Testing": "testing.md",
}


def split(readme: str) -> dict[str, str]:
    pages: dict[str, list[str]] = {}
    page: str | None = None
    in_code = False
    for line in readme.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if not in_code and line.startswith("## "):
            page = PAGES.get(line[3:])
            if page is not None:
                pages[page] = []
        if page is None:
            continue
        if not in_code and line.startswith("##"):
            line = line[1:]
        pages[page].append(line)
    return {name: "\n".join(lines).rstrip() + "\n" for name, lines in pages.items()}


def main() -> None:
    readme, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    for name, text in split(readme.read_text(encoding="utf-8")).items():
        (out / name).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
