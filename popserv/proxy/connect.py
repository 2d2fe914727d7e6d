"""
Reaching a backend: the list of backends tried in order within the route's
timeout, each attempt given an equal share of what remains, so that one
silent backend cannot use up the time of the others.

A backend that is down, closes, stays silent or fails TLS is skipped; one
that answers the login with C{-ERR} has answered for the user, and that
answer is final (L{BackendRefused}).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    connectProtocol,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from popserv.errors import TemporaryFailure
from popserv.popurl import PLAIN_TLS, PopURL
from popserv.proxy.client import BackendLogin, BackendRefused, LoginAs
from popserv.proxy.relay import RelayedSession

__all__ = ["BackendConnector", "BackendUnavailable"]

_log = Logger()


class BackendUnavailable(TemporaryFailure):
    """No backend of the user's list could be reached in time."""

    text = "Mail server temporarily unavailable, try again later"


class BackendConnector:
    """
    Logs in to the first backend of a list that answers.

    @param tlsOptions: C{tlsOptions(host, verify)}: the client TLS options
        for a backend (verified against the proxy's CA unless C{verify} is false).
    @param endpointFor: C{endpointFor(reactor, host, port, timeout)}: a
        client endpoint (by default TCP for an IP address, C{HostnameEndpoint}
        for a name).
    """

    def __init__(
        self,
        reactor: Any,
        tlsOptions: Callable[[str, bool], Any],
        endpointFor: Callable[..., Any] | None = None,
    ) -> None:
        self.reactor = reactor
        self.tlsOptions = tlsOptions
        self.endpointFor = endpointFor or _endpointFor

    def login(
        self,
        backends: tuple[PopURL, ...],
        login: LoginAs,
        timeout: float,
        header: bytes = b"",
        verify: bool = True,
    ) -> Deferred[RelayedSession]:
        """A session logged in at the first of C{backends} that answers within C{timeout}."""
        deadline = self.reactor.seconds() + timeout
        return self._attempt(backends, 0, deadline, login, header, verify, [])

    def _attempt(
        self,
        backends: tuple[PopURL, ...],
        index: int,
        deadline: float,
        login: LoginAs,
        header: bytes,
        verify: bool,
        problems: list[str],
    ) -> Deferred[RelayedSession]:
        url = backends[index]
        share = max(deadline - self.reactor.seconds(), 0.001) / (len(backends) - index)
        tls = None if url.tls == PLAIN_TLS else self.tlsOptions(url.host, verify)
        protocol = BackendLogin(_withAuth(login, url.auth), url.tls, tls, header)
        endpoint = self.endpointFor(self.reactor, url.host, url.port, timeout=share)
        connecting = connectProtocol(endpoint, protocol)
        connecting.addCallback(lambda p: p.done)
        timedOut = []

        def timeUp() -> None:
            timedOut.append(True)
            if protocol.transport is not None:
                protocol.transport.abortConnection()
            else:
                connecting.cancel()

        timer = self.reactor.callLater(share, timeUp)
        name = f"{url.host}:{url.port}"

        def loggedIn(line: bytes) -> RelayedSession:
            if timer.active():
                timer.cancel()
            return RelayedSession(protocol, line, name, login.user)  # avatarId: the realm's

        def failed(failure: Failure) -> Failure | Deferred[RelayedSession]:
            if timer.active():
                timer.cancel()
            if failure.check(BackendRefused):
                return failure
            why = f"no answer in {share:.1f}s" if timedOut else failure.getErrorMessage()
            _log.warn("backend {backend} failed: {why}", backend=name, why=why)
            problems.append(f"{name}: {why}")
            if index + 1 < len(backends):
                return self._attempt(
                    backends, index + 1, deadline, login, header, verify, problems
                )
            return Failure(BackendUnavailable())

        return connecting.addCallbacks(loggedIn, failed)


def _endpointFor(reactor: Any, host: str, port: int, timeout: float) -> Any:
    """An IP address is connected to directly; a name through C{HostnameEndpoint}."""
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        return HostnameEndpoint(reactor, host, port, timeout=timeout)
    kind = TCP4ClientEndpoint if version == 4 else TCP6ClientEndpoint
    return kind(reactor, host, port, timeout=timeout)


def _withAuth(login: LoginAs, auth: str) -> LoginAs:
    if login.auth == auth:
        return login
    return LoginAs(login.user, login.password, login.masterUser, login.masterPassword, auth)


def clientTLS(caFile: str | None) -> Callable[[str, bool], Any]:
    """
    C{tlsOptions(host, verify)} for L{BackendConnector}: certificates
    verified against C{caFile} (PEM, any number of CA certificates) or, without
    one, the system's trust store, and the host name checked; C{verify}
    false (C{ssl=any-cert}) verifies nothing.
    """
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509 import load_pem_x509_certificates
    from twisted.internet.ssl import (
        Certificate,
        CertificateOptions,
        optionsForClientTLS,
        platformTrust,
        trustRootFromCertificates,
    )

    if caFile is None:
        root = platformTrust()
    else:
        with open(caFile, "rb") as f:
            certs = load_pem_x509_certificates(f.read())
        root = trustRootFromCertificates(
            [Certificate.loadPEM(c.public_bytes(Encoding.PEM)) for c in certs]
        )
    unverified = CertificateOptions(verify=False)

    def tlsOptions(host: str, verify: bool) -> Any:
        if not verify:
            return unverified
        return optionsForClientTLS(host, trustRoot=root)

    return tlsOptions
