"""
Building a running server: the one place that wires checker, realm, store,
factory and listening endpoints together. The twistd plugin, the tac file and
embedders all come through here.
"""

from __future__ import annotations

import gc
import signal
import socket
import threading
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import Portal
from twisted.internet import endpoints
from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from popserv.auth.realm import MailboxRealm
from popserv.auth.scramkeys import SCRAM_KEY_FILE, LateKey, loadKeyFile, saltKeyForRoot
from popserv.build import makeChecker, makeStore, makeTokenValidator
from popserv.config import Config, ConfigError
from popserv.errors import TemporaryFailure
from popserv.haproxy import PREFIX, ProxyWrappingFactory, TrustedPeers, splitProxied
from popserv.i18n import LANGUAGES
from popserv.interfaces import IFailedLogins, ILoginMemory, IMailStore, ISharedKeys
from popserv.limits import DEFAULT_TIMEOUT, AuthPenalty, ConnectionLimits, TrustedNetworks
from popserv.lmtp import Deliverer, LMTPFactory
from popserv.location import MailLocation
from popserv.metrics import Metrics, metricsSite
from popserv.policy import IUserSettingsSource, SessionPolicy, UserSettings, parseExpire
from popserv.protocol import POP3Factory
from popserv.sasl import mechanismsByName
from popserv.sasl.gssapi import GSSAPI
from popserv.threads import reactorThreads
from popserv.tls import PlaintextPolicy, ServerTLS, TLSError

__all__ = [
    "makePortal",
    "makeFactory",
    "makeService",
    "PopservService",
    "loadKeyFile",  # popserv.auth.scramkeys's, kept where they were first exported
    "SCRAM_KEY_FILE",
    "freezeStartupObjects",
]

_log = Logger()


def makePortal(
    checker: ICredentialsChecker, store: IMailStore, policy: SessionPolicy | None = None
) -> Portal:
    """A Portal whose realm opens (and locks) maildrops from C{store}."""
    return Portal(MailboxRealm(store, policy), [checker])


def makeFactory(config: Config, reactor: Any = None, portal: Portal | None = None) -> POP3Factory:
    """
    The protocol factory for C{config}; listen on it with any endpoint.

    @param portal: use this portal instead of the passwd-file and mail
        location of C{config} (for a custom checker or store).
    """
    if reactor is None:
        from twisted.internet import reactor
    run = reactorThreads(reactor)
    policy = None
    saltKey = None  # with a portal of the embedder's: each process its own
    failures = None
    if portal is None:
        config.validated()
        # No mail location: the server only proxies (L{popserv.proxy}).
        store = makeStore(config, run) if config.mail_location else None
        saltKey = _saltKey(store, run, reactor) if store is not None else None
        if config.authSources:
            checker = makeChecker(config, reactor, run, saltKey)
        else:  # a proxy that lets the backends check the passwords
            from popserv.proxy.realm import ForwardingChecker

            checker = ForwardingChecker()
        defaults = UserSettings(config.login_delay, parseExpire(config.expire))
        memory = store if ILoginMemory.providedBy(store) else None
        source = checker if IUserSettingsSource.providedBy(checker) else None
        policy = SessionPolicy(reactor, defaults, source, memory=memory)
        local = MailboxRealm(store, policy) if store is not None else _NoLocalMail(policy)
        portal = Portal(_proxied(config, reactor, local, source), [checker])
        if config.auth_penalty_shared and IFailedLogins.providedBy(store):
            failures = store
    tls = None
    if config.tlsEnabled:
        try:
            tls = ServerTLS(
                config.path(config.tls_cert),
                config.path(config.tls_key),
                config.path(config.tls_client_ca),
                selfSignedHosts=None if config.tls_cert else ["localhost"],
            )
        except TLSError as e:
            raise ConfigError(f"tls: {e}") from None
    if config.timeout < DEFAULT_TIMEOUT:
        _log.warn(
            "timeout {timeout}s is below RFC 1939's 10-minute autologout minimum",
            timeout=config.timeout,
        )
    tokens = makeTokenValidator(config, reactor)
    mechanisms = mechanismsByName(
        list(config.sasl_mechanisms) if config.sasl_mechanisms else None,
        saltKey=saltKey,
        tokens=tokens,
    )
    if config.gssapi_keytab and "GSSAPI" in mechanisms:
        try:
            mechanisms["GSSAPI"] = GSSAPI.configured(
                config.path(config.gssapi_keytab),
                config.gssapi_principal,
                config.gssapi_realm_map,
                run,
            )
        except ValueError as e:
            raise ConfigError(f"gssapi_keytab: {e}") from None
    factory = POP3Factory(
        portal,
        clock=reactor,
        timeout=config.timeout,
        hostname=config.hostname,
        apop=None if config.apop else False,
        maxBadCommands=config.max_bad_commands,
        mechanisms=mechanisms,
        policy=policy,
        language=LANGUAGES[config.language],
        tls=tls,
        certUserField=config.tls_cert_user,
        metrics=Metrics() if config.metrics else None,
        logoutFormat=config.logout_format,
        loginTimeout=config.login_timeout,
        limits=ConnectionLimits(config.max_connections, config.max_connections_per_ip),
        penalty=AuthPenalty(reactor, cap=config.auth_penalty, shared=failures),
        allowPlaintext=PlaintextPolicy(
            requireTLS=config.plaintext_auth == "tls", trusted=config.trusted_networks
        ),
    )
    factory.tokens = tokens  # a service: makeService starts it (the JWKS timer)
    return factory


def _proxied(config: Config, reactor: Any, local: MailboxRealm, source: Any) -> Any:
    """The realm, wrapped in the proxy's when users may be proxied (L{popserv.proxy})."""
    if source is None and not config.proxy_backend:
        return local
    from popserv.popurl import parsePopURL
    from popserv.proxy.connect import BackendConnector, clientTLS
    from popserv.proxy.realm import ProxyRealm, Router

    password = None
    if bool(config.proxy_master_user) != bool(config.proxy_master_password_file):
        raise ConfigError("proxy_master_user: needs proxy_master_password_file, and the reverse")
    if config.proxy_master_password_file:
        try:
            with open(config.path(config.proxy_master_password_file), "rb") as f:
                password = f.readline().rstrip(b"\r\n")
        except OSError as e:
            raise ConfigError(f"proxy_master_password_file: {e}") from None
    try:
        tls = clientTLS(config.path(config.proxy_ca))
    except (OSError, ValueError) as e:
        raise ConfigError(f"proxy_ca: {e}") from None
    backends = tuple(parsePopURL(url) for url in config.proxy_backend)
    return ProxyRealm(
        local,
        Router(source, backends, config.proxy_timeout),
        BackendConnector(reactor, tls),
        local.policy,
        config.proxy_master_user,
        password,
        config.proxy_send_proxy,
    )


class _NoLocalMail:
    """
    The local realm of a server that only proxies (no C{mail_location}): a
    user no route sends to a backend (C{proxy=n}) cannot be served here.
    """

    store = None

    def __init__(self, policy: SessionPolicy) -> None:
        self.policy = policy

    def requestAvatar(self, avatarId: str, mind: object, *interfaces: Any) -> Any:
        _log.warn(
            "user {user} is not proxied, and this server has no mail_location", user=avatarId
        )
        raise TemporaryFailure()

    def avatarFor(self, avatarId: str, settings: Any, *interfaces: Any) -> Any:
        return self.requestAvatar(avatarId, None, *interfaces)


def freezeStartupObjects() -> None:
    """
    Take what is alive once the server is up (modules, configuration, TLS
    contexts) out of the garbage collector's sight (C{gc.freeze}): a full
    collection then walks only what came later. Listing a big maildrop sets
    off several, and each walked the 10^5 objects of Twisted and popserv
    first. For a server process, not a library: the twistd plugin calls it.
    """
    gc.collect()
    gc.freeze()


#: The name of SCRAM's salt key in a store's shared keys (L{ISharedKeys}).
SCRAM_SALT_KEY = "scram-salt"


def _saltKey(store: IMailStore, runInThread: Any, clock: Any) -> bytes | LateKey | None:
    """
    The SCRAM salt key every process serving C{store} shares: kept beside a
    Maildir store's maildrops, or in a store that keeps shared keys (pgsql);
    other stores get this process's own key. A shared key that cannot be
    fetched now (the database is down) is a L{LateKey}, fetched later.
    """
    location = getattr(store, "location", None)
    if isinstance(location, MailLocation):
        return saltKeyForRoot(location.root)
    if ISharedKeys.providedBy(store):
        try:
            return store.sharedKey(SCRAM_SALT_KEY)
        except TemporaryFailure:
            _log.warn(
                "{store} cannot give the shared key for SCRAM's made-up salts (the "
                "database is unreachable): SCRAM logins get [SYS/TEMP] until it is fetched",
                store=getattr(store, "description", store),
            )
            return LateKey(lambda: store.sharedKey(SCRAM_SALT_KEY), runInThread, clock)
        except Exception as e:  # a schema to upgrade: say what it costs
            _log.warn(
                "{store} cannot give the shared key for SCRAM's made-up salts ({why}): "
                "this process uses its own, so with several nodes they tell unknown "
                "users from real ones",
                store=getattr(store, "description", store),
                why=str(e).strip(),
            )
            return None
    _log.info(
        "{store} keeps no shared key for SCRAM's made-up salts: each process uses "
        "its own, so with several workers or nodes they tell unknown users from "
        "real ones",
        store=getattr(store, "description", store),
    )
    return None


def makeService(
    config: Config | None = None,
    *,
    reactor: Any = None,
    portal: Portal | None = None,
    **settings: Any,
) -> MultiService:
    """
    A service that listens on every C{listen} endpoint of the configuration.

    Settings may be given as a L{Config}, as keyword arguments named like its
    fields (C{listen=["tcp:1110"], passwd="...", mail_location="..."}), or
    both (keywords win). Raises L{ConfigError} for a configuration that cannot
    work, before anything listens.
    """
    if reactor is None:
        from twisted.internet import reactor
    config = (config or Config()).merged(**settings)
    if portal is None:
        config = config.validated()
    factory = makeFactory(config, reactor, portal)
    top = PopservService(factory, reactor, config.shutdown_grace)
    if getattr(factory, "tokens", None) is not None:
        factory.tokens.setServiceParent(top)
    listeners: list[tuple[str, Any]] = [(d, factory) for d in config.listen]
    if factory.metrics is not None and config.metrics:
        listeners.append((config.metrics, metricsSite(factory.metrics)))
    if config.lmtp:
        lmtp = _lmtpFactory(config, factory, reactor)
        listeners += [(d, lmtp) for d in config.lmtp]
    if config.listen_tls:
        assert factory.tls is not None
        # Implicit TLS (RFC 8314): the same context as STLS, so both reload together.
        wrapped = TLSMemoryBIOFactory(factory.tls, False, factory)
        listeners += [(d, wrapped) for d in config.listen_tls]
    trusted = TrustedPeers(config.haproxy_trusted_networks)
    for description, serving in listeners:
        endpoint, serving = _endpoint(reactor, description, serving, trusted)
        service = StreamServerEndpointService(endpoint, serving)
        service._raiseSynchronously = True  # fail twistd start-up on a busy port
        service.setServiceParent(top)
    return top


def _endpoint(
    reactor: Any, description: str, serving: Any, trusted: TrustedPeers
) -> tuple[Any, Any]:
    """
    The endpoint of C{description} and the factory to listen with there. A
    C{haproxy:} endpoint is popserv's own PROXY wrapper (L{ProxyWrappingFactory})
    around C{serving}, outside its TLS layer if it has one: the greeting waits
    for the client's address, and only C{trusted} peers may send one.
    """
    proxied, inner = splitProxied(description)
    if proxied and inner.startswith("ssl:"):
        raise ConfigError(
            f"listen: {description!r} would expect the PROXY header inside TLS, which "
            f"HAProxy does not send; use --listen-tls {PREFIX}tcp:... for implicit TLS"
        )
    try:
        endpoint = endpoints.serverFromString(reactor, inner)
    except Exception as e:  # endpoint parsers raise all sorts
        raise ConfigError(f"listen: bad endpoint {description!r}: {e!r}") from None
    if proxied:
        serving = ProxyWrappingFactory(serving, trusted, reactor)
    return endpoint, serving


def _lmtpFactory(config: Config, factory: POP3Factory, reactor: Any) -> LMTPFactory:
    """LMTP into the POP3 server's own store, recipients checked by its auth sources."""
    realm = factory.portal.realm
    store = getattr(realm, "store", None)
    if store is None:
        raise ConfigError("lmtp: needs the portal's realm to have a store (a MailboxRealm)")
    checkers = set(factory.portal.checkers.values())
    if len(checkers) != 1:
        # Without its sources LMTP would take mail for (and create) any maildrop.
        raise ConfigError(
            f"lmtp: needs the portal to have exactly one checker (a chain with its sources "
            f"for several) to know the recipients; it has {len(checkers)}"
        )
    rules = config.usernameRules
    deliverer = Deliverer(
        store,
        checkers.pop(),
        config.hostname or socket.getfqdn(),
        names=None if rules.identity else rules,
    )
    return LMTPFactory(
        deliverer,
        reactor,
        config.hostname,
        maxSize=config.lmtp_max_size,
        trusted=TrustedNetworks(config.lmtp_trusted_networks),
    )


class PopservService(MultiService):
    """
    All of popserv's listeners. C{SIGHUP} (or L{reload}) re-reads the TLS
    certificate and key without dropping sessions; the passwd-file is re-read
    on change anyway. Stopping stops accepting at once, then gives open
    sessions C{grace} seconds to finish; a session applying its UPDATE is
    always allowed to complete it.
    """

    name = "popserv"

    def __init__(self, factory: POP3Factory, reactor: Any, grace: float = 30) -> None:
        super().__init__()
        self.factory = factory
        self.grace = grace
        self._reactor = reactor
        self._previousHandler: Any = None

    def reload(self) -> None:
        if self.factory.tls is None:
            return
        try:
            self.factory.tls.reload()
        except TLSError as e:
            _log.error("TLS reload failed, keeping the old certificate: {error}", error=e)

    def startService(self) -> None:
        super().startService()
        if hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
            self._previousHandler = signal.signal(
                signal.SIGHUP, lambda *_: self._reactor.callFromThread(self.reload)
            )

    def stopService(self) -> Any:
        if self._previousHandler is not None:
            signal.signal(signal.SIGHUP, self._previousHandler)
            self._previousHandler = None
        d = maybeDeferred(super().stopService)
        d.addCallback(lambda _: self.factory.drain(self.grace))
        return d.addCallback(self._closeStore)

    def _closeStore(self, _: object) -> Any:
        """The store's optional C{close()} (its pools, its lock connection), in a thread."""
        store = getattr(self.factory.portal.realm, "store", None)
        close = getattr(store, "close", None)
        if close is None:
            return None
        run = getattr(store, "runInThread", None) or reactorThreads(self._reactor)
        d = run(close)
        d.addErrback(lambda f: _log.failure("error closing the mail store", f))
        return d
