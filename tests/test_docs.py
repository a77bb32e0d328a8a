"""Every Python block of the README and of docs/ runs, against the real server.

Three kinds of block, told apart by their text:

- a complete program (it calls ``asyncio.run(``) runs as a script, with the
  server's DSN in ``DATABASE_URL``, and must exit 0 having printed something;
- a fragment (it awaits at the top level, as the README's tour does) runs as a
  script too, with ``pool`` (an ``asyncpg.Pool``), ``dsn``, ``asyncio``,
  ``asyncpg`` and ``aiopglock`` already there, in a schema of its own that is
  dropped afterwards (so it may create tables under plain names);
- anything else (definitions, a fixture) is compiled and executed as is.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import aiopglock
from tests._helpers import PgServer

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)

# Runs one fragment: argv[1] is the fragment's file, argv[2] its origin (page:line).
FRAGMENT_RUNNER = """\
import ast
import asyncio
import os
import sys
import uuid

import asyncpg

import aiopglock


async def run() -> None:
    source = open(sys.argv[1], encoding="utf-8").read()
    code = compile(source, sys.argv[2], "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    dsn = os.environ["DATABASE_URL"]
    schema = f"docs_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(dsn)
    await admin.execute(f'CREATE SCHEMA "{schema}"')
    try:
        settings = {"search_path": schema, "application_name": "aiopglock-docs"}
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4, server_settings=settings)
        namespace = {
            "__name__": "__main__",
            "aiopglock": aiopglock,
            "asyncio": asyncio,
            "asyncpg": asyncpg,
            "dsn": dsn,
            "pool": pool,
        }
        try:
            result = eval(code, namespace)
            if result is not None:
                await result
        finally:
            await pool.close()
    finally:
        await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await admin.close()


asyncio.run(run())
"""


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    code: str

    @property
    def origin(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def kind(self) -> str:
        if "asyncio.run(" in self.code:
            return "program"
        code = compile(self.code, self.origin, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        if code.co_flags & inspect.CO_COROUTINE:
            return "fragment"
        return "snippet"


def blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    return [
        Block(page, text.count("\n", 0, match.start()) + 2, match.group(1))
        for match in FENCE.finditer(text)
    ]


BLOCKS = [block for page in PAGES for block in blocks(page)]
RUNNABLE = [block for block in BLOCKS if block.kind != "snippet"]
SNIPPETS = [block for block in BLOCKS if block.kind == "snippet"]


def test_the_docs_have_programs() -> None:
    assert len(PAGES) >= 15
    programs = [block for block in BLOCKS if block.kind == "program"]
    assert len(programs) >= 15
    readme = [block for block in RUNNABLE if block.page.name == "README.md"]
    assert len(readme) >= 7


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda block: block.origin)
def test_docs_block_runs(block: Block, pg_server: PgServer, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(block.code, encoding="utf-8")
    if block.kind == "program":
        argv = [sys.executable, str(script)]
    else:
        runner = tmp_path / "run_fragment.py"
        runner.write_text(FRAGMENT_RUNNER, encoding="utf-8")
        argv = [sys.executable, str(runner), str(script), block.origin]
    env = {**os.environ, "DATABASE_URL": pg_server.dsn}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{block.origin}:\n{done.stderr}"
    assert done.stdout.strip(), f"{block.origin}: the example printed nothing"


@pytest.mark.parametrize("block", SNIPPETS, ids=lambda block: block.origin)
def test_docs_snippet_runs(block: Block) -> None:
    exec(compile(block.code, block.origin, "exec"), {"__name__": "docs_snippet"})


def test_the_reference_covers_every_public_name() -> None:
    text = (DOCS / "reference.md").read_text(encoding="utf-8")
    documented = re.findall(r"^::: aiopglock\.(\w+)$", text, re.M)
    assert sorted(documented) == sorted(aiopglock.__all__)
    assert len(documented) == len(set(documented))


def test_every_page_is_in_the_site_navigation() -> None:
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    listed = set(re.findall(r"^  - [^:\n]+: (\S+\.md)$", config, re.M))
    assert listed == {str(page.relative_to(DOCS)) for page in PAGES if page.is_relative_to(DOCS)}


def test_mermaid_diagrams_have_no_statement_break() -> None:
    # A ';' ends a mermaid statement, even inside a note or a message: the rest
    # of the line becomes a syntax error and the diagram is not drawn.
    diagrams = [
        match.group(1)
        for page in PAGES
        for match in re.finditer(
            r"^```mermaid\n(.*?)^```", page.read_text(encoding="utf-8"), re.S | re.M
        )
    ]
    assert len(diagrams) >= 3
    for diagram in diagrams:
        assert diagram.startswith("sequenceDiagram\n")
        assert ";" not in diagram, diagram
