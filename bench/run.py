#!/usr/bin/env python3
"""
popserv's benchmark: the rows of the performance issue, measured for popserv,
for popserv over PostgreSQL (--servers ...,pgsql), for a twisted.mail.pop3
peer over the same Maildirs, for Dovecot when it is installed, and for popserv
as a proxy in front of a popserv backend (--servers ...,proxy). See
bench/README.rst.

    python bench/run.py                  # everything, 3 runs per row, median
    python bench/run.py --quick          # smoke test: small sizes and counts
    python bench/run.py --rows login,dnd --runs 5 --size-hints --keep
    python bench/run.py --servers popserv,pgsql   # the Maildir and PostgreSQL stores
    python bench/run.py --rows login,retr50 --servers popserv,proxy   # direct vs proxied
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import platform
import pstats
import re
import resource
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from time import perf_counter

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import (  # noqa: E402
    EOF,
    GREETING,
    MULTI,
    SINGLE,
    STARTTLS,
    BenchError,
    Engine,
    Park,
    Response,
    Step,
    checkMessage,
    raiseFileLimit,
)
from pgsql import PgSeeder, PostgreSQL  # noqa: E402
from seed import SEED, Maildrop, Message, Seeder, uniquePart  # noqa: E402
from servers import (  # noqa: E402
    REPO,
    Dovecot,
    Popserv,
    ProxiedPopserv,
    Server,
    TwistedPeer,
    chownTree,
    dovecotBinary,
    mailOwner,
    stopAll,
)

MiB = 1024 * 1024
_LOG_ERROR = re.compile(r"Traceback|Error|error|Errno|Too many|Unhandled|failed|CRITICAL")
MARKER = ".popserv-bench"
#: Generator CPU above this share of its core: the figure may be the generator's limit.
SATURATED = 0.90
#: Other processes using more than this share of a core during a row: warn.
NOISY = 0.05


@dataclass(frozen=True)
class Plan:
    """Sizes and counts: the full benchmark, or the --quick smoke test."""

    loginUsers: int = 64
    loginMessages: int = 10
    loginSessions: int = 5000
    loginWarmup: int = 128
    bigSize: int = 50 * MiB
    mediumSize: int = 10 * MiB
    mediumClients: int = 8
    many: int = 100_000
    dndOne: int = 5000
    dndClients: int = 8
    dndEach: int = 2000
    dndCap: float = 10.0
    idleFirst: int = 5000
    idleMax: int = 10_000
    idleMessages: int = 3
    loginClients: tuple[int, ...] = (1, 16, 64)
    loginOneSessions: int = 1000
    tlsSessions: int = 1000
    tlsClients: int = 16
    tlsIdle: int = 2000
    workerSessions: int = 10000


FULL = Plan()
QUICK = Plan(
    loginSessions=600,
    loginWarmup=64,
    bigSize=5 * MiB,
    mediumSize=1 * MiB,
    many=5000,
    dndOne=300,
    dndEach=100,
    dndCap=3.0,
    idleFirst=500,
    idleMax=1000,
    loginOneSessions=200,
    tlsSessions=300,
    tlsIdle=300,
    workerSessions=1000,
)

GROUPS = {
    "login": "1",
    "retr50": "2",
    "retr10x8": "3",
    "100k": "4",
    "dnd": "5",
    "idle": "6",
    "tls": "7",
    "workers": "8",
}


# ---------------------------------------------------------------------------
# Results


@dataclass
class Result:
    samples: list[float] = field(default_factory=list)
    gen: list[float] = field(default_factory=list)  # generator CPU, share of one core
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def value(self) -> float | None:
        return statistics.median(self.samples) if self.samples and not self.error else None

    @property
    def genShare(self) -> float | None:
        return statistics.median(self.gen) if self.gen else None


class _PeakMemory:
    """
    How far a process's resident set rose above where it was at L{start}:
    its peak (C{VmHWM}, reset at start through C{/proc/PID/clear_refs},
    Linux 4.0+) at L{stop} minus its C{VmRSS} at start. None where the
    kernel does not allow the reset (the peak would be the process's
    lifetime's, not the transfer's).
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = 0
        self.growth: int | None = None
        self._reset = False

    def _status(self, field: str) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise ValueError(f"no {field} in /proc/{self.pid}/status")

    def start(self) -> None:
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS to the current RSS
            self.before = self._status("VmRSS")
            self._reset = True
        except (OSError, ValueError):
            self._reset = False

    def stop(self) -> None:
        if self._reset:
            self.growth = max(0, self._status("VmHWM") - self.before)


@dataclass(frozen=True)
class Row:
    key: str
    group: str
    title: str
    unit: str
    higherIsBetter: bool
    target: str
    check: Callable[[float, float | None], bool] | None  # (popserv, ratio) -> met
    #: The PostgreSQL store's target (issue 13) and its check: (pgsql, pgsql/popserv) -> met.
    pgTarget: str = "-"
    pgCheck: Callable[[float, float | None], bool] | None = None
    #: C{check} is given popserv/dovecot rather than popserv/twisted.
    vsDovecot: bool = False


def _rows(plan: Plan) -> list[Row]:
    many = f"{plan.many // 1000}k" if plan.many >= 1000 else str(plan.many)
    big, med = plan.bigSize // MiB, plan.mediumSize // MiB
    rows = [
        Row(
            "login-1",
            "login",
            "1 login session latency (1 client)",
            "ms",
            False,
            "-",
            None,
        ),
        Row(
            "login-16",
            "login",
            "1 login sessions/s (16 clients)",
            "/s",
            True,
            ">= 2x twisted",
            lambda v, r: r is not None and r >= 2,
        ),
        Row(
            "login-cpu-16",
            "login",
            "1 server CPU per login session (16 clients)",
            "ms",
            False,
            "<= 0.14 ms",
            lambda v, r: v <= 0.14,
        ),
        Row(
            "login",
            "login",
            f"1 login sessions/s ({plan.loginUsers} clients)",
            "/s",
            True,
            ">= 2x twisted",
            lambda v, r: r is not None and r >= 2,
        ),
        Row(
            "login-cpu",
            "login",
            f"1 server CPU per login session ({plan.loginUsers} clients)",
            "ms",
            False,
            "<= 0.14 ms",
            lambda v, r: v <= 0.14,
            "<= 1.5x popserv",
            lambda v, r: r is not None and r <= 1.5,
        ),
        Row(
            "login-db-cpu",
            "login",
            "1 PostgreSQL CPU per login session",
            "ms",
            False,
            "-",
            None,
        ),
        Row(
            "retr50",
            "retr50",
            f"2 RETR {big} MiB",
            "MB/s",
            True,
            ">= 600 MB/s",
            lambda v, r: v >= 600,
            ">= 300 MB/s",
            lambda v, r: v >= 300,
        ),
        Row(
            "retr50-rss",
            "retr50",
            f"2 node RSS growth during RETR {big} MiB (worst run)",
            "MiB",
            False,
            "-",
            None,
            "<= 2 MiB",
            lambda v, r: v <= 2,
        ),
        Row(
            "retr10x8",
            "retr10x8",
            f"3 RETR {med} MiB x {plan.mediumClients} concurrent",
            "MB/s",
            True,
            ">= 600 MB/s",
            lambda v, r: v >= 600,
        ),
        Row(
            "100k-second",
            "100k",
            f"4 {many}: second login + STAT",
            "ms",
            False,
            "<= 60 ms",
            lambda v, r: v <= 60,
            "<= 100 ms",
            lambda v, r: v <= 100,
        ),
        Row(
            "100k-first",
            "100k",
            f"4 {many}: first login + STAT (restarted)",
            "ms",
            False,
            "<= 900 ms",
            lambda v, r: v <= 900,
            "<= 100 ms",
            lambda v, r: v <= 100,
        ),
        Row(
            "100k-restart",
            "100k",
            f"4 {many}: login + STAT after restart (server files kept)",
            "ms",
            False,
            "-",
            None,
        ),
        Row(
            "100k-second-hints",
            "100k",
            f"4 {many} ,S=,W= names: second login + STAT",
            "ms",
            False,
            "<= 60 ms",
            lambda v, r: v <= 60,
        ),
        Row(
            "100k-first-hints",
            "100k",
            f"4 {many} ,S=,W= names: first login + STAT",
            "ms",
            False,
            "<= 900 ms",
            lambda v, r: v <= 900,
        ),
        Row(
            "100k-restart-hints",
            "100k",
            f"4 {many} ,S=,W= names: login + STAT after restart",
            "ms",
            False,
            "-",
            None,
        ),
        Row(
            "100k-list",
            "100k",
            f"4 {many}: LIST",
            "ms",
            False,
            "<= 40 ms",
            lambda v, r: v <= 40,
        ),
        Row(
            "100k-uidl",
            "100k",
            f"4 {many}: UIDL",
            "ms",
            False,
            "<= 80 ms",
            lambda v, r: v <= 80,
        ),
        Row(
            "dnd-1",
            "dnd",
            "5 download-and-delete, 1 client",
            "msg/s",
            True,
            ">= 1.3x dovecot",
            lambda v, r: r is not None and r >= 1.3,
            vsDovecot=True,
        ),
        Row(
            "dnd-8",
            "dnd",
            f"5 download-and-delete, {plan.dndClients} clients",
            "msg/s",
            True,
            ">= 1.3x dovecot",
            lambda v, r: r is not None and r >= 1.3,
            vsDovecot=True,
        ),
        Row(
            "idle-mem",
            "idle",
            f"6 memory per idle session ({plan.idleFirst:,} open)",
            "KiB",
            False,
            "-",
            None,
        ),
        Row(
            "idle-max",
            "idle",
            f"6 {plan.idleMax:,} idle sessions open (KiB each)",
            "KiB",
            False,
            "<= 2.0 KiB, works",
            lambda v, r: v <= 2.0,
        ),
        Row(
            "idle-opens",
            "idle",
            f"6 session opens/s while idle sessions pile up (0 to {plan.idleFirst:,})",
            "/s",
            True,
            ">= twisted",
            lambda v, r: r is not None and r >= 1,
        ),
        Row(
            "tls-implicit",
            "tls",
            f"7 TLS logins/s, implicit TLS ({plan.tlsClients} clients)",
            "/s",
            True,
            ">= dovecot",
            lambda v, r: r is not None and r >= 1,
            vsDovecot=True,
        ),
        Row(
            "tls-implicit-cpu",
            "tls",
            "7 server CPU per implicit-TLS login",
            "ms",
            False,
            "-",
            None,
        ),
        Row(
            "tls-implicit-resumed",
            "tls",
            "7 TLS logins/s, implicit TLS, client offers resumption",
            "/s",
            True,
            ">= dovecot",
            lambda v, r: r is not None and r >= 1,
            vsDovecot=True,
        ),
        Row(
            "tls-stls",
            "tls",
            f"7 TLS logins/s, STLS ({plan.tlsClients} clients)",
            "/s",
            True,
            ">= dovecot",
            lambda v, r: r is not None and r >= 1,
            vsDovecot=True,
        ),
        Row(
            "tls-stls-resumed",
            "tls",
            "7 TLS logins/s, STLS, client offers resumption",
            "/s",
            True,
            ">= dovecot",
            lambda v, r: r is not None and r >= 1,
            vsDovecot=True,
        ),
        Row(
            "tls-retr50",
            "tls",
            f"7 RETR {big} MiB over implicit TLS",
            "MB/s",
            True,
            ">= dovecot",
            lambda v, r: r is not None and r >= 1,
            vsDovecot=True,
        ),
        Row(
            "tls-idle-mem",
            "tls",
            f"7 memory per idle TLS session ({plan.tlsIdle:,} open)",
            "KiB",
            False,
            "<= dovecot",
            lambda v, r: r is not None and r <= 1,
            vsDovecot=True,
        ),
        Row(
            "workers-1",
            "workers",
            "8 logins/s, popserv serve --workers 1 (64 clients)",
            "/s",
            True,
            "-",
            None,
        ),
        Row(
            "workers-1-cpu",
            "workers",
            "8 server CPU per login, --workers 1",
            "ms",
            False,
            "-",
            None,
        ),
        Row(
            "workers-2",
            "workers",
            "8 logins/s, popserv serve --workers 2 (64 clients)",
            "/s",
            True,
            "-",
            None,
        ),
        Row(
            "workers-2-cpu",
            "workers",
            "8 server CPU per login, --workers 2",
            "ms",
            False,
            "-",
            None,
        ),
    ]
    return rows


# ---------------------------------------------------------------------------
# Client scripts


def _login(drop: Maildrop) -> Iterator[object]:
    yield GREETING
    yield Step(b"USER %s\r\n" % drop.user.encode())
    yield Step(b"PASS %s\r\n" % drop.password.encode())


def _checkStat(resp: Response, drop: Maildrop) -> None:
    parts = resp.status.split()
    want = [str(len(drop.messages)).encode(), str(drop.total).encode()]
    if parts[1:3] != want:
        raise BenchError(
            f"{drop.user}: STAT said {resp.status!r}, the maildrop has "
            f"{len(drop.messages)} messages, {drop.total} octets"
        )


def _lines(resp: Response, what: str) -> list[bytes]:
    assert resp.body is not None
    lines = bytes(resp.body).split(b"\r\n")
    lines.pop()  # after the final CRLF
    values = []
    for i, line in enumerate(lines, 1):
        number, _, value = line.partition(b" ")
        if number != b"%d" % i:
            raise BenchError(f"{what}: line {i} is {line[:80]!r}")
        values.append(value)
    return values


def _numbering(resp: Response, drop: Maildrop, table: dict[str, Message]) -> list[Message]:
    """Message number - 1 -> seeded message, from a UIDL listing; every message exactly once."""
    found = []
    for uid in _lines(resp, f"{drop.user}: UIDL"):
        message = table.get(uid.decode("ascii", "replace"))
        if message is None:
            raise BenchError(f"{drop.user}: UIDL {uid[:80]!r} is no seeded message")
        found.append(message)
    if len(found) != len(drop.messages) or len({id(m) for m in found}) != len(found):
        raise BenchError(
            f"{drop.user}: UIDL lists {len(found)} messages "
            f"({len({id(m) for m in found})} distinct), the maildrop has {len(drop.messages)}"
        )
    return found


def _checkList(resp: Response, drop: Maildrop, numbering: list[Message]) -> None:
    sizes = _lines(resp, f"{drop.user}: LIST")
    if len(sizes) != len(numbering):
        raise BenchError(f"{drop.user}: LIST has {len(sizes)} lines, UIDL {len(numbering)}")
    for i, (size, message) in enumerate(zip(sizes, numbering, strict=True), 1):
        if size != b"%d" % message.size:
            raise BenchError(
                f"{drop.user}: LIST says message {i} has {size!r} octets; RETR sends "
                f"{message.size}"
            )


def _checkRetr(resp: Response, message: Message, what: str) -> int:
    parts = resp.status.split()
    if len(parts) < 2 or parts[1] != b"%d" % message.size:
        raise BenchError(f"{what}: RETR status {resp.status!r}, the message has {message.size}")
    assert resp.body is not None
    return checkMessage(resp.body, message.size, message.digest, what)


def loginSession(drop: Maildrop) -> Iterator[object]:
    yield from _login(drop)
    _checkStat((yield Step(b"STAT\r\n")), drop)
    yield Step(b"QUIT\r\n")
    yield EOF


def stlsSession(drop: Maildrop) -> Iterator[object]:
    """The login dialogue after STLS (RFC 2595): greeting, STLS, handshake, then as usual."""
    yield GREETING
    yield Step(b"STLS\r\n")
    yield STARTTLS
    yield Step(b"USER %s\r\n" % drop.user.encode())
    yield Step(b"PASS %s\r\n" % drop.password.encode())
    _checkStat((yield Step(b"STAT\r\n")), drop)
    yield Step(b"QUIT\r\n")
    yield EOF


def timedLogin(
    drop: Maildrop, t0: float, table: dict[str, Message] | None, out: dict[str, float]
) -> Iterator[object]:
    """Connect (at t0) .. STAT answered; then, given a UID table, timed LIST and UIDL."""
    yield from _login(drop)
    stat = yield Step(b"STAT\r\n")
    out["login"] = (stat.at - t0) * 1000
    _checkStat(stat, drop)
    if table is not None:
        t = perf_counter()
        listing = yield Step(b"LIST\r\n", MULTI)
        out["list"] = (listing.at - t) * 1000
        t = perf_counter()
        uidl = yield Step(b"UIDL\r\n", MULTI)
        out["uidl"] = (uidl.at - t) * 1000
        _checkList(listing, drop, _numbering(uidl, drop, table))
    yield Step(b"QUIT\r\n")
    yield EOF


def retrSession(
    drop: Maildrop, table: dict[str, Message], out: list[tuple[float, float, int]]
) -> Iterator[object]:
    """Log in, map and LIST; park at "ready"; RETR 1 (timed); park at "done"; verify."""
    yield from _login(drop)
    numbering = _numbering((yield Step(b"UIDL\r\n", MULTI)), drop, table)
    _checkList((yield Step(b"LIST\r\n", MULTI)), drop, numbering)
    yield Park("ready")
    t0 = perf_counter()
    resp = yield Step(b"RETR 1\r\n", numbering[0].size)
    yield Park("done")
    size = _checkRetr(resp, numbering[0], f"{drop.user}: RETR 1")
    out.append((t0, resp.at, size))
    yield Step(b"QUIT\r\n")
    yield EOF


def dndSession(
    drop: Maildrop, table: dict[str, Message], deadline: float, out: list[tuple[int, float]]
) -> Iterator[object]:
    """UIDL, then RETR n + DELE n pipelined for each message, QUIT; stops at the deadline."""
    yield from _login(drop)
    numbering = _numbering((yield Step(b"UIDL\r\n", MULTI)), drop, table)
    done = 0
    for n, message in enumerate(numbering, 1):
        if perf_counter() > deadline:
            break
        retr, _dele = yield Step(b"RETR %d\r\nDELE %d\r\n" % (n, n), message.size, SINGLE)
        _checkRetr(retr, message, f"{drop.user}: RETR {n}")
        done += 1
    yield Step(b"QUIT\r\n")
    yield EOF
    out.append((done, perf_counter()))


def idleSession(drop: Maildrop) -> Iterator[object]:
    yield from _login(drop)
    yield Park("idle")
    yield Step(b"NOOP\r\n")
    yield Step(b"QUIT\r\n")
    yield EOF


def forgetServerFiles(maildir: str) -> None:
    """Remove everything but cur/, new/ and tmp/ from a Maildir (server indexes, locks)."""
    for entry in os.scandir(maildir):
        if entry.name in ("cur", "new", "tmp"):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


def systemBusy() -> float:
    """CPU seconds all processes spent in user and system mode since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    user, nice, system = (int(x) for x in fields[1:4])
    return (user + nice + system) / os.sysconf("SC_CLK_TCK")


def ownCPU() -> float:
    """CPU seconds of this process and of its reaped children (the servers, once stopped)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


def warmPageCache(maildir: str) -> None:
    """
    Read every message file once (untimed), so that a "first login" measures
    the server, not the disk: idle files may have left the page cache (some
    kernels reclaim cold pages proactively).
    """
    buf = bytearray(1 << 20)
    for sub in ("cur", "new"):
        for entry in os.scandir(os.path.join(maildir, sub)):
            fd = os.open(entry.path, os.O_RDONLY)
            try:
                while os.readv(fd, [buf]) == len(buf):
                    pass
            finally:
                os.close(fd)


def genCPU() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ---------------------------------------------------------------------------
# The benchmark


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.plan = QUICK if args.quick else FULL
        self.workdir = Path(args.workdir).resolve()
        self.root = self.workdir / "mail"
        self.passwd = self.workdir / "passwd"
        self.runs = args.runs
        self.results: dict[str, dict[str, Result]] = {}
        self.drops: dict[str, Maildrop] = {}
        self._tables: dict[str, dict[str, Message]] = {}
        self._profiles = 0
        self.seeder: Seeder | None = None
        #: The PostgreSQL of the pgsql server, and what fills it (when measured).
        self.database: PostgreSQL | None = None
        self.pgSeeder: PgSeeder | None = None
        #: (row group, server) -> CPU share of one core used by other processes.
        self.otherLoad: dict[tuple[str, str], float] = {}

    # -- set-up --------------------------------------------------------------

    def prepareWorkdir(self) -> None:
        wd = self.workdir
        if wd.exists() and any(wd.iterdir()) and not (wd / MARKER).exists():
            raise SystemExit(f"{wd} exists and is not a benchmark work directory; not touching it")
        wd.mkdir(parents=True, exist_ok=True)
        (wd / MARKER).write_text("made by bench/run.py; deleted at the end unless --keep\n")

    def removeWorkdir(self) -> None:
        if (self.workdir / MARKER).exists():
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _password(self, user: str) -> str:
        return f"pw-{user}"

    def seedStatic(self, groups: set[str]) -> None:
        """
        Seed the maildrops the chosen rows read. Maildrops seeded by an
        earlier run kept with --keep are reused when the plan is the same.
        """
        if "tls" in groups:
            groups = groups | {"login", "retr50", "idle"}
        if "workers" in groups:
            groups = groups | {"login"}
        units = [g for g in ("login", "retr50", "retr10x8", "100k", "idle") if g in groups]
        if "100k" in groups and self.args.size_hints:
            units.append("100k-hints")
        params = (SEED, asdict(self.plan), 4)
        manifest = self.workdir / "manifest.pickle"
        saved: dict[str, object] = {"params": params, "units": {}}
        if manifest.exists():
            try:
                with open(manifest, "rb") as f:
                    loaded = pickle.load(f)
                if loaded["params"] == params:
                    saved = loaded
            except Exception:
                pass
        done: dict[str, dict[str, Maildrop]] = saved["units"]  # type: ignore[assignment]
        seeded = False
        for unit in units:
            drops = done.get(unit)
            if drops is not None and all(os.path.isdir(d.path) for d in drops.values()):
                print(f"reusing the {unit} maildrops seeded earlier in {self.workdir}")
            else:
                t = perf_counter()
                done[unit] = drops = self._seedUnit(unit, done)
                print(f"seeded {unit} in {perf_counter() - t:.1f}s", flush=True)
                with open(manifest, "wb") as f:
                    pickle.dump(saved, f)
                seeded = True
            self.drops.update(drops)
        self.giveMailToDovecot()
        if seeded:
            # Write the seeded gigabyte out now: the kernel's writeback would
            # otherwise run during the first rows and take CPU from them.
            t = perf_counter()
            os.sync()
            print(f"synced to disk in {perf_counter() - t:.1f}s", flush=True)

    def giveMailToDovecot(self, path: Path | None = None) -> None:
        """Run as root, Dovecot's mail processes are nobody's: they must own the Maildirs."""
        if os.getuid() != 0 or "dovecot" not in self.servers():
            return
        uid, gid = mailOwner()
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o755)
        chownTree(path or self.root, uid, gid)

    def _seedUnit(self, unit: str, done: dict[str, dict[str, Maildrop]]) -> dict[str, Maildrop]:
        p = self.plan
        if self.seeder is None:
            self.seeder = Seeder(str(self.root))
        s = self.seeder
        drops: dict[str, Maildrop] = {}
        if unit == "login":
            for i in range(1, p.loginUsers + 1):
                u = f"login{i:03d}"
                drops[u] = s.seed(u, self._password(u), p.loginMessages)
        elif unit == "retr50":
            drops["big"] = s.seed("big", self._password("big"), 1, p.bigSize)
        elif unit == "retr10x8":
            for i in range(1, p.mediumClients + 1):
                u = f"medium{i}"
                drops[u] = s.seed(u, self._password(u), 1, p.mediumSize)
        elif unit == "100k":
            print(f"seeding a {p.many:,}-message Maildir ...", flush=True)
            drops["many"] = s.seed("many", self._password("many"), p.many, digests=False)
        elif unit == "100k-hints":
            many = done["100k"]["many"]
            drops["many-hints"] = s.linkWithSizeHints(
                many, "many-hints", self._password("many-hints")
            )
        elif unit == "idle":
            print(f"seeding {p.idleMax:,} maildrops for idle sessions ...", flush=True)
            for i in range(1, p.idleMax + 1):
                u = f"idle{i:05d}"
                drops[u] = s.seed(u, self._password(u), p.idleMessages, digests=False)
        return drops

    def dndUsers(self) -> list[tuple[str, int]]:
        p = self.plan
        return [("dnd1", p.dndOne)] + [
            (f"dnd{p.dndClients}-{i}", p.dndEach) for i in range(1, p.dndClients + 1)
        ]

    def seedDnd(self, name: str) -> None:
        """
        (Re)create the download-and-delete maildrops: new files (new inodes)
        every run, and for the pgsql server the same messages in PostgreSQL.
        """
        if self.seeder is None:
            self.seeder = Seeder(str(self.root))
        for user, count in self.dndUsers():
            self.drops[user] = self.seeder.seed(user, self._password(user), count)
            self._tables.pop(user, None)
            self.table(user)  # (made here, untimed, not in the run)
            self.giveMailToDovecot(self.root / user)
        if name == "pgsql":
            self.seedDatabase([u for u, _ in self.dndUsers()])

    def startDatabase(self, groups: set[str]) -> None:
        """
        Start the pgsql server's PostgreSQL (a new cluster in the work
        directory), make its schema and copy the seeded maildrops into it:
        see L{seedDatabase}.
        """
        self.database = PostgreSQL(self.workdir)
        t = perf_counter()
        self.database.initialize()
        self.pgSeeder = PgSeeder(self.database.uri)
        self.pgSeeder.initSchema()
        print(f"PostgreSQL started and its schema made in {perf_counter() - t:.1f}s", flush=True)
        t = perf_counter()
        self.seedDatabase([u for u in self.drops if not u.endswith("-hints")])
        print(f"seeded PostgreSQL in {perf_counter() - t:.1f}s", flush=True)

    def seedDatabase(self, users: list[str]) -> None:
        """
        Copy C{users}' seeded maildrops into PostgreSQL: the login and RETR
        users' through the store's deliveries, the bulky ones (the 100k
        maildrop, the idle and download-and-delete users') by COPY.
        """
        assert self.pgSeeder is not None
        bulk = [self.drops[u] for u in users if u == "many" or u.startswith(("idle", "dnd"))]
        delivered = 0
        for user in users:
            drop = self.drops[user]
            if drop not in bulk:
                self.pgSeeder.deliver(drop)
                delivered += len(drop.messages)
        self.pgSeeder.copy(bulk)
        copied = sum(len(d.messages) for d in bulk)
        print(
            f"  PostgreSQL: {delivered:,} messages delivered through the store, "
            f"{copied:,} copied by COPY",
            flush=True,
        )

    def stopDatabase(self) -> None:
        if self.pgSeeder is not None:
            self.pgSeeder.close()
            self.pgSeeder = None
        if self.database is not None:
            self.database.stop()

    def databaseCPU(self) -> float:
        return sum(self.database.cpuTimes()) if self.database is not None else 0.0

    def writePasswd(self, groups: set[str]) -> None:
        users = set(self.drops)
        if "dnd" in groups:
            users |= {u for u, _ in self.dndUsers()}
        text = "".join(f"{u}:{{PLAIN}}{self._password(u)}\n" for u in sorted(users))
        self.passwd.write_text(text)

    def table(self, user: str) -> dict[str, Message]:
        table = self._tables.get(user)
        if table is None:
            table = self._tables[user] = self.drops[user].byUID()
            self._addCurrentNames(user, table)
        return table

    def _addCurrentNames(self, user: str, table: dict[str, Message]) -> None:
        """
        Map the MD5 of each file's name as it is now: twisted.mail's UIDL.
        A server measured before may have renamed files (Dovecot moves them
        from new/ to cur/ with flags). Run when a server starts, untimed.
        """
        drop = self.drops[user]
        byUnique = {uniquePart(m.name): m for m in drop.messages}
        for sub in ("cur", "new"):
            try:
                names = os.listdir(os.path.join(drop.path, sub))
            except FileNotFoundError:
                continue
            for name in names:
                message = byUnique.get(uniquePart(name))
                if message is not None:
                    table.setdefault(hashlib.md5(name.encode()).hexdigest(), message)

    # -- servers -------------------------------------------------------------

    def servers(self) -> list[str]:
        names = [n for n in self.args.servers.split(",") if n]
        if self.args.baseline_src and "baseline" not in names:
            names.insert(names.index("popserv") + 1 if "popserv" in names else 0, "baseline")
        if "dovecot" in names and dovecotBinary() is None:
            names.remove("dovecot")
        return names

    def makeServer(self, name: str, tag: str, workers: int = 0) -> Server:
        profile = None
        if self.args.profile and name in ("popserv", "pgsql") and not workers:
            self._profiles += 1
            profile = self.workdir / f"profile-{self._profiles:02d}-{name}-{tag}.pstats"
        if name == "popserv":
            return Popserv(
                self.workdir, self.root, self.passwd, Path(self.args.source), profile,
                workers=workers,
            )  # fmt: skip
        if name == "baseline":
            source = Path(self.args.baseline_src).resolve()
            return Popserv(self.workdir, self.root, self.passwd, source, name="baseline")
        if name == "pgsql":
            assert self.database is not None
            return Popserv(
                self.workdir,
                self.root,
                self.passwd,
                Path(self.args.source),
                profile,
                name="pgsql",
                mailLocation=f"pgsql:{self.database.uri}",
                label="popserv (pgsql)",
            )
        if name == "proxy":
            profile = None
            if self.args.profile:
                self._profiles += 1
                profile = self.workdir / f"profile-{self._profiles:02d}-{tag}-proxy.pstats"
            return ProxiedPopserv(
                self.workdir, self.root, self.passwd, Path(self.args.source), profile
            )
        if name == "twisted":
            return TwistedPeer(self.workdir, self.root, self.passwd, self.args.peer_nodelay)
        if name == "dovecot":
            return Dovecot(self.workdir, self.root, self.passwd)
        raise ValueError(name)

    @contextmanager
    def running(
        self, name: str, tag: str, tls: bool = False, workers: int = 0
    ) -> Iterator[Server]:
        server = self.makeServer(name, tag, workers)
        if tls:
            server.tlsCert = self.certificate()
        for user, table in self._tables.items():
            self._addCurrentNames(user, table)
        server.start()
        try:
            yield server
        finally:
            server.stop()
            if isinstance(server, Popserv) and server.profile and server.profile.exists():
                self.showProfile(server.profile, tag)

    def showProfile(self, path: Path, tag: str) -> None:
        print(f"\n--- popserv profile during {tag} ({path.name}), top by own time ---")
        stats = pstats.Stats(str(path), stream=sys.stdout)
        stats.strip_dirs().sort_stats("tottime").print_stats(18)

    # -- bookkeeping ---------------------------------------------------------

    def result(self, key: str, server: str) -> Result:
        return self.results.setdefault(key, {}).setdefault(server, Result())

    def fail(self, keys: list[str], server: str, error: Exception, srv: Server | None) -> None:
        text = f"{type(error).__name__}: {error}"
        print(f"\n!!! {server}: {', '.join(keys)} FAILED: {text}", flush=True)
        for log in (self.workdir / f"{server}.log", self.workdir / f"{server}-events.log"):
            if not log.exists():
                continue
            with open(log, "rb") as f:
                f.seek(max(0, log.stat().st_size - 8 * MiB))
                lines = f.read().decode("utf-8", "replace").splitlines()
            errors = [
                line for line in lines if _LOG_ERROR.search(line) and "session end" not in line
            ]
            if errors:
                print(f"--- error lines in {log} ---", *errors[:12], "---", sep="\n", flush=True)
        for key in keys:
            self.result(key, server).error = text

    def say(self, server: str, what: str) -> None:
        print(f"  [{server}] {what}", flush=True)

    # -- rows ----------------------------------------------------------------

    def _sessions(
        self,
        engine: Engine,
        drops: list[Maildrop],
        total: int,
        script: Callable[[Maildrop], Iterator[object]] = loginSession,
    ) -> None:
        """C{total} sessions of C{script}, one at a time on each of C{drops}' users."""
        started = 0

        def launch(drop: Maildrop) -> None:
            nonlocal started
            started += 1
            engine.start(script(drop), drop.user, lambda _r: next_(drop))

        def next_(drop: Maildrop) -> None:
            if started < total:
                launch(drop)

        before = engine.completed
        for drop in drops[:total]:
            launch(drop)
        engine.run()
        if engine.completed - before != total:
            raise BenchError(f"{engine.completed - before} of {total} sessions completed")

    def _loginRuns(
        self,
        server: Server,
        name: str,
        engine: Engine,
        clients: int,
        total: int,
        keys: tuple[str | None, str | None],
        script: Callable[[Maildrop], Iterator[object]] = loginSession,
        what: str = "login",
    ) -> None:
        """Timed runs of C{total} sessions by C{clients} clients: (rate key, CPU key)."""
        drops = [self.drops[f"login{i:03d}"] for i in range(1, clients + 1)]
        self._sessions(engine, drops, min(self.plan.loginWarmup, total), script)
        front = getattr(server, "frontCPU", None)  # the proxy's own share
        for run in range(self.runs):
            f0 = front() if front else 0.0
            (u0, s0), g0, t0 = server.cpuTimes(), genCPU(), perf_counter()
            d0 = self.databaseCPU()
            h0, r0 = engine.handshakes, engine.resumed
            self._sessions(engine, drops, total, script)
            t1, g1, (u1, s1) = perf_counter(), genCPU(), server.cpuTimes()
            d1 = self.databaseCPU()
            f1 = front() if front else 0.0
            rate = total / (t1 - t0)
            cpu = (u1 + s1 - u0 - s0) / total * 1000
            system = (s1 - s0) / max(u1 + s1 - u0 - s0, 1e-9)
            share = (g1 - g0) / (t1 - t0)
            rateKey, cpuKey = keys
            measured = []
            if rateKey is not None:
                # At one client the figure is the latency of a session.
                measured.append((rateKey, 1000 / rate if clients == 1 else rate))
            if cpuKey is not None:
                measured.append((cpuKey, cpu))
            text = ""
            if name == "pgsql" and clients == self.plan.loginUsers:
                dbCPU = (d1 - d0) / total * 1000
                measured.append(("login-db-cpu", dbCPU))
                text = f", PostgreSQL CPU {dbCPU:.3f} ms/session"
            if front:
                own = (f1 - f0) / total * 1000
                text += f"; the proxy's own {own:.3f} ms/session, the rest the backend's"
            if engine.tls is not None:
                text += (
                    f", {engine.resumed - r0:,} of {engine.handshakes - h0:,} handshakes resumed"
                )
            for key, value in measured:
                r = self.result(key, name)
                r.samples.append(value)
                r.gen.append(share)
            self.say(
                name,
                f"{what} ({clients} clients) run {run + 1}: {rate:,.0f} sessions/s, server CPU "
                f"{cpu:.3f} ms/session ({system:.0%} of it in the kernel){text}, "
                f"generator CPU {share:.0%}",
            )

    def rowLogin(self, name: str) -> None:
        p = self.plan
        keys = {1: ("login-1", None), 16: ("login-16", "login-cpu-16")}
        with self.running(name, "login") as server:
            for clients in p.loginClients:
                engine = Engine(server.port)
                total = p.loginOneSessions if clients == 1 else p.loginSessions
                key = keys.get(clients, ("login", "login-cpu"))
                self._loginRuns(server, name, engine, clients, total, key)
                engine.close()

    def _retr(self, name: str, key: str, users: list[str]) -> None:
        with self.running(name, key) as server:
            growths = []
            for run in range(self.runs):
                memory = _PeakMemory(server.pid)
                rate, total, elapsed, share = self._retrRun(server.port, users, memory)
                r = self.result(key, name)
                r.samples.append(rate)
                r.gen.append(share)
                text = ""
                if key == "retr50" and memory.growth is not None:
                    growths.append(memory.growth / MiB)
                    before = memory.before / MiB
                    text = f", node RSS {before:,.1f} MiB + {growths[-1]:.2f} MiB at peak"
                self.say(
                    name,
                    f"{key} run {run + 1}: {total / 1e6:.1f} MB in {elapsed * 1000:.1f} ms ="
                    f" {rate:,.0f} MB/s{text}, generator CPU {share:.0%}",
                )
            if growths:
                self.result("retr50-rss", name).samples.append(max(growths))

    def _retrRun(
        self,
        port: int,
        users: list[str],
        memory: _PeakMemory | None = None,
        engine: Engine | None = None,
    ) -> tuple[float, int, float, float]:
        """
        Every user RETRs its one message at the same moment: (MB/s, octets,
        s, gen CPU); C{memory} is started right before and read right after.
        """
        engine = engine or Engine(port)
        out: list[tuple[float, float, int]] = []
        for u in users:
            engine.start(retrSession(self.drops[u], self.table(u), out), u)
        n = len(users)
        engine.run(until=lambda: engine.parked("ready") == n)
        if memory is not None:
            memory.start()
        g0, w0 = genCPU(), perf_counter()
        engine.release("ready")
        engine.run(until=lambda: engine.parked("done") == n)
        g1, w1 = genCPU(), perf_counter()
        if memory is not None:
            memory.stop()
        engine.release("done")
        engine.run()
        engine.close()
        if len(out) != n:
            raise BenchError(f"{len(out)} of {n} transfers completed")
        start = min(t0 for t0, _, _ in out)
        end = max(t1 for _, t1, _ in out)
        total = sum(size for _, _, size in out)
        return total / (end - start) / 1e6, total, end - start, (g1 - g0) / (w1 - w0)

    def rowRetr50(self, name: str) -> None:
        self._retr(name, "retr50", ["big"])

    def rowRetr10x8(self, name: str) -> None:
        self._retr(name, "retr10x8", [f"medium{i}" for i in range(1, self.plan.mediumClients + 1)])

    def row100k(self, name: str) -> None:
        variants = [("", "many")]
        if self.args.size_hints and name != "pgsql":  # file names mean nothing to PostgreSQL
            variants.append(("-hints", "many-hints"))
        for suffix, user in variants:
            drop = self.drops[user]
            table = self.table(user) if not suffix else None
            for run in range(self.runs):
                # First login ever: a fresh process and none of the servers'
                # own files (indexes, UID lists, locks) left in the Maildir;
                # what it reads in the page cache (or the database's cache).
                if name == "pgsql" and self.pgSeeder is not None:
                    self.pgSeeder.warm(user)
                else:
                    forgetServerFiles(drop.path)
                    warmPageCache(drop.path)
                with self.running(name, f"100k{suffix}") as server:
                    first = self._timedLogin(server, f"100k-first{suffix}", drop, None)
                    second = self._timedLogin(server, f"100k-second{suffix}", drop, table)
                text = (
                    f"first login+STAT {first['login']:,.1f} ms, second {second['login']:,.1f} ms"
                )
                for what in ("list", "uidl"):
                    if what in second:
                        r = self.result(f"100k-{what}", name)
                        r.samples.append(second[what])
                        r.gen.append(second["gen"])
                        text += f", {what.upper()} {second[what]:,.1f} ms"
                # Restarted, with whatever the server keeps on disk still there.
                with self.running(name, f"100k{suffix}-restart") as server:
                    again = self._timedLogin(server, f"100k-restart{suffix}", drop, None)
                text += f"; after a restart {again['login']:,.1f} ms"
                self.say(name, f"100k{suffix} run {run + 1}: {text}")

    def _timedLogin(
        self, server: Server, key: str, drop: Maildrop, table: dict[str, Message] | None
    ) -> dict[str, float]:
        engine = Engine(server.port, stallTimeout=300)
        out: dict[str, float] = {}
        g0 = genCPU()
        t0 = perf_counter()
        engine.start(timedLogin(drop, t0, table, out), drop.user)
        engine.run()
        out["gen"] = (genCPU() - g0) / (perf_counter() - t0)
        engine.close()
        r = self.result(key, server.name)
        r.samples.append(out["login"])
        r.gen.append(out["gen"])
        return out

    def rowDnd(self, name: str) -> None:
        p = self.plan
        with self.running(name, "dnd") as server:
            for run in range(self.runs):
                self.seedDnd(name)
                for key, users in (
                    ("dnd-1", ["dnd1"]),
                    ("dnd-8", [f"dnd{p.dndClients}-{i}" for i in range(1, p.dndClients + 1)]),
                ):
                    engine = Engine(server.port)
                    out: list[tuple[int, float]] = []
                    g0, t0 = genCPU(), perf_counter()
                    deadline = t0 + p.dndCap
                    for u in users:
                        engine.start(dndSession(self.drops[u], self.table(u), deadline, out), u)
                    engine.run()
                    g1, t1 = genCPU(), perf_counter()
                    engine.close()
                    done = sum(d for d, _ in out)
                    offered = sum(len(self.drops[u].messages) for u in users)
                    elapsed = max(t for _, t in out) - t0
                    rate = done / elapsed
                    self._checkRemoved(users, out, name)
                    r = self.result(key, name)
                    r.samples.append(rate)
                    r.gen.append((g1 - g0) / (t1 - t0))
                    note = ""
                    if done < offered:
                        note = (
                            f"capped at {p.dndCap:g}s: {done:,} of {offered:,} messages, "
                            "rate extrapolated"
                        )
                        r.notes = [f"{note} (last run)"]
                    self.say(
                        name,
                        f"{key} run {run + 1}: {done:,} messages in {elapsed:.2f}s = "
                        f"{rate:,.0f} msg/s, generator CPU {r.gen[-1]:.0%}"
                        + (f" ({note})" if note else ""),
                    )

    def _checkRemoved(self, users: list[str], out: list[tuple[int, float]], name: str) -> None:
        """After QUIT the downloaded messages must be gone from cur/ and new/ (or the database)."""
        left = 0
        for u in users:
            if name == "pgsql":
                assert self.pgSeeder is not None
                left += self.pgSeeder.count(u)
                continue
            path = self.drops[u].path
            left += sum(len(os.listdir(os.path.join(path, sub))) for sub in ("cur", "new"))
        expected = sum(len(self.drops[u].messages) for u in users) - sum(d for d, _ in out)
        if left != expected:
            raise BenchError(f"after QUIT {left} messages remain in the maildrops, not {expected}")

    def rowIdle(self, name: str) -> None:
        tryMost = True
        for run in range(self.runs):
            with self.running(name, "idle") as server:
                tryMost = self._idleRun(server, name, run, tryMost)

    def _idleRun(
        self,
        server: Server,
        name: str,
        run: int,
        tryMost: bool,
        engine: Engine | None = None,
        key: str = "idle-mem",
        first: int | None = None,
    ) -> bool:
        """One run of row 6 on a fresh server; False if the big count failed."""
        p = self.plan
        if first is not None:  # the TLS row: C{first} sessions only
            p = Plan(**{**asdict(p), "idleFirst": first})
        engine = engine or Engine(server.port, stallTimeout=120)
        users = [f"idle{i:05d}" for i in range(1, p.idleMax + 1)]
        # Warm up (imports, thread pool, caches), then the baseline.
        for u in users[:20]:
            engine.start(loginSession(self.drops[u]), u)
        engine.run()
        time.sleep(0.5)
        base = server.memory()
        started = 0
        limit = 256

        def pending() -> int:
            return started - engine.parked("idle")

        def enough(target: int) -> bool:
            return engine.parked("idle") >= target or (started < target and pending() < limit // 2)

        def openUpTo(target: int) -> None:
            nonlocal started
            while engine.parked("idle") < target:
                while started < target and pending() < limit:
                    u = users[started]
                    engine.start(idleSession(self.drops[u]), u)
                    started += 1
                engine.run(until=partial(enough, target))

        g0, w0 = genCPU(), perf_counter()
        openUpTo(p.idleFirst)
        share = (genCPU() - g0) / (perf_counter() - w0)
        opens = p.idleFirst / (perf_counter() - w0)
        if key == "idle-mem":
            r = self.result("idle-opens", name)
            r.samples.append(opens)
            r.gen.append(share)
        time.sleep(0.5)
        first = server.memory()
        perSession = (first - base) / p.idleFirst / 1024
        r = self.result(key, name)
        r.samples.append(perSession)
        r.gen.append(share)
        text = (
            f"{key} run {run + 1}: PSS {base / MiB:.1f} -> {first / MiB:.1f} MiB with "
            f"{p.idleFirst:,} sessions = {perSession:.2f} KiB/session, {opens:,.0f} opens/s"
        )
        if not tryMost:
            engine.close()
            self.say(name, text)
            return False
        try:
            openUpTo(p.idleMax)
            time.sleep(0.5)
            most = server.memory()
            fds = server.openFiles()
            engine.release("idle")  # each: NOOP, QUIT
            engine.run()
        except BenchError as e:
            fds = server.openFiles()
            self.say(name, text)
            self.fail(
                ["idle-max"],
                name,
                BenchError(
                    f"{e} [after {started:,} connections, {engine.parked('idle'):,} logged "
                    f"in; server had {fds:,} fds open]"
                ),
                server,
            )
            engine.close()
            return False
        engine.close()
        perMost = (most - base) / p.idleMax / 1024
        r = self.result("idle-max", name)
        r.samples.append(perMost)
        r.gen.append(share)
        self.say(
            name,
            text + f"; {p.idleMax:,} open: PSS {most / MiB:.1f} MiB = {perMost:.2f} "
            f"KiB/session, {fds:,} fds, all answered NOOP",
        )
        return True

    def tlsContext(self) -> ssl.SSLContext:
        """The clients' TLS: verify the benchmark's certificate, as a mail client would."""
        ctx = ssl.create_default_context(cafile=str(self.certificate()))
        ctx.check_hostname = False
        return ctx

    def certificate(self) -> Path:
        """A throw-away ECDSA P-256 certificate and its key in one PEM file (made once)."""
        pem = self.workdir / "tls.pem"
        if not pem.exists():
            key, cert = self.workdir / "tls.key", self.workdir / "tls.crt"
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                 "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                 str(cert), "-days", "30", "-subj", "/CN=localhost",
                 "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                check=True, capture_output=True,
            )  # fmt: skip
            pem.write_text(cert.read_text() + key.read_text())
            pem.chmod(0o644)
        return pem

    def rowTLS(self, name: str) -> None:
        """Row 7: logins over implicit TLS and STLS, fresh and resumed; RETR; idle memory."""
        p = self.plan
        ctx = self.tlsContext()
        with self.running(name, "tls", tls=True) as server:
            variants = [("tls-implicit", True, False), ("tls-implicit-resumed", True, True)]
            if name != "twisted":  # twisted.mail.pop3 has no STLS
                variants += [("tls-stls", False, False), ("tls-stls-resumed", False, True)]
            for key, implicit, resume in variants:
                port = server.tlsPort if implicit else server.port
                engine = Engine(port, tls=ctx, implicitTLS=implicit, resume=resume)
                script = loginSession if implicit else stlsSession
                cpuKey = "tls-implicit-cpu" if key == "tls-implicit" else None
                self._loginRuns(
                    server, name, engine, p.tlsClients, p.tlsSessions, (key, cpuKey), script, key
                )
                engine.close()
            for run in range(self.runs):
                engine = Engine(server.tlsPort, tls=ctx, implicitTLS=True)
                rate, total, elapsed, share = self._retrRun(server.port, ["big"], engine=engine)
                r = self.result("tls-retr50", name)
                r.samples.append(rate)
                r.gen.append(share)
                self.say(
                    name,
                    f"tls-retr50 run {run + 1}: {total / 1e6:.1f} MB in {elapsed * 1000:.1f} ms"
                    f" = {rate:,.0f} MB/s, generator CPU {share:.0%}",
                )
        for run in range(self.runs):
            with self.running(name, "tls-idle", tls=True) as server:
                engine = Engine(server.tlsPort, stallTimeout=120, tls=ctx, implicitTLS=True)
                self._idleRun(server, name, run, False, engine, "tls-idle-mem", p.tlsIdle)

    def rowWorkers(self, name: str) -> None:
        """
        Row 8: popserv serve --workers 2 against --workers 1 (popserv only).
        One worker is pinned to core 0 as in row 1; two workers may use both
        cores, so they share core 1 with the generator: on a two-core machine
        the figure is CPU-bound (the report says how busy the generator was).
        """
        if name != "popserv":
            return
        p = self.plan
        for workers in (1, 2):
            with self.running(name, f"workers{workers}", workers=workers) as server:
                engine = Engine(server.port)
                keys = (f"workers-{workers}", f"workers-{workers}-cpu")
                self._loginRuns(
                    server, name, engine, p.loginUsers, p.workerSessions, keys,
                    what=f"--workers {workers}",
                )  # fmt: skip
                engine.close()

    # -- driver --------------------------------------------------------------

    ROWS: dict[str, tuple[str, list[str]]] = {
        "login": ("rowLogin", ["login", "login-cpu"]),
        "retr50": ("rowRetr50", ["retr50", "retr50-rss"]),
        "retr10x8": ("rowRetr10x8", ["retr10x8"]),
        "100k": (
            "row100k",
            ["100k-second", "100k-first", "100k-restart", "100k-second-hints"]
            + ["100k-first-hints", "100k-restart-hints", "100k-list", "100k-uidl"],
        ),
        "dnd": ("rowDnd", ["dnd-1", "dnd-8"]),
        "idle": ("rowIdle", ["idle-mem", "idle-max", "idle-opens"]),
        "tls": (
            "rowTLS",
            ["tls-implicit", "tls-implicit-cpu", "tls-implicit-resumed", "tls-stls"]
            + ["tls-stls-resumed", "tls-retr50", "tls-idle-mem"],
        ),
        "workers": ("rowWorkers", ["workers-1", "workers-1-cpu", "workers-2", "workers-2-cpu"]),
    }

    def run(self, groups: list[str]) -> bool:
        ok = True
        for group in groups:
            method, keys = self.ROWS[group]
            print(f"\n== row {GROUPS[group]}: {group} ==", flush=True)
            for name in self.servers():
                busy0, own0, wall0 = systemBusy(), ownCPU(), perf_counter()
                db0 = self.databaseCPU()
                try:
                    getattr(self, method)(name)
                except BenchError as e:
                    self.fail(keys, name, e, None)
                    ok = False
                except RuntimeError as e:  # a server that does not start
                    self.fail(keys, name, e, None)
                    ok = False
                finally:
                    stopAll()
                    db = self.databaseCPU() - db0  # the pgsql server's, not other load
                    other = (systemBusy() - busy0 - (ownCPU() - own0) - db) / (
                        perf_counter() - wall0
                    )
                    self.otherLoad[(group, name)] = max(0.0, other)
                    if other > NOISY:
                        print(
                            f"  warning: other processes used {other:.0%} of a core during "
                            f"this row ({name}); its figures may be disturbed",
                            flush=True,
                        )
        return ok and not any(
            r.error for byServer in self.results.values() for r in byServer.values()
        )

    # -- report --------------------------------------------------------------

    def table_(self, groups: list[str]) -> str:
        rows = [r for r in _rows(self.plan) if r.group in groups]
        if not self.args.size_hints:
            rows = [r for r in rows if not r.key.endswith("-hints")]
        wanted = self.servers()
        baseline = "baseline" in wanted
        pg = "pgsql" in wanted
        proxy = "proxy" in wanted
        servers = [
            "popserv",
            *(["baseline"] if baseline else []),
            *(["pgsql"] if pg else []),
            *(["proxy"] if proxy else []),
            "twisted",
            "dovecot",
        ]
        installed = dovecotBinary() is not None
        header = [
            "row",
            "popserv",
            *(["baseline"] if baseline else []),
            *(["popserv (pgsql)"] if pg else []),
            *(["popserv proxy"] if proxy else []),
            "twisted.mail.pop3",
            "dovecot",
            *(["popserv/baseline"] if baseline else []),
            *(["pgsql/popserv"] if pg else []),
            *(["proxy/popserv"] if proxy else []),
            "popserv/twisted",
            "popserv/dovecot",
            "target",
            *(["pgsql target"] if pg else []),
        ]
        lines: list[list[str]] = []
        footnotes: list[str] = []
        for row in rows:
            byServer = self.results.get(row.key, {})
            cells = [row.title]
            for s in servers:
                if s == "dovecot" and not installed:
                    cells.append("not installed")
                    continue
                if s not in wanted:
                    cells.append("-")
                    continue
                cells.append(self._cell(row, byServer.get(s), s, footnotes))
            pv = byServer.get("popserv", Result()).value
            tv = byServer.get("twisted", Result()).value
            dv = byServer.get("dovecot", Result()).value
            if baseline:
                bv = byServer.get("baseline", Result()).value
                cells.append(f"{pv / bv:,.2f}x" if pv is not None and bv else "-")
            gv = byServer.get("pgsql", Result()).value
            pgRatio = gv / pv if gv is not None and pv else None
            if pg:
                cells.append(f"{pgRatio:,.2f}x" if pgRatio is not None else "-")
            if proxy:
                xv = byServer.get("proxy", Result()).value
                cells.append(f"{xv / pv:,.2f}x" if xv is not None and pv else "-")
            ratio = pv / tv if pv is not None and tv else None
            cells.append(f"{ratio:,.2f}x" if ratio is not None else "-")
            cells.append(f"{pv / dv:,.2f}x" if pv is not None and dv else "-")
            verdict = ""
            if pv is not None and row.check is not None:
                against = (pv / dv if dv else None) if row.vsDovecot else ratio
                if self.args.quick:
                    verdict = " (quick: n/a)"
                else:
                    verdict = " ok" if row.check(pv, against) else " MISSED"
            cells.append(row.target + verdict)
            if pg:
                cells.append(row.pgTarget + self._verdict(row.pgCheck, gv, pgRatio))
            lines.append(cells)
        out = [self._grid(header, lines)]
        if footnotes:
            out.append("\n".join(footnotes))
        # Generator CPU per row.
        genLines = []
        for row in rows:
            byServer = self.results.get(row.key, {})
            cells = [row.title]
            for s in servers:
                g = byServer.get(s, Result()).genShare
                cells.append(
                    "-" if g is None else f"{g:.0%}" + (" SATURATED" if g >= SATURATED else "")
                )
            others = [
                f"{s} {self.otherLoad[(row.group, s)]:.0%}"
                for s in servers
                if (row.group, s) in self.otherLoad
            ]
            cells.append(", ".join(others) or "-")
            genLines.append(cells)
        out.append(
            "\nLoad generator CPU (share of its core, core 1) during each measurement, and CPU"
            " used by\nother processes on the machine during the row (share of one core; "
            f"over {NOISY:.0%} may disturb figures):\n"
            + self._grid(["row", *header[1 : 1 + len(servers)], "other processes"], genLines)
        )
        return "\n".join(out)

    def _verdict(self, check: Callable[[float, float | None], bool] | None, value: float | None,
                 ratio: float | None) -> str:  # fmt: skip
        if value is None or check is None:
            return ""
        if self.args.quick:
            return " (quick: n/a)"
        return " ok" if check(value, ratio) else " MISSED"

    def _cell(self, row: Row, r: Result | None, server: str, footnotes: list[str]) -> str:
        if r is None:
            return "-"
        if r.error:
            footnotes.append(f"FAILED {server} / {row.title}: {r.error}")
            return "FAILED"
        v = r.value
        if v is None:
            return "-"
        if row.unit == "ms":
            text = f"{v:,.3f} ms" if v < 1 else f"{v:,.1f} ms"
        elif row.unit == "KiB":
            text = f"{v:,.2f} KiB"
        elif row.unit == "MB/s":
            text = f"{v:,.0f} MB/s"
        elif row.unit == "MiB":
            text = f"{v:,.1f} MiB"
        else:
            text = f"{v:,.0f} {row.unit}"
        if row.key == "idle-max":
            text = f"works, {text}"
        g = r.genShare
        if g is not None and g >= SATURATED:
            text += " (gen. saturated)"
        for note in r.notes:
            footnotes.append(f"* {server} / {row.title}: {note}")
            text += " *"
        if len(r.samples) > 1:
            spread = (max(r.samples) - min(r.samples)) / v if v else 0
            if spread > 0.25:
                footnotes.append(
                    f"~ {server} / {row.title}: runs spread {spread:.0%} "
                    f"({', '.join(f'{s:,.4g}' for s in r.samples)})"
                )
                text += " ~"
        return text

    @staticmethod
    def _grid(header: list[str], lines: list[list[str]]) -> str:
        widths = [max(len(x) for x in col) for col in zip(header, *lines, strict=True)]

        def fmt(cells: list[str]) -> str:
            return " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

        sep = "-+-".join("-" * w for w in widths)
        return "\n".join([fmt(header), sep, *(fmt(line) for line in lines)])


def _revision(tree: Path) -> str:
    try:
        return (
            subprocess.run(
                ["git", "-C", str(tree), "describe", "--always", "--dirty"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            or "?"
        )
    except (OSError, subprocess.SubprocessError):
        return "?"


def snapshotSource(workdir: Path) -> Path:
    """
    Copy popserv as it is now (working tree) into the work directory, so that
    the whole run measures one version even if the repository changes meanwhile.
    """
    target = workdir / "src"
    if target.exists():
        shutil.rmtree(target)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache")
    shutil.copytree(REPO / "popserv", target / "popserv", ignore=ignore)
    (target / "twisted" / "plugins").mkdir(parents=True)
    shutil.copy2(
        REPO / "twisted" / "plugins" / "popserv_plugins.py", target / "twisted" / "plugins"
    )
    return target


def _environment(args: argparse.Namespace, plan: Plan) -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    import twisted

    return (
        f"popserv {args.revision} ({args.source}); Twisted {twisted.__version__}; "
        f"Python {platform.python_version()}; {cpu}; {os.cpu_count()} CPUs; "
        f"{platform.system()} {platform.release()}\n"
        f"mode {'quick' if args.quick else 'full'}, median of {args.runs} runs, seed {SEED}; "
        f"server on core 0, load generator on core 1; twisted peer "
        f"{'with TCP_NODELAY' if args.peer_nodelay else 'stock (Nagle on)'}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="popserv benchmark (see bench/README.rst)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small sizes and counts (smoke test)")
    parser.add_argument(
        "--rows",
        default=",".join(GROUPS),
        help="comma-separated rows to run: " + ", ".join(f"{k} ({v})" for k, v in GROUPS.items()),
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per row (the median is shown)")
    parser.add_argument(
        "--servers", default="popserv,twisted,dovecot", help="servers to measure (if installed)"
    )
    parser.add_argument(
        "--size-hints", action="store_true", help="add 100k rows with ,S=,W= names"
    )
    parser.add_argument("--workdir", default="/tmp/popserv-bench", help="Maildirs, logs, configs")
    parser.add_argument("--keep", action="store_true", help="keep the work directory afterwards")
    parser.add_argument(
        "--baseline-src",
        help="also measure the popserv source tree in this directory (a git archive of an "
        "earlier revision), as a 'baseline' column beside popserv in the same run",
    )
    parser.add_argument(
        "--popserv-src",
        help="popserv source tree to run as is (default: a copy of this repository's working "
        "tree taken at start, so that edits during the run do not mix versions)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run popserv under cProfile (twistd --profiler=cprofile) and print the top "
        "functions per row; figures are then NOT representative",
    )
    parser.add_argument(
        "--peer-nodelay",
        action="store_true",
        help="run the twisted.mail.pop3 peer with TCP_NODELAY (stock Twisted leaves Nagle on)",
    )
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    groups = []
    byNumber = {v: k for k, v in GROUPS.items()}
    for name in args.rows.split(","):
        name = byNumber.get(name.strip(), name.strip())
        if name not in GROUPS:
            parser.error(f"unknown row {name!r}; rows: {', '.join(GROUPS)}")
        if name not in groups:
            groups.append(name)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    known = {"popserv", "baseline", "pgsql", "proxy", "twisted", "dovecot", ""}
    unknown = set(args.servers.split(",")) - known
    if unknown:
        parser.error(f"unknown server(s) {', '.join(sorted(unknown))}: {', '.join(sorted(known))}")
    if "baseline" in args.servers.split(",") and not args.baseline_src:
        parser.error("the baseline server needs --baseline-src")

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt()

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {1})
    else:
        print("warning: one CPU only; server and generator share it", file=sys.stderr)
    raiseFileLimit()

    bench = Bench(args)
    plan = bench.plan
    ok = False
    try:
        bench.prepareWorkdir()
        if args.popserv_src:
            args.source = Path(args.popserv_src).resolve()
            args.revision = _revision(args.source)
        else:
            args.revision = _revision(REPO)
            args.source = snapshotSource(bench.workdir)
        print(_environment(args, plan), flush=True)
        if "dovecot" in args.servers:
            if dovecotBinary() is None:
                print("dovecot: not installed, skipped", flush=True)
            elif os.getuid() == 0:
                print(
                    "dovecot: run as root, its mail processes as nobody (Dovecot refuses "
                    "uid 0 for them); the Maildirs are given to nobody",
                    flush=True,
                )
        bench.seedStatic(set(groups))
        bench.writePasswd(set(groups))
        if "pgsql" in bench.servers():
            sys.path.insert(0, str(args.source))  # the seeding uses popserv's store
            bench.startDatabase(set(groups))
        ok = bench.run(groups)
        print("\n" + _environment(args, plan) + "\n")
        if not args.popserv_src and _revision(REPO) != args.revision:
            print(
                f"note: the repository changed during the run (now {_revision(REPO)}); "
                "the figures are for the copy taken at start\n"
            )
        print(bench.table_(groups), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(
                    {k: {s: asdict(r) for s, r in v.items()} for k, v in bench.results.items()},
                    f,
                    indent=1,
                )
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        stopAll()
        bench.stopDatabase()
        if args.keep:
            print(f"work directory kept: {bench.workdir}")
        else:
            bench.removeWorkdir()
    if not ok:
        print("\nSOME MEASUREMENTS FAILED (see above); their figures are not reported.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
