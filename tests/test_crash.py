"""
Crash safety: SIGKILL a real popserv process at random points, hundreds of
times, while POP3 sessions run against it and mail keeps arriving, and check
after every restart that no mail was lost, duplicated or damaged.

How it runs (all on 127.0.0.1, all under a temporary directory):

- tests/crashserver.py runs as a "zygote" that imports popserv and Twisted
  once and, on request, forks a child that installs a fresh reactor and runs
  popserv (built with popserv.makeService) on a fixed port; a restart costs
  about 10 ms instead of the ~0.7 s of a fresh twistd, so hundreds of kill
  points fit in seconds. The child is the server that gets killed.
- tests/crashserver.py also runs as a deliverer process: a new message every
  few milliseconds (tmp/ then rename into new/; mixed sizes, some over
  256 KiB, lines starting with "."), each completed delivery logged with the
  SHA-256 of its content. Now and then it acts like a mail client and moves a
  message from new/ to cur/ or changes its flags, as real mailboxes see.
- This process drives sessions over plain sockets: USER/PASS, UIDL, random
  RETR (content checked against the deliverer's hash), DELE, RSET, NOOP,
  STAT, LIST, TOP, a second login that must get [IN-USE], and then QUIT or a
  dropped connection (sometimes in the middle of a RETR). Some sessions mark
  everything and QUIT, so that kills land in UPDATE.
- Each kill point is chosen at random: either a timer 0-40 ms after the
  cycle's first session starts, or right after a given command is sent
  (with 0-4 ms of delay after a QUIT, to hit UPDATE).

After every kill the server is restarted and, with the deliverer held still
(a flock it takes around each delivery and move), the Maildir is compared
with the model:

- every delivered message is present, unless it was marked with DELE in a
  session that sent QUIT; if that QUIT was answered +OK, those messages are
  gone; nothing else ever disappears or comes back;
- each unique name appears once across new/ and cur/, and every file there
  has the content that was delivered (no partial or foreign files);
- the first login after the restart succeeds (no stale lock: no [IN-USE]);
- the restarted server lists exactly the messages on disk, with the sizes
  delivered, and each message (identified by its content, via TOP) keeps
  the UIDL it had before: the unique part of its file name.

Default: 200 kill points (well under a minute). Long mode, e.g.::

    POPSERV_CRASH_KILLS=5000 python -m pytest -q -s tests/test_crash.py

POPSERV_CRASH_SEED fixes the random choices (timing still varies). With -s
the summary is printed; it is also in the assertion message on failure.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import crashserver  # noqa: E402

KILLS = int(os.environ.get("POPSERV_CRASH_KILLS", "200"))
SEED = int(os.environ.get("POPSERV_CRASH_SEED", str(random.randrange(1 << 32))))

#: Seconds between deliveries, and the mailbox size at which the deliverer waits.
DELIVERY_INTERVAL = 0.004
MAILBOX_CAP = 60
#: A reply slower than this is a hang (a violation), not a crash.
SOCKET_TIMEOUT = 10.0
MAX_VIOLATIONS = 100

pytestmark = pytest.mark.skipif(
    not hasattr(os, "fork") or not hasattr(fcntl, "flock"), reason="needs fork and flock"
)


def uniquePart(name: str) -> str:
    """The unique part of a Maildir name (before ":2,", without S=/W=), as specified."""
    first, *fields = name.split(":", 1)[0].split(",")
    return ",".join([first, *(f for f in fields if not f.startswith(("S=", "W=")))])


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- processes -------------------------------------------------------------------


class Zygote:
    """tests/crashserver.py zygote: forks popserv servers on request."""

    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self.stderr = open(root / "zygote.err", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "crashserver.py"), "zygote", str(root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            start_new_session=True,  # its children share its process group
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.hello = self.expect("hello", 60)
        if "threads=1" not in self.hello.split():
            raise RuntimeError(f"the zygote must not run threads before forking: {self.hello}")
        if "reactor_installed_by_import=0" not in self.hello.split():
            raise RuntimeError(f"importing popserv installed the reactor: {self.hello}")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.decode().strip())
        self.lines.put("eof")

    def expect(self, word: str, timeout: float = 20) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"zygote: no {word!r} in {timeout}s{self.logs()}") from None
        if not line.startswith(word + " "):
            raise RuntimeError(f"zygote: expected {word!r}, got {line!r}{self.logs()}")
        return line

    def logs(self) -> str:
        if not self.stderr.closed:
            self.stderr.flush()
        parts = []
        for name in ("zygote.err", "server.log"):
            path = self.root / name
            if path.exists():
                parts.append(f"\n--- {name} (tail) ---\n" + path.read_text()[-3000:])
        return "".join(parts)

    def command(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def start(self) -> int:
        self.command(f"start {self.port}")
        return int(self.expect("ready").split()[1])

    def reap(self, pid: int) -> int:
        """Wait for a server child to be gone; its wait status."""
        self.command(f"reap {pid}")
        return int(self.expect("reaped").split()[2])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the zygote and any server child
            except ProcessLookupError:
                pass
        self.proc.wait(10)
        self.stderr.close()


def startDeliverer(root: Path, maildir: Path, seed: int) -> subprocess.Popen[bytes]:
    with open(root / "deliverer.err", "wb") as stderr:
        return subprocess.Popen(
            [
                sys.executable,
                str(HERE / "crashserver.py"),
                "deliver",
                str(maildir),
                str(root / "delivered.log"),
                str(root / "maildir.lock"),
                str(seed),
                str(DELIVERY_INTERVAL),
                str(MAILBOX_CAP),
            ],
            stderr=stderr,
            start_new_session=True,
        )


# -- the model -------------------------------------------------------------------


@dataclass
class Delivered:
    sha256: str
    size: int
    crlfSize: int
    serial: int


@dataclass
class Stats:
    kills: int = 0
    sessions: int = 0
    logins: int = 0
    listed: int = 0  # messages listed by UIDL at session start, summed
    quitSent: int = 0
    quitOK: int = 0
    quitNoReply: int = 0
    dropped: int = 0
    droppedMidRetr: int = 0
    retrChecked: int = 0
    deleSent: int = 0
    rsets: int = 0
    inUseChecks: int = 0
    inUseRetries: int = 0
    checks: int = 0
    killModes: Counter[str] = field(default_factory=Counter)
    noticedIn: Counter[str] = field(default_factory=Counter)
    update: Counter[str] = field(default_factory=Counter)


class Model:
    """What must be in the Maildir: delivered minus what QUIT sessions may have removed."""

    def __init__(self, logPath: Path, lockFD: int) -> None:
        self.logPath = logPath
        self.lockFD = lockFD  # the deliverer's lock (see check())
        self._offset = 0
        self._partial = b""
        self.delivered: dict[str, Delivered] = {}
        self.bySerial: dict[int, str] = {}
        self.uids: dict[str, str] = {}  # unique -> the UIDL first reported for it
        self.maybeGone: set[str] = set()  # DELE'd in a session that sent QUIT
        self.mustBeGone: set[str] = set()  # ... and that QUIT was answered +OK
        self.gone: set[str] = set()
        self.inUpdate: list[set[str]] = []  # marked sets whose QUIT got no reply
        self.violations: list[str] = []

    def violation(self, text: str) -> None:
        if len(self.violations) < MAX_VIOLATIONS:
            self.violations.append(text)

    def refresh(self) -> None:
        """Read the deliveries logged since last time."""
        with open(self.logPath, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        self._offset += len(data)
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        for line in lines:
            unique, sha, size, crlfSize, serial = line.decode().split()
            self.delivered[unique] = Delivered(sha, int(size), int(crlfSize), int(serial))
            self.bySerial[int(serial)] = unique

    def lookup(self, unique: str) -> Delivered | None:
        if unique not in self.delivered:
            self.refresh()
        if unique not in self.delivered:
            # Renamed into new/ but not logged yet: the deliverer does both under
            # the lock, so once we hold it the line is written.
            fcntl.flock(self.lockFD, fcntl.LOCK_EX)
            try:
                self.refresh()
            finally:
                fcntl.flock(self.lockFD, fcntl.LOCK_UN)
        return self.delivered.get(unique)


# -- a POP3 client ---------------------------------------------------------------


class Dead(Exception):
    """The connection ended (expected only once the server was killed)."""


class Hang(Exception):
    """No answer within SOCKET_TIMEOUT."""


class Client:
    def __init__(self, port: int) -> None:
        try:
            self.sock = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT)
        except TimeoutError:
            raise Hang("connect") from None
        except OSError as e:
            raise Dead(f"connect: {e}") from None
        self.buf = bytearray()

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except TimeoutError:
            raise Hang("send") from None
        except OSError as e:
            raise Dead(f"send: {e}") from None

    def _fill(self) -> None:
        try:
            data = self.sock.recv(1 << 18)
        except TimeoutError:
            raise Hang("recv") from None
        except OSError as e:
            raise Dead(f"recv: {e}") from None
        if not data:
            raise Dead("eof")
        self.buf += data

    def line(self) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(self.buf[:end])
        del self.buf[: end + 2]
        return line

    def multi(self) -> bytes:
        """The body of a multi-line response, still byte-stuffed, CRLF line ends."""
        start = 0
        while True:
            if self.buf.startswith(b".\r\n"):
                del self.buf[:3]
                return b""
            end = self.buf.find(b"\r\n.\r\n", start)
            if end >= 0:
                body = bytes(self.buf[: end + 2])
                del self.buf[: end + 5]
                return body
            start = max(0, len(self.buf) - 4)
            self._fill()

    def close(self, reset: bool = False) -> None:
        if reset:  # RST instead of FIN
            self.sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
        self.sock.close()


def unstuff(body: bytes) -> bytes:
    """Undo byte-stuffing and CRLF: the message as delivered (LF line ends)."""
    return (b"\r\n" + body).replace(b"\r\n.", b"\r\n")[2:].replace(b"\r\n", b"\n")


# -- killing -----------------------------------------------------------------------


class Killer:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fired = threading.Event()
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def kill(self) -> None:
        with self._lock:
            if not self.fired.is_set():
                self.fired.set()  # before the signal: a failure seen after it is expected
                os.kill(self.pid, signal.SIGKILL)

    def after(self, delay: float) -> None:
        self._timer = threading.Timer(delay, self.kill)
        self._timer.start()

    def finish(self) -> None:
        if self._timer is not None:
            self._timer.join()
        self.kill()


@dataclass
class KillPlan:
    mode: str  # "timer" or "command"
    session: int = 0  # for "command": which session of the cycle
    command: int | str = 0  # the n-th command sent, or "QUIT"
    delay: float = 0.0


# -- the test ----------------------------------------------------------------------


class CrashTest:
    def __init__(self, root: Path, zygote: Zygote, model: Model, rng: random.Random) -> None:
        self.root = root
        self.maildir = root / "mail" / crashserver.USER / "Maildir"
        self.zygote = zygote
        self.model = model
        self.rng = rng
        self.stats = Stats()
        self.lockFD = model.lockFD

    # -- one kill point: restart, check, run sessions until the kill ------------

    def cycle(self) -> None:
        pid = self.zygote.start()
        self.check()
        killer = Killer(pid)
        plan = self.planKill()
        self.stats.killModes[plan.mode if plan.command != "QUIT" else "after QUIT"] += 1
        started = time.monotonic()
        index = 0
        try:
            while not killer.fired.is_set():
                if index == 0 and plan.mode == "timer":
                    killer.after(plan.delay)
                self.session(killer, plan, index)
                if plan.mode == "command" and plan.session <= index:
                    killer.kill()  # the planned command was never reached
                index += 1
                if time.monotonic() - started > 30:
                    self.model.violation("test bug: no kill point reached in 30 s")
                    break
        finally:
            killer.finish()
            status = self.zygote.reap(pid)
            if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
                self.model.violation(f"the server ended by itself before the kill: {status}")
            self.stats.kills += 1

    def planKill(self) -> KillPlan:
        rng = self.rng
        if rng.random() < 0.5:
            return KillPlan("timer", delay=rng.uniform(0, 0.040))
        session = rng.choice((0, 0, 0, 1, 2))
        if rng.random() < 0.4:
            return KillPlan("command", session, "QUIT", rng.uniform(0, 0.004))
        delay = rng.uniform(0, 0.002) if rng.random() < 0.5 else 0.0
        return KillPlan("command", session, rng.randint(1, 12), delay)

    # -- the invariants -----------------------------------------------------------

    def check(self) -> None:
        """Compare the Maildir and the restarted server with the model (deliverer held)."""
        model = self.model
        self.stats.checks += 1
        fcntl.flock(self.lockFD, fcntl.LOCK_EX)
        try:
            model.refresh()
            present = self.scan()
            self.checkModel(present)
            self.checkServer(present)
        finally:
            fcntl.flock(self.lockFD, fcntl.LOCK_UN)
        # Settle the model: what a QUIT may have removed is now known.
        for marked in model.inUpdate:
            removed = len(marked - present.keys())
            self.stats.update[
                "none removed"
                if removed == 0
                else "all removed"
                if removed == len(marked)
                else "partly removed"
            ] += 1
        model.inUpdate.clear()
        model.gone |= model.maybeGone - present.keys()
        model.maybeGone.clear()
        model.mustBeGone.clear()

    def scan(self) -> dict[str, str]:
        """unique -> file name, checking for duplicates and for content."""
        model = self.model
        present: dict[str, str] = {}
        for sub in ("cur", "new"):
            for entry in os.scandir(self.maildir / sub):
                if entry.name.startswith("."):
                    continue
                unique = uniquePart(entry.name)
                name = f"{sub}/{entry.name}"
                if unique in present:
                    model.violation(f"duplicate: {present[unique]} and {name}")
                    continue
                present[unique] = name
                expected = model.delivered.get(unique)
                if expected is None:
                    model.violation(f"a file that was never delivered: {name}")
                    continue
                data = Path(entry.path).read_bytes()
                if hashlib.sha256(data).hexdigest() != expected.sha256:
                    model.violation(
                        f"content of {name} differs from what was delivered "
                        f"({len(data)} bytes, delivered {expected.size})"
                    )
        return present

    def checkModel(self, present: dict[str, str]) -> None:
        model = self.model
        for unique in model.delivered.keys() - present.keys() - model.gone - model.maybeGone:
            model.violation(f"lost: {unique} was never DELE'd in a session that sent QUIT")
            model.gone.add(unique)
        for unique in model.mustBeGone & present.keys():
            model.violation(f"still there after QUIT +OK: {present[unique]}")
        for unique in model.gone & present.keys():
            model.violation(f"came back after being removed: {present[unique]}")

    def checkServer(self, present: dict[str, str]) -> None:
        """The first login after the restart: lock free, listing and UIDLs as before."""
        model = self.model
        try:
            client = Client(self.zygote.port)
            client.line()
            client.send(f"USER {crashserver.USER}\r\nPASS {crashserver.PASSWORD}\r\n".encode())
            client.line()
            reply = client.line()
            if not reply.startswith(b"+OK"):
                model.violation(f"first login after restart refused: {reply!r}")
                client.close()
                return
            self.stats.logins += 1
            client.send(b"UIDL\r\nLIST\r\n")
            client.line()
            uidl = [line.split() for line in client.multi().split(b"\r\n")[:-1]]
            client.line()
            sizes = dict(line.split() for line in client.multi().split(b"\r\n")[:-1])
            client.send(b"".join(b"TOP %s 0\r\n" % number for number, _ in uidl))
            uniques = set()
            for number, uid in uidl:
                status = client.line()
                if not status.startswith(b"+OK"):
                    model.violation(f"TOP {number.decode()} 0 after restart: {status!r}")
                    continue
                headers = unstuff(client.multi())
                serial = re.search(rb"^X-Crash-Serial: (\d+)$", headers, re.M)
                if serial is None:
                    model.violation(f"TOP {number.decode()} 0: no X-Crash-Serial header")
                    continue
                unique = model.bySerial.get(int(serial.group(1)))
                if unique is None:
                    model.violation(f"message {number.decode()}: unknown serial")
                    continue
                uniques.add(unique)
                text = uid.decode()
                if text != unique:
                    model.violation(f"UIDL of {present.get(unique)} is {text}, not {unique}")
                recorded = model.uids.setdefault(unique, text)
                if recorded != text:
                    model.violation(f"UIDL of {unique} changed from {recorded} to {text}")
                size = int(sizes.get(number, -1))
                if size != model.delivered[unique].crlfSize:
                    model.violation(
                        f"LIST size of {unique} is {size}, "
                        f"delivered {model.delivered[unique].crlfSize}"
                    )
            if len(uidl) != len(uniques) or uniques != present.keys():
                model.violation(
                    f"after restart the server lists {len(uidl)} messages "
                    f"({len(uniques)} distinct), {len(present)} on disk: "
                    f"missing {sorted(present.keys() - uniques)[:5]}, "
                    f"extra {sorted(uniques - present.keys())[:5]}"
                )
            client.send(b"QUIT\r\n")
            reply = client.line()
            if not reply.startswith(b"+OK"):
                model.violation(f"QUIT without changes after restart: {reply!r}")
            client.close()
        except (Dead, Hang) as e:
            model.violation(f"first session after restart failed: {e!r}")

    # -- sessions ------------------------------------------------------------------

    def session(self, killer: Killer, plan: KillPlan, index: int) -> None:
        """One session; returns normally or because the server died."""
        model, rng, stats = self.model, self.rng, self.stats
        stats.sessions += 1
        sent = 0
        where = "connect"
        marked: set[str] = set()
        quitSent = quitReplied = False

        def send(line: bytes) -> None:
            nonlocal sent
            client.send(line + b"\r\n")
            sent += 1
            if plan.mode != "command" or plan.session != index:
                return
            if plan.command == sent or (plan.command == "QUIT" and line == b"QUIT"):
                if plan.delay:
                    time.sleep(plan.delay)
                killer.kill()

        def status(expect: bytes = b"+OK") -> bytes:
            reply = client.line()
            if not reply.startswith(expect):
                model.violation(f"{where}: unexpected reply {reply!r}")
            return reply

        client: Client | None = None
        try:
            client = Client(self.zygote.port)
            where = "greeting"
            status()
            where = "login"
            for attempt in range(200):
                send(f"USER {crashserver.USER}".encode())
                status()
                send(f"PASS {crashserver.PASSWORD}".encode())
                reply = client.line()
                if reply.startswith(b"+OK"):
                    break
                if b"[IN-USE]" not in reply or attempt == 199:
                    model.violation(f"login: {reply!r}")
                    client.close()
                    return
                # The previous session's dropped connection may not be processed yet.
                stats.inUseRetries += 1
                time.sleep(0.002)
            stats.logins += 1
            where = "UIDL"
            send(b"UIDL")
            status()
            numbers: dict[int, str] = {}
            for line in client.multi().split(b"\r\n")[:-1]:
                number, uid = line.split()
                numbers[int(number)] = uid.decode()
                if model.lookup(uid.decode()) is None:
                    model.violation(f"UIDL lists {uid!r}, which was never delivered")
            live = set(numbers)

            stats.listed += len(numbers)
            # Mark everything, then QUIT: long UPDATEs. More likely in a full mailbox,
            # which keeps it between about a third and the whole of MAILBOX_CAP.
            purge = rng.random() < (0.5 if len(numbers) > MAILBOX_CAP // 3 else 0.05)
            for _ in range(rng.randint(0, 2) if purge else rng.randint(0, 12)):
                if not live:
                    break
                action = rng.random()
                if action < 0.4:
                    where = "RETR"
                    self.retr(send, status, client, numbers, rng.choice(sorted(live)))
                elif action < 0.6:
                    number = rng.choice(sorted(live))
                    where = "DELE"
                    marked.add(numbers[number])
                    stats.deleSent += 1
                    send(b"DELE %d" % number)
                    status()
                    live.discard(number)
                elif action < 0.7:
                    where = "RSET"
                    send(b"RSET")
                    status()
                    marked.clear()
                    live = set(numbers)
                    stats.rsets += 1
                elif action < 0.77:
                    where = "second login"
                    self.secondLogin()
                elif action < 0.87:
                    where = "TOP"
                    send(b"TOP %d %d" % (rng.choice(sorted(live)), rng.randint(0, 5)))
                    status()
                    client.multi()
                else:
                    where = rng.choice(("NOOP", "STAT", "LIST"))
                    send(where.encode())
                    status()
                    if where == "LIST":
                        client.multi()
            if purge:
                where = "DELE"
                for number in sorted(live):
                    marked.add(numbers[number])
                    stats.deleSent += 1
                    send(b"DELE %d" % number)
                    status()
            ending = rng.random()
            if purge or ending < 0.6:
                where = "QUIT"
                quitSent = True
                send(b"QUIT")
                reply = client.line()
                quitReplied = True
                if reply.startswith(b"+OK"):
                    stats.quitOK += 1
                    model.mustBeGone |= marked
                else:
                    model.violation(f"QUIT: {reply!r}")
                client.close()
            elif ending < 0.85 or not live:
                stats.dropped += 1
                client.close(reset=rng.random() < 0.5)
            else:
                where = "RETR"
                number = max(live, key=lambda n: getattr(model.lookup(numbers[n]), "size", 0))
                send(b"RETR %d" % number)
                status()  # the message is being streamed: vanish
                stats.droppedMidRetr += 1
                client.close(reset=rng.random() < 0.5)
        except Dead as e:
            if client is not None:
                client.close()
            if not killer.fired.is_set():
                model.violation(f"{where}: connection ended with the server alive: {e}")
                return
            stats.noticedIn[where] += 1
        except Hang as e:
            model.violation(
                f"{where}: no answer in {SOCKET_TIMEOUT}s ({e}; killed: {killer.fired.is_set()})"
            )
            killer.kill()
        finally:
            if quitSent:
                stats.quitSent += 1
                model.maybeGone |= marked
                if not quitReplied:
                    stats.quitNoReply += 1
                    model.inUpdate.append(set(marked))

    def retr(self, send, status, client: Client, numbers: dict[int, str], number: int) -> None:
        send(b"RETR %d" % number)
        status()
        data = unstuff(client.multi())
        expected = self.model.lookup(numbers[number])
        self.stats.retrChecked += 1
        if expected is not None and hashlib.sha256(data).hexdigest() != expected.sha256:
            self.model.violation(
                f"RETR {number} ({numbers[number]}): content differs "
                f"({len(data)} bytes, delivered {expected.size})"
            )

    def secondLogin(self) -> None:
        """While a session holds the maildrop, another login must get [IN-USE]."""
        other = Client(self.zygote.port)
        try:
            other.line()
            other.send(f"USER {crashserver.USER}\r\nPASS {crashserver.PASSWORD}\r\n".encode())
            other.line()
            reply = other.line()
            self.stats.inUseChecks += 1
            if not (reply.startswith(b"-ERR") and b"[IN-USE]" in reply):
                self.model.violation(f"second login while the maildrop is locked: {reply!r}")
        finally:
            other.close()

    def summary(self, elapsed: float) -> str:
        s, m = self.stats, self.model
        return (
            f"crash test (seed {SEED}): {s.kills} kill points in {elapsed:.1f}s "
            f"[{dict(s.killModes)}]; {s.sessions} sessions, {s.logins} logins, "
            f"{s.listed / max(1, s.sessions):.1f} messages at login on average, "
            f"{s.quitOK} QUITs answered +OK, {s.quitSent} QUITs sent, "
            f"{s.quitNoReply} killed after QUIT before the reply "
            f"(then at restart: {dict(s.update)}); {s.dropped} dropped connections, "
            f"{s.droppedMidRetr} dropped mid-RETR; {s.retrChecked} RETRs checked, "
            f"{s.deleSent} DELEs, {s.rsets} RSETs, {s.inUseChecks} [IN-USE] checks, "
            f"{s.inUseRetries} login retries after a dropped session; kill noticed in "
            f"{dict(s.noticedIn)}; {len(m.delivered)} deliveries, {len(m.gone)} removed, "
            f"{s.checks} checks; violations: {len(m.violations)}"
        )


@pytest.fixture
def crashRoot(tmp_path):
    root = tmp_path
    (root / "passwd").write_text(f"{crashserver.USER}:{{PLAIN}}{crashserver.PASSWORD}\n")
    maildir = root / "mail" / crashserver.USER / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    (root / "delivered.log").touch()
    return root


def test_sigkill_at_random_points_loses_nothing(crashRoot):
    rng = random.Random(SEED)
    root = crashRoot
    zygote = deliverer = lockFD = None
    started = time.monotonic()
    try:
        zygote = Zygote(root, freePort())
        deliverer = startDeliverer(root, root / "mail" / crashserver.USER / "Maildir", SEED)
        lockFD = os.open(root / "maildir.lock", os.O_RDWR | os.O_CREAT, 0o600)
        test = CrashTest(root, zygote, Model(root / "delivered.log", lockFD), rng)
        time.sleep(0.05)  # a few messages to begin with
        for _ in range(KILLS):
            test.cycle()
            if deliverer.poll() is not None:
                raise RuntimeError(
                    "the deliverer died: " + (root / "deliverer.err").read_text()[-2000:]
                )
        pid = zygote.start()
        test.check()  # after the last kill
        os.kill(pid, signal.SIGKILL)
        zygote.reap(pid)
    finally:
        if deliverer is not None:
            deliverer.kill()
            deliverer.wait(10)
        if zygote is not None:
            zygote.close()
        if lockFD is not None:
            os.close(lockFD)
    summary = test.summary(time.monotonic() - started)
    print("\n" + summary + f"\nzygote: {zygote.hello}")
    assert not test.model.violations, (
        summary + "\n" + "\n".join(test.model.violations[:30]) + zygote.logs()
    )
    assert test.stats.kills >= KILLS
