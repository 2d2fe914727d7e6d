"""
popserv behind a real HAProxy (TCP mode, send-proxy-v2), both on 127.0.0.1.

Clients bind their sockets to other loopback addresses (127.0.0.2 and up), so
the address popserv acts on tells the client's (from the PROXY header) from
the balancer's (127.0.0.1). Without haproxy these tests skip, unless CI is
set: then they fail.
"""

from __future__ import annotations

import re
import socket
import ssl
import time

import pytest
from balancer import HOST, HAProxy, requireHAProxy

from support import ServerProcess, deliver, makeTestPKI

USERS = {"alice": "{PLAIN}pw"}
TIMEOUT = 15


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    return makeTestPKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def cluster(tmp_path_factory, pki):
    """
    One popserv with a PROXY listener and an implicit-TLS PROXY listener, and
    HAProxy in front of each (frontends "pop3" and "pop3s").
    """
    requireHAProxy()
    root = tmp_path_factory.mktemp("haproxy")
    srv = ServerProcess(
        root / "popserv",
        USERS,
        listen=f"haproxy:tcp:0:interface={HOST}",
        listenTLS=f"haproxy:tcp:0:interface={HOST}",
        penalty=15,
        extra=f'tls_cert = "{pki["cert"]}"\ntls_key = "{pki["key"]}"\n'
        # The balancer (127.0.0.1) is in it, but 127.0.0.9 is not.
        'trusted_networks = ["127.0.0.0/29"]\n'
        "max_connections_per_ip = 2\n",
    ).start()
    deliver(srv.maildir("alice"), b"Subject: x\n\nbody\n")
    try:
        proxy = HAProxy(root / "haproxy", {"pop3": srv.port, "pop3s": srv.tlsPort}).start()
    except BaseException:
        srv.stop()
        raise
    yield srv, proxy
    proxy.stop()
    srv.stop()
    assert "Traceback" not in srv.log and "Unhandled" not in srv.log, srv.log


class Client:
    """A POP3 client from loopback address C{source}, line by line."""

    def __init__(self, port: int, source: str, context: ssl.SSLContext | None = None) -> None:
        self.sock = socket.create_connection((HOST, port), TIMEOUT, (source, 0))
        if context is not None:
            self.sock = context.wrap_socket(self.sock, server_hostname="localhost")
        self.stream = self.sock.makefile("rb")
        self.greeting = self.readline()

    def readline(self) -> bytes:
        return self.stream.readline().rstrip(b"\r\n")

    def ask(self, command: bytes) -> bytes:
        self.sock.sendall(command + b"\r\n")
        return self.readline()

    def close(self) -> None:
        self.stream.close()
        self.sock.close()


def logout(srv: ServerProcess, ip: str, tls: str = "no") -> str:
    """The logout line of alice's session from C{ip} (waited for)."""
    deadline = time.monotonic() + TIMEOUT
    pattern = re.compile(rf"session end: user=alice ip={re.escape(ip)} tls={tls} [^\n]*")
    while (m := pattern.search(srv.log)) is None:
        assert time.monotonic() < deadline, srv.log
        time.sleep(0.02)
    return m.group(0)


def test_logout_line_and_plaintext_policy_see_the_client(cluster):
    srv, proxy = cluster
    trusted = Client(proxy.ports["pop3"], "127.0.0.2")
    assert trusted.greeting.startswith(b"+OK")
    assert trusted.ask(b"USER alice").startswith(b"+OK")  # 127.0.0.2 is a trusted network
    assert trusted.ask(b"PASS pw").startswith(b"+OK")
    assert trusted.ask(b"STAT") == b"+OK 1 20"
    assert trusted.ask(b"QUIT").startswith(b"+OK")
    trusted.close()
    assert "reason=quit" in logout(srv, "127.0.0.2")
    outside = Client(proxy.ports["pop3"], "127.0.0.9")  # not trusted, though HAProxy is
    assert b"Plaintext authentication is not allowed" in outside.ask(b"USER alice")
    outside.close()


def test_per_address_limit_counts_the_client(cluster):
    _, proxy = cluster
    port = proxy.ports["pop3"]
    held = [Client(port, "127.0.0.4"), Client(port, "127.0.0.4")]
    try:
        assert all(c.greeting.startswith(b"+OK") for c in held)
        third = Client(port, "127.0.0.4")
        assert third.greeting.startswith(b"-ERR [SYS/TEMP]"), third.greeting
        third.close()
        other = Client(port, "127.0.0.5")  # the same balancer, another client
        assert other.greeting.startswith(b"+OK")
        other.close()
    finally:
        for c in held:
            c.close()


def test_penalty_is_per_client(cluster):
    """One client's failures do not slow another's down behind the same balancer."""
    _, proxy = cluster
    port = proxy.ports["pop3"]

    def fail(client: Client) -> float:
        assert client.ask(b"USER alice").startswith(b"+OK")
        started = time.monotonic()
        assert client.ask(b"PASS wrong").startswith(b"-ERR [AUTH]")
        return time.monotonic() - started

    first = Client(port, "127.0.0.6")
    assert fail(first) >= 0.9  # the first failure costs a second
    first.close()
    other = Client(port, "127.0.0.7")
    assert fail(other) < 1.9  # its own first: a second, not the balancer's second (two)
    other.close()


def test_implicit_tls_behind_haproxy(cluster, pki):
    srv, proxy = cluster
    context = ssl.create_default_context(cafile=str(pki["ca"]))
    client = Client(proxy.ports["pop3s"], "127.0.0.8", context)
    assert client.greeting.startswith(b"+OK")
    assert client.ask(b"USER alice").startswith(b"+OK")  # over TLS: allowed from anywhere
    assert client.ask(b"PASS pw").startswith(b"+OK")
    assert client.ask(b"QUIT").startswith(b"+OK")
    client.close()
    logout(srv, "127.0.0.8", tls="yes")


def test_direct_connection_from_untrusted_peer_is_closed(tmp_path):
    """A PROXY listener cuts a peer outside --haproxy-trusted-network before greeting."""
    srv = ServerProcess(
        tmp_path,
        USERS,
        listen=f"haproxy:tcp:0:interface={HOST}",
        extra='haproxy_trusted_networks = ["10.0.0.0/8"]\n',
    ).start()
    try:
        with socket.create_connection((HOST, srv.port), TIMEOUT) as sock:
            sock.sendall(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 110\r\n")
            try:
                assert sock.recv(100) == b""
            except ConnectionResetError:
                pass  # cut with a reset: as good
        srv.waitForLog("not in the haproxy trusted networks")
        assert "session end" not in srv.log
    finally:
        srv.stop()


def test_example_configuration_is_valid():
    """etc/haproxy.cfg, as the docs point to it, is one HAProxy accepts."""
    import subprocess

    from support import REPO

    haproxy = requireHAProxy()
    check = subprocess.run(
        [haproxy, "-c", "-f", str(REPO / "etc" / "haproxy.cfg")], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
