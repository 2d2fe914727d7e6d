"""
HAProxy's PROXY protocol (v1 and v2) in front of popserv: the header is read
before the wrapped protocol hears of the connection, and only from trusted
balancers.

Twisted's own wrapper (C{haproxy:} endpoints) connects the wrapped protocol at
once, before the header is in (Twisted #12501): a POP3 server would greet, log
and count the connection under the balancer's address. L{ProxyWrappingFactory}
calls the wrapped protocol's C{makeConnection} only once the header is parsed,
so C{getPeer()} is the client's from the first moment. Wrapped around a
C{TLSMemoryBIOFactory} it gives implicit TLS behind HAProxy: the header comes
first, in the clear, then the TLS handshake (Twisted's C{haproxy:ssl:} expects
the header inside TLS, #9041).

A PROXY header lets its sender claim any client address, and with it a
trusted network's plaintext logins and someone else's failed-login penalty,
so a connection from a peer outside the trusted networks is cut before a byte
of it is read. A Unix-socket peer is trusted: the socket's permissions say
who may connect.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet.interfaces import IProtocolFactory, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory
from zope.interface import directlyProvides, providedBy

from popserv.limits import TrustedNetworks

__all__ = [
    "HEADER_TIMEOUT",
    "PREFIX",
    "ProxyHeaderWrapper",
    "ProxyWrappingFactory",
    "TrustedPeers",
    "splitProxied",
]

_log = Logger()

#: The spelling of a PROXY-protocol listener, as Twisted's endpoint plugin has it.
PREFIX = "haproxy:"

#: Seconds a trusted peer gets to send its whole PROXY header; a balancer
#: sends it with the connection.
HEADER_TIMEOUT = 10.0

_V1 = V1Parser.PROXYSTR
_V2 = V2Parser.PREFIX


def splitProxied(description: str) -> tuple[bool, str]:
    """
    Whether endpoint C{description} is a PROXY-protocol one (C{haproxy:...}),
    and the endpoint under it.
    """
    if description.startswith(PREFIX):
        return True, description[len(PREFIX) :]
    return False, description


#: The networks a PROXY header is accepted from.
TrustedPeers = TrustedNetworks


class ProxyHeaderWrapper(HAProxyProtocolWrapper):
    """
    One PROXY connection: refused at once from an untrusted peer; otherwise
    the header is read (in as many pieces as it comes) and only then is the
    wrapped protocol connected, with this wrapper, whose C{getPeer} and
    C{getHost} are the header's, as its transport.
    """

    factory: ProxyWrappingFactory
    _timer: Any = None
    _head = b""  # the first bytes, until they tell v1 from v2 or neither

    def makeConnection(self, transport: Any) -> None:
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        peer = transport.getPeer()
        if not self.factory.trusted(peer):
            _log.info(
                "refused a PROXY connection from {peer}: not in the haproxy trusted networks",
                peer=getattr(peer, "host", peer),
            )
            self._cut()
            return
        self._timer = self.factory.clock.callLater(self.factory.headerTimeout, self._tooSlow)

    def dataReceived(self, data: bytes) -> None:
        if self._proxyInfo is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        if self.disconnecting:
            return
        parser = self._parser
        if parser is None:
            data = self._head + data
            if data.startswith(_V2) and len(data) >= 16:
                if data[12] & 0xF0 != 0x20:
                    return self._invalid()
                parser = V2Parser()
            elif data.startswith(_V1):
                parser = V1Parser()
            elif _V2.startswith(data[:12]) or _V1.startswith(data):
                self._head = data  # fewer than 16 bytes: wait for more
                return
            else:
                return self._invalid()
            self._parser, self._head = parser, b""
        try:
            info, remaining = parser.feed(data)
        except InvalidProxyHeader:
            return self._invalid()
        if info is None:
            return
        self._proxyInfo = info
        self._parser = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.wrappedProtocol.makeConnection(self)
        if remaining and not self.disconnecting:
            self.wrappedProtocol.dataReceived(remaining)

    def connectionLost(self, reason: Any = None) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.factory.unregisterProtocol(self)
        if self._proxyInfo is not None:  # the wrapped protocol never heard of it otherwise
            self.wrappedProtocol.connectionLost(reason)
        self.wrappedProtocol = None

    def _invalid(self) -> None:
        _log.info(
            "closed a PROXY connection from {peer}: no valid PROXY header",
            peer=getattr(self.transport.getPeer(), "host", "-"),
        )
        self._cut()

    def _tooSlow(self) -> None:
        self._timer = None
        _log.info(
            "closed a PROXY connection from {peer}: no PROXY header within {timeout}s",
            peer=getattr(self.transport.getPeer(), "host", "-"),
            timeout=self.factory.headerTimeout,
        )
        self._cut()

    def _cut(self) -> None:
        """Close without reading further or writing anything."""
        self.disconnecting = 1
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            abort()
        else:
            self.transport.loseConnection()


class ProxyWrappingFactory(HAProxyWrappingFactory):
    """
    Wraps C{wrappedFactory}'s protocols in L{ProxyHeaderWrapper}s.

    @ivar trusted: says whether a peer may send a PROXY header.
    @ivar headerTimeout: seconds a trusted peer gets to send it.
    """

    protocol = ProxyHeaderWrapper
    noisy = False  # the listener's own start line says it all

    def __init__(
        self,
        wrappedFactory: IProtocolFactory,
        trusted: Iterable[str] | TrustedPeers,
        clock: IReactorTime | None = None,
        headerTimeout: float = HEADER_TIMEOUT,
    ) -> None:
        super().__init__(wrappedFactory)
        if clock is None:
            from twisted.internet import reactor as clock
        self.trusted = trusted if isinstance(trusted, TrustedPeers) else TrustedPeers(trusted)
        self.clock: IReactorTime = clock  # type: ignore[assignment]
        self.headerTimeout = headerTimeout
