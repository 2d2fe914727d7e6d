"""
Every setting is declared once: the twistd options, the TOML keys, the help
and the checks all come from that declaration, and agree.
"""

from __future__ import annotations

import json

import pytest
from twisted.python import usage

from popserv.auth.passwdfile import parsePasswdFile
from popserv.auth.schemes import SCHEMES
from popserv.config import SETTINGS, Config, ConfigError, PassdbSpec, loadConfig
from popserv.registry import authSourceKinds, storeKinds
from popserv.sasl import ALL_MECHANISMS
from popserv.settings import BOOL, INT
from popserv.tap import Options

BASE = {
    "passwd": "passwd",
    "mail_location": "maildir:/srv/mail/%u",
    "tls_selfsigned": True,
    # what the OAuth URLs' samples need beside them
    "oauth_issuer": "https://idp",
    "oauth_audience": "pop",
    "oauth_client_id": "pop",
    "oauth_client_secret_file": "secret",
}
BASE_ARGS = ["--passwd", "passwd", "--mail-location", "maildir:/srv/mail/%u", "--tls-selfsigned"]
BASE_ARGS += [f"--{k.replace('_', '-')}={v}" for k, v in BASE.items() if k.startswith("oauth_")]

#: For each setting: its command-line arguments, its TOML value, the value
#: both must give. A new setting without a sample fails the walk below.
SAMPLES: dict[str, tuple[list[str], object, object]] = {
    "listen": (["--listen", "tcp:1110"], ["tcp:1110"], ("tcp:1110",)),
    "listen_tls": (["--listen-tls", "tcp:1995"], ["tcp:1995"], ("tcp:1995",)),
    "passwd": (["--passwd", "other"], "other", "other"),
    "passdb": (
        ["--passdb", "passwd-file:/etc/p"],
        ["passwd-file:/etc/p"],
        (PassdbSpec("passwd-file", "/etc/p"),),
    ),
    "mail_location": (["--mail-location", "/srv/%n"], "/srv/%n", "/srv/%n"),
    "timeout": (["--timeout", "1200"], 1200, 1200),
    "hostname": (["--hostname", "pop.example.org"], "pop.example.org", "pop.example.org"),
    "apop": (["--no-apop"], False, False),
    "max_bad_commands": (["--max-bad-commands", "7"], 7, 7),
    "create_maildirs": (["--no-create-maildirs"], False, False),
    "uidl_source": (["--uidl-source", "dovecot"], "dovecot", "dovecot"),
    "login_delay": (["--login-delay", "300"], 300, 300),
    "expire": (["--expire", "30"], 30, 30),
    "language": (["--language", "ru"], "ru", "ru"),
    "sasl_mechanisms": (
        ["--sasl-mechanisms", "PLAIN,LOGIN"],
        ["PLAIN", "LOGIN"],
        ("PLAIN", "LOGIN"),
    ),
    "master_users": (["--master-users", "admin"], ["admin"], ("admin",)),
    "username_lowercase": (["--username-lowercase"], True, True),
    "default_domain": (["--default-domain", "example.org"], "example.org", "example.org"),
    "username_translation": (["--username-translation", "%@*@"], "%@*@", "%@*@"),
    "tls_cert": (["--tls-cert", "cert.pem"], "cert.pem", "cert.pem"),
    "tls_key": (["--tls-key", "key.pem"], "key.pem", "key.pem"),
    "tls_selfsigned": (["--no-tls-selfsigned"], False, False),
    "tls_client_ca": (["--tls-client-ca", "ca.pem"], "ca.pem", "ca.pem"),
    "tls_cert_user": (["--tls-cert-user", "email"], "email", "email"),
    "plaintext_auth": (["--plaintext-auth", "always"], "always", "always"),
    "oauth_jwks": (["--oauth-jwks", "https://idp/jwks"], "https://idp/jwks", "https://idp/jwks"),
    "oauth_issuer": (["--oauth-issuer", "https://idp"], "https://idp", "https://idp"),
    "oauth_audience": (["--oauth-audience", "pop"], "pop", "pop"),
    "oauth_user_claim": (["--oauth-user-claim", "sub"], "sub", "sub"),
    "oauth_algorithms": (
        ["--oauth-algorithms", "RS256,ES256"],
        ["RS256", "ES256"],
        ("RS256", "ES256"),
    ),
    "oauth_introspection": (["--oauth-introspection", "https://i"], "https://i", "https://i"),
    "oauth_client_id": (["--oauth-client-id", "pop"], "pop", "pop"),
    "oauth_client_secret_file": (["--oauth-client-secret-file", "s"], "s", "s"),
    "trusted_networks": (["--trusted-networks", "10.0.0.0/8"], ["10.0.0.0/8"], ("10.0.0.0/8",)),
    "haproxy_trusted_networks": (
        ["--haproxy-trusted-networks", "10.0.0.0/8"],
        ["10.0.0.0/8"],
        ("10.0.0.0/8",),
    ),
    "lmtp_trusted_networks": (
        ["--lmtp-trusted-networks", "192.0.2.0/24"],
        ["192.0.2.0/24"],
        ("192.0.2.0/24",),
    ),
    "metrics": (["--metrics", "tcp:9110"], "tcp:9110", "tcp:9110"),
    "logout_format": (["--logout-format", "bye {user}"], "bye {user}", "bye {user}"),
    "shutdown_grace": (["--shutdown-grace", "5"], 5, 5),
    "login_timeout": (["--login-timeout", "60"], 60, 60),
    "max_connections": (["--max-connections", "10"], 10, 10),
    "max_connections_per_ip": (["--max-connections-per-ip", "3"], 3, 3),
    "auth_penalty": (["--auth-penalty", "0"], 0, 0),
    "auth_penalty_shared": (["--no-auth-penalty-shared"], False, False),
    "auth_cache_ttl": (["--auth-cache-ttl", "0"], 0, 0),
    "lmtp": (["--lmtp", "unix:lmtp.sock"], ["unix:lmtp.sock"], ("unix:lmtp.sock",)),
    "lmtp_max_size": (["--lmtp-max-size", "1000"], 1000, 1000),
    "gssapi_keytab": (["--gssapi-keytab", "pop.keytab"], "pop.keytab", "pop.keytab"),
    "gssapi_principal": (
        ["--gssapi-principal", "pop/mail.example.org"],
        "pop/mail.example.org",
        "pop/mail.example.org",
    ),
    "gssapi_realm_map": (
        ["--gssapi-realm-map", "AD.EXAMPLE.ORG=example.org"],
        ["AD.EXAMPLE.ORG=example.org"],
        ("AD.EXAMPLE.ORG=example.org",),
    ),
    "proxy_backend": (
        ["--proxy-backend", "pop://;AUTH=*@mail2.example.org:110"],
        ["pop://;AUTH=*@mail2.example.org:110"],
        ("pop://;AUTH=*@mail2.example.org:110",),
    ),
    "proxy_ca": (["--proxy-ca", "ca.pem"], "ca.pem", "ca.pem"),
    "proxy_master_user": (["--proxy-master-user", "proxy"], "proxy", "proxy"),
    "proxy_master_password_file": (
        ["--proxy-master-password-file", "master.pw"],
        "master.pw",
        "master.pw",
    ),
    "proxy_timeout": (["--proxy-timeout", "5"], 5, 5),
    "proxy_send_proxy": (["--proxy-send-proxy"], True, True),
}


def toml(settings: dict[str, object]) -> str:
    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return json.dumps(v)  # strings, numbers and lists of strings read the same in TOML

    return "".join(f"{key} = {value(v)}\n" for key, v in settings.items())


def fromCommandLine(*argv: str) -> Config:
    options = Options()
    options.parseOptions([*BASE_ARGS, *argv])
    return options.config


def fromFile(tmp_path, settings: dict[str, object]) -> Config:
    path = tmp_path / "popserv.conf"
    path.write_text(toml({**BASE, **settings}))
    return loadConfig(path).validated()


def test_every_setting_has_a_sample():
    """The walk below covers every setting there is."""
    assert set(SAMPLES) == {s.name for s in SETTINGS}


@pytest.mark.parametrize("declared", SETTINGS, ids=lambda s: s.name)
def test_setting_round_trips_through_both_spellings(declared, tmp_path):
    """
    The long option and the TOML key of a setting are the same name, and a
    value given either way (and with '-' for '_' in the file) is the same.
    """
    argv, tomlValue, expected = SAMPLES[declared.name]
    assert argv[0] in (f"--{declared.option}", f"--no-{declared.option}")
    assert getattr(fromCommandLine(*argv), declared.name) == expected
    assert getattr(fromFile(tmp_path, {declared.name: tomlValue}), declared.name) == expected
    dashed = declared.name.replace("_", "-")
    assert getattr(fromFile(tmp_path, {dashed: tomlValue}), declared.name) == expected


@pytest.mark.parametrize("declared", SETTINGS, ids=lambda s: s.name)
def test_setting_is_documented(declared):
    """Each setting has help, shown under its option (and every alias) by --help."""
    text = str(Options())
    assert len(declared.describe()) > 20
    assert f"--{declared.option}" in text
    for alias in declared.optionAliases:
        assert f"--{alias}" in text
    if declared.short:
        assert f"-{declared.short}, --{declared.option}" in text


def test_old_spellings_stay_aliases(tmp_path):
    """Spellings configurations already use keep working beside the canonical ones."""
    config = fromCommandLine(
        "--trusted-network", "10.0.0.0/8", "--trusted-network", "::1/128", "--master-user", "a"
    )
    assert config.trusted_networks == ("10.0.0.0/8", "::1/128")
    assert config.master_users == ("a",)
    assert fromCommandLine("--no-apop").apop is False
    assert fromCommandLine("--apop").apop is True
    config = fromFile(tmp_path, {"trusted_network": ["10.0.0.0/8"], "master-user": ["a"]})
    assert config.trusted_networks == ("10.0.0.0/8",)
    assert config.master_users == ("a",)


@pytest.mark.parametrize(
    "declared", [s for s in SETTINGS if s.kind in (INT, BOOL)], ids=lambda s: s.name
)
def test_wrong_types_are_refused_by_name(declared, tmp_path):
    """A value of the wrong type is refused, naming the setting, on either path."""
    with pytest.raises(ConfigError, match=declared.name):
        fromFile(tmp_path, {declared.name: "not a number" if declared.kind == INT else 3})
    if declared.kind == INT:
        with pytest.raises(usage.UsageError, match=f"--{declared.option}"):
            fromCommandLine(f"--{declared.option}", "x")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--timeout", "0"], "timeout: must be 1 or more"),
        (["--language", "xx"], "language: one of en, ru"),
        (["--expire", "-1"], "expire: NEVER or a number of days"),
        (["--sasl-mechanisms", "PLAIN,NOPE"], "unknown SASL mechanism 'NOPE'"),
        (["--trusted-networks", "nonsense"], "'nonsense' is not a network"),
        (["--plaintext-auth", "never"], "one of tls, always"),
        (["--passdb", "nope:x"], "unknown passdb kind 'nope'"),
        (["--mail-location", "nope:x"], "unknown mail storage kind 'nope'"),
        (["--logout-format", "{nope}"], "logout-format: bad logout format"),
    ],
)
def test_bad_values_are_named(argv, message):
    with pytest.raises(usage.UsageError, match=message):
        fromCommandLine(*argv)


def test_choices_in_help_come_from_the_registries():
    """Help that lists mechanisms, schemes or kinds lists every one there is."""
    described = {s.name: s.describe() for s in SETTINGS}
    for mechanism in ALL_MECHANISMS:
        assert mechanism.name in described["sasl_mechanisms"]
    for scheme in SCHEMES:
        assert scheme in described["passwd"]
    for kind in storeKinds():
        assert kind in described["mail_location"]
    for kind in authSourceKinds():
        assert kind in described["passdb"]


def test_per_user_settings_are_what_a_passwd_file_line_may_set():
    """The settings declared per-user are the ones a passwd-file line's extra fields set."""
    perUser = [s for s in SETTINGS if s.perUser]
    assert perUser
    extra = " ".join(f"{s.name}={SAMPLES[s.name][1]}" for s in perUser)
    entry = parsePasswdFile(f"u:{{PLAIN}}x::::::{extra}\n", problems=[])["u"]
    assert len(entry.settings) == len(perUser)


def test_passdb_tables_carry_kind_args_and_options(tmp_path):
    """[[passdb]] tables configure sources one by one; --passwd comes first in the chain."""
    path = tmp_path / "popserv.conf"
    path.write_text(
        'passwd = "passwd"\nmail_location = "/m/%u"\n'
        '[[passdb]]\nkind = "passwd-file"\nargs = "more"\n'
    )
    config = loadConfig(path).validated()
    assert [str(s) for s in config.authSources] == [
        f"passwd-file:{tmp_path / 'passwd'}",
        "passwd-file:more",
    ]
    path.write_text(
        'mail_location = "/m/%u"\n[[passdb]]\nkind = "passwd-file"\nargs = "x"\nz = 1\n'
    )
    with pytest.raises(ConfigError, match="unknown option 'z'"):
        loadConfig(path).validated()
