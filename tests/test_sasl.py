"""SASL mechanisms, each against its RFC's own example where the RFC gives one."""

from __future__ import annotations

import base64
import os

import pytest
import scramp
from twisted.cred.error import UnauthorizedLogin

from popserv.auth.credentials import (
    Impersonation,
    UsernamePassword,
    VerifiedCredentials,
)
from popserv.auth.passwdfile import PasswdFileChecker
from popserv.sasl import (
    ALL_MECHANISMS,
    Challenge,
    CramMD5,
    Login,
    Outcome,
    Plain,
    SASLContext,
    SASLError,
    ScramSHA1,
    ScramSHA256,
    ScramSHA256Plus,
    mechanismsByName,
)
from popserv.sasl.scram import parseClientFirst, stableSalt
from popserv.testing import PlaintextChecker
from popserv.threads import synchronously


def result(d):
    out = []
    d.addBoth(out.append)
    assert out
    return out[0]


def context(source=None, hostname="pop.example"):
    return SASLContext(source, hostname)


def scram_line(mechanism: str, password: str, salt_b64: str, iterations: int) -> str:
    salt, stored, server, i = scramp.ScramMechanism(mechanism).make_auth_info(
        password, iterations, base64.b64decode(salt_b64)
    )
    b64 = base64.b64encode
    return f"{{{mechanism}}}{i},{salt_b64},{b64(stored).decode()},{b64(server).decode()}"


# -- PLAIN (RFC 4616) ------------------------------------------------------------


def test_plain_rfc4616_example():
    """RFC 4616 section 4: "\\0tim\\0tanstaaftanstaaf"."""
    ex = Plain().exchange(context())
    outcome = ex.step(b"\x00tim\x00tanstaaftanstaaf")
    assert outcome == Outcome(UsernamePassword("tim", b"tanstaaftanstaaf"))


def test_plain_without_initial_response_gets_an_empty_challenge():
    ex = Plain().exchange(context())
    assert ex.step(None) == Challenge(b"")
    assert ex.step(b"\x00tim\x00pw").credentials.username == "tim"


def test_plain_authzid_becomes_an_impersonation_request():
    """RFC 4616's "Ursel\\0Kurt\\0xipj3plmq": Kurt asks to act as Ursel."""
    outcome = Plain().exchange(context()).step(b"Ursel\x00Kurt\x00xipj3plmq")
    assert outcome == Outcome(Impersonation("Ursel", UsernamePassword("Kurt", b"xipj3plmq")))
    same = Plain().exchange(context()).step(b"tim\x00tim\x00pw")
    assert same == Outcome(UsernamePassword("tim", b"pw"))


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"tim",
        b"\x00tim",
        b"\x00\x00pw",
        b"\x00tim\x00",
        b"a\x00b\x00c\x00d",
        b"\x00\xff\xfe\x00pw",
        b"\x00" + b"u" * 256 + b"\x00pw",
    ],
)
def test_plain_malformed(message):
    with pytest.raises(SASLError):
        Plain().exchange(context()).step(message)


# -- LOGIN ---------------------------------------------------------------------------


def test_login_prompts_then_credentials():
    ex = Login().exchange(context())
    assert ex.step(None) == Challenge(b"Username:")
    assert ex.step(b"tim") == Challenge(b"Password:")
    assert ex.step(b"secret word") == Outcome(UsernamePassword("tim", b"secret word"))


def test_login_with_initial_response_and_bad_input():
    ex = Login().exchange(context())
    assert ex.step(b"tim") == Challenge(b"Password:")
    with pytest.raises(SASLError):
        ex.step(b"")
    with pytest.raises(SASLError):
        Login().exchange(context()).step(b"\xff")


# -- CRAM-MD5 (RFC 2195) -----------------------------------------------------------


def test_cram_md5_rfc2195_example():
    """RFC 2195 section 2: the example challenge, secret and response."""
    ex = CramMD5().exchange(context())
    ex._challenge = b"<1896.697170952@postoffice.reston.mci.net>"
    assert ex.step(None) == Challenge(ex._challenge)
    creds = ex.step(b"tim b913a602c7eda7a495b4e6e7334d3890").credentials
    assert creds.username == "tim"
    assert creds.checkPassword(b"tanstaaftanstaaf")
    assert not creds.checkPassword(b"tanstaaf")


def test_cram_md5_challenge_is_fresh_and_names_the_host():
    a = CramMD5().exchange(context()).step(None).data
    b = CramMD5().exchange(context()).step(None).data
    assert a != b and a.endswith(b"@pop.example>") and a.startswith(b"<")


@pytest.mark.parametrize(
    "response", [b"tim", b"tim xyz", b" b913a602c7eda7a495b4e6e7334d3890", b"tim " + b"g" * 32]
)
def test_cram_md5_malformed(response):
    ex = CramMD5().exchange(context())
    ex.step(None)
    with pytest.raises(SASLError):
        ex.step(response)


def test_cram_md5_refuses_an_initial_response():
    with pytest.raises(SASLError):
        CramMD5().exchange(context()).step(b"tim x")


# -- SCRAM (RFC 5802, RFC 7677) --------------------------------------------------------


def scram_checker(tmp_path, line):
    path = tmp_path / "passwd"
    path.write_text(f"user:{line}\n")
    return PasswdFileChecker(path, runInThread=synchronously)


def test_scram_sha256_rfc7677_example_from_stored_keys(tmp_path):
    """RFC 7677 section 3, the server holding only {SCRAM-SHA-256} keys (Dovecot format)."""
    checker = scram_checker(
        tmp_path, scram_line("SCRAM-SHA-256", "pencil", "W22ZaJ0SNY7soEsUEjb6gQ==", 4096)
    )
    assert checker.secretKinds() == {"SCRAM-SHA-256"}
    ex = ScramSHA256().exchange(context(checker))
    ex.serverNonce = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
    assert ex.step(None) == Challenge(b"")
    first = result(ex.step(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"))
    assert first == Challenge(
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    )
    final = ex.step(
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    )
    assert final == Challenge(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
    outcome = ex.step(b"")
    assert outcome == Outcome(VerifiedCredentials("user", "SCRAM-SHA-256"))
    assert result(checker.requestAvatarId(outcome.credentials)) == "user"


def test_scram_sha1_rfc5802_example(tmp_path):
    """RFC 5802 section 5."""
    checker = scram_checker(
        tmp_path, scram_line("SCRAM-SHA-1", "pencil", "QSXCR+Q6sek8bf92", 4096)
    )
    ex = ScramSHA1().exchange(context(checker))
    ex.serverNonce = "3rfcNHYJY1ZVvWVs7j"
    first = result(ex.step(b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL"))
    assert first.data == b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096"
    final = ex.step(
        b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts="
    )
    assert final.data == b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ="


def run_client(mechanism, source, user, password):
    """A full exchange with scramp's client; returns the outcome or raises."""
    client = scramp.ScramClient([mechanism.name], user, password)
    ex = mechanism.exchange(context(source))
    first = result(ex.step(client.get_client_first().encode()))
    if not isinstance(first, Challenge):
        first.raiseException()
    client.set_server_first(first.data.decode())
    final = ex.step(client.get_client_final().encode())
    client.set_server_final(final.data.decode())  # verifies the server too
    return ex.step(b"")


def test_scram_with_keys_derived_from_a_plain_password():
    source = PlaintextChecker({"alice": "wonderland"})
    for mechanism in (ScramSHA256(), ScramSHA1()):
        outcome = run_client(mechanism, source, "alice", "wonderland")
        assert outcome.credentials.username == "alice"


def test_scram_wrong_password_and_unknown_user_fail_alike():
    source = PlaintextChecker({"alice": "wonderland"})
    for user, password in (("alice", "nope"), ("nobody", "wonderland")):
        with pytest.raises(UnauthorizedLogin):
            run_client(ScramSHA256(), source, user, password)


def test_scram_unknown_user_gets_a_stable_fake_salt():
    source = PlaintextChecker({})
    salts = set()
    for _ in range(2):
        ex = ScramSHA256().exchange(context(source))
        salts.add(result(ex.step(b"n,,n=ghost,r=abc")).data.split(b",")[1])
    assert len(salts) == 1


def test_scram_salts_of_real_and_unknown_users_look_alike_given_a_key(tmp_path):
    """
    With a key shared by every process, a plaintext user's salt and an unknown
    user's are both derived from it: stable everywhere, the same for the
    -PLUS variant, and with the same iteration count.
    """
    key = b"k" * 32
    passwd = tmp_path / "passwd"
    passwd.write_text("alice:{PLAIN}wonderland\n")
    checker = PasswdFileChecker(passwd, runInThread=synchronously, saltKey=key)
    real = result(checker.scramKeys("alice", "SCRAM-SHA-256"))
    assert real.salt == stableSalt(key, "SCRAM-SHA-256", "alice")
    again = PasswdFileChecker(passwd, runInThread=synchronously, saltKey=key)
    assert result(again.scramKeys("alice", "SCRAM-SHA-256")) == real  # another process
    fake = ScramSHA256(key).fakeKeys("ghost")
    assert fake.salt == stableSalt(key, "SCRAM-SHA-256", "ghost")
    assert ScramSHA256Plus(key).fakeKeys("ghost").salt == fake.salt
    assert fake.iterations == real.iterations
    run_client(ScramSHA256(), checker, "alice", "wonderland")  # and it still logs in


def test_a_plaintext_users_scram_salt_survives_a_reload_of_the_passwd_file(tmp_path):
    """Else a salt that changed when the file did would tell real users from unknown ones."""
    passwd = tmp_path / "passwd"
    passwd.write_text("alice:{PLAIN}wonderland\n")
    checker = PasswdFileChecker(passwd, runInThread=synchronously)
    before = result(checker.scramKeys("alice", "SCRAM-SHA-256"))
    passwd.write_text("alice:{PLAIN}wonderland\nbob:{PLAIN}builder\n")
    os.utime(passwd, ns=(0, 10**9))
    assert result(checker.scramKeys("bob", "SCRAM-SHA-256")) is not None  # reloaded
    assert result(checker.scramKeys("alice", "SCRAM-SHA-256")) == before


@pytest.mark.parametrize(
    "message",
    [
        "n,,r=abc",
        "x,,n=u,r=abc",
        "n,z=x,n=u,r=abc",
        "n,,n=,r=abc",
        "n,,n=a=b,r=abc",
        "n,,n=u",
    ],
)
def test_scram_malformed_client_first(message):
    with pytest.raises(SASLError):
        parseClientFirst(message)


def test_scram_refuses_channel_binding_on_plain_variant():
    ex = ScramSHA256().exchange(context(PlaintextChecker({"u": "p"})))
    with pytest.raises(SASLError):
        ex.step(b"p=tls-unique,,n=u,r=abc")


def test_scram_escaped_names_and_authzid():
    assert parseClientFirst("n,a=bo=2Cb,n=a=3Db,r=x") == ("n", "bo,b", "a=b")


# -- availability ----------------------------------------------------------------------


def test_mechanisms_are_offered_only_where_they_can_succeed(tmp_path):
    path = tmp_path / "passwd"
    path.write_text("a:{SHA512-CRYPT}$6$rounds=1000$salt$x\n")
    hashed_only = context(PasswdFileChecker(path, runInThread=synchronously))
    assert {m.name for m in ALL_MECHANISMS if m.available(hashed_only)} == {"PLAIN", "LOGIN"}
    plain = context(PlaintextChecker({}))
    assert {m.name for m in ALL_MECHANISMS if m.available(plain)} == {
        "PLAIN",
        "LOGIN",
        "CRAM-MD5",
        "SCRAM-SHA-1",
        "SCRAM-SHA-256",
    }
    tls = SASLContext(
        PlaintextChecker({}), "h", tls=True, channelBinding=b"x" * 32, externalUser="alice"
    )
    assert {m.name for m in ALL_MECHANISMS if m.available(tls)} == {
        "PLAIN",
        "LOGIN",
        "CRAM-MD5",
        "SCRAM-SHA-1",
        "SCRAM-SHA-256",
        "SCRAM-SHA-1-PLUS",
        "SCRAM-SHA-256-PLUS",
        "EXTERNAL",
    }


def test_mechanisms_by_name():
    assert list(mechanismsByName(["plain", "scram-sha-256"])) == ["PLAIN", "SCRAM-SHA-256"]
    with pytest.raises(ValueError, match="NTLM"):
        mechanismsByName(["NTLM"])
