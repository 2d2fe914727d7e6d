"""
TLS for POP3: the server context (STLS, RFC 2595, and implicit TLS, RFC
8314), reloadable without dropping sessions; the plaintext-authentication
policy; client-certificate identities for SASL EXTERNAL; channel-binding
data for SCRAM-PLUS.

Defaults: TLS 1.2 minimum, Twisted's secure cipher list with the server's
preference, no compression, no session tickets; client certificates are
asked for only when a client CA is configured, and optional.

C{popserv selfsigned DIR} writes a self-signed certificate for localhost
(cert.pem, key.pem) for trying things out.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from popserv.limits import DEFAULT_TRUSTED_NETWORKS, TrustedNetworks

__all__ = [
    "ServerTLS",
    "TLSError",
    "PlaintextPolicy",
    "tlsConnection",
    "serverEndPointBinding",
    "certificateUser",
    "selfSigned",
    "DEFAULT_TRUSTED_NETWORKS",
]

_log = Logger()

#: Ways to turn a verified client certificate into a user name.
CERT_USER_FIELDS = ("cn", "email", "dns")


class TLSError(ValueError):
    """A certificate, key or CA file that cannot be used; the message says why."""


#: Forward-secret AEAD suites only for TLS 1.2 (TLS 1.3 suites are all fine).
_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS"


def _loadCertificates(path: str) -> list[x509.Certificate]:
    try:
        with open(path, "rb") as f:
            return x509.load_pem_x509_certificates(f.read())
    except OSError as e:
        raise TLSError(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise TLSError(f"{path}: not a PEM certificate file ({e})") from None


def _loadKey(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            return serialization.load_pem_private_key(f.read(), password=None)
    except OSError as e:
        raise TLSError(f"cannot read {path}: {e.strerror}") from None
    except (ValueError, TypeError) as e:
        raise TLSError(f"{path}: not an unencrypted PEM private key ({e})") from None


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """
    The server's TLS settings, used for both STLS and implicit-TLS listeners.

    L{reload} re-reads the files; connections made afterwards use the new
    certificate, established ones keep theirs.

    @param certFile: PEM file: the server certificate, then its chain.
    @param keyFile: PEM private key (unencrypted); defaults to C{certFile}.
    @param clientCAFile: PEM CA certificates that client certificates (for
        SASL EXTERNAL) are verified against; None: no client certificates.
    @param selfSignedHosts: instead of files, a throw-away self-signed
        certificate for these names, made in memory (demos and tests only).
    """

    def __init__(
        self,
        certFile: str | None = None,
        keyFile: str | None = None,
        clientCAFile: str | None = None,
        selfSignedHosts: Sequence[str] | None = None,
    ) -> None:
        if certFile is None and not selfSignedHosts:
            raise TLSError("a certificate file is needed")
        self.certFile = certFile
        self.keyFile = keyFile or certFile
        self.clientCAFile = clientCAFile
        self.selfSignedHosts = tuple(selfSignedHosts or ())
        self._context: SSL.Context | None = None
        # Connections whose client certificate failed verification. The
        # handshake goes on (the client may still log in with a password);
        # such a certificate just never names a user.
        self._unverified: weakref.WeakSet[SSL.Connection] = weakref.WeakSet()
        self.reload()

    @property
    def verifiesClients(self) -> bool:
        return self.clientCAFile is not None

    def reload(self) -> None:
        """Re-read certificate, key and CA; raise L{TLSError} and keep the old ones on error."""
        if self.certFile is not None:
            chain = _loadCertificates(self.certFile)
            if not chain:
                raise TLSError(f"{self.certFile}: no certificate in it")
            assert self.keyFile is not None
            key = _loadKey(self.keyFile)
        else:
            certPEM, keyPEM = selfSigned(self.selfSignedHosts)
            chain = [x509.load_pem_x509_certificate(certPEM)]
            key = serialization.load_pem_private_key(keyPEM, password=None)
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_TICKET)
        ctx.set_cipher_list(_CIPHERS)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        try:
            ctx.use_certificate(chain[0])
            for extra in chain[1:]:
                ctx.add_extra_chain_cert(extra)
            ctx.use_privatekey(key)
            ctx.check_privatekey()
        except (SSL.Error, TypeError, ValueError) as e:
            raise TLSError(f"certificate and key do not match or are unusable: {e}") from None
        if self.clientCAFile:
            _loadCertificates(self.clientCAFile)  # a clear error for a bad file
            ctx.load_verify_locations(self.clientCAFile)
            ctx.load_client_ca(self.clientCAFile.encode())
            # Ask for a certificate and verify one if given, but do not require
            # it: clients without one log in with a password as usual.
            ctx.set_verify(SSL.VERIFY_PEER, self._verified)
        self._context = ctx
        names = chain[0].subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        _log.info(
            "TLS certificate loaded: {subject}", subject=str(names[0].value) if names else "-"
        )

    def _verified(self, connection: Any, cert: Any, errno: int, depth: int, ok: int) -> bool:
        if not ok:
            self._unverified.add(connection)
        return True

    def clientUser(self, connection: SSL.Connection, field: str) -> str | None:
        """The user a client certificate names, if a configured CA verified it."""
        if not self.verifiesClients or connection in self._unverified:
            return None
        return certificateUser(connection, field)

    def getContext(self) -> SSL.Context:
        assert self._context is not None
        return self._context

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self.getContext(), None)


def tlsConnection(transport: Any) -> SSL.Connection | None:
    """The pyOpenSSL connection under C{transport}, or None if it is not TLS."""
    getHandle = getattr(transport, "getHandle", None)
    if getHandle is None:
        return None
    try:
        handle = getHandle()
    except Exception:
        return None
    return handle if isinstance(handle, SSL.Connection) else None


def serverEndPointBinding(connection: SSL.Connection) -> bytes | None:
    """
    RFC 5929 tls-server-end-point channel binding: the hash of our own
    certificate on this connection (SHA-256 where the certificate's signature
    hash is MD5 or SHA-1).
    """
    cert = connection.get_certificate(as_cryptography=True)
    if cert is None:
        return None
    algorithm = cert.signature_hash_algorithm
    name = "sha256" if algorithm is None or algorithm.name in ("md5", "sha1") else algorithm.name
    return hashlib.new(name, cert.public_bytes(serialization.Encoding.DER)).digest()


def certificateUser(connection: SSL.Connection, field: str) -> str | None:
    """
    The user a client certificate names: its subject CN, its first e-mail
    address (SAN rfc822Name, else subject emailAddress) or its first SAN DNS
    name. None without a certificate. Whether it was verified is
    L{ServerTLS.clientUser}'s business.
    """
    cert = connection.get_peer_certificate(as_cryptography=True)
    if cert is None:
        return None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if field == "cn":
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(names[0].value) if names else None
    if field == "email":
        emails = san.get_values_for_type(x509.RFC822Name) if san else []
        if not emails:
            emails = [
                str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS)
            ]
        return emails[0] if emails else None
    if field == "dns":
        dns = san.get_values_for_type(x509.DNSName) if san else []
        return dns[0] if dns else None
    raise ValueError(f"unknown certificate user field {field!r}")


class PlaintextPolicy:
    """
    Whether USER/PASS and SASL PLAIN/LOGIN may be used on a connection: always
    over TLS; without TLS only from trusted networks (RFC 2595 section 2.2,
    RFC 8314 section 5.4), unless the policy is switched off.
    """

    def __init__(
        self, requireTLS: bool = True, trusted: Iterable[str] = DEFAULT_TRUSTED_NETWORKS
    ) -> None:
        self.requireTLS = requireTLS
        self.trusted = TrustedNetworks(trusted)

    def __call__(self, transport: Any) -> bool:
        if not self.requireTLS or tlsConnection(transport) is not None:
            return True
        return self.trusted(transport.getPeer())


def selfSigned(hosts: Sequence[str] = ("localhost",), days: int = 365) -> tuple[bytes, bytes]:
    """A self-signed certificate and its key (PEM) for C{hosts}: for trying things out."""
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    if "localhost" in hosts:
        names += [
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
