"""TLS pieces without sockets: STLS handling, the plaintext policy, certificates."""

from __future__ import annotations

import hashlib
import shutil

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.testing import StringTransport

from popserv.config import Config, ConfigError
from popserv.protocol import State
from popserv.service import makeService
from popserv.testing import connect, memoryServer
from popserv.tls import (
    PlaintextPolicy,
    ServerTLS,
    TLSError,
    certificateUser,
    selfSigned,
    serverEndPointBinding,
)
from support import makeTestPKI


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return makeTestPKI(tmp_path_factory.mktemp("pki"), ("alice", "bob"))


class TLSCapableTransport(StringTransport):
    """Records startTLS instead of doing it."""

    def __init__(self, peerAddress=None):
        super().__init__(peerAddress=peerAddress)
        self.tlsStarted = []

    def startTLS(self, contextFactory):
        self.tlsStarted.append((contextFactory, self.value()))


def tls_client(pki, **kw):
    tls = ServerTLS(str(pki["cert"]), str(pki["key"]))
    factory, store = memoryServer({"alice": "pw"}, tls=tls, **kw)
    peer = IPv4Address("TCP", "127.0.0.1", 40000)
    return connect(factory, transport=TLSCapableTransport(peerAddress=peer)), tls


def test_stls_is_offered_and_starts_tls(pki):
    client, tls = tls_client(pki)
    client.send(b"CAPA\r\n")
    assert b"\r\nSTLS\r\n" in client.output()
    client.send(b"STLS\r\n")
    assert client.output() == b"+OK Begin TLS negotiation\r\n"
    (started,) = client.transport.tlsStarted
    assert started[0] is tls
    assert started[1].endswith(b"+OK Begin TLS negotiation\r\n")  # sent before the handshake


def test_stls_discards_pipelined_plaintext(pki):
    """CVE-2011-0411: commands sent in the clear behind STLS are never executed."""
    client, _ = tls_client(pki)
    client.send(b"STLS\r\nUSER alice\r\nPASS pw\r\nSTAT\r\n")
    assert client.output() == b"+OK Begin TLS negotiation\r\n"
    assert client.protocol.state is State.AUTHORIZATION
    assert client.protocol._pendingUser is None
    assert bytes(client.protocol._inbuf) == b""


def test_stls_forgets_pre_tls_state(pki):
    """RFC 2595 section 4: a USER name given before TLS is forgotten."""
    client, _ = tls_client(pki)
    client.send(b"USER alice\r\nLANG ru\r\nUTF8\r\n")
    client.output()
    client.send(b"STLS\r\n")
    assert client.protocol._pendingUser is None
    assert client.protocol.language.tag == "en" and not client.protocol.utf8


def test_stls_without_tls_configured():
    factory, _ = memoryServer({"alice": "pw"})
    client = connect(factory)
    client.send(b"CAPA\r\n")
    assert b"STLS" not in client.output()
    client.send(b"STLS\r\n")
    assert client.lines() == [b"-ERR STLS is not available"]


def test_stls_not_after_login(pki):
    client, _ = tls_client(pki)
    client.send(b"USER alice\r\nPASS pw\r\n")
    client.output()
    client.send(b"STLS\r\n")
    assert client.lines() == [b"-ERR STLS is not valid in this state"]
    assert client.transport.tlsStarted == []


def test_plaintext_refused_from_untrusted_address(pki):
    """USER/PASS and PLAIN/LOGIN hidden and refused; APOP, CRAM-MD5, SCRAM stay."""
    policy = PlaintextPolicy(trusted=["127.0.0.1/32"])
    factory, _ = memoryServer({"alice": "pw"}, allowPlaintext=policy)
    client = connect(factory, peer="192.0.2.7")
    client.send(b"CAPA\r\n")
    caps = client.lines()
    assert b"USER" not in caps
    assert b"SASL SCRAM-SHA-256 SCRAM-SHA-1 CRAM-MD5" in caps
    client.send(b"USER alice\r\n")
    assert client.lines() == [
        b"-ERR [AUTH] Plaintext authentication is not allowed on this connection; use STLS first"
    ]
    client.send(b"AUTH PLAIN AGFsaWNlAHB3\r\n")
    assert client.lines()[0].startswith(b"-ERR [AUTH] Plaintext")
    trusted = connect(factory, peer="127.0.0.1")
    trusted.send(b"USER alice\r\nPASS pw\r\n")
    assert trusted.lines()[-1].startswith(b"+OK Logged in")


@pytest.mark.parametrize(
    "peer,allowed",
    [
        (IPv4Address("TCP", "127.0.0.1", 1), True),
        (IPv4Address("TCP", "127.9.9.9", 1), True),
        (IPv4Address("TCP", "192.0.2.1", 1), False),
        (IPv6Address("TCP", "::1", 1), True),
        (IPv6Address("TCP", "::ffff:127.0.0.1", 1), True),
        (IPv6Address("TCP", "fe80::1%eth0", 1), False),
        (IPv6Address("TCP", "2001:db8::1", 1), False),
        (UNIXAddress("/run/popserv.sock"), True),
    ],
)
def test_plaintext_policy_by_address(peer, allowed):
    transport = StringTransport(peerAddress=peer)
    assert PlaintextPolicy()(transport) is allowed
    assert PlaintextPolicy(requireTLS=False)(transport) is True


def test_server_tls_errors_are_clear(tmp_path, pki):
    with pytest.raises(TLSError, match="cannot read"):
        ServerTLS(str(tmp_path / "missing.pem"))
    (tmp_path / "junk.pem").write_text("junk")
    with pytest.raises(TLSError, match="no certificate|not a PEM"):
        ServerTLS(str(tmp_path / "junk.pem"), str(pki["key"]))
    with pytest.raises(TLSError, match="do not match"):
        ServerTLS(str(pki["cert"]), str(pki["client-alice-key"]))


def test_reload_keeps_the_old_certificate_on_error(tmp_path, pki):
    cert = tmp_path / "cert.pem"
    key = tmp_path / "key.pem"
    shutil.copy(pki["cert"], cert)
    shutil.copy(pki["key"], key)
    tls = ServerTLS(str(cert), str(key))
    before = tls.getContext()
    cert.write_text("broken")
    with pytest.raises(TLSError):
        tls.reload()
    assert tls.getContext() is before


def test_self_signed_certificate_for_localhost():
    certPEM, keyPEM = selfSigned(["localhost"])
    cert = x509.load_pem_x509_certificate(certPEM)
    assert cert.subject.rfc4514_string() == "CN=localhost"
    assert ServerTLS(selfSignedHosts=["localhost"]).getContext() is not None


class FakeConnection:
    def __init__(self, own=None, peer=None):
        self._own, self._peer = own, peer

    def get_certificate(self, as_cryptography=False):
        assert as_cryptography
        return self._own

    def get_peer_certificate(self, as_cryptography=False):
        assert as_cryptography
        return self._peer


def load(path):
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_certificate_user_fields(pki):
    conn = FakeConnection(peer=load(pki["client-alice"]))
    assert certificateUser(conn, "cn") == "alice"
    assert certificateUser(conn, "email") == "alice@example.org"
    assert certificateUser(conn, "dns") is None
    assert certificateUser(FakeConnection(), "cn") is None


def test_tls_server_end_point_binding_is_the_certificate_hash(pki):
    """RFC 5929 section 4.1: SHA-256 of the DER certificate for a SHA-256-signed one."""
    own = load(pki["cert"])
    der = own.public_bytes(serialization.Encoding.DER)
    assert serverEndPointBinding(FakeConnection(own=own)) == hashlib.sha256(der).digest()


def test_tls_configuration_errors(tmp_path, pki):
    (tmp_path / "passwd").write_text("a:{PLAIN}b\n")
    base = Config(
        passwd=str(tmp_path / "passwd"), mail_location=str(tmp_path / "%n"), listen=("tcp:0",)
    )
    with pytest.raises(ConfigError, match="listen_tls: needs tls_cert"):
        base.merged(listen_tls=("tcp:0",)).validated()
    with pytest.raises(ConfigError, match="tls_cert_user"):
        base.merged(tls_cert_user="uid").validated()
    with pytest.raises(ConfigError, match="trusted_networks"):
        base.merged(trusted_networks=("not-a-net",)).validated()
    with pytest.raises(ConfigError, match="tls: cannot read"):
        makeService(base.merged(tls_cert=str(tmp_path / "nope.pem")))
    service = makeService(
        base.merged(tls_cert=str(pki["cert"]), tls_key=str(pki["key"]), listen_tls=("tcp:0",))
    )
    assert len(list(service)) == 2 and service.factory.tls is not None
