"""
The test server (popserv.testserver) driven directly: users, mail, UPDATE,
the transcript, TLS, every fault and the strictness settings. The pytest
plugin itself is tested in a separate project (test_pytest_plugin_project.py).
"""

from __future__ import annotations

import os
import poplib
import signal
import socket
import ssl
import tempfile
import time

import pytest

from popserv.testserver import POP3TestServer, TestServerError
from support import REPO


def started(directory=None, pythonpath: str = str(REPO), **kw) -> POP3TestServer:
    """A test server running this checkout's popserv (or what C{pythonpath} holds)."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = pythonpath
    try:
        return POP3TestServer(directory, **kw).start()
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old


@pytest.fixture(scope="module")
def testServer(tmp_path_factory):
    server = started(tmp_path_factory.mktemp("testserver"))
    yield server
    server.stop()


@pytest.fixture
def srv(testServer):
    testServer.reset()
    testServer.add_user("alice", "secret")
    return testServer


class Raw:
    """A socket client that shows exactly what the server sends."""

    def __init__(self, port: int, timeout: float = 5) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def readUntil(self, end: bytes) -> bytes:
        while end not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.buf += chunk
        out, sep, self.buf = self.buf.partition(end)
        return out + sep

    def readAll(self) -> bytes:
        while chunk := self.sock.recv(65536):
            self.buf += chunk
        out, self.buf = self.buf, b""
        return out

    def login(self) -> None:
        self.readUntil(b"\r\n")
        self.send(b"USER alice\r\nPASS secret\r\n")
        self.readUntil(b"\r\n")
        assert self.readUntil(b"\r\n").startswith(b"+OK")


def login(srv, **kw) -> poplib.POP3:
    pop = poplib.POP3(srv.host, srv.port, timeout=kw.get("timeout", 5))
    pop.user("alice")
    pop.pass_("secret")
    return pop


def test_mail_and_update(srv):
    uid = srv.deliver("alice", b"Subject: a\n\nfirst\n")
    srv.deliver("alice", b"Subject: b\r\n\r\nsecond\r\n")
    pop = login(srv)
    assert pop.uidl(1).split()[-1].decode() == uid
    pop.dele(1)
    assert srv.deleted("alice") == []  # not before UPDATE
    pop.quit()
    assert srv.messages("alice") == [b"Subject: b\r\n\r\nsecond\r\n"]
    assert srv.deleted("alice") == [b"Subject: a\n\nfirst\n"]


def test_big_messages_travel_the_control_channel_whole(srv):
    """
    A delivered message goes inline as one long line, and messages() answers
    one: both read piece by piece, with several requests to a piece as well.
    """
    body = b"".join(b"%07d " % n + b"y" * 990 + b"\r\n" for n in range(12_000))  # 12 MB
    message = b"Subject: big\r\n\r\n" + body
    srv.add_user("alice", "secret")
    srv.deliver("alice", message)
    srv.deliver("alice", b"Subject: small\r\n\r\nx\r\n")
    assert [m == message for m in srv.messages("alice")] == [True, False]
    pop = poplib.POP3(srv.host, srv.port, timeout=30)
    pop.user("alice")
    pop.pass_("secret")
    assert b"\r\n".join(pop.retr(1)[1]) + b"\r\n" == message
    pop.quit()


def test_a_server_in_a_directory_not_made_yet(tmp_path):
    with POP3TestServer(tmp_path / "pop3" / "here") as server:
        assert server.running and (tmp_path / "pop3" / "here" / "server.log").exists()


def test_no_update_without_quit(srv):
    srv.deliver("alice", b"Subject: a\r\n\r\nx\r\n")
    pop = login(srv)
    pop.dele(1)
    pop.close()
    time.sleep(0.1)
    assert len(srv.messages("alice")) == 1 and srv.deleted("alice") == []


def test_reset_forgets_everything(srv):
    srv.deliver("alice", b"Subject: a\r\n\r\nx\r\n")
    srv.fail("STAT")
    srv.reset()
    assert srv.messages("alice") == [] and srv.transcript() == []
    with pytest.raises(poplib.error_proto, match="-ERR"):
        login(srv)  # no such user any more


def test_transcript_masks_secrets(srv):
    pop = login(srv)
    pop.quit()
    pop = poplib.POP3(srv.host, srv.port, timeout=5)
    pop.apop("alice", "secret")
    pop.quit()
    raw = Raw(srv.port)
    raw.readUntil(b"\r\n")
    raw.send(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\nQUIT\r\n")
    raw.readAll()
    text = "\n".join(srv.transcript())
    assert "secret" not in text and "AGFsaWNl" not in text
    assert "C: PASS ***" in text and "C: APOP alice ***" in text and "C: AUTH PLAIN ***" in text
    assert srv.transcript(connection=-1)[0].startswith("S: +OK popserv")


def test_transcript_masks_sasl_continuations(srv):
    raw = Raw(srv.port)
    raw.readUntil(b"\r\n")
    raw.send(b"AUTH PLAIN\r\n")
    raw.readUntil(b"\r\n")
    raw.send(b"AGFsaWNlAHNlY3JldA==\r\n")
    assert raw.readUntil(b"\r\n").startswith(b"+OK")
    assert srv.transcript()[-2:] == ["C: ***", srv.transcript()[-1]]


@pytest.mark.parametrize("code", ["IN-USE", "LOGIN-DELAY", "SYS/TEMP", "AUTH", None])
def test_fail_with_or_without_code(srv, code):
    reply = f"-ERR [{code}] injected" if code else "-ERR injected"
    srv.fail("pass", reply)  # keywords are case-insensitive
    with pytest.raises(poplib.error_proto) as e:
        login(srv)
    assert e.value.args[0] == reply.encode()


def test_fail_times(srv):
    srv.fail("STAT", "-ERR [SYS/TEMP] later", times=2)
    pop = login(srv)
    for _ in range(2):
        with pytest.raises(poplib.error_proto):
            pop.stat()
    assert pop.stat() == (0, 0)
    pop.quit()


def test_drop_after(srv):
    srv.deliver("alice", b"Subject: big\r\n\r\n" + b"y" * 10000 + b"\r\n")
    srv.drop_after("RETR", 1000)
    raw = Raw(srv.port)
    raw.login()
    raw.send(b"RETR 1\r\n")
    assert len(raw.readAll()) == 1000


def test_delay(srv):
    srv.delay("NOOP", 0.5)
    pop = login(srv)
    started = time.monotonic()
    pop.noop()
    assert time.monotonic() - started >= 0.45
    pop.quit()


def test_never_answer_a_command(srv):
    srv.never_answer("RETR")
    srv.deliver("alice", b"Subject: a\r\n\r\nx\r\n")
    pop = login(srv, timeout=0.5)
    with pytest.raises(TimeoutError):
        pop.retr(1)


def test_never_answer_at_all(srv):
    srv.never_answer()
    raw = Raw(srv.port, timeout=0.5)
    with pytest.raises(TimeoutError):
        raw.sock.recv(10)


def test_greeting_without_apop_timestamp(srv):
    assert b"<" in poplib.POP3(srv.host, srv.port, timeout=5).getwelcome()
    srv.no_apop_timestamp()
    pop = poplib.POP3(srv.host, srv.port, timeout=5)
    assert b"<" not in pop.getwelcome()
    with pytest.raises(poplib.error_proto):
        pop.apop("alice", "secret")


STUFFED = b"Subject: dots\r\n\r\n.one\r\n..two\r\nend\r\n"


@pytest.mark.parametrize(
    "kind, wire",
    [
        ("no_terminator", b"+OK 35 octets\r\nSubject: dots\r\n\r\n..one\r\n...two\r\nend\r\n"),
        ("bare_lf", b"+OK 35 octets\nSubject: dots\n\n..one\n...two\nend\n.\n"),
        ("unstuffed", b"+OK 35 octets\r\nSubject: dots\r\n\r\n.one\r\n..two\r\nend\r\n.\r\n"),
    ],
)
def test_malformed(srv, kind, wire):
    srv.deliver("alice", STUFFED)
    srv.malformed("RETR", kind)
    raw = Raw(srv.port)
    raw.login()
    raw.send(b"RETR 1\r\n")
    assert raw.readAll() if kind == "no_terminator" else raw.readUntil(wire[-3:]) == wire
    if kind == "no_terminator":
        assert raw.buf == b""


def test_malformed_listing_and_untouched_single_line(srv):
    srv.deliver("alice", STUFFED)
    srv.malformed("LIST", "bare_lf")
    raw = Raw(srv.port)
    raw.login()
    raw.send(b"LIST 1\r\nLIST\r\n")
    assert raw.readUntil(b"\r\n") == b"+OK 1 35\r\n"  # one line: left alone
    listing = raw.readUntil(b"\n.\n")
    assert listing.startswith(b"+OK 1 ") and listing.endswith(b"\n1 35\n.\n")
    assert b"\r" not in listing


def test_strictness(srv):
    raw = Raw(srv.port)
    raw.readUntil(b"\r\n")
    raw.send(b"NOOP\n" + b"USER " + b"a" * 300 + b"\r\n")
    assert raw.readUntil(b"\r\n").startswith(b"-ERR")  # NOOP before login: not valid
    assert b"too long" in raw.readUntil(b"\r\n")
    srv.strictness(bare_lf=False, max_line=1000)
    raw = Raw(srv.port)
    raw.readUntil(b"\r\n")
    raw.send(b"CAPA\n" + b"USER " + b"a" * 300 + b"\r\n")
    assert b"CRLF" in raw.readUntil(b"\r\n")
    assert raw.readUntil(b"\r\n").startswith(b"+OK")
    with pytest.raises(TestServerError, match="255"):
        srv.strictness(max_line=100)


def test_bad_requests_are_refused(srv):
    with pytest.raises(TestServerError, match="kind must be one of"):
        srv.malformed("RETR", "garbled")
    with pytest.raises(TestServerError, match="keyword"):
        srv.fail("RETR 1")


def test_tls(srv):
    cafile = srv.enable_tls()
    context = ssl.create_default_context(cafile=cafile)
    pop = poplib.POP3_SSL("127.0.0.1", srv.tls_port, context=context, timeout=5)
    pop.user("alice")
    pop.pass_("secret")
    pop.quit()
    pop = poplib.POP3("localhost", srv.port, timeout=5)
    pop.stls(context)
    pop.user("alice")
    pop.pass_("secret")
    pop.quit()
    with pytest.raises(ssl.SSLCertVerificationError):
        poplib.POP3_SSL("127.0.0.1", srv.tls_port, context=ssl.create_default_context(), timeout=5)
    srv.reset()
    assert srv.tls_port is None


def test_reset_cost(srv):
    """The function-scoped fixture's price: one reset of the warm server."""
    started = time.monotonic()
    for _ in range(20):
        srv.reset()
    assert (time.monotonic() - started) / 20 < 0.25


def test_transcript_connections_numbered_from_1_after_reset(srv):
    login(srv).quit()
    srv.reset()
    srv.add_user("alice", "secret")
    login(srv).quit()
    assert srv.transcript(connection=1)[0].startswith("S: +OK popserv")
    assert srv.transcript(connection=1) == srv.transcript()


def test_a_late_answer_is_not_taken_for_the_next_one(srv):
    """A request that timed out leaves the channel in step: its answer is skipped."""
    srv.deliver("alice", b"Subject: a\r\n\r\nx\r\n")
    os.kill(srv.pid, signal.SIGSTOP)
    srv.timeout = 0.3
    try:
        with pytest.raises(TestServerError, match="transcript: no answer in 0.3s"):
            srv.transcript()
    finally:
        os.kill(srv.pid, signal.SIGCONT)
        srv.timeout = 30
    assert srv.messages("alice") == [b"Subject: a\r\n\r\nx\r\n"]
    assert srv.deleted("alice") == []


def test_bad_arguments_are_refused_clearly(srv):
    with pytest.raises(TestServerError, match="fail: ValueError: a reply is one line"):
        srv.fail("RETR", "-ERR one\r\n+OK two")
    with pytest.raises(TestServerError, match="add_user: TypeError: a user name"):
        srv.add_user(None, "pw")
    with pytest.raises(TestServerError, match="drop_after: ValueError: octets: a number"):
        srv.drop_after("RETR", "100")
    with pytest.raises(TestServerError, match="delay: ValueError: seconds: a number"):
        srv.delay("RETR", "1")
    with pytest.raises(TypeError, match="bytes, str or an email.message.Message"):
        srv.deliver("alice", 42)
    assert srv.transcript() == []  # and the server is fine


def test_a_server_that_cannot_start_says_why_and_leaves_nothing(tmp_path, monkeypatch):
    broken = tmp_path / "broken" / "twisted"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('no Twisted here')\n")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where its own dir goes
    with pytest.raises(TestServerError, match="(?s)did not start.*exit status 1.*no Twisted here"):
        started(pythonpath=f"{broken.parent}{os.pathsep}{REPO}", timeout=10)
    assert os.listdir(tmp_path / "tmp") == []  # its directory removed, its process reaped


def test_a_server_that_died_says_so(tmp_path):
    server = started(tmp_path)
    pid = server.pid
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(TestServerError, match="exit status -9"):
        server.add_user("alice", "secret")
    server.stop()
    assert server.pid is None


def test_a_stuck_server_is_killed_at_stop(tmp_path):
    server = started(tmp_path)
    pid = server.pid
    os.kill(pid, signal.SIGSTOP)
    started_at = time.monotonic()
    server.stop()
    assert time.monotonic() - started_at < 10
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone, and reaped


GUIDE = REPO / "docs" / "guide" / "testing.rst"
FAULTS = ("fail", "drop_after", "delay", "never_answer", "malformed", "no_apop_timestamp")


def test_the_guide_matches_the_api():
    """Every public name documented, each signature as written, each fault with an example."""
    import inspect
    import re

    text = GUIDE.read_text()
    public = {n for n in dir(POP3TestServer) if not n.startswith("_")} - {"start", "stop"}
    public |= {"host", "port", "tls_port", "cafile", "directory"}
    assert [n for n in sorted(public) if f"pop3_server.{n}" not in text] == []
    documented = re.findall(r"``pop3_server\.(\w+)\(([^`]*)\)``", text)
    assert len(documented) >= 12
    for name, params in documented:
        signature = inspect.signature(getattr(POP3TestServer, name))
        expected = [
            p.name if p.default is p.empty else f"{p.name}={p.default!r}".replace("'", '"')
            for p in list(signature.parameters.values())[1:]
        ]
        assert [p.strip() for p in params.split(",") if p.strip()] == expected, name
    for name in (*FAULTS, "strictness"):
        assert re.search(rf"^ {{4,}}pop3_server\.{name}\(", text, re.M), f"no example of {name}"
