"""
The PostgreSQL behind the benchmark's C{pgsql} server: started from Debian's
binaries (C{/usr/lib/postgresql/N/bin}) in the work directory, reached over a
Unix socket only, and filled with the same messages as the Maildirs.

initdb and postgres refuse to run as root: as root they run as the
C{postgres} user (C{runuser}), in directories it owns; otherwise as the
current user. The server is tuned as a throw-away one (no fsync, no
synchronous commit): the benchmark measures popserv's queries, not the disk.

Seeding goes through popserv's store contract (C{popserv.build.makeStore},
C{deliverMessage} with the Maildir's UIDL and delivery time), the path every
delivery and C{popserv migrate} take, except for the 100k maildrop, which is
loaded with C{COPY} (two streams: message rows, then body chunks in the
store's chunk size, in transfer form as deliveries store them, made by the
same encoder) in a fraction of the time; the rows then checked by the
benchmark (STAT, UIDL, LIST, RETR digests) are the proof that both agree.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

from seed import Maildrop, uniquePart

__all__ = ["PostgreSQL", "findBinaries", "PgSeeder"]


def findBinaries() -> str | None:
    """The newest C{/usr/lib/postgresql/N/bin} holding initdb and postgres, if any."""
    candidates = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if not candidates:
        found = shutil.which("initdb")
        return os.path.dirname(found) if found else None
    return os.path.dirname(max(candidates, key=lambda p: int(p.split("/")[-3].split(".")[0])))


def _pinned(command: list[str]) -> list[str]:
    taskset = shutil.which("taskset")
    return [taskset, "-c", "0", *command] if taskset else command


class PostgreSQL:
    """
    One PostgreSQL in C{WORKDIR/pg}, pinned to core 0 with the server under
    test (the server side of the machine); its CPU time is that of all its
    processes, with the backends that ended (reaped by the postmaster).
    """

    def __init__(self, workdir: Path) -> None:
        self.bindir = findBinaries()
        if self.bindir is None:
            raise RuntimeError("PostgreSQL is not installed (Debian package postgresql)")
        self.root = workdir / "pg"
        self.data = self.root / "data"
        self.socketDir = self.root / "run"
        self.logFile = workdir / "postgres.log"
        self.asRoot = os.geteuid() == 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.uri = f"postgresql:///popserv?host={quote(str(self.socketDir), safe='/')}" + (
            "&user=postgres" if self.asRoot else ""
        )

    def _command(self, program: str, *args: str) -> list[str]:
        prefix = ["runuser", "-u", "postgres", "--"] if self.asRoot else []
        return [*prefix, os.path.join(self.bindir or "", program), *args]

    def initialize(self) -> None:
        """A new cluster (whatever was there is removed), started, with a database popserv."""
        if self.root.exists():
            shutil.rmtree(self.root)
        self.socketDir.mkdir(parents=True)
        if self.asRoot:
            import pwd

            entry = pwd.getpwnam("postgres")
            for path in (self.root, self.socketDir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        user = ["-U", "postgres"] if self.asRoot else []
        subprocess.run(
            self._command("initdb", "-D", str(self.data), *user, "-A", "trust", "-E", "UTF8",
                          "--no-sync", "--locale=C"),
            check=True,
            capture_output=True,
        )  # fmt: skip
        self.start()
        import psycopg

        with psycopg.connect(self.uri.replace("/popserv?", "/postgres?"), autocommit=True) as c:
            c.execute("CREATE DATABASE popserv")

    def start(self, timeout: float = 60) -> None:
        options = [
            "-c", f"unix_socket_directories={self.socketDir}",
            "-c", "listen_addresses=",
            "-c", "fsync=off",
            "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off",
            "-c", "shared_buffers=256MB",
            "-c", "max_connections=200",
            "-c", "max_wal_size=4GB",
        ]  # fmt: skip
        log = open(self.logFile, "ab")
        self.proc = subprocess.Popen(
            _pinned(self._command("postgres", "-D", str(self.data), *options)),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited at start-up; see {self.logFile}")
            try:
                lines = (self.data / "postmaster.pid").read_text().splitlines()
                if len(lines) >= 8 and lines[7].strip() == "ready":
                    self.pid = int(lines[0])
                    return
            except (FileNotFoundError, ValueError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"postgres did not start; see {self.logFile}")
            time.sleep(0.05)

    def cpuTimes(self) -> tuple[float, float]:
        """User and system CPU of every PostgreSQL process, ended backends included."""
        from servers import treeCPU

        # Not the session's: the postmaster's children each make a session of their own.
        return treeCPU(self.proc.pid) if self.proc is not None else (0.0, 0.0)

    def memory(self) -> int:
        from servers import treeMemory

        return treeMemory(self.proc.pid) if self.proc is not None else 0

    def stop(self) -> None:
        """A fast shutdown, by the postmaster's pid."""
        if self.proc is None:
            return
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None
        self.pid = None


class PgSeeder:
    """
    Copies seeded Maildirs into the store at C{uri}, keeping each message's
    UIDL (the unique part of its name, as the Maildir store gives it) and its
    delivery time (the file's mtime).
    """

    def __init__(self, uri: str) -> None:
        from popserv.build import makeStore
        from popserv.config import Config
        from popserv.threads import synchronously

        config = Config().merged(mail_location=f"pgsql:{uri}")
        self.uri = uri
        self.store = makeStore(config, synchronously, createMissing=True)

    def initSchema(self) -> None:
        import psycopg

        from popserv.backends.pgsql.schema import migrate

        with psycopg.connect(self.uri, autocommit=True) as conn:
            migrate(conn)

    def _files(self, drop: Maildrop) -> list[tuple[str, str, float]]:
        """(path, UIDL, delivery time) of each message, in the seeded order."""
        out = []
        for m in drop.messages:
            path = os.path.join(drop.path, "new", m.name)
            out.append((path, uniquePart(m.name), os.stat(path).st_mtime))
        return out

    def clear(self, user: str) -> None:
        """Remove C{user}'s messages (the maildrop is kept)."""
        self.store.database.run(
            lambda conn: conn.execute(
                "DELETE FROM messages USING maildrops"
                " WHERE messages.maildrop = maildrops.id AND maildrops.name = %s",
                (user,),
            )
        )

    def deliver(self, drop: Maildrop) -> None:
        """C{drop}'s messages through the store contract, one delivery each."""
        self.clear(drop.user)
        store = self.store
        for path, uid, received in self._files(drop):
            writer = _now(store.deliverMessage(drop.user, uid=uid, received=received))
            try:
                with open(path, "rb") as f:
                    while data := f.read(1 << 20):
                        _now(writer.write(data))
                _now(writer.commit())
            except BaseException:
                _now(writer.abort())
                raise

    def copy(self, drops: list[Maildrop]) -> None:
        """
        C{drops}' messages by COPY in one transaction, in the layout deliveries
        write (bulk loading: message rows, then body chunks of the store's size,
        in transfer form).
        """
        import psycopg

        from popserv.backends.pgsql.delivery import CHUNK, maildropId
        from popserv.octets import MessageEncoder

        for drop in drops:
            self.clear(drop.user)
        with psycopg.connect(self.uri) as conn:
            # Committed durably (the bench's server commits asynchronously, for
            # speed), so that VACUUM below marks the pages all-visible, as a
            # production database's autovacuum has long done for mail that
            # waits: the listing's index-only scan then reads no table page.
            conn.execute("SET synchronous_commit = on")
            rows = []
            for drop in drops:
                maildrop = maildropId(conn, drop.user, True)
                for (path, uid, received), m in zip(self._files(drop), drop.messages, strict=True):
                    rows.append((maildrop, uid, m.size, received, path))
            if not rows:
                return
            first = conn.execute(
                "SELECT setval('messages_id_seq', nextval('messages_id_seq') + %s) - %s",
                (len(rows), len(rows)),
            ).fetchone()[0]
            with conn.cursor().copy(
                "COPY messages (id, maildrop, uid, size, received, transfer_form) FROM STDIN"
            ) as copy:
                for i, (maildrop, uid, size, received, _path) in enumerate(rows):
                    copy.write_row((first + i, maildrop, uid, size, received, True))
            with conn.cursor().copy(
                "COPY chunks (message, seq, data) FROM STDIN (FORMAT BINARY)"
            ) as copy:
                copy.set_types(["int8", "int4", "bytea"])
                for i, row in enumerate(rows):
                    encoder, body, seq = MessageEncoder(), bytearray(), 0
                    with open(row[-1], "rb") as f:
                        while True:
                            data = f.read(CHUNK)
                            body += encoder.feed(data) if data else encoder.flush()
                            while len(body) >= CHUNK or (body and not data):
                                copy.write_row((first + i, seq, bytes(body[:CHUNK])))
                                del body[:CHUNK]
                                seq += 1
                            if not data:
                                break
            conn.commit()
            conn.autocommit = True
            conn.execute("VACUUM ANALYZE")
            conn.execute("VACUUM")  # (the first one set the hint bits)

    def warm(self, user: str) -> None:
        """
        Read C{user}'s listing once in the database (untimed), as the
        Maildir is read into the page cache before a first login: the
        node's first login then measures the node and the query, not the
        disk (reading 100k message files for the Maildir rows evicts the
        database's pages).
        """
        self.store.database.run(
            lambda conn: conn.execute(
                "SELECT count(*), sum(m.size), max(m.uid), max(m.id), max(m.received)"
                " FROM messages m JOIN maildrops d ON d.id = m.maildrop WHERE d.name = %s",
                (user,),
            ).fetchone()
        )

    def count(self, user: str) -> int:
        """How many messages C{user}'s maildrop holds."""
        return self.store.database.run(
            lambda conn: conn.execute(
                "SELECT count(*) FROM messages m JOIN maildrops d ON d.id = m.maildrop"
                " WHERE d.name = %s",
                (user,),
            ).fetchone()[0]
        )

    def close(self) -> None:
        self.store.close()


def _now(result: object) -> object:
    """The result of a Deferred that fired already (a store run synchronously)."""
    from twisted.internet.defer import Deferred
    from twisted.python.failure import Failure

    if not isinstance(result, Deferred):
        return result
    out: list[object] = []
    result.addBoth(out.append)
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]
