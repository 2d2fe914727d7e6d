"""
The relay: after the backend's C{+OK}, the client's bytes go to the backend
and the backend's to the client, unparsed.

Back-pressure is Twisted's producer/consumer pair, both ways: each transport
is registered as the other's streaming producer, so a client that reads
slowly stops the proxy reading the backend (and the backend, through TCP,
stops sending), and a backend that reads slowly stops the proxy reading the
client. Nothing is buffered beyond the transports' own write buffers.

When the client goes, the backend connection is closed gently (a QUIT the
client sent last must reach the backend), and aborted if it is not gone
L{CLOSE_GRACE} seconds later.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger
from zope.interface import implementer

from popserv.interfaces import IRelayedSession

if TYPE_CHECKING:
    from popserv.proxy.client import BackendLogin

__all__ = ["RelayedSession", "CLOSE_GRACE"]

_log = Logger()

#: Seconds a backend connection may take to close after the client left.
CLOSE_GRACE = 5.0


@implementer(IRelayedSession)
class RelayedSession:
    """
    A backend connection, logged in, waiting for L{start}; calling it (it is
    the login's logout) closes the backend connection.

    @ivar greeting: the backend's C{+OK} line, CRLF included, for the client.
    @ivar backendName: the backend as the logout line names it (C{host:port}).
    @ivar avatarId: the user, as the front's auth source names them.
    @ivar settings: the user's L{popserv.policy.UserSettings}, if the realm
        looked them up (the login records the login with them).
    @ivar clock: the C{IReactorTime} of the close's grace timer.
    """

    def __init__(
        self,
        backend: BackendLogin,
        line: bytes,
        backendName: str,
        avatarId: str,
        clock: Any = None,
    ) -> None:
        self.backend = backend
        self.greeting = line + b"\r\n"
        self.backendName = backendName
        self.avatarId = avatarId
        self.settings: Any = None
        self.front: Any = None
        self._stats: Any = None
        self._activity: Callable[[], None] = _nothing
        self._closed = False
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self._abortCall: Any = None

    def start(
        self, transport: Any, leftover: bytes, stats: Any, activity: Callable[[], None]
    ) -> Callable[[bytes], None]:
        """
        Relay between the client's C{transport} and the backend from now on;
        C{leftover} is what the client sent after its login command. The
        backend's bytes are counted in C{stats.bytes_out}; C{activity} is
        called on traffic either way (the idle timer).

        @return: where the client's bytes go from now on.
        """
        self.front = transport
        self._stats = stats
        self._activity = activity
        back = self.backend.transport
        back.registerProducer(transport, True)
        transport.registerProducer(back, True)
        self.backend.attach(self)
        if leftover:
            back.write(leftover)
        return self.fromClient

    def fromClient(self, data: bytes) -> None:
        self._activity()
        self.backend.transport.write(data)

    def fromBackend(self, data: bytes) -> None:
        self._activity()
        self._stats.bytes_out += len(data)
        self.front.write(data)

    def backendLost(self) -> None:
        """The backend closed (after QUIT, or its own autologout): so does the client's side."""
        self._closed = True
        abortCall, self._abortCall = self._abortCall, None
        if abortCall is not None and abortCall.active():
            abortCall.cancel()
        front = self.front
        if front is not None:
            front.unregisterProducer()
            front.loseConnection()

    def __call__(self) -> None:
        """The client is gone (or never got the session): close the backend connection."""
        if self._closed:
            return
        self._closed = True
        backend = self.backend
        back = backend.transport
        if self.front is not None:
            back.unregisterProducer()
        else:
            # Never started: the backend's bytes are dropped, its close is seen here.
            backend.relay = self
            self.fromBackend = _discard  # type: ignore[method-assign]
        # Reading again, if a slow client had paused it: a TLS backend's close
        # waits for its close_notify, which a paused transport never reads
        # (a socket left in CLOSE_WAIT). Not abortConnection: a QUIT the
        # client sent last must still reach the backend, or its UPDATE would
        # not happen; the timer aborts a backend that does not close.
        back.resumeProducing()
        back.loseConnection()
        self._abortCall = self.clock.callLater(CLOSE_GRACE, back.abortConnection)


def _nothing() -> None:
    pass


def _discard(data: bytes) -> None:
    pass
