"""
A dropped connection is an implicit RSET (RFC 1939 section 6): whatever the
client pipelined behind a response that was cut off never runs.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred

from popserv.backends.memory import MemoryStore
from popserv.states import Lifecycle
from popserv.testing import connect, memoryServer


class StalledReader:
    """A message whose storage never answers: the stream waits mid-RETR."""

    transferForm = False

    def __init__(self) -> None:
        self.closed = 0

    def read(self, size: int) -> Deferred[bytes]:
        return Deferred()

    def close(self) -> None:
        self.closed += 1


class StallingStore(MemoryStore):
    """A memory store whose messages stall once opened."""

    def openMailbox(self, user):
        mailbox = super().openMailbox(user)
        mailbox.openMessage = lambda info: StalledReader()
        return mailbox


def stalledSession(expire: bool = False):
    store = StallingStore()
    store.maildrop("alice").deliver(b"Subject: one\r\n\r\nbody\r\n")
    store.maildrop("alice").deliver(b"Subject: two\r\n\r\nbody\r\n")
    factory, _ = memoryServer({"alice": "pw"}, store=store)
    client = connect(factory)
    client.send(b"USER alice\r\nPASS pw\r\n")
    assert client.lines()[-1].startswith(b"+OK Logged in")
    return client, store


def test_pipelined_dele_and_quit_after_a_cut_retr_never_run():
    """RETR 1, DELE 1, QUIT in one go, and the link drops mid-RETR: nothing is removed."""
    client, store = stalledSession()
    client.send(b"RETR 1\r\nDELE 1\r\nQUIT\r\n")
    assert client.protocol._producer is not None  # RETR is streaming, the rest waits
    client.disconnect()
    assert len(store.maildrop("alice").messages) == 2
    assert client.protocol.lifecycle is Lifecycle.ENDED
    assert client.protocol.stats.dele == 0
    assert not store.maildrop("alice").locked  # the implicit RSET released the lock


def test_nothing_runs_between_the_transport_stopping_a_stream_and_the_loss():
    """
    A real transport stops its producer (the RETR's stream) before it tells
    the protocol that the connection is lost: the DELE and QUIT pipelined
    behind the RETR must not run in between (they removed the message the
    client never got), nor may the session take the transport for its own.
    """
    client, store = stalledSession()
    client.send(b"RETR 1\r\nDELE 1\r\nQUIT\r\n")
    transport = client.transport
    stream, transport.producer = transport.producer, None  # (as FileDescriptor does)
    stream.stopProducing()
    assert transport.producer is None
    client.disconnect()
    assert len(store.maildrop("alice").messages) == 2
    assert client.protocol.stats.dele == 0 and client.protocol.stats.reason == "disconnect"
    assert client.protocol.lifecycle is Lifecycle.ENDED
    assert not store.maildrop("alice").locked


def test_pipelined_login_after_a_drop_never_runs():
    """Commands pipelined behind a cut-off listing do not log a gone client in."""
    factory, store = memoryServer({"alice": "pw"})
    client = connect(factory)
    client.protocol.transport.loseConnection()
    client.protocol.connectionLost(None)
    client.protocol.dataReceived(b"USER alice\r\nPASS pw\r\n")
    assert not store.maildrop("alice").locked
    assert client.protocol.user is None


class SlowReleaseStore(MemoryStore):
    """A store whose maildrop lock is released later (over a network, say)."""

    def __init__(self) -> None:
        super().__init__()
        self.releases: list[Deferred] = []

    def openMailbox(self, user):
        mailbox = super().openMailbox(user)
        close = mailbox.close

        def closeLater():
            d = Deferred()
            d.addCallback(lambda _: close())
            self.releases.append(d)
            return d

        mailbox.close = closeLater
        return mailbox


def test_quit_is_answered_once_the_maildrop_is_released():
    """
    The +OK after UPDATE goes out only when the store has released the lock,
    so a client that logs in again at once never finds its own session there.
    """
    store = SlowReleaseStore()
    store.maildrop("alice").deliver(b"Subject: one\r\n\r\nbody\r\n")
    factory, _ = memoryServer({"alice": "pw"}, store=store)
    client = connect(factory)
    client.send(b"USER alice\r\nPASS pw\r\n")
    client.output()
    client.send(b"DELE 1\r\nQUIT\r\n")
    assert client.lines() == [b"+OK Message 1 deleted"]  # no goodbye yet
    assert store.maildrop("alice").locked and store.releases
    store.releases[0].callback(None)
    assert client.lines()[0].startswith(b"+OK ") and b"signing off" in client.transport.value()
    assert not store.maildrop("alice").locked
    again = connect(factory)
    again.send(b"USER alice\r\nPASS pw\r\n")
    assert again.lines()[-1].startswith(b"+OK Logged in")
