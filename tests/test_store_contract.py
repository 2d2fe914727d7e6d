"""
The store contract's deliveries and maildrop listing (IMailStore.deliverMessage,
IMessageWriter, IMailStore.listMaildrops), for every store popserv ships;
and the Maildir names that keep a given UIDL.
"""

from __future__ import annotations

import os
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from zope.interface.verify import verifyObject

from popserv.backends.maildir import MaildirStore, names
from popserv.backends.memory import MemoryStore
from popserv.errors import InvalidUserName, PermanentFailure
from popserv.interfaces import (
    IMailStore,
    IMessageWriter,
    InvalidUID,
    UIDConflict,
    validUID,
)
from popserv.octets import TransferDecoder, crlfSize
from popserv.threads import synchronously


def result(value):
    """A plain value, or the result of an already-fired Deferred (raising its failure)."""
    if not isinstance(value, Deferred):
        return value
    out = []
    value.addBoth(out.append)
    assert out, "Deferred has not fired"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def crlf(message: bytes) -> bytes:
    """C{message} with CRLF line endings and a final one: how a store in transfer form gives it."""
    out = re.sub(rb"(?<!\r)\n", b"\r\n", message)
    return out + b"\r\n" if out and not out.endswith(b"\n") else out


class Maildir:
    #: The message as read back: as delivered.
    given = staticmethod(bytes)

    def __init__(self, root):
        self.root = root
        self.store = MaildirStore(f"maildir:{root}/%d/%n/Maildir", runInThread=synchronously)

    def leftovers(self, user="alice"):
        """Files in tmp/ (a delivery's traces)."""
        return os.listdir(os.path.join(self.store.location.expand(user), "tmp"))


class Memory:
    given = staticmethod(bytes)

    def __init__(self, root):
        self.store = MemoryStore()

    def leftovers(self, user="alice"):
        return []


@pytest.fixture(params=[Maildir, Memory], ids=["maildir", "memory"])
def kind(request, tmp_path):
    return request.param(tmp_path)


def listing(store, user="alice"):
    mailbox = result(store.openMailbox(user))
    try:
        return list(result(mailbox.listMessages()))
    finally:
        result(mailbox.close())


def read(store, info, user="alice"):
    """The message read back (from transfer form decoded: CRLF line endings)."""
    mailbox = result(store.openMailbox(user))
    try:
        reader = result(mailbox.openMessage(info))
        decode = TransferDecoder().feed if reader.transferForm else bytes
        data = b""
        while chunk := result(reader.read(65536)):
            data += decode(chunk)
        reader.close()
        return data
    finally:
        result(mailbox.close())


def deliver(store, chunks, user="alice", **kw):
    writer = result(store.deliverMessage(user, **kw))
    for chunk in chunks:
        result(writer.write(chunk))
    return result(writer.commit())


def test_every_provider_verifies(kind):
    assert verifyObject(IMailStore, kind.store)
    writer = result(kind.store.deliverMessage("alice"))
    assert verifyObject(IMessageWriter, writer)
    result(writer.abort())


def test_delivery_streams_and_is_visible_only_at_commit(kind):
    store = kind.store
    chunks = [b"Subject: big\n\n", *([b"line\n" * 1000] * 50), b"end"]
    message = b"".join(chunks)
    writer = result(store.deliverMessage("alice"))
    for chunk in chunks:
        result(writer.write(chunk))
        assert listing(store) == []  # nothing before commit
    uid = result(writer.commit())
    (info,) = listing(store)
    assert info.uid == uid and validUID(uid)
    assert info.size == crlfSize(message)
    assert read(store, info) == kind.given(message)
    assert kind.leftovers() == []


def test_abort_leaves_nothing(kind):
    writer = result(kind.store.deliverMessage("alice", uid="kept"))
    result(writer.write(b"Subject: x\n\nnever\n"))
    result(writer.abort())
    assert listing(kind.store) == []
    assert kind.leftovers() == []
    assert deliver(kind.store, [b"x\n"], uid="kept") == "kept"  # the UIDL was not taken


@pytest.mark.parametrize("uid", ["plain", "a/b:c,d%e", "%s%c%m%%", ",U=x", "~" * 70, "!"])
def test_given_uid_and_received_are_kept_and_listed_next_session(kind, uid):
    received = 1_600_000_000
    assert deliver(kind.store, [b"old\n"], uid=uid, received=received) == uid
    deliver(kind.store, [b"new\n"])
    first, second = listing(kind.store)
    assert (first.uid, first.received, first.size) == (uid, received, 5)
    assert second.uid != uid and second.received > received


def test_duplicate_uid_is_refused_and_leaves_nothing(kind):
    deliver(kind.store, [b"one\n"], uid="same")
    writer = result(kind.store.deliverMessage("alice", uid="same"))
    result(writer.write(b"two\n"))
    with pytest.raises(UIDConflict, match="same"):
        result(writer.commit())
    assert [i.uid for i in listing(kind.store)] == ["same"]
    assert kind.leftovers() == []


def test_uid_of_an_earlier_ordinary_delivery_is_refused(kind):
    uid = deliver(kind.store, [b"one\n"])
    writer = result(kind.store.deliverMessage("alice", uid=uid))
    with pytest.raises(UIDConflict):
        result(writer.commit())


@pytest.mark.parametrize("uid", ["", "has space", "x" * 71, "caf\u00e9", "tab\t"])
def test_invalid_uid_is_refused(kind, uid):
    with pytest.raises(InvalidUID):
        result(kind.store.deliverMessage("alice", uid=uid))


def test_delivery_while_a_session_holds_the_maildrop(kind):
    """Delivery takes no lock; the session sees the message at its next login."""
    deliver(kind.store, [b"first\n"])
    mailbox = result(kind.store.openMailbox("alice"))
    before = list(result(mailbox.listMessages()))
    deliver(kind.store, [b"second\n"])
    result(mailbox.close())
    assert len(before) == 1 and len(listing(kind.store)) == 2


def test_list_maildrops_of_memory():
    store = MemoryStore()
    deliver(store, [b"x\n"], user="bob")
    store.maildrop("alice@example.org")
    assert list(result(store.listMaildrops())) == ["alice@example.org", "bob"]


# -- Maildir specifics ---------------------------------------------------------------


def test_maildir_delivery_refuses_unsafe_names_and_missing_maildrops(tmp_path):
    store = MaildirStore(f"{tmp_path}/%n", runInThread=synchronously)
    with pytest.raises(InvalidUserName):
        result(store.deliverMessage("../x"))
    strict = MaildirStore(f"{tmp_path}/%n", runInThread=synchronously, createMissing=False)
    with pytest.raises(PermanentFailure):
        result(strict.deliverMessage("nobody"))
    assert not (tmp_path / "nobody").exists()


def test_maildir_delivery_is_named_with_its_sizes_and_time(tmp_path):
    store = MaildirStore(f"{tmp_path}/%n", runInThread=synchronously)
    message = b"a\nb\n"
    uid = deliver(store, [message], received=1_500_000_000.25, uid="x/y")
    (name,) = os.listdir(tmp_path / "alice" / "new")
    assert name.startswith("1500000000.M250000P") and name.endswith(",U=x%sy,S=4,W=6")
    assert names.uidFor(names.uniquePart(name)) == uid == "x/y"
    assert os.stat(tmp_path / "alice" / "new" / name).st_mtime == 1_500_000_000.25


def make(tmp_path, *relative):
    for path in relative:
        for sub in ("cur", "new", "tmp"):
            os.makedirs(tmp_path / path / sub, exist_ok=True)


def test_list_maildrops_over_a_domain_template(tmp_path):
    make(
        tmp_path,
        "example.org/alice/Maildir",
        "example.org/bob/Maildir",
        "example.net/alice/Maildir",
        "carol/Maildir",  # no domain: %d is empty
    )
    os.makedirs(tmp_path / "example.org" / "nomail" / "Maildir")  # no cur/: not a maildrop
    os.makedirs(tmp_path / "example.org" / "dave")  # no Maildir at all
    store = MaildirStore(f"maildir:{tmp_path}/%d/%n/Maildir", runInThread=synchronously)
    users = list(result(store.listMaildrops()))
    assert users == ["alice@example.net", "alice@example.org", "bob@example.org", "carol"]
    for user in users:  # each name opens the maildrop it was found for
        assert listing(store, user) == []


def test_list_maildrops_over_a_whole_name_template(tmp_path):
    make(tmp_path, "users/alice@example.org", "users/bob", "users/bob/.Trash")
    (tmp_path / "users" / "stray-file").write_text("x")
    store = MaildirStore(f"{tmp_path}/users/%u", runInThread=synchronously)
    assert list(result(store.listMaildrops())) == ["alice@example.org", "bob"]


def test_list_maildrops_with_a_variable_inside_a_name(tmp_path):
    make(tmp_path, "alice.mail", "bob.mail", "notes")
    store = MaildirStore(f"{tmp_path}/%n.mail", runInThread=synchronously)
    assert list(result(store.listMaildrops())) == ["alice", "bob"]


def test_list_maildrops_without_a_mail_root(tmp_path):
    store = MaildirStore(f"{tmp_path}/missing/%d/%n", runInThread=synchronously)
    assert list(result(store.listMaildrops())) == []


uids = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=70)


@settings(max_examples=500)
@given(uids, st.floats(0, 4e9), st.text(min_size=1, max_size=300), st.sampled_from(["", "RS"]))
def test_names_round_trip_any_valid_uidl(uid, when, host, flags):
    """
    Any RFC 1939 UIDL fits a Maildir name (no /, one :, under 255 bytes)
    and comes back from it, whatever the host and flags.
    """
    unique = names.formatUnique(when, 4_194_304, 10**9, host, uid)
    name = names.messageName(unique, 10**15 - 1, 10**15 - 1) + ":2," + flags
    assert "/" not in name and name.count(":") == 1
    assert len(name.encode("utf-8", "surrogateescape")) <= 255 - 26  # room for more flags
    assert names.uniquePart(name) == unique
    assert names.uidFor(names.uniquePart(name)) == uid
    assert names.LEADING_DIGITS.match(name).group() == str(int(when))


@settings(max_examples=300)
@given(uids.filter(lambda uid: ",U=" not in uid))
def test_names_without_a_uid_field_keep_their_uidl(unique):
    """Every unique part that was a UIDL before (no U= field) still is its own."""
    assert names.uidFor(unique) == unique


def test_ordinary_delivery_names_are_their_uidls(tmp_path):
    """As before: a name without U= is its own UIDL, ordered by its time."""
    unique = names.newUnique(time.time())
    assert names.uidFor(unique) == unique
    assert names.uidFor(names.uniquePart(names.messageName(unique, 1, 2))) == unique


def test_maildir_duplicate_check_reads_names_as_the_listing_does(tmp_path):
    """A digest UIDL (an odd name) is taken; a line feed in a name fools no search."""
    store = MaildirStore(f"{tmp_path}/%n", runInThread=synchronously)
    deliver(store, [b"x\n"])
    new = tmp_path / "alice" / "new"
    (new / "1.odd name").write_bytes(b"odd\n")
    (new / "2.X\nfoo").write_bytes(b"lf\n")
    taken = names.uidFor("1.odd name")
    writer = result(store.deliverMessage("alice", uid=taken))
    with pytest.raises(UIDConflict):
        result(writer.commit())
    assert deliver(store, [b"y\n"], uid="foo") == "foo"
    assert "foo" in [i.uid for i in listing(store)]


def test_concurrent_deliveries_of_one_uidl_store_it_once(tmp_path):
    """Two migrations delivering one UIDL at the same moment: one wins, one is refused."""
    import threading

    from popserv.backends.maildir.delivery import MaildirDelivery, makeMaildir
    from popserv.interfaces import UIDConflict

    maildir = str(tmp_path / "Maildir")
    makeMaildir(maildir)
    for attempt in range(20):
        uid = f"migrated-{attempt}"
        deliveries = [MaildirDelivery(maildir, uid) for _ in range(4)]
        for d in deliveries:
            d.write(b"Subject: same\r\n\r\nbody\r\n")
        start = threading.Barrier(len(deliveries))
        outcomes: list[object] = []

        def commit(d: MaildirDelivery, start=start, outcomes=outcomes) -> None:
            start.wait()
            try:
                outcomes.append(d.commit())
            except UIDConflict as e:
                outcomes.append(e)

        threads = [threading.Thread(target=commit, args=(d,)) for d in deliveries]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert outcomes.count(uid) == 1, outcomes
        assert sum(isinstance(o, UIDConflict) for o in outcomes) == 3
    assert len(os.listdir(os.path.join(maildir, "new"))) == 20
    assert os.listdir(os.path.join(maildir, "tmp")) == []
