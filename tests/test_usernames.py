"""
User-name rules (--username-translation, --default-domain, --username-lowercase): every
spelling of a login name reaches the same user and the same %d/%n maildrop, whatever the
mechanism, and LMTP recipients map the same way.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import poplib
import smtplib

import pytest
import scramp

from popserv.auth.usernames import UsernameRules, parseTranslation
from popserv.config import Config, ConfigError
from support import ServerProcess, deliver

USERS = {
    "john@example.org": "{PLAIN}secret",
    "admin@example.org": "{PLAIN}master",
}

#: Every form of john's name a client may type.
SPELLINGS = [
    "john@example.org",
    "john%example.org",
    "john*example.org",
    "JOHN@Example.ORG",
    "John",
]


def test_rules_run_in_dovecots_order():
    rules = UsernameRules(True, "example.org", parseTranslation("%@*@"))
    assert [rules(s) for s in SPELLINGS] == ["john@example.org"] * len(SPELLINGS)
    # a translated separator counts as the domain's: no default domain after it
    assert rules("a%other.net") == "a@other.net"
    assert UsernameRules().identity and UsernameRules()("MiXed%x") == "MiXed%x"
    assert not UsernameRules(lowercase=True).identity


def test_translation_needs_pairs():
    with pytest.raises(ValueError, match="pairs"):
        parseTranslation("%@*")
    with pytest.raises(ConfigError, match="username_translation"):
        Config(username_translation="%@*").validated()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("names")
    sock = root / "lmtp.sock"
    srv = ServerProcess(
        root,
        USERS,
        extra=(
            'username_translation = "%@*@"\ndefault_domain = "example.org"\n'
            "username_lowercase = true\n"
            'master_users = ["admin@example.org"]\nplaintext_auth = "always"\n'
            f'lmtp = ["unix:{sock}"]\n'
        ),
    )
    srv.start()
    srv.waitForLog("LMTPFactory starting on")
    srv.lmtpSocket = str(sock)
    deliver(srv.maildir("john@example.org"), b"Subject: one\r\n\r\nbody\r\n")
    yield srv
    srv.stop()


def connect(server) -> poplib.POP3:
    return poplib.POP3("127.0.0.1", server.port, timeout=10)


def loggedInAs(pop: poplib.POP3) -> list[bytes]:
    """The UIDLs the session sees (john's maildrop has at least the one message)."""
    try:
        return pop.uidl()[1]
    finally:
        pop.quit()


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def plain(pop: poplib.POP3, authcid: str, password: str, authzid: str = "") -> None:
    pop._shortcmd("AUTH PLAIN " + b64(f"{authzid}\0{authcid}\0{password}".encode()).decode())


def cramMD5(pop: poplib.POP3, user: str, password: str) -> None:
    challenge = base64.b64decode(pop._shortcmd("AUTH CRAM-MD5")[2:])
    digest = hmac.new(password.encode(), challenge, hashlib.md5).hexdigest()
    pop._shortcmd(b64(f"{user} {digest}".encode()).decode())


def scram(pop: poplib.POP3, user: str, password: str) -> None:
    client = scramp.ScramClient(["SCRAM-SHA-256"], user, password)
    first = pop._shortcmd("AUTH SCRAM-SHA-256 " + b64(client.get_client_first().encode()).decode())
    client.set_server_first(base64.b64decode(first[2:]).decode())
    final = pop._shortcmd(b64(client.get_client_final().encode()).decode())
    client.set_server_final(base64.b64decode(final[2:]).decode())
    pop._shortcmd("")


def login(pop: poplib.POP3, mechanism: str, name: str) -> None:
    if mechanism == "USER":
        pop.user(name)
        pop.pass_("secret")
    elif mechanism == "APOP":
        pop.apop(name, "secret")
    elif mechanism == "PLAIN":
        plain(pop, name, "secret")
    elif mechanism == "CRAM-MD5":
        cramMD5(pop, name, "secret")
    elif mechanism == "SCRAM-SHA-256":
        scram(pop, name, "secret")
    elif mechanism == "self-authzid":  # acting as oneself, spelled otherwise
        plain(pop, name, "secret", authzid=name.upper())
    elif mechanism == "master":
        plain(pop, "ADMIN%example.org", "master", authzid=name)


@pytest.mark.parametrize(
    "mechanism", ["USER", "APOP", "PLAIN", "CRAM-MD5", "SCRAM-SHA-256", "self-authzid", "master"]
)
def test_every_spelling_reaches_the_same_maildrop(server, mechanism):
    expected = None
    for name in SPELLINGS:
        pop = connect(server)
        login(pop, mechanism, name)
        seen = loggedInAs(pop)
        assert seen, (mechanism, name)
        expected = expected or seen
        assert seen == expected, (mechanism, name)
    # the %d/%n layout got the canonical name: no maildrop for another spelling
    domains = sorted(p.name for p in server.mailRoot.iterdir() if not p.name.startswith("."))
    assert domains == ["example.org"], domains
    assert sorted(p.name for p in (server.mailRoot / "example.org").iterdir()) == ["john"]


def test_a_wrong_password_still_fails_in_every_spelling(server):
    for name in SPELLINGS:
        pop = connect(server)
        pop.user(name)
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            pop.pass_("wrong")
        pop.quit()


def test_lmtp_recipients_follow_the_login_rules(server):
    before = len(list((server.maildir("john@example.org") / "new").iterdir()))
    # one recipient per transaction: smtplib reads a single reply after DATA
    for address in ("john%example.org", "JOHN@EXAMPLE.ORG"):
        with smtplib.LMTP(server.lmtpSocket) as client:
            assert client.sendmail("s@example.net", [address], b"Subject: two\r\n\r\nb\r\n") == {}
    with smtplib.LMTP(server.lmtpSocket) as client:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            client.sendmail("s@example.net", ["nobody%example.org"], b"Subject: x\r\n\r\n")
    assert refused.value.recipients["nobody%example.org"][0] == 550
    after = len(list((server.maildir("john@example.org") / "new").iterdir()))
    assert after == before + 2
