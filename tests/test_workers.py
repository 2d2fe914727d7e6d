"""`popserv serve --workers N`: several processes on shared sockets, locks across them."""

from __future__ import annotations

import base64
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from support import REPO, ServerProcess, deliver


def cpu_ticks(pid: int) -> int:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


class Workers:
    def __init__(self, tmp_path, users, count=2, extra=""):
        self.server = ServerProcess(tmp_path, users, extra)  # for its config and maildirs
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "popserv",
                "serve",
                "--workers",
                str(count),
                "--config",
                str(self.server.config),
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.pids: dict[int, int] = {}
        self.port = None
        ready = threading.Event()

        def read():
            for line in self.proc.stdout:
                self.lines.append(line)
                if m := re.match(r"popserv: listen on [\d.]+:(\d+)", line):
                    self.port = int(m.group(1))
                if m := re.match(r"popserv: worker (\d+) started, pid (\d+)", line):
                    self.pids[int(m.group(1))] = int(m.group(2))
                if self.port and sum("POP3Factory starting" in x for x in self.lines) >= count:
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        assert ready.wait(30), "".join(self.lines)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)


@pytest.fixture
def workers(tmp_path):
    users = {f"u{i}": "{PLAIN}pw" for i in range(40)}
    w = Workers(tmp_path, users)
    yield w
    w.stop()


def login(port, user):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    f = s.makefile("rb")
    f.readline()
    s.sendall(f"USER {user}\r\nPASS pw\r\n".encode())
    f.readline()
    return s, f, f.readline()


def test_lock_holds_across_worker_processes(workers):
    """Many simultaneous logins to one maildrop: exactly one wins, whichever worker."""
    results = []
    sockets = []
    threads = [
        threading.Thread(target=lambda: results.append(login(workers.port, "u0")))
        for _ in range(20)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    replies = [reply for _s, _f, reply in results]
    sockets = [s for s, _f, _reply in results]
    assert sum(r.startswith(b"+OK Logged in") for r in replies) == 1, replies
    assert all(r.startswith((b"+OK Logged in", b"-ERR [IN-USE]")) for r in replies), replies
    for s in sockets:
        s.close()


def test_login_delay_holds_across_worker_processes(tmp_path):
    """Whichever worker a client reaches, LOGIN-DELAY counts from its last login anywhere."""
    w = Workers(tmp_path, {"u0": "{PLAIN}pw"}, count=2, extra="login_delay = 600\n")
    try:
        s, f, reply = login(w.port, "u0")
        assert reply.startswith(b"+OK Logged in"), reply
        s.sendall(b"QUIT\r\n")
        assert f.readline().startswith(b"+OK")
        s.close()
        # Twenty fresh connections spread over both workers (SO_REUSEPORT
        # hashes each one's source port): every one is refused.
        replies = []
        for _ in range(20):
            s, _f, reply = login(w.port, "u0")
            replies.append(reply)
            s.close()
        assert all(r.startswith(b"-ERR [LOGIN-DELAY]") for r in replies), replies
    finally:
        w.stop()


def scram_salt(port, user):
    """The salt a server-first SCRAM-SHA-256 message offers C{user}."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        f = s.makefile("rb")
        f.readline()
        first = base64.b64encode(f"n,,n={user},r=clientnonce".encode())
        s.sendall(b"AUTH SCRAM-SHA-256 " + first + b"\r\n")
        challenge = f.readline()
        assert challenge.startswith(b"+ "), challenge
        s.sendall(b"*\r\n")
        f.readline()
        fields = dict(x.split("=", 1) for x in base64.b64decode(challenge[2:]).decode().split(","))
        return fields["s"]


def test_unknown_users_get_one_scram_salt_from_every_worker(workers):
    """
    A salt that changed between connections would tell an unknown user from
    a real one (whose salt is stored): every worker invents the same.
    """
    for user in ("ghost", "u1"):
        salts = {scram_salt(workers.port, user) for _ in range(20)}
        assert len(salts) == 1, (user, salts)


def test_all_workers_serve(workers):
    before = {i: cpu_ticks(pid) for i, pid in workers.pids.items()}
    held = [login(workers.port, f"u{i}") for i in range(40)]
    assert all(reply.startswith(b"+OK Logged in") for _s, _f, reply in held)
    for _ in range(10):  # a little work on every connection
        for s, _f, _reply in held:
            s.sendall(b"STAT\r\nLIST\r\nUIDL\r\n")
        for _s, f, _reply in held:
            f.readline()
            for _ in range(2):
                f.readline()
                while f.readline() != b".\r\n":
                    pass
    for s, _f, _reply in held:
        s.close()
    used = {i: cpu_ticks(pid) - before[i] for i, pid in workers.pids.items()}
    assert all(ticks > 0 for ticks in used.values()), used


def test_a_dead_worker_is_replaced(workers, tmp_path):
    deliver(workers.server.maildir("u1"), b"Subject: x\n\nkept\n")
    victim = workers.pids[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.time() + 20
    while workers.pids[0] == victim:
        assert time.time() < deadline, "".join(workers.lines)
        time.sleep(0.1)
    s, _f, reply = login(workers.port, "u1")
    assert reply == b"+OK Logged in, 1 message (20 octets)\r\n"
    s.close()


def test_sigterm_stops_every_worker(tmp_path):
    w = Workers(tmp_path, {"u": "{PLAIN}pw"})
    pids = list(w.pids.values())
    w.stop()
    assert w.proc.returncode == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_sigterm_while_a_restart_pauses_stops_the_server(tmp_path):
    """
    A worker that dies right after its start is restarted after a pause; a
    SIGTERM in that pause once started a worker that never got the signal,
    and the supervisor waited for it for ever (systemctl stop hung).
    """
    w = Workers(tmp_path, {"u": "{PLAIN}pw"}, count=1)
    try:
        first = w.pids[0]
        os.kill(first, signal.SIGKILL)  # (it ran over a second: restarted at once)
        deadline = time.time() + 10
        while w.pids[0] == first:
            assert time.time() < deadline, "".join(w.lines)
            time.sleep(0.01)
        os.kill(w.pids[0], signal.SIGKILL)  # just started: a pause before the next
        time.sleep(0.5)
        w.proc.send_signal(signal.SIGTERM)  # in the pause
        assert w.proc.wait(15) == 0
    finally:
        if w.proc.poll() is None:
            for pid in w.pids.values():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            w.proc.kill()
            w.proc.wait()


def test_unshareable_listeners_are_refused(tmp_path):
    """A listener kind the supervisor cannot share is refused, with the kinds it can."""
    server = ServerProcess(tmp_path, {"u": "{PLAIN}pw"}, listen="systemd:domain=INET:index=0")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "popserv",
            "serve",
            "--workers",
            "2",
            "--config",
            str(server.config),
        ],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 64, out.stderr
    assert "workers share tcp:, tcp6:, unix: and haproxy: listeners" in out.stderr


def dialogue(sock: socket.socket, *commands: bytes) -> list[bytes]:
    """Send each command after the previous reply; the greeting and every reply line."""
    stream = sock.makefile("rb")
    replies = [stream.readline()]
    for command in commands:
        sock.sendall(command + b"\r\n")
        replies.append(stream.readline())
    return replies


def test_serve_takes_settings_and_shares_unix_and_haproxy(tmp_path):
    """
    serve takes every setting twistd popserv does (here: no configuration file
    at all), and shares Unix and PROXY-protocol listeners among its workers.
    """
    (tmp_path / "passwd").write_text("u:{PLAIN}pw\n")
    deliver(tmp_path / "mail" / "u", b"Subject: x\n\nbody\n")
    sockPath = str(tmp_path / "pop.sock")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "popserv",
            "serve",
            "--workers",
            "2",
            "--passwd",
            str(tmp_path / "passwd"),
            "--mail-location",
            f"maildir:{tmp_path}/mail/%u",
            "--listen",
            f"unix:{sockPath}",
            "--listen",
            "haproxy:tcp:0:interface=127.0.0.1",
            "--auth-penalty",
            "0",
            "--trusted-networks",
            "192.0.2.0/24",
        ],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    ready = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if sum(bool(re.search("POP3Factory.* starting on", x)) for x in lines) >= 4:
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(30), "".join(lines)
        port = int(re.search(r"listen on haproxy:[\d.]+:(\d+)", "".join(lines)).group(1))
        assert os.stat(sockPath).st_mode & 0o777 == 0o666  # as twistd's unix: endpoint makes it
        for _ in range(4):  # whichever worker takes it
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(sockPath)
                replies = dialogue(sock, b"USER u", b"PASS pw", b"STAT", b"QUIT")
            assert replies[0].startswith(b"+OK") and replies[3] == b"+OK 1 20\r\n", replies
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 110\r\n")
                replies = dialogue(sock, b"USER u", b"PASS pw", b"QUIT")
            assert replies[2].startswith(b"+OK"), replies
        # The worker read the header: a client from outside the trusted
        # networks may not send its password in the clear.
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"PROXY TCP4 198.51.100.1 127.0.0.1 40000 110\r\n")
            replies = dialogue(sock, b"USER u", b"QUIT")
        assert b"Plaintext authentication is not allowed" in replies[1], replies
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_workers_metrics_on_one_endpoint(tmp_path):
    """
    The workers' metrics are summed on one shared endpoint: whichever worker
    answers a scrape counts every worker's logins (prometheus-client's
    multiprocess mode), and the files go with the supervisor.
    """

    def metricsDirs() -> set[str]:
        return {d for d in os.listdir(tempfile.gettempdir()) if d.startswith("popserv-metrics-")}

    before = metricsDirs()
    w = Workers(
        tmp_path,
        {"u0": "{PLAIN}pw"},
        count=2,
        extra='metrics = "tcp:0:interface=127.0.0.1"\n',
    )
    try:
        ours = metricsDirs() - before
        assert len(ours) == 1
        port = int(re.search(r"metrics on [\d.]+:(\d+)", "".join(w.lines)).group(1))
        for _ in range(12):  # fresh source ports: spread over both workers
            s, f, reply = login(w.port, "u0")
            assert reply.startswith(b"+OK Logged in"), reply
            s.sendall(b"QUIT\r\n")
            f.readline()
            s.close()
        deadline = time.time() + 10
        while True:
            scrapes = []
            for _ in range(8):
                with socket.create_connection(("127.0.0.1", port), timeout=10) as m:
                    m.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                    scrapes.append(b"".join(iter(lambda m=m: m.recv(65536), b"")).decode())
            counts = [
                re.search(r'popserv_logins_total\{mechanism="USER",result="ok"\} (\S+)', text)
                for text in scrapes
            ]
            if all(c and float(c.group(1)) == 12 for c in counts) or time.time() > deadline:
                break
            time.sleep(0.2)
        assert all(c and float(c.group(1)) == 12 for c in counts), scrapes[0]
    finally:
        w.stop()
    assert not ours & metricsDirs()


def test_unix_listener_path_that_is_no_socket_is_left_alone(tmp_path):
    """A mistyped unix: path naming a file is refused, and the file kept; --workers 0 too."""
    server = ServerProcess(tmp_path, {"u": "{PLAIN}pw"}, listen=f"unix:{tmp_path}/passwd")
    base = [sys.executable, "-m", "popserv", "serve", "--config", str(server.config)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([*base, "--workers", "2"], env=env, capture_output=True, text=True)
    assert out.returncode == 64 and "exists and is not a socket" in out.stderr, out.stderr
    assert (tmp_path / "passwd").read_text() == "u:{PLAIN}pw\n"
    out = subprocess.run([*base, "--workers", "0"], env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "1 or more" in out.stderr, out.stderr
