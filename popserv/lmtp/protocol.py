"""
An LMTP server (RFC 2033): an MTA (Postfix's C{lmtp} client) hands over
messages, and each accepted recipient gets its own reply after DATA.

Built on L{LineReceiver} rather than C{twisted.mail.smtp}: its C{SMTP}
answers a DATA with one reply for all recipients, takes the message line by
line through C{IMessage.lineReceived} with no back-pressure, and knows no
SIZE or enhanced status codes, so LMTP would have replaced most of it.

  - Extensions: PIPELINING (RFC 2920: commands are answered in order; one
    that waits for the store holds the next back), ENHANCEDSTATUSCODES
    (RFC 2034), 8BITMIME (RFC 6152: the message is stored as it comes), SIZE
    (RFC 1870).
  - DATA is streamed: each chunk is dot-unstuffed (L{DataDecoder}) and
    written into one L{IMessageWriter} per accepted recipient; reading waits
    while a store is slow. Nothing holds the whole message.
  - A recipient's reply comes after its copy is committed: C{250} means it
    is stored and durable. If the connection drops before the replies are
    all sent, the copies not committed yet are aborted and the MTA retries
    them. One window remains: a crash (or a dropped connection) between one
    copy's commit and its reply has the MTA retry a recipient whose copy is
    stored, which then gets a second copy, as with Dovecot's LMTP.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from popserv.interfaces import IMessageWriter
from popserv.lmtp.data import DataDecoder
from popserv.lmtp.delivery import Deliverer, Recipient, Refusal, Reply, refusalFor

__all__ = ["LMTPProtocol", "LMTPFactory"]

_log = Logger()

_MAIL = re.compile(r"FROM:\s*<([^<>\s]*)>(?:\s+(.*))?\Z", re.IGNORECASE)
_RCPT = re.compile(r"TO:\s*<([^<>\s]+)>(?:\s+(.*))?\Z", re.IGNORECASE)

OK = Reply(250, "2.0.0", "OK")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
SYNTAX = Reply(501, "5.5.2", "Syntax error in parameters or arguments")
PARAMETER = Reply(555, "5.5.4", "Parameter not recognized or not implemented")
UNKNOWN = Reply(500, "5.5.1", "Command unrecognized")
TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
TOO_MANY = Reply(452, "4.5.3", "Too many recipients")


class _Copy:
    """One recipient's copy of the message being received."""

    def __init__(self, recipient: Recipient) -> None:
        self.recipient = recipient
        self.writer: IMessageWriter | None = None
        self.reply: Reply | None = None
        #: The write the store has not finished yet.
        self.busy: Deferred[Any] | None = None

    def fail(self, reply: Reply) -> None:
        """Give the copy up with C{reply}; its writer, if any, is aborted after its write."""
        if self.reply is None:
            self.reply = reply
        writer, self.writer = self.writer, None
        if writer is None:
            return

        def abort(_: object = None) -> None:
            maybeDeferred(writer.abort).addErrback(
                lambda f: _log.failure("aborting an LMTP delivery failed", f)
            )

        if self.busy is not None and not self.busy.called:
            self.busy.addBoth(abort)
        else:
            abort()

    def idle(self, result: object) -> object:
        self.busy = None
        return result


class LMTPProtocol(LineReceiver, TimeoutMixin):
    """One LMTP connection; see the module docstring."""

    delimiter = b"\r\n"
    #: RFC 5321 allows 512 octets a command line; extensions add parameters.
    MAX_LENGTH = 2048

    factory: LMTPFactory

    def connectionMade(self) -> None:
        self.callLater = self.factory.clock.callLater
        self.setTimeout(self.factory.timeout)
        self._lhlo = False
        self._lost = False
        self._badCommands = 0
        self._holds = 0
        self._flushed: Deferred[Any] | None = None
        self._reset()
        self._reply(Reply(220, "", f"{self.factory.hostname} LMTP popserv ready"))

    def _reset(self) -> None:
        self._sender: str | None = None
        self._size: int | None = None
        self._recipients: list[Recipient] = []
        self._copies: list[_Copy] = []

    def _reply(self, reply: Reply) -> None:
        if not self._lost:
            self.transport.write(reply.line())

    def timeoutConnection(self) -> None:
        self._reply(Reply(421, "4.4.2", f"{self.factory.hostname} Timeout, closing"))
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._lost = True
        self.setTimeout(None)
        for copy in self._copies:
            if copy.reply is None:
                copy.fail(Reply(421, "4.4.2", "Connection lost"))

    def lineLengthExceeded(self, line: bytes) -> None:
        self._reply(Reply(500, "5.5.2", "Line too long"))
        self.transport.loseConnection()

    # -- commands -----------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        self.resetTimeout()
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return self._bad(SYNTAX)
        verb, _, argument = text.partition(" ")
        handler = getattr(self, "lmtp_" + verb.upper(), None) if verb.isalpha() else None
        if handler is None:
            return self._bad(UNKNOWN)
        result = handler(argument.strip())
        if isinstance(result, Deferred):
            result.addErrback(lambda f: _log.failure("LMTP command failed", f))
            if not result.called:
                # PIPELINING: the next command waits for this one's answer.
                self._hold()
                result.addBoth(self._release)
        elif isinstance(result, Reply):
            if result.code in (500, 501, 503, 555):
                return self._bad(result)
            self._reply(result)

    def _hold(self) -> None:
        """Read no further (until as many L{_release} calls)."""
        if self._holds == 0:
            self.pauseProducing()
        self._holds += 1

    def _release(self, result: object = None) -> object:
        self._holds -= 1
        if self._holds == 0 and not self._lost:
            self.resumeProducing()
        return result

    def _bad(self, reply: Reply) -> None:
        self._badCommands += 1
        self._reply(reply)
        if self._badCommands >= self.factory.maxBadCommands:
            self._reply(Reply(421, "4.7.0", "Too many errors, closing"))
            self.transport.loseConnection()

    def lmtp_LHLO(self, argument: str) -> Reply | None:
        if not argument:
            return SYNTAX
        self._lhlo = True
        self._reset()
        size = self.factory.maxSize
        lines = [self.factory.hostname, "PIPELINING", "ENHANCEDSTATUSCODES", "8BITMIME"]
        lines.append(f"SIZE {size}" if size else "SIZE")
        last = len(lines) - 1
        self.transport.write(
            "".join(f"250{' ' if i == last else '-'}{x}\r\n" for i, x in enumerate(lines)).encode()
        )
        return None

    def lmtp_HELO(self, argument: str) -> Reply:
        return Reply(500, "5.5.1", "This is LMTP: say LHLO")

    lmtp_EHLO = lmtp_HELO

    def lmtp_MAIL(self, argument: str) -> Reply:
        if not self._lhlo or self._sender is not None:
            return BAD_SEQUENCE
        m = _MAIL.match(argument)
        if m is None:
            return SYNTAX
        size = None
        for parameter in (m.group(2) or "").split():
            key, _, value = parameter.partition("=")
            key = key.upper()
            if key == "SIZE" and value.isascii() and value.isdigit() and len(value) < 20:
                size = int(value)
            elif key == "BODY" and value.upper() in ("7BIT", "8BITMIME"):
                pass
            else:
                return PARAMETER
        if size is not None and self.factory.maxSize and size > self.factory.maxSize:
            return TOO_BIG
        self._sender = m.group(1)
        self._size = size
        return Reply(250, "2.1.0", "Sender OK")

    def lmtp_RCPT(self, argument: str) -> Reply | Deferred[None]:
        if self._sender is None:
            return BAD_SEQUENCE
        m = _RCPT.match(argument)
        if m is None:
            return SYNTAX
        if m.group(2):
            return PARAMETER
        if len(self._recipients) >= self.factory.maxRecipients:
            return TOO_MANY
        address = m.group(1).rpartition(":")[2]  # a source route is ignored (RFC 5321 C)
        d = self.factory.deliverer.recipient(address, self._size)

        def accepted(recipient: Recipient) -> None:
            self._recipients.append(recipient)
            self._reply(Reply(250, "2.1.5", "Recipient OK"))

        def refused(failure: Failure) -> None:
            self._reply(refusalFor(failure, address))

        return d.addCallbacks(accepted, refused)

    def lmtp_VRFY(self, argument: str) -> Reply | Deferred[None]:
        address = argument.strip("<>")
        if not address:
            return SYNTAX
        d = self.factory.deliverer.recipient(address)
        return d.addCallbacks(
            lambda r: self._reply(Reply(250, "2.1.5", f"<{r.address}>")),
            lambda f: self._reply(refusalFor(f, address)),
        )

    def lmtp_RSET(self, argument: str) -> Reply:
        self._reset()
        return OK

    def lmtp_NOOP(self, argument: str) -> Reply:
        return OK

    def lmtp_QUIT(self, argument: str) -> None:
        self._reply(Reply(221, "2.0.0", f"{self.factory.hostname} closing"))
        self.transport.loseConnection()

    # -- DATA -----------------------------------------------------------------

    def lmtp_DATA(self, argument: str) -> Reply | Deferred[None] | None:
        if self._sender is None:
            return Reply(503, "5.5.1", "No valid recipients")
        if not self._recipients:
            # Every recipient was refused (a pipelining MTA sent DATA before
            # it read the 550s): the usual end of a spam run to unknown
            # users, no client error to count towards closing.
            self._reply(Reply(503, "5.5.1", "No valid recipients"))
            return None
        if argument:
            return SYNTAX
        self._copies = [_Copy(r) for r in self._recipients]
        return self._openCopies()

    @inlineCallbacks
    def _openCopies(self) -> Any:
        for copy in self._copies:
            try:
                copy.writer = yield self.factory.deliverer.open(copy.recipient)
            except Exception:
                copy.fail(refusalFor(Failure(), copy.recipient.user))
        if self._lost:
            for copy in self._copies:
                copy.fail(Reply(421, "4.4.2", "Connection lost"))
            return
        self._decoder = DataDecoder()
        self._received = 0
        self._writing: list[Deferred[Any]] = []
        self.setTimeout(self.factory.dataTimeout)
        self.setRawMode()
        self._reply(Reply(354, "", "Start mail input; end with <CRLF>.<CRLF>"))

    def rawDataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        chunk, rest = self._decoder.feed(data)
        if chunk:
            self._received += len(chunk)
            self._write(chunk)
        if rest is None:
            return
        self.setLineMode()
        self._buffer = rest + self._buffer
        self._hold()
        d = self._finish()
        d.addErrback(lambda f: _log.failure("LMTP delivery failed", f))
        d.addBoth(self._release)

    def _write(self, chunk: bytes) -> None:
        maxSize = self.factory.maxSize
        for copy in self._copies:
            if copy.writer is None:
                continue
            if maxSize and self._received > maxSize:
                copy.fail(TOO_BIG)
                continue
            try:
                copy.recipient.check(self._received)
            except Refusal as e:
                copy.fail(e.reply)  # no room: stop storing it at once
                continue
            d = maybeDeferred(copy.writer.write, chunk)
            d.addErrback(self._writeFailed, copy)
            if not d.called:
                copy.busy = d
                d.addBoth(copy.idle)
                self._writing.append(d)
        if self._writing:
            # Back-pressure: read on once every store took the chunk.
            self._hold()
            writing, self._writing = self._writing, []
            self._flushed = gatherResults(writing)
            self._flushed.addBoth(self._release)

    def _writeFailed(self, failure: Failure, copy: _Copy) -> None:
        copy.fail(refusalFor(failure, copy.recipient.user))

    @inlineCallbacks
    def _finish(self) -> Any:
        """Commit each copy, in recipient order, and give each its reply."""
        self.setTimeout(self.factory.timeout)
        if self._flushed is not None and not self._flushed.called:
            yield self._flushed
        self._flushed = None
        size = self._received
        copies, self._copies = self._copies, []
        self._reset()
        for copy in copies:
            if self._lost:
                copy.fail(Reply(421, "4.4.2", "Connection lost"))
                continue
            writer = copy.writer
            if writer is not None:
                copy.writer = None
                try:
                    uid = yield maybeDeferred(writer.commit)
                except Exception:
                    copy.reply = refusalFor(Failure(), copy.recipient.user)
                else:
                    _log.info(
                        "lmtp: delivered to {user}: {uid}, {size} octets",
                        user=copy.recipient.user,
                        uid=uid,
                        size=size,
                    )
                    copy.reply = Reply(250, "2.0.0", f"<{copy.recipient.address}> Saved")
            assert copy.reply is not None
            self._reply(copy.reply)


class _Refused(Protocol):
    """A peer not allowed to deliver: told so (RFC 2033's 421) and closed unread."""

    def __init__(self, hostname: str) -> None:
        self.hostname = hostname

    def connectionMade(self) -> None:
        self.transport.write(
            Reply(421, "4.7.0", f"{self.hostname} Not allowed to deliver here").line()
        )
        self.transport.loseConnection()


class LMTPFactory(ServerFactory):
    """
    LMTP connections delivering through one L{Deliverer}.

    @param trusted: says whether a peer address may deliver (e.g. a
        L{popserv.limits.TrustedNetworks}); others get C{421 4.7.0} and are
        closed. C{None}: anyone who can connect.
    @param maxSize: the largest message accepted, in octets (0: no limit).
    @param timeout: idle seconds allowed between commands.
    @param dataTimeout: idle seconds allowed within DATA.
    """

    protocol = LMTPProtocol

    def __init__(
        self,
        deliverer: Deliverer,
        clock: IReactorTime | None = None,
        hostname: str | None = None,
        maxSize: int = 0,
        timeout: int = 300,
        dataTimeout: int = 600,
        maxRecipients: int = 1000,
        maxBadCommands: int = 20,
        trusted: Callable[[object], bool] | None = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        if hostname is None:
            import socket

            hostname = socket.getfqdn()
        self.deliverer = deliverer
        self.clock = clock
        self.hostname = hostname
        self.maxSize = maxSize
        self.timeout = timeout
        self.dataTimeout = dataTimeout
        self.maxRecipients = maxRecipients
        self.maxBadCommands = maxBadCommands
        self.trusted = trusted

    def buildProtocol(self, addr: Any) -> Protocol | None:
        if self.trusted is not None and not self.trusted(addr):
            _log.warn("LMTP connection refused from {peer}: not trusted", peer=_peer(addr))
            refused = _Refused(self.hostname)
            refused.factory = self
            return refused
        return super().buildProtocol(addr)


def _peer(addr: Any) -> str:
    host = getattr(addr, "host", None)
    return f"{host}:{addr.port}" if host is not None else str(addr)
