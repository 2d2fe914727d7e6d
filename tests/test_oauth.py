"""
SASL OAUTHBEARER (RFC 7628) and XOAUTH2 through the protocol (StringTransport, a
Clock), with the real token check (L{popserv.auth.oauth.JWKSValidator}) over keys
given to it directly; fetching them over HTTP is tests/test_oauth_e2e.py's.
Tokens are signed here (tests/oauthidp.py).
"""

from __future__ import annotations

import base64
import json

import pytest
from oauthidp import AUDIENCE, ISSUER, ecKey, publicJWK, rsaKey, token, unsigned
from twisted.cred.portal import Portal
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from popserv.auth.oauth import InvalidToken, JWKSValidator, checkAlgorithms
from popserv.auth.passwdfile import PasswdFileChecker
from popserv.auth.realm import MailboxRealm
from popserv.backends.memory import MemoryStore
from popserv.config import Config, ConfigError
from popserv.limits import AuthPenalty
from popserv.protocol import POP3Factory
from popserv.sasl import SASLError, mechanismsByName
from popserv.sasl.oauthbearer import OAuthBearer, parseKeyValues
from popserv.testing import connect
from popserv.threads import synchronously
from popserv.tls import PlaintextPolicy

KEY = rsaKey()
OTHER = rsaKey()  # not in the JWKS
EC = ecKey()
USER = "alice@example.org"
BAD_AUTH = [b"-ERR [AUTH] Authentication failed"]


def b64(data: bytes | str) -> bytes:
    return base64.b64encode(data.encode() if isinstance(data, str) else data)


def bearer(tok: str, authzid: str = "") -> bytes:
    a = f"a={authzid}" if authzid else ""
    return f"n,{a},\x01host=pop.example\x01port=110\x01auth=Bearer {tok}\x01\x01".encode()


def xoauth2(tok: str, user: str = USER) -> bytes:
    return f"user={user}\x01auth=Bearer {tok}\x01\x01".encode()


def reply(client, line: bytes) -> list[bytes]:
    client.send(line + b"\r\n")
    return client.lines()


def auth(client, mechanism: bytes, message: bytes) -> list[bytes]:
    """
    AUTH, then the message on a continuation line: a JWT makes the command longer than
    RFC 2449's 255 octets, so RFC 5034 section 4 forbids it as an initial response.
    """
    assert reply(client, b"AUTH " + mechanism) == [b"+ "]
    return reply(client, b64(message))


def validator(**kw) -> JWKSValidator:
    v = JWKSValidator(Clock(), "http://127.0.0.1:9/jwks", ISSUER, AUDIENCE, **kw)
    v.setKeys({"keys": [publicJWK(KEY, "k1", "RS256"), publicJWK(EC, "e1", "ES256")]})
    return v


def server(tmp_path, tokens=validator, plaintext=None, masters=()):
    passwd = tmp_path / "passwd"
    passwd.write_text(f"{USER}:{{PLAIN}}x\nbob@example.org:{{PLAIN}}y\nadmin:{{PLAIN}}z\n")
    checker = PasswdFileChecker(passwd, runInThread=synchronously, masterUsers=set(masters))
    store = MemoryStore()
    store.maildrop(USER).deliver(b"Subject: hi\r\n\r\nhello\r\n")
    extra = {} if plaintext is None else {"allowPlaintext": plaintext}
    clock = Clock()
    factory = POP3Factory(
        Portal(MailboxRealm(store), [checker]),
        clock,
        mechanisms=mechanismsByName(tokens=tokens() if tokens else None),
        penalty=AuthPenalty(clock, cap=0),
        **extra,
    )
    return connect(factory)


def refusedWithStatus(client, message: bytes, status: dict) -> None:
    """RFC 7628 3.2.3: the error challenge, the client's dummy ^A, then -ERR [AUTH]."""
    lines = auth(client, b"OAUTHBEARER", message)
    assert len(lines) == 1 and lines[0].startswith(b"+ "), lines
    assert json.loads(base64.b64decode(lines[0][2:])) == status
    assert reply(client, b64(b"\x01")) == BAD_AUTH
    assert client.protocol.user is None


INVALID = {"status": "invalid_token", "schemes": "bearer"}


# -- CAPA and the plaintext policy ----------------------------------------------------------


def test_capa_lists_the_bearer_mechanisms_only_with_a_validator(tmp_path):
    def sasl(client):
        lines = reply(client, b"CAPA")
        return next(line for line in lines if line.startswith(b"SASL")).split()[1:]

    assert b"OAUTHBEARER" not in sasl(server(tmp_path, tokens=None))
    assert b"XOAUTH2" not in sasl(server(tmp_path, tokens=None))
    offered = sasl(server(tmp_path))
    assert b"OAUTHBEARER" in offered and b"XOAUTH2" in offered


def test_bearer_tokens_follow_the_plaintext_policy(tmp_path):
    """Outside the trusted networks and without TLS, a token is a password sent in clear."""
    policy = PlaintextPolicy(requireTLS=True, trusted=("10.0.0.0/8",))
    client = server(tmp_path, plaintext=policy)
    capa = b" ".join(reply(client, b"CAPA"))
    assert b"OAUTHBEARER" not in capa and b"XOAUTH2" not in capa
    assert reply(client, b"AUTH OAUTHBEARER")[0].startswith(b"-ERR")
    assert client.protocol.user is None


# -- OAUTHBEARER ----------------------------------------------------------------------------


def test_a_minute_of_clock_skew_is_allowed(tmp_path):
    """The identity provider's clock may be up to LEEWAY (60 s) ahead of ours."""
    assert auth(server(tmp_path), b"OAUTHBEARER", bearer(token(KEY, lifetime=-30)))[0].startswith(
        b"+OK"
    )
    assert auth(server(tmp_path), b"OAUTHBEARER", bearer(token(KEY, lifetime=-90)))[0].startswith(
        b"+ "
    )  # the RFC 7628 error challenge: refused


def test_oauthbearer_valid_token_logs_in_as_the_claim(tmp_path):
    client = server(tmp_path)
    assert auth(client, b"OAUTHBEARER", bearer(token(KEY)))[0].startswith(
        b"+OK Logged in, 1 message"
    )
    assert client.protocol.user == USER


def test_oauthbearer_without_initial_response_and_ec_key(tmp_path):
    client = server(tmp_path)
    assert reply(client, b"AUTH OAUTHBEARER") == [b"+ "]
    assert reply(client, b64(bearer(token(EC, "e1", alg="ES256"), USER)))[0].startswith(b"+OK")


@pytest.mark.parametrize(
    "tok",
    [
        pytest.param(token(KEY, lifetime=-3600), id="expired"),
        pytest.param(token(KEY, aud="someone-else"), id="wrong-audience"),
        pytest.param(token(KEY, iss="https://evil.invalid"), id="wrong-issuer"),
        pytest.param(token(OTHER), id="wrong-key"),
        pytest.param(unsigned(), id="alg-none"),
        pytest.param(token(KEY, alg="RS512"), id="algorithm-not-allowed"),
        pytest.param(token(KEY, alg="PS256"), id="alg-other-than-the-keys"),
        pytest.param(token(KEY, email=None), id="no-user-claim"),
        pytest.param(token(KEY, exp=None), id="no-expiry"),
        pytest.param(token(KEY, nbf=2**40), id="not-yet-valid"),
        pytest.param(token(KEY)[:-4] + "AAAA", id="tampered"),
        pytest.param("not-a-jwt", id="garbage"),
    ],
)
def test_oauthbearer_refused_tokens_get_the_rfc7628_error(tmp_path, tok):
    refusedWithStatus(server(tmp_path), bearer(tok), INVALID)


def test_unknown_kid_right_after_a_refetch_is_refused_without_fetching():
    """An attacker inventing kids makes at most one fetch per refetchAfter seconds."""
    v = validator()
    v._lastRefetch = v._reactor.seconds()
    d = v.validate(token(KEY, "k9"))
    failures = []
    d.addErrback(failures.append)
    assert failures and failures[0].check(InvalidToken)


def test_oauthbearer_user_must_exist_in_an_auth_source(tmp_path):
    client = server(tmp_path)
    assert auth(client, b"OAUTHBEARER", bearer(token(KEY, email="nobody@example.org"))) == BAD_AUTH


def test_oauthbearer_authzid_of_another_user_needs_a_master_user(tmp_path):
    client = server(tmp_path)
    assert auth(client, b"OAUTHBEARER", bearer(token(KEY), "bob@example.org")) == BAD_AUTH
    client = server(tmp_path, masters=("admin",))
    tok = token(KEY, email="admin")
    assert auth(client, b"OAUTHBEARER", bearer(tok, "bob@example.org"))[0].startswith(b"+OK")
    assert client.protocol.user == "bob@example.org"


def test_other_user_claim(tmp_path):
    client = server(tmp_path, tokens=lambda: validator(userClaim="preferred_username"))
    tok = token(KEY, preferred_username="bob@example.org")
    assert auth(client, b"OAUTHBEARER", bearer(tok))[0].startswith(b"+OK")
    assert client.protocol.user == "bob@example.org"


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"n,,",
        b"p=tls-unique,,\x01auth=Bearer x\x01\x01",
        b"n,,\x01auth=Bearer x\x01",
        b"n,,auth=Bearer x\x01\x01",
        b"n,,\x01auth=Basic x\x01\x01",
        b"n,,\x01auth=Bearer \x01\x01",
        b"n,b=x,\x01auth=Bearer x\x01\x01",
        b"n,a=x=41,\x01auth=Bearer x\x01\x01",
        b"n,,\x01host\x01auth=Bearer x\x01\x01",
    ],
)
def test_oauthbearer_malformed_messages(message):
    with pytest.raises(SASLError):
        OAuthBearer(validator()).exchange(None).step(message)


def test_key_value_pairs():
    assert parseKeyValues(b"\x01host=h\x01auth=Bearer t\x01\x01") == {
        "host": "h",
        "auth": "Bearer t",
    }


# -- XOAUTH2 --------------------------------------------------------------------------------


def test_xoauth2_valid_token(tmp_path):
    client = server(tmp_path)
    assert auth(client, b"XOAUTH2", xoauth2(token(KEY)))[0].startswith(b"+OK")
    assert client.protocol.user == USER


def test_xoauth2_refused_token_gets_the_google_form(tmp_path):
    """A JSON status challenge; the client's empty response; -ERR [AUTH]."""
    client = server(tmp_path)
    lines = auth(client, b"XOAUTH2", xoauth2(token(KEY, lifetime=-3600)))
    assert json.loads(base64.b64decode(lines[0][2:])) == {"status": "401", "schemes": "bearer"}
    assert reply(client, b"") == BAD_AUTH


def test_xoauth2_user_must_be_the_tokens(tmp_path):
    client = server(tmp_path)
    assert auth(client, b"XOAUTH2", xoauth2(token(KEY), user="bob@example.org")) == BAD_AUTH
    assert auth(client, b"XOAUTH2", b"user=x\x01auth=Bearer\x01\x01") == BAD_AUTH


def test_xoauth2_user_is_compared_after_the_user_name_rules(tmp_path):
    from popserv.auth.usernames import NameRulesChecker, UsernameRules

    client = server(tmp_path)
    checker = next(iter(client.protocol.factory.portal.checkers.values()))
    lowercase = NameRulesChecker(checker, UsernameRules(lowercase=True))
    for interface in lowercase.credentialInterfaces:
        client.protocol.factory.portal.checkers[interface] = lowercase
    lines = auth(client, b"XOAUTH2", xoauth2(token(KEY), user="Alice@Example.ORG"))
    assert lines[0].startswith(b"+OK"), lines
    assert client.protocol.user == USER


def test_xoauth2_user_of_another_for_a_master_users_token(tmp_path):
    client = server(tmp_path, masters=("admin",))
    tok = token(KEY, email="admin")
    assert auth(client, b"XOAUTH2", xoauth2(tok, user="bob@example.org"))[0].startswith(b"+OK")
    assert client.protocol.user == "bob@example.org"


# -- secrets and settings ---------------------------------------------------------------------


def test_tokens_never_reach_a_log_line(tmp_path):
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        good, bad = token(KEY), token(OTHER)
        client = server(tmp_path)
        auth(client, b"XOAUTH2", xoauth2(bad))
        reply(client, b"")
        auth(client, b"OAUTHBEARER", bearer(bad))
        reply(client, b64(b"\x01"))
        auth(client, b"OAUTHBEARER", bearer(good))
        reply(client, b"QUIT")
    finally:
        globalLogPublisher.removeObserver(events.append)
    text = "\n".join(formatEvent(e) + repr(e) for e in events)
    assert "token refused" in text  # the refusals are logged...
    for tok in (good, bad):  # ...without the tokens, in any part
        for part in tok.split("."):
            assert part not in text


def test_algorithm_allow_list():
    checkAlgorithms(("RS256", "ES256"))
    for bad in (("none",), ("HS256",), ()):
        with pytest.raises(ValueError):
            checkAlgorithms(bad)


def test_configuration_needs_what_each_way_needs(tmp_path):
    base = Config(passwd=str(tmp_path / "p"), mail_location=str(tmp_path / "m"))
    (tmp_path / "p").write_text("")
    with pytest.raises(ConfigError, match="oauth_issuer"):
        base.merged(oauth_jwks="https://idp/jwks").validated()
    with pytest.raises(ConfigError, match="not both"):
        base.merged(oauth_jwks="https://a", oauth_introspection="https://b").validated()
    with pytest.raises(ConfigError, match="oauth_client_id"):
        base.merged(oauth_introspection="https://idp/introspect").validated()
    with pytest.raises(ConfigError, match="oauth_algorithms"):
        base.merged(
            oauth_jwks="https://a", oauth_issuer="i", oauth_audience="a", oauth_algorithms=["none"]
        ).validated()
    with pytest.raises(ConfigError, match="oauth_jwks"):
        base.merged(oauth_jwks="file:///etc/passwd").validated()


def test_a_long_auth_line_with_an_initial_response_is_accepted(tmp_path):
    """
    mpop sends the token on the AUTH line, over RFC 2449's 255 octets (which RFC 5034
    section 4 forbids): AUTH lines may be as long as SASL responses; others may not.
    """
    client = server(tmp_path)
    line = b"AUTH OAUTHBEARER " + b64(bearer(token(KEY)))
    assert len(line) > 255
    assert reply(client, line)[0].startswith(b"+OK Logged in")
    other = server(tmp_path)
    assert reply(other, b"NOOP " + b"x" * 400) == [b"-ERR Command line too long"]
