"""
The proxy's realm and its routing: which users are proxied, to which
backends, and the login there, in place of opening a maildrop.

L{ProxyRealm} wraps the server's own realm. For a user its L{Router} routes,
it logs in to the backend and hands back an L{IRelayedSession} avatar; the
protocol answers with the backend's C{+OK} and relays from then on. Every
other user goes to the wrapped realm, unchanged.

LOGIN-DELAY and the failed-login penalty apply here, at the front, only:
the backends behind a proxy should turn theirs off (Dovecot does the same
for its proxied backends: C{auth_penalty} is off for logins that come
from C{login_trusted_networks}).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from popserv.errors import AuthenticationFailed, POP3Error, ResponseCode, TemporaryFailure
from popserv.interfaces import IRelayedSession, UnverifiedUser
from popserv.policy import IUserSettingsSource, SessionPolicy
from popserv.popurl import IMPLICIT_TLS, PLAIN_TLS, STARTTLS, PopURL
from popserv.proxy.client import BackendRefused, LoginAs
from popserv.proxy.connect import BackendConnector
from popserv.proxy.proxyv2 import proxyHeader
from popserv.proxy.relay import RelayedSession

__all__ = [
    "Route",
    "Router",
    "ProxyRealm",
    "ForwardingChecker",
    "BackendAnswer",
    "DEFAULT_PROXY_TIMEOUT",
]

_log = Logger()

#: Seconds to reach and log in to a backend (the whole list), as Dovecot's default.
DEFAULT_PROXY_TIMEOUT = 30

#: What may not be forwarded in a user name or password (a command line's end, PLAIN's separator).
_UNSENDABLE = re.compile(rb"[\r\n\0]")

#: The backend refusals of a forwarded password that are passed on as they
#: are; any other is a failed login.
_PASSED_ON = frozenset({ResponseCode.IN_USE, ResponseCode.SYS_TEMP, ResponseCode.LOGIN_DELAY})


@dataclass(frozen=True)
class Route:
    """
    Where a user's session goes.

    @ivar backends: tried in order.
    @ivar user: the name to log in as there (C{destuser}).
    @ivar verify: verify the backends' certificates (C{ssl=any-cert} does not).
    """

    backends: tuple[PopURL, ...]
    user: str
    timeout: float = DEFAULT_PROXY_TIMEOUT
    verify: bool = True


class Router:
    """
    Routes users from their settings (L{popserv.proxy.fields}) and a default
    list of backends.

    A user with C{proxy=y} goes to their own C{host=} or, without one, to the
    default list; with a default list every user without C{proxy=n} is
    proxied; without one, only C{proxy=y} users are.
    """

    def __init__(
        self,
        source: IUserSettingsSource | None,
        backends: tuple[PopURL, ...] = (),
        timeout: float = DEFAULT_PROXY_TIMEOUT,
    ) -> None:
        self.source = source
        self.backends = backends
        self.timeout = timeout

    def routeFor(self, user: str) -> Route | None:
        """The route of C{user}, or None: served here."""
        return self.routeFrom(user, self.source.settingsFor(user) if self.source else {})

    def routeFrom(self, user: str, fields: dict[str, Any]) -> Route | None:
        """The route of C{user}, whose auth source gave these C{fields}."""
        if not fields.get("proxy", bool(self.backends)):
            return None
        host = fields.get("proxyHost")
        verify = "any-cert" not in (fields.get("proxySSL"), fields.get("proxyStartTLS"))
        if host is not None:
            implicit = bool(fields.get("proxySSL"))
            tls = (
                IMPLICIT_TLS
                if implicit
                else STARTTLS
                if fields.get("proxyStartTLS")
                else PLAIN_TLS
            )
            port = fields.get("proxyPort", 995 if implicit else 110)
            backends: tuple[PopURL, ...] = (PopURL(host, port, tls),)
        elif self.backends:
            backends = self.backends
        else:
            _log.warn(
                "user {user} is to be proxied but has no host= and there is no --proxy-backend",
                user=user,
            )
            raise TemporaryFailure()
        return Route(
            backends,
            fields.get("proxyDestUser", user),
            fields.get("proxyTimeout", self.timeout),
            verify,
        )


class BackendAnswer(POP3Error):
    """A backend's refusal, passed on with its code (C{[IN-USE]}, C{[SYS/TEMP]}...)."""

    def __init__(self, refused: BackendRefused) -> None:
        text = refused.line[4:].decode("utf-8", "replace").strip()
        if refused.code is not None:
            text = text.partition("]")[2].strip()
        super().__init__(text.replace("{", "{{").replace("}", "}}") or "Login refused")
        self.code = refused.code  # type: ignore[assignment]


@implementer(IRealm)
class ProxyRealm:
    """
    Proxied users get a session at their backend; the others the wrapped realm's avatar.

    @param local: the realm for users served here.
    @param masterUser: log in to backends as this master user (with
        C{masterPassword}) rather than with the user's own password.
    @param sendHeader: send backends a PROXY v2 header with the client's address.
    """

    def __init__(
        self,
        local: Any,
        router: Router,
        connector: BackendConnector,
        policy: SessionPolicy | None = None,
        masterUser: str | None = None,
        masterPassword: bytes | None = None,
        sendHeader: bool = False,
    ) -> None:
        self.local = local
        self.router = router
        self.connector = connector
        self.policy = policy
        self.masterUser = masterUser
        self.masterPassword = masterPassword
        self.sendHeader = sendHeader

    @property
    def store(self) -> Any:
        """The wrapped realm's store (LMTP and shutdown look for it)."""
        return getattr(self.local, "store", None)

    def requestAvatar(self, avatarId: str, mind: object, *interfaces: Any) -> Any:
        # One lookup of the user's fields serves the routing, LOGIN-DELAY and
        # the protocol's settings: a user served here costs no more than
        # without the proxy mode.
        policy = self.policy
        if policy is None:
            route = self.router.routeFor(avatarId)
            settings = None
        else:
            fields = policy.overridesFor(avatarId)
            route = self.router.routeFrom(avatarId, fields)
            settings = policy.settingsFrom(fields)
        if isinstance(avatarId, UnverifiedUser):
            self._mayForward(avatarId, route)
        elif route is None:
            avatarFor = getattr(self.local, "avatarFor", None)
            if avatarFor is None or policy is not getattr(self.local, "policy", None):
                return self.local.requestAvatar(avatarId, mind, *interfaces)
            return avatarFor(avatarId, settings, *interfaces)
        checked = None if policy is None else policy.checkLogin(avatarId, settings)
        if checked is None:
            d = maybeDeferred(self._connect, route, avatarId, mind)
        else:
            d = checked.addCallback(lambda _: self._connect(route, avatarId, mind))

        def avatar(session: RelayedSession) -> tuple[Any, RelayedSession, RelayedSession]:
            session.settings = settings
            return IRelayedSession, session, session

        return d.addCallback(avatar)

    def _mayForward(self, avatarId: str, route: Route | None) -> None:
        """
        An unverified user (L{UnverifiedUser}) is served only by a backend
        that checks the password this proxy forwards: never here, never
        through the master user (who would let any password in).
        """
        if route is None or self.masterUser is not None:
            _log.warn(
                "user {user} has no password here (nopassword=y, or no auth source), so "
                "only a backend may check it; but {why}: login refused",
                user=str(avatarId),
                why="the user is not proxied"
                if route is None
                else "the proxy logs in as a master user",
            )
            raise AuthenticationFailed()

    def _connect(self, route: Route, avatarId: str, mind: Any) -> Deferred[RelayedSession]:
        credentials = getattr(mind, "credentials", None)
        if self.masterUser is not None:
            login = LoginAs(route.user, None, self.masterUser, self.masterPassword)
        elif IUsernamePassword.providedBy(credentials) and hasattr(credentials, "password"):
            login = LoginAs(route.user, credentials.password)
        else:
            raise TemporaryFailure(
                "This account is on another server: log in with USER/PASS or SASL PLAIN"
            )
        if _UNSENDABLE.search(route.user.encode("utf-8")) or (
            login.password is not None and _UNSENDABLE.search(login.password)
        ):
            # A SASL PLAIN name or password may hold them: sent on, they would
            # end the backend's command line early and start another.
            _log.warn(
                "login of {user!r} refused: CR, LF or NUL in the name or password",
                user=route.user,
            )
            raise AuthenticationFailed()
        header = b""
        transport = getattr(mind, "transport", None)
        if self.sendHeader and transport is not None:
            header = proxyHeader(transport.getPeer(), transport.getHost())
        d = self.connector.login(route.backends, login, route.timeout, header, route.verify)

        def named(session: RelayedSession) -> RelayedSession:
            session.avatarId = str(avatarId)  # verified now, by the backend
            return session

        return d.addCallbacks(named, self._refused)

    def _refused(self, failure: Any) -> Any:
        refused = failure.check(BackendRefused) and failure.value
        if not refused:
            return failure
        _log.info(
            "backend refused the login: {line}", line=refused.line.decode("utf-8", "replace")
        )
        if self.masterUser is not None:
            if refused.code == ResponseCode.AUTH:
                # The proxy's master credentials were refused: not the user's fault.
                raise TemporaryFailure()
            raise BackendAnswer(refused)
        if refused.code in _PASSED_ON:
            raise BackendAnswer(refused)
        # The user's own password was refused, with [AUTH] or, from a server
        # without response codes, with any text: a failed login, penalized
        # and counted as one (else a proxy that checks no password itself
        # would allow unlimited guessing); the backend's text is not passed on.
        raise AuthenticationFailed()


@implementer(ICredentialsChecker)
class ForwardingChecker:
    """
    The checker of a proxy with no auth source of its own (C{proxy_backend}
    and no C{passwd}/C{passdb}): it checks nothing and names the user
    L{UnverifiedUser}, so that the backend checks the forwarded password.
    Only USER/PASS and the SASL mechanisms that carry a password (PLAIN,
    LOGIN) can work: nothing else gives a password to forward.
    """

    credentialInterfaces = (IUsernamePassword,)

    def requestAvatarId(self, credentials: Any) -> Deferred[str]:
        return succeed(UnverifiedUser(credentials.username))
