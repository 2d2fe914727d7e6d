"""
The backend connector on a MemoryReactorClock: the connect and answer
timeouts, the list tried in order within the route's timeout, and the
memory of a backend's SASL PLAIN (no CAPA round trip while it lasts).
"""

from __future__ import annotations

import base64

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from popserv.popurl import PopURL
from popserv.proxy.client import LoginAs
from popserv.proxy.connect import CAPA_MEMORY, BackendConnector, BackendUnavailable

PLAIN = b"AUTH PLAIN " + base64.b64encode(b"\0alice\0pw") + b"\r\n"
A, B = PopURL("192.0.2.1", 110), PopURL("192.0.2.2", 1110)


def _connector():
    reactor = MemoryReactorClock()
    return reactor, BackendConnector(reactor, lambda host, verify: None)


def _login(connector, backends, timeout=10.0):
    results = []
    connector.login(backends, LoginAs("alice", b"pw"), timeout).addBoth(results.append)
    return results


def _accept(reactor, index):
    """Let the C{index}th connection attempt succeed: its protocol and transport."""
    host, port, factory, _timeout, _bind = reactor.tcpClients[index]
    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_a_backend_that_does_not_connect_gives_way_to_the_next():
    reactor, connector = _connector()
    results = _login(connector, (A, B))
    [(host, port, _f, timeout, _b)] = reactor.tcpClients
    assert (host, port, timeout) == ("192.0.2.1", 110, 5.0)  # half of the time each
    reactor.advance(4.9)
    assert len(reactor.tcpClients) == 1 and not results
    reactor.advance(0.1)
    assert reactor.connectors[0].stoppedConnecting
    assert [c[:2] for c in reactor.tcpClients[1:]] == [("192.0.2.2", 1110)]
    protocol, transport = _accept(reactor, 1)
    protocol.dataReceived(b"+OK hello\r\n")
    protocol.dataReceived(b"+OK\r\nSASL PLAIN\r\n.\r\n")
    protocol.dataReceived(b"+OK Logged in\r\n")
    [session] = results
    assert session.backendName == "192.0.2.2:1110"
    assert session.greeting == b"+OK Logged in\r\n"
    assert not reactor.getDelayedCalls()  # the timer is gone with the login


def test_a_silent_backend_is_aborted_and_the_list_ends_within_the_timeout():
    reactor, connector = _connector()
    results = _login(connector, (A, B), timeout=8.0)
    _first, front = _accept(reactor, 0)  # connects, never greets
    reactor.advance(4.0)
    assert front.disconnecting  # aborted
    _accept(reactor, 1)  # the second is silent too
    reactor.advance(3.9)
    assert not results
    reactor.advance(0.1)  # 8 s in all: the route's timeout, not more
    [failure] = results
    assert isinstance(failure, Failure) and failure.check(BackendUnavailable)
    assert not reactor.getDelayedCalls()


def test_a_refused_connection_tries_the_next_at_once():
    reactor, connector = _connector()
    results = _login(connector, (A, B))
    factory = reactor.tcpClients[0][2]
    factory.clientConnectionFailed(reactor.connectors[0], Failure(ConnectionRefusedError()))
    assert len(reactor.tcpClients) == 2
    assert reactor.tcpClients[1][3] == 10.0  # the whole time left for the last one
    reactor.tcpClients[1][2].clientConnectionFailed(
        reactor.connectors[1], Failure(ConnectionRefusedError())
    )
    assert results[0].check(BackendUnavailable)


def test_a_backends_sasl_plain_is_remembered_for_a_while():
    reactor, connector = _connector()
    results = _login(connector, (A,))
    protocol, transport = _accept(reactor, 0)
    protocol.dataReceived(b"+OK hello\r\n")
    assert transport.value() == b"CAPA\r\n"
    protocol.dataReceived(b"+OK\r\nSASL PLAIN\r\n.\r\n+OK in\r\n")
    assert results[0].backendName == "192.0.2.1:110"

    # The next login there: AUTH PLAIN right after the greeting.
    results = _login(connector, (A,))
    protocol, transport = _accept(reactor, 1)
    protocol.dataReceived(b"+OK hello\r\n")
    assert transport.value() == PLAIN
    # An AUTH refused without a code: perhaps no PLAIN any more, ask again next time.
    protocol.dataReceived(b"-ERR Unsupported authentication mechanism\r\n")
    assert results[0].value.code is None
    results = _login(connector, (A,))
    protocol, transport = _accept(reactor, 2)
    protocol.dataReceived(b"+OK hello\r\n")
    assert transport.value() == b"CAPA\r\n"
    protocol.dataReceived(b"+OK\r\nSASL PLAIN\r\n.\r\n+OK in\r\n")

    reactor.advance(CAPA_MEMORY + 1)  # forgotten after a while
    _login(connector, (A,))
    protocol, transport = _accept(reactor, 3)
    protocol.dataReceived(b"+OK hello\r\n")
    assert transport.value() == b"CAPA\r\n"


def test_a_broken_greeting_is_a_failure_of_that_backend():
    reactor, connector = _connector()
    results = _login(connector, (A,))
    protocol, _transport = _accept(reactor, 0)
    protocol.dataReceived(b"* OK IMAP4rev1\r\n")
    assert results[0].check(BackendUnavailable)
    assert not reactor.getDelayedCalls()
