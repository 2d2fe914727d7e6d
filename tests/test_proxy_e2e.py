"""
The proxy mode end to end: a popserv process in front (the proxy) relaying to
popserv backends, over real sockets: both login modes, TLS to the backend,
PROXY v2, dead and silent backends, refusals passed through, a client that
disconnects in the middle of a RETR. (The Dovecot backend and real clients
are in test_proxy_dovecot.py.)
"""

from __future__ import annotations

import poplib
import socket
import time
from pathlib import Path

import pytest

from tests.support import ServerProcess, deliver, makeTestPKI

MESSAGE = b"Subject: hello\r\n\r\nrelayed body\r\n"


def _backend(tmp: Path, extra: str = "", **kwargs: object) -> ServerProcess:
    server = ServerProcess(
        tmp,
        {"alice": "{PLAIN}secret", "bob": "{PLAIN}bobpw", "master": "{PLAIN}masterpw"},
        extra='master_users = ["master"]\n' + extra,
        **kwargs,
    )
    deliver(server.maildir("alice"), MESSAGE)
    return server.start()


def _proxy(tmp: Path, users: dict[str, str], extra: str = "") -> ServerProcess:
    return ServerProcess(tmp, users, extra=extra).start()


def _masterProxy(
    tmp: Path, users: dict[str, str], backendURL: str, password: str
) -> ServerProcess:
    """A proxy that logs in to C{backendURL} as the master user C{master}."""
    (tmp / "master.pw").write_text(password + "\n")
    return _proxy(
        tmp / "proxy",
        users,
        extra=(
            f'proxy_backend = ["{backendURL}"]\n'
            'proxy_master_user = "master"\n'
            f'proxy_master_password_file = "{tmp / "master.pw"}"\n'
        ),
    )


@pytest.fixture
def backend(tmp_path):
    server = _backend(tmp_path / "backend")
    yield server
    server.stop()


def _client(server: ServerProcess, source: str | None = None) -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", server.port, timeout=30)
    if source is not None:  # come from another loopback address
        client.sock.close()
        client.sock = socket.create_connection(
            ("127.0.0.1", server.port), 30, source_address=(source, 0)
        )
        client.file = client.sock.makefile("rb")
        client.welcome = client._getresp()
    return client


def test_forwarded_password_relays_a_whole_session(tmp_path, backend):
    """
    USER/PASS at the front is checked there and forwarded: the client gets
    the backend's +OK, STAT/RETR/DELE/QUIT go through, and the backend applies
    the DELE at QUIT; both logout lines are written, the front's naming the backend.
    """
    proxy = _proxy(
        tmp_path / "proxy",
        {"alice": f"{{PLAIN}}secret:::::: proxy=y host=127.0.0.1 port={backend.port}"},
    )
    try:
        client = _client(proxy)
        client.user("alice")
        answer = client.pass_("secret")
        assert answer.startswith(b"+OK Logged in")
        assert client.stat() == (1, len(MESSAGE))
        assert b"\r\n".join(client.retr(1)[1]) + b"\r\n" == MESSAGE
        client.dele(1)
        client.quit()
        proxy.waitForLog(f"backend=127.0.0.1:{backend.port}")
        backend.waitForLog("removed=1")
        assert not list((backend.maildir("alice") / "cur").iterdir())
        assert "user=alice" in proxy.log
    finally:
        proxy.stop()


def test_master_user_login_keeps_other_mechanisms_usable(tmp_path, backend):
    """With a master user, the proxy logs in with SASL PLAIN as master for alice."""
    proxy = _masterProxy(
        tmp_path,
        {"alice": "{PLAIN}frontpw"},
        f"pop://;AUTH=*@127.0.0.1:{backend.port}",
        "masterpw",
    )
    try:
        client = _client(proxy)
        client.apop("alice", "frontpw")  # a mechanism that gives no password to forward
        assert client.stat() == (1, len(MESSAGE))
        client.quit()
    finally:
        proxy.stop()


def test_master_user_refused_is_a_temporary_failure(tmp_path, backend):
    proxy = _masterProxy(
        tmp_path, {"alice": "{PLAIN}secret"}, f"pop://127.0.0.1:{backend.port}", "wrong"
    )
    try:
        client = _client(proxy)
        client.user("alice")
        with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
            client.pass_("secret")
    finally:
        proxy.stop()


def test_refusal_codes_pass_through(tmp_path, backend):
    """The backend's [IN-USE] reaches the client as it is; a wrong forwarded password is [AUTH]."""
    proxy = _proxy(
        tmp_path / "proxy",
        {
            "alice": f"{{PLAIN}}secret:::::: proxy=y host=127.0.0.1 port={backend.port}",
            "bob": f"{{PLAIN}}notbobs:::::: proxy=y host=127.0.0.1 port={backend.port}",
        },
    )
    try:
        holder = _client(backend)
        holder.user("alice")
        holder.pass_("secret")
        client = _client(proxy)
        client.user("alice")
        with pytest.raises(poplib.error_proto, match=r"-ERR \[IN-USE\]"):
            client.pass_("secret")
        holder.quit()
        client.user("bob")
        with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\]"):
            client.pass_("notbobs")
    finally:
        proxy.stop()


def test_dead_backend_fails_over_then_sys_temp(tmp_path, backend):
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    deadPort = dead.getsockname()[1]
    dead.close()  # nothing listens there
    proxy = _proxy(
        tmp_path / "proxy",
        {
            "alice": "{PLAIN}secret",
            "carol": "{PLAIN}c:::::: proxy=y host=127.0.0.1 port=" + str(deadPort),
        },
        extra=(
            f'proxy_backend = ["pop://127.0.0.1:{deadPort}", "pop://127.0.0.1:{backend.port}"]\n'
        ),
    )
    try:
        client = _client(proxy)
        client.user("alice")
        client.pass_("secret")
        assert client.stat()[0] == 1
        client.quit()
        client = _client(proxy)
        client.user("carol")
        with pytest.raises(poplib.error_proto, match=r"-ERR \[SYS/TEMP\]"):
            client.pass_("c")
    finally:
        proxy.stop()


def test_silent_backend_times_out_and_the_next_is_tried(tmp_path, backend):
    """A backend that accepts TCP and never answers costs its share of proxy_timeout."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel completes handshakes; nobody ever answers
    port = silent.getsockname()[1]
    proxy = _proxy(
        tmp_path / "proxy",
        {
            "alice": "{PLAIN}secret",
            "carol": f"{{PLAIN}}c:::::: proxy=y host=127.0.0.1 port={port} proxy_timeout=2",
        },
        extra=(
            f'proxy_backend = ["pop://127.0.0.1:{port}", "pop://127.0.0.1:{backend.port}"]\n'
            "proxy_timeout = 4\n"
        ),
    )
    try:
        client = _client(proxy)
        client.user("alice")
        started = time.monotonic()
        client.pass_("secret")
        assert 1.5 < time.monotonic() - started < 4
        client.quit()
        client = _client(proxy)
        client.user("carol")
        started = time.monotonic()
        with pytest.raises(poplib.error_proto, match=r"-ERR \[SYS/TEMP\]"):
            client.pass_("c")
        assert 1.5 < time.monotonic() - started < 3.5
    finally:
        proxy.stop()
        silent.close()


def test_tls_to_the_backend_and_proxy_v2(tmp_path):
    """STLS and implicit TLS to a backend verified against --proxy-ca; a PROXY v2 header
    gives the backend the client's address (127.0.0.2 here, the proxy's being 127.0.0.1)."""
    pki = makeTestPKI(tmp_path / "pki")
    backend = _backend(
        tmp_path / "backend",
        extra=(
            f'tls_cert = "{pki["cert"]}"\ntls_key = "{pki["key"]}"\n'
            'haproxy_trusted_networks = ["127.0.0.1/32"]\n'
        ),
        listen="haproxy:tcp:0:interface=127.0.0.1",
        listenTLS="haproxy:tcp:0:interface=127.0.0.1",
    )
    proxy = _proxy(
        tmp_path / "proxy",
        {
            "alice": "{PLAIN}secret:::::: proxy=y host=localhost starttls=y "
            f"port={backend.port}",
            "bob": f"{{PLAIN}}bobpw:::::: proxy=y host=localhost ssl=y port={backend.tlsPort}",
        },
        extra=f'proxy_ca = "{pki["ca"]}"\nproxy_send_proxy = true\n',
    )
    try:
        for user, password in (("alice", "secret"), ("bob", "bobpw")):
            client = _client(proxy, source="127.0.0.2")
            client.user(user)
            client.pass_(password)
            client.stat()
            client.quit()
            proxy.waitForLog(f"user={user} ")
            line = backend.waitForLog(f"user={user} ip=127.0.0.2 tls=yes")
            assert line
    finally:
        proxy.stop()
        backend.stop()


def test_unverified_backend_certificate_is_refused(tmp_path):
    pki = makeTestPKI(tmp_path / "pki")
    other = makeTestPKI(tmp_path / "other")
    backend = _backend(
        tmp_path / "backend",
        extra=f'tls_cert = "{pki["cert"]}"\ntls_key = "{pki["key"]}"\n',
    )
    proxy = _proxy(
        tmp_path / "proxy",
        {"alice": f"{{PLAIN}}secret:::::: proxy=y host=localhost starttls=y port={backend.port}"},
        extra=f'proxy_ca = "{other["ca"]}"\nproxy_timeout = 5\n',
    )
    try:
        client = _client(proxy)
        client.user("alice")
        with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
            client.pass_("secret")
    finally:
        proxy.stop()
        backend.stop()


def test_client_gone_mid_retr_closes_the_backend_session(tmp_path):
    """
    A client that disconnects in the middle of a big RETR: the backend session
    ends without UPDATE (nothing removed), the maildrop is unlocked at once,
    and the proxy never held the message whole.
    """
    backend = _backend(tmp_path / "backend")
    big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 30_000  # ~30 MB
    deliver(backend.maildir("bob"), big)
    deliver(backend.maildir("bob"), MESSAGE)
    proxy = _proxy(
        tmp_path / "proxy",
        {"bob": f"{{PLAIN}}bobpw:::::: proxy=y host=127.0.0.1 port={backend.port}"},
    )
    try:
        sock = socket.create_connection(("127.0.0.1", proxy.port), 30)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.recv(1024)
        sock.sendall(b"USER bob\r\nPASS bobpw\r\nDELE 2\r\nRETR 1\r\n")
        got = 0
        while got < 2_000_000:
            got += len(sock.recv(65536))
        sock.close()
        backend.waitForLog("user=bob ")
        # Unlocked, and the DELE was not applied.
        client = _client(backend)
        client.user("bob")
        client.pass_("bobpw")
        assert client.stat()[0] == 2
        client.quit()
        assert "dele=1 removed=0" in backend.log
    finally:
        proxy.stop()
        backend.stop()


def test_proxy_only_server_without_mail_location_or_auth_source(tmp_path, backend):
    """
    A front with no mail_location and no passwd: every user goes to the
    backend, which checks the forwarded password; the front's penalty and
    answers apply.
    """
    proxy = ServerProcess(
        tmp_path / "proxy", {}, extra=f'proxy_backend = ["pop://127.0.0.1:{backend.port}"]\n'
    )
    proxy.config.write_text(
        "".join(
            line
            for line in proxy.config.read_text().splitlines(keepends=True)
            if not line.startswith(("passwd", "mail_location"))
        )
    )
    proxy.start()
    try:
        client = _client(proxy)
        # Only what carries a password to forward is offered.
        assert client.capa()["SASL"] == ["PLAIN", "LOGIN"]
        client.user("alice")
        with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\]"):
            client.pass_("wrong")
        client.user("alice")
        assert client.pass_("secret").startswith(b"+OK")
        assert client.stat() == (1, len(MESSAGE))
        client.quit()
        proxy.waitForLog("user=alice ip=127.0.0.1 tls=no mechanism=USER")
        assert not (tmp_path / "proxy" / "mail" / "alice").exists()
    finally:
        proxy.stop()


def test_nopassword_users_are_checked_by_their_backend_only(tmp_path, backend):
    """
    Dovecot's nopassword=y with proxy=y: the front reads only the name and
    forwards the password; a nopassword user who is not proxied is refused,
    and so is APOP (no password to forward).
    """
    proxy = _proxy(
        tmp_path / "proxy",
        {
            "alice": f":::::: nopassword=y proxy=y host=127.0.0.1 port={backend.port}",
            "dave": ":::::: nopassword=y",
        },
    )
    try:
        client = _client(proxy)
        client.user("alice")
        with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\]"):
            client.pass_("anything")
        client.user("alice")
        client.pass_("secret")
        assert b"\r\n".join(client.retr(1)[1]) + b"\r\n" == MESSAGE
        client.quit()
        client = _client(proxy)
        client.user("dave")
        with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\]"):
            client.pass_("anything")
        with pytest.raises(poplib.error_proto):
            client.apop("alice", "secret")
        client.quit()
        assert not (tmp_path / "proxy" / "mail" / "dave").exists()
    finally:
        proxy.stop()


def test_nopassword_with_a_master_user_is_refused(tmp_path, backend):
    """Master-user mode would let any password in: a nopassword user is refused there."""
    proxy = _masterProxy(
        tmp_path, {"alice": ":::::: nopassword=y"}, f"pop://127.0.0.1:{backend.port}", "masterpw"
    )
    try:
        client = _client(proxy)
        client.user("alice")
        with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\]"):
            client.pass_("secret")
        assert "the proxy logs in as a master user" in proxy.waitForLog("master user: login")
    finally:
        proxy.stop()
