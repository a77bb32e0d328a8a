"""Every complete program in the README runs against the real server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests._helpers import PgServer

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
PROGRAMS = [block for block in BLOCKS if "asyncio.run(" in block]
SNIPPETS = [block for block in BLOCKS if "asyncio.run(" not in block]


def test_the_readme_has_programs() -> None:
    assert len(PROGRAMS) >= 5


@pytest.mark.parametrize("program", PROGRAMS, ids=lambda p: p.split("async def main")[0][-40:])
def test_readme_program_runs(program: str, pg_server: PgServer, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(program, encoding="utf-8")
    env = {**os.environ, "DATABASE_URL": pg_server.dsn}
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "the example printed nothing"


@pytest.mark.parametrize("snippet", SNIPPETS)
def test_readme_snippet_runs(snippet: str) -> None:
    exec(compile(snippet, "README.md", "exec"), {})


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
