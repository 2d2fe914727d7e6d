"""
The POP3 wire protocol (RFC 1939, with RFC 2449 CAPA, PIPELINING and response
codes): framing, session states, command dispatch, pipelining, limits, the
autologout timer and streamed responses.

It knows nothing about files or password stores: it logs in through a
C{Portal} and talks to an L{IMailbox} whose methods may return Deferreds.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IReactorTime, ITCPTransport
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from popserv import wire
from popserv._version import __version__
from popserv.auth.credentials import APOPCredentials, UsernamePassword
from popserv.autologout import AutologoutTimer
from popserv.errors import (
    AuthenticationFailed,
    CommandError,
    LoginDelayed,
    MaildropInUse,
    PlaintextRefused,
    POP3Error,
    errorReply,
)
from popserv.i18n import DEFAULT_LANGUAGE, LANGUAGES, Language, negotiate
from popserv.interfaces import IMailbox, MessageInfo
from popserv.limits import AuthPenalty, ConnectionLimits
from popserv.logs import DEFAULT_LOGOUT_FORMAT, SessionStats
from popserv.metrics import Metrics
from popserv.policy import SessionPolicy, UserSettings
from popserv.sasl import ALL_MECHANISMS, Challenge, ISASLMechanism, ISecretSource, SASLContext
from popserv.session import Transaction
from popserv.streaming import LinesProducer, MessageProducer
from popserv.tls import ServerTLS, serverEndPointBinding, tlsConnection

__all__ = ["State", "POP3Protocol", "POP3Factory", "DEFAULT_TIMEOUT"]

_log = Logger()

#: RFC 1939 section 3: an autologout timer "MUST be of at least 10 minutes".
DEFAULT_TIMEOUT = 600

#: Seconds a logged-out connection may take to receive its goodbye and go
#: before it is cut (a client that reads nothing, a TLS handshake never made).
ABORT_GRACE = 30

#: Idle seconds allowed before a login: plenty for a person typing, short
#: enough that idle unauthenticated connections do not pile up.
DEFAULT_LOGIN_TIMEOUT = 120

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

#: RFC 5034 section 4: SASL continuation lines are exempt from the 255-octet
#: limit "up to what the mechanism needs"; this bound fits any mechanism we
#: offer (and a GSSAPI token) while keeping a client from growing our buffer.
MAX_SASL_LINE = 16 * 1024


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
        raise CommandError("{verb} takes no arguments", verb=cmd.verb)
    return ()


def _number(raw: bytes) -> int:
    if not raw.isdigit() or len(raw) > MAX_NUMBER_DIGITS:
        raise CommandError("Invalid message number")
    return int(raw)


def _message(cmd: wire.Command) -> tuple[int]:
    args = cmd.args
    if len(args) != 1:
        raise CommandError("{verb} takes one message number", verb=cmd.verb)
    return (_number(args[0]),)


def _optionalMessage(cmd: wire.Command) -> tuple[int | None]:
    args = cmd.args
    if len(args) > 1:
        raise CommandError("{verb} takes at most one message number", verb=cmd.verb)
    return (_number(args[0]),) if args else (None,)


def _top(cmd: wire.Command) -> tuple[int, int]:
    args = cmd.args
    if len(args) != 2:
        raise CommandError("TOP takes a message number and a line count")
    if not args[1].isdigit() or len(args[1]) > MAX_NUMBER_DIGITS:
        raise CommandError("Invalid line count")
    return (_number(args[0]), int(args[1]))


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _text(raw: bytes) -> str:
    # User names are UTF-8 (RFC 6856 "UTF8 USER"); control characters never.
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandError("Invalid user name or password encoding") from None
    if not text or _CONTROL.search(text):
        raise CommandError("Invalid argument")
    return text


def _userName(cmd: wire.Command) -> tuple[str]:
    # The whole rest of the line: some sites have user names with spaces.
    return (_text(cmd.rest.strip(b" ")),)


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
    return (_text(args[0]), digest)


def _optionalWord(cmd: wire.Command) -> tuple[str | None]:
    args = cmd.args
    if len(args) > 1:
        raise CommandError("Invalid argument")
    return (_text(args[0]),) if args else (None,)


def _auth(cmd: wire.Command) -> tuple[str | None, bytes | None]:
    # RFC 5034 section 4; "AUTH" alone lists the mechanisms (as RFC 1734
    # clients expect), and a trailing space (Outlook) is tolerated.
    args = cmd.args
    if len(args) > 2:
        raise CommandError("AUTH takes a mechanism and an optional initial response")
    if not args:
        return (None, None)
    mechanism = _text(args[0]).upper()
    if len(args) == 1:
        return (mechanism, None)
    return (mechanism, _base64(args[1]))


def _base64(data: bytes) -> bytes:
    if data == b"=":
        return b""  # RFC 5034: "=" is an empty initial response
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise CommandError("Invalid base64 data") from None


@dataclass(frozen=True)
class _Verb:
    parse: Callable[[wire.Command], tuple[Any, ...]]
    handler: Callable[..., bytes | Deferred[bytes] | None]


class POP3Protocol(LineReceiver):
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

    # Slots, not an instance dict: thousands of idle sessions each carry these.
    __slots__ = (
        "state",
        "user",
        "transaction",
        "_pendingUser",
        "_challenge",
        "_logout",
        "_inbuf",
        "_busy",
        "_processing",
        "_discarding",
        "_readPaused",
        "_disconnected",
        "_closing",
        "_badCommands",
        "_producer",
        "_sasl",
        "_saslMechanism",
        "language",
        "utf8",
        "settings",
        "stats",
        "_updateDone",
        "_ended",
        "_lastStreamed",
        "deadline",
        "_timeout",
        "_timedOut",
        "_refusal",
    )

    def __init__(self) -> None:
        #: When the autologout timer ends this session (factory clock seconds).
        self.deadline: float | None = None
        self._timeout: float | None = None
        self._timedOut = False
        self._refusal: Any = None  # the cut-off of a refused connection (a DelayedCall)
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
        self._sasl: Any = None  # the SASL exchange in progress, if any
        self._saslMechanism = ""
        self.language: Language = DEFAULT_LANGUAGE
        self.utf8 = False
        self.settings: UserSettings | None = None
        self.stats = SessionStats()
        self._updateDone = False
        self._ended = False
        self._lastStreamed = 0

    # -- connection events ---------------------------------------------------

    def setTimeout(self, period: float | None) -> None:
        """Log out after C{period} seconds without a command (None: never)."""
        self._timeout = period
        if period is None:
            self.deadline = None
        else:
            self.deadline = self.factory.clock.seconds() + period
            self.factory.autologout.wake(self.deadline)

    def resetTimeout(self) -> None:
        """Activity: restart the autologout period."""
        if self._timeout is not None:
            # Later than before, so the factory's timer needs no telling.
            self.deadline = self.factory.clock.seconds() + self._timeout

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.stats.ip = getattr(peer, "host", None) or getattr(peer, "name", None) or "-"
        self.stats.port = getattr(peer, "port", 0)
        if not self.factory.sessionStarted(self):
            self._closing = True
            self._ended = True  # never counted, nothing to account for
            self.transport.write(wire.err("Too many connections, try again later", "SYS/TEMP"))
            self.transport.loseConnection()
            # Not counted, so no autologout: a client that never takes the
            # answer (over TLS: never does the handshake) is cut after a while.
            self._refusal = self.factory.clock.callLater(self.factory.abortGrace, self._abort)
            return
        if ITCPTransport.providedBy(self.transport):
            # Responses are written whole; don't let Nagle hold the last
            # segment of one back until the client's delayed ACK.
            self.transport.setTcpNoDelay(True)
        self.language = self.factory.language
        greeting = self._t("{implementation} ready.", implementation=self.factory.implementation)
        if self.factory.offersAPOP():
            self._challenge = self.factory.makeChallenge()
            greeting += " " + self._challenge.decode("ascii")
        # Before login a shorter timer: an idle unauthenticated connection
        # costs a slot and gives nothing back.
        self.setTimeout(min(self.factory.loginTimeout, self.factory.timeout))
        self.transport.write(wire.ok(greeting))

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._disconnected = True
        self.setTimeout(None)
        if self._refusal is not None and self._refusal.active():
            self._refusal.cancel()
        if self._producer is not None:
            self._producer.stopProducing()
        if self.state is not State.UPDATE:
            # A session that ends without QUIT removes nothing (RFC 1939 s. 6).
            self._runLogout()
            self._endSession()
        elif self._updateDone:
            self._endSession()
        # else: UPDATE is still removing messages; it ends the session when done.

    def _endSession(self) -> None:
        """Log the logout line and account for the session, once."""
        if self._ended:
            return
        self._ended = True
        stats = self.stats
        stats.tls = self.secure
        if self.transaction is not None and not self._updateDone:
            stats.left = len(self.transaction)
        stats.log(self.factory.logoutFormat)
        self.factory.sessionEnded(self)

    def shutdown(self) -> None:
        """The server is stopping: end this session now, but never in the middle of UPDATE."""
        if self.state is State.UPDATE or self._disconnected:
            return
        self.stats.reason = "shutdown"
        self._closing = True
        self.transport.write(self._err("Server shutting down", "SYS/TEMP"))
        self._abort()

    def timeoutConnection(self) -> None:
        """The autologout timer ran out: say goodbye and close; no command runs after it."""
        if self._timedOut or self._closing:
            # Told to go (by this timer abortGrace ago, or by QUIT or a
            # limit) and still connected: the last reply cannot be delivered
            # (a client that reads nothing, a TLS handshake never made).
            self._abort()
            return
        _log.info(
            "autologout of {user} after {timeout}s idle",
            user=self.user,
            timeout=self.factory.timeout,
        )
        self._timedOut = self._closing = True
        self._timeout = None  # nothing may re-arm the timer now
        self.stats.reason = "timeout"
        self.transport.write(self._err("Disconnected for inactivity"))
        if self._producer is not None:
            self._abort()  # the client is not reading
            return
        self.transport.loseConnection()
        self.deadline = self.factory.clock.seconds() + self.factory.abortGrace
        self.factory.autologout.wake(self.deadline)

    def _abort(self) -> None:
        if hasattr(self.transport, "abortConnection"):
            self.transport.abortConnection()
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
                limit = MAX_SASL_LINE if self._sasl is not None else self.MAX_LENGTH
                eol = buf.find(b"\n")
                if eol < 0:
                    if len(buf) > limit + 1:
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
                if len(line) > limit:
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
        if self._sasl is not None:
            self._sasl = None
            self.transport.write(self._err("Authentication exchange too long"))
            return
        self._badCommand(CommandError("Command line too long"))

    # -- dispatch --------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        self.resetTimeout()
        if self._sasl is not None:
            self._saslResponse(line)
            return
        cmd = wire.parseCommand(line)
        verb = _COMMANDS[self.state].get(cmd.verb)
        self.stats.commands += 1
        if self.factory.metrics is not None:
            # The table's own string: a session keeps no copy of its verbs.
            self.stats.command(_ALL_VERBS.get(cmd.verb, "UNKNOWN"))
        if verb is None:
            if cmd.verb in _ALL_VERBS:
                self._badCommand(CommandError("{verb} is not valid in this state", verb=cmd.verb))
            else:
                self._badCommand(CommandError("Unknown command"))
            return
        try:
            args = verb.parse(cmd)
        except CommandError as e:
            self._badCommand(e)
            return
        self._run(verb.handler, self, *args)

    def _run(self, handler: Callable[..., Any], *args: Any) -> None:
        """Run a handler and send its answer, now or when its Deferred fires."""
        try:
            result = handler(*args)
        except Exception:
            self._reply(Failure())
            return
        if isinstance(result, Deferred):
            self._busy = True
            result.addBoth(self._replyAndGoOn)
        else:
            self._reply(result)

    def _replyAndGoOn(self, result: bytes | Failure | None) -> None:
        try:
            self._reply(result)
        finally:
            self._idle()

    def _reply(self, result: bytes | Failure | None) -> None:
        if isinstance(result, Failure):
            if result.check(ConnectionLost):
                return
            result = errorReply(result, self.language)
        if result and not (self._disconnected or self._timedOut):
            self.transport.write(result)  # (after an autologout's goodbye: nothing)

    def _idle(self, _: object = None) -> None:
        self._busy = False
        if not self._disconnected:
            self._processInput()

    def _badCommand(self, error: POP3Error) -> None:
        self._badCommands += 1
        self.stats.bad_commands += 1
        self.transport.write(errorReply(error, self.language))
        if self._badCommands >= self.factory.maxBadCommands:
            _log.info("closing after {n} bad commands", n=self._badCommands)
            self.stats.reason = "limit"
            self.transport.write(self._err("Too many bad commands, closing connection"))
            self._disconnectNow()

    # -- texts -------------------------------------------------------------------

    def _t(self, template: str, **params: Any) -> str:
        return self.language.text(template, **params)

    def _ok(self, template: str = "", **params: Any) -> bytes:
        return wire.ok(self._t(template, **params) if template else "")

    def _err(self, template: str, code: str | None = None, **params: Any) -> bytes:
        return wire.err(self._t(template, **params), code)

    def _counts(self, count: int, size: int) -> dict[str, str]:
        return {
            "messages": self.language.count(count, "message"),
            "octets": self.language.count(size, "octet"),
        }

    def _disconnectNow(self) -> None:
        self._closing = True
        self.transport.loseConnection()

    # -- AUTHORIZATION ---------------------------------------------------------

    def do_USER(self, name: str) -> bytes:
        if not self.factory.allowPlaintext(self.transport):
            raise PlaintextRefused()
        self._pendingUser = name
        return self._ok("Send your password")

    def do_PASS(self, password: bytes) -> Deferred[bytes]:
        user, self._pendingUser = self._pendingUser, None
        if user is None:
            raise CommandError("Send USER first")
        return self._login(UsernamePassword(user, password), "USER")

    def do_APOP(self, name: str, digest: bytes) -> Deferred[bytes]:
        if self._challenge is None:
            raise CommandError("APOP is not available")
        self._pendingUser = None
        return self._login(APOPCredentials(name, self._challenge, digest), "APOP")

    def _login(self, credentials: Any, mechanism: str) -> Deferred[bytes]:
        started = time.monotonic()
        d = self.factory.portal.login(credentials, None, IMailbox)
        d.addCallback(self._loggedIn, credentials.username, mechanism, started)
        d.addErrback(self._loginFailed, credentials.username, mechanism)
        return d

    def _loggedIn(
        self,
        avatar: tuple[Any, IMailbox, Callable[[], None]],
        user: str,
        mechanism: str,
        started: float,
    ) -> Deferred[bytes] | bytes:
        _, mailbox, logout = avatar
        self._logout = logout
        if self._disconnected:
            self._runLogout()
            return b""
        listed = time.monotonic()
        d = maybeDeferred(mailbox.listMessages)
        d.addCallback(self._opened, mailbox, user, mechanism, listed)
        return d

    def _opened(
        self,
        messages: list[MessageInfo],
        mailbox: IMailbox,
        user: str,
        mechanism: str,
        listed: float,
    ) -> bytes:
        self.factory.observeBackend("list", listed)
        if self._disconnected:
            self._runLogout()
            return b""
        self.transaction = Transaction(mailbox, messages)
        self.state = State.TRANSACTION
        self._challenge = self._pendingUser = None
        self.user = user
        self.stats.user = user
        self.stats.mechanism = mechanism
        self.factory.loginResult("ok", mechanism)
        self.factory.penalty.succeeded(self.stats.ip)
        self.setTimeout(self.factory.timeout)
        self.settings = self.factory.policy.settingsFor(user)
        self.factory.policy.recordLogin(user, self.settings)
        count, size = self.transaction.stat()
        # No log line here: the session's one line is written when it ends.
        return self._ok("Logged in, {messages} ({octets})", **self._counts(count, size))

    def _loginFailed(
        self, failure: Failure, user: str, mechanism: str
    ) -> Failure | Deferred[bytes]:
        # Whatever was taken (a lock) is given back; the state stays AUTHORIZATION.
        self._runLogout()
        if failure.check(MaildropInUse):
            result = "in_use"
        elif failure.check(LoginDelayed):
            result = "login_delay"
        elif failure.check(POP3Error) and not failure.check(AuthenticationFailed):
            result = "error"
        else:
            result = "failed"
        self.factory.loginResult(result, mechanism)
        _log.info(
            "login failed for {user}: {why}",
            user=user,
            why=failure.getErrorMessage() or failure.type.__name__,
        )
        return self._penalize(failure) if result == "failed" else failure

    def _penalize(self, failure: Failure) -> Failure | Deferred[bytes]:
        """Answer a failed login late, the later the more failures came from this address."""
        delay = self.factory.penalty.failed(self.stats.ip)
        if delay <= 0:
            return failure
        if self.factory.metrics is not None:
            self.factory.metrics.authPenalties.inc()
        return deferLater(self.factory.clock, delay, lambda: failure)

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
            self._ok("Capability list follows"),
            (cap.encode("utf-8") + b"\r\n" for cap in self.capabilities()),
        )

    def capabilities(self) -> list[str]:
        """
        RFC 2449 capabilities for the current state and connection: only what
        works here and now (a mechanism no account can use is not listed).
        Every capability the IANA registry announces in "both" states is
        listed after login too; STLS only while it can be used (RFC 2595).
        After login, LOGIN-DELAY and EXPIRE give the user's own values.
        """
        factory = self.factory
        policy = factory.policy
        caps = ["TOP", "UIDL", "RESP-CODES", "PIPELINING"]
        loggedIn = self.state is not State.AUTHORIZATION
        if not loggedIn and factory.tls is not None and not self.secure:
            caps.append("STLS")
        if factory.allowPlaintext(self.transport):
            caps.append("USER")
        mechanisms = self._mechanisms()
        if mechanisms:
            caps.append("SASL " + " ".join(mechanisms))
        caps.append("AUTH-RESP-CODE")
        if loggedIn:
            assert self.settings is not None
            if policy.enforcesLoginDelay:
                caps.append(f"LOGIN-DELAY {self.settings.loginDelay}")
            caps.append(f"EXPIRE {self.settings.expireText()}")
        else:
            settings = policy.defaults
            if policy.enforcesLoginDelay:
                varies = " USER" if policy.variesPerUser("loginDelay") else ""
                caps.append(f"LOGIN-DELAY {settings.loginDelay}{varies}")
            varies = " USER" if policy.variesPerUser("expire") else ""
            caps.append(f"EXPIRE {settings.expireText()}{varies}")
        caps.append("UTF8 USER")
        caps.append("LANG")
        caps.append(f"IMPLEMENTATION {factory.implementation}")
        return caps

    def do_QUIT(self) -> Deferred[bytes] | None:
        implementation = self.factory.implementation
        self.stats.reason = "quit"
        if self.state is State.AUTHORIZATION:
            self.transport.write(
                self._ok("{implementation} signing off", implementation=implementation)
            )
            self._disconnectNow()
            return None
        # TRANSACTION -> UPDATE (RFC 1939 section 6). Anything pipelined after
        # QUIT is ignored.
        self.state = State.UPDATE
        self._closing = True
        self.setTimeout(None)  # UPDATE finishes whatever the client does
        session = self._session()
        assert self.settings is not None
        removals = session.removals(
            expireRetrieved=self.settings.expire == 0,
            receivedBefore=self.factory.policy.expiryCutoff(self.settings),
        )
        started = time.monotonic()
        d = session.commit(removals)
        d.addCallbacks(self._updated, self._updateFailed, callbackArgs=(removals, started))
        return d

    def _updated(
        self, notRemoved: list[MessageInfo], removals: list[MessageInfo], started: float
    ) -> bytes:
        if removals:
            self.factory.observeBackend("remove", started)
        session = self._session()
        self._runLogout()
        self.stats.removed = len(removals) - len(notRemoved)
        self.stats.left = len(session) - self.stats.removed
        self._updateDone = True
        if notRemoved:
            reply = self._err("Some deleted messages not removed", "SYS/TEMP")
        else:
            left = len(session) - len(removals)
            reply = self._ok(
                "{implementation} signing off ({messages} left)",
                implementation=self.factory.implementation,
                messages=self.language.count(left, "message"),
            )
        if notRemoved:
            _log.warn(
                "{user}: {failed} of {marked} deleted messages could not be removed",
                user=self.user,
                marked=len(removals),
                failed=len(notRemoved),
            )
        if not self._disconnected:
            self.transport.write(reply)
            self.transport.loseConnection()
        else:
            self._endSession()
        return b""

    def _updateFailed(self, failure: Failure) -> bytes:
        _log.failure("UPDATE failed for {user}", failure, user=self.user)
        self._runLogout()
        self._updateDone = True
        self.stats.reason = "error"
        if not self._disconnected:
            self.transport.write(self._err("Some deleted messages not removed", "SYS/TEMP"))
            self.transport.loseConnection()
        else:
            self._endSession()
        return b""

    # -- SASL (RFC 5034) -------------------------------------------------------

    @property
    def secure(self) -> bool:
        """Is this connection encrypted (implicit TLS or after STLS)?"""
        return tlsConnection(self.transport) is not None

    def _saslContext(self) -> SASLContext:
        factory = self.factory
        connection = tlsConnection(self.transport)
        if connection is None:
            return SASLContext(factory.secrets, factory.hostname)
        external = None
        if factory.tls is not None:
            external = factory.tls.clientUser(connection, factory.certUserField)
        return SASLContext(
            factory.secrets,
            factory.hostname,
            tls=True,
            channelBinding=serverEndPointBinding(connection),
            externalUser=external,
        )

    def _mechanisms(self) -> dict[str, ISASLMechanism]:
        """The SASL mechanisms that can succeed and are allowed on this connection."""
        factory = self.factory
        plaintext = factory.allowPlaintext(self.transport)
        context = self._saslContext()
        return {
            name: m
            for name, m in factory.mechanisms.items()
            if (plaintext or not m.plaintext) and m.available(context)
        }

    def do_AUTH(self, mechanism: str | None, initial: bytes | None) -> bytes | Deferred[bytes]:
        if mechanism is None:
            return self._streamLines(
                self._ok("Mechanism list follows"),
                (name.encode("ascii") + b"\r\n" for name in self._mechanisms()),
            )
        context = self._saslContext()
        chosen = self._mechanisms().get(mechanism)
        if chosen is None:
            known = self.factory.mechanisms.get(mechanism)
            if known is not None and known.plaintext and known.available(context):
                raise PlaintextRefused()
            raise CommandError("Unsupported authentication mechanism")
        self._pendingUser = None
        self._sasl = chosen.exchange(context)
        self._saslMechanism = chosen.name
        return self._saslStep(initial)

    def _saslResponse(self, line: bytes) -> None:
        if line == b"*":
            self._sasl = None
            self.transport.write(self._err("Authentication cancelled"))
            return
        try:
            data = base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            self._sasl = None
            self.transport.write(self._err("Invalid base64 data"))
            return
        self._run(self._saslStep, data)

    def _saslStep(self, data: bytes | None) -> Deferred[bytes]:
        d = maybeDeferred(self._sasl.step, data)
        # The errback sees failures of the exchange itself; a failed login at
        # its end is _loginFailed's, like any other.
        d.addCallbacks(self._saslNext, self._saslFailed)
        return d

    def _saslNext(self, result: Any) -> bytes | Deferred[bytes]:
        if isinstance(result, Challenge):
            return b"+ " + base64.b64encode(result.data) + b"\r\n"
        self._sasl = None
        return self._login(result.credentials, self._saslMechanism)

    def _saslFailed(self, failure: Failure) -> Failure | Deferred[bytes]:
        self._sasl = None
        self.factory.loginResult("failed", self._saslMechanism)
        return self._penalize(failure)

    # -- RFC 2595: STLS ----------------------------------------------------------

    def do_STLS(self) -> None:
        tls = self.factory.tls
        if tls is None:
            raise CommandError("STLS is not available")
        if self.secure:
            raise CommandError("TLS is already active")
        self.transport.write(self._ok("Begin TLS negotiation"))
        # Anything the client pipelined behind STLS arrived in the clear and
        # must not be executed as if it came over TLS (CVE-2011-0411 class).
        discarded = len(self._inbuf)
        del self._inbuf[:]
        self._discarding = False
        if discarded:
            _log.warn("discarded {n} bytes sent in the clear after STLS", n=discarded)
        # RFC 2595 section 4: forget what the client said before TLS.
        self._pendingUser = None
        self._sasl = None
        self.utf8 = False
        self.language = self.factory.language
        self.transport.startTLS(tls)

    # -- RFC 6856: UTF8 and LANG -----------------------------------------------

    def do_UTF8(self) -> bytes:
        self.utf8 = True
        return self._ok("UTF-8 mode enabled")

    def do_LANG(self, requested: str | None) -> bytes | Deferred[bytes]:
        if requested is None:
            return self._streamLines(
                self._ok("Language listing follows"),
                (f"{tag} {lang.description}\r\n".encode() for tag, lang in LANGUAGES.items()),
            )
        language = negotiate(requested, self.factory.language)
        if language is None:
            raise CommandError("Invalid language")
        self.language = language
        return wire.ok(f"{language.tag} {language.changed}")

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
            self._ok("{messages} ({octets})", **self._counts(count, size)),
            session.listingChunks(sizes=True),
        )

    def do_UIDL(self, number: int | None) -> bytes | Deferred[bytes]:
        session = self._session()
        if number is not None:
            return wire.ok(f"{number} {session.get(number).uid}")
        return self._streamLines(
            self._ok("Unique-ID listing follows"), session.listingChunks(sizes=False)
        )

    def do_RETR(self, number: int) -> Deferred[bytes]:
        session = self._session()
        info = session.get(number)
        # The status line stays "<size> octets" in every language: clients parse it.
        d = self._streamMessage(info, wire.ok(f"{info.size} octets"), None)
        return d.addCallback(self._retrieved, number)

    def _retrieved(self, result: bytes, number: int) -> bytes:
        self._session().retrieved(number)
        self.stats.retr += 1
        self.stats.retr_bytes += self._lastStreamed
        return result

    def do_TOP(self, number: int, lines: int) -> Deferred[bytes]:
        info = self._session().get(number)
        d = self._streamMessage(info, self._ok("Top of message follows"), lines)
        return d.addCallback(self._topped)

    def _topped(self, result: bytes) -> bytes:
        self.stats.top += 1
        self.stats.top_bytes += self._lastStreamed
        return result

    def do_DELE(self, number: int) -> bytes:
        self._session().delete(number)
        self.stats.dele += 1
        return self._ok("Message {number} deleted", number=number)

    def do_NOOP(self) -> bytes:
        return wire.ok()

    def do_RSET(self) -> bytes:
        session = self._session()
        session.reset()
        count, size = session.stat()
        return self._ok("Maildrop has {messages} ({octets})", **self._counts(count, size))

    # -- streamed responses ----------------------------------------------------

    def _streamMessage(
        self, info: MessageInfo, status: bytes, topLines: int | None
    ) -> Deferred[bytes]:
        started = time.monotonic()
        d = maybeDeferred(self._session().mailbox.openMessage, info)
        d.addCallback(self._startMessage, status, topLines, started)
        return d

    def _startMessage(
        self, reader: Any, status: bytes, topLines: int | None, started: float
    ) -> Deferred[bytes] | bytes:
        self.factory.observeBackend("open", started)
        if self._disconnected or self._timedOut:
            reader.close()
            return b""
        producer = MessageProducer(
            self.transport, reader, status, topLines, onProgress=self.resetTimeout
        )
        return self._runProducer(producer)

    def _streamLines(self, status: bytes, lines: Iterable[bytes]) -> Deferred[bytes]:
        """A multi-line response from lines (or from chunks of whole lines)."""
        return self._runProducer(
            LinesProducer(self.transport, iter(lines), status, onProgress=self.resetTimeout)
        )

    def _runProducer(self, producer: MessageProducer | LinesProducer) -> Deferred[bytes]:
        self._producer = producer
        d = producer.start()
        d.addBoth(self._producerDone)
        return d

    def _producerDone(self, result: None | Failure) -> bytes:
        assert self._producer is not None
        self._lastStreamed = self._producer.written
        self.stats.bytes_out += self._producer.written
        self._producer = None
        if isinstance(result, Failure) and not result.check(ConnectionLost):
            # The +OK line is out: a -ERR now would be read as message data.
            # Cut the connection so the client sees an incomplete response.
            _log.failure("storage failed while streaming to {user}", result, user=self.user)
            self.stats.reason = "error"
            self._closing = True
            self._abort()
        return b""


_AUTH = {
    "USER": _Verb(_userName, POP3Protocol.do_USER),
    "PASS": _Verb(_password, POP3Protocol.do_PASS),
    "APOP": _Verb(_apop, POP3Protocol.do_APOP),
    "AUTH": _Verb(_auth, POP3Protocol.do_AUTH),
    "STLS": _Verb(_noArgs, POP3Protocol.do_STLS),
    "CAPA": _Verb(_noArgs, POP3Protocol.do_CAPA),
    "UTF8": _Verb(_noArgs, POP3Protocol.do_UTF8),
    "LANG": _Verb(_optionalWord, POP3Protocol.do_LANG),
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
    "LANG": _Verb(_optionalWord, POP3Protocol.do_LANG),
    "QUIT": _Verb(_noArgs, POP3Protocol.do_QUIT),
}
_COMMANDS: dict[State, dict[str, _Verb]] = {
    State.AUTHORIZATION: _AUTH,
    State.TRANSACTION: _TRANSACTION,
    State.UPDATE: {},
}
_ALL_VERBS = {verb: verb for verb in (*_AUTH, *_TRANSACTION)}


def _alwaysAllowed(transport: object) -> bool:
    return True


class POP3Factory(Factory):
    """
    Builds L{POP3Protocol}s sharing one portal and one configuration. Listen
    on it with any server endpoint.

    @param portal: a Portal whose realm provides L{IMailbox} avatars.
    @param clock: the time source for timers (the reactor; a Clock in tests).
    @param timeout: autologout after this many idle seconds (RFC 1939: >= 600).
    @param hostname: the host part of the APOP and CRAM-MD5 challenges.
    @param apop: offer APOP (a timestamp in the greeting); by default, when the
        portal can check APOP credentials.
    @param maxBadCommands: close the connection after this many bad commands.
    @param mechanisms: the SASL mechanisms to offer, by name (default: all that
        can succeed with the portal's checker).
    @param secrets: where SCRAM keys and the kinds of stored secrets come from
        (default: the first of the portal's checkers that provides
        L{ISecretSource}).
    @param policy: LOGIN-DELAY and EXPIRE; share it with the realm so that the
        delay is enforced.
    @param language: the language of response texts until LANG changes it.
    @param allowPlaintext: C{allowPlaintext(transport)} says whether USER/PASS
        and plaintext SASL mechanisms may be used on a connection (see
        L{popserv.tls.PlaintextPolicy}).
    @param tls: the server's TLS settings: offer STLS and use them for
        implicit-TLS listeners.
    @param certUserField: how a verified client certificate names its user
        for SASL EXTERNAL: C{cn}, C{email} or C{dns}.
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
        mechanisms: dict[str, ISASLMechanism] | None = None,
        secrets: ISecretSource | None = None,
        policy: SessionPolicy | None = None,
        language: Language = DEFAULT_LANGUAGE,
        allowPlaintext: Callable[[Any], bool] = _alwaysAllowed,
        tls: ServerTLS | None = None,
        certUserField: str = "cn",
        metrics: Metrics | None = None,
        logoutFormat: str = DEFAULT_LOGOUT_FORMAT,
        loginTimeout: int = DEFAULT_LOGIN_TIMEOUT,
        limits: ConnectionLimits | None = None,
        penalty: AuthPenalty | None = None,
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
        if mechanisms is None:
            mechanisms = {m.name: m for m in ALL_MECHANISMS}
        self.mechanisms = mechanisms
        if secrets is None:
            secrets = next(
                (c for c in set(portal.checkers.values()) if ISecretSource.providedBy(c)), None
            )
        self.secrets = secrets
        self.policy = policy or SessionPolicy(clock)
        self.language = language
        self.allowPlaintext = allowPlaintext
        self.tls = tls
        self.certUserField = certUserField
        self.metrics = metrics
        self.logoutFormat = logoutFormat
        self.loginTimeout = loginTimeout
        self.limits = limits or ConnectionLimits()
        self.penalty = penalty or AuthPenalty(clock)
        #: The connections open now (for graceful shutdown).
        self.sessions: set[POP3Protocol] = set()
        self.autologout = AutologoutTimer(clock, lambda: self.sessions)
        #: Seconds a logged-out connection gets to go before it is cut.
        self.abortGrace: float = ABORT_GRACE
        self._drained: Deferred[None] | None = None

    # -- accounting ----------------------------------------------------------

    def sessionStarted(self, protocol: POP3Protocol) -> bool:
        """Admit a new connection (False: over a connection limit)."""
        if not self.limits.admit(protocol.stats.ip):
            _log.info("refused a connection from {ip}: connection limit", ip=protocol.stats.ip)
            return False
        self.sessions.add(protocol)
        if self.metrics is not None:
            self.metrics.open.inc()
            self.metrics.connections.labels("yes" if protocol.secure else "no").inc()
        return True

    def sessionEnded(self, protocol: POP3Protocol) -> None:
        self.sessions.discard(protocol)
        if not self.sessions:
            self.autologout.stop()  # nobody left to log out: no timer left behind
        self.limits.release(protocol.stats.ip)
        if self.metrics is not None:
            self.metrics.sessionEnded(protocol.stats, protocol.stats.fields()["duration"])
        if self._drained is not None and not self.sessions:
            drained, self._drained = self._drained, None
            drained.callback(None)

    def loginResult(self, result: str, mechanism: str) -> None:
        if self.metrics is not None:
            self.metrics.logins.labels(result, mechanism).inc()
            if result == "in_use":
                self.metrics.lockConflicts.inc()

    def observeBackend(self, operation: str, started: float) -> None:
        if self.metrics is not None:
            self.metrics.backend.labels(operation).observe(time.monotonic() - started)

    def drain(self, grace: float) -> Deferred[None]:
        """
        Fire when every session has ended; after C{grace} seconds, end the
        ones still open (never one that is applying its UPDATE).
        """
        if not self.sessions:
            return succeed(None)
        self._drained = Deferred()
        timer = self.clock.callLater(grace, self._forceEnd)

        def cancelTimer(result: object) -> object:
            if timer.active():
                timer.cancel()
            return result

        return self._drained.addBoth(cancelTimer)

    def _forceEnd(self) -> None:
        _log.info("shutdown: ending {n} open sessions", n=len(self.sessions))
        for protocol in list(self.sessions):
            protocol.shutdown()

    def offersAPOP(self) -> bool:
        """APOP only if enabled and some account holds the shared secret it needs."""
        if not self.apop:
            return False
        return self.secrets is None or "plaintext" in self.secrets.secretKinds()

    def makeChallenge(self) -> bytes:
        """A greeting timestamp unique to this connection (RFC 1939 section 7)."""
        stamp = f"<{secrets.token_hex(8)}.{int(self.clock.seconds() or time.time())}"
        return f"{stamp}@{self.hostname}>".encode("ascii", "replace")
