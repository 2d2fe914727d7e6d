"""
The protocol driven through StringTransport and a Clock: every byte in and out
is deterministic. RFC 1939 section numbers are cited where a test proves one.
"""

from __future__ import annotations

import re

import pytest
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface import implementer

from popserv.auth.realm import MailboxRealm
from popserv.autologout import AutologoutTimer
from popserv.backends.memory import MemoryMailbox, MemoryStore
from popserv.protocol import DEFAULT_TIMEOUT, MAX_BUFFERED_INPUT, POP3Factory, State
from popserv.testing import PlaintextChecker, connect, memoryServer

M1 = b"Subject: one\r\n\r\nfirst\r\n"
M2 = b"Subject: two\n\n.dot\nsecond\n"
M3 = b"Subject: three\r\n\r\nthird"


@pytest.fixture
def pop():
    factory, store = memoryServer({"alice": "secret", "bob": "pw"})
    drop = store.maildrop("alice")
    for m in (M1, M2, M3):
        drop.deliver(m)
    return factory, store


@implementer(ICredentialsChecker)
class SlowChecker:
    """A checker whose answers the test gives: each check waits in C{pending}."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self):
        self.pending: list[Deferred] = []

    def requestAvatarId(self, credentials):
        self.pending.append(Deferred())
        return self.pending[-1]


def login(factory, user=b"alice", password=b"secret"):
    client = connect(factory)
    client.send(b"USER " + user + b"\r\nPASS " + password + b"\r\n")
    assert client.lines()[-1].startswith(b"+OK"), "login failed"
    return client


def reply(client, line: bytes) -> list[bytes]:
    client.send(line + b"\r\n")
    return client.lines()


# -- greeting and AUTHORIZATION ----------------------------------------------


def test_greeting_has_a_fresh_apop_timestamp(pop):
    """RFC 1939 section 7: the timestamp differs on every connection."""
    factory, _ = pop
    stamps = {
        re.search(rb"<[^>]+@pop\.example>", connect(factory).greeting).group() for _ in range(20)
    }
    assert len(stamps) == 20


def test_no_timestamp_and_no_apop_when_disabled():
    factory, _ = memoryServer({"alice": "secret"}, apop=False)
    client = connect(factory)
    assert client.greeting.startswith(b"+OK") and b"<" not in client.greeting
    assert reply(client, b"APOP alice " + b"0" * 32)[0].startswith(b"-ERR")


def test_apop_is_offered_only_if_the_portal_checks_it():
    @implementer(ICredentialsChecker)
    class PasswordsOnly:
        credentialInterfaces = (IUsernamePassword,)

    factory = POP3Factory(Portal(MailboxRealm(MemoryStore()), [PasswordsOnly()]), Clock())
    assert b"<" not in connect(factory).greeting


def test_apop_login(pop):
    import hashlib

    factory, _ = pop
    client = connect(factory)
    stamp = re.search(rb"<[^>]+>", client.greeting).group()
    digest = hashlib.md5(stamp + b"secret").hexdigest().encode()
    assert reply(client, b"APOP alice " + digest)[0].startswith(b"+OK")
    assert client.protocol.state is State.TRANSACTION


def test_apop_with_another_connections_timestamp_fails(pop):
    import hashlib

    factory, _ = pop
    other = connect(factory)
    stamp = re.search(rb"<[^>]+>", other.greeting).group()
    client = connect(factory)
    digest = hashlib.md5(stamp + b"secret").hexdigest().encode()
    assert reply(client, b"APOP alice " + digest) == [b"-ERR [AUTH] Authentication failed"]


def test_user_pass_login_reports_maildrop(pop):
    factory, _ = pop
    client = connect(factory)
    assert reply(client, b"USER alice") == [b"+OK Send your password"]
    assert reply(client, b"PASS secret") == [b"+OK Logged in, 3 messages (78 octets)"]


def test_unknown_user_and_wrong_password_read_the_same(pop):
    factory, _ = pop
    a = connect(factory)
    b = connect(factory)
    a.send(b"USER alice\r\n")
    b.send(b"USER nobody\r\n")
    a.output(), b.output()
    assert (
        reply(a, b"PASS wrong")
        == reply(b, b"PASS secret")
        == [b"-ERR [AUTH] Authentication failed"]
    )
    assert a.protocol.state is State.AUTHORIZATION


def test_pass_without_user(pop):
    factory, _ = pop
    client = connect(factory)
    assert reply(client, b"PASS secret")[0].startswith(b"-ERR")
    # a failed PASS forgets the USER name too
    client.send(b"USER alice\r\nPASS wrong\r\n")
    client.output()
    assert reply(client, b"PASS secret")[0].startswith(b"-ERR")


def test_password_with_spaces(pop):
    factory, store = pop
    factory.portal.checkers[IUsernamePassword].users["carol"] = "a b  c"
    client = connect(factory)
    client.send(b"USER carol\r\n")
    assert reply(client, b"PASS a b  c")[-1].startswith(b"+OK")


def test_bad_user_arguments(pop):
    factory, _ = pop
    client = connect(factory)
    for line in (
        b"USER",
        b"USER ",
        b"USER \xff\xfe",
        b"USER a\x01b",
        b"APOP alice",
        b"APOP alice zz",
        b"PASS",
    ):
        assert reply(client, line)[0].startswith(b"-ERR"), line
    assert client.protocol.state is State.AUTHORIZATION


def test_transaction_commands_refused_before_login(pop):
    factory, _ = pop
    client = connect(factory)
    for verb in (b"STAT", b"LIST", b"RETR 1", b"DELE 1", b"UIDL", b"TOP 1 1", b"RSET", b"NOOP"):
        assert reply(client, verb) == [b"-ERR " + verb.split()[0] + b" is not valid in this state"]


def test_quit_in_authorization_closes_without_update(pop):
    factory, store = pop
    client = connect(factory)
    assert reply(client, b"QUIT")[0].startswith(b"+OK")
    assert client.transport.disconnecting
    assert len(store.maildrop("alice").messages) == 3


# -- TRANSACTION ---------------------------------------------------------------


def test_stat_list_uidl_formats(pop):
    """RFC 1939 section 5: '+OK nn mm', 'n size' lines, 'n uid' lines."""
    factory, _ = pop
    client = login(factory)
    assert reply(client, b"STAT") == [b"+OK 3 78"]
    assert reply(client, b"LIST") == [
        b"+OK 3 messages (78 octets)",
        b"1 23",
        b"2 30",
        b"3 25",
        b".",
    ]
    assert reply(client, b"LIST 2") == [b"+OK 2 30"]
    assert reply(client, b"UIDL") == [
        b"+OK Unique-ID listing follows",
        b"1 mem00000001",
        b"2 mem00000002",
        b"3 mem00000003",
        b".",
    ]
    assert reply(client, b"UIDL 3") == [b"+OK 3 mem00000003"]


def test_sizes_are_the_octets_retr_sends(pop):
    factory, _ = pop
    client = login(factory)
    for n in (1, 2, 3):
        (size,) = [int(x) for x in reply(client, b"LIST %d" % n)[0].split()[2:]]
        lines = reply(client, b"RETR %d" % n)
        assert lines[0] == b"+OK %d octets" % size
        body = [ln[1:] if ln.startswith(b".") else ln for ln in lines[1:-1]]
        assert len(b"".join(ln + b"\r\n" for ln in body)) == size


def test_retr_stuffs_and_terminates(pop):
    factory, _ = pop
    client = login(factory)
    client.send(b"RETR 2\r\n")
    assert client.output() == (b"+OK 30 octets\r\nSubject: two\r\n\r\n..dot\r\nsecond\r\n.\r\n")
    client.send(b"RETR 3\r\n")
    assert client.output() == b"+OK 25 octets\r\nSubject: three\r\n\r\nthird\r\n.\r\n"


def test_empty_message(pop):
    factory, store = pop
    store.maildrop("bob").deliver(b"")
    client = login(factory, b"bob", b"pw")
    assert reply(client, b"LIST 1") == [b"+OK 1 0"]
    client.send(b"RETR 1\r\n")
    assert client.output() == b"+OK 0 octets\r\n.\r\n"


def test_top(pop):
    factory, _ = pop
    client = login(factory)
    assert reply(client, b"TOP 2 0")[1:] == [b"Subject: two", b"", b"."]
    assert reply(client, b"TOP 2 1")[1:] == [b"Subject: two", b"", b"..dot", b"."]
    assert reply(client, b"TOP 2 100")[1:] == reply(client, b"RETR 2")[1:]


@pytest.mark.parametrize(
    "line",
    [
        b"RETR",
        b"RETR 0",
        b"RETR -1",
        b"RETR +1",
        b"RETR abc",
        b"RETR 4",
        b"RETR 1 2",
        b"RETR 99999999999999999999",
        b"RETR 1.0",
        b"RETR \xff",
        b"RETR 0x1",
        b"LIST 0",
        b"LIST 4",
        b"LIST 1 1",
        b"UIDL 0",
        b"UIDL x",
        b"DELE",
        b"DELE 4",
        b"TOP 1",
        b"TOP 1 -1",
        b"TOP 0 1",
        b"TOP 1 x",
        b"TOP",
        b"TOP 1 1 1",
        b"STAT 1",
        b"NOOP x",
        b"RSET 1",
        b"QUIT now",
    ],
)
def test_bad_arguments_are_err_and_session_continues(pop, line):
    """Message numbers: digits only, in range; anything else is -ERR, never a crash."""
    factory, _ = pop
    client = login(factory)
    lines = reply(client, line)
    assert len(lines) == 1 and lines[0].startswith(b"-ERR ")
    assert b"Error" not in lines[0] and b"Traceback" not in lines[0]
    assert reply(client, b"STAT") == [b"+OK 3 78"]


def test_commands_are_case_insensitive(pop):
    factory, _ = pop
    client = connect(factory)
    client.send(b"user alice\r\npAsS secret\r\n")
    client.output()
    assert reply(client, b"stat") == [b"+OK 3 78"]
    assert reply(client, b"list 1") == [b"+OK 1 23"]


def test_unknown_and_wrong_state_commands(pop):
    factory, _ = pop
    client = login(factory)
    assert reply(client, b"XYZZY") == [b"-ERR Unknown command"]
    assert reply(client, b"USER alice") == [b"-ERR USER is not valid in this state"]
    assert reply(client, b"") == [b"-ERR Unknown command"]
    assert client.protocol.state is State.TRANSACTION


def test_dele_marks_only_and_rset_unmarks(pop):
    """RFC 1939 section 5: DELE marks; the maildrop is untouched until UPDATE."""
    factory, store = pop
    client = login(factory)
    assert reply(client, b"DELE 1") == [b"+OK Message 1 deleted"]
    assert len(store.maildrop("alice").messages) == 3
    assert reply(client, b"DELE 1") == [b"-ERR Message is marked deleted"]
    assert reply(client, b"RETR 1") == [b"-ERR Message is marked deleted"]
    assert reply(client, b"STAT") == [b"+OK 2 55"]
    assert reply(client, b"LIST")[1:] == [b"2 30", b"3 25", b"."]
    assert reply(client, b"RSET") == [b"+OK Maildrop has 3 messages (78 octets)"]
    assert reply(client, b"STAT") == [b"+OK 3 78"]


def test_quit_removes_exactly_the_marked_messages(pop):
    """RFC 1939 section 6: UPDATE removes the marked messages, then +OK."""
    factory, store = pop
    client = login(factory)
    client.send(b"DELE 1\r\nDELE 3\r\n")
    client.output()
    assert reply(client, b"QUIT") == [b"+OK popserv 0.1.0 signing off (1 message left)"]
    assert list(store.maildrop("alice").messages.values()) == [M2]
    assert not store.maildrop("alice").locked
    assert client.transport.disconnecting


def test_dropped_connection_removes_nothing(pop):
    """RFC 1939 section 6: a session that ends without QUIT does not enter UPDATE."""
    factory, store = pop
    client = login(factory)
    client.send(b"DELE 1\r\nDELE 2\r\n")
    client.disconnect()
    assert len(store.maildrop("alice").messages) == 3
    assert not store.maildrop("alice").locked


def test_mail_delivered_during_session_waits_for_next_session(pop):
    """Messages are numbered as at login; new mail is neither shown nor removed."""
    factory, store = pop
    client = login(factory)
    new_uid = store.maildrop("alice").deliver(b"Subject: late\r\n\r\nnew\r\n")
    assert reply(client, b"STAT") == [b"+OK 3 78"]
    assert reply(client, b"RETR 4")[0].startswith(b"-ERR")
    client.send(b"DELE 1\r\nDELE 2\r\nDELE 3\r\nQUIT\r\n")
    assert list(store.maildrop("alice").messages) == [new_uid]
    client = login(factory)
    assert reply(client, b"UIDL") == [
        b"+OK Unique-ID listing follows",
        b"1 " + new_uid.encode(),
        b".",
    ]


def test_second_login_gets_in_use(pop):
    """The maildrop is locked for the session (RFC 1939 section 8, RFC 2449 [IN-USE])."""
    factory, _ = pop
    first = login(factory)
    second = connect(factory)
    second.send(b"USER alice\r\n")
    second.output()
    assert reply(second, b"PASS secret") == [b"-ERR [IN-USE] Mailbox is locked by another session"]
    assert second.protocol.state is State.AUTHORIZATION
    first.send(b"QUIT\r\n")
    second.send(b"USER alice\r\n")
    assert reply(second, b"PASS secret")[-1].startswith(b"+OK Logged in")


def test_capa_before_and_after_login(pop):
    """RFC 2449: CAPA in both states; USER only before login."""
    factory, _ = pop
    client = connect(factory)
    before = reply(client, b"CAPA")
    assert before[0].startswith(b"+OK") and before[-1] == b"."
    assert {b"TOP", b"UIDL", b"USER", b"PIPELINING", b"RESP-CODES"} <= set(before)
    assert any(c.startswith(b"IMPLEMENTATION ") for c in before)
    client.send(b"USER alice\r\nPASS secret\r\n")
    client.output()
    after = reply(client, b"CAPA")
    # the IANA registry announces these in both states; nothing drops out
    assert set(before) - {b"."} <= set(after) | {before[0]}


# -- framing, pipelining, limits ----------------------------------------------


def test_pipelined_commands_in_one_segment(pop):
    factory, _ = pop
    client = connect(factory)
    client.send(b"USER alice\r\nPASS secret\r\nSTAT\r\nLIST 1\r\nUIDL 2\r\nNOOP\r\nQUIT\r\n")
    assert client.lines() == [
        b"+OK Send your password",
        b"+OK Logged in, 3 messages (78 octets)",
        b"+OK 3 78",
        b"+OK 1 23",
        b"+OK 2 mem00000002",
        b"+OK",
        b"+OK popserv 0.1.0 signing off (3 messages left)",
    ]


def test_commands_split_byte_by_byte_and_bare_lf(pop):
    factory, _ = pop
    client = connect(factory)
    for byte in b"USER alice\nPASS secret\r\nSTAT\n":
        client.send(bytes([byte]))
    assert client.lines()[-1] == b"+OK 3 78"


def test_sessions_between_commands_hold_no_input_buffer(pop):
    """An idle session keeps no buffer of its own; a partial line gets one of its own."""
    factory, _ = pop
    alice, bob = login(factory), login(factory, b"bob", b"pw")
    assert alice.protocol._inbuf is bob.protocol._inbuf  # (the shared empty one)
    alice.send(b"ST")
    assert bytes(alice.protocol._inbuf) == b"ST" and not bob.protocol._inbuf
    assert reply(bob, b"NOOP") == [b"+OK"]
    alice.send(b"AT\r\n")
    assert alice.lines() == [b"+OK 3 78"]
    assert alice.protocol._inbuf is bob.protocol._inbuf and not bob.protocol._inbuf


def test_overlong_line_is_drained_and_answered(pop):
    """RFC 2449 section 4: 255 octets max; the rest is drained, the session goes on."""
    factory, _ = pop
    client = login(factory)
    # exactly 255 octets with CRLF: parsed (and refused for its argument, not its length)
    assert reply(client, b"NOOP " + b"x" * 248) == [b"-ERR NOOP takes no arguments"]
    assert reply(client, b"LIST " + b"1" * 248) == [b"-ERR Invalid message number"]
    assert reply(client, b"NOOP " + b"x" * 251) == [b"-ERR Command line too long"]
    # a huge line in pieces: one -ERR, no unbounded buffering
    for _ in range(100):
        client.send(b"y" * 10000)
        assert len(client.protocol._inbuf) <= 10000
    client.send(b"\r\nSTAT\r\n")
    assert client.lines() == [b"-ERR Command line too long", b"+OK 3 78"]


def test_async_login_holds_pipelined_commands_in_order():
    """PIPELINING: a STAT behind a PASS that is still being checked sees its result."""
    checker = SlowChecker()
    pending = checker.pending
    store = MemoryStore()
    store.maildrop("alice").deliver(M1)
    factory = POP3Factory(Portal(MailboxRealm(store), [checker]), Clock())
    client = connect(factory)
    client.send(b"USER alice\r\nPASS x\r\nSTAT\r\nNOOP\r\n")
    assert client.lines() == [b"+OK Send your password"]
    pending[0].callback("alice")
    assert client.lines() == [b"+OK Logged in, 1 message (23 octets)", b"+OK 1 23", b"+OK"]


def test_a_login_that_ends_after_the_autologout_opens_nothing():
    """
    The login timer said goodbye while the auth source was still answering:
    its late yes must not open and lock the maildrop, nor set the session's
    10-minute timer again (a client that does not read would hold the lock).
    """
    checker = SlowChecker()
    clock = Clock()
    factory = POP3Factory(Portal(MailboxRealm(MemoryStore()), [checker]), clock)
    client = connect(factory)
    client.send(b"USER alice\r\nPASS x\r\n")
    client.output()
    clock.advance(factory.loginTimeout + 1)
    assert client.lines() == [b"-ERR Disconnected for inactivity"]
    checker.pending[0].callback("alice")  # the source answers late
    assert client.protocol.state is State.AUTHORIZATION and client.protocol.transaction is None
    assert client.lines() == []
    assert client.protocol.deadline <= clock.seconds() + factory.abortGrace  # (cut soon)
    again = connect(factory)  # the maildrop is free
    again.send(b"USER alice\r\nPASS x\r\n")
    checker.pending[1].callback("alice")
    assert again.lines()[-1].startswith(b"+OK Logged in")


def test_async_mailbox_operations():
    """Every mailbox method may return a Deferred; answers still come in order."""
    gates: list[Deferred] = []

    def later(value):
        d = Deferred()
        gates.append((d, value))
        return d

    class AsyncMailbox(MemoryMailbox):
        def listMessages(self):
            return later(super().listMessages())

        def openMessage(self, info):
            return later(super().openMessage(info))

        def removeMessages(self, infos):
            return later(super().removeMessages(infos))

    class AsyncStore(MemoryStore):
        def openMailbox(self, user):
            drop = self.maildrop(user)
            drop.locked = True
            return later(AsyncMailbox(drop))

    store = AsyncStore()
    store.maildrop("alice").deliver(M1)
    factory, _ = memoryServer({"alice": "secret"}, store=store)
    client = connect(factory)
    client.send(b"USER alice\r\nPASS secret\r\nRETR 1\r\nDELE 1\r\nQUIT\r\n")
    while gates:
        d, value = gates.pop(0)
        d.callback(value)
    assert client.lines() == [
        b"+OK Send your password",
        b"+OK Logged in, 1 message (23 octets)",
        b"+OK 23 octets",
        b"Subject: one",
        b"",
        b"first",
        b".",
        b"+OK Message 1 deleted",
        b"+OK popserv 0.1.0 signing off (0 messages left)",
    ]
    assert store.maildrop("alice").messages == {}


def test_reading_stops_when_pipelined_input_piles_up():
    """Back-pressure on input: past the bound the socket is not read any more."""
    checker = SlowChecker()
    pending = checker.pending
    factory = POP3Factory(Portal(MailboxRealm(MemoryStore()), [checker]), Clock())
    client = connect(factory)
    client.send(b"USER alice\r\nPASS x\r\n")
    client.send(b"NOOP\r\n" * (MAX_BUFFERED_INPUT // 6 + 10))
    assert client.transport.producerState == "paused"
    pending[0].callback("alice")
    assert client.transport.producerState == "producing"
    assert client.lines()[-1] == b"+OK"


def test_too_many_bad_commands_disconnects():
    factory, _ = memoryServer({"alice": "secret"}, maxBadCommands=3)
    client = connect(factory)
    client.send(b"A\r\nB\r\nC\r\nD\r\n")
    assert client.lines() == [b"-ERR Unknown command"] * 3 + [
        b"-ERR Too many bad commands, closing connection"
    ]
    assert client.transport.disconnecting


def test_commands_after_quit_are_ignored(pop):
    factory, store = pop
    client = login(factory)
    client.send(b"DELE 1\r\nQUIT\r\nRSET\r\nDELE 2\r\n")
    assert client.lines()[-1].startswith(b"+OK popserv")
    assert len(store.maildrop("alice").messages) == 2


# -- timers ------------------------------------------------------------------------


def test_autologout_after_ten_minutes_without_update(pop):
    """RFC 1939 section 3: autologout >= 10 minutes; on expiry, no UPDATE."""
    factory, store = pop
    assert DEFAULT_TIMEOUT >= 600
    client = login(factory)
    client.send(b"DELE 1\r\n")
    client.output()
    factory.clock.advance(DEFAULT_TIMEOUT - 1)
    assert not client.transport.disconnecting
    client.send(b"NOOP\r\n")  # activity restarts the timer
    factory.clock.advance(DEFAULT_TIMEOUT - 1)
    assert not client.transport.disconnecting
    factory.clock.advance(1)
    assert client.lines()[-1] == b"-ERR Disconnected for inactivity"
    assert client.transport.disconnecting
    client.disconnect()
    assert len(store.maildrop("alice").messages) == 3
    assert not store.maildrop("alice").locked


def test_autologout_cuts_a_client_that_does_not_go(pop):
    """
    The goodbye is written and the connection closed; a client that reads
    nothing (or a TLS handshake never made) keeps it open, so after a grace
    period it is cut. A reply finished meanwhile is not sent after the goodbye.
    """
    factory, store = pop
    clock = factory.clock
    client = login(factory)
    factory.clock.advance(DEFAULT_TIMEOUT)
    assert client.lines() == [b"-ERR Disconnected for inactivity"]
    # (StringTransport.abortConnection sets "disconnected", loseConnection not.)
    assert client.transport.disconnecting and not client.transport.disconnected
    client.send(b"NOOP\r\n")  # too late: nothing runs after the autologout
    clock.advance(factory.abortGrace - 1)
    assert client.lines() == [] and not client.transport.disconnected
    clock.advance(1)
    assert client.transport.disconnected
    client.disconnect()
    assert clock.getDelayedCalls() == []
    assert not store.maildrop("alice").locked


def test_quit_cancels_autologout_during_update(pop):
    """A slow UPDATE is not interrupted by the autologout timer."""
    factory, store = pop
    client = login(factory)
    pending = []
    mailbox = client.protocol.transaction.mailbox
    mailbox.removeMessages = lambda infos: pending.append(Deferred()) or pending[-1]
    client.send(b"DELE 1\r\nQUIT\r\n")
    client.output()
    factory.clock.advance(DEFAULT_TIMEOUT * 2)
    assert not client.transport.disconnecting
    pending[0].callback([])
    assert client.lines()[-1].startswith(b"+OK") and client.transport.disconnecting


def test_no_timer_left_after_disconnect(pop):
    factory, _ = pop
    client = login(factory)
    client.disconnect()
    assert factory.clock.getDelayedCalls() == []


def test_each_session_is_logged_out_at_its_own_deadline(pop):
    """One factory timer serves every session; each still leaves on its own time."""
    factory, _ = pop
    clock = factory.clock
    early = login(factory)
    clock.advance(100)
    late = login(factory, b"bob", b"pw")
    clock.advance(100)
    early.send(b"NOOP\r\n")  # early's deadline is now 200 + DEFAULT_TIMEOUT
    assert len(clock.getDelayedCalls()) == 1  # not one timer per session
    clock.advance(DEFAULT_TIMEOUT - 100 - 1)  # t = 100 + DEFAULT_TIMEOUT - 1
    assert not late.transport.disconnecting and not early.transport.disconnecting
    clock.advance(1)
    assert late.transport.disconnecting and not early.transport.disconnecting
    clock.advance(99)
    assert not early.transport.disconnecting
    clock.advance(1)
    assert early.transport.disconnecting
    late.disconnect()
    early.disconnect()
    assert clock.getDelayedCalls() == []


def test_autologout_scans_at_most_once_a_second_however_many_sessions():
    """
    Sessions whose deadlines fall at many different moments must not cost a
    scan of all sessions each: one scan a second at most, and each session
    still out within a second of its deadline, never before it.
    """
    clock = Clock()

    class Session:
        def __init__(self, deadline):
            self.deadline = self.due = deadline
            self.endedAt = None

        def timeoutConnection(self):
            self.endedAt = clock.seconds()

    sessions = [Session(10 + i * 0.01) for i in range(1000)]  # deadlines 10 s .. 20 s
    scans = 0

    def listed():
        nonlocal scans
        scans += 1
        return sessions

    timer = AutologoutTimer(clock, listed, minInterval=1.0)
    timer.wake(min(s.deadline for s in sessions))
    sessions[500].deadline = sessions[500].due = 30.0  # active meanwhile: later
    for _ in range(3000):
        clock.advance(0.01)
    # A second late at most, plus the 10 ms steps of the clock.
    late = [(s.due, s.endedAt) for s in sessions if not s.due <= s.endedAt <= s.due + 1.02]
    assert late == []
    assert scans <= 12
    assert clock.getDelayedCalls() == []


# -- failures ------------------------------------------------------------------


def test_backend_bug_is_logged_not_leaked(pop):
    factory, store = pop

    class Broken(MemoryMailbox):
        def openMessage(self, info):
            raise ZeroDivisionError("secret internals")

    client = login(factory)
    client.protocol.transaction.mailbox.__class__ = Broken
    lines = reply(client, b"RETR 1")
    assert lines == [b"-ERR [SYS/TEMP] Internal server error"]
    assert reply(client, b"STAT") == [b"+OK 3 78"]


def test_storage_error_maps_to_response_codes(pop):
    factory, _ = pop

    class Denied(MemoryMailbox):
        def openMessage(self, info):
            raise PermissionError(13, "Permission denied")

    client = login(factory)
    client.protocol.transaction.mailbox.__class__ = Denied
    assert reply(client, b"RETR 1") == [b"-ERR [SYS/PERM] Permanent server failure"]


def test_storage_failure_mid_stream_cuts_the_connection(pop):
    """After +OK a -ERR would be read as content: the response is never terminated."""
    factory, _ = pop

    class FailingReader:
        transferForm = False

        def __init__(self):
            self.calls = 0

        def read(self, size):
            self.calls += 1
            if self.calls > 1:
                raise OSError(5, "Input/output error")
            return b"partial\r\n"

        def close(self):
            pass

    class Failing(MemoryMailbox):
        def openMessage(self, info):
            return FailingReader()

    client = login(factory)
    client.protocol.transaction.mailbox.__class__ = Failing
    client.send(b"RETR 1\r\nSTAT\r\n")
    out = client.output()
    assert out.startswith(b"+OK") and not out.endswith(b".\r\n")
    assert b"+OK 3" not in out
    assert client.transport.disconnecting


def test_logout_runs_exactly_once(pop):
    factory, store = pop
    closes = []
    original = MemoryMailbox.close

    def counting(self):
        closes.append(1)
        original(self)

    MemoryMailbox.close = counting
    try:
        client = login(factory)
        client.send(b"QUIT\r\n")
        client.disconnect()
    finally:
        MemoryMailbox.close = original
    assert closes == [1]


def test_disconnect_during_login_releases_the_lock():
    checker = SlowChecker()
    pending = checker.pending
    store = MemoryStore()
    factory = POP3Factory(Portal(MailboxRealm(store), [checker]), Clock())
    client = connect(factory)
    client.send(b"USER alice\r\nPASS x\r\n")
    client.disconnect()
    pending[0].callback("alice")
    assert not store.maildrop("alice").locked


def test_plaintext_checker_helper_rejects_bad_password():
    checker = PlaintextChecker({"a": "b"})
    from popserv.auth.credentials import UsernamePassword

    assert checker.requestAvatarId(UsernamePassword("a", b"b")).result == "a"
    d = checker.requestAvatarId(UsernamePassword("a", b"c"))
    failures = []
    d.addErrback(failures.append)
    assert failures
