"""
SASL GSSAPI (RFC 4752 through RFC 5034): the exchange byte by byte through
StringTransport, with real tickets from a throw-away MIT KDC (tests/kdc.py)
and python-gssapi as the client; who may log in as whom; when CAPA offers it.
Real clients (mpop, curl) log in in test_gssapi_e2e.py.
"""

from __future__ import annotations

import base64
import os
import sys

import pytest

from popserv.auth.passwdfile import PasswdFileChecker
from popserv.sasl import ALL_MECHANISMS, SASLContext, mechanismsByName
from popserv.sasl.gssapi import GSSAPI, NO_SECURITY_LAYER, PrincipalMap, defaultRealm
from popserv.testing import connect, memoryServer
from popserv.threads import synchronously

# -- principals to users (no KDC needed) ------------------------------------------------------


def test_default_realm_principal_is_its_bare_name():
    principals = PrincipalMap("EXAMPLE.ORG")
    assert principals.user("alice@EXAMPLE.ORG") == "alice"


@pytest.mark.parametrize(
    "principal",
    [
        "alice@OTHER.ORG",  # another realm, not in the map
        "alice@example.org",  # realms are case-sensitive
        "alice/admin@EXAMPLE.ORG",  # an instance is never a user
        "pop/mail.example.org@EXAMPLE.ORG",
        "@EXAMPLE.ORG",
        "alice",
        "alice@",
    ],
)
def test_other_principals_are_no_users(principal):
    assert PrincipalMap("EXAMPLE.ORG").user(principal) is None


def test_realm_map_names_other_realms_and_their_domains():
    principals = PrincipalMap.parse("EXAMPLE.ORG", ["AD.EXAMPLE.ORG", "PARTNER.NET=partner.net"])
    assert principals.user("bob@AD.EXAMPLE.ORG") == "bob"
    assert principals.user("carol@PARTNER.NET") == "carol@partner.net"
    assert principals.user("alice@EXAMPLE.ORG") == "alice"
    assert principals.user("alice@ELSEWHERE.NET") is None


def test_realm_map_can_give_the_default_realm_a_domain():
    principals = PrincipalMap.parse("EXAMPLE.ORG", ["EXAMPLE.ORG=example.org"])
    assert principals.user("alice@EXAMPLE.ORG") == "alice@example.org"


@pytest.mark.parametrize("entry", ["", "=example.org", "A@B", "REALM=a@b", "REALM=x/y"])
def test_bad_realm_map_entries_are_refused(entry):
    with pytest.raises(ValueError):
        PrincipalMap.parse("EXAMPLE.ORG", [entry])


# -- when it is offered ----------------------------------------------------------------------


def test_unconfigured_gssapi_is_known_but_never_offered():
    assert "GSSAPI" in mechanismsByName()
    (unconfigured,) = [m for m in ALL_MECHANISMS if m.name == "GSSAPI"]
    assert unconfigured.plaintext is False
    assert not unconfigured.available(SASLContext(None, "pop.example"))


def capa(mechanism, tmp_path):
    passwd = tmp_path / "passwd"
    passwd.write_text("alice:{PLAIN}x\n")
    factory, _ = memoryServer(
        {},
        checker=PasswdFileChecker(passwd, runInThread=synchronously),
        mechanisms={"GSSAPI": mechanism, **mechanismsByName(["PLAIN"])},
        allowPlaintext=lambda transport: True,
    )
    client = connect(factory)
    client.send(b"CAPA\r\n")
    (sasl,) = [line for line in client.lines() if line.startswith(b"SASL")]
    client.send(b"AUTH\r\n")
    listed = client.lines()[1:-1]
    return sasl.split()[1:], listed


def test_capa_lists_gssapi_only_with_a_readable_keytab(tmp_path):
    keytab = tmp_path / "pop.keytab"
    mechanism = GSSAPI(str(keytab), None, PrincipalMap("EXAMPLE.ORG"))
    assert capa(mechanism, tmp_path) == ([b"PLAIN"], [b"PLAIN"])
    keytab.write_bytes(b"\x05\x02")  # readable (what is in it is the login's business)
    mechanism = GSSAPI(str(keytab), None, PrincipalMap("EXAMPLE.ORG"))
    assert capa(mechanism, tmp_path) == ([b"GSSAPI", b"PLAIN"], [b"GSSAPI", b"PLAIN"])
    keytab.chmod(0o000)
    mechanism = GSSAPI(str(keytab), None, PrincipalMap("EXAMPLE.ORG"))
    if os.geteuid() != 0:  # root reads anything
        assert capa(mechanism, tmp_path)[0] == [b"PLAIN"]


# -- the exchange, with real tickets ---------------------------------------------------------


@pytest.fixture
def realm(kdc, monkeypatch):
    """The test realm's configuration for this process (server and client side alike)."""
    for name, value in kdc.env.items():
        monkeypatch.setenv(name, value)
    return kdc


class Client:
    """RFC 4752 section 3.1, client side, with python-gssapi and a user's ticket cache."""

    def __init__(self, kdc, user: str, service: str = "pop@localhost") -> None:
        import gssapi

        creds = gssapi.Credentials(usage="initiate", store={"ccache": kdc.ccache(user)})
        self.context = gssapi.SecurityContext(
            name=gssapi.Name(service, gssapi.NameType.hostbased_service),
            creds=creds,
            usage="initiate",
            flags=gssapi.RequirementFlag.mutual_authentication | gssapi.RequirementFlag.integrity,
        )


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def challenge(line: bytes) -> bytes:
    assert line.startswith(b"+ ") or line == b"+", line
    return base64.b64decode(line[2:])


def server(kdc, tmp_path, principals=None, principal=None, keytab=None):
    passwd = tmp_path / "passwd"
    passwd.write_text("alice:{PLAIN}x\nmaster:{PLAIN}y\nalice@example.org:{PLAIN}z\n")
    checker = PasswdFileChecker(passwd, runInThread=synchronously, masterUsers={"master"})
    mechanism = GSSAPI(
        keytab or kdc.keytab,
        principal,
        principals or PrincipalMap.parse(defaultRealm(), []),
        synchronously,
    )
    factory, _ = memoryServer({}, checker=checker, mechanisms={"GSSAPI": mechanism})
    return connect(factory)


def login(client, gss: Client, authzid: bytes = b"") -> list[bytes]:
    """The whole exchange; the server's lines after the client's last message."""
    client.send(b"AUTH GSSAPI\r\n")
    assert client.lines() == [b"+ "]
    client.send(b64(gss.context.step()) + b"\r\n")
    (line,) = client.lines()
    if line.startswith(b"-ERR"):
        return [line]
    gss.context.step(challenge(line))  # the AP-REP: the server proved itself
    assert gss.context.complete
    client.send(b"\r\n")
    (line,) = client.lines()
    offer = gss.context.unwrap(challenge(line))
    assert not offer.encrypted  # integrity only (RFC 4752: conf_flag FALSE)
    assert offer.message == bytes([NO_SECURITY_LAYER, 0, 0, 0])
    choice = gss.context.wrap(bytes([NO_SECURITY_LAYER, 0, 0, 0]) + authzid, False).message
    client.send(b64(choice) + b"\r\n")
    return client.lines()


def start(client, gss: Client) -> None:
    """AUTH GSSAPI, its empty challenge, and the client's first token."""
    client.send(b"AUTH GSSAPI\r\n")
    assert client.lines() == [b"+ "]
    client.send(b64(gss.context.step()) + b"\r\n")


def test_exchange_on_the_wire(realm, tmp_path):
    """Empty challenge, client token, AP-REP, empty reply, wrapped offer, choice: logged in."""
    client = server(realm, tmp_path)
    lines = login(client, Client(realm, "alice"))
    assert lines[0].startswith(b"+OK"), lines
    assert client.protocol.user == "alice"


def test_named_principal(realm, tmp_path):
    client = server(realm, tmp_path, principal=realm.principal)
    assert login(client, Client(realm, "alice"))[0].startswith(b"+OK")


def test_ticket_in_an_initial_response_is_taken(realm, tmp_path):
    """
    RFC 5034 section 4: a client whose initial response would make AUTH longer
    than 255 octets waits for the empty challenge instead. A Kerberos token is
    longer; one sent with AUTH anyway is taken (an AUTH line may be as long as a
    SASL response, for clients such as mpop), and the exchange goes on.
    """
    client = server(realm, tmp_path)
    token = Client(realm, "alice").context.step()
    assert len(token) > 255
    client.send(b"AUTH GSSAPI " + b64(token) + b"\r\n")
    [reply] = client.lines()
    assert reply.startswith(b"+ ") and len(reply) > 2, reply  # the mutual-auth token
    client.send(b"*\r\n")
    assert client.lines()[0].startswith(b"-ERR")
    assert login(client, Client(realm, "alice"))[0].startswith(b"+OK")


def test_ticket_for_another_service_is_refused(realm, tmp_path):
    """
    With --gssapi-principal naming another service of the keytab, a ticket for
    pop/localhost fails. (A keytab without the named key is the server's fault:
    test_auth_outages.py.)
    """
    elsewhere = f"pop/elsewhere@{realm.realm.realm}"
    keytab = str(tmp_path / "two.keytab")
    realm.realm.addprinc(elsewhere)
    for principal in (elsewhere, realm.principal):
        realm.realm.extract_keytab(principal, keytab)  # -norandkey: the keys stay
    client = server(realm, tmp_path, principal=elsewhere, keytab=keytab)
    assert login(client, Client(realm, "alice"))[0].startswith(b"-ERR [AUTH]")
    assert client.protocol.user is None


def test_authzid_of_the_same_user_is_accepted(realm, tmp_path):
    client = server(realm, tmp_path)
    assert login(client, Client(realm, "alice"), authzid=b"alice")[0].startswith(b"+OK")


def test_differing_authzid_is_refused(realm, tmp_path):
    client = server(realm, tmp_path)
    lines = login(client, Client(realm, "alice"), authzid=b"master")
    assert lines[0].startswith(b"-ERR [AUTH]"), lines
    assert client.protocol.user is None


def test_master_user_may_act_as_another(realm, tmp_path):
    client = server(realm, tmp_path)
    lines = login(client, Client(realm, "master"), authzid=b"alice")
    assert lines[0].startswith(b"+OK"), lines
    assert client.protocol.user == "alice"


def test_user_unknown_to_the_auth_source_is_refused(realm, tmp_path):
    """carol has a ticket of the realm but no line in the passwd-file."""
    client = server(realm, tmp_path)
    lines = login(client, Client(realm, "carol"))
    assert lines[0].startswith(b"-ERR [AUTH]"), lines
    assert client.protocol.user is None


def test_wrong_realm_is_refused(realm, tmp_path):
    """A server whose realm is another refuses KRBTEST.COM's users, before any offer."""
    client = server(realm, tmp_path, principals=PrincipalMap("EXAMPLE.ORG"))
    (line,) = login(client, Client(realm, "alice"))
    assert line.startswith(b"-ERR [AUTH]")


def test_realm_map_lets_another_realm_in(realm, tmp_path):
    principals = PrincipalMap.parse("EXAMPLE.ORG", ["KRBTEST.COM=example.org"])
    client = server(realm, tmp_path, principals=principals)
    assert login(client, Client(realm, "alice"))[0].startswith(b"+OK")
    assert client.protocol.user == "alice@example.org"


@pytest.mark.parametrize(
    "choice",
    [
        bytes([0x02, 0, 0, 0]),  # integrity: never offered
        bytes([0x04, 0, 0, 0]),  # confidentiality: never offered
        b"\x01\x00",  # too short
        bytes([NO_SECURITY_LAYER, 0, 0, 0]) + b"\xff",  # authzid not UTF-8
    ],
)
def test_bad_security_layer_choice_is_refused(realm, tmp_path, choice):
    client = server(realm, tmp_path)
    gss = Client(realm, "alice")
    start(client, gss)
    gss.context.step(challenge(client.lines()[0]))
    client.send(b"\r\n")
    client.lines()
    client.send(b64(gss.context.wrap(choice, False).message) + b"\r\n")
    assert client.lines()[0].startswith(b"-ERR [AUTH]")


def test_garbage_token_and_unwrapped_choice_are_refused(realm, tmp_path):
    client = server(realm, tmp_path)
    client.send(b"AUTH GSSAPI " + b64(b"not a token") + b"\r\n")
    assert client.lines()[0].startswith(b"-ERR [AUTH]")
    # A choice sent in the clear instead of wrapped
    gss = Client(realm, "alice")
    start(client, gss)
    gss.context.step(challenge(client.lines()[0]))
    client.send(b"\r\n")
    client.lines()
    client.send(b64(bytes([NO_SECURITY_LAYER, 0, 0, 0])) + b"\r\n")
    assert client.lines()[0].startswith(b"-ERR [AUTH]")
    assert client.protocol.user is None


def test_non_empty_reply_to_the_ap_rep_is_refused(realm, tmp_path):
    client = server(realm, tmp_path)
    gss = Client(realm, "alice")
    start(client, gss)
    client.lines()
    client.send(b64(b"unexpected") + b"\r\n")
    assert client.lines()[0].startswith(b"-ERR [AUTH]")


def test_cancelled_exchange(realm, tmp_path):
    client = server(realm, tmp_path)
    gss = Client(realm, "alice")
    start(client, gss)
    client.lines()
    client.send(b"*\r\n")
    assert client.lines()[0].startswith(b"-ERR")
    assert client.protocol.user is None


# -- python-gssapi is optional ---------------------------------------------------------------


def serverConfig(tmp_path, **settings):
    from popserv.config import Config

    (tmp_path / "passwd").write_text("alice:{PLAIN}x\n")
    return Config(
        passwd="passwd", mail_location="maildir:mail/%n", base_dir=str(tmp_path), **settings
    )


def test_without_python_gssapi_the_server_starts_without_gssapi(tmp_path, monkeypatch):
    """A node without python-gssapi (import fails) serves as before; a keytab is an error."""
    from popserv.config import ConfigError
    from popserv.service import makeFactory

    monkeypatch.setitem(sys.modules, "gssapi", None)  # what `import gssapi` does when absent
    factory = makeFactory(serverConfig(tmp_path))
    assert not factory.mechanisms["GSSAPI"].available(SASLContext(None, "h"))
    with pytest.raises(ConfigError, match="gssapi_keytab: python-gssapi is not installed"):
        makeFactory(serverConfig(tmp_path, gssapi_keytab="pop.keytab"))


def test_configured_from_settings(realm, tmp_path):
    """makeFactory builds the mechanism from the settings, with the realm's default realm."""
    from popserv.config import ConfigError
    from popserv.service import makeFactory

    factory = makeFactory(
        serverConfig(
            tmp_path,
            gssapi_keytab=realm.keytab,
            gssapi_principal=realm.principal,
            gssapi_realm_map=("PARTNER.NET=partner.net",),
        )
    )
    mechanism = factory.mechanisms["GSSAPI"]
    assert mechanism.available(SASLContext(None, "h"))
    assert mechanism.principal == realm.principal
    assert mechanism.principals.user("alice@KRBTEST.COM") == "alice"
    assert mechanism.principals.user("carol@PARTNER.NET") == "carol@partner.net"
    onlyPlain = serverConfig(tmp_path, gssapi_keytab=realm.keytab, sasl_mechanisms=("PLAIN",))
    assert "GSSAPI" not in makeFactory(onlyPlain).mechanisms
    with pytest.raises(ConfigError, match="gssapi_realm_map"):
        serverConfig(tmp_path, gssapi_realm_map=("A@B",)).validated()
