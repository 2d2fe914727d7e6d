"""
When what a SASL mechanism relies on is down or misconfigured: a directory
that cannot be reached in the middle of a SCRAM exchange, a GSSAPI keytab
without the service key. The client is not at fault: it reads
C{-ERR [SYS/TEMP]} at once, and the failed-login penalty and the
C{failed} login metric do not count it. And C{popserv check-config}
reports whether each source of the password-less mechanisms can be used
(the keytab; the JWKS or introspection endpoint of the identity provider).
"""

from __future__ import annotations

import base64
import shutil
import socket

import pytest
from oauthidp import AUDIENCE, ISSUER, IdentityProvider, publicJWK, rsaKey
from twisted.internet.task import Clock

from popserv.admin.check import checkConfig
from popserv.auth.chain import PassdbChain
from popserv.auth.ldap import LdapPassdb
from popserv.auth.ldapurl import parseLdapURL
from popserv.auth.passwdfile import PasswdFileChecker
from popserv.config import Config
from popserv.limits import AuthPenalty
from popserv.metrics import Metrics
from popserv.sasl import SASLContext, mechanismsByName
from popserv.sasl.gssapi import GSSAPI, PrincipalMap, defaultRealm
from popserv.testing import connect, memoryServer
from popserv.threads import synchronously

SYS_TEMP = b"-ERR [SYS/TEMP] Temporary server failure, try again later"
AUTH_FAILED = b"-ERR [AUTH] Authentication failed"


def closedPort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def counted(metrics: Metrics, result: str, mechanism: str) -> float:
    value = metrics.registry.get_sample_value(
        "popserv_logins_total", {"result": result, "mechanism": mechanism}
    )
    return value or 0.0


def penalizedServer(checker, mechanisms):
    """A server whose failed logins are answered late (1 s, then 2 s...), with metrics."""
    clock = Clock()
    metrics = Metrics()
    factory, _ = memoryServer(
        {},
        checker=checker,
        clock=clock,
        penalty=AuthPenalty(clock),
        metrics=metrics,
        mechanisms=mechanisms,
    )
    return connect(factory), clock, metrics


def assertNotPenalized(client, clock) -> None:
    """The next wrong password is this address's first failure: answered after 1 s, not 2."""
    client.send(b"USER bob\r\nPASS wrong\r\n")
    assert client.lines() == [b"+OK Send your password"]
    clock.advance(1)
    (line,) = client.lines()  # [AUTH], or [SYS/TEMP] where a source is down
    assert line.startswith(b"-ERR ["), line


# -- [SYS/TEMP] in a SASL exchange is no failed login ----------------------------------------


def test_directory_down_during_scram_is_no_failed_login(tmp_path):
    """
    SCRAM asks the chain for alice's keys; the passwd-file does not know her
    and the directory (lookup mode) cannot be reached: [SYS/TEMP] at once.
    """
    passwd = tmp_path / "passwd"
    passwd.write_text("bob:{PLAIN}builder\n")
    url = parseLdapURL(
        f"ldap://127.0.0.1:{closedPort()}/ou=people,dc=example,dc=org?userPassword?sub"
    )
    down = LdapPassdb(url, authBind=False, runInThread=synchronously, connectTimeout=2)
    chain = PassdbChain([PasswdFileChecker(passwd, runInThread=synchronously), down])
    client, clock, metrics = penalizedServer(chain, mechanismsByName(["SCRAM-SHA-256"]))
    client.send(b"AUTH SCRAM-SHA-256 " + b64(b"n,,n=alice,r=0123456789abcdef") + b"\r\n")
    assert client.lines() == [SYS_TEMP]  # not held back by the penalty
    assert counted(metrics, "error", "SCRAM-SHA-256") == 1
    assert counted(metrics, "failed", "SCRAM-SHA-256") == 0
    assertNotPenalized(client, clock)


# -- GSSAPI: the server's keytab is the server's problem -------------------------------------


@pytest.fixture
def realm(kdc, monkeypatch):
    for name, value in kdc.env.items():
        monkeypatch.setenv(name, value)
    return kdc


def gssapiServer(kdc, tmp_path, keytab, principal=None, removed=False):
    """The exchange up to the client's first token. C{removed}: the keytab goes after CAPA."""
    from test_gssapi import Client

    passwd = tmp_path / "passwd"
    passwd.write_text("alice:{PLAIN}x\nbob:{PLAIN}builder\n")
    mechanism = GSSAPI(
        str(keytab), principal, PrincipalMap.parse(defaultRealm(), []), synchronously
    )
    assert mechanism.available(SASLContext(None, "pop.example"))  # readable: offered
    if removed:
        keytab.unlink()  # within the second CAPA's check of the keytab stands
    client, clock, metrics = penalizedServer(
        PasswdFileChecker(passwd, runInThread=synchronously), {"GSSAPI": mechanism}
    )
    client.send(b"AUTH GSSAPI\r\n")
    assert client.lines() == [b"+ "]
    client.send(b64(Client(kdc, "alice").context.step()) + b"\r\n")
    return client, clock, metrics


@pytest.mark.parametrize("problem", ["principal not in the keytab", "removed", "not a keytab"])
def test_gssapi_misconfiguration_is_a_temporary_failure(realm, tmp_path, problem):
    keytab, principal = tmp_path / "pop.keytab", None
    if problem == "not a keytab":
        keytab.write_bytes(b"\x05\x02 not a keytab")
    else:
        shutil.copy(realm.keytab, keytab)
    if problem == "principal not in the keytab":
        principal = f"pop/nowhere@{realm.realm.realm}"
    client, clock, metrics = gssapiServer(
        realm, tmp_path, keytab, principal, removed=problem == "removed"
    )
    assert client.lines() == [SYS_TEMP]
    assert client.protocol.user is None
    assert counted(metrics, "error", "GSSAPI") == 1
    assert counted(metrics, "failed", "GSSAPI") == 0
    assertNotPenalized(client, clock)


def test_gssapi_bad_token_is_still_a_failed_login(realm, tmp_path):
    """The client's fault stays [AUTH], counted and penalized."""
    (tmp_path / "passwd").write_text("alice:{PLAIN}x\n")
    client, clock, metrics = penalizedServer(
        PasswdFileChecker(tmp_path / "passwd", runInThread=synchronously),
        {"GSSAPI": GSSAPI(realm.keytab, None, PrincipalMap("KRBTEST.COM"), synchronously)},
    )
    client.send(b"AUTH GSSAPI " + b64(b"not a token") + b"\r\n")
    assert client.lines() == []
    clock.advance(1)
    assert client.lines() == [AUTH_FAILED]
    assert counted(metrics, "failed", "GSSAPI") == 1


# -- check-config ----------------------------------------------------------------------------


def config(tmp_path, **settings) -> Config:
    (tmp_path / "passwd").write_text("alice:{PLAIN}x\n")
    (tmp_path / "mail").mkdir(exist_ok=True)
    return Config(
        passwd="passwd",
        mail_location="maildir:mail/%n",
        create_maildirs=True,
        base_dir=str(tmp_path),
        **settings,
    )


def test_check_config_reports_the_keytab(realm, tmp_path, capsys):
    assert checkConfig(config(tmp_path, gssapi_keytab=realm.keytab)) == []
    assert f"gssapi: {realm.keytab}: readable, holds service keys" in capsys.readouterr().out
    named = config(tmp_path, gssapi_keytab=realm.keytab, gssapi_principal=realm.principal)
    assert checkConfig(named) == []
    assert f"holds a key for {realm.principal}" in capsys.readouterr().out
    missing = config(tmp_path, gssapi_keytab=realm.keytab, gssapi_principal="pop/nowhere")
    (problem,) = checkConfig(missing)
    assert problem.startswith("gssapi_keytab: ") and "pop/nowhere" in problem, problem
    (problem,) = checkConfig(config(tmp_path, gssapi_keytab="gone.keytab"))
    assert problem == f"gssapi_keytab: {tmp_path / 'gone.keytab'} is not readable"
    # Not offered: not checked.
    quiet = config(tmp_path, gssapi_keytab="gone.keytab", sasl_mechanisms=("PLAIN",))
    assert checkConfig(quiet) == []


@pytest.fixture(scope="module")
def idp():
    server = IdentityProvider()
    yield server
    server.close()


def jwks(tmp_path, url) -> Config:
    return config(tmp_path, oauth_jwks=url, oauth_issuer=ISSUER, oauth_audience=AUDIENCE)


def test_check_config_fetches_the_jwks(idp, tmp_path, capsys):
    tenant = idp.tenant()
    tenant.keys = [publicJWK(rsaKey(), "k1", "RS256"), publicJWK(rsaKey(), "k2", "RS256")]
    assert checkConfig(jwks(tmp_path, tenant.url("jwks"))) == []
    assert f"oauth: {tenant.url('jwks')}: reachable, 2 signing keys" in capsys.readouterr().out
    assert tenant.jwksFetches == 1
    tenant.keys = [publicJWK(rsaKey(), "k3", "RS512")]  # not an algorithm allowed
    (problem,) = checkConfig(jwks(tmp_path, tenant.url("jwks")))
    assert problem.startswith("oauth_jwks: ") and "no signing key" in problem, problem
    (problem,) = checkConfig(jwks(tmp_path, tenant.url("missing")))
    assert problem == f"oauth_jwks: {tenant.url('missing')}: HTTP status 404"
    url = f"http://127.0.0.1:{closedPort()}/jwks"
    (problem,) = checkConfig(jwks(tmp_path, url))
    assert problem.startswith(f"oauth_jwks: {url}: cannot be reached"), problem


def test_check_config_asks_the_introspection_endpoint(idp, tmp_path, capsys):
    tenant = idp.tenant()

    def introspection(secret: str) -> Config:
        (tmp_path / "client-secret").write_text(secret + "\n")
        return config(
            tmp_path,
            oauth_introspection=tenant.url("introspect"),
            oauth_client_id=tenant.clientId,
            oauth_client_secret_file="client-secret",
        )

    assert checkConfig(introspection(tenant.clientSecret)) == []
    out = capsys.readouterr().out
    assert "reachable, client credentials accepted" in out
    assert tenant.introspections == 1
    (problem,) = checkConfig(introspection("Wrong-Secret-42"))
    assert problem == f"oauth_introspection: {tenant.url('introspect')}: HTTP status 401"
    assert "Wrong-Secret-42" not in capsys.readouterr().out + problem
