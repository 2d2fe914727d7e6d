"""
The configuration: one set of settings shared by the twistd plugin
(C{--config} plus options), the tac file and the embedding API.

The file format is TOML (read with the standard library's C{tomllib}); keys
are the long option names with C{_} for C{-}. Relative paths in a file are
relative to the file's own directory, so a configuration can be moved whole.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from typing import Any

from popserv.i18n import LANGUAGES
from popserv.location import MailLocation
from popserv.logs import DEFAULT_LOGOUT_FORMAT, validateFormat
from popserv.policy import parseExpire
from popserv.protocol import DEFAULT_LOGIN_TIMEOUT, DEFAULT_MAX_BAD_COMMANDS, DEFAULT_TIMEOUT
from popserv.sasl import mechanismsByName
from popserv.tls import CERT_USER_FIELDS, DEFAULT_TRUSTED_NETWORKS

__all__ = ["Config", "ConfigError", "loadConfig", "DEFAULT_LISTEN"]

#: The standard POP3 port on all interfaces (RFC 1939 section 3).
DEFAULT_LISTEN = "tcp:110"


class ConfigError(ValueError):
    """A configuration that cannot work; the message says which setting and why."""


@dataclass(frozen=True)
class Config:
    """
    @ivar listen: Twisted server endpoint strings to listen on.
    @ivar passwd: the passwd-file path.
    @ivar mail_location: where maildrops are, e.g. C{maildir:/var/mail/%d/%n/Maildir}.
    @ivar timeout: autologout after this many idle seconds.
    @ivar hostname: host name in the APOP greeting timestamp (default: this host's).
    @ivar apop: offer APOP (needs {PLAIN} secrets to succeed for an account).
    @ivar max_bad_commands: close a connection after this many bad commands.
    @ivar create_maildirs: create a missing maildrop at first login.
    @ivar login_delay: minimum seconds between two logins of a user (RFC 2449
        LOGIN-DELAY; 0 for none); a passwd-file line may set its own.
    @ivar expire: days messages stay on the server, C{"NEVER"} or a number (0:
        retrieved messages are removed at QUIT even without DELE).
    @ivar language: the default language of response texts (LANG can change it).
    @ivar sasl_mechanisms: the SASL mechanisms to offer (default: all that can
        succeed with the passwd-file's secrets).
    @ivar master_users: users who may log in as any other user with SASL PLAIN
        (authorization id = the user to act as).
    @ivar listen_tls: endpoints to listen on with implicit TLS (RFC 8314 POP3S).
    @ivar tls_cert: PEM certificate (then its chain) for STLS and implicit TLS.
    @ivar tls_key: PEM private key (default: in C{tls_cert}).
    @ivar tls_selfsigned: without C{tls_cert}, use a throw-away self-signed
        certificate for localhost made at start-up (demos only).
    @ivar tls_client_ca: PEM CA certificates for client certificates (SASL EXTERNAL).
    @ivar tls_cert_user: what names the user in a client certificate: cn,
        email or dns.
    @ivar plaintext_auth: C{"tls"}: passwords in the clear (USER/PASS, PLAIN,
        LOGIN) only over TLS or from C{trusted_networks}; C{"always"}: anywhere.
    @ivar trusted_networks: networks (CIDR) where plaintext passwords are allowed
        without TLS.
    @ivar metrics: an endpoint to serve Prometheus metrics on (/metrics); off if None.
    @ivar logout_format: the line logged when a session ends (see L{popserv.logs}).
    @ivar shutdown_grace: seconds open sessions get to finish when the server stops.
    @ivar login_timeout: idle seconds allowed before a login.
    @ivar max_connections: connections open at once (0: no limit).
    @ivar max_connections_per_ip: connections open at once from one address.
    @ivar auth_penalty: the longest delay, in seconds, for answering failed
        logins from an address (1 s, 2 s, 4 s ... doubling); 0 turns it off.
    @ivar auth_cache_ttl: seconds a successful check of a slow password hash
        (argon2, bcrypt, crypt) is remembered; 0 checks every login.
    """

    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    passwd: str | None = None
    mail_location: str | None = None
    timeout: int = DEFAULT_TIMEOUT
    hostname: str | None = None
    apop: bool = True
    max_bad_commands: int = DEFAULT_MAX_BAD_COMMANDS
    create_maildirs: bool = True
    login_delay: int = 0
    expire: str | int = "NEVER"
    language: str = "en"
    sasl_mechanisms: tuple[str, ...] | None = None
    master_users: tuple[str, ...] = ()
    listen_tls: tuple[str, ...] = ()
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_selfsigned: bool = False
    tls_client_ca: str | None = None
    tls_cert_user: str = "cn"
    plaintext_auth: str = "tls"
    trusted_networks: tuple[str, ...] = DEFAULT_TRUSTED_NETWORKS
    metrics: str | None = None
    logout_format: str = DEFAULT_LOGOUT_FORMAT
    shutdown_grace: int = 30
    login_timeout: int = DEFAULT_LOGIN_TIMEOUT
    max_connections: int = 1000
    max_connections_per_ip: int = 50
    auth_penalty: int = 15
    auth_cache_ttl: int = 600
    #: the directory relative paths are resolved against (the config file's)
    base_dir: str = field(default_factory=os.getcwd, compare=False)

    def merged(self, **overrides: Any) -> Config:
        """A copy with the settings that are not None replaced."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def validated(self) -> Config:
        """Check every setting; raise L{ConfigError} naming the first bad one."""
        if not self.listen and not self.listen_tls:
            raise ConfigError("listen: at least one endpoint is needed")
        if self.listen_tls and not self.tlsEnabled:
            raise ConfigError("listen_tls: needs tls_cert (or tls_selfsigned)")
        if self.tls_cert_user not in CERT_USER_FIELDS:
            raise ConfigError(f"tls_cert_user: one of {', '.join(CERT_USER_FIELDS)}")
        try:
            validateFormat(self.logout_format)
        except ValueError as e:
            raise ConfigError(f"logout_format: {e}") from None
        for name in (
            "login_timeout",
            "max_connections",
            "max_connections_per_ip",
            "auth_penalty",
            "auth_cache_ttl",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be 0 or more")
        if self.login_timeout == 0:
            raise ConfigError("login_timeout: must be positive")
        if self.shutdown_grace < 0:
            raise ConfigError("shutdown_grace: must be 0 or more seconds")
        if self.plaintext_auth not in ("tls", "always"):
            raise ConfigError("plaintext_auth: tls or always")
        for network in self.trusted_networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ConfigError(f"trusted_networks: {network!r} is not a network") from None
        if not self.passwd:
            raise ConfigError("passwd: a passwd-file is required")
        if not self.mail_location:
            raise ConfigError("mail_location: required, e.g. maildir:/var/mail/%d/%n/Maildir")
        try:
            MailLocation.parse(self.mail_location, self.base_dir)
        except ValueError as e:
            raise ConfigError(f"mail_location: {e}") from None
        if self.timeout <= 0:
            raise ConfigError("timeout: must be a positive number of seconds")
        if self.max_bad_commands <= 0:
            raise ConfigError("max_bad_commands: must be positive")
        if self.login_delay < 0:
            raise ConfigError("login_delay: must be 0 or more seconds")
        try:
            parseExpire(self.expire)
        except ValueError:
            raise ConfigError("expire: must be NEVER or a number of days >= 0") from None
        if self.language not in LANGUAGES:
            raise ConfigError(f"language: one of {', '.join(LANGUAGES)}")
        try:
            mechanismsByName(list(self.sasl_mechanisms) if self.sasl_mechanisms else None)
        except ValueError as e:
            raise ConfigError(f"sasl_mechanisms: {e}") from None
        return self

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
        assert self.passwd is not None
        return os.path.join(self.base_dir, os.path.expanduser(self.passwd))

    @property
    def location(self) -> MailLocation:
        assert self.mail_location is not None
        return MailLocation.parse(self.mail_location, self.base_dir)


_TYPES: dict[str, type | tuple[type, ...]] = {
    "listen": (list, str),
    "passwd": str,
    "mail_location": str,
    "timeout": int,
    "hostname": str,
    "apop": bool,
    "max_bad_commands": int,
    "create_maildirs": bool,
    "login_delay": int,
    "expire": (str, int),
    "language": str,
    "sasl_mechanisms": list,
    "master_users": list,
    "listen_tls": (list, str),
    "tls_cert": str,
    "tls_key": str,
    "tls_selfsigned": bool,
    "tls_client_ca": str,
    "tls_cert_user": str,
    "plaintext_auth": str,
    "trusted_networks": list,
    "metrics": str,
    "logout_format": str,
    "shutdown_grace": int,
    "login_timeout": int,
    "max_connections": int,
    "max_connections_per_ip": int,
    "auth_penalty": int,
    "auth_cache_ttl": int,
}

_LISTS = ("listen", "sasl_mechanisms", "master_users", "listen_tls", "trusted_networks")


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
    known = {f.name for f in fields(Config)} - {"base_dir"}
    settings: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(
                f"{path}: unknown setting {key!r} (known: {', '.join(sorted(known))})"
            )
        expected = _TYPES[name]
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ConfigError(f"{path}: {key} has the wrong type")
        if name in _LISTS:
            value = (value,) if isinstance(value, str) else tuple(value)
            if not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{path}: {key} must be a list of strings")
        settings[name] = value
    return Config(base_dir=os.path.dirname(os.path.abspath(path)), **settings)
