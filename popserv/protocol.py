"""
The POP3 wire protocol (RFC 1939, with RFC 2449 CAPA, PIPELINING and response
codes): L{POP3Protocol}, one connection, and L{POP3Factory}, what they share.

A connection is built in layers, each in its own module:

  - L{popserv.pipeline}: framing, dispatch, answers in order, back-pressure,
    the lifecycle, streamed responses, response texts;
  - L{popserv.commands}: argument parsers, the C{@command} declaration, the
    per-class command tables and CAPA;
  - L{popserv.login}: the AUTHORIZATION state: USER/PASS, APOP, SASL, STLS;
  - L{popserv.transaction}: the TRANSACTION commands, QUIT and UPDATE;
  - L{popserv.states}: the RFC 1939 L{State} and the connection's L{Lifecycle};
  - L{popserv.recorder}: the session's counters, metrics and logout line;
  - this module: connection events, the autologout and shutdown, CAPA, UTF8
    and LANG, and the capabilities that come with no command.

It knows nothing about files or password stores: it logs in through a
C{Portal} and talks to an L{IMailbox} whose methods may return Deferreds.
"""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime, ITCPTransport
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from popserv import commands, wire
from popserv._version import __version__
from popserv.autologout import AutologoutTimer
from popserv.commands import APOP_DIGEST_LENGTH, MAX_NUMBER_DIGITS, Capability, command
from popserv.errors import AutologoutExpired, CommandError, ShuttingDown, TooManyConnections
from popserv.i18n import DEFAULT_LANGUAGE, LANGUAGES, Language, negotiate
from popserv.interfaces import IRelayedSession
from popserv.limits import (
    DEFAULT_LOGIN_TIMEOUT,
    DEFAULT_MAX_BAD_COMMANDS,
    DEFAULT_TIMEOUT,
    AuthPenalty,
    ConnectionLimits,
)
from popserv.logs import DEFAULT_LOGOUT_FORMAT
from popserv.metrics import Metrics
from popserv.pipeline import MAX_BUFFERED_INPUT, MAX_SASL_LINE
from popserv.policy import SessionPolicy
from popserv.sasl import ALL_MECHANISMS, ISASLMechanism, ISecretSource
from popserv.states import Lifecycle, State
from popserv.tls import ServerTLS
from popserv.transaction import TransactionCommands

__all__ = [
    "State",
    "Lifecycle",
    "POP3Protocol",
    "POP3Factory",
    "DEFAULT_TIMEOUT",
    "DEFAULT_LOGIN_TIMEOUT",
    "DEFAULT_MAX_BAD_COMMANDS",
    "ABORT_GRACE",
    "MAX_BUFFERED_INPUT",
    "MAX_NUMBER_DIGITS",
    "APOP_DIGEST_LENGTH",
    "MAX_SASL_LINE",
]

_log = Logger()

#: Seconds a logged-out connection may take to receive its goodbye and go
#: before it is cut (a client that reads nothing, a TLS handshake never made).
ABORT_GRACE = 30

#: Random bytes drawn at once for the APOP challenges of 512 connections.
_RANDOM_POOL = 8 * 512


def _loginDelay(protocol: POP3Protocol) -> str | None:
    policy = protocol.factory.policy
    if not policy.enforcesLoginDelay:
        return None
    if protocol.settings is not None:  # after login: the user's own value
        return f"LOGIN-DELAY {protocol.settings.loginDelay}"
    varies = " USER" if policy.variesPerUser("loginDelay") else ""
    return f"LOGIN-DELAY {policy.defaults.loginDelay}{varies}"


def _expire(protocol: POP3Protocol) -> str:
    policy = protocol.factory.policy
    if protocol.settings is not None:
        return f"EXPIRE {protocol.settings.expireText()}"
    varies = " USER" if policy.variesPerUser("expire") else ""
    return f"EXPIRE {policy.defaults.expireText()}{varies}"


def _implementation(protocol: POP3Protocol) -> str:
    return f"IMPLEMENTATION {protocol.factory.implementation}"


class POP3Protocol(TransactionCommands):
    """
    One POP3 connection: its events, its timers, and the commands valid in
    any state. Subclass it to override a command (C{do_RETR}) or to add one
    (a method declared with L{popserv.commands.command}).
    """

    #: Capabilities that come with no command (RFC 2449 section 6); those of
    #: commands are declared with them. Every capability the IANA registry
    #: announces in "both" states is listed after login too.
    CAPABILITIES = (
        Capability("RESP-CODES", rank=30),
        Capability("PIPELINING", rank=40),
        Capability("AUTH-RESP-CODE", rank=80),
        Capability(_loginDelay, rank=90),
        Capability(_expire, rank=100),
        Capability(_implementation, rank=1000),
    )

    __slots__ = ("_refusal",)

    def __init__(self) -> None:
        super().__init__()
        self._refusal: Any = None  # the cut-off of a refused connection (a DelayedCall)

    # -- connection events ---------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        stats = self.stats
        stats.ip = getattr(peer, "host", None) or getattr(peer, "name", None) or "-"
        stats.port = getattr(peer, "port", 0)
        stats.metrics = self.factory.metrics
        if not self.factory.sessionStarted(self):
            self._moveTo(Lifecycle.REFUSED)  # never counted, nothing to account for
            self.transport.write(self._fail(TooManyConnections()))
            self.transport.loseConnection()
            # Not counted, so no autologout: a client that never takes the
            # answer (over TLS: never does the handshake) is cut after a while.
            self._refusal = self.factory.clock.callLater(self.factory.abortGrace, self._abort)
            return
        if stats.metrics is not None:  # (no TLS lookup for nothing)
            stats.opened(self.secure)
        if ITCPTransport.providedBy(self.transport):
            # Responses are written whole; don't let Nagle hold the last
            # segment of one back until the client's delayed ACK.
            self.transport.setTcpNoDelay(True)
        factory = self.factory
        self.language = language = factory.language
        key = (language.tag, factory.implementation)
        greeting = factory._greetings.get(key)
        if greeting is None:
            greeting = self._t("{implementation} ready.", implementation=factory.implementation)
            factory._greetings[key] = greeting
        if factory.offersAPOP():
            self._challenge = factory.makeChallenge()
            greeting += " " + self._challenge.decode("ascii")
        # Before login a shorter timer: an idle unauthenticated connection
        # costs a slot and gives nothing back.
        self.setTimeout(min(self.factory.loginTimeout, self.factory.timeout))
        self._watchOutput()
        self.transport.write(wire.ok(greeting))

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.setTimeout(None)
        if self._refusal is not None and self._refusal.active():
            self._refusal.cancel()
        lifecycle = self.lifecycle
        if lifecycle is Lifecycle.UPDATING:
            # UPDATE is still removing messages; it ends the session when done.
            self._moveTo(Lifecycle.ABANDONED)
            return
        if lifecycle is not Lifecycle.REFUSED:
            # First of all: no pipelined command may run once the client is
            # gone (stopping a stream below lets the pipeline go on).
            self._moveTo(Lifecycle.LOST)
        if self._producer is not None:
            self._producer.stopProducing()
        if self.state is not State.UPDATE:
            # A session that ends without QUIT removes nothing (RFC 1939 s. 6).
            self._runLogout()
        self._endSession()

    def _endSession(self) -> None:
        """The connection is gone: log the logout line and account for the session, once."""
        lifecycle = self.lifecycle
        if lifecycle is Lifecycle.ENDED:
            return
        self._moveTo(Lifecycle.ENDED)
        if lifecycle is Lifecycle.REFUSED:
            return  # never counted
        if self.transaction is not None and self.state is not State.UPDATE:
            self.stats.left = len(self.transaction)
        self.stats.ended(self.factory.logoutFormat, self.secure)
        self.factory.sessionEnded(self)

    def shutdown(self) -> None:
        """The server is stopping: end this session now, but never in the middle of UPDATE."""
        if self.state is State.UPDATE or not self.lifecycle.connected:
            return
        self.stats.reason = "shutdown"
        self._close()
        if not IRelayedSession.providedBy(self._logout):  # (a relay's stream is the backend's)
            self.transport.write(self._fail(ShuttingDown()))
        self._abort()

    def timeoutConnection(self) -> None:
        """The autologout timer ran out: say goodbye and close; no command runs after it."""
        if self.lifecycle is not Lifecycle.OPEN:
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
        self._moveTo(Lifecycle.TIMED_OUT)
        self._timeout = None  # nothing may re-arm the timer now
        self.stats.reason = "timeout"
        if IRelayedSession.providedBy(self._logout):
            # A relay: a line of ours would land inside the backend's stream
            # (a multi-line reply in progress); the client sees the close only.
            self._abort()
            return
        self.transport.write(self._fail(AutologoutExpired()))
        if self._producer is not None:
            self._abort()  # the client is not reading
            return
        self.transport.loseConnection()
        self.deadline = self.factory.clock.seconds() + self.factory.abortGrace
        self.factory.autologout.wake(self.deadline)

    # -- any state -----------------------------------------------------------------

    @command("CAPA")
    def do_CAPA(self) -> Deferred[bytes]:
        return self._streamLines(
            self._ok("Capability list follows"),
            (cap.encode("utf-8") + b"\r\n" for cap in self.capabilities()),
        )

    # -- RFC 6856: UTF8 and LANG -------------------------------------------------

    @command("UTF8", states=(State.AUTHORIZATION,), capability=Capability("UTF8 USER", rank=110))
    def do_UTF8(self) -> bytes:
        self.utf8 = True
        return self._ok("UTF-8 mode enabled")

    @command("LANG", parse=commands.optionalWord, capability=Capability("LANG", rank=120))
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
        self._random, self._randomAt = b"", 0  # see makeChallenge
        self._greetings: dict[tuple[str, str], str] = {}  # (language, implementation)

    # -- accounting ----------------------------------------------------------

    def sessionStarted(self, protocol: POP3Protocol) -> bool:
        """Admit a new connection (False: over a connection limit)."""
        if not self.limits.admit(protocol.stats.ip):
            _log.info("refused a connection from {ip}: connection limit", ip=protocol.stats.ip)
            return False
        self.sessions.add(protocol)
        return True

    def sessionEnded(self, protocol: POP3Protocol) -> None:
        """A session admitted by L{sessionStarted} has ended (its report is made)."""
        self.sessions.discard(protocol)
        if not self.sessions:
            self.autologout.stop()  # nobody left to log out: no timer left behind
        self.limits.release(protocol.stats.ip)
        if self._drained is not None and not self.sessions:
            drained, self._drained = self._drained, None
            drained.callback(None)

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
        # 8 random bytes, as secrets.token_hex(8) gives, cut from a pool: one
        # getrandom() call per 512 connections rather than one each.
        at = self._randomAt
        if at >= len(self._random):
            self._random, at = secrets.token_bytes(_RANDOM_POOL), 0
        self._randomAt = at + 8
        stamp = f"<{self._random[at : at + 8].hex()}.{int(self.clock.seconds() or time.time())}"
        return f"{stamp}@{self.hostname}>".encode("ascii", "replace")
