"""
The configuration: one set of settings shared by the twistd plugin
(C{--config} plus options), C{popserv serve}, the tac file and the embedding
API. Each setting is declared once, on its field of L{Config}; the options,
the file's keys and the documentation are derived from L{SETTINGS}.

The file format is TOML (read with the standard library's C{tomllib}): keys
are the settings' names (C{_} or C{-} alike); C{[[passdb]]} tables configure
auth sources one by one. Relative paths in a file are relative to the file's
own directory, so a configuration can be moved whole.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any

from popserv.limits import (
    DEFAULT_LOGIN_TIMEOUT,
    DEFAULT_MAX_BAD_COMMANDS,
    DEFAULT_TIMEOUT,
    DEFAULT_TRUSTED_NETWORKS,
)
from popserv.logs import DEFAULT_LOGOUT_FORMAT, validateFormat
from popserv.settings import BOOL, DAYS, INT, LIST, STR, Setting, SettingError, setting

__all__ = [
    "Config",
    "ConfigError",
    "PassdbSpec",
    "loadConfig",
    "DEFAULT_LISTEN",
    "SETTINGS",
    "settingsByKey",
    "pluginSettings",
]

#: The standard POP3 port on all interfaces (RFC 1939 section 3).
DEFAULT_LISTEN = "tcp:110"

#: The store kind of a mail location written without one (a bare path).
DEFAULT_STORE = "maildir"


class ConfigError(ValueError):
    """A configuration that cannot work; the message says which setting and why."""


# -- checks and choices (registries are imported only when asked) -------------------------


def _atLeast(minimum: int) -> Any:
    def check(value: int) -> None:
        if value < minimum:
            raise ValueError(f"must be {minimum} or more")

    return check


def _mechanisms() -> list[str]:
    from popserv.sasl import ALL_MECHANISMS

    return [m.name for m in ALL_MECHANISMS]


def _checkMechanisms(names: tuple[str, ...]) -> None:
    known = _mechanisms()
    for name in names:
        if name.upper() not in known:
            raise ValueError(f"unknown SASL mechanism {name!r} (known: {', '.join(known)})")


def _jwtAlgorithms() -> tuple[str, ...]:
    from popserv.auth.oauth import ALLOWED_ALGORITHMS

    return ALLOWED_ALGORITHMS


def _checkAlgorithms(names: tuple[str, ...]) -> None:
    from popserv.auth.oauth import checkAlgorithms

    checkAlgorithms(names)


def _checkURL(url: str) -> None:
    if not url.startswith(("https://", "http://")):
        raise ValueError(f"an http(s) URL, not {url!r}")


def _languages() -> list[str]:
    from popserv.i18n import LANGUAGES

    return list(LANGUAGES)


def _certFields() -> tuple[str, ...]:
    from popserv.tls import CERT_USER_FIELDS

    return CERT_USER_FIELDS


def _storeKinds() -> list[str]:
    from popserv.registry import storeKinds

    return sorted(storeKinds())


def _authKinds() -> list[str]:
    from popserv.registry import authSourceKinds

    return sorted(authSourceKinds())


def _schemes() -> list[str]:
    from popserv.auth.schemes import SCHEMES

    return list(SCHEMES)


def _checkTranslation(value: str) -> None:
    from popserv.auth.usernames import parseTranslation

    parseTranslation(value)


def _checkExpire(value: str | int) -> None:
    from popserv.policy import parseExpire

    try:
        parseExpire(value)
    except ValueError:
        raise ValueError("NEVER or a number of days >= 0") from None


def _checkNetworks(networks: tuple[str, ...]) -> None:
    for network in networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ValueError(f"{network!r} is not a network") from None


def _checkPopURLs(urls: tuple[str, ...]) -> None:
    from popserv.popurl import parsePopURL

    for url in urls:
        parsePopURL(url)


def _checkFormat(template: str) -> None:
    validateFormat(template)


def _checkRealmMap(entries: tuple[str, ...]) -> None:
    for entry in entries:
        realm, _, domain = entry.partition("=")
        if not realm.strip() or any(c in realm + domain for c in "@/ "):
            raise ValueError(f"{entry!r}: expected REALM or REALM=DOMAIN")


def _checkUIDLSource(value: str) -> None:
    from popserv.backends.maildir.foreign import parseSource

    parseSource(value)


def _checkPassdb(specs: tuple[Any, ...]) -> None:
    for spec in specs:
        if isinstance(spec, str) and ":" not in spec:
            raise ValueError(f"{spec!r}: expected KIND:ARGUMENTS, KIND one of {_authKinds()}")


def _checkEndpoints(value: str | tuple[str, ...]) -> None:
    """
    Ports 0-65535 in tcp:, tcp6: and ssl: endpoints (behind haproxy: too):
    Twisted's parser takes any number, and only the bind fails, with a
    traceback.
    """
    for description in (value,) if isinstance(value, str) else value:
        kind, _, rest = description.partition(":")
        while kind == "haproxy":
            kind, _, rest = rest.partition(":")
        if kind not in ("tcp", "tcp6", "ssl"):
            continue
        args = rest.split(":")
        port = [a for a in args if "=" not in a][:1] or [
            a.partition("=")[2] for a in args if a.startswith("port=")
        ]
        if port and port[0].strip().isdigit() and int(port[0]) > 65535:
            raise ValueError(f"port {int(port[0])} of {description!r} is not 0-65535")


@dataclass(frozen=True)
class PassdbSpec:
    """
    One auth source: C{--passdb KIND:ARGS}, or a C{[[passdb]]} table with
    C{kind}, C{args} and the kind's own options.
    """

    kind: str
    args: str
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @classmethod
    def parse(cls, spec: str | Mapping[str, Any] | PassdbSpec) -> PassdbSpec:
        if isinstance(spec, PassdbSpec):
            return spec
        if isinstance(spec, Mapping):
            options = dict(spec)
            kind, args = options.pop("kind", None), options.pop("args", "")
            if not isinstance(kind, str) or not isinstance(args, str):
                raise ConfigError("passdb: a [[passdb]] table needs kind and args strings")
            return cls(kind, args, MappingProxyType(options))
        from popserv.registry import splitSpec

        try:
            kind, args = splitSpec(spec)
        except ValueError as e:
            raise ConfigError(f"passdb: {e}") from None
        return cls(kind, args)

    def __str__(self) -> str:
        return f"{self.kind}:{self.args}"


@dataclass(frozen=True)
class Config:
    """
    Every setting of a server. Each field's declaration (L{setting}) holds its
    help, kind, spellings and checks; see L{SETTINGS}.

    @ivar base_dir: the directory relative paths are resolved against (the
        configuration file's).
    @ivar plugin_options: options of store and auth-source kinds, by their full
        names (C{KIND_OPTION}, dashes as underscores).
    """

    listen: tuple[str, ...] = setting(
        (DEFAULT_LISTEN,),
        "Listen on this Twisted server endpoint; repeat for several (e.g. tcp:110, "
        "tcp:1110:interface=127.0.0.1, unix:/run/popserv.sock, haproxy:tcp:110, "
        "systemd:domain=INET:index=0).",
        LIST,
        short="l",
        metavar="ENDPOINT",
        check=_checkEndpoints,
    )
    listen_tls: tuple[str, ...] = setting(
        (),
        "Listen on this endpoint with implicit TLS (RFC 8314 POP3S), using --tls-cert; "
        "repeatable (e.g. tcp:995).",
        LIST,
        metavar="ENDPOINT",
        check=_checkEndpoints,
    )
    lmtp: tuple[str, ...] = setting(
        (),
        "Take deliveries over LMTP (RFC 2033) on this endpoint, into the mail location; "
        "repeatable (e.g. unix:/run/popserv/lmtp, tcp:24:interface=127.0.0.1).",
        LIST,
        metavar="ENDPOINT",
        check=_checkEndpoints,
    )
    lmtp_trusted_networks: tuple[str, ...] = setting(
        DEFAULT_TRUSTED_NETWORKS,
        "A network (CIDR) allowed to deliver over a tcp: LMTP listener (the MTAs'); a "
        "connection from anywhere else is refused with 421. Unix-socket peers are always "
        "allowed (the socket's permissions decide). Repeatable.",
        LIST,
        aliases=("lmtp_trusted_network",),
        check=_checkNetworks,
        metavar="CIDR",
    )
    lmtp_max_size: int = setting(
        0,
        "The largest message LMTP accepts, in octets (announced with SIZE); 0 for no limit.",
        INT,
        check=_atLeast(0),
    )
    passwd: str | None = setting(
        None,
        "Passwd-file: lines of user:{SCHEME}secret, SCHEME one of {choices}. Re-read when it "
        "changes. The shorthand of --passdb passwd-file:FILE.",
        STR,
        short="p",
        mentions=_schemes,
        metavar="FILE",
    )
    passdb: tuple[PassdbSpec, ...] = setting(
        (),
        "An auth source, KIND:ARGUMENTS with KIND one of {choices}; repeat to chain them: "
        "an unknown user or a wrong password goes on to the next (as Dovecot's passdbs).",
        LIST,
        mentions=_authKinds,
        check=_checkPassdb,
        metavar="KIND:ARGS",
    )
    mail_location: str | None = setting(
        None,
        "Where maildrops are, KIND:ARGUMENTS with KIND one of {choices} (a bare path is a "
        "maildir), e.g. maildir:/var/mail/%d/%n/Maildir; %u is the user name, %n its local "
        "part, %d its domain. A server that only proxies (proxy_backend) needs none.",
        STR,
        short="m",
        mentions=_storeKinds,
        metavar="KIND:ARGS",
    )
    timeout: int = setting(
        DEFAULT_TIMEOUT,
        "Autologout after this many idle seconds (RFC 1939 asks for at least 600).",
        INT,
        check=_atLeast(1),
    )
    hostname: str | None = setting(
        None,
        "Host name in the APOP and CRAM-MD5 challenges.",
        STR,
        defaultText="this host's name",
    )
    apop: bool = setting(
        True,
        "Offer APOP (a timestamp in the greeting; it needs {PLAIN} secrets to succeed).",
        BOOL,
    )
    max_bad_commands: int = setting(
        DEFAULT_MAX_BAD_COMMANDS,
        "Close a connection after this many unknown or malformed commands.",
        INT,
        check=_atLeast(1),
    )
    create_maildirs: bool = setting(
        True,
        "Create a missing maildrop at first login (else the login is refused).",
        BOOL,
    )
    uidl_source: str = setting(
        "native",
        "Where a Maildir message's UIDL comes from the first time popserv lists it: native "
        "(its name), or the server that served it before, one of {choices} (dovecot:FORMAT "
        "for another pop3_uidl_format); kept afterwards, so clients download nothing again.",
        STR,
        mentions=("native", "dovecot", "dovecot:%v.%u", "courier", "xuidl", "uw"),
        check=_checkUIDLSource,
        metavar="SOURCE",
    )
    login_delay: int = setting(
        0,
        "Minimum seconds between two logins of a user (RFC 2449 LOGIN-DELAY); 0 for none.",
        INT,
        perUser=True,
        check=_atLeast(0),
    )
    expire: str | int = setting(
        "NEVER",
        "Days messages stay on the server: NEVER, or a number; 0 removes retrieved messages "
        "at QUIT (RFC 2449 EXPIRE).",
        DAYS,
        perUser=True,
        check=_checkExpire,
    )
    language: str = setting(
        "en",
        "Default language of response texts (LANG can change it per session).",
        STR,
        choices=_languages,
    )
    sasl_mechanisms: tuple[str, ...] | None = setting(
        None,
        "SASL mechanisms to offer (comma-separated or repeated), from {choices}.",
        LIST,
        split=",",
        mentions=_mechanisms,
        check=_checkMechanisms,
        defaultText="all that the auth sources' secrets allow",
        metavar="NAMES",
    )
    master_users: tuple[str, ...] = setting(
        (),
        "A user who may log in as anyone else with SASL PLAIN (authorization id: the user "
        "to act as); repeatable.",
        LIST,
        aliases=("master_user",),
        metavar="USER",
    )
    username_lowercase: bool = setting(
        False,
        "Lower-case every login name (and LMTP recipient) before the auth sources see it; "
        "off by default, as it can move maildrops whose names have capitals.",
        BOOL,
    )
    default_domain: str | None = setting(
        None,
        "Domain appended as @DOMAIN to a login name without one.",
        STR,
        metavar="DOMAIN",
    )
    username_translation: str | None = setting(
        None,
        "Characters of login names translated, in pairs (from, to): '%@*@' makes "
        "john%example.org and john*example.org into john@example.org.",
        STR,
        check=_checkTranslation,
        metavar="PAIRS",
    )
    gssapi_keytab: str | None = setting(
        None,
        "Keytab of the service keys for SASL GSSAPI (Kerberos 5); GSSAPI is offered while "
        "it is readable. Needs python-gssapi (the kerberos extra).",
        STR,
        defaultText="off",
        metavar="FILE",
    )
    gssapi_principal: str | None = setting(
        None,
        "The service principal GSSAPI accepts tickets for, e.g. pop/mail.example.org (the "
        "public name behind a load balancer, not --hostname).",
        STR,
        defaultText="any key in the keytab",
        metavar="NAME",
    )
    gssapi_realm_map: tuple[str, ...] = setting(
        (),
        "A realm whose principals may log in with GSSAPI besides the default realm's: "
        "REALM (user@REALM is user) or REALM=DOMAIN (user@DOMAIN); repeatable.",
        LIST,
        check=_checkRealmMap,
        metavar="REALM[=DOMAIN]",
    )
    tls_cert: str | None = setting(
        None,
        "PEM certificate (followed by its chain) for STLS and --listen-tls; re-read on SIGHUP.",
        STR,
        metavar="FILE",
    )
    tls_key: str | None = setting(
        None, "PEM private key.", STR, defaultText="taken from --tls-cert", metavar="FILE"
    )
    tls_selfsigned: bool = setting(
        False,
        "Without --tls-cert, make a throw-away self-signed certificate for localhost at "
        "start-up (demos and tests only).",
        BOOL,
    )
    tls_client_ca: str | None = setting(
        None,
        "PEM CA certificates: clients may present a certificate they issued and log in "
        "with SASL EXTERNAL.",
        STR,
        metavar="FILE",
    )
    tls_cert_user: str = setting(
        "cn", "What in a client certificate is the user name.", STR, choices=_certFields
    )
    plaintext_auth: str = setting(
        "tls",
        "tls: passwords in the clear (USER/PASS, PLAIN, LOGIN) only over TLS or from "
        "--trusted-networks; always: anywhere (labs only).",
        STR,
        choices=("tls", "always"),
    )
    oauth_jwks: str | None = setting(
        None,
        "OAuth 2.0 (SASL OAUTHBEARER, XOAUTH2): the identity provider's JWKS URL; access "
        "tokens are JWTs checked against its keys (needs --oauth-issuer, --oauth-audience).",
        STR,
        check=_checkURL,
        metavar="URL",
    )
    oauth_issuer: str | None = setting(
        None, "OAuth 2.0: the issuer (iss) tokens must name.", STR, metavar="ISS"
    )
    oauth_audience: str | None = setting(
        None,
        "OAuth 2.0: the audience (aud) tokens must be for: this service's client id or URI.",
        STR,
        metavar="AUD",
    )
    oauth_user_claim: str = setting(
        "email",
        "OAuth 2.0: the claim that is the user name (email, preferred_username, sub...).",
        STR,
        metavar="CLAIM",
    )
    oauth_algorithms: tuple[str, ...] = setting(
        ("RS256", "PS256", "ES256", "EdDSA"),
        "OAuth 2.0: the JWT signature algorithms accepted (comma-separated or repeated), from "
        "{choices}; never none or HS*.",
        LIST,
        split=",",
        mentions=_jwtAlgorithms,
        check=_checkAlgorithms,
        metavar="ALGS",
    )
    oauth_introspection: str | None = setting(
        None,
        "OAuth 2.0: check each token at this RFC 7662 introspection URL instead of a JWKS "
        "(needs --oauth-client-id, --oauth-client-secret-file).",
        STR,
        check=_checkURL,
        metavar="URL",
    )
    oauth_client_id: str | None = setting(
        None, "OAuth 2.0: this server's client id at the introspection endpoint.", STR
    )
    oauth_client_secret_file: str | None = setting(
        None,
        "OAuth 2.0: a file holding this server's client secret at the introspection endpoint.",
        STR,
        metavar="FILE",
    )
    trusted_networks: tuple[str, ...] = setting(
        DEFAULT_TRUSTED_NETWORKS,
        "A network (CIDR) where passwords may be sent without TLS; repeatable.",
        LIST,
        aliases=("trusted_network",),
        check=_checkNetworks,
        metavar="CIDR",
    )
    haproxy_trusted_networks: tuple[str, ...] = setting(
        DEFAULT_TRUSTED_NETWORKS,
        "A network (CIDR) of load balancers whose PROXY headers (haproxy: listeners) are "
        "believed; a connection to a haproxy: listener from anywhere else is closed unread. "
        "Repeatable.",
        LIST,
        aliases=("haproxy_trusted_network",),
        check=_checkNetworks,
        metavar="CIDR",
    )
    metrics: str | None = setting(
        None,
        "Serve Prometheus metrics at /metrics on this endpoint, e.g. "
        "tcp:9110:interface=127.0.0.1.",
        STR,
        defaultText="off",
        metavar="ENDPOINT",
        check=_checkEndpoints,
    )
    logout_format: str = setting(
        DEFAULT_LOGOUT_FORMAT,
        "The line logged when a session ends, a Python format string over: user ip port "
        "tls mechanism reason duration retr retr_bytes top top_bytes dele removed left "
        "bytes_out commands bad_commands backend_host.",
        STR,
        check=_checkFormat,
    )
    shutdown_grace: int = setting(
        30,
        "Seconds open sessions get to finish when the server stops.",
        INT,
        check=_atLeast(0),
    )
    login_timeout: int = setting(
        DEFAULT_LOGIN_TIMEOUT, "Idle seconds allowed before a login.", INT, check=_atLeast(1)
    )
    max_connections: int = setting(
        1000, "Connections open at once, server-wide; 0 for no limit.", INT, check=_atLeast(0)
    )
    max_connections_per_ip: int = setting(
        50,
        "Connections open at once from one client address; 0 for no limit.",
        INT,
        check=_atLeast(0),
    )
    auth_penalty: int = setting(
        15,
        "Failed logins from an address are answered after 1, 2, 4 ... seconds, up to this "
        "many; 0 turns the penalty off.",
        INT,
        check=_atLeast(0),
    )
    auth_penalty_shared: bool = setting(
        True,
        "Count failed logins where the mail store shares them with every node (pgsql:), so "
        "the penalty holds across nodes; off: each process counts its own.",
        BOOL,
    )
    auth_cache_ttl: int = setting(
        600,
        "Seconds a successful check of a slow password hash (argon2, bcrypt, crypt) is "
        "remembered, so frequent polling costs no hashing; 0 checks every login.",
        INT,
        check=_atLeast(0),
    )
    proxy_backend: tuple[str, ...] = setting(
        (),
        "Proxy mode: relay users to this backend POP3 server, an RFC 2384 POP URL "
        "(pop://;AUTH=*@mail2.example.org:110, pop://;STLS@host, pop3s://host:995); repeat "
        "for a list tried in order. Every user without proxy=n or a host= of their own goes "
        "there; without it only users with proxy=y are proxied.",
        LIST,
        check=_checkPopURLs,
        metavar="URL",
    )
    proxy_ca: str | None = setting(
        None,
        "Proxy mode: verify the backends' TLS certificates against these CA certificates "
        "(PEM); default: the system's.",
        STR,
        metavar="FILE",
    )
    proxy_master_user: str | None = setting(
        None,
        "Proxy mode: log in to backends as this master user (SASL PLAIN with the user as "
        "authorization id) rather than with the user's own password, so that every "
        "mechanism works at the front.",
        STR,
        metavar="NAME",
    )
    proxy_master_password_file: str | None = setting(
        None,
        "Proxy mode: the file holding the master user's password (its first line).",
        STR,
        metavar="FILE",
    )
    proxy_timeout: int = setting(
        30,
        "Proxy mode: seconds to reach and log in to a backend, the whole list (a user's "
        "proxy_timeout= overrides it).",
        INT,
        check=_atLeast(1),
    )
    proxy_send_proxy: bool = setting(
        False,
        "Proxy mode: send backends a PROXY v2 header with the client's address (for a "
        "backend listening with haproxy: and trusting this proxy).",
        BOOL,
    )
    plugin_options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    base_dir: str = field(default_factory=os.getcwd, compare=False)

    def __post_init__(self) -> None:
        if any(not isinstance(spec, PassdbSpec) for spec in self.passdb):
            specs = (self.passdb,) if isinstance(self.passdb, (str, Mapping)) else self.passdb
            object.__setattr__(self, "passdb", tuple(PassdbSpec.parse(s) for s in specs))

    def merged(self, **overrides: Any) -> Config:
        """A copy with the settings that are not None replaced."""
        given = {k: v for k, v in overrides.items() if v is not None}
        for name in _LISTS:
            if isinstance(given.get(name), str):
                given[name] = (given[name],)
            elif name in given:
                given[name] = tuple(given[name])
        if "plugin_options" in given:
            given["plugin_options"] = {**self.plugin_options, **given["plugin_options"]}
        return replace(self, **given)

    def validated(self) -> Config:
        """Check every setting; raise L{ConfigError} naming the first bad one."""
        for declared in SETTINGS:
            try:
                declared.validate(getattr(self, declared.name))
            except SettingError as e:
                raise ConfigError(f"{declared.name}: {e}") from None
        if not self.listen and not self.listen_tls:
            raise ConfigError("listen: at least one endpoint is needed")
        if self.listen_tls and not self.tlsEnabled:
            raise ConfigError("listen_tls: needs tls_cert (or tls_selfsigned)")
        if not self.authSources and not self.proxy_backend:
            raise ConfigError("passwd: a passwd-file (or a --passdb) is required")
        if not self.authSources and self.proxy_master_user:
            # Nothing would check the users' passwords: the backends let the master in.
            raise ConfigError("proxy_master_user: needs an auth source (passwd or passdb)")
        if not self.mail_location and not self.proxy_backend:
            raise ConfigError("mail_location: required, e.g. maildir:/var/mail/%d/%n/Maildir")
        if not self.mail_location and self.lmtp:
            raise ConfigError("lmtp: delivers to the mail_location, and there is none")
        self._checkPlugins()
        self._checkOAuth()
        return self

    def _checkOAuth(self) -> None:
        if self.oauth_jwks and self.oauth_introspection:
            raise ConfigError("oauth_introspection: give it or oauth_jwks, not both")
        if self.oauth_jwks and not (self.oauth_issuer and self.oauth_audience):
            raise ConfigError("oauth_jwks: needs oauth_issuer and oauth_audience")
        if self.oauth_introspection and not (
            self.oauth_client_id and self.oauth_client_secret_file
        ):
            raise ConfigError(
                "oauth_introspection: needs oauth_client_id and oauth_client_secret_file"
            )

    def _checkPlugins(self) -> None:
        from popserv.registry import authSourceKind, storeKind

        try:
            if self.mail_location:  # (none: a server that only proxies)
                kind, args = self.store
                plugin = storeKind(kind)
                plugin.check(args, self.base_dir)
                self.pluginOptions(plugin)
        except (ValueError, SettingError) as e:
            raise ConfigError(f"mail_location: {e}") from None
        for spec in self.authSources:
            try:
                plugin = authSourceKind(spec.kind)
                plugin.check(spec.args, self.base_dir)
                self.pluginOptions(plugin, spec.options)
            except (ValueError, SettingError) as e:
                raise ConfigError(f"passdb {spec}: {e}") from None
        known = {f"{k.name}_{o.name}".replace("-", "_") for k, o in pluginSettings()}
        for name in self.plugin_options:
            if name not in known:
                raise ConfigError(f"unknown setting {name!r}")

    @property
    def tlsEnabled(self) -> bool:
        return self.tls_cert is not None or self.tls_selfsigned

    def path(self, name: str | None) -> str | None:
        """A configured path made absolute against the configuration's directory."""
        if name is None:
            return None
        return os.path.join(self.base_dir, os.path.expanduser(name))

    @property
    def passwdPath(self) -> str:
        path = self.path(self.passwd)
        assert path is not None
        return path

    @property
    def authSources(self) -> tuple[PassdbSpec, ...]:
        """The auth sources in the order they are asked: C{passwd}'s first, then C{passdb}."""
        shorthand = () if not self.passwd else (PassdbSpec("passwd-file", self.passwdPath),)
        return shorthand + self.passdb

    @property
    def usernameRules(self) -> Any:
        """The L{popserv.auth.usernames.UsernameRules} of the user-name settings."""
        from popserv.auth.usernames import UsernameRules, parseTranslation

        return UsernameRules(
            self.username_lowercase,
            self.default_domain or None,
            parseTranslation(self.username_translation or ""),
        )

    @property
    def store(self) -> tuple[str, str]:
        """The mail location as (kind, arguments)."""
        from popserv.registry import splitSpec

        assert self.mail_location is not None
        return splitSpec(self.mail_location, DEFAULT_STORE)

    @property
    def location(self) -> Any:
        """The L{popserv.location.MailLocation} of a maildir mail location."""
        from popserv.location import MailLocation

        kind, args = self.store
        if kind != DEFAULT_STORE:
            raise ConfigError(f"mail_location: a {kind} store has no maildir location")
        return MailLocation.parse(args, self.base_dir)

    def pluginOptions(self, plugin: Any, table: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """
        The options of one store or auth-source kind: its defaults, then the
        settings named C{KIND_OPTION}, then a C{[[passdb]]} table's own keys.
        """
        from popserv.registry import kindOptions

        declared = {o.name: o for o in kindOptions(plugin)}
        values = {name: o.default for name, o in declared.items()}
        prefix = plugin.name.replace("-", "_") + "_"
        for name, value in self.plugin_options.items():
            if name.startswith(prefix) and name[len(prefix) :] in declared:
                values[name[len(prefix) :]] = value
        for key, value in (table or {}).items():
            name = key.replace("-", "_")
            if name not in declared:
                raise SettingError(
                    f"unknown option {key!r} (known: {', '.join(declared) or 'none'})"
                )
            values[name] = declared[name].fromFile(value)
        for name, value in values.items():
            declared[name].validate(value)
        return values


#: Every setting of L{Config}, in declaration order.
SETTINGS: tuple[Setting, ...] = tuple(
    Setting(name=f.name, **f.metadata["setting"]) for f in fields(Config) if f.metadata
)

_LISTS = tuple(s.name for s in SETTINGS if s.kind == LIST)


def settingsByKey() -> dict[str, Setting]:
    """Every spelling a configuration file may use, to its setting."""
    return {key: s for s in SETTINGS for key in s.keys}


def pluginSettings() -> list[tuple[Any, Setting]]:
    """(kind, option) for every option every installed store and auth-source kind declares."""
    from popserv.registry import authSourceKinds, kindOptions, storeKinds

    found = []
    for kinds in (storeKinds(), authSourceKinds()):
        for plugin in kinds.values():
            found += [(plugin, option) for option in kindOptions(plugin)]
    return found


def pluginSetting(plugin: Any, option: Setting) -> Setting:
    """A kind's option as a top-level setting, named C{KIND_OPTION}."""
    return replace(option, name=f"{plugin.name}_{option.name}".replace("-", "_"), aliases=())


def loadConfig(path: str | os.PathLike[str]) -> Config:
    """Read a TOML configuration file; raise L{ConfigError} on any problem."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    known = settingsByKey()
    settings: dict[str, Any] = {}
    pluginOptions: dict[str, Any] = {}
    plugins: dict[str, Setting] | None = None
    for key, value in data.items():
        if key == "passdb":
            items = value if isinstance(value, list) else [value]
            if not all(isinstance(item, (str, dict)) for item in items):
                raise ConfigError(f"{path}: passdb must be strings or [[passdb]] tables")
            settings["passdb"] = tuple(PassdbSpec.parse(item) for item in items)
            continue
        declared = known.get(key)
        if declared is None:
            if plugins is None:
                plugins = {}
                for plugin, option in pluginSettings():
                    full = pluginSetting(plugin, option)
                    plugins.update({k: full for k in full.keys})
            declared = plugins.get(key)
            if declared is None:
                raise ConfigError(
                    f"{path}: unknown setting {key!r} "
                    f"(known: {', '.join(s.name for s in SETTINGS)}, passdb)"
                )
            try:
                pluginOptions[declared.name] = declared.fromFile(value)
            except SettingError as e:
                raise ConfigError(f"{path}: {key} {e}") from None
            continue
        try:
            settings[declared.name] = declared.fromFile(value)
        except SettingError as e:
            raise ConfigError(f"{path}: {key} {e}") from None
    return Config(
        base_dir=os.path.dirname(os.path.abspath(path)),
        plugin_options=pluginOptions,
        **settings,
    )
