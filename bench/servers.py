"""
The servers under test, each a child process in its own session, pinned to
core 0, listening on 127.0.0.1 only: popserv (the twistd plugin) over the
Maildirs, and over PostgreSQL (bench/pgsql.py), popserv as a proxy in front of
a popserv backend over the same Maildirs, the twisted.mail.pop3 peer, and
Dovecot when it is installed.

CPU time and memory are read from /proc for every process of the server's
session (one process for popserv and the peer; Dovecot's master and children).
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

__all__ = [
    "Server",
    "Popserv",
    "ProxiedPopserv",
    "TwistedPeer",
    "Dovecot",
    "stopAll",
    "dovecotBinary",
    "mailOwner",
    "chownTree",
    "sessionCPU",
    "sessionMemory",
    "treeCPU",
    "treeMemory",
]

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
_live: set[Server] = set()


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pinAndRaiseLimits() -> None:  # runs in the child before exec
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if not shutil.which("taskset"):
        os.sched_setaffinity(0, {0})


def _pinned(command: list[str], cores: str = "0") -> list[str]:
    taskset = shutil.which("taskset")
    return [taskset, "-c", cores, *command] if taskset else command


def _pss(pid: int) -> int | None:
    """A process's proportional set size in bytes, if the kernel tells it."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _sessionPids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # field 6: session id
            pids.append(int(entry))
    return pids


def _descendants(root: int) -> list[int]:
    """C{root} and every process below it (PostgreSQL's backends make sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))  # field 4: ppid
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def _cpu(pids: list[int]) -> tuple[float, float]:
    user = system = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11]) + int(fields[13])  # fields 14, 16: utime, cutime
        system += int(fields[12]) + int(fields[14])  # fields 15, 17: stime, cstime
    return user / _CLK_TCK, system / _CLK_TCK


def _memory(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        pss = _pss(pid)
        if pss is not None:
            total += pss
            continue
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * _PAGE
        except OSError:
            continue
    return total


def sessionCPU(sid: int) -> tuple[float, float]:
    """User and system CPU seconds of the processes of session C{sid}, reaped children included."""
    return _cpu(_sessionPids(sid))


def sessionMemory(sid: int) -> int:
    """Proportional set size (else resident set size) of the processes of session C{sid}."""
    return _memory(_sessionPids(sid))


def treeCPU(root: int) -> tuple[float, float]:
    """User and system CPU seconds of C{root} and its descendants, reaped children included."""
    return _cpu(_descendants(root))


def treeMemory(root: int) -> int:
    """Proportional set size (else resident set size) of C{root} and its descendants."""
    return _memory(_descendants(root))


class Server:
    """A server process group; subclasses say how to start it."""

    name = "server"
    label = "server"
    #: The cores the server may run on (taskset -c); the generator has core 1.
    cores = "0"

    def __init__(self, workdir: Path, root: Path, passwd: Path) -> None:
        self.workdir = workdir
        self.root = root
        self.passwd = passwd
        self.port = 0
        #: Implicit TLS (POP3S) on a second port, with this certificate and key
        #: (one PEM file), when set before start (L{tlsCertificate}).
        self.tlsCert: Path | None = None
        self.tlsPort = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.logPath = workdir / f"{self.name}.log"

    def command(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError()

    def start(self, timeout: float = 60) -> Server:
        self.port = freePort()
        if self.tlsCert is not None:
            self.tlsPort = freePort()
        command, env = self.command()
        log = open(self.logPath, "ab")
        self.proc = subprocess.Popen(
            _pinned(command, self.cores),
            cwd=self.workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_pinAndRaiseLimits,
        )
        log.close()
        _live.add(self)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited at start-up:\n{self.tail()}")
            if self._greets():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.label} did not start:\n{self.tail()}")
            time.sleep(0.05)

    def _greets(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                greeting = s.recv(512)
                s.sendall(b"QUIT\r\n")
                while s.recv(512):
                    pass
                return greeting.startswith(b"+OK")
        except OSError:
            return False

    def tail(self, lines: int = 30, window: int = 20000) -> str:
        try:
            with open(self.logPath, "rb") as f:
                f.seek(max(0, os.path.getsize(self.logPath) - window))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpuSeconds(self) -> float:
        """User + system CPU time of every process of the server (all threads)."""
        return sum(self.cpuTimes())

    def cpuTimes(self) -> tuple[float, float]:
        """
        User and system CPU time of every process of the server (all threads),
        with that of its children that ended and were reaped (Dovecot's
        per-session processes): those count in their parent's cutime/cstime.
        """
        return sessionCPU(self.pid)

    def memory(self) -> int:
        """
        Memory in bytes, summed over the server's processes: the proportional
        set size (a page shared by n processes counts 1/n in each), so that
        Dovecot's process per session is not charged its shared libraries
        again for every session; the resident set size where PSS is unknown.
        """
        return sessionMemory(self.pid)

    def openFiles(self) -> int:
        try:
            return len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            return -1

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(10)
        _live.discard(self)
        self.proc = None


class Popserv(Server):
    name = "popserv"
    label = "popserv"

    def __init__(
        self,
        workdir: Path,
        root: Path,
        passwd: Path,
        source: Path = REPO,
        profile: Path | None = None,
        name: str = "popserv",
        mailLocation: str | None = None,
        label: str | None = None,
        workers: int = 0,
    ) -> None:
        # "baseline": an earlier revision beside this one; "pgsql": the PostgreSQL store.
        #: popserv serve --workers N (N >= 1) instead of twistd (0); two or more
        #: workers may run on both cores, the generator's included.
        self.workers = workers
        if workers > 1:
            self.cores = "0,1"
        self.name = name
        self.label = label or name
        super().__init__(workdir, root, passwd)
        self.mailLocation = mailLocation or f"maildir:{root}/%u/Maildir"
        self.source = source
        self.profile = profile
        self.config = workdir / f"{name}.conf"
        #: More configuration lines (TOML), for a kind of popserv the bench adds.
        self.extra = ""

    def command(self) -> tuple[list[str], dict[str, str]]:
        self.config.write_text(
            f'listen = ["tcp:{self.port}:interface=127.0.0.1:backlog=1024"]\n'
            f'passwd = "{self.passwd}"\n'
            f"mail_location = {json.dumps(self.mailLocation)}\n"
            'hostname = "bench.example.org"\n'
            # The abuse limits would throttle a benchmark from one address.
            "max_connections = 20000\n"
            "max_connections_per_ip = 0\n"
            "auth_penalty = 0\n"
            "login_timeout = 3600\n"
            "timeout = 3600\n"
            "shutdown_grace = 1\n" + self.extra
        )
        if self.tlsCert is not None:
            with open(self.config, "a") as f:
                f.write(
                    f'listen_tls = ["tcp:{self.tlsPort}:interface=127.0.0.1:backlog=1024"]\n'
                    f'tls_cert = "{self.tlsCert}"\n'
                    'plaintext_auth = "always"\n'
                )
        if self.workers:
            env = dict(os.environ, PYTHONPATH=str(self.source))
            popserv = [sys.executable, "-m", "popserv", "serve", "--config", str(self.config)]
            return [*popserv, "--workers", str(self.workers)], env
        twistd = Path(sys.executable).parent / "twistd"
        command = (
            [sys.executable, str(twistd)]
            if twistd.exists()
            else [
                sys.executable,
                "-c",
                "from twisted.scripts.twistd import run; run()",
            ]
        )
        command += ["-n", "--pidfile="]
        if "def text(" in (self.source / "popserv" / "logs.py").read_text():
            # The documented text logger for standard output (same lines, cheaper).
            command += ["--logger", "popserv.logs.text"]
        else:  # an older tree (--baseline-src)
            command += ["--logfile=-"]
        if self.profile is not None:
            command += [f"--profile={self.profile}", "--profiler=cprofile", "--savestats"]
        command += ["popserv", "--config", str(self.config)]
        env = dict(os.environ, PYTHONPATH=str(self.source))
        return command, env


class ProxiedPopserv(Popserv):
    """
    popserv in proxy mode (C{proxy_backend}) in front of a second popserv, the
    backend, that serves the Maildirs: the proxied user's path, to set beside
    a direct popserv's. Both processes run on the same core, so a row's rate
    is that of the pair; the CPU figures are the pair's too (the front's own
    is printed per run as "the proxy's own").
    """

    def __init__(
        self,
        workdir: Path,
        root: Path,
        passwd: Path,
        source: Path = REPO,
        profile: Path | None = None,
    ) -> None:
        super().__init__(
            workdir, root, passwd, source, profile, name="proxy", label="popserv proxy"
        )
        self.backend = Popserv(workdir, root, passwd, source, name="proxy-backend")

    def start(self, timeout: float = 60) -> Server:
        self.backend.start(timeout)
        self.extra = f'proxy_backend = ["pop://127.0.0.1:{self.backend.port}"]\n'
        try:
            return super().start(timeout)
        except BaseException:
            self.backend.stop()
            raise

    def cpuTimes(self) -> tuple[float, float]:
        front, back = sessionCPU(self.pid), sessionCPU(self.backend.pid)
        return front[0] + back[0], front[1] + back[1]

    def frontCPU(self) -> float:
        return sum(sessionCPU(self.pid))

    def memory(self) -> int:
        return sessionMemory(self.pid) + sessionMemory(self.backend.pid)

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self.backend.stop()


class TwistedPeer(Server):
    name = "twisted"
    label = "twisted.mail.pop3"

    def __init__(self, workdir: Path, root: Path, passwd: Path, noDelay: bool = False) -> None:
        super().__init__(workdir, root, passwd)
        self.noDelay = noDelay

    def command(self) -> tuple[list[str], dict[str, str]]:
        command = [
            sys.executable,
            str(BENCH / "peer_twisted.py"),
            "--port",
            str(self.port),
            "--root",
            str(self.root),
            "--passwd",
            str(self.passwd),
            "--logfile",
            str(self.workdir / "twisted-events.log"),
        ]
        if self.noDelay:
            command.append("--nodelay")
        if self.tlsCert is not None:
            command += ["--tls-port", str(self.tlsPort), "--tls-cert", str(self.tlsCert)]
        return command, dict(os.environ)


def dovecotBinary() -> str | None:
    for candidate in (shutil.which("dovecot"), "/usr/sbin/dovecot", "/usr/local/sbin/dovecot"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


class Dovecot(Server):
    """
    Dovecot 2.3 as a POP3 server over the same Maildirs and passwd-file, run
    from a private configuration (base_dir in the work directory): as the
    current user, or as root with its mail processes as nobody (who must own
    the Maildirs: L{mailOwner}, L{chownTree}). Only used when installed.
    """

    name = "dovecot"
    label = "dovecot"

    def command(self) -> tuple[list[str], dict[str, str]]:
        binary = dovecotBinary()
        assert binary is not None
        base = self.workdir / "dovecot-run"
        base.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "dovecot.conf"
        uid, gid = mailOwner()
        if os.getuid() == 0:
            # Dovecot refuses root for mail processes: they run as nobody, who
            # owns the Maildirs (see mailOwner); its own processes as Debian's.
            internal = (
                "default_internal_user = dovecot\n"
                "default_internal_group = dovecot\n"
                "default_login_user = dovenull\n"
            )
        else:
            user = _userName()
            internal = (
                f"default_internal_user = {user}\n"
                f"default_internal_group = {_groupName()}\n"
                f"default_login_user = {user}\n"
            )
        if self.tlsCert is not None:
            ssl = f"ssl = yes\nssl_cert = <{self.tlsCert}\nssl_key = <{self.tlsCert}\n"
            pop3s = (
                "  inet_listener pop3s {\n"
                "    address = 127.0.0.1\n"
                f"    port = {self.tlsPort}\n"
                "    ssl = yes\n"
                "  }\n"
            )
        else:
            ssl, pop3s = "ssl = no\n", ""
        config.write_text(
            f"base_dir = {base}\n"
            f"state_dir = {base}/state\n"
            f"log_path = {self.workdir}/dovecot-events.log\n"
            "protocols = pop3\n"
            "listen = 127.0.0.1\n" + ssl + "disable_plaintext_auth = no\n"
            "auth_mechanisms = plain\n"
            f"first_valid_uid = {min(uid, 500)}\n" + internal + "default_process_limit = 20000\n"
            "default_client_limit = 20000\n"
            "default_vsz_limit = 0\n"
            f"mail_location = maildir:{self.root}/%u/Maildir\n"
            "pop3_uidl_format = %f\n"
            "passdb {\n"
            "  driver = passwd-file\n"
            f"  args = scheme=PLAIN username_format=%u {self.passwd}\n"
            "}\n"
            "userdb {\n"
            "  driver = static\n"
            f"  args = uid={uid} gid={gid} home={self.root}/%u\n"
            "}\n"
            "service pop3-login {\n"
            "  inet_listener pop3 {\n"
            "    address = 127.0.0.1\n"
            f"    port = {self.port}\n"
            "  }\n" + pop3s + "  service_count = 0\n"
            "  client_limit = 20000\n"
            "  chroot =\n"  # a non-root master cannot chroot its login processes
            "}\n"
            "service pop3 {\n"
            "  process_limit = 20000\n"
            "}\n"
            "service anvil {\n"
            "  chroot =\n"
            "  client_limit = 20010\n"  # pop3-login's process_limit + auth's
            "}\n"
        )
        (base / "state").mkdir(exist_ok=True)
        return [binary, "-F", "-c", str(config)], dict(os.environ)


def mailOwner() -> tuple[int, int]:
    """
    The uid and gid Dovecot's mail processes run as, who must own the
    Maildirs: the current user's, or nobody's when running as root.
    """
    if os.getuid() != 0:
        return os.getuid(), os.getgid()
    import pwd

    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


def chownTree(path: Path | str, uid: int, gid: int) -> None:
    """Give C{path} and everything below it to C{uid}:C{gid} (when they differ)."""
    st = os.stat(path)
    if (st.st_uid, st.st_gid) == (uid, gid) and os.path.isfile(path):
        return
    os.chown(path, uid, gid)
    for folder, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(folder, name), uid, gid, follow_symlinks=False)


def _userName() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def _groupName() -> str:
    import grp

    return grp.getgrgid(os.getgid()).gr_name


def stopAll() -> None:
    for server in list(_live):
        try:
            server.stop()
        except Exception as e:  # clean-up must go on
            print(f"warning: stopping {server.label}: {e}", file=sys.stderr)


atexit.register(stopAll)
