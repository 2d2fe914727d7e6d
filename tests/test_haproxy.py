"""
PROXY protocol listeners (popserv.haproxy): the header is read before the
POP3 protocol hears of the connection, only from trusted balancers, and the
client's address it gives drives limits, the penalty and the plaintext policy.
"""

from __future__ import annotations

import socket
import struct

import pytest
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from popserv.config import ConfigError
from popserv.haproxy import HEADER_TIMEOUT, ProxyWrappingFactory
from popserv.limits import AuthPenalty, ConnectionLimits
from popserv.service import makeService
from popserv.testing import TestClient as Client
from popserv.testing import memoryServer
from popserv.tls import PlaintextPolicy

BALANCER = "10.1.2.3"


def v1(client: str, port: int = 40000) -> bytes:
    return f"PROXY TCP4 {client} 192.0.2.1 {port} 110\r\n".encode()


def v2(client: str, port: int = 40000) -> bytes:
    """A v2 PROXY header (PROXY command, TCP over IPv4), as HAProxy's send-proxy-v2."""
    body = socket.inet_aton(client) + socket.inet_aton("192.0.2.1") + struct.pack("!HH", port, 110)
    return b"\r\n\r\n\x00\r\nQUIT\n" + b"\x21\x11" + struct.pack("!H", len(body)) + body


def proxied(factory, trusted=("10.0.0.0/8",), peer=BALANCER):
    """A PROXY connection from C{peer} to C{factory}: the wrapper, as a TestClient."""
    wrapping = ProxyWrappingFactory(factory, trusted, factory.clock)
    address = IPv4Address("TCP", peer, 50000)
    wrapper = wrapping.buildProtocol(address)
    transport = StringTransport(peerAddress=address)
    wrapper.makeConnection(transport)
    return Client(wrapper, transport), wrapping


@pytest.fixture
def server():
    factory, _ = memoryServer({"alice": "pw"})
    return factory


def test_greeting_waits_for_the_header_and_its_address(server):
    client, wrapping = proxied(server)
    assert client.output() == b""  # nothing before the header: no greeting, no count
    assert not server.sessions
    client.send(v1("198.51.100.7", 4242))
    assert client.output().startswith(b"+OK")
    (session,) = server.sessions
    assert (session.stats.ip, session.stats.port) == ("198.51.100.7", 4242)
    assert session.transport.getPeer() == IPv4Address("TCP", "198.51.100.7", 4242)
    client.disconnect()
    assert not server.sessions and not wrapping.protocols


def test_header_in_pieces_and_commands_behind_it(server):
    """A header split anywhere is waited for; commands in its segment are run."""
    for header in (v1("198.51.100.7"), v2("198.51.100.7")):
        client, _ = proxied(server)
        data = header + b"CAPA\r\n"
        out = []
        for i in range(0, len(data), 3):
            assert i < len(header) or out, "the greeting once the header is in"
            client.send(data[i : i + 3])
            out += client.lines()
        assert out[0].startswith(b"+OK") and b"PIPELINING" in out and out[-1] == b".", out
        (session,) = server.sessions
        assert session.stats.ip == "198.51.100.7"
        client.disconnect()


def test_untrusted_peer_is_cut_unread(server):
    client, wrapping = proxied(server, trusted=("10.9.0.0/16",))
    assert client.transport.disconnected  # aborted at once
    client.send(v1("198.51.100.7") + b"USER alice\r\n")
    assert client.output() == b""
    client.protocol.connectionLost(Failure(ConnectionDone()))
    assert not server.sessions and not wrapping.protocols


def test_unix_socket_peers_are_trusted(server):
    wrapping = ProxyWrappingFactory(server, (), server.clock)
    wrapper = wrapping.buildProtocol(None)
    transport = StringTransport(peerAddress=UNIXAddress(None))
    wrapper.makeConnection(transport)
    wrapper.dataReceived(v1("198.51.100.7"))
    assert transport.value().startswith(b"+OK")


@pytest.mark.parametrize(
    "data", [b"USER alice\r\n", b"PROXY nonsense here\r\n", b"\r\n\r\n\x00\r"]
)
def test_no_valid_header_is_cut_without_a_word(server, data):
    client, _ = proxied(server)
    client.send(data)
    if data.startswith(b"\r\n\r\n"):  # could still be a v2 header: wait
        assert not client.transport.disconnected
        client.send(b"\x00" * 8)
    assert client.transport.disconnected and client.output() == b""
    assert not server.sessions


def test_a_header_never_finished_times_out(server):
    client, _ = proxied(server)
    client.send(b"PROXY TCP4 198.51")
    server.clock.advance(HEADER_TIMEOUT - 0.1)
    assert not client.transport.disconnected
    server.clock.advance(0.1)
    assert client.transport.disconnected and client.output() == b""


def test_per_address_limit_counts_clients_not_the_balancer():
    factory, _ = memoryServer({"alice": "pw"}, limits=ConnectionLimits(total=10, perAddress=1))
    first, _ = proxied(factory)
    first.send(v1("198.51.100.7"))
    other, _ = proxied(factory)
    other.send(v1("198.51.100.8"))
    assert first.output().startswith(b"+OK") and other.output().startswith(b"+OK")
    again, _ = proxied(factory)
    again.send(v1("198.51.100.7"))
    assert again.output().startswith(b"-ERR [SYS/TEMP]")


def test_penalty_is_the_clients_not_the_balancers():
    factory, _ = memoryServer({"alice": "pw"})
    factory.penalty = AuthPenalty(factory.clock)
    attacker, _ = proxied(factory)
    attacker.send(v1("198.51.100.7") + b"USER alice\r\nPASS wrong\r\n")
    factory.clock.advance(1)
    attacker.output()
    attacker.send(b"USER alice\r\nPASS wrong\r\n")
    assert attacker.lines() == [b"+OK Send your password"]  # waits its 2 s
    other, _ = proxied(factory)
    other.send(v1("198.51.100.8") + b"USER alice\r\nPASS pw\r\n")
    assert other.lines()[-1].startswith(b"+OK"), "another client behind the same balancer"


def test_plaintext_policy_sees_the_client():
    factory, _ = memoryServer(
        {"alice": "pw"}, allowPlaintext=PlaintextPolicy(trusted=("192.0.2.0/24",))
    )
    inside, _ = proxied(factory, trusted=("10.0.0.0/8",))
    inside.send(v1("192.0.2.7") + b"USER alice\r\n")
    assert inside.lines()[-1].startswith(b"+OK")
    outside, _ = proxied(factory, peer="10.9.9.9")  # a balancer inside 192.0.2/24 or not
    outside.send(v1("198.51.100.1") + b"USER alice\r\n")
    assert b"Plaintext authentication is not allowed" in outside.lines()[-1]


def test_service_wraps_haproxy_listeners_outside_tls(tmp_path):
    (tmp_path / "passwd").write_text("alice:{PLAIN}pw\n")
    service = makeService(
        passwd=str(tmp_path / "passwd"),
        mail_location=str(tmp_path / "mail"),
        listen=["haproxy:tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1"],
        listen_tls=["haproxy:tcp:0:interface=127.0.0.1"],
        tls_selfsigned=True,
        haproxy_trusted_networks=["10.0.0.0/8"],
    )
    plain, direct, tls = (s.factory for s in service)
    assert isinstance(plain, ProxyWrappingFactory) and plain.wrappedFactory is service.factory
    assert direct is service.factory  # other listeners as they were
    assert isinstance(tls, ProxyWrappingFactory)
    assert isinstance(tls.wrappedFactory, TLSMemoryBIOFactory)
    assert plain.trusted(IPv4Address("TCP", "10.1.1.1", 1))
    assert not plain.trusted(IPv4Address("TCP", "127.0.0.1", 1))


def test_haproxy_ssl_is_refused(tmp_path):
    (tmp_path / "passwd").write_text("alice:{PLAIN}pw\n")
    with pytest.raises(ConfigError, match="listen-tls haproxy:tcp"):
        makeService(
            passwd=str(tmp_path / "passwd"),
            mail_location=str(tmp_path / "mail"),
            listen=["haproxy:ssl:0:privateKey=k.pem"],
        )
