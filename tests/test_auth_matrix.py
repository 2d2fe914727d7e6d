"""
Every login mechanism against every auth source (issue 14): a real login
over POP3S (a client certificate on every connection) to a real
C{twistd popserv} per source, each with a Kerberos keytab from the
throw-away realm (tests/kdc.py), a JWKS from a local identity provider
(tests/oauthidp.py) and its users in:

  - C{passwd-file}: the passwd-file;
  - C{pgsql}: popserv's users table in a real PostgreSQL (tests/pg.py);
  - C{ldap-bind}: a real slapd (tests/slapd.py), passwords checked by
    binding as the user;
  - C{ldap-lookup}: the same directory, C{userPassword} read and checked
    by popserv;
  - C{chain}: a passwd-file asked first (another user), then the
    directory in the lookup mode, which knows the user.

The password mechanisms log in as the source's password user; GSSAPI,
EXTERNAL, OAUTHBEARER and XOAUTH2 as C{alice@example.org}, who must exist
in the source, looked up without a password (her principal
C{alice@KRBTEST.COM}, her certificate's e-mail address, her token's
C{email} claim). Every login must reach the user's own maildrop (one
message waits there).

APOP, CRAM-MD5 and SCRAM need a plaintext-equivalent secret on the
server: binding to the directory as the user cannot give one, so with
C{ldap-bind} CAPA does not offer them and they are refused.

docs/guide/auth-matrix.rst lists the test id that proves each pair; keep
them in step. The last test of each source reads its server's whole log
for a password, a bind password, a ticket or a token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import poplib
import re
import ssl

import pytest
import scramp
from oauthidp import AUDIENCE, ISSUER, IdentityProvider, publicJWK, rsaKey, token
from slapd import PEOPLE, READER_DN, READER_PASSWORD
from test_gssapi import Client as GSSClient

from support import ServerProcess, deliver, makeTestPKI

MECHANISMS = (
    "USER",
    "APOP",
    "PLAIN",
    "LOGIN",
    "CRAM-MD5",
    "SCRAM-SHA-1",
    "SCRAM-SHA-256",
    "SCRAM-SHA-1-PLUS",
    "SCRAM-SHA-256-PLUS",
    "EXTERNAL",
    "GSSAPI",
    "OAUTHBEARER",
    "XOAUTH2",
)
SOURCES = ("passwd-file", "pgsql", "ldap-bind", "ldap-lookup", "chain")
#: What needs the plaintext-equivalent secret the bind mode never sees.
SHARED_SECRET = {"APOP", "CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256"}
SHARED_SECRET |= {f"{m}-PLUS" for m in SHARED_SECRET if m.startswith("SCRAM")}
IMPOSSIBLE = {("ldap-bind", m) for m in SHARED_SECRET}
PASSWORDLESS = {"EXTERNAL", "GSSAPI", "OAUTHBEARER", "XOAUTH2"}

#: The user with no password needed, the same in every source.
ALICE = "alice@example.org"
#: The password user of each source (and their password).
PASSWORD_USERS = {
    "passwd-file": (ALICE, "wonderland"),
    "pgsql": (ALICE, "wonderland"),
    "ldap-bind": (ALICE, "wonderland"),
    "ldap-lookup": ("henry@example.org", "h3nry-clear"),
    "chain": ("henry@example.org", "h3nry-clear"),
}
WRONG = "Wr0ng-Matrix-Pw"
FILTER = "(%7C(uid=%u)(mail=%u))"
KEY = rsaKey()
TIMEOUT = 20


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


# -- the servers -----------------------------------------------------------------------------


class Setup:
    """What every server of the module shares: PKI, realm, identity provider."""

    def __init__(self, root, kdc, slapd, postgresql) -> None:
        self.root = root
        self.kdc = kdc
        self.slapd = slapd
        self.postgresql = postgresql
        self.pki = makeTestPKI(root / "pki")  # client certificate: alice@example.org
        self.idp = IdentityProvider()
        tenant = self.idp.tenant()
        tenant.keys = [publicJWK(KEY, "k1", "RS256")]
        self.jwks = tenant.url("jwks")
        self.token = token(KEY, email=ALICE)
        self.servers: dict[str, ServerProcess] = {}
        #: What the clients sent to each source's server (for the log check).
        self.sent: dict[str, list[str]] = {}

    def common(self) -> str:
        return (
            f'tls_cert = "{self.pki["cert"]}"\ntls_key = "{self.pki["key"]}"\n'
            f'tls_client_ca = "{self.pki["ca"]}"\ntls_cert_user = "email"\n'
            f'gssapi_keytab = "{self.kdc.keytab}"\n'
            'gssapi_realm_map = ["KRBTEST.COM=example.org"]\n'
            f'oauth_jwks = "{self.jwks}"\noauth_issuer = "{ISSUER}"\n'
            f'oauth_audience = "{AUDIENCE}"\n'
        )

    def ldap(self, root, lookup: bool) -> str:
        (root / "bindpw").write_text(READER_PASSWORD + "\n")
        attrs = "userPassword,mail=user" if lookup else "mail=user"
        return (
            f'passdb = ["ldap:{self.slapd.url}/{PEOPLE}?{attrs}?sub?{FILTER}"]\n'
            f'ldap_bind_dn = "{READER_DN}"\nldap_bind_password_file = "bindpw"\n'
            + ("ldap_auth_bind = false\n" if lookup else "")
        )

    def server(self, source: str) -> ServerProcess:
        if source in self.servers:
            return self.servers[source]
        root = self.root / source
        root.mkdir()
        users: dict[str, str] = {}
        extra = self.common()
        if source == "passwd-file":
            users = {ALICE: "{PLAIN}wonderland"}
        elif source == "pgsql":
            from test_pgsql import initialized
            from test_pgsql_users import addUser

            uri = initialized(self.postgresql.newDatabase())
            assert addUser(uri, ALICE, "wonderland") == 0
            extra += f'passdb = ["pgsql:{uri}"]\n'
        elif source == "chain":
            users = {"zoe@example.org": "{PLAIN}zoe-file"}
            extra += self.ldap(root, lookup=True)
        else:
            extra += self.ldap(root, lookup=source == "ldap-lookup")
        srv = ServerProcess(root, users, extra, listenTLS="tcp:0:interface=127.0.0.1")
        if not users:
            srv.config.write_text(srv.config.read_text().replace('passwd = "passwd"\n', ""))
        for user in {ALICE, PASSWORD_USERS[source][0]}:
            deliver(srv.maildir(user), f"Subject: for {user}\r\n\r\nhello\r\n".encode())
        self.servers[source] = srv.start()
        if source == "ldap-lookup":
            # A source learns the kinds of secret it holds from the entries it reads
            # (docs/guide/users.rst): APOP, CRAM-MD5 and SCRAM are offered once a
            # {CLEARTEXT} user has been seen. The chain's passwd-file has one already.
            with connect(self, source) as pop:
                user, password = PASSWORD_USERS[source]
                pop.user(user)
                pop.pass_(password)
        return srv

    def close(self) -> None:
        for srv in self.servers.values():
            srv.stop()
        self.idp.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, kdc, slapd, postgresql):
    with pytest.MonkeyPatch.context() as env:
        for name, value in kdc.env.items():
            env.setenv(name, value)  # the realm for the servers and this process's client
        setup = Setup(tmp_path_factory.mktemp("matrix"), kdc, slapd, postgresql)
        try:
            yield setup
        finally:
            setup.close()


class connect:
    """A POP3S connection to the source's server, with alice's client certificate."""

    def __init__(self, setup: Setup, source: str) -> None:
        srv = setup.server(source)
        context = ssl.create_default_context(cafile=str(setup.pki["ca"]))
        context.load_cert_chain(setup.pki["client-alice"], setup.pki["client-alice-key"])
        self.pop = poplib.POP3_SSL("127.0.0.1", srv.tlsPort, context=context, timeout=TIMEOUT)
        self.pop.sentLines = setup.sent.setdefault(source, [])  # type: ignore[attr-defined]

    def __enter__(self) -> poplib.POP3_SSL:
        return self.pop

    def __exit__(self, *exc) -> None:
        self.pop.close()


# -- the mechanisms, client side -------------------------------------------------------------


def cmd(pop: poplib.POP3, line: str) -> str:
    """One command or SASL response; its reply line (-ERR too, no exception)."""
    pop.sentLines.append(line)
    try:
        return pop._shortcmd(line).decode()
    except poplib.error_proto as e:
        return e.args[0].decode()


def scram(pop, mechanism: str, user: str, password: str) -> str:
    binding = None
    if mechanism.endswith("-PLUS"):
        der = pop.sock.getpeercert(binary_form=True)
        binding = ("tls-server-end-point", scramp.core.CBindData.from_der(der).data)
    client = scramp.ScramClient([mechanism], user, password, channel_binding=binding)
    reply = cmd(pop, f"AUTH {mechanism} {b64(client.get_client_first())}")
    if not reply.startswith("+ "):
        return reply
    client.set_server_first(base64.b64decode(reply[2:]).decode())
    reply = cmd(pop, b64(client.get_client_final()))
    if not reply.startswith("+ "):
        return reply
    client.set_server_final(base64.b64decode(reply[2:]).decode())  # the server knew the keys
    return cmd(pop, "")


def gssapi(pop, setup: Setup) -> str:
    client = GSSClient(setup.kdc, "alice").context
    assert cmd(pop, "AUTH GSSAPI") == "+ "
    reply = cmd(pop, b64(client.step()))
    if not reply.startswith("+ "):
        return reply
    client.step(base64.b64decode(reply[2:]))  # the AP-REP: the server proved itself
    reply = cmd(pop, "")
    if not reply.startswith("+ "):
        return reply
    client.unwrap(base64.b64decode(reply[2:]))
    return cmd(pop, b64(client.wrap(b"\x01\x00\x00\x00", False).message))


def login(pop, setup: Setup, mechanism: str, user: str, password: str) -> str:
    """Log in with C{mechanism}; the server's last reply line."""
    if mechanism == "USER":
        assert cmd(pop, f"USER {user}").startswith("+OK")
        return cmd(pop, f"PASS {password}")
    if mechanism == "APOP":
        stamp = re.search(rb"<[^>]*>", pop.welcome)
        assert stamp, pop.welcome
        digest = hashlib.md5(stamp.group(0) + password.encode()).hexdigest()
        return cmd(pop, f"APOP {user} {digest}")
    if mechanism == "PLAIN":
        message = b64(f"\0{user}\0{password}")
        return cmd(pop, f"AUTH PLAIN {message}")
    if mechanism == "LOGIN":
        assert cmd(pop, "AUTH LOGIN").startswith("+ ")
        assert cmd(pop, b64(user)).startswith("+ ")
        return cmd(pop, b64(password))
    if mechanism == "CRAM-MD5":
        reply = cmd(pop, "AUTH CRAM-MD5")
        assert reply.startswith("+ "), reply
        digest = hmac.new(password.encode(), base64.b64decode(reply[2:]), hashlib.md5)
        return cmd(pop, b64(f"{user} {digest.hexdigest()}"))
    if mechanism.startswith("SCRAM"):
        return scram(pop, mechanism, user, password)
    if mechanism == "EXTERNAL":
        return cmd(pop, "AUTH EXTERNAL =")
    if mechanism == "GSSAPI":
        return gssapi(pop, setup)
    tok = password
    if mechanism == "OAUTHBEARER":
        message = f"n,a={user},\x01host=127.0.0.1\x01port=995\x01auth=Bearer {tok}\x01\x01"
    else:
        message = f"user={user}\x01auth=Bearer {tok}\x01\x01"
    assert cmd(pop, f"AUTH {mechanism}") == "+ "  # a JWT is too long for the AUTH line
    reply = cmd(pop, b64(message))
    if reply.startswith("+ "):  # RFC 7628's error challenge, then the dummy response
        reply = cmd(pop, b64("\x01") if mechanism == "OAUTHBEARER" else "")
    return reply


def offered(pop) -> set[str]:
    caps = pop.capa()
    return set(caps.get("SASL", [])) | ({"USER"} if "USER" in caps else set())


def credentials(setup: Setup, source: str, mechanism: str) -> tuple[str, str]:
    if mechanism in {"OAUTHBEARER", "XOAUTH2"}:
        return ALICE, setup.token
    if mechanism in PASSWORDLESS:
        return ALICE, ""
    return PASSWORD_USERS[source]


# -- the matrix ------------------------------------------------------------------------------

PAIRS = [(s, m) for s in SOURCES for m in MECHANISMS if (s, m) not in IMPOSSIBLE]


@pytest.mark.parametrize("source, mechanism", PAIRS, ids=[f"{s}-{m}" for s, m in PAIRS])
def test_login(setup, source, mechanism):
    """CAPA (or the greeting, for APOP) offers it, and the login reaches the user's maildrop."""
    user, secret = credentials(setup, source, mechanism)
    with connect(setup, source) as pop:
        if mechanism == "APOP":
            assert re.search(rb"<[^>]*>", pop.welcome), pop.welcome
        else:
            assert mechanism in offered(pop), offered(pop)
        reply = login(pop, setup, mechanism, user, secret)
        assert reply.startswith("+OK Logged in, 1 message"), reply
        assert b"Subject: for " + user.encode() in b"\n".join(pop.top(1, 0)[1])
        pop.quit()


@pytest.mark.parametrize(
    "source, mechanism", sorted(IMPOSSIBLE), ids=[f"{s}-{m}" for s, m in sorted(IMPOSSIBLE)]
)
def test_not_offered(setup, source, mechanism):
    """No plaintext-equivalent secret: not in CAPA (no APOP timestamp), and refused."""
    user, password = PASSWORD_USERS[source]
    with connect(setup, source) as pop:
        if mechanism == "APOP":
            assert not re.search(rb"<[^>]*>", pop.welcome), pop.welcome
            digest = hashlib.md5(b"<1.2@test.invalid>" + password.encode()).hexdigest()
            assert cmd(pop, f"APOP {user} {digest}") == "-ERR APOP is not available"
        else:
            assert mechanism not in offered(pop)
            assert cmd(pop, f"AUTH {mechanism}") == "-ERR Unsupported authentication mechanism"
        assert cmd(pop, "STAT") == "-ERR STAT is not valid in this state"


@pytest.mark.parametrize("source", SOURCES)
def test_refusals_and_no_secret_in_the_log(setup, source):
    """
    A wrong password (USER/PASS, PLAIN), an unknown user, a token for someone
    the source does not know and one signed by another key are refused with
    [AUTH]; then the server's whole log (every login of this module's tests
    of the source before it) holds no password, bind password, ticket or token.
    """
    user, password = PASSWORD_USERS[source]
    stranger = token(KEY, email="nobody@example.org")
    forged = token(rsaKey(), email=ALICE)
    cases = [
        ("USER", user, WRONG),
        ("PLAIN", user, WRONG),
        ("USER", "nobody@example.org", WRONG),
        ("OAUTHBEARER", "nobody@example.org", stranger),
        ("XOAUTH2", ALICE, forged),
    ]
    for mechanism, name, secret in cases:
        with connect(setup, source) as pop:
            reply = login(pop, setup, mechanism, name, secret)
            assert reply.startswith("-ERR [AUTH]"), (mechanism, name, reply)
    with connect(setup, source) as pop:
        assert login(pop, setup, "USER", user, password).startswith("+OK Logged in")
        pop.quit()
    log = setup.server(source).log
    assert "Traceback" not in log and "Unhandled" not in log, log
    secrets = {password, WRONG, READER_PASSWORD, "zoe-file", setup.token, stranger, forged}
    secrets |= {t.split(".")[2] for t in (setup.token, stranger, forged)}  # the signatures
    for secret in secrets:
        assert secret not in log, (secret, log)
    # Every SASL response and APOP digest sent (tickets, tokens, proofs), whole and in part.
    sent = [line.split()[-1] for line in setup.sent[source] if len(line) >= 24]
    assert any(len(line) > 500 for line in sent)  # the Kerberos AP-REQ and the JWTs
    for line in sent:
        assert line not in log and line[len(line) // 2 :][:16] not in log, (line, log)
        if len(line) > 100:
            assert base64.b64decode(line)[40:56].hex() not in log


def test_the_guide_lists_every_pair():
    """docs/guide/auth-matrix.rst names exactly the test ids of this module."""
    from support import REPO

    text = (REPO / "docs" / "guide" / "auth-matrix.rst").read_text()
    assert set(re.findall(r"test_login\[([^\]]+)\]", text)) == {f"{s}-{m}" for s, m in PAIRS}
    refused = set(re.findall(r"test_not_offered\[([^\]]+)\]", text))
    assert refused == {f"{s}-{m}" for s, m in IMPOSSIBLE}
    assert len(PAIRS) + len(IMPOSSIBLE) == len(SOURCES) * len(MECHANISMS)
