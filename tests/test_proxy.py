"""Unit tests of the proxy's parts: POP URLs, routing fields, the PROXY v2 header,
the backend login client (over StringTransport) and the relay's back-pressure."""

from __future__ import annotations

import base64
import hashlib
import ipaddress

import pytest
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.python.failure import Failure
from zope.interface import implementer

from popserv.auth.credentials import APOPCredentials, Impersonation, UsernamePassword
from popserv.auth.passwdfile import PasswdFileChecker, parsePasswdFile
from popserv.auth.realm import MailboxRealm
from popserv.backends.memory import MemoryStore
from popserv.config import ConfigError, loadConfig
from popserv.errors import AuthenticationFailed, TemporaryFailure
from popserv.interfaces import IMailbox, IRelayedSession, UnverifiedUser
from popserv.popsource import parsePOPURL
from popserv.popurl import IMPLICIT_TLS, STARTTLS, PopURL, parsePopURL
from popserv.protocol import POP3Factory
from popserv.proxy.client import BackendFailed, BackendLogin, BackendRefused, LoginAs
from popserv.proxy.connect import BackendConnector
from popserv.proxy.proxyv2 import proxyHeader
from popserv.proxy.realm import BackendAnswer, ForwardingChecker, ProxyRealm, Router
from popserv.proxy.relay import CLOSE_GRACE, RelayedSession
from popserv.testing import PlaintextChecker, connect
from popserv.threads import synchronously


def test_pop_urls():
    assert parsePopURL("pop://;AUTH=*@mail2.example.org:110") == PopURL("mail2.example.org", 110)
    assert parsePopURL("pop3s://host") == PopURL("host", 995, IMPLICIT_TLS)
    assert parsePopURL("pop3://u;AUTH=+apop@[::1]:1110") == PopURL(
        "::1", 1110, auth="+APOP", user="u"
    )
    assert parsePopURL("pop://;STLS@h").tls == STARTTLS
    for bad in ("imap://h", "pop://h/path", "pop://;AUTH=GSSAPI@h", "pop://h:99999", "pop://"):
        with pytest.raises(ValueError):
            parsePopURL(bad)
    # One parser for the proxy and migrate (popserv.popsource.parsePOPURL).
    assert parsePopURL("pop://;AUTH=USER@h").auth == "+USER"
    assert str(parsePopURL("pop3://u;AUTH=+apop@[::1]:1110")) == "pop://u;AUTH=+APOP@[::1]:1110"
    assert str(parsePopURL("pop://;stls@h")) == "pop://;STLS@h:110"
    assert str(parsePopURL("pop3s://h")) == "pop3s://h:995"
    with pytest.raises(ValueError, match="no passwords"):
        parsePopURL("pop://u:pw@h")
    with pytest.raises(ValueError, match="not supported"):
        parsePOPURL("pop://u;auth=+APOP@h")  # migrate has no APOP


def test_passwd_routing_fields_and_router():
    users = parsePasswdFile(
        "alice:{PLAIN}x:::::: proxy=y host=10.0.0.5 port=1110 destuser=al starttls=yes\n"
        "bob:{PLAIN}x:::::: proxy=1 ssl=y host=b proxy_timeout=3\n"
        "carol:{PLAIN}x\n"
        "dave:{PLAIN}x:::::: proxy=n\n"
    )

    class Source:
        def settingsFor(self, user):
            return users[user].settings

    router = Router(Source())
    alice = router.routeFor("alice")
    assert alice.backends == (PopURL("10.0.0.5", 1110, STARTTLS),) and alice.user == "al"
    bob = router.routeFor("bob")
    assert bob.backends == (PopURL("b", 995, IMPLICIT_TLS),) and bob.timeout == 3
    assert router.routeFor("carol") is None  # absent means no
    withDefault = Router(Source(), (PopURL("d", 110),))
    assert withDefault.routeFor("carol").backends == (PopURL("d", 110),)
    assert withDefault.routeFor("dave") is None


def test_proxy_v2_header_parses_back():
    header = proxyHeader(
        IPv4Address("TCP", "192.0.2.7", 40000), IPv4Address("TCP", "10.0.0.1", 110)
    )
    info = V2Parser.parse(header)
    assert (info.source.host, info.source.port) == ("192.0.2.7", 40000)
    assert (info.destination.host, info.destination.port) == ("10.0.0.1", 110)
    local = V2Parser.parse(proxyHeader(UNIXAddress(b"/s"), UNIXAddress(b"/s")))
    assert local.source is None


def _login(login: LoginAs, tlsMode: str = "none"):
    protocol = BackendLogin(login, tlsMode, None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    results = []
    protocol.done.addBoth(results.append)
    return protocol, transport, results


def test_login_prefers_sasl_plain_when_offered():
    protocol, transport, results = _login(LoginAs("alice", b"pw"))
    protocol.dataReceived(b"+OK hi\r\n")
    assert transport.value() == b"CAPA\r\n"
    transport.clear()
    protocol.dataReceived(b"+OK\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n")
    assert transport.value() == b"AUTH PLAIN " + base64.b64encode(b"\0alice\0pw") + b"\r\n"
    protocol.dataReceived(b"+OK Logged in\r\n")
    assert results == [b"+OK Logged in"]


def test_login_falls_back_to_user_pass_and_passes_refusals():
    protocol, transport, results = _login(LoginAs("alice", b"pw"))
    protocol.dataReceived(b"+OK hi\r\n-ERR no CAPA\r\n")
    assert transport.value() == b"CAPA\r\nUSER alice\r\n"
    protocol.dataReceived(b"+OK\r\n-ERR [IN-USE] locked\r\n")
    assert transport.value().endswith(b"PASS pw\r\n")
    assert results[0].check(BackendRefused) and results[0].value.code == "IN-USE"


def test_master_login_uses_authzid_and_bad_greeting_is_a_failure():
    protocol, transport, results = _login(LoginAs("alice", None, "master", b"mpw"))
    protocol.dataReceived(b"+OK hi\r\n")
    expected = base64.b64encode(b"alice\0master\0mpw")
    assert transport.value() == b"AUTH PLAIN " + expected + b"\r\n"
    protocol, transport, results = _login(LoginAs("alice", b"pw"))
    protocol.dataReceived(b"-ERR [SYS/TEMP] busy\r\n")
    assert results[0].check(BackendFailed)  # another backend may be tried


class _TLSStringTransport(StringTransport):
    tlsStarted = False

    def startTLS(self, options):
        self.tlsStarted = True


def test_stls_to_a_backend_trusts_nothing_sent_in_the_clear_behind_its_ok():
    """
    CVE-2011-0411 from the client's side: a man in the middle appends
    answers to CAPA, USER and PASS behind the backend's +OK to STLS. Read
    after startTLS, they would log the user in; the login fails instead.
    """
    for injected, ok in ((b"+OK\r\n.\r\n+OK\r\n+OK forged login\r\n", False), (b"", True)):
        protocol = BackendLogin(LoginAs("alice", b"pw"), STARTTLS, None)
        transport = _TLSStringTransport()
        protocol.makeConnection(transport)
        results = []
        protocol.done.addBoth(results.append)
        protocol.dataReceived(b"+OK backend ready\r\n")
        assert transport.value() == b"STLS\r\n"
        protocol.dataReceived(b"+OK Begin TLS\r\n" + injected)
        assert transport.tlsStarted is ok
        if ok:
            assert results == [] and transport.value().endswith(b"CAPA\r\n")
        else:
            assert results[0].check(BackendFailed) and transport.disconnecting


def test_relay_back_pressure_both_ways():
    protocol, back, results = _login(LoginAs("alice", b"pw"), "none")
    protocol.dataReceived(b"+OK hi\r\n-ERR\r\n")
    protocol.dataReceived(b"+OK\r\n+OK in\r\n")
    session = RelayedSession(protocol, results[0], "b:110", "alice")
    front = StringTransport()

    class Stats:
        bytes_out = 0

    stats = Stats()
    toBackend = session.start(front, b"STAT\r\n", stats, lambda: None)
    assert back.value().endswith(b"STAT\r\n")
    assert back.producer is front and front.producer is back
    protocol.dataReceived(b"+OK 1 5\r\n")
    toBackend(b"QUIT\r\n")
    assert front.value() == b"+OK 1 5\r\n" and stats.bytes_out == 9
    assert back.value().endswith(b"QUIT\r\n")
    protocol.connectionLost(None)
    assert front.disconnecting and front.producer is None


def test_nopassword_users_are_unverified_and_no_local_mechanism_lets_them_in(tmp_path):
    passwd = tmp_path / "passwd"
    passwd.write_text("alice:{PLAIN}ignored:::::: nopassword=y proxy=y host=b\nbob:{PLAIN}pw\n")
    checker = PasswdFileChecker(passwd, synchronously)
    results = []
    checker.requestAvatarId(UsernamePassword("alice", b"whatever")).addBoth(results.append)
    assert results == ["alice"] and type(results[0]) is UnverifiedUser
    checker.requestAvatarId(UsernamePassword("bob", b"pw")).addBoth(results.append)
    assert type(results[1]) is str  # a checked user is not marked
    # APOP would match the digest of an empty or ignored secret: never.
    apop = APOPCredentials("alice", b"<1.2@h>", hashlib.md5(b"<1.2@h>").hexdigest().encode())
    checker.requestAvatarId(apop).addBoth(results.append)
    assert results[2].check(UnauthorizedLogin)
    checker.scramKeys("alice", "SCRAM-SHA-256").addBoth(results.append)
    assert results[3] is None
    # A realm that serves maildrops refuses an unverified user.
    realm = MailboxRealm(MemoryStore())
    with pytest.raises(AuthenticationFailed):
        realm.requestAvatar(UnverifiedUser("alice"), None, IMailbox)


def test_a_nopassword_master_user_cannot_act_as_anyone(tmp_path):
    """A master user's password is checked when it acts as another user, or never."""
    passwd = tmp_path / "passwd"
    passwd.write_text("alice:{PLAIN}secret\nadmin:::::::nopassword=y\n")
    checker = PasswdFileChecker(passwd, synchronously, masterUsers={"admin"})
    results = []
    acting = Impersonation("alice", UsernamePassword("admin", b"WRONG"))
    checker.requestAvatarId(acting).addBoth(results.append)
    assert isinstance(results[0], Failure) and results[0].check(UnauthorizedLogin), results


def test_an_unverified_user_is_only_ever_forwarded():
    class Source:
        def settingsFor(self, user):
            return {"proxy": True, "proxyHost": "b"} if user == "alice" else {}

    connector = BackendConnector(MemoryReactorClock(), lambda host, verify: None)
    realm = ProxyRealm(MailboxRealm(MemoryStore()), Router(Source()), connector)
    with pytest.raises(AuthenticationFailed):  # not proxied: never served here
        realm.requestAvatar(UnverifiedUser("carol"), None, IMailbox)
    master = ProxyRealm(realm.local, realm.router, connector, None, "m", b"mpw")
    with pytest.raises(AuthenticationFailed):  # the master would let any password in
        master.requestAvatar(UnverifiedUser("alice"), None, IMailbox)
    results = []
    ForwardingChecker().requestAvatarId(UsernamePassword("x", b"y")).addBoth(results.append)
    assert type(results[0]) is UnverifiedUser


BASE_CONFIG = 'listen = ["tcp:1110"]\n'


@pytest.mark.parametrize(
    "text, error",
    [
        ('passwd = "p"\n', "mail_location: required"),
        ('proxy_backend = ["pop://b"]\n', None),  # proxies only, checks nothing
        ('passwd = "p"\nproxy_backend = ["pop://b"]\n', None),
        ('proxy_backend = ["pop://b"]\nlmtp = ["tcp:24"]\n', "lmtp: delivers"),
        ('proxy_backend = ["pop://b"]\nproxy_master_user = "m"\n', "needs an auth source"),
        ("", "passwd: a passwd-file"),
    ],
)
def test_proxy_only_configurations(tmp_path, text, error):
    path = tmp_path / "popserv.conf"
    path.write_text(BASE_CONFIG + text)
    if error is None:
        loadConfig(path).validated()
    else:
        with pytest.raises(ConfigError, match=error):
            loadConfig(path).validated()


class _Mind:
    def __init__(self, user: str, password: bytes) -> None:
        self.credentials = UsernamePassword(user, password)


def _forwardedLogin(answer: bytes, masterUser: str | None = None):
    """A login of an unverified alice, forwarded; the backend refuses it with C{answer}."""

    class Source:
        def settingsFor(self, user):
            return {"proxy": True, "proxyHost": "192.0.2.1"}

    reactor = MemoryReactorClock()
    connector = BackendConnector(reactor, lambda host, verify: None)
    local = MailboxRealm(MemoryStore())
    realm = ProxyRealm(local, Router(Source()), connector, None, masterUser, b"mpw")
    user = "alice" if masterUser else UnverifiedUser("alice")
    results = []
    realm.requestAvatar(user, _Mind("alice", b"guess"), IMailbox).addBoth(results.append)
    host, port, factory, _timeout, _bind = reactor.tcpClients[0]
    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    protocol.makeConnection(StringTransport())
    protocol.dataReceived(b"+OK hi\r\n")
    if not masterUser:  # CAPA, then USER/PASS; a master user sends AUTH PLAIN at once
        protocol.dataReceived(b"-ERR no CAPA\r\n+OK\r\n")
    protocol.dataReceived(answer)
    [failure] = results
    return failure


@pytest.mark.parametrize(
    "answer", [b"-ERR Invalid login\r\n", b"-ERR [AUTH] no\r\n", b"-ERR [SYS/PERM] x\r\n"]
)
def test_a_forwarded_password_refused_is_a_failed_login(answer):
    """
    A backend without response codes (RFC 1939) refuses a wrong password
    with any text: that is a failed login (penalized, counted), answered
    with the usual text, not the backend's.
    """
    failure = _forwardedLogin(answer)
    assert failure.check(AuthenticationFailed)
    assert failure.value.message() == "Authentication failed"


def test_a_backend_in_use_or_temporary_refusal_is_passed_on():
    for answer, code in [
        (b"-ERR [IN-USE] locked\r\n", "IN-USE"),
        (b"-ERR [SYS/TEMP] busy\r\n", "SYS/TEMP"),
        (b"-ERR [LOGIN-DELAY] wait\r\n", "LOGIN-DELAY"),
    ]:
        failure = _forwardedLogin(answer)
        assert failure.check(BackendAnswer) and failure.value.code == code


def test_master_user_refusals_keep_their_mapping():
    assert _forwardedLogin(b"-ERR [AUTH] no\r\n", "master").check(TemporaryFailure)
    failure = _forwardedLogin(b"-ERR Invalid login\r\n", "master")
    assert failure.check(BackendAnswer) and not failure.check(AuthenticationFailed)


def _relayedSession(clock):
    protocol, back, results = _login(LoginAs("alice", b"pw"), "none")
    protocol.dataReceived(b"+OK hi\r\n-ERR\r\n")
    protocol.dataReceived(b"+OK\r\n+OK in\r\n")
    return protocol, back, RelayedSession(protocol, results[0], "b:110", "alice", clock)


def test_a_client_gone_while_the_backend_is_paused_resumes_then_closes_it():
    """
    A slow client paused the backend's reading; when it goes, the backend is
    read again (a TLS backend's close needs the peer's close_notify), closed
    gently (its QUIT goes through), and aborted if still there later.
    """

    class Stats:
        bytes_out = 0

    clock = MemoryReactorClock()
    protocol, back, session = _relayedSession(clock)
    front = StringTransport()
    toBackend = session.start(front, b"", Stats(), lambda: None)
    back.pauseProducing()  # the client's write buffer is full
    toBackend(b"QUIT\r\n")
    session()
    assert back.producerState == "producing" and back.disconnecting
    assert back.value().endswith(b"QUIT\r\n")
    clock.advance(CLOSE_GRACE)
    assert back.disconnected  # aborted: the backend never closed
    # A backend that closes in time is not aborted.
    protocol, back, session = _relayedSession(clock)
    session.start(StringTransport(), b"", Stats(), lambda: None)
    back.pauseProducing()
    session()
    protocol.connectionLost(None)
    assert not clock.getDelayedCalls()
    # Nor is one whose session never started.
    protocol, back, session = _relayedSession(clock)
    session()
    protocol.dataReceived(b"+OK bye\r\n")
    protocol.connectionLost(None)
    assert back.disconnecting and not clock.getDelayedCalls()


def test_the_autologout_of_a_relay_injects_nothing():
    """
    The idle timer ends a relayed session silently: no -ERR of the front's
    in the middle of the backend's multi-line reply; the backend is closed.
    """
    clock = MemoryReactorClock()
    protocol, back, session = _relayedSession(clock)

    @implementer(IRealm)
    class Realm:
        def requestAvatar(self, avatarId, mind, *interfaces):
            return IRelayedSession, session, session

    factory = POP3Factory(Portal(Realm(), [PlaintextChecker({"alice": "pw"})]), clock)
    client = connect(factory)
    client.send(b"USER alice\r\nPASS pw\r\n")
    assert client.lines()[-1] == b"+OK in"
    client.send(b"RETR 1\r\n")
    protocol.dataReceived(b"+OK 100 octets\r\nSubject: half")
    clock.advance(factory.timeout)
    assert client.output() == b"+OK 100 octets\r\nSubject: half"
    assert client.transport.disconnected  # aborted
    client.disconnect()
    assert back.disconnecting
    # Nor does a shutdown of the server.
    protocol, back, session = _relayedSession(clock)
    client = connect(factory)
    client.send(b"USER alice\r\nPASS pw\r\nLIST\r\n")
    protocol.dataReceived(b"+OK\r\n1 5\r\n")
    client.protocol.shutdown()
    assert client.output().endswith(b"+OK in\r\n+OK\r\n1 5\r\n")
    assert client.transport.disconnected


@pytest.mark.parametrize(
    "user, password",
    [
        ("alice\r\nDELE 1", b"pw"),
        ("alice", b"pw\r\nDELE 1"),
        ("alice", b"pw\0x"),
        ("al\0ice", b"p"),
    ],
)
def test_cr_lf_or_nul_in_a_forwarded_name_or_password_is_refused(user, password):
    """A SASL PLAIN name or password may carry them: refused, and no backend is contacted."""

    class Source:
        def settingsFor(self, user):
            return {"proxy": True, "proxyHost": "192.0.2.1"}

    reactor = MemoryReactorClock()
    connector = BackendConnector(reactor, lambda host, verify: None)
    realm = ProxyRealm(MailboxRealm(MemoryStore()), Router(Source()), connector)
    results = []
    realm.requestAvatar(UnverifiedUser(user), _Mind(user, password), IMailbox).addBoth(
        results.append
    )
    assert results[0].check(AuthenticationFailed)
    assert reactor.tcpClients == []


@pytest.mark.parametrize(
    "source, destination, expected",
    [
        ("::ffff:192.0.2.7", "10.0.0.1", ("192.0.2.7", "10.0.0.1")),
        ("192.0.2.7", "::ffff:10.0.0.1", ("192.0.2.7", "10.0.0.1")),
        ("::ffff:192.0.2.7", "::ffff:10.0.0.1", ("192.0.2.7", "10.0.0.1")),
        ("::ffff:192.0.2.7", "2001:db8::1", ("::ffff:192.0.2.7", "2001:db8::1")),
        ("2001:db8::7", "2001:db8::1", ("2001:db8::7", "2001:db8::1")),
        ("2001:db8::7", "10.0.0.1", None),
        ("192.0.2.7", "2001:db8::1", None),
    ],
)
def test_proxy_v2_header_of_mixed_and_mapped_addresses(source, destination, expected):
    """
    Whatever the pair, the header is well formed (its family agrees with its
    length): IPv4-mapped addresses go as IPv4 when both sides can, a pair
    of IPv4 and IPv6 that cannot agree gets a LOCAL header.
    """
    header = proxyHeader(
        IPv6Address("TCP", source, 40000) if ":" in source else IPv4Address("TCP", source, 40000),
        IPv6Address("TCP", destination, 110)
        if ":" in destination
        else IPv4Address("TCP", destination, 110),
    )
    family = header[13]
    length = int.from_bytes(header[14:16], "big")
    assert (family, length) in ((0x11, 12), (0x21, 36), (0x00, 0))
    info = V2Parser.parse(header)
    if expected is None:
        assert info.source is None and family == 0x00
    else:
        hosts = (info.source.host, info.destination.host)
        parse = ipaddress.ip_address
        assert tuple(map(parse, hosts)) == tuple(map(parse, expected))
        assert type(info.source) is type(info.destination)
        assert (info.source.port, info.destination.port) == (40000, 110)
