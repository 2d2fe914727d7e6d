"""C{twistd popserv}: command-line options only; the building is in L{popserv.service}."""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage

from popserv.config import Config, ConfigError, loadConfig
from popserv.service import freezeStartupObjects
from popserv.service import makeService as _makeService

__all__ = ["Options", "makeService"]


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Serve POP3 (RFC 1939) from Maildirs to users of a Dovecot-style passwd-file. "
        "Settings come from --config (TOML) and are overridden by options given here. "
        "Example: twistd -n popserv --listen tcp:110 --passwd /etc/popserv/passwd "
        "--mail-location 'maildir:/var/mail/%d/%n/Maildir'"
    )

    optParameters = [
        [
            "config",
            "c",
            None,
            "TOML configuration file (keys as the long options below, '_' for '-'); "
            "relative paths in it are relative to the file.",
        ],
        [
            "passwd",
            "p",
            None,
            "Passwd-file: lines of user:{SCHEME}secret, SCHEME one of PLAIN, ARGON2ID, "
            "BLF-CRYPT, SHA512-CRYPT, SHA256-CRYPT. Re-read when it changes.",
        ],
        [
            "mail-location",
            "m",
            None,
            "Where maildrops are, e.g. maildir:/var/mail/%d/%n/Maildir; %u is the user "
            "name, %n its local part, %d its domain.",
        ],
        [
            "timeout",
            None,
            None,
            "Autologout after this many idle seconds [default: 600, the RFC 1939 minimum].",
            int,
        ],
        [
            "hostname",
            None,
            None,
            "Host name in the APOP greeting timestamp [default: this host's name].",
        ],
        [
            "max-bad-commands",
            None,
            None,
            "Close a connection after this many unknown or malformed commands [default: 20].",
            int,
        ],
        [
            "login-delay",
            None,
            None,
            "Minimum seconds between two logins of a user (RFC 2449 LOGIN-DELAY); a "
            "passwd-file line can set its own with login_delay=N [default: 0, none].",
            int,
        ],
        [
            "expire",
            None,
            None,
            "Days messages stay on the server: NEVER, or a number; 0 removes retrieved "
            "messages at QUIT (RFC 2449 EXPIRE); per user: expire=N [default: NEVER].",
        ],
        ["language", None, None, "Default language of response texts: en or ru [default: en]."],
        [
            "tls-cert",
            None,
            None,
            "PEM certificate (followed by its chain) for STLS and --listen-tls; "
            "re-read on SIGHUP.",
        ],
        ["tls-key", None, None, "PEM private key [default: taken from --tls-cert]."],
        [
            "tls-client-ca",
            None,
            None,
            "PEM CA certificates: clients may present a certificate they issued and "
            "log in with SASL EXTERNAL.",
        ],
        [
            "tls-cert-user",
            None,
            None,
            "What in a client certificate is the user name: cn, email or dns [default: cn].",
        ],
        [
            "plaintext-auth",
            None,
            None,
            "tls: passwords in the clear (USER/PASS, PLAIN, LOGIN) only over TLS or from "
            "--trusted-network; always: anywhere (labs only) [default: tls].",
        ],
        [
            "metrics",
            None,
            None,
            "Serve Prometheus metrics at /metrics on this endpoint, e.g. "
            "tcp:9110:interface=127.0.0.1 [default: off].",
        ],
        [
            "logout-format",
            None,
            None,
            "The line logged when a session ends, a Python format string over: "
            "user ip port tls mechanism reason duration retr retr_bytes top top_bytes dele "
            "removed left bytes_out commands bad_commands.",
        ],
        [
            "shutdown-grace",
            None,
            None,
            "Seconds open sessions get to finish when the server stops [default: 30].",
            int,
        ],
        [
            "login-timeout",
            None,
            None,
            "Idle seconds allowed before a login [default: 120].",
            int,
        ],
        [
            "max-connections",
            None,
            None,
            "Connections open at once, server-wide; 0 for no limit [default: 1000].",
            int,
        ],
        [
            "max-connections-per-ip",
            None,
            None,
            "Connections open at once from one client address; 0 for no limit [default: 50].",
            int,
        ],
        [
            "auth-penalty",
            None,
            None,
            "Failed logins from an address are answered after 1, 2, 4 ... seconds, up to "
            "this many; 0 turns the penalty off [default: 15].",
            int,
        ],
        [
            "auth-cache-ttl",
            None,
            None,
            "Seconds a successful check of a slow password hash (argon2, bcrypt, crypt) is "
            "remembered, so frequent polling costs no hashing; 0 checks every login "
            "[default: 600].",
            int,
        ],
        [
            "sasl-mechanisms",
            None,
            None,
            "Comma-separated SASL mechanisms to offer, from SCRAM-SHA-256, SCRAM-SHA-1, "
            "CRAM-MD5, PLAIN, LOGIN [default: all that the passwd-file's secrets allow].",
        ],
    ]
    optFlags = [
        [
            "tls-selfsigned",
            None,
            "Without --tls-cert, make a throw-away self-signed certificate for localhost "
            "at start-up (demos and tests only).",
        ],
        ["no-apop", None, "Do not offer APOP (no timestamp in the greeting)."],
        [
            "no-create-maildirs",
            None,
            "Refuse a login whose maildrop does not exist instead of creating it.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["master-users"] = []
        self["listen-tls"] = []
        self["trusted-networks"] = []

    def opt_listen(self, description: str) -> None:
        """
        Listen on this Twisted server endpoint; repeat for several
        (e.g. tcp:110, tcp:1110:interface=127.0.0.1, unix:/run/popserv.sock,
        systemd:domain=INET:index=0) [default: tcp:110].
        """
        self["listen"].append(description)

    opt_l = opt_listen

    def opt_listen_tls(self, description: str) -> None:
        """
        Listen on this endpoint with implicit TLS (RFC 8314 POP3S), using
        --tls-cert; repeatable (e.g. tcp:995). An ssl: endpoint given to
        --listen works too, with its own certificate.
        """
        self["listen-tls"].append(description)

    def opt_trusted_network(self, network: str) -> None:
        """
        A network (CIDR) where passwords may be sent without TLS; repeatable
        [default: 127.0.0.0/8 and ::1/128].
        """
        self["trusted-networks"].append(network)

    def opt_master_user(self, user: str) -> None:
        """
        A user who may log in as anyone else with SASL PLAIN (authorization id:
        the user to act as); repeatable.
        """
        self["master-users"].append(user)

    def postOptions(self) -> None:
        try:
            base = loadConfig(self["config"]) if self["config"] else Config()
            self.config = base.merged(
                listen=tuple(self["listen"]) or None,
                passwd=self["passwd"],
                mail_location=self["mail-location"],
                timeout=self["timeout"],
                hostname=self["hostname"],
                max_bad_commands=self["max-bad-commands"],
                apop=False if self["no-apop"] else None,
                create_maildirs=False if self["no-create-maildirs"] else None,
                login_delay=self["login-delay"],
                expire=self["expire"],
                language=self["language"],
                sasl_mechanisms=(
                    tuple(m.strip() for m in self["sasl-mechanisms"].split(",") if m.strip())
                    if self["sasl-mechanisms"]
                    else None
                ),
                master_users=tuple(self["master-users"]) or None,
                listen_tls=tuple(self["listen-tls"]) or None,
                tls_cert=self["tls-cert"],
                tls_key=self["tls-key"],
                tls_selfsigned=True if self["tls-selfsigned"] else None,
                tls_client_ca=self["tls-client-ca"],
                tls_cert_user=self["tls-cert-user"],
                plaintext_auth=self["plaintext-auth"],
                trusted_networks=tuple(self["trusted-networks"]) or None,
                metrics=self["metrics"],
                logout_format=self["logout-format"],
                shutdown_grace=self["shutdown-grace"],
                login_timeout=self["login-timeout"],
                max_connections=self["max-connections"],
                max_connections_per_ip=self["max-connections-per-ip"],
                auth_penalty=self["auth-penalty"],
                auth_cache_ttl=self["auth-cache-ttl"],
            ).validated()
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def makeService(options: Options) -> IService:
    """Build the popserv service from parsed options."""
    try:
        service = _makeService(options.config)
    except ConfigError as e:
        raise usage.UsageError(str(e)) from None
    from twisted.internet import reactor

    reactor.callWhenRunning(freezeStartupObjects)
    return service
