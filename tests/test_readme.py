"""The README: short, its quick start is what CI runs, its links lead somewhere.

Its Python blocks run against the real server with the docs' (tests/test_docs.py).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def test_the_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < 250


def test_readme_links_lead_to_files() -> None:
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [target for target in targets if "://" not in target]
    assert len(local) >= 10
    for target in local:
        assert (ROOT / target).exists(), f"README links to {target}, which does not exist"
    # Every page of the manual is reachable from the README, or from docs/index.md.
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    linked = {Path(target).name for target in local} | set(re.findall(r"\]\((\w+\.md)", index))
    pages = {page.name for page in (ROOT / "docs").glob("*.md")}
    assert pages - {"index.md"} <= linked


def test_readme_quick_start_matches_ci() -> None:
    text = README.read_text(encoding="utf-8")
    quick_start = text.split("## Quick start", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    commands = [line for line in quick_start.strip().splitlines() if line.strip()]
    assert len(commands) == 2
    assert "python -m aiopglock demo" in commands[0]
    test_command = commands[1].strip()
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    # .ci/run runs the README's test command (with PY=.venv/bin/python).
    assert test_command == ".venv/bin/python -m pytest"
    assert 'PY="$VENV/bin/python"' in ci and "VENV=.venv" in ci
    assert '"$PY" -m pytest' in ci
