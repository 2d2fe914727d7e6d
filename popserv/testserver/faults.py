"""
The test server's connections: production L{POP3Protocol} under a thin
layer that records the transcript and injects the faults a test asks for.

Nothing here is in the production code path: the layer is a subclass of the
protocol and a proxy of its transport, used only by the test server's
factory (L{TestFactory}). It relies on one property of the pipeline: a
command line reaches C{lineReceived} only once every earlier command is
answered, so whatever is written until the next line is this command's reply.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.interfaces import ITCPTransport
from twisted.python.failure import Failure

from popserv.protocol import POP3Factory, POP3Protocol

__all__ = ["Faults", "FaultyProtocol", "TestFactory", "MALFORMATIONS"]

#: The ways L{Faults.malformed} can spoil a multi-line reply.
MALFORMATIONS = ("no_terminator", "bare_lf", "unstuffed")

#: Commands whose reply is multi-line (LIST, UIDL and LANG only without an argument).
_MULTILINE = frozenset({"RETR", "TOP", "CAPA"})
_LISTINGS = frozenset({"LIST", "UIDL", "LANG"})

#: Transcript entries kept at most; a test server is not an archive.
MAX_TRANSCRIPT = 100_000


@dataclass
class Faults:
    """
    What the test asked the server to do wrong, shared by its connections.
    Commands are keyed in upper case (RFC 1939 keywords are case-insensitive).

    @ivar failures: command -> [reply line, times left (None: always)].
    @ivar drops: command -> octets of its reply written before the cut.
    @ivar delays: command -> seconds before it is processed.
    @ivar hangs: commands never answered; C{"*"}: not even a greeting.
    @ivar malformed: command -> one of L{MALFORMATIONS}.
    @ivar bareLF: accept command lines ending in a bare LF (production does).
    @ivar maxLine: the longest command line accepted, CRLF included.
    """

    failures: dict[str, list[Any]] = field(default_factory=dict)
    drops: dict[str, int] = field(default_factory=dict)
    delays: dict[str, float] = field(default_factory=dict)
    hangs: set[str] = field(default_factory=set)
    malformed: dict[str, str] = field(default_factory=dict)
    noApopTimestamp: bool = False
    bareLF: bool = True
    maxLine: int = POP3Protocol.MAX_LENGTH + 2

    def takeFailure(self, verb: str) -> bytes | None:
        """The injected reply for C{verb}, if any; one use of it is spent."""
        entry = self.failures.get(verb)
        if entry is None:
            return None
        reply, left = entry
        if left is not None:
            if left <= 1:
                del self.failures[verb]
            else:
                entry[1] = left - 1
        return reply


def _masked(verb: str, line: bytes) -> str:
    """A client line for the transcript, its secret part (if any) masked."""
    text = line.decode("utf-8", "replace")
    words = text.split(" ")
    if verb == "PASS" and len(words) > 1:
        return "PASS ***"
    if verb in ("APOP", "AUTH") and len(words) > 2:
        return " ".join(words[:2] + ["***"])
    return text


def _complete(reply: bytes) -> bool:
    """Is this captured multi-line reply whole (or a one-line -ERR)?"""
    if reply.startswith(b"-"):
        return b"\r\n" in reply
    return reply.endswith(b"\r\n.\r\n")


def _spoil(kind: str, reply: bytes) -> bytes:
    if reply.startswith(b"-"):
        return reply
    if kind == "no_terminator":
        return reply[: -len(b".\r\n")]
    if kind == "bare_lf":
        return reply.replace(b"\r\n", b"\n")
    status, _, body = reply.partition(b"\r\n")
    if body.startswith(b".."):
        body = body[1:]
    return status + b"\r\n" + body.replace(b"\r\n..", b"\r\n.")


class _Tap:
    """The protocol's view of its transport: writes pass the fault layer."""

    def __init__(self, transport: Any, protocol: FaultyProtocol) -> None:
        self._transport = transport
        self._protocol = protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def write(self, data: bytes) -> None:
        p = self._protocol
        if p._cut or not data:
            return
        p._recordOut(data)
        if p._capture is not None:
            p._captured += data
            if not _complete(p._captured):
                return
            data, kind = _spoil(p._capture, bytes(p._captured)), p._capture
            p._capture = None
            p._captured = bytearray()
            self._transport.write(data)
            if kind == "no_terminator":
                p._cut = True
                self._transport.loseConnection()
            return
        if p._dropAt is not None:
            room = p._dropAt - p._replyOctets
            if len(data) >= room:
                self._transport.write(data[:room])
                # Closed, not reset: the client reads the octets, then the end.
                p._cut = True
                self._transport.loseConnection()
                return
            p._replyOctets += len(data)
        self._transport.write(data)


class FaultyProtocol(POP3Protocol):
    """L{POP3Protocol} as production runs it, plus the test's faults and a transcript."""

    factory: TestFactory

    def makeConnection(self, transport: Any) -> None:
        self.factory.connections.add(self)
        self.connectionNumber = self.factory.nextConnectionNumber()
        self._silent = "*" in self.factory.faults.hangs
        self._cut = False
        self._capture: str | None = None
        self._captured = bytearray()
        self._dropAt: int | None = None
        self._replyOctets = 0
        self._delayed = False
        self._partial = b""
        self._lineEnds: deque[bool] = deque()
        self._lastByte = b""
        faults = self.factory.faults
        self._bareLF = faults.bareLF
        self.MAX_LENGTH = faults.maxLine - 2
        if ITCPTransport.providedBy(transport):
            transport.setTcpNoDelay(True)  # (the protocol cannot see it through the tap)
        super().makeConnection(_Tap(transport, self))

    def connectionMade(self) -> None:
        if self._silent:
            return  # a server that never answers: not even a greeting
        super().connectionMade()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.factory.connections.discard(self)
        if self._capture is not None and self._captured:
            self._capture = None  # the reply never completed: nothing more to spoil
        if self._silent:
            return
        super().connectionLost(reason)

    # -- input -------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._silent:
            return
        if not self._bareLF:
            start = 0
            while (eol := data.find(b"\n", start)) >= 0:
                before = data[eol - 1 : eol] if eol else self._lastByte
                self._lineEnds.append(before == b"\r")
                start = eol + 1
            self._lastByte = data[-1:]
        super().dataReceived(data)

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._lineEnds:
            self._lineEnds.popleft()
        self._record("C", f"[a line of {len(line)} octets, over the limit]")
        self._startReply(None, b"")
        super().lineLengthExceeded(line)

    def lineReceived(self, line: bytes) -> None:
        faults = self.factory.faults
        if self._sasl is not None:  # an exchange in progress: every line is a secret
            self._record("C", "***")
            self._startReply(None, line)
            super().lineReceived(line)
            return
        verb = line.split(b" ", 1)[0].decode("ascii", "replace").upper()
        seconds = faults.delays.get(verb)
        if seconds is not None and not self._delayed:
            # Slow answer: put the line back and take it up again later.
            self._delayed = True
            self._putBack(line + b"\r\n")
            self._busy = True
            self.factory.clock.callLater(seconds, self._idle)
            return
        self._delayed = False
        crlf = self._lineEnds.popleft() if self._lineEnds else True
        self._record("C", _masked(verb, line))
        self._startReply(verb, line)
        if not self._bareLF and not crlf:
            # (English only: a test server's own refusal, not one production sends)
            self.transport.write(b"-ERR Command lines must end with CRLF\r\n")
            return
        reply = faults.takeFailure(verb)
        if reply is not None:
            self.transport.write(reply)
            return
        if verb in faults.hangs:
            self._busy = True  # never answered: the client waits for ever
            return
        super().lineReceived(line)
        if verb == "STLS":
            self._lineEnds.clear()  # what was pipelined in the clear is dropped

    # -- output ------------------------------------------------------------------

    def _startReply(self, verb: str | None, line: bytes) -> None:
        """Whatever is written from now on answers C{verb}."""
        faults = self.factory.faults
        self._replyOctets = 0
        self._dropAt = faults.drops.get(verb) if verb else None
        kind = faults.malformed.get(verb) if verb else None
        if kind is not None and (verb in _MULTILINE or verb in _LISTINGS and b" " not in line):
            self._capture = kind
            self._captured = bytearray()
        else:
            self._capture = None

    def _record(self, who: str, text: str) -> None:
        transcript = self.factory.transcript
        if len(transcript) < MAX_TRANSCRIPT:
            transcript.append((self.connectionNumber, f"{who}: {text}"))

    def _recordOut(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\r\n")
        self._partial = lines.pop()
        for line in lines:
            self._record("S", line.decode("utf-8", "replace"))


class TestFactory(POP3Factory):
    """
    The test server's factory: production's, its connections L{FaultyProtocol}s.

    @ivar faults: what the test asked for.
    @ivar transcript: (connection number, C{"C: ..."} or C{"S: ..."}) for
        every line, secrets masked.
    @ivar connections: every open connection, silent ones included.
    """

    protocol = FaultyProtocol
    __test__ = False  # (not a test class, whatever pytest thinks of its name)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.faults = Faults()
        self.transcript: list[tuple[int, str]] = []
        self.connections: set[FaultyProtocol] = set()
        self._connectionCount = 0

    def clearTranscript(self) -> None:
        """An empty transcript; the next connection is number 1 again."""
        del self.transcript[:]
        self._connectionCount = 0

    def nextConnectionNumber(self) -> int:
        self._connectionCount += 1
        return self._connectionCount

    def offersAPOP(self) -> bool:
        return not self.faults.noApopTimestamp and super().offersAPOP()
