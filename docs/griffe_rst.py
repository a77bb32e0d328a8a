"""A griffe extension for the API reference: aiopglock's docstrings are written
in reStructuredText habits, which the site renders as Markdown. Only the site
reads this; the docstrings stay as they are (``help()`` shows them verbatim).

- ``:func:`aiopglock.advisory_key``` and the other roles become code, linked to
  the reference entry when they name a public ``aiopglock.X``;
- a paragraph ending in ``::`` (``Example::``) ends in ``:``, and the indented
  block after it becomes a fenced Python block.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:func|class|meth|attr|exc|data|obj|mod):`~?([^`]+)`")


def _role(match: re.Match[str]) -> str:
    target = match.group(1)
    if target.startswith("aiopglock.") and target.count(".") == 1:
        return f"[`{target}`][{target}]"
    return f"`{target}`"


def _literal_blocks(text: str) -> str:
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.rstrip().endswith("::"):
            out.append(line)
            i += 1
            continue
        head = line.rstrip()[:-2].rstrip()
        if head:
            out.append(head + ":")
        i += 1
        block: list[str] = []
        while i < len(lines) and (not lines[i].strip() or lines[i].startswith(" ")):
            block.append(lines[i])
            i += 1
        while block and not block[-1].strip():
            block.pop()
        body = [b for b in block if b.strip()]
        indent = min((len(b) - len(b.lstrip()) for b in body), default=0)
        out.extend(["", "```python"])
        out.extend(b[indent:] if b.strip() else "" for b in block)
        out.extend(["```", ""])
    return "\n".join(out)


class RstToMarkdown(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            text = _ROLE.sub(_role, obj.docstring.value)
            obj.docstring.value = _literal_blocks(text)
