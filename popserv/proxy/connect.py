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
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import ClientFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from popserv.errors import TemporaryFailure
from popserv.popurl import PLAIN_TLS, PopURL
from popserv.proxy.client import BackendLogin, BackendRefused, LoginAs
from popserv.proxy.relay import RelayedSession

__all__ = ["BackendConnector", "BackendUnavailable", "CAPA_MEMORY"]

_log = Logger()

#: Seconds a backend's "SASL PLAIN" in CAPA is remembered: meanwhile logins
#: there skip the CAPA round trip.
CAPA_MEMORY = 300.0


class BackendUnavailable(TemporaryFailure):
    """No backend of the user's list could be reached in time."""

    text = "Mail server temporarily unavailable, try again later"


class _OneConnection(ClientFactory):
    """
    The factory of one backend connection: hands out its L{BackendLogin} and
    fails the login if the connection cannot be made. Quiet: Twisted's
    factories log two lines per connection, a cost for every proxied login.
    """

    noisy = False

    def __init__(self, protocol: BackendLogin) -> None:
        self.protocol = protocol

    def buildProtocol(self, addr: Any) -> BackendLogin:
        return self.protocol

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.protocol.connectFailed(reason)


class BackendConnector:
    """
    Logs in to the first backend of a list that answers.

    The login is the proxied user's wait, so the connector keeps its cost
    down: an IP address is connected to with C{connectTCP} (no endpoint
    layers, no name resolution), TLS client options are made once per
    backend host, and a backend that offered SASL PLAIN is remembered for
    L{CAPA_MEMORY} seconds so that the next logins there send C{AUTH PLAIN}
    without asking C{CAPA} first.

    @param tlsOptions: C{tlsOptions(host, verify)}: the client TLS options
        for a backend (verified against the proxy's CA unless C{verify} is false).
    """

    def __init__(self, reactor: Any, tlsOptions: Callable[[str, bool], Any]) -> None:
        self.reactor = reactor
        self.tlsOptions = tlsOptions
        self._tls: dict[tuple[str, bool], Any] = {}
        #: (host, port, tls) -> until when its SASL PLAIN is taken as offered.
        self._offersPlain: dict[tuple[str, int, str], float] = {}

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

    def _tlsFor(self, host: str, verify: bool) -> Any:
        # One context per backend: making one (and loading the CA) is costly.
        key = (host, verify)
        options = self._tls.get(key)
        if options is None:
            if len(self._tls) >= 1000:
                self._tls.clear()
            options = self._tls[key] = self.tlsOptions(host, verify)
        return options

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
        now = self.reactor.seconds()
        share = max(deadline - now, 0.001) / (len(backends) - index)
        tls = None if url.tls == PLAIN_TLS else self._tlsFor(url.host, verify)
        key = (url.host, url.port, url.tls)
        plainKnown = self._offersPlain.get(key, 0.0) > now
        protocol = BackendLogin(_withAuth(login, url.auth), url.tls, tls, header, plainKnown)
        connecting = self._connect(url.host, url.port, protocol, share)
        timedOut = []

        def timeUp() -> None:
            timedOut.append(True)
            if protocol.transport is None:
                connecting()
            protocol.giveUp(f"no answer in {share:.1f}s")

        timer = self.reactor.callLater(share, timeUp)
        name = f"{url.host}:{url.port}"

        def loggedIn(line: bytes) -> RelayedSession:
            if timer.active():
                timer.cancel()
            self._remember(key, protocol.offeredPlain)
            # The avatarId is the realm's to set.
            return RelayedSession(protocol, line, name, login.user, self.reactor)

        def failed(failure: Failure) -> Failure | Deferred[RelayedSession]:
            if timer.active():
                timer.cancel()
            self._remember(key, protocol.offeredPlain)
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

        return protocol.done.addCallbacks(loggedIn, failed)

    def _remember(self, key: tuple[str, int, str], offered: bool | None) -> None:
        if offered is None:  # not asked (remembered, or a named mechanism)
            return
        if offered:
            if len(self._offersPlain) >= 10_000:
                self._offersPlain.clear()
            self._offersPlain[key] = self.reactor.seconds() + CAPA_MEMORY
        else:
            self._offersPlain.pop(key, None)

    def _connect(
        self, host: str, port: int, protocol: BackendLogin, timeout: float
    ) -> Callable[[], None]:
        """
        Connect C{protocol} to C{host}; the connection's failure fails its
        login. An IP address directly, a name through C{HostnameEndpoint}.

        @return: what stops the attempt while it is still connecting.
        """
        factory = _OneConnection(protocol)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            endpoint = HostnameEndpoint(self.reactor, host, port, timeout=timeout)
            d = endpoint.connect(factory)
            d.addErrback(protocol.connectFailed)
            return d.cancel
        return self.reactor.connectTCP(host, port, factory, timeout=timeout).stopConnecting


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
