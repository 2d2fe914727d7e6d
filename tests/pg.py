"""
A real PostgreSQL for the tests, from Debian's binaries
(C{/usr/lib/postgresql/*/bin}), started once per test session in a temporary
directory and reached over a Unix socket only (no TCP).

initdb and postgres refuse to run as root, and CI runs as root: then they
run as the C{postgres} user, in directories it owns. Without the binaries the
tests that need them skip, unless C{CI} is set: then they fail.

tests/conftest.py makes its fixtures available to every test: C{postgresql}
(session-scoped: a L{PostgreSQL}, with C{uri}, C{stop()}, C{start()} and
C{newDatabase()}), and C{pgdatabase}, the URI of a fresh empty database for
one test.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from urllib.parse import quote

import pytest

__all__ = ["PostgreSQL", "postgresql", "pgdatabase", "findBinaries"]


def findBinaries() -> str | None:
    """The newest C{/usr/lib/postgresql/N/bin} holding initdb and postgres, if any."""
    candidates = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if not candidates:
        found = shutil.which("initdb")
        return os.path.dirname(found) if found else None

    def version(path: str) -> tuple[int, ...]:
        number = path.split("/")[-3]
        return tuple(int(p) for p in number.split(".") if p.isdigit())

    return os.path.dirname(max(candidates, key=version))


class PostgreSQL:
    """
    One PostgreSQL server in a temporary directory, stopped and started at
    will (for the tests of a database that goes away and comes back).

    @ivar socketDir: where its Unix socket is (the libpq C{host}).
    @ivar uri: the libpq URI of the database C{popserv}.
    """

    def __init__(self, bindir: str) -> None:
        self.bindir = bindir
        self.root = tempfile.mkdtemp(prefix="popserv-pg-")
        self.data = os.path.join(self.root, "data")
        self.socketDir = os.path.join(self.root, "run")
        self.logFile = os.path.join(self.root, "postgres.log")
        os.mkdir(self.socketDir)
        self._asRoot = os.geteuid() == 0
        if self._asRoot:
            import pwd

            entry = pwd.getpwnam("postgres")
            for path in (self.root, self.socketDir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self.pid: int | None = None
        self._names = itertools.count(1)
        self.uri = self.uriFor("popserv")

    def _command(self, program: str, *args: str) -> list[str]:
        prefix = ["runuser", "-u", "postgres", "--"] if self._asRoot else []
        return [*prefix, os.path.join(self.bindir, program), *args]

    def uriFor(self, database: str) -> str:
        return f"postgresql:///{database}?host={quote(self.socketDir, safe='/')}&user=postgres"

    def initialize(self) -> None:
        subprocess.run(
            self._command(
                "initdb",
                "-D",
                self.data,
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--locale=C",
            ),
            check=True,
            capture_output=True,
        )
        self.start()
        self.execute("CREATE DATABASE popserv")

    def start(self, timeout: float = 30) -> None:
        """Start the server and wait until it accepts connections."""
        options = [
            "-c", f"unix_socket_directories={self.socketDir}",
            "-c", "listen_addresses=",
            "-c", "fsync=off",
            "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off",
            "-c", "shared_buffers=16MB",
            "-c", "max_connections=200",
        ]  # fmt: skip
        log = open(self.logFile, "ab")
        # runuser waits for postgres, which it started: the server's own pid
        # is read from postmaster.pid below and is what stop() signals.
        self._launcher = subprocess.Popen(
            self._command("postgres", "-D", self.data, *options),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        pidFile = os.path.join(self.data, "postmaster.pid")
        while True:
            if self._launcher.poll() is not None:
                raise RuntimeError(f"postgres exited:\n{self.log()}")
            try:
                with open(pidFile) as f:
                    lines = f.read().splitlines()
                if len(lines) >= 8 and lines[7].strip() == "ready":
                    self.pid = int(lines[0])
                    return
            except (FileNotFoundError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not start:\n{self.log()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 30) -> None:
        """Stop the server (a fast shutdown: sessions are ended), by its pid."""
        if self.pid is None:
            return
        try:
            os.kill(self.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
        try:
            self._launcher.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGQUIT)
            self._launcher.wait(timeout)
        self.pid = None

    def log(self) -> str:
        try:
            with open(self.logFile, errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def execute(self, sql: str, database: str = "postgres") -> None:
        import psycopg

        with psycopg.connect(self.uriFor(database), autocommit=True) as conn:
            conn.execute(sql)

    def newDatabase(self) -> str:
        """A new empty database; its URI."""
        name = f"t{os.getpid()}_{next(self._names)}"
        self.execute(f"CREATE DATABASE {name}")
        return self.uriFor(name)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgresql() -> Iterator[PostgreSQL]:
    """A running PostgreSQL (see L{PostgreSQL}), once per test session."""
    bindir = findBinaries()
    if bindir is None:
        message = "PostgreSQL is not installed (Debian package postgresql)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    try:
        import psycopg  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("psycopg is not installed")
    server = PostgreSQL(bindir)
    try:
        server.initialize()
        yield server
    finally:
        server.destroy()


@pytest.fixture
def pgdatabase(postgresql: PostgreSQL) -> Iterator[str]:
    """A fresh empty database on the session's server, dropped after the test."""
    uri = postgresql.newDatabase()
    yield uri
    name = uri.split("?")[0].rsplit("/", 1)[1]
    if postgresql.pid is not None:
        try:
            postgresql.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        except Exception:
            pass
