"""
What an administrator relies on: the logout line, metrics, reload without
restart, graceful shutdown, privilege dropping and JSON logs.
"""

from __future__ import annotations

import json
import os
import poplib
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from popserv.logs import DEFAULT_LOGOUT_FORMAT
from popserv.metrics import Metrics
from popserv.protocol import State
from popserv.testing import connect, memoryServer
from support import REPO, ServerProcess, deliver, startTwistd, twistdCommand


def session_end_events(events):
    return [e for e in events if e.get("log_namespace") == "popserv.session"]


@pytest.fixture
def pop():
    factory, store = memoryServer({"alice": "pw"})
    for i in range(3):
        store.maildrop("alice").deliver(b"Subject: %d\r\n\r\nbody\r\n" % i)
    return factory, store


def test_logout_line_has_every_field(pop):
    factory, _ = pop
    with capturedLogs() as events:
        client = connect(factory)
        client.send(b"USER alice\r\nPASS pw\r\nRETR 1\r\nTOP 2 0\r\nDELE 1\r\nXYZ\r\nQUIT\r\n")
        client.disconnect()
    (event,) = session_end_events(events)
    assert event["user"] == "alice" and event["mechanism"] == "USER"
    assert event["ip"] == "127.0.0.1" and event["tls"] == "no"
    assert event["reason"] == "quit"
    response = b"+OK 20 octets\r\nSubject: 0\r\n\r\nbody\r\n.\r\n"
    assert (event["retr"], event["retr_bytes"]) == (1, len(response))
    assert event["top"] == 1 and event["dele"] == 1 and event["bad_commands"] == 1
    assert (event["removed"], event["left"]) == (1, 2)
    from twisted.logger import formatEvent

    line = formatEvent(event)
    assert re.fullmatch(
        r"session end: user=alice ip=127\.0\.0\.1 tls=no mechanism=USER reason=quit "
        r"duration=\d+\.\d{3}s retr=1/38 top=1/\d+ dele=1 removed=1 left=2 bytes_out=\d+",
        line,
    ), line


@pytest.mark.parametrize(
    "ending,reason",
    [
        (lambda c, f: c.disconnect(), "disconnect"),
        (lambda c, f: (f.clock.advance(600), c.disconnect()), "timeout"),
        (lambda c, f: (c.send(b"X\r\n" * 20), c.disconnect()), "limit"),
    ],
)
def test_logout_reasons(pop, ending, reason):
    factory, _ = pop
    with capturedLogs() as events:
        client = connect(factory)
        client.send(b"USER alice\r\nPASS pw\r\nDELE 1\r\n")
        ending(client, factory)
    (event,) = session_end_events(events)
    assert event["reason"] == reason and event["removed"] == 0 and event["left"] == 3


def test_custom_logout_format_and_no_secrets(pop):
    factory, _ = pop
    factory.logoutFormat = "bye {user} from {ip} after {commands} commands"
    with capturedLogs() as events:
        client = connect(factory)
        client.send(b"USER alice\r\nPASS pw\r\nAUTH PLAIN\r\nQUIT\r\n")
        client.disconnect()
    from twisted.logger import formatEvent

    texts = [formatEvent(e) for e in events]
    assert "bye alice from 127.0.0.1 after 4 commands" in texts
    assert not any("pw" in repr(e.get("password", "")) for e in events)
    assert DEFAULT_LOGOUT_FORMAT != factory.logoutFormat


def test_metrics_count_sessions_logins_and_bytes():
    metrics = Metrics()
    factory, store = memoryServer({"alice": "pw"}, metrics=metrics)
    store.maildrop("alice").deliver(b"x\r\n")
    for password in (b"pw", b"wrong"):
        client = connect(factory)
        client.send(b"USER alice\r\nPASS " + password + b"\r\nRETR 1\r\nQUIT\r\n")
        client.disconnect()
    sample = metrics.registry.get_sample_value
    assert sample("popserv_logins_total", {"result": "ok", "mechanism": "USER"}) == 1
    assert sample("popserv_logins_total", {"result": "failed", "mechanism": "USER"}) == 1
    assert sample("popserv_connections_total", {"tls": "no"}) == 2
    assert sample("popserv_connections_open") == 0
    assert sample("popserv_sent_bytes_total", {"command": "RETR"}) == len(
        b"+OK 3 octets\r\nx\r\n.\r\n"
    )
    assert sample("popserv_commands_total", {"command": "RETR"}) == 2


def test_lock_conflicts_are_counted():
    metrics = Metrics()
    factory, _ = memoryServer({"alice": "pw"}, metrics=metrics)
    first = connect(factory)
    first.send(b"USER alice\r\nPASS pw\r\n")
    second = connect(factory)
    second.send(b"USER alice\r\nPASS pw\r\n")
    assert metrics.registry.get_sample_value("popserv_lock_conflicts_total") == 1


def test_drain_waits_for_sessions_then_ends_them_but_never_mid_update():
    clock = Clock()
    gate = []

    from popserv.backends.memory import MemoryMailbox

    class SlowRemoval(MemoryMailbox):
        def removeMessages(self, infos):
            from twisted.internet.defer import Deferred

            d = Deferred()
            gate.append((d, infos))
            return d

    factory, store = memoryServer({"alice": "pw", "bob": "pw"}, clock=clock)
    store.maildrop("bob").deliver(b"y\r\n")
    idle = connect(factory)
    idle.send(b"USER alice\r\nPASS pw\r\n")
    updating = connect(factory)
    updating.send(b"USER bob\r\nPASS pw\r\nDELE 1\r\n")
    updating.protocol.transaction.mailbox.__class__ = SlowRemoval
    updating.send(b"QUIT\r\n")
    assert updating.protocol.state is State.UPDATE
    drained = factory.drain(5)
    clock.advance(4)
    assert not idle.transport.disconnecting and not drained.called
    clock.advance(1)
    assert idle.lines()[-1] == b"-ERR [SYS/TEMP] Server shutting down"
    assert idle.transport.disconnecting and not updating.transport.disconnecting
    idle.disconnect()
    assert not drained.called  # bob's UPDATE is still running
    d, infos = gate.pop()
    store.maildrop("bob").messages.clear()
    d.callback([])
    assert updating.lines()[-1].startswith(b"+OK")
    updating.disconnect()
    assert drained.called


def start_with_extra(tmp_path, extra, grace=2):
    srv = ServerProcess(tmp_path / "srv", {"alice": "{PLAIN}wonderland"}, extra=extra, grace=grace)
    return srv.start()


def test_metrics_endpoint_scraped_over_http(tmp_path):
    srv = start_with_extra(tmp_path, 'metrics = "tcp:0:interface=127.0.0.1"\n')
    try:
        deadline = time.time() + 10
        while not (m := re.search(r"Site starting on (\d+)", srv.log)):
            assert time.time() < deadline, srv.log
            time.sleep(0.05)
        deliver(srv.maildir("alice"), b"Subject: m\n\nbody\n")
        for _ in range(2):
            pop = poplib.POP3("127.0.0.1", srv.port, timeout=10)
            pop.user("alice")
            pop.pass_("wonderland")
            pop.retr(1)
            pop.quit()
        url = f"http://127.0.0.1:{m.group(1)}/metrics"
        for _ in range(50):  # the logout accounting follows the connection's close
            text = urllib.request.urlopen(url, timeout=10).read().decode()
            if "popserv_sessions" in text or "quit" in text:
                break
            time.sleep(0.05)
        assert 'popserv_logins_total{mechanism="USER",result="ok"} 2.0' in text
        assert 'popserv_commands_total{command="RETR"} 2.0' in text
        assert re.search(r'popserv_session_duration_seconds_count\{reason="quit"\} 2\.0', text)
        assert re.search(r'popserv_backend_seconds_count\{operation="list"\} 2\.0', text)
        assert "popserv_sent_bytes_total" in text
    finally:
        srv.stop()


def test_passwd_file_reload_without_restart(tmp_path):
    srv = start_with_extra(tmp_path, "")
    try:
        pop = poplib.POP3("127.0.0.1", srv.port, timeout=10)
        pop.user("carol")
        with pytest.raises(poplib.error_proto):
            pop.pass_("new")
        with open(srv.root / "passwd", "a") as f:
            f.write("carol:{PLAIN}new\n")
        pop.user("carol")
        pop.pass_("new")
        pop.quit()
    finally:
        srv.stop()


def test_sigterm_lets_an_open_session_finish_its_quit(tmp_path):
    """Graceful shutdown: no new connections, the open session completes DELE+QUIT."""
    srv = start_with_extra(tmp_path, "", grace=20)
    deliver(srv.maildir("alice"), b"a\n", name="1.A.h")
    deliver(srv.maildir("alice"), b"b\n", name="2.B.h")
    pop = poplib.POP3("127.0.0.1", srv.port, timeout=10)
    pop.user("alice")
    pop.pass_("wonderland")
    pop.dele(1)
    srv.proc.send_signal(signal.SIGTERM)
    deadline = time.time() + 10
    while True:  # wait until the listener is closed
        try:
            socket.create_connection(("127.0.0.1", srv.port), timeout=1).close()
        except OSError:
            break
        assert time.time() < deadline
        time.sleep(0.05)
    assert srv.proc.poll() is None  # still serving the open session
    pop.noop()
    pop.quit()
    srv.proc.wait(15)
    assert sorted(os.listdir(srv.maildir("alice") / "new")) == ["2.B.h"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to bind a low port and drop to nobody")
def test_bind_low_port_as_root_then_run_as_nobody():
    port = next(p for p in range(900, 1000) if _free(p))
    # pytest's tmp_path is private to root: nobody could not even reach it
    home = tempfile.mkdtemp(prefix="popserv-nobody-")
    os.chmod(home, 0o755)
    srv = ServerProcess(
        Path(home) / "srv",
        {"alice": "{PLAIN}wonderland"},
        listen=f"tcp:{port}:interface=127.0.0.1",
    )
    deliver(srv.maildir("alice"), b"Subject: x\n\nhi\n")
    for root, dirs, files in os.walk(srv.root):
        for name in (*dirs, *files):
            os.chown(os.path.join(root, name), 65534, 65534)
    os.chown(srv.root, 65534, 65534)
    proc = startTwistd(
        ["--uid", "65534", "--gid", "65534", "popserv", "--config", str(srv.config)], srv.root
    )
    try:
        for line in proc.stdout:
            if f"starting on {port}" in line:
                break
        deadline = time.time() + 10  # twistd switches user right after binding
        while not re.search(
            r"^Uid:\s+65534\s+65534\s+65534",
            status := open(f"/proc/{proc.pid}/status").read(),
            re.M,
        ):
            assert time.time() < deadline, status
            time.sleep(0.05)
        assert re.search(r"^Gid:\s+65534\s+65534\s+65534", status, re.M), status
        pop = poplib.POP3("127.0.0.1", port, timeout=10)
        pop.user("alice")
        pop.pass_("wonderland")
        assert pop.stat()[0] == 1
        pop.quit()
    finally:
        proc.terminate()
        proc.wait(15)
        shutil.rmtree(home)


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _jsonLogout(line):
    event = json.loads(line.lstrip("\x1e"))  # every line is one JSON record (RFC 7464)
    if event.get("log_namespace") == "popserv.session":
        assert event["user"] == "alice" and event["reason"] == "quit"
        return True
    return False


def _textLogout(line):
    if "popserv.session" not in line:
        return False
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[popserv\.session#info\] "
        r"session end: user=alice ip=127\.0\.0\.1 tls=no .* reason=quit .*\n",
        line,
    ), line
    return True


@pytest.mark.parametrize(
    "logger, logout",
    [("popserv.logs.json", _jsonLogout), ("popserv.logs.text", _textLogout)],
)
def test_twistd_loggers(tmp_path, logger, logout):
    """JSON records for log shippers; Twisted's text lines, cheaper; the logout line in each."""
    srv = ServerProcess(tmp_path / "srv", {"alice": "{PLAIN}wonderland"})
    proc = startTwistd(
        ["--logger", logger, "popserv", "--config", str(srv.config)],
        srv.root,
        logToStdout=False,
    )
    try:
        port = None
        lines = iter(proc.stdout)
        for line in lines:
            logout(line)  # (JSON: every line must parse; text: checked from the logout on)
            if m := re.search(r"POP3Factory starting on (\d+)", line):
                port = int(m.group(1))
                break
        pop = poplib.POP3("127.0.0.1", port, timeout=10)
        pop.user("alice")
        pop.pass_("wonderland")
        pop.quit()
        if not any(logout(line) for line in lines):
            pytest.fail("no logout line")
    finally:
        proc.terminate()
        proc.wait(15)


def _classicEvents():
    """Events of every shape the text observers meet: popserv's logout lines and others."""
    from twisted.logger import LogLevel
    from twisted.python.failure import Failure

    from popserv.logs import SessionStats

    stats = SessionStats(ip="192.0.2.7", user="b{r}ace", reason="quit")
    fields = stats.fields()
    with capturedLogs() as events:
        stats.log(DEFAULT_LOGOUT_FORMAT)
        stats.log("two\nlines for {user}")
        stats.log("{user}")
    failure = Failure(ZeroDivisionError("division by zero"))
    t = 1_733_400_000.25
    base = {"log_time": t, "log_namespace": "popserv.session", "log_level": LogLevel.info}
    return [
        *events,
        {**events[0], "log_time": t + 0.5},  # the same second, cached
        {**events[0], "log_time": t + 1.0},  # the next one
        {**events[0], "log_level": LogLevel.warn},
        {**events[0], "log_system": "worker-1"},
        {**events[0], "log_failure": failure},
        {**events[0], "session_line": ""},
        {**base, "log_format": "plain {x}", "x": 1, **fields},
        {**base, "log_format": "no time", "log_time": None},
        # Rounded to the microsecond as datetime does, across a second and 0.
        {**events[0], "log_time": 1_700_000_000.9999996},
        {**events[0], "log_time": 1_700_000_000.9999994},
        {**events[0], "log_time": -1e-07},
        {**events[0], "log_time": -0.5},
        {"log_format": "bare"},
        {**base},  # no format: no line
        {**base, "log_namespace": "other", "log_format": "{a!r}", "a": "q"},
    ]


def test_text_observer_writes_twisted_classic_lines():
    from twisted.logger import formatEventAsClassicLogText

    from popserv.logs import ClassicText

    fast = ClassicText()
    for event in _classicEvents():
        assert fast(event) == formatEventAsClassicLogText(event), event


def test_production_example_configuration_is_valid():
    from popserv.config import loadConfig

    config = loadConfig(REPO / "etc" / "production.conf").validated()
    assert config.listen == ("tcp:110",) and config.listen_tls == ("tcp:995",)
    assert config.mail_location == "maildir:/var/mail/%d/%n/Maildir"


def test_systemd_socket_activation(tmp_path):
    """The systemd unit's way: an inherited listening socket, LISTEN_FDS/LISTEN_PID."""
    srv = ServerProcess(tmp_path / "srv", {"alice": "{PLAIN}wonderland"})
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    fd = listener.fileno()
    env = dict(os.environ, PYTHONPATH=str(REPO), LISTEN_FDS="1", LISTEN_FDNAMES="pop3")
    argv = " ".join(
        [
            *twistdCommand(),
            "-n",
            "--pidfile=",
            "--logfile=-",
            "popserv",
            "--config",
            str(srv.config),
            "--listen",
            "systemd:domain=INET:index=0",
        ]
    )
    # systemd hands sockets over from fd 3 up; subprocess closes unlisted fds after
    # preexec_fn runs, so fd 3 itself must be listed.
    proc = subprocess.Popen(
        ["sh", "-c", f"LISTEN_PID=$$ exec {argv}"],
        env=env,
        cwd=srv.root,
        pass_fds=(3,),
        preexec_fn=lambda: os.dup2(fd, 3),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    listener.close()
    deliver(srv.maildir("alice"), b"Subject: s\n\nsocket\n")
    try:
        pop = poplib.POP3("127.0.0.1", port, timeout=20)
        pop.user("alice")
        pop.pass_("wonderland")
        count = pop.stat()[0]
        pop.quit()
    except OSError as e:
        count = e
    proc.terminate()
    out = proc.communicate(timeout=15)[0]
    assert count == 1, out
