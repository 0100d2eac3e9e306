"""pytest plugin: a throwaway PostgreSQL server for the test session, and database fixtures.

Register it with ``pytest_plugins = ["tests.pg"]`` in tests/conftest.py. It provides

- ``postgres_server`` (session): a server started from ``/usr/lib/postgresql/*/bin`` in a temp
  directory, listening on 127.0.0.1 on a free port, stopped at the end of the session. If the
  binaries are missing and we run as root with ``CI=true`` or ``LEDGER_TEST_INSTALL_PG=1``, it
  runs ``apt-get install -y postgresql`` first. If no server can be started the test fails when
  ``CI=true`` and is skipped (with the reason) otherwise.
- ``db_url`` (function, parametrised ``sqlite`` / ``postgresql``): the URL of a fresh, empty
  database for one test.
- ``make_database_url(kind)``: the same as a factory, for tests that need several databases.

Set ``LEDGER_TEST_DATABASES=sqlite`` to run only the SQLite half.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

DATABASE_KINDS = [
    kind for kind in os.environ.get("LEDGER_TEST_DATABASES", "sqlite,postgresql").split(",") if kind
]


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


@dataclass
class PostgresServer:
    """A running PostgreSQL server owned by the test session."""

    bindir: Path
    datadir: Path
    host: str
    port: int
    user: str = "postgres"

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL (psycopg 3) of `database` on this server."""
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{database}"

    def create_database(self, prefix: str = "test") -> str:
        """Create a new empty database and return its URL."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        conn = psycopg.connect(host=self.host, port=self.port, user=self.user, dbname="postgres")
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop a database created by `create_database` (closing its connections)."""
        import psycopg

        name = url.rsplit("/", 1)[1]
        conn = psycopg.connect(host=self.host, port=self.port, user=self.user, dbname="postgres")
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            conn.close()


def _find_bindir() -> Path | None:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[4]))
    for candidate in reversed(candidates):
        if (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    return None


def _install_postgres() -> None:
    allowed = _in_ci() or os.environ.get("LEDGER_TEST_INSTALL_PG") == "1"
    if not allowed or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "install", "-y", "postgresql"], env=env, check=False, timeout=900)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_postgres_user(args: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return args
    runuser = shutil.which("runuser")
    if runuser is None:
        raise RuntimeError("running as root but runuser is missing; cannot start postgres")
    return [runuser, "-u", "postgres", "--", *args]


def _start_server() -> tuple[PostgresServer, Path]:
    bindir = _find_bindir()
    if bindir is None:
        _install_postgres()
        bindir = _find_bindir()
    if bindir is None:
        raise RuntimeError(
            "PostgreSQL binaries not found under /usr/lib/postgresql/*/bin "
            "(install with `apt-get install -y postgresql`, or set LEDGER_TEST_INSTALL_PG=1)"
        )
    root = Path(tempfile.mkdtemp(prefix="ledger-pg-"))
    datadir = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, user="postgres", group="postgres")
    root.chmod(0o700)
    init = subprocess.run(
        _as_postgres_user(
            [str(bindir / "initdb"), "-D", str(datadir), "-A", "trust", "-U", "postgres"]
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if init.returncode != 0:
        raise RuntimeError(f"initdb failed: {init.stderr.strip() or init.stdout.strip()}")
    port = _free_port()
    options = (
        f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={root} "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=100"
    )
    start = subprocess.run(
        _as_postgres_user(
            [
                str(bindir / "pg_ctl"),
                "-D",
                str(datadir),
                "-o",
                options,
                "-l",
                str(root / "server.log"),
                "-w",
                "-t",
                "60",
                "start",
            ]
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if start.returncode != 0:
        log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
        raise RuntimeError(f"pg_ctl start failed: {start.stderr.strip()} {log[-2000:]}")
    server = PostgresServer(bindir=bindir, datadir=datadir, host="127.0.0.1", port=port)
    _wait_ready(server)
    return server, root


def _wait_ready(server: PostgresServer, timeout: float = 30.0) -> None:
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            psycopg.connect(
                host=server.host, port=server.port, user=server.user, dbname="postgres"
            ).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _stop_server(server: PostgresServer, root: Path) -> None:
    subprocess.run(
        _as_postgres_user(
            [str(server.bindir / "pg_ctl"), "-D", str(server.datadir), "-m", "fast", "stop"]
        ),
        capture_output=True,
        timeout=60,
    )
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole test session (fails in CI, skips elsewhere)."""
    try:
        server, root = _start_server()
    except Exception as exc:  # noqa: BLE001 - any failure means "no server"; say why
        message = f"PostgreSQL could not be started: {exc}"
        if _in_ci():
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield server
    finally:
        _stop_server(server, root)


@pytest.fixture
def make_database_url(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[str], str]]:
    """Factory: `make_database_url("sqlite" | "postgresql")` → URL of a fresh empty database."""
    created: list[str] = []
    server: PostgresServer | None = None

    def make(kind: str) -> str:
        nonlocal server
        if kind == "sqlite":
            return f"sqlite:///{tmp_path / f'ledger-{uuid.uuid4().hex[:8]}.db'}"
        if kind == "postgresql":
            if server is None:
                server = request.getfixturevalue("postgres_server")
            url = server.create_database()
            created.append(url)
            return url
        raise ValueError(f"unknown database kind {kind!r}")

    yield make
    if server is not None:
        for url in created:
            server.drop_database(url)


@pytest.fixture(params=DATABASE_KINDS)
def db_url(request: pytest.FixtureRequest, make_database_url: Callable[[str], str]) -> str:
    """URL of a fresh, empty database: once on SQLite and once on PostgreSQL."""
    if request.param == "postgresql":
        request.node.add_marker(pytest.mark.postgres)
    return make_database_url(request.param)
