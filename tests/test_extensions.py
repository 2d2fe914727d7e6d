"""
The extension mechanism through the protocol: CAPA (RFC 2449), response codes
(RFC 2449, RFC 3206), SASL AUTH (RFC 5034), LOGIN-DELAY, EXPIRE, UTF8 and LANG
(RFC 6856).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from types import SimpleNamespace

import pytest
import scramp
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from zope.interface import implementer

from popserv.auth import passwdfile
from popserv.auth.passwdfile import PasswdFileChecker
from popserv.auth.realm import MailboxRealm
from popserv.backends.maildir import MaildirStore
from popserv.backends.memory import MemoryMailbox, MemoryStore
from popserv.errors import TemporaryFailure
from popserv.limits import AuthPenalty
from popserv.policy import SessionPolicy, UserSettings
from popserv.protocol import MAX_SASL_LINE, POP3Factory, State
from popserv.testing import connect, memoryServer
from popserv.threads import synchronously

DAY = 86400
NO_PENALTY = AuthPenalty(Clock(), cap=0)


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def reply(client, line: bytes) -> list[bytes]:
    client.send(line + b"\r\n")
    return client.lines()


def capa(client) -> list[bytes]:
    lines = reply(client, b"CAPA")
    assert lines[0].startswith(b"+OK") and lines[-1] == b"."
    return lines[1:-1]


@pytest.fixture
def server():
    factory, store = memoryServer({"alice": "wonderland", "j\u00fcrgen": "gr\u00fc\u00df"})
    store.maildrop("alice").deliver(b"Subject: 1\r\n\r\none\r\n")
    store.maildrop("alice").deliver(b"Subject: 2\r\n\r\ntwo\r\n")
    return factory, store


# -- CAPA --------------------------------------------------------------------------------


def test_capa_lists_what_works(server):
    factory, _ = server
    caps = capa(connect(factory))
    assert b"SASL SCRAM-SHA-256 SCRAM-SHA-1 CRAM-MD5 PLAIN LOGIN" in caps
    for cap in (
        b"USER",
        b"RESP-CODES",
        b"AUTH-RESP-CODE",
        b"PIPELINING",
        b"TOP",
        b"UIDL",
        b"EXPIRE NEVER",
        b"UTF8 USER",
        b"LANG",
    ):
        assert cap in caps
    assert not any(c.startswith(b"LOGIN-DELAY") for c in caps)  # not enforced: not listed


def test_capa_sasl_only_lists_mechanisms_that_can_succeed():
    """A checker without plaintext secrets cannot do CRAM-MD5 or SCRAM: not offered."""

    @implementer(ICredentialsChecker)
    class HashOnly:
        credentialInterfaces = (IUsernamePassword,)

        def requestAvatarId(self, c):
            return succeed(c.username)

    factory = POP3Factory(Portal(MailboxRealm(MemoryStore()), [HashOnly()]), Clock())
    client = connect(factory)
    assert b"SASL PLAIN LOGIN" in capa(client)
    assert reply(client, b"AUTH CRAM-MD5") == [b"-ERR Unsupported authentication mechanism"]


def test_capa_per_user_values_before_and_after_login(tmp_path):
    path = tmp_path / "passwd"
    path.write_text("alice:{PLAIN}pw::::::login_delay=300 expire=0\nbob:{PLAIN}pw\n")
    checker = PasswdFileChecker(path)
    clock = Clock()
    policy = SessionPolicy(clock, UserSettings(loginDelay=60, expire=30), checker)
    factory = POP3Factory(
        Portal(MailboxRealm(MemoryStore(), policy), [checker]), clock, policy=policy
    )
    client = connect(factory)
    caps = capa(client)
    assert b"LOGIN-DELAY 60 USER" in caps and b"EXPIRE 30 USER" in caps
    client.send(b"USER alice\r\nPASS pw\r\n")
    client.output()
    caps = capa(client)
    assert b"LOGIN-DELAY 300" in caps and b"EXPIRE 0" in caps  # the user's own, no USER
    assert b"USER" in caps and any(c.startswith(b"SASL ") for c in caps)  # "both" states


# -- SASL AUTH --------------------------------------------------------------------------


def test_auth_plain_with_initial_response(server):
    factory, _ = server
    client = connect(factory)
    lines = reply(client, b"AUTH PLAIN " + b64(b"\0alice\0wonderland"))
    assert lines == [b"+OK Logged in, 2 messages (38 octets)"]
    assert client.protocol.state is State.TRANSACTION


def test_auth_plain_with_challenge_and_trailing_space(server):
    """Outlook sends 'AUTH PLAIN ' with a trailing space; the server sends '+ '."""
    factory, _ = server
    client = connect(factory)
    assert reply(client, b"AUTH PLAIN ") == [b"+ "]
    assert reply(client, b64(b"\0alice\0wonderland"))[0].startswith(b"+OK Logged in")


def test_auth_empty_initial_response(server):
    """RFC 5034: '=' is an empty initial response (PLAIN then fails: no credentials)."""
    factory, _ = server
    client = connect(factory)
    assert reply(client, b"AUTH PLAIN =") == [b"-ERR [AUTH] Authentication failed"]
    assert client.protocol.state is State.AUTHORIZATION


def test_auth_wrong_password_is_auth_code(server):
    factory, _ = server
    client = connect(factory)
    lines = reply(client, b"AUTH PLAIN " + b64(b"\0alice\0nope"))
    assert lines == [b"-ERR [AUTH] Authentication failed"]


def test_auth_login(server):
    factory, _ = server
    client = connect(factory)
    assert reply(client, b"AUTH LOGIN") == [b"+ " + b64(b"Username:")]
    assert reply(client, b64(b"alice")) == [b"+ " + b64(b"Password:")]
    assert reply(client, b64(b"wonderland"))[0].startswith(b"+OK Logged in")


def test_auth_cram_md5(server):
    factory, _ = server
    client = connect(factory)
    (challenge_line,) = reply(client, b"AUTH CRAM-MD5")
    challenge = base64.b64decode(challenge_line[2:])
    assert challenge.endswith(b"@pop.example>")
    digest = hmac.new(b"wonderland", challenge, hashlib.md5).hexdigest().encode()
    assert reply(client, b64(b"alice " + digest))[0].startswith(b"+OK Logged in")


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-1"])
def test_auth_scram_full_exchange(server, mechanism):
    """RFC 5802: client-first, server-first, client-final, server-final, then +OK."""
    factory, _ = server
    client = connect(factory)
    scram = scramp.ScramClient([mechanism], "alice", "wonderland")
    (line,) = reply(
        client, b"AUTH " + mechanism.encode() + b" " + b64(scram.get_client_first().encode())
    )
    scram.set_server_first(base64.b64decode(line[2:]).decode())
    (line,) = reply(client, b64(scram.get_client_final().encode()))
    scram.set_server_final(base64.b64decode(line[2:]).decode())  # server proved itself
    assert reply(client, b"")[0].startswith(b"+OK Logged in")


def test_auth_scram_wrong_password(server):
    factory, _ = server
    client = connect(factory)
    scram = scramp.ScramClient(["SCRAM-SHA-256"], "alice", "nope")
    (line,) = reply(client, b"AUTH SCRAM-SHA-256 " + b64(scram.get_client_first().encode()))
    scram.set_server_first(base64.b64decode(line[2:]).decode())
    assert reply(client, b64(scram.get_client_final().encode())) == [
        b"-ERR [AUTH] Authentication failed"
    ]


def test_auth_cancel_and_bad_base64(server):
    factory, _ = server
    client = connect(factory)
    reply(client, b"AUTH LOGIN")
    assert reply(client, b"*") == [b"-ERR Authentication cancelled"]
    reply(client, b"AUTH LOGIN")
    assert reply(client, b"not base64!") == [b"-ERR Invalid base64 data"]
    assert reply(client, b"AUTH PLAIN !!!") == [b"-ERR Invalid base64 data"]
    assert reply(client, b"NOOP") == [b"-ERR NOOP is not valid in this state"]  # a command again


def test_auth_unknown_mechanism_and_listing(server):
    factory, _ = server
    client = connect(factory)
    assert reply(client, b"AUTH GSSAPI") == [b"-ERR Unsupported authentication mechanism"]
    assert reply(client, b"AUTH") == [
        b"+OK Mechanism list follows",
        b"SCRAM-SHA-256",
        b"SCRAM-SHA-1",
        b"CRAM-MD5",
        b"PLAIN",
        b"LOGIN",
        b".",
    ]
    assert reply(client, b"AUTH PLAIN a b")[0].startswith(b"-ERR")


def test_auth_continuation_lines_are_bounded(server):
    """Continuations may exceed 255 octets, but not without bound."""
    factory, _ = server
    client = connect(factory)
    reply(client, b"AUTH PLAIN")
    long_ok = b64(b"\0alice\0" + b"x" * 200)  # > 255 octets on the wire, within bounds
    assert len(long_ok) > 255
    assert reply(client, long_ok) == [b"-ERR [AUTH] Authentication failed"]
    reply(client, b"AUTH PLAIN")
    client.send(b"A" * (MAX_SASL_LINE + 10))
    client.send(b"\r\nNOOP\r\n")
    assert client.lines() == [
        b"-ERR Authentication exchange too long",
        b"-ERR NOOP is not valid in this state",
    ]


def test_auth_pipelined_with_commands(server):
    factory, _ = server
    client = connect(factory)
    client.send(b"AUTH PLAIN " + b64(b"\0alice\0wonderland") + b"\r\nSTAT\r\nQUIT\r\n")
    assert client.lines() == [
        b"+OK Logged in, 2 messages (38 octets)",
        b"+OK 2 38",
        b"+OK popserv 0.1.0 signing off (2 messages left)",
    ]


def test_auth_not_valid_after_login(server):
    factory, _ = server
    client = connect(factory)
    client.send(b"USER alice\r\nPASS wonderland\r\n")
    client.output()
    assert reply(client, b"AUTH PLAIN") == [b"-ERR AUTH is not valid in this state"]


def test_master_user_may_act_for_another_user_and_others_may_not(tmp_path):
    """RFC 4616 authzid: honoured only for configured master users."""
    path = tmp_path / "passwd"
    path.write_text("alice:{PLAIN}a\nbob:{PLAIN}b\nadmin:{PLAIN}m\n")
    checker = PasswdFileChecker(path, runInThread=synchronously, masterUsers={"admin"})
    store = MemoryStore()
    store.maildrop("alice").deliver(b"for alice\r\n")
    factory = POP3Factory(Portal(MailboxRealm(store), [checker]), Clock(), penalty=NO_PENALTY)
    client = connect(factory)
    assert reply(client, b"AUTH PLAIN " + b64(b"alice\0bob\0b")) == [
        b"-ERR [AUTH] Authentication failed"
    ]
    assert reply(client, b"AUTH PLAIN " + b64(b"alice\0admin\0wrong")) == [
        b"-ERR [AUTH] Authentication failed"
    ]
    assert reply(client, b"AUTH PLAIN " + b64(b"alice\0admin\0m"))[0].startswith(
        b"+OK Logged in, 1 message"
    )
    assert client.protocol.user == "alice"


# -- response codes ----------------------------------------------------------------------


def test_disabled_account_is_sys_perm_only_with_the_right_password(tmp_path):
    path = tmp_path / "passwd"
    path.write_text("alice:{PLAIN}pw::::::nologin\n")
    checker = PasswdFileChecker(path)
    factory = POP3Factory(
        Portal(MailboxRealm(MemoryStore()), [checker]), Clock(), penalty=NO_PENALTY
    )
    client = connect(factory)
    client.send(b"USER alice\r\n")
    client.output()
    assert reply(client, b"PASS wrong") == [b"-ERR [AUTH] Authentication failed"]
    client.send(b"USER alice\r\n")
    client.output()
    assert reply(client, b"PASS pw") == [b"-ERR [SYS/PERM] Account is disabled"]


def test_storage_unavailable_at_login_is_sys_temp_and_releases_the_lock(server):
    factory, store = server

    def broken(self):
        raise ConnectionRefusedError(111, "storage down")

    original = MemoryMailbox.listMessages
    MemoryMailbox.listMessages = broken
    try:
        client = connect(factory)
        client.send(b"USER alice\r\n")
        client.output()
        assert reply(client, b"PASS wonderland") == [
            b"-ERR [SYS/TEMP] Temporary server failure, try again later"
        ]
    finally:
        MemoryMailbox.listMessages = original
    assert not store.maildrop("alice").locked


# -- LOGIN-DELAY ------------------------------------------------------------------------


def test_login_delay_is_enforced_not_just_advertised():
    clock = Clock()
    clock.advance(1_000_000)
    policy = SessionPolicy(clock, UserSettings(loginDelay=60))
    factory, _ = memoryServer({"alice": "pw"}, policy=policy, clock=clock)
    assert b"LOGIN-DELAY 60" in capa(connect(factory))
    client = connect(factory)
    client.send(b"USER alice\r\nPASS pw\r\nQUIT\r\n")
    assert client.lines()[1].startswith(b"+OK Logged in")
    clock.advance(30)
    client = connect(factory)
    client.send(b"USER alice\r\n")
    client.output()
    assert reply(client, b"PASS pw") == [
        b"-ERR [LOGIN-DELAY] Logged in too recently, wait 31 seconds"
    ]
    clock.advance(30)
    client.send(b"USER alice\r\n")
    client.output()
    assert reply(client, b"PASS pw")[0].startswith(b"+OK Logged in")


def test_a_login_that_fails_after_authentication_does_not_count(monkeypatch):
    """The delay runs from a +OK (RFC 2449): a maildrop that cannot be listed is no login."""
    clock = Clock()
    clock.advance(1_000_000)
    policy = SessionPolicy(clock, UserSettings(loginDelay=60))
    factory, _ = memoryServer({"alice": "pw"}, policy=policy, clock=clock)

    def unreadable(self):
        raise TemporaryFailure("Maildrop unreadable")

    with monkeypatch.context() as m:
        m.setattr(MemoryMailbox, "listMessages", unreadable)
        client = connect(factory)
        client.send(b"USER alice\r\n")
        client.output()
        assert reply(client, b"PASS pw")[0].startswith(b"-ERR [SYS/TEMP]")
    client.send(b"USER alice\r\n")
    client.output()
    assert reply(client, b"PASS pw")[0].startswith(b"+OK Logged in")


def test_login_delay_wrong_password_reveals_nothing():
    clock = Clock()
    policy = SessionPolicy(clock, UserSettings(loginDelay=60))
    factory, _ = memoryServer({"alice": "pw"}, policy=policy, clock=clock)
    connect(factory).send(b"USER alice\r\nPASS pw\r\nQUIT\r\n")
    client = connect(factory)
    client.send(b"USER alice\r\n")
    client.output()
    assert reply(client, b"PASS wrong") == [b"-ERR [AUTH] Authentication failed"]


def maildir_worker(root, clock, delay=60):
    """A factory as one worker process has it: its own store and policy over a shared root."""
    store = MaildirStore(f"maildir:{root}/%n/Maildir", runInThread=synchronously)
    policy = SessionPolicy(clock, UserSettings(loginDelay=delay), memory=store)
    return memoryServer({"alice": "pw"}, store=store, policy=policy, clock=clock)[0]


def login_reply(factory) -> bytes:
    client = connect(factory)
    client.send(b"USER alice\r\n")
    client.output()
    answer = reply(client, b"PASS pw")[0]
    client.send(b"QUIT\r\n")
    return answer


def test_login_delay_holds_across_workers_sharing_the_maildrop(tmp_path):
    """Two processes serving one Maildir see each other's logins (the maildrop keeps them)."""
    clock = Clock()
    clock.advance(1_000_000)
    one, two = maildir_worker(tmp_path, clock), maildir_worker(tmp_path, clock)
    assert login_reply(one).startswith(b"+OK Logged in")
    clock.advance(30)
    assert login_reply(two) == b"-ERR [LOGIN-DELAY] Logged in too recently, wait 31 seconds"
    clock.advance(30)
    assert login_reply(two).startswith(b"+OK Logged in")
    assert login_reply(one).startswith(b"-ERR [LOGIN-DELAY]")
    stamp = (tmp_path / "alice" / "Maildir" / ".popserv.login").stat().st_mtime
    assert stamp == pytest.approx(clock.seconds())


def test_login_delay_memory_is_left_alone_without_a_delay(tmp_path):
    clock = Clock()
    assert login_reply(maildir_worker(tmp_path, clock, delay=0)).startswith(b"+OK Logged in")
    assert not (tmp_path / "alice" / "Maildir" / ".popserv.login").exists()


def test_clock_skew_between_nodes(tmp_path):
    """
    A node a little ahead: the wait told is the true one. A node an hour
    fast must not lock the user out for an hour.
    """
    behind = Clock()
    behind.advance(1_000_000)
    for skew, expected in [
        (30, b"-ERR [LOGIN-DELAY] Logged in too recently, wait 91 seconds"),
        (3600, b"+OK Logged in"),
    ]:
        ahead = Clock()
        ahead.advance(behind.seconds() + skew)
        assert login_reply(maildir_worker(tmp_path, ahead)).startswith(b"+OK Logged in")
        assert login_reply(maildir_worker(tmp_path, behind)).startswith(expected)
        behind.advance(7200)


def test_a_failing_login_memory_falls_back_to_this_process(tmp_path):
    class Broken:
        def lastLogin(self, user):
            raise OSError("read-only file system")

        def recordLogin(self, user, when):
            raise OSError("read-only file system")

    clock = Clock()
    clock.advance(1_000_000)
    policy = SessionPolicy(clock, UserSettings(loginDelay=60), memory=Broken())
    factory, _ = memoryServer({"alice": "pw"}, policy=policy, clock=clock)
    assert login_reply(factory).startswith(b"+OK Logged in")
    assert login_reply(factory).startswith(b"-ERR [LOGIN-DELAY]")
    clock.advance(60)
    assert login_reply(factory).startswith(b"+OK Logged in")


# -- EXPIRE --------------------------------------------------------------------------------


def expire_server(expire):
    clock = Clock()
    clock.advance(100 * DAY)
    policy = SessionPolicy(clock, UserSettings(expire=expire))
    factory, store = memoryServer({"alice": "pw"}, policy=policy, clock=clock)
    drop = store.maildrop("alice")
    old = drop.deliver(b"old\r\n", received=clock.seconds() - 40 * DAY)
    new = drop.deliver(b"new\r\n", received=clock.seconds() - 1 * DAY)
    newest = drop.deliver(b"newest\r\n", received=clock.seconds())
    return factory, drop, (old, new, newest)


def test_expire_zero_removes_retrieved_messages_at_update():
    """RFC 2449 6.7: EXPIRE 0: retrieved messages go at UPDATE even without DELE."""
    factory, drop, (old, new, newest) = expire_server(0)
    client = connect(factory)
    client.send(b"USER alice\r\nPASS pw\r\nRETR 2\r\nTOP 3 0\r\nQUIT\r\n")
    assert client.lines()[-1] == b"+OK popserv 0.1.0 signing off (2 messages left)"
    assert list(drop.messages) == [old, newest]  # TOP is not a retrieval


def test_expire_zero_does_nothing_without_quit():
    factory, drop, uids = expire_server(0)
    client = connect(factory)
    client.send(b"USER alice\r\nPASS pw\r\nRETR 1\r\nRETR 2\r\n")
    client.disconnect()
    assert list(drop.messages) == list(uids)


def test_expire_days_removes_older_messages_at_update():
    factory, drop, (old, new, newest) = expire_server(30)
    client = connect(factory)
    assert b"EXPIRE 30" in capa(client)
    client.send(b"USER alice\r\nPASS pw\r\nSTAT\r\nQUIT\r\n")
    lines = client.lines()
    assert lines[2] == b"+OK 3 18"  # still listed during the session
    assert lines[-1].endswith(b"(2 messages left)")
    assert list(drop.messages) == [new, newest]


def test_expire_never_keeps_everything():
    factory, drop, uids = expire_server(None)
    client = connect(factory)
    client.send(b"USER alice\r\nPASS pw\r\nRETR 1\r\nQUIT\r\n")
    assert list(drop.messages) == list(uids)


# -- UTF8 and LANG (RFC 6856) ------------------------------------------------------------


def test_utf8_command_and_utf8_user_names(server):
    factory, _ = server
    client = connect(factory)
    assert reply(client, b"UTF8") == [b"+OK UTF-8 mode enabled"]
    assert client.protocol.utf8
    client.send("USER j\u00fcrgen\r\n".encode())
    client.output()
    assert reply(client, "PASS gr\u00fc\u00df".encode())[0].startswith(b"+OK Logged in")
    assert reply(client, b"UTF8") == [b"-ERR UTF8 is not valid in this state"]


def test_eight_bit_headers_are_served_as_stored(server):
    factory, store = server
    message = "Subject: Gr\u00fc\u00dfe\r\nFrom: j\u00fcrgen@example.org\r\n\r\nhi\r\n".encode()
    store.maildrop("j\u00fcrgen").deliver(message)
    client = connect(factory)
    client.send("UTF8\r\nUSER j\u00fcrgen\r\nPASS gr\u00fc\u00df\r\n".encode())
    client.output()
    client.send(b"RETR 1\r\n")
    assert client.output() == b"+OK %d octets\r\n" % len(message) + message + b".\r\n"


def test_lang_lists_and_switches(server):
    factory, _ = server
    client = connect(factory)
    assert reply(client, b"LANG") == [
        b"+OK Language listing follows",
        b"en English",
        "ru \u0420\u0443\u0441\u0441\u043a\u0438\u0439".encode(),
        b".",
    ]
    assert reply(client, b"LANG ru") == [
        "+OK ru \u042f\u0437\u044b\u043a \u0438\u0437\u043c\u0435\u043d\u0451\u043d".encode()
    ]
    assert reply(client, b"XYZZY") == [
        "-ERR \u041d\u0435\u0438\u0437\u0432\u0435\u0441\u0442"
        "\u043d\u0430\u044f \u043a\u043e\u043c\u0430\u043d\u0434"
        "\u0430".encode()
    ]
    client.send(b"USER alice\r\n")
    client.output()
    lines = reply(client, b"PASS wonderland")
    # counts stay digits; words take Russian plural forms
    assert lines[0].decode().startswith("+OK \u0412\u0445\u043e\u0434")
    assert "2 \u0441\u043e\u043e\u0431\u0449\u0435\u043d\u0438\u044f" in lines[0].decode()
    assert reply(client, b"STAT") == [b"+OK 2 38"]
    assert reply(client, b"LANG *") == [b"+OK en Language changed"]
    assert reply(client, b"LANG ru-RU")[0].startswith(b"+OK ru ")
    assert reply(client, b"LANG tlh") == [
        "-ERR \u041d\u0435\u0438\u0437\u0432\u0435\u0441\u0442\u043d\u044b\u0439 "
        "\u044f\u0437\u044b\u043a".encode()
    ]


def test_response_codes_survive_translation(server):
    factory, _ = server
    client = connect(factory)
    reply(client, b"LANG ru")
    client.send(b"USER alice\r\n")
    client.output()
    assert reply(client, b"PASS nope")[0].startswith(b"-ERR [AUTH] ")


def test_apop_timestamp_only_when_some_account_can_use_it(tmp_path, monkeypatch):
    """
    APOP needs a shared secret: with only hashed passwords, no timestamp is
    offered. The greeting follows a changed passwd-file within a second.
    """
    now = [1000.0]
    monkeypatch.setattr(passwdfile, "time", SimpleNamespace(monotonic=lambda: now[0]))
    path = tmp_path / "passwd"
    path.write_text("alice:{SHA512-CRYPT}$6$rounds=1000$salt$x\n")
    checker = PasswdFileChecker(path, runInThread=synchronously)
    factory = POP3Factory(Portal(MailboxRealm(MemoryStore()), [checker]), Clock())
    assert b"<" not in connect(factory).greeting
    path.write_text("alice:{SHA512-CRYPT}$6$rounds=1000$salt$x\nbob:{PLAIN}pw\n")
    import os

    os.utime(path, ns=(0, 10**9))  # a visibly changed file
    now[0] += checker.recheck / 2
    assert b"<" not in connect(factory).greeting  # the last check still stands
    now[0] += checker.recheck / 2
    assert b"<" in connect(factory).greeting


@implementer(ICredentialsChecker)
class CaseFoldingChecker:
    """An auth source that names its users in lower case, whatever the client typed."""

    credentialInterfaces = (IUsernamePassword,)

    def requestAvatarId(self, credentials):
        if credentials.password != b"pw":
            return fail(UnauthorizedLogin())
        return succeed(credentials.username.lower())


def test_login_delay_and_session_go_by_the_auth_sources_name():
    """
    A source that names the user canonically (ALICE -> alice): the lock, the
    delay check and the login record all use its name, so typing the name
    another way does not escape LOGIN-DELAY.
    """
    clock = Clock()
    clock.advance(1_000_000)
    policy = SessionPolicy(clock, UserSettings(loginDelay=60))
    factory, store = memoryServer({}, policy=policy, clock=clock, checker=CaseFoldingChecker())
    client = connect(factory)
    client.send(b"USER ALICE\r\nPASS pw\r\n")
    assert client.lines()[-1].startswith(b"+OK Logged in")
    assert client.protocol.user == "alice" and store.maildrop("alice").locked
    client.send(b"QUIT\r\n")
    client = connect(factory)
    client.send(b"USER alice\r\n")
    client.output()
    assert reply(client, b"PASS pw")[0].startswith(b"-ERR [LOGIN-DELAY]")
