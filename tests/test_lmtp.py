"""
The LMTP server driven through StringTransport and a Clock, over real stores
(memory, Maildir) and a real passwd-file; and the DATA decoder.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import IUsernameHashedPassword
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from popserv.auth.passwdfile import PasswdFileChecker
from popserv.auth.realm import MailboxRealm
from popserv.backends.maildir import MaildirStore
from popserv.backends.memory import MemoryStore
from popserv.config import ConfigError
from popserv.limits import TrustedNetworks
from popserv.lmtp import Deliverer, LMTPFactory
from popserv.lmtp.data import DataDecoder
from popserv.service import makeService

PASSWD = (
    "alice@example.org:{PLAIN}x\n"
    "bob@example.org:{PLAIN}x::::::quota_bytes=100 quota_messages=2\n"
    "carol:{PLAIN}x\n"
)


class Queued:
    """Runs blocking calls only when told: a slow store's thread pool, in order."""

    def __init__(self) -> None:
        self.calls: list = []

    def __call__(self, f, *args):
        waiting: Deferred = Deferred()
        self.calls.append((f, args, waiting))
        return waiting

    def runAll(self) -> None:
        while self.calls:
            f, args, waiting = self.calls.pop(0)
            maybeDeferred(f, *args).chainDeferred(waiting)


@pytest.fixture
def passwd(tmp_path: Path) -> PasswdFileChecker:
    path = tmp_path / "passwd"
    path.write_text(PASSWD)
    return PasswdFileChecker(path)


def connect(store, checker=None, **options):
    clock = Clock()
    factory = LMTPFactory(
        Deliverer(store, checker, "mx.test"), clock, hostname="mx.test", **options
    )
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport, clock


def said(transport: StringTransport) -> list[str]:
    lines = transport.value().decode().split("\r\n")
    transport.clear()
    return [line for line in lines if line]


def send(proto, transport, data: bytes) -> list[str]:
    proto.dataReceived(data)
    return said(transport)


def test_greeting_and_lhlo(passwd):
    proto, t, _ = connect(MemoryStore(), passwd, maxSize=5000)
    assert said(t) == ["220 mx.test LMTP popserv ready"]
    assert send(proto, t, b"LHLO client.test\r\n") == [
        "250-mx.test",
        "250-PIPELINING",
        "250-ENHANCEDSTATUSCODES",
        "250-8BITMIME",
        "250 SIZE 5000",
    ]


def test_pipelined_transaction_with_per_recipient_replies(passwd):
    store = MemoryStore()
    proto, t, _ = connect(store, passwd)
    said(t)
    replies = send(
        proto,
        t,
        b"LHLO c\r\nMAIL FROM:<s@x> BODY=8BITMIME SIZE=20\r\n"
        b"RCPT TO:<alice@example.org>\r\nRCPT TO:<nobody@example.org>\r\n"
        b"RCPT TO:<carol@mx.test>\r\nDATA\r\n",
    )
    assert replies[5:] == [
        "250 2.1.0 Sender OK",
        "250 2.1.5 Recipient OK",
        "550 5.1.1 No such user here",
        "250 2.1.5 Recipient OK",
        "354 Start mail input; end with <CRLF>.<CRLF>",
    ]
    replies = send(proto, t, b"Hi\r\n..dot\r\n.\r\nNOOP\r\n")
    assert replies == [
        "250 2.0.0 <alice@example.org> Saved",
        "250 2.0.0 <carol@mx.test> Saved",
        "250 2.0.0 OK",
    ]
    assert list(store.maildrop("alice@example.org").messages.values()) == [b"Hi\r\n.dot\r\n"]
    assert list(store.maildrop("carol").messages.values()) == [b"Hi\r\n.dot\r\n"]


def test_bad_sequences_and_syntax(passwd):
    proto, t, _ = connect(MemoryStore(), passwd)
    said(t)
    assert send(proto, t, b"MAIL FROM:<a@b>\r\n") == ["503 5.5.1 Bad sequence of commands"]
    assert send(proto, t, b"HELO x\r\n") == ["500 5.5.1 This is LMTP: say LHLO"]
    assert send(proto, t, b"LHLO\r\n") == ["501 5.5.2 Syntax error in parameters or arguments"]
    send(proto, t, b"LHLO c\r\n")
    assert send(proto, t, b"RCPT TO:<alice@example.org>\r\n")[0].startswith("503 5.5.1")
    assert send(proto, t, b"DATA\r\n")[0].startswith("503 5.5.1")
    assert send(proto, t, b"MAIL FROM:a@b\r\n")[0].startswith("501 5.5.2")
    assert send(proto, t, b"MAIL FROM:<a@b> FOO=1\r\n")[0].startswith("555 5.5.4")
    assert send(proto, t, b"BOGUS\r\n") == ["500 5.5.1 Command unrecognized"]
    assert send(proto, t, b"MAIL FROM:<>\r\n") == ["250 2.1.0 Sender OK"]
    assert send(proto, t, b"MAIL FROM:<>\r\n")[0].startswith("503 5.5.1")
    assert send(proto, t, b"DATA\r\n") == ["503 5.5.1 No valid recipients"]
    assert send(proto, t, b"RSET\r\nMAIL FROM:<>\r\n") == ["250 2.0.0 OK", "250 2.1.0 Sender OK"]
    assert send(proto, t, b"VRFY carol\r\nVRFY <x@y>\r\n") == [
        "250 2.1.5 <carol>",
        "550 5.1.1 No such user here",
    ]
    assert send(proto, t, b"QUIT\r\n") == ["221 2.0.0 mx.test closing"]
    assert t.disconnecting


def test_too_long_line_and_too_many_errors(passwd):
    proto, t, _ = connect(MemoryStore(), passwd, maxBadCommands=3)
    said(t)
    assert send(proto, t, b"X" * 3000) == ["500 5.5.2 Line too long"]
    assert t.disconnecting
    proto, t, _ = connect(MemoryStore(), passwd, maxBadCommands=3)
    said(t)
    assert send(proto, t, b"A\r\nB\r\nC\r\n")[-1] == "421 4.7.0 Too many errors, closing"
    assert t.disconnecting


def test_transactions_whose_recipients_were_all_refused_do_not_close(passwd):
    """
    A pipelining MTA on a kept LMTP connection sends DATA before it reads
    the 550s: the 503 to that DATA is no client error, and twenty such
    transactions (a spam run to unknown users) must not close the link.
    """
    proto, t, _ = connect(MemoryStore(), passwd, maxBadCommands=3)
    send(proto, t, b"LHLO mta\r\n")
    for _ in range(10):
        assert send(
            proto, t, b"MAIL FROM:<x@y>\r\nRCPT TO:<nobody@example.org>\r\nDATA\r\nRSET\r\n"
        ) == [
            "250 2.1.0 Sender OK",
            "550 5.1.1 No such user here",
            "503 5.5.1 No valid recipients",
            "250 2.0.0 OK",
        ]
    assert not t.disconnecting
    assert send(proto, t, b"A\r\nB\r\nC\r\n")[-1] == "421 4.7.0 Too many errors, closing"


def test_timeout(passwd):
    proto, t, clock = connect(MemoryStore(), passwd, timeout=30)
    said(t)
    clock.advance(31)
    assert said(t) == ["421 4.4.2 mx.test Timeout, closing"]
    assert t.disconnecting


def test_size_limit(passwd):
    store = MemoryStore()
    proto, t, _ = connect(store, passwd, maxSize=10)
    said(t)
    assert send(proto, t, b"LHLO c\r\nMAIL FROM:<> SIZE=11\r\n")[-1] == (
        "552 5.3.4 Message size exceeds fixed maximum message size"
    )
    send(proto, t, b"MAIL FROM:<>\r\nRCPT TO:<carol>\r\nDATA\r\n")
    assert send(proto, t, b"0123456789\r\nmore\r\n.\r\n") == [
        "552 5.3.4 Message size exceeds fixed maximum message size"
    ]
    assert store.maildrop("carol").messages == {}


def test_quotas(passwd):
    store = MemoryStore()
    proto, t, _ = connect(store, passwd)
    said(t)
    send(proto, t, b"LHLO c\r\n")
    # Larger than the whole quota, declared or not: 552 5.2.2.
    assert send(proto, t, b"MAIL FROM:<> SIZE=101\r\nRCPT TO:<bob@example.org>\r\n") == [
        "250 2.1.0 Sender OK",
        "552 5.2.2 Message is larger than the mailbox quota",
    ]
    send(proto, t, b"RSET\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
    assert send(proto, t, b"x" * 120 + b"\r\n.\r\n") == [
        "552 5.2.2 Message is larger than the mailbox quota"
    ]
    # Two messages fill the maildrop (quota_messages=2), then 452 4.2.2.
    for _ in range(2):
        send(proto, t, b"MAIL FROM:<>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
        assert send(proto, t, b"small\r\n.\r\n") == ["250 2.0.0 <bob@example.org> Saved"]
    assert send(proto, t, b"MAIL FROM:<>\r\nRCPT TO:<bob@example.org>\r\n")[-1] == (
        "452 4.2.2 Mailbox full, try again later"
    )
    assert store.usage("bob@example.org") == (2, 14)


def test_quota_room_left(passwd):
    store = MemoryStore()
    store.maildrop("bob@example.org").deliver(b"y" * 70 + b"\r\n")
    proto, t, _ = connect(store, passwd)
    said(t)
    send(proto, t, b"LHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
    assert send(proto, t, b"z" * 40 + b"\r\n.\r\n") == ["452 4.2.2 Mailbox full, try again later"]


def test_maildir_store_down_gives_451(tmp_path, passwd):
    mail = tmp_path / "mail"
    (mail / "example.org").mkdir(parents=True)
    (mail / "example.org" / "alice").write_text("a file where the maildrop should be")
    store = MaildirStore(f"maildir:{mail}/%d/%n", runInThread=Queued())
    run = store.runInThread
    proto, t, _ = connect(store, passwd)
    said(t)
    send(proto, t, b"LHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    run.runAll()
    assert said(t) == ["354 Start mail input; end with <CRLF>.<CRLF>"]
    assert send(proto, t, b"hello\r\n.\r\n") == ["451 4.3.0 Temporary failure, try again later"]


def test_maildir_back_pressure_and_pipelining(tmp_path, passwd):
    """A slow store holds reading: later commands wait for the replies."""
    run = Queued()
    store = MaildirStore(f"maildir:{tmp_path}/mail/%d/%n", runInThread=run)
    proto, t, _ = connect(store, passwd)
    said(t)
    send(proto, t, b"LHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    run.runAll()
    assert said(t)[-1].startswith("354")
    proto.dataReceived(b"line one\r\n")
    assert t.producerState == "paused"  # the write is not done yet
    proto.dataReceived(b"..two\r\n.\r\nNOOP\r\n")
    assert said(t) == []
    while run.calls:
        run.runAll()
    assert said(t) == ["250 2.0.0 <alice@example.org> Saved", "250 2.0.0 OK"]
    [name] = os.listdir(tmp_path / "mail/example.org/alice/new")
    assert ",S=16,W=16" in name
    assert (tmp_path / "mail/example.org/alice/new" / name).read_bytes() == b"line one\r\n.two\r\n"
    assert os.listdir(tmp_path / "mail/example.org/alice/tmp") == []


def test_maildir_usage_from_listing(tmp_path):
    store = MaildirStore(f"maildir:{tmp_path}/%u", runInThread=lambda f, *a: maybeDeferred(f, *a))
    result = []
    store.usage("nobody").addCallback(result.append)
    writer = store.deliverMessage("dave").result
    writer.write(b"abc\ndef\n")
    writer.commit()
    store.usage("dave").addCallback(result.append)
    assert result == [(0, 0), (1, 10)]
    assert not isinstance(result[-1], Deferred)


def test_connection_lost_mid_data_aborts(tmp_path, passwd):
    store = MaildirStore(f"maildir:{tmp_path}/mail/%d/%n", runInThread=Queued())
    run = store.runInThread
    proto, t, _ = connect(store, passwd)
    said(t)
    send(proto, t, b"LHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    run.runAll()
    proto.dataReceived(b"partial\r\n")
    proto.connectionLost(None)
    while run.calls:
        run.runAll()
    assert os.listdir(tmp_path / "mail/example.org/alice/tmp") == []
    assert os.listdir(tmp_path / "mail/example.org/alice/new") == []


def _reference(stuffed: bytes) -> tuple[bytes, bytes]:
    lines = stuffed.split(b"\r\n")
    out = []
    for i, line in enumerate(lines):
        if line == b".":
            return b"".join(x + b"\r\n" for x in out), b"\r\n".join(lines[i + 1 :])
        out.append(line[1:] if line.startswith(b".") else line)
    raise AssertionError("no end")


@pytest.mark.parametrize("seed", range(200))
def test_data_decoder_any_chunking(seed):
    rng = random.Random(seed)
    pieces = [b"", b".", b"..", b"a", b"\r", b"\n", b"\r\n", b".x", b"x."]
    lines = [b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 4))) for _ in range(8)]
    lines = [line.replace(b"\r\n", b"") for line in lines]
    body = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    stuffed = body + b".\r\nNEXT"
    expected = _reference(stuffed)
    decoder = DataDecoder()
    got, rest = b"", None
    position = 0
    while rest is None:
        n = rng.randint(1, 7)
        chunk, rest = decoder.feed(stuffed[position : position + n])
        position += n
        got += chunk
    assert (got, rest + stuffed[position:]) == expected


def test_data_decoder_empty_message():
    assert DataDecoder().feed(b".\r\n") == (b"", b"")


def test_passwd_quota_fields():
    from popserv.auth.passwdfile import parsePasswdFile

    problems: list[str] = []
    users = parsePasswdFile(
        "a:{PLAIN}x::::::userdb_quota_bytes=5 quota_messages=0\nb:{PLAIN}x::::::quota_bytes=1k\n",
        problems=problems,
    )
    assert users["a"].settings == {"quotaBytes": 5, "quotaMessages": 0}
    assert "b" not in users and "quota_bytes must be a whole number" in problems[0]


def test_unlistable_source_lets_recipients_through():
    """A source that cannot tell whether a user exists does not refuse anyone."""
    from twisted.cred.checkers import AllowAnonymousAccess

    store = MemoryStore()
    proto, t, _ = connect(store, AllowAnonymousAccess())
    said(t)
    assert send(proto, t, b"LHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<anyone@x>\r\n")[-1] == (
        "250 2.1.5 Recipient OK"
    )


def test_untrusted_tcp_peer_refused_unix_peer_allowed(passwd):
    factory = LMTPFactory(
        Deliverer(MemoryStore(), passwd, "mx.test"),
        Clock(),
        hostname="mx.test",
        trusted=TrustedNetworks(["192.0.2.0/24"]),
    )

    def greeting(addr) -> tuple[str, bool]:
        proto = factory.buildProtocol(addr)
        transport = StringTransport()
        proto.makeConnection(transport)
        return transport.value().decode(), transport.disconnecting

    assert greeting(IPv4Address("TCP", "198.51.100.7", 4000)) == (
        "421 4.7.0 mx.test Not allowed to deliver here\r\n",
        True,
    )
    assert greeting(IPv4Address("TCP", "127.0.0.1", 4000))[0].startswith("421 ")
    assert greeting(IPv4Address("TCP", "192.0.2.9", 4000)) == (
        "220 mx.test LMTP popserv ready\r\n",
        False,
    )
    assert greeting(UNIXAddress("/run/lmtp"))[0].startswith("220 ")


def test_service_refuses_lmtp_without_one_checker(tmp_path, passwd):
    portal = Portal(MailboxRealm(MemoryStore()))
    with pytest.raises(ConfigError, match="exactly one checker"):
        makeService(portal=portal, listen=["tcp:0"], lmtp=["tcp:0"])
    portal.registerChecker(passwd)
    portal.registerChecker(InMemoryUsernamePasswordDatabaseDontUse(), IUsernameHashedPassword)
    with pytest.raises(ConfigError, match="it has 2"):
        makeService(portal=portal, listen=["tcp:0"], lmtp=["tcp:0"])


def test_maildir_usage_looks_at_the_disk_in_a_thread(tmp_path):
    """A missing maildrop is found missing in the store's thread, not on the reactor."""
    run = Queued()
    store = MaildirStore(f"maildir:{tmp_path}/%u", runInThread=run)
    result = []
    store.usage("nobody").addCallback(result.append)
    assert result == [] and len(run.calls) == 1
    run.runAll()
    assert result == [(0, 0)]
    assert not (tmp_path / "nobody").exists()


def test_passwd_knows_users_as_of_recheck(tmp_path):
    """RCPT's lookup may be recheck seconds late, sparing a stat per recipient."""
    path = tmp_path / "passwd"
    path.write_text(PASSWD)
    lazy = PasswdFileChecker(path, recheck=3600)
    eager = PasswdFileChecker(path, recheck=0)
    path.write_text(PASSWD + "dave@example.org:{PLAIN}x\n")
    assert lazy.knowsUser("dave@example.org") is False
    assert eager.knowsUser("dave@example.org") is True
