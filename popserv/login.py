"""
The AUTHORIZATION state: USER/PASS, APOP, SASL (RFC 5034) and STLS (RFC
2595), and the one login flow they all end in::

    _login -> _loggedIn -> _opened            (TRANSACTION)
           \\-> _loginFailed -> _penalize      (still AUTHORIZATION)

The protocol never sees a password store: credentials go to the factory's
C{Portal}, which hands back a locked L{IMailbox} and its logout.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from popserv import commands
from popserv.auth.credentials import APOPCredentials, UsernamePassword
from popserv.commands import Capability, command
from popserv.errors import (
    AuthenticationCancelled,
    AuthenticationFailed,
    CommandError,
    LoginDelayed,
    MaildropInUse,
    PlaintextRefused,
    POP3Error,
    TemporaryFailure,
)
from popserv.interfaces import IMailbox, IRelayedSession, LoginMind, MessageInfo
from popserv.pipeline import PENDING, CommandPipeline, fired
from popserv.policy import UserSettings
from popserv.sasl import Challenge, ISASLMechanism, SASLContext
from popserv.session import Transaction
from popserv.states import Lifecycle, State
from popserv.tls import serverEndPointBinding, tlsConnection

__all__ = ["Authorization"]

_log = Logger()

_AUTHORIZATION = (State.AUTHORIZATION,)


def _stlsOffered(protocol: Authorization) -> str | None:
    # RFC 2595 section 4: only while it can be used.
    offered = (
        protocol.state is State.AUTHORIZATION
        and protocol.factory.tls is not None
        and not protocol.secure
    )
    return "STLS" if offered else None


def _userOffered(protocol: Authorization) -> str | None:
    return "USER" if protocol.factory.allowPlaintext(protocol.transport) else None


def _saslOffered(protocol: Authorization) -> str | None:
    mechanisms = protocol._mechanisms()
    return "SASL " + " ".join(mechanisms) if mechanisms else None


class Authorization(CommandPipeline):
    """
    The login commands, and the login flow that ends in the TRANSACTION state.

    @ivar user: the logged-in user (None before login).
    @ivar transaction: the session's view of the maildrop, from login on.
    @ivar settings: the user's LOGIN-DELAY and EXPIRE, from login on.
    """

    __slots__ = (
        "user",
        "transaction",
        "settings",
        "_pendingUser",
        "_challenge",
        "_logout",
        "_saslMechanism",
    )

    def __init__(self) -> None:
        super().__init__()
        self.user: str | None = None
        self.transaction: Transaction | None = None
        self.settings: UserSettings | None = None
        self._pendingUser: str | None = None
        self._challenge: bytes | None = None
        self._logout: Callable[[], None] | None = None
        self._saslMechanism = ""

    # -- USER/PASS and APOP (RFC 1939 section 7) -------------------------------

    @command(
        "USER",
        states=_AUTHORIZATION,
        parse=commands.userName,
        capability=Capability(_userOffered, rank=60),
    )
    def do_USER(self, name: str) -> bytes:
        if not self.factory.allowPlaintext(self.transport):
            raise PlaintextRefused()
        self._pendingUser = name
        return self._ok("Send your password")

    @command("PASS", states=_AUTHORIZATION, parse=commands.password)
    def do_PASS(self, password: bytes) -> Deferred[bytes]:
        user, self._pendingUser = self._pendingUser, None
        if user is None:
            raise CommandError("Send USER first")
        return self._inTurn(self._login, UsernamePassword(user, password), "USER")

    @command("APOP", states=_AUTHORIZATION, parse=commands.apop)
    def do_APOP(self, name: str, digest: bytes) -> Deferred[bytes]:
        if self._challenge is None:
            raise CommandError("APOP is not available")
        self._pendingUser = None
        return self._inTurn(self._login, APOPCredentials(name, self._challenge, digest), "APOP")

    # -- the login flow ----------------------------------------------------------

    def _inTurn(self, attempt: Callable[..., Any], *args: Any) -> Any:
        """
        Make a login attempt (check credentials) when this address's failed
        logins allow (L{popserv.limits.AuthPenalty.admit}): at once for
        nearly all; never if the client left meanwhile.
        """
        wait = self.factory.penalty.admit(self.stats.ip)
        if wait <= 0:
            return attempt(*args)
        self.stats.penalized()
        return deferLater(self.factory.clock, wait, self._ifStillHere, attempt, args)

    def _ifStillHere(self, attempt: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        if self.lifecycle is not Lifecycle.OPEN:
            return b""  # gone (or told to go): nothing is checked
        return attempt(*args)

    def _login(self, credentials: Any, mechanism: str) -> Deferred[bytes]:
        started = time.monotonic()
        d = self.factory.portal.login(
            credentials, LoginMind(credentials, self.transport), IMailbox
        )
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
        interface, mailbox, logout = avatar
        self._logout = logout
        if interface is IRelayedSession:
            return self._relayed(mailbox, getattr(logout, "avatarId", user), mechanism)
        # The auth source's name for the user (a realm of popserv's says it):
        # the maildrop, the settings and the login record go by it.
        user = getattr(logout, "avatarId", user)
        if self.lifecycle is not Lifecycle.OPEN:
            # Gone, or told to go (the autologout's goodbye came first):
            # what the login took is given back, no maildrop is opened.
            self._runLogout()
            return b""
        listed = time.monotonic()
        d = maybeDeferred(mailbox.listMessages)
        messages = fired(d)  # a cached listing: no callback chain
        if messages is not PENDING:
            return self._opened(messages, mailbox, user, mechanism, listed)
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
        factory = self.factory
        self.stats.backend("list", listed)
        if self.lifecycle is not Lifecycle.OPEN:
            self._runLogout()
            return b""
        self.transaction = Transaction(mailbox, messages)
        # The realm's lookup, if it made one: once per login is enough.
        settings = getattr(self._logout, "settings", None)
        self.settings = settings or factory.policy.settingsFor(user)
        self._enterTransaction(user, mechanism, self.settings)
        count, size = self.transaction.stat()
        # No log line here: the session's one line is written when it ends.
        return self._ok("Logged in, {messages} ({octets})", **self._counts(count, size))

    def _enterTransaction(self, user: str, mechanism: str, settings: Any) -> None:
        """The login succeeded: the TRANSACTION state, its timer and records."""
        factory = self.factory
        self.state = State.TRANSACTION
        self._challenge = self._pendingUser = None
        self.user = user
        self.stats.loggedIn(user, mechanism)
        factory.penalty.succeeded(self.stats.ip)
        self.setTimeout(factory.timeout)
        factory.policy.recordLogin(user, settings)

    def _relayed(self, session: Any, user: str, mechanism: str) -> bytes:
        """
        The proxy mode: the user was logged in at another server. Its +OK
        goes to the client, and from now on the session is a byte relay:
        this protocol parses nothing more and only keeps the idle timer and
        the logout line (see L{popserv.proxy}).
        """
        if self.lifecycle is not Lifecycle.OPEN:
            self._runLogout()
            return b""
        self.stats.backend_host = session.backendName
        self._enterTransaction(user, mechanism, session.settings)
        self.transport.write(session.greeting)
        leftover = bytes(self._inbuf)
        del self._inbuf[:]
        self._releaseOutput()  # (the relay's back-pressure is the transport's now)
        if self._readPaused:
            self._readPaused = False
            self.transport.resumeProducing()
        # An instance attribute: the transport's calls go straight to the relay.
        self.dataReceived = session.start(self.transport, leftover, self.stats, self.resetTimeout)
        return b""

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
        self.stats.loginFailed(result, mechanism)
        _log.info(
            "login failed for {user}: {why}",
            user=user,
            why=failure.getErrorMessage() or failure.type.__name__,
        )
        if result == "failed" or getattr(failure.value, "penalize", False):
            return self._penalize(failure)
        return failure

    def _penalize(self, failure: Failure) -> Failure | Deferred[bytes]:
        """Answer a failed login late, the later the more failures came from this address."""
        delay = self.factory.penalty.failed(self.stats.ip)
        if isinstance(delay, Deferred):  # counted in a shared place
            return delay.addCallback(self._penalized, failure)
        return self._penalized(delay, failure)

    def _penalized(self, delay: float, failure: Failure) -> Failure | Deferred[bytes]:
        if delay <= 0:
            return failure
        self.stats.penalized()
        return deferLater(self.factory.clock, delay, lambda: failure)

    def _runLogout(self) -> Any:
        """Release what the login took; what the logout returned (a Deferred of the release)."""
        logout, self._logout = self._logout, None
        if logout is not None:
            try:
                return logout()
            except Exception:
                _log.failure("error in logout")
        return None

    # -- SASL (RFC 5034) -----------------------------------------------------------

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

    @command(
        "AUTH",
        states=_AUTHORIZATION,
        parse=commands.auth,
        capability=Capability(_saslOffered, rank=70),
    )
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
        return self._inTurn(self._saslStep, initial)

    def _saslResponse(self, line: bytes) -> None:
        if line == b"*":
            self._sasl = None
            self.transport.write(self._fail(AuthenticationCancelled()))
            return
        try:
            data = base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            self._sasl = None
            self.transport.write(self._fail(CommandError("Invalid base64 data")))
            return
        self._run(self._saslStep, data)

    def _saslTooLong(self) -> None:
        self._sasl = None
        self.transport.write(self._fail(CommandError("Authentication exchange too long")))

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
        # A source, identity provider or keytab that is down is no failed
        # login (unless a source also refused the client), as for USER/PASS.
        if failure.check(TemporaryFailure) and not failure.value.penalize:
            self.stats.loginFailed("error", self._saslMechanism)
            return failure
        self.stats.loginFailed("failed", self._saslMechanism)
        return self._penalize(failure)

    # -- RFC 2595: STLS ------------------------------------------------------------

    @command("STLS", states=_AUTHORIZATION, capability=Capability(_stlsOffered, rank=50))
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
