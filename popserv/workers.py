"""
Several worker processes on one machine's cores, sharing the listening
sockets: C{popserv serve --workers N [--config FILE] [any twistd popserv option]}.

The supervisor (this module, no reactor) binds every listener of the
configuration: a TCP listener one socket per worker with C{SO_REUSEPORT}, so
that the kernel spreads connections evenly; a Unix socket once, shared. A
C{haproxy:} listener is bound the same way and each worker reads the PROXY
header itself. Then it starts N ordinary C{twistd popserv} workers that adopt
their sockets the way systemd socket activation hands them over
(C{LISTEN_FDS}; the workers listen on C{systemd:} endpoints) and take every
other setting from the same configuration file and options. The supervisor
keeps every socket open, so a worker's queue survives its restart. Maildrop
locks are kernel locks, so they hold across processes; a worker that dies is
started again; SIGTERM and SIGHUP are passed on to every worker.

What is shared through the mail storage: LOGIN-DELAY (the maildrop keeps the
last login) and the key of SCRAM's made-up salts. Metrics are shared through
files in a directory of the supervisor's (prometheus-client's multiprocess
mode): the metrics listener is shared like the others, and whichever worker
answers serves every worker's sums. What is per process: the failed-login
penalty and connection limits (each worker applies the configured ones).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from popserv.config import Config
from popserv.metrics import MULTIPROCESS_DIR

__all__ = ["Listener", "bindListeners", "Supervisor", "workerArgv"]

_TCP = re.compile(r"^(tcp6?):(\d+)((?::[a-zA-Z]+=[^:]*)*)$")
_UNIX = re.compile(r"^unix:(?:address=)?([^:]+)((?::[a-zA-Z]+=[^:]*)*)$")

#: A worker that dies sooner than this after its start is restarted only
#: after a pause, so a broken configuration does not spin.
_RESTART_PAUSE = 1.0


@dataclass
class Listener:
    """One bound listening socket and where it goes in the worker's options."""

    option: str  # "--listen" or "--listen-tls"
    sock: socket.socket
    family: str  # "INET", "INET6" or "UNIX"
    prefix: str = ""  # "haproxy:" for a PROXY-protocol listener

    def endpoint(self, index: int) -> str:
        """The worker's endpoint for this socket, the C{index}-th it is handed."""
        return f"{self.prefix}systemd:domain={self.family}:index={index}"


def _parseTCP(description: str) -> tuple[int, int, str, int]:
    m = _TCP.match(description)
    if m is None:
        raise ValueError(
            f"{description!r}: workers share tcp:, tcp6:, unix: and haproxy: listeners "
            "(for TLS use --listen-tls with tcp:; for others, systemd socket activation)"
        )
    family = socket.AF_INET6 if m.group(1) == "tcp6" else socket.AF_INET
    options = dict(part.split("=", 1) for part in m.group(3).split(":")[1:])
    interface = options.get("interface", "::" if family == socket.AF_INET6 else "0.0.0.0")
    return family, int(m.group(2)), interface, int(options.get("backlog", "128"))


def _bindTCP(description: str, workers: int) -> list[socket.socket]:
    family, port, interface, backlog = _parseTCP(description)
    sockets = []
    for _ in range(workers):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((interface, port))
        sock.listen(backlog)
        port = sock.getsockname()[1]  # port 0: the others join the one chosen
        sockets.append(sock)
    return sockets


def _bindUnix(path: str, options: dict[str, str]) -> socket.socket:
    """
    A Unix socket at C{path}, with the C{mode} (octal, as Twisted's C{unix:}
    endpoint takes it; default 0666) and C{backlog} given. A stale socket
    (nobody accepting) is replaced; anything else there is left alone.
    """
    unknown = set(options) - {"mode", "backlog"}
    if unknown:
        raise ValueError(f"unix:{path}: workers take mode= and backlog= only, not {unknown}")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(f"{path}: exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
        else:
            raise OSError(f"{path}: another server is listening there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, int(options.get("mode", "666"), 8))
    sock.listen(int(options.get("backlog", "128")))
    return sock


def bindListeners(config: Config, workers: int) -> list[list[Listener]]:
    """Bind every listener of C{config}: for each worker, its sockets in order."""
    perWorker: list[list[Listener]] = [[] for _ in range(workers)]
    metrics = (config.metrics,) if config.metrics else ()
    for option, descriptions in (
        ("--listen", config.listen),
        ("--listen-tls", config.listen_tls),
        ("--metrics", metrics),
        ("--lmtp", config.lmtp),
    ):
        for description in descriptions:
            prefix = ""
            if description.startswith("haproxy:") and option != "--metrics":
                prefix, description = "haproxy:", description.removeprefix("haproxy:")
            unix = _UNIX.match(description)
            if unix:
                options = dict(part.split("=", 1) for part in unix.group(2).split(":")[1:])
                sock = _bindUnix(unix.group(1), options)
                sockets, family, where = [sock] * workers, "UNIX", unix.group(1)
            else:
                sockets = _bindTCP(description, workers)
                family = "INET6" if sockets[0].family == socket.AF_INET6 else "INET"
                host, port = sockets[0].getsockname()[:2]
                where = f"{host}:{port}"
            for listeners, sock in zip(perWorker, sockets, strict=True):
                sock.set_inheritable(True)
                listeners.append(Listener(option, sock, family, prefix))
            print(f"popserv: {option[2:]} on {prefix}{where}", flush=True)
    return perWorker


#: Settings the supervisor turns into each worker's own.
_PER_WORKER = ("listen", "listen_tls", "metrics", "lmtp")


def workerArgv(
    configPath: str | None,
    listeners: Sequence[Listener],
    index: int,
    config: Config,
    given: Mapping[str, object] | None = None,
) -> list[str]:
    """
    The twistd command line of worker C{index}: the configuration file and
    the settings given to C{serve}, with its own sockets.
    """
    from popserv.tap import commandLine

    argv = [
        sys.executable,
        "-c",
        "from twisted.scripts.twistd import run; run()",
        "--nodaemon",
        "--pidfile=",
        # Twisted's text lines on standard output, made cheaper (a line a session).
        "--logger",
        "popserv.logs.text",
        "popserv",
    ]
    if configPath:
        argv += ["--config", configPath]
    argv += commandLine({k: v for k, v in (given or {}).items() if k not in _PER_WORKER})
    for i, listener in enumerate(listeners):
        argv += [listener.option, listener.endpoint(i)]
    return argv


def _execWorker(fds: list[int], argv: list[str]) -> None:
    """In the child: put the sockets at fd 3, 4, ... and announce them, as systemd does."""
    # Out of the way first, so that moving one never overwrites another.
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 1000) for fd in fds]
    for target, fd in enumerate(high, 3):
        os.dup2(fd, target)
        os.close(fd)
    os.environ["LISTEN_FDS"] = str(len(fds))
    os.environ["LISTEN_FDNAMES"] = ":".join("pop3" for _ in fds)
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.execv(argv[0], argv)


class Supervisor:
    """Start, watch and stop the workers."""

    def __init__(
        self,
        configPath: str | None,
        config: Config,
        workers: int,
        given: Mapping[str, object] | None = None,
    ) -> None:
        self.configPath = os.path.abspath(configPath) if configPath else None
        self.config = config
        self.given = dict(given or {})
        self.count = workers
        self.listeners = bindListeners(config, workers)
        self.workers: dict[int, tuple[subprocess.Popen[bytes], float]] = {}
        self.stopping = False
        #: Where the workers keep their metrics, if the server has metrics.
        self.metricsDir = tempfile.mkdtemp(prefix="popserv-metrics-") if config.metrics else None

    def start(self, index: int) -> None:
        argv = workerArgv(self.configPath, self.listeners[index], index, self.config, self.given)
        fds = [listener.sock.fileno() for listener in self.listeners[index]]
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from popserv.workers import _child; _child()",
                ",".join(map(str, fds)),
                *argv,
            ],
            pass_fds=fds,
            env=self._environment(),
        )
        self.workers[index] = (proc, time.monotonic())
        print(f"popserv: worker {index} started, pid {proc.pid}", flush=True)
        if self.stopping:
            proc.send_signal(signal.SIGTERM)  # (the stop came while it started)

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.metricsDir is not None:
            env[MULTIPROCESS_DIR] = self.metricsDir
        return env

    def _exited(self, pid: int) -> None:
        """A worker is gone: its live gauges (connections open) no longer count."""
        if self.metricsDir is not None:
            os.environ[MULTIPROCESS_DIR] = self.metricsDir
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, self.metricsDir)

    def signal(self, signum: int) -> None:
        for proc, _ in self.workers.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGHUP, lambda *_: self.signal(signal.SIGHUP))
        for index in range(self.count):
            if not self.stopping:
                self.start(index)
        while True:
            if self.stopping:
                for proc, _ in self.workers.values():
                    proc.wait()
                if self.metricsDir is not None:
                    shutil.rmtree(self.metricsDir, ignore_errors=True)
                return 0
            for index, (proc, started) in list(self.workers.items()):
                status = proc.poll()
                if status is None or self.stopping:
                    continue
                print(f"popserv: worker {index} (pid {proc.pid}) exited with {status}", flush=True)
                self._exited(proc.pid)
                if time.monotonic() - started < _RESTART_PAUSE:
                    time.sleep(_RESTART_PAUSE)
                    if self.stopping:
                        break  # (stopped while it paused: nothing to start)
                self.start(index)
            time.sleep(0.2)

    def _stop(self, signum: int, frame: object) -> None:
        self.stopping = True
        self.signal(signal.SIGTERM)


def _child() -> None:
    fds = [int(fd) for fd in sys.argv[1].split(",") if fd]
    _execWorker(fds, sys.argv[2:])
