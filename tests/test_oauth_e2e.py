"""
OAUTHBEARER and XOAUTH2 end to end: a popserv process (twistd) checks tokens against a
local identity provider (tests/oauthidp.py: an http.server in a thread serving a JWKS and
RFC 7662 introspection), fetched with Twisted's HTTP client. Python's poplib drives the
protocol details; mpop logs in as a real client (`auth oauthbearer`, `auth xoauth2`, the
token from `passwordeval`). No server log line may hold a token.
"""

from __future__ import annotations

import base64
import json
import poplib
import socket
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
from oauthidp import AUDIENCE, ISSUER, IdentityProvider, publicJWK, rsaKey, token, unsigned

from support import ServerProcess, deliver, have

USER = "alice@example.org"
KEY = rsaKey()
ROTATED = rsaKey()
MESSAGE = b"From: idp@example.org\r\nSubject: oauth\r\n\r\nbearer body\r\n"


@pytest.fixture(scope="session")
def idp():
    server = IdentityProvider()
    yield server
    server.close()


@pytest.fixture
def spawn(tmp_path):
    """`spawn(extra)`: a popserv with alice@example.org (one message) and the TOML extra."""
    servers: list[ServerProcess] = []

    def start(extra: str) -> ServerProcess:
        srv = ServerProcess(tmp_path / f"s{len(servers)}", {USER: "{PLAIN}unused"}, extra)
        deliver(srv.maildir(USER), MESSAGE)
        servers.append(srv)
        return srv.start()

    yield start
    for srv in servers:
        srv.stop()
    for srv in servers:
        assert "Traceback" not in srv.log and "Unhandled" not in srv.log, srv.log


def jwksConfig(url: str) -> str:
    return f'oauth_jwks = "{url}"\noauth_issuer = "{ISSUER}"\noauth_audience = "{AUDIENCE}"\n'


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def bearer(tok: str) -> str:
    return b64(f"n,a={USER},\x01host=127.0.0.1\x01port=110\x01auth=Bearer {tok}\x01\x01")


def login(srv: ServerProcess, tok: str, mechanism: str = "OAUTHBEARER") -> str:
    """
    AUTH with the token on a continuation line (too long for the command line, RFC 5034
    section 4); after an error challenge, the dummy response. The final response line.
    """
    pop = poplib.POP3("127.0.0.1", srv.port, timeout=20)
    try:
        assert pop._shortcmd(f"AUTH {mechanism}") == b"+ "
        message = (
            bearer(tok)
            if mechanism == "OAUTHBEARER"
            else b64(f"user={USER}\x01auth=Bearer {tok}\x01\x01")
        )
        try:
            response = pop._shortcmd(message)
            if response.startswith(b"+ "):
                status = json.loads(base64.b64decode(response[2:]))
                assert status["status"] in ("invalid_token", "401"), status
                response = pop._shortcmd(b64("\x01") if mechanism == "OAUTHBEARER" else "")
        except poplib.error_proto as e:
            return e.args[0].decode()
        if response.startswith(b"+OK"):
            assert pop.stat()[0] == 1
        pop.quit()
        return response.decode()
    finally:
        pop.close()


def closedPort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- JWTs against a JWKS ----------------------------------------------------------------------


def test_jwks_tokens(idp, spawn):
    tenant = idp.tenant()
    tenant.keys = [publicJWK(KEY, "k1")]
    srv = spawn(jwksConfig(tenant.url("jwks")))
    capa = poplib.POP3("127.0.0.1", srv.port, timeout=20)
    assert "OAUTHBEARER" in capa.capa()["SASL"] and "XOAUTH2" in capa.capa()["SASL"]
    capa.quit()
    good = token(KEY)
    assert login(srv, good).startswith("+OK Logged in, 1 message")
    assert login(srv, good, "XOAUTH2").startswith("+OK Logged in")
    refused = {
        "expired": token(KEY, lifetime=-3600),
        "wrong audience": token(KEY, aud="other-client"),
        "wrong issuer": token(KEY, iss="https://other.invalid"),
        "wrong key": token(rsaKey()),
        "alg none": unsigned(),
    }
    for why, tok in refused.items():
        assert login(srv, tok) == "-ERR [AUTH] Authentication failed", why
    assert login(srv, token(KEY, lifetime=-3600), "XOAUTH2").startswith("-ERR [AUTH]")
    for tok in [good, *refused.values()]:
        assert tok.split(".")[1] not in srv.log


def test_key_rotation_refetches_the_jwks_for_an_unknown_kid(idp, spawn):
    tenant = idp.tenant()
    tenant.keys = [publicJWK(KEY, "k1")]
    srv = spawn(jwksConfig(tenant.url("jwks")))
    assert login(srv, token(KEY)).startswith("+OK")
    fetches = tenant.jwksFetches
    assert fetches >= 1  # at start-up, not per login
    tenant.keys = [publicJWK(ROTATED, "k2")]
    assert login(srv, token(ROTATED, "k2")).startswith("+OK")
    assert tenant.jwksFetches == fetches + 1
    # Another unknown kid right after: refused without another fetch (no fetch storms).
    assert login(srv, token(rsaKey(), "k3")).startswith("-ERR [AUTH]")
    assert tenant.jwksFetches == fetches + 1


def test_without_a_jwks_tokens_cannot_make_a_flood_of_fetches(idp, spawn):
    tenant = idp.tenant()  # a JWKS with no keys yet, as if the IdP were broken
    srv = spawn(jwksConfig(tenant.url("jwks")))
    started = tenant.jwksFetches
    for _ in range(5):
        assert login(srv, token(KEY)).startswith("-ERR")
    assert tenant.jwksFetches <= started + 2  # at most one a second
    tenant.keys = [publicJWK(KEY, "k1")]
    time.sleep(1.1)
    assert login(srv, token(KEY)).startswith("+OK")


def test_jwks_down_is_sys_temp(spawn):
    srv = spawn(jwksConfig(f"http://127.0.0.1:{closedPort()}/jwks"))
    assert login(srv, token(KEY)).startswith("-ERR [SYS/TEMP]")
    assert login(srv, token(KEY), "XOAUTH2").startswith("-ERR [SYS/TEMP]")


# -- RFC 7662 introspection -------------------------------------------------------------------


def introspectionConfig(url: str, secretFile: Path, clientId: str = "popserv") -> str:
    return (
        f'oauth_introspection = "{url}"\noauth_client_id = "{clientId}"\n'
        f'oauth_client_secret_file = "{secretFile}"\n'
    )


def test_introspection_active_and_inactive(idp, spawn, tmp_path):
    tenant = idp.tenant()
    secret = tmp_path / "client-secret"
    secret.write_text(tenant.clientSecret + "\n")
    srv = spawn(introspectionConfig(tenant.url("introspect"), secret))
    tenant.introspection["opaque-good"] = {"active": True, "email": USER, "client_id": "x"}
    tenant.introspection["opaque-gone"] = {"active": True, "email": USER, "exp": 1000}
    assert login(srv, "opaque-good").startswith("+OK Logged in")
    assert login(srv, "opaque-good", "XOAUTH2").startswith("+OK Logged in")
    assert login(srv, "opaque-unknown").startswith("-ERR [AUTH]")
    assert login(srv, "opaque-gone").startswith("-ERR [AUTH]")
    assert tenant.introspections == 4
    assert "opaque-good" not in srv.log and tenant.clientSecret not in srv.log


def test_introspection_with_wrong_client_secret_or_down_is_sys_temp(idp, spawn, tmp_path):
    tenant = idp.tenant()
    secret = tmp_path / "client-secret"
    secret.write_text("wrong")
    tenant.introspection["opaque-good"] = {"active": True, "email": USER}
    srv = spawn(introspectionConfig(tenant.url("introspect"), secret))
    assert login(srv, "opaque-good").startswith("-ERR [SYS/TEMP]")
    down = spawn(introspectionConfig(f"http://127.0.0.1:{closedPort()}/i", secret))
    assert login(down, "opaque-good").startswith("-ERR [SYS/TEMP]")


# -- mpop, a real client ----------------------------------------------------------------------


def mpop(srv: ServerProcess, tmp: Path, auth: str, tok: str) -> subprocess.CompletedProcess:
    dest = tmp / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    (tmp / "token").write_text(tok)
    conf = tmp / "mpoprc"
    conf.write_text(
        textwrap.dedent(f"""\
            account test
            host 127.0.0.1
            port {srv.port}
            timeout 20
            user {USER}
            passwordeval cat {tmp / "token"}
            tls off
            auth {auth}
            delivery maildir {dest}
            keep on
            uidls_file {tmp / "uidls"}
            """)
    )
    conf.chmod(0o600)
    return subprocess.run(
        ["mpop", "--debug", "-C", str(conf), "test"],
        capture_output=True,
        timeout=60,
        env={"HOME": str(tmp), "PATH": "/usr/bin:/bin", "LC_ALL": "C"},
        cwd=tmp,
    )


@pytest.mark.skipif(not have("mpop"), reason="mpop is not installed")
@pytest.mark.parametrize("auth", ["oauthbearer", "xoauth2"])
def test_mpop_logs_in_with_a_bearer_token(idp, spawn, tmp_path, auth):
    tenant = idp.tenant()
    tenant.keys = [publicJWK(KEY, "k1")]
    srv = spawn(jwksConfig(tenant.url("jwks")))
    proc = mpop(srv, tmp_path, auth, token(KEY))
    out = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    assert proc.returncode == 0, out
    assert f"AUTH {auth.upper()}" in out  # no silent fallback to another mechanism
    delivered = list((tmp_path / "Maildir" / "new").iterdir())
    assert len(delivered) == 1 and b"bearer body" in delivered[0].read_bytes()
    # A refused token: mpop reports the authentication failure.
    refused = mpop(srv, tmp_path, auth, token(KEY, lifetime=-3600))
    text = (refused.stdout + refused.stderr).decode("utf-8", "replace")
    assert refused.returncode != 0 and "[AUTH]" in text, text
