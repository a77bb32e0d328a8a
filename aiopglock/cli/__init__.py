"""The ``aiopglock`` command line (also ``python -m aiopglock``).

The commands themselves (``locks``, ``cancel``, ``terminate``, ``demo``) live
in :mod:`aiopglock.cli._app` and the modules it imports, on ``click`` and
``rich``: the ``cli`` extra (``pip install 'aiopglock[cli]'``). This module
imports neither, so that the console script can say so in one line when they
are missing. This subpackage is the only part of aiopglock that prints.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]

# What the `cli` extra brings (and what rich itself needs).
_EXTRA_MODULES = frozenset({"click", "rich", "markdown_it", "mdurl", "pygments"})


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Exit status: 0 on success; 1 on an error (one line on stderr: a server
    that cannot be reached, bad input the server rejected, nothing matched, a
    confirmation declined); 2 on a usage error; 130 when interrupted (Ctrl-C),
    except ``locks --watch``, which Ctrl-C ends with 0.

    Example::

        $ aiopglock locks --blocked
        $ aiopglock terminate 4242 --yes
        $ python -m aiopglock --dsn postgresql://postgres@localhost/test demo
    """
    try:
        from ._app import run
    except ImportError as exc:
        if (exc.name or "").partition(".")[0] not in _EXTRA_MODULES:
            raise
        print(
            f"aiopglock: the command line needs the 'cli' extra ({exc.name} is not installed): "
            "pip install 'aiopglock[cli]'",
            file=sys.stderr,
        )
        return 1
    return run(argv)
