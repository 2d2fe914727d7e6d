"""
The POP3 wire protocol (RFC 1939, with RFC 2449 CAPA, PIPELINING and response
codes): framing, session states, command dispatch, pipelining, limits, the
autologout timer and streamed responses.

It knows nothing about files or password stores: it logs in through a
C{Portal} and talks to an L{IMailbox} whose methods may return Deferreds.
"""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IReactorTime, ITCPTransport
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from popserv import wire
from popserv._version import __version__
from popserv.auth.credentials import APOPCredentials, UsernamePassword
from popserv.errors import CommandError, POP3Error, errorReply
from popserv.interfaces import IMailbox, MessageInfo
from popserv.session import Transaction
from popserv.streaming import LinesProducer, MessageProducer

__all__ = ["State", "POP3Protocol", "POP3Factory", "DEFAULT_TIMEOUT"]

_log = Logger()

#: RFC 1939 section 3: an autologout timer "MUST be of at least 10 minutes".
DEFAULT_TIMEOUT = 600

#: Unknown commands and bad arguments tolerated before the connection is
#: closed: enough for any confused client, few enough to stop a garbage flood.
DEFAULT_MAX_BAD_COMMANDS = 20

#: Input buffered while a command is in progress (pipelined commands waiting
#: their turn) before the server stops reading from the socket. Back-pressure,
#: not an error: reading resumes once the backlog is processed.
MAX_BUFFERED_INPUT = 64 * 1024

#: Digits accepted in a message number or TOP line count: 10**9 is far beyond
#: any maildrop, and the bound keeps int() cheap on hostile input.
MAX_NUMBER_DIGITS = 9

#: Longest APOP digest field: an MD5 in hex (RFC 1939 section 7).
APOP_DIGEST_LENGTH = 32


class State(Enum):
    """The session states of RFC 1939 section 3."""

    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"


# ---------------------------------------------------------------------------
# Argument parsers: one per argument shape, each raising CommandError, so that
# a handler only ever runs with valid arguments.


def _noArgs(cmd: wire.Command) -> tuple[()]:
    if cmd.args:
        raise CommandError(f"{cmd.verb} takes no arguments")
    return ()


def _number(raw: bytes) -> int:
    if not raw.isdigit() or len(raw) > MAX_NUMBER_DIGITS:
        raise CommandError("Invalid message number")
    return int(raw)


def _message(cmd: wire.Command) -> tuple[int]:
    args = cmd.args
    if len(args) != 1:
        raise CommandError(f"{cmd.verb} takes one message number")
    return (_number(args[0]),)


def _optionalMessage(cmd: wire.Command) -> tuple[int | None]:
    args = cmd.args
    if len(args) > 1:
        raise CommandError(f"{cmd.verb} takes at most one message number")
    return (_number(args[0]),) if args else (None,)


def _top(cmd: wire.Command) -> tuple[int, int]:
    args = cmd.args
    if len(args) != 2:
        raise CommandError("TOP takes a message number and a line count")
    if not args[1].isdigit() or len(args[1]) > MAX_NUMBER_DIGITS:
        raise CommandError("Invalid line count")
    return (_number(args[0]), int(args[1]))


def _text(raw: bytes, what: str) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandError(f"Invalid {what}") from None
    if not text or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise CommandError(f"Invalid {what}")
    return text


def _userName(cmd: wire.Command) -> tuple[str]:
    # The whole rest of the line: some sites have user names with spaces.
    return (_text(cmd.rest.strip(b" "), "user name"),)


def _password(cmd: wire.Command) -> tuple[bytes]:
    # RFC 1939 section 7: the password may contain spaces; keep it as sent.
    if not cmd.rest:
        raise CommandError("PASS takes a password")
    return (cmd.rest,)


def _apop(cmd: wire.Command) -> tuple[str, bytes]:
    args = cmd.args
    if len(args) != 2:
        raise CommandError("APOP takes a user name and a digest")
    digest = args[1]
    if len(digest) != APOP_DIGEST_LENGTH or not all(
        c in b"0123456789abcdefABCDEF" for c in digest
    ):
        raise CommandError("Invalid APOP digest")
    return (_text(args[0], "user name"), digest)


@dataclass(frozen=True)
class _Verb:
    parse: Callable[[wire.Command], tuple[Any, ...]]
    handler: Callable[..., bytes | Deferred[bytes] | None]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


class POP3Protocol(LineReceiver, TimeoutMixin):
    """
    One POP3 connection.

    Commands are answered strictly in order. A handler that returns a
    Deferred (a login, a streamed RETR, a slow backend) makes the connection
    busy: further pipelined lines wait in the input buffer, and past
    L{MAX_BUFFERED_INPUT} the socket stops being read.
    """

    #: RFC 2449 section 4: a command line is at most 255 octets with its CRLF.
    MAX_LENGTH = wire.MAX_COMMAND_LINE - 2

    factory: POP3Factory

    def __init__(self) -> None:
        self.state = State.AUTHORIZATION
        self.user: str | None = None
        self.transaction: Transaction | None = None
        self._pendingUser: str | None = None
        self._challenge: bytes | None = None
        self._logout: Callable[[], None] | None = None
        self._inbuf = bytearray()
        self._busy = False
        self._processing = False
        self._discarding = False
        self._readPaused = False
        self._disconnected = False
        self._closing = False  # no further commands will be processed
        self._badCommands = 0
        self._producer: MessageProducer | LinesProducer | None = None

    # -- connection events ---------------------------------------------------

    def callLater(self, period: float, func: Callable[[], object]) -> Any:
        """TimeoutMixin's timer, on the factory's (injectable) clock."""
        return self.factory.clock.callLater(period, func)

    def connectionMade(self) -> None:
        if ITCPTransport.providedBy(self.transport):
            # Responses are written whole; don't let Nagle hold the last
            # segment of one back until the client's delayed ACK.
            self.transport.setTcpNoDelay(True)
        greeting = f"{self.factory.implementation} ready."
        if self.factory.apop:
            self._challenge = self.factory.makeChallenge()
            greeting += " " + self._challenge.decode("ascii")
        self.setTimeout(self.factory.timeout)
        self.transport.write(wire.ok(greeting))

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._disconnected = True
        self.setTimeout(None)
        if self._producer is not None:
            self._producer.stopProducing()
        if self.state is not State.UPDATE:
            # A session that ends without QUIT removes nothing (RFC 1939 s. 6).
            self._runLogout()

    def timeoutConnection(self) -> None:
        _log.info(
            "autologout of {user} after {timeout}s idle",
            user=self.user,
            timeout=self.factory.timeout,
        )
        self.transport.write(wire.err("Disconnected for inactivity"))
        if self._producer is not None and hasattr(self.transport, "abortConnection"):
            self.transport.abortConnection()  # the client is not reading
        else:
            self.transport.loseConnection()

    # -- framing ---------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """
        Split input into lines (CRLF or bare LF), one command at a time.

        Overlong lines are drained and answered in their place in the
        pipeline; nothing is buffered without bound.
        """
        if self._closing or self._disconnected:
            return
        self._inbuf += data
        self._processInput()
        if len(self._inbuf) > MAX_BUFFERED_INPUT and not self._readPaused:
            self._readPaused = True
            self.transport.pauseProducing()

    def _processInput(self) -> None:
        if self._processing:
            return  # re-entered from a command that completed synchronously
        self._processing = True
        try:
            buf = self._inbuf
            while not (self._busy or self._closing or self._disconnected):
                eol = buf.find(b"\n")
                if eol < 0:
                    if len(buf) > self.MAX_LENGTH + 1:
                        self._discarding = True
                        del buf[:]
                    break
                line = bytes(buf[:eol])
                del buf[: eol + 1]
                if self._discarding:
                    self._discarding = False
                    self.lineLengthExceeded(line)
                    continue
                if line.endswith(b"\r"):
                    line = line[:-1]
                if len(line) > self.MAX_LENGTH:
                    self.lineLengthExceeded(line)
                    continue
                self.lineReceived(line)
        finally:
            self._processing = False
        if self._readPaused and not self._busy and len(self._inbuf) <= MAX_BUFFERED_INPUT:
            self._readPaused = False
            if not self._disconnected:
                self.transport.resumeProducing()

    def lineLengthExceeded(self, line: bytes) -> None:
        self.resetTimeout()
        self._badCommand(CommandError("Command line too long"))

    # -- dispatch --------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        self.resetTimeout()
        cmd = wire.parseCommand(line)
        verb = _COMMANDS[self.state].get(cmd.verb)
        if verb is None:
            if cmd.verb in _ALL_VERBS:
                self._badCommand(CommandError(f"{cmd.verb} is not valid in this state"))
            else:
                self._badCommand(CommandError("Unknown command"))
            return
        try:
            args = verb.parse(cmd)
        except CommandError as e:
            self._badCommand(e)
            return
        try:
            result = verb.handler(self, *args)
        except Exception:
            self._reply(Failure())
            return
        if isinstance(result, Deferred):
            self._busy = True
            result.addBoth(self._reply)
            result.addBoth(self._idle)
        else:
            self._reply(result)

    def _reply(self, result: bytes | Failure | None) -> None:
        if isinstance(result, Failure):
            if result.check(ConnectionLost):
                return
            result = errorReply(result)
        if result and not self._disconnected:
            self.transport.write(result)

    def _idle(self, _: object = None) -> None:
        self._busy = False
        if not self._disconnected:
            self._processInput()

    def _badCommand(self, error: POP3Error) -> None:
        self._badCommands += 1
        self.transport.write(errorReply(error))
        if self._badCommands >= self.factory.maxBadCommands:
            _log.info("closing after {n} bad commands", n=self._badCommands)
            self.transport.write(wire.err("Too many bad commands, closing connection"))
            self._disconnectNow()

    def _disconnectNow(self) -> None:
        self._closing = True
        self.transport.loseConnection()

    # -- AUTHORIZATION ---------------------------------------------------------

    def do_USER(self, name: str) -> bytes:
        self._pendingUser = name
        return wire.ok("Send your password")

    def do_PASS(self, password: bytes) -> Deferred[bytes]:
        user, self._pendingUser = self._pendingUser, None
        if user is None:
            raise CommandError("Send USER first")
        return self._login(UsernamePassword(user, password))

    def do_APOP(self, name: str, digest: bytes) -> Deferred[bytes]:
        if self._challenge is None:
            raise CommandError("APOP is not available")
        self._pendingUser = None
        return self._login(APOPCredentials(name, self._challenge, digest))

    def _login(self, credentials: UsernamePassword | APOPCredentials) -> Deferred[bytes]:
        d = self.factory.portal.login(credentials, None, IMailbox)
        d.addCallback(self._loggedIn, credentials.username)
        d.addErrback(self._loginFailed, credentials.username)
        return d

    def _loggedIn(
        self, avatar: tuple[Any, IMailbox, Callable[[], None]], user: str
    ) -> Deferred[bytes] | bytes:
        _, mailbox, logout = avatar
        self._logout = logout
        if self._disconnected:
            self._runLogout()
            return b""
        d = maybeDeferred(mailbox.listMessages)
        d.addCallback(self._opened, mailbox, user)
        return d

    def _opened(self, messages: list[MessageInfo], mailbox: IMailbox, user: str) -> bytes:
        if self._disconnected:
            self._runLogout()
            return b""
        self.transaction = Transaction(mailbox, messages)
        self.state = State.TRANSACTION
        self.user = user
        count, size = self.transaction.stat()
        _log.info(
            "login {user}: {count} messages, {size} octets", user=user, count=count, size=size
        )
        return wire.ok(f"Logged in, {_plural(count, 'message')} ({size} octets)")

    def _loginFailed(self, failure: Failure, user: str) -> Failure:
        # Whatever was taken (a lock) is given back; the state stays AUTHORIZATION.
        self._runLogout()
        _log.info(
            "login failed for {user}: {why}",
            user=user,
            why=failure.getErrorMessage() or failure.type.__name__,
        )
        return failure

    def _runLogout(self) -> None:
        logout, self._logout = self._logout, None
        if logout is not None:
            try:
                logout()
            except Exception:
                _log.failure("error in logout")

    # -- any state -------------------------------------------------------------

    def do_CAPA(self) -> Deferred[bytes]:
        return self._streamLines(
            wire.ok("Capability list follows"),
            (cap.encode("ascii") + b"\r\n" for cap in self.capabilities()),
        )

    def capabilities(self) -> list[str]:
        """RFC 2449 capabilities for the current state."""
        caps = ["TOP", "UIDL", "RESP-CODES", "PIPELINING"]
        if self.state is State.AUTHORIZATION:
            caps += ["USER", "AUTH-RESP-CODE"]
        caps.append(f"IMPLEMENTATION {self.factory.implementation}")
        return caps

    def do_QUIT(self) -> Deferred[bytes] | None:
        if self.state is State.AUTHORIZATION:
            self.transport.write(wire.ok(f"{self.factory.implementation} signing off"))
            self._disconnectNow()
            return None
        # TRANSACTION -> UPDATE (RFC 1939 section 6). Anything pipelined after
        # QUIT is ignored.
        self.state = State.UPDATE
        self._closing = True
        assert self.transaction is not None
        d = self.transaction.commit()
        d.addCallbacks(self._updated, self._updateFailed)
        return d

    def _updated(self, notRemoved: list[MessageInfo]) -> bytes:
        assert self.transaction is not None
        self._runLogout()
        if notRemoved:
            reply = wire.err("Some deleted messages not removed", "SYS/TEMP")
        else:
            left = len(self.transaction) - len(self.transaction.marked)
            reply = wire.ok(
                f"{self.factory.implementation} signing off ({_plural(left, 'message')} left)"
            )
        _log.info(
            "logout {user}: {removed} removed, {failed} not removed",
            user=self.user,
            removed=len(self.transaction.marked) - len(notRemoved),
            failed=len(notRemoved),
        )
        if not self._disconnected:
            self.transport.write(reply)
            self.transport.loseConnection()
        return b""

    def _updateFailed(self, failure: Failure) -> bytes:
        _log.failure("UPDATE failed for {user}", failure, user=self.user)
        self._runLogout()
        if not self._disconnected:
            self.transport.write(wire.err("Some deleted messages not removed", "SYS/TEMP"))
            self.transport.loseConnection()
        return b""

    # -- TRANSACTION -----------------------------------------------------------

    def _session(self) -> Transaction:
        assert self.transaction is not None
        return self.transaction

    def do_STAT(self) -> bytes:
        count, size = self._session().stat()
        return wire.ok(f"{count} {size}")

    def do_LIST(self, number: int | None) -> bytes | Deferred[bytes]:
        session = self._session()
        if number is not None:
            return wire.ok(f"{number} {session.get(number).size}")
        count, size = session.stat()
        return self._streamLines(
            wire.ok(f"{_plural(count, 'message')} ({size} octets)"),
            (b"%d %d\r\n" % (n, info.size) for n, info in session.listing()),
        )

    def do_UIDL(self, number: int | None) -> bytes | Deferred[bytes]:
        session = self._session()
        if number is not None:
            return wire.ok(f"{number} {session.get(number).uid}")
        return self._streamLines(
            wire.ok("Unique-ID listing follows"),
            (b"%d %s\r\n" % (n, info.uid.encode("ascii")) for n, info in session.listing()),
        )

    def do_RETR(self, number: int) -> Deferred[bytes]:
        info = self._session().get(number)
        return self._streamMessage(info, wire.ok(f"{info.size} octets"), None)

    def do_TOP(self, number: int, lines: int) -> Deferred[bytes]:
        info = self._session().get(number)
        return self._streamMessage(info, wire.ok("Top of message follows"), lines)

    def do_DELE(self, number: int) -> bytes:
        self._session().delete(number)
        return wire.ok(f"Message {number} deleted")

    def do_NOOP(self) -> bytes:
        return wire.ok()

    def do_RSET(self) -> bytes:
        session = self._session()
        session.reset()
        count, size = session.stat()
        return wire.ok(f"Maildrop has {_plural(count, 'message')} ({size} octets)")

    # -- streamed responses ----------------------------------------------------

    def _streamMessage(
        self, info: MessageInfo, status: bytes, topLines: int | None
    ) -> Deferred[bytes]:
        d = maybeDeferred(self._session().mailbox.openMessage, info)
        d.addCallback(self._startMessage, status, topLines)
        return d

    def _startMessage(
        self, reader: Any, status: bytes, topLines: int | None
    ) -> Deferred[bytes] | bytes:
        if self._disconnected:
            reader.close()
            return b""
        producer = MessageProducer(
            self.transport, reader, status, topLines, onProgress=self.resetTimeout
        )
        return self._runProducer(producer)

    def _streamLines(self, status: bytes, lines: Iterator[bytes]) -> Deferred[bytes]:
        return self._runProducer(
            LinesProducer(self.transport, lines, status, onProgress=self.resetTimeout)
        )

    def _runProducer(self, producer: MessageProducer | LinesProducer) -> Deferred[bytes]:
        self._producer = producer
        d = producer.start()
        d.addBoth(self._producerDone)
        return d

    def _producerDone(self, result: None | Failure) -> bytes:
        self._producer = None
        if isinstance(result, Failure) and not result.check(ConnectionLost):
            # The +OK line is out: a -ERR now would be read as message data.
            # Cut the connection so the client sees an incomplete response.
            _log.failure("storage failed while streaming to {user}", result, user=self.user)
            self._closing = True
            if hasattr(self.transport, "abortConnection"):
                self.transport.abortConnection()
            else:
                self.transport.loseConnection()
        return b""


_AUTH = {
    "USER": _Verb(_userName, POP3Protocol.do_USER),
    "PASS": _Verb(_password, POP3Protocol.do_PASS),
    "APOP": _Verb(_apop, POP3Protocol.do_APOP),
    "CAPA": _Verb(_noArgs, POP3Protocol.do_CAPA),
    "QUIT": _Verb(_noArgs, POP3Protocol.do_QUIT),
}
_TRANSACTION = {
    "STAT": _Verb(_noArgs, POP3Protocol.do_STAT),
    "LIST": _Verb(_optionalMessage, POP3Protocol.do_LIST),
    "RETR": _Verb(_message, POP3Protocol.do_RETR),
    "DELE": _Verb(_message, POP3Protocol.do_DELE),
    "NOOP": _Verb(_noArgs, POP3Protocol.do_NOOP),
    "RSET": _Verb(_noArgs, POP3Protocol.do_RSET),
    "TOP": _Verb(_top, POP3Protocol.do_TOP),
    "UIDL": _Verb(_optionalMessage, POP3Protocol.do_UIDL),
    "CAPA": _Verb(_noArgs, POP3Protocol.do_CAPA),
    "QUIT": _Verb(_noArgs, POP3Protocol.do_QUIT),
}
_COMMANDS: dict[State, dict[str, _Verb]] = {
    State.AUTHORIZATION: _AUTH,
    State.TRANSACTION: _TRANSACTION,
    State.UPDATE: {},
}
_ALL_VERBS = frozenset(_AUTH) | frozenset(_TRANSACTION)


class POP3Factory(Factory):
    """
    Builds L{POP3Protocol}s sharing one portal and one configuration. Listen
    on it with any server endpoint.

    @param portal: a Portal whose realm provides L{IMailbox} avatars.
    @param clock: the time source for timers (the reactor; a Clock in tests).
    @param timeout: autologout after this many idle seconds (RFC 1939: >= 600).
    @param hostname: the host part of the APOP timestamp.
    @param apop: offer APOP (a timestamp in the greeting); by default, when the
        portal can check APOP credentials.
    @param maxBadCommands: close the connection after this many bad commands.
    """

    protocol = POP3Protocol

    def __init__(
        self,
        portal: Portal,
        clock: IReactorTime | None = None,
        timeout: int = DEFAULT_TIMEOUT,
        hostname: str | None = None,
        apop: bool | None = None,
        maxBadCommands: int = DEFAULT_MAX_BAD_COMMANDS,
        implementation: str = f"popserv {__version__}",
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[assignment]
        self.portal = portal
        self.clock = clock
        self.timeout = timeout
        self.hostname = hostname or socket.gethostname()
        if apop is None:
            from twisted.cred.credentials import IUsernameHashedPassword

            apop = IUsernameHashedPassword in portal.listCredentialsInterfaces()
        self.apop = apop
        self.maxBadCommands = maxBadCommands
        self.implementation = implementation

    def makeChallenge(self) -> bytes:
        """A greeting timestamp unique to this connection (RFC 1939 section 7)."""
        stamp = f"<{secrets.token_hex(8)}.{int(self.clock.seconds() or time.time())}"
        return f"{stamp}@{self.hostname}>".encode("ascii", "replace")
