"""The column-wise listing (popserv.listing) and the sessions that hold one."""

from __future__ import annotations

import pickle
import random

import pytest

from popserv.backends.maildir import MaildirStore
from popserv.backends.memory import MemoryMailbox, MemoryMaildrop
from popserv.interfaces import MessageInfo
from popserv.listing import EMPTY, SHARED_UIDS_MAX, Listing
from popserv.session import Transaction
from popserv.testing import connect, memoryServer
from popserv.threads import synchronously
from support import age_directories, deliver

INFOS = (
    MessageInfo("1000.A.h", 120, "new/1000.A.h", 1000),
    MessageInfo("1001.B.h", 5, "cur/1001.B.h,S=4:2,S", 1001),
    MessageInfo("~0123", 70_000_000_000, "new/1002.C,U=%c", 1002),
    MessageInfo("1003.D.h", 0, "", 1003),
)

#: The same with every UIDL within its key (Maildir names): stored once.
WITHIN = (
    *INFOS[:2],
    MessageInfo("1002.C", 70_000_000_000, "new/1002.C,S=9,W=10", 1002),
    MessageInfo("1003.D.h", 0, "new/1003.D.h", 1003),
)


@pytest.fixture(params=["joined", "within"])
def infos(request):
    return INFOS if request.param == "joined" else WITHIN


@pytest.fixture
def listing(infos):
    listing = Listing.of(infos)
    assert (listing._uids is None) == (infos is WITHIN)
    return listing


def test_equal_to_the_tuple_it_replaces(listing, infos):
    assert listing == infos
    assert infos == listing
    assert tuple(listing) == infos
    assert list(listing) == list(infos)
    assert hash(listing) == hash(infos)
    assert listing != infos[:3]
    assert listing != list(infos)  # as a tuple is not equal to a list
    assert Listing.of(infos) == listing
    assert len(listing) == 4
    assert all(type(info) is MessageInfo for info in listing)


def test_indexing_including_negative(listing, infos):
    for i in range(-4, 4):
        assert listing[i] == infos[i]
        assert type(listing[i].size) is int and type(listing[i].received) is int
    with pytest.raises(IndexError):
        listing[4]
    with pytest.raises(IndexError):
        listing[-5]
    assert listing.index(infos[2]) == 2
    assert infos[3] in listing
    assert list(reversed(listing)) == list(reversed(infos))


@pytest.mark.parametrize(
    "part", [slice(None), slice(1, 3), slice(2, None), slice(-3, -1), slice(None, None, 2),
             slice(None, None, -1), slice(3, 1), slice(10, 20)]
)  # fmt: skip
def test_slices_are_listings(listing, part, infos):
    sliced = listing[part]
    assert type(sliced) is Listing
    assert sliced == infos[part]
    assert sliced.totalSize == sum(info.size for info in infos[part])


def test_columns(listing, infos):
    assert listing.uids() == [info.uid for info in infos]
    assert listing.uids(1, 3) == ["1001.B.h", infos[2].uid]
    assert listing.uids(-1) == ["1003.D.h"]
    assert list(listing.sizes(2)) == [70_000_000_000, 0]
    assert listing.keys(-2) == [infos[2].key, infos[3].key]
    assert list(listing.received(0, 1)) == [1000]
    assert listing.uids(3, 1) == [] and listing.keys(4) == []


def test_total_is_precomputed(listing, infos):
    assert listing.totalSize == 70_000_000_125
    assert Listing.of([]).totalSize == 0


def test_empty_and_single():
    empty = Listing.of(())
    assert empty == () and len(empty) == 0 and list(empty) == [] and empty[:] == ()
    one = Listing.of(INFOS[3:])  # an empty key alone
    assert one == INFOS[3:] and one[0].key == "" and one.keys() == [""]


def test_concatenation(listing, infos):
    joined = listing[:2] + listing[2:]
    assert type(joined) is Listing and joined == infos
    assert joined.totalSize == listing.totalSize
    assert listing + () == infos
    assert listing[:1] + infos[1:] == infos  # a tuple of MessageInfo joins too
    assert Listing.of(()) + listing == infos


def test_select(listing, infos):
    assert listing.select([3, 0]) == (infos[3], infos[0])
    assert listing.select([]) == ()


def test_values_a_joined_column_cannot_hold():
    """Keys of any kind, UIDLs or keys with the separators, times that are not ints: kept as is."""
    odd = (
        MessageInfo("a\nb", 1, ("inode", 7), None),
        MessageInfo("c", 2, 42, 1.5),
        MessageInfo("d", 3, "x\0y", 3),
    )
    listing = Listing.of(odd)
    assert listing == odd and listing[1:] == odd[1:] and listing[-1] == odd[2]
    assert listing + Listing.of(INFOS) == odd + INFOS
    assert Listing.of([MessageInfo("u", 1, "k\0", 1)])[0].key == "k\0"


def test_pickles_and_is_immutable(listing, infos):
    assert pickle.loads(pickle.dumps(listing)) == listing
    with pytest.raises(AttributeError):
        listing.other = 1  # type: ignore[attr-defined]


def test_a_big_listing_keeps_its_uidls_joined():
    """Past SHARED_UIDS_MAX, UIDL splits one string: no UIDL is cut out of a key."""
    big = [MessageInfo(f"{n}.M.h", n, f"new/{n}.M.h", n) for n in range(SHARED_UIDS_MAX + 1)]
    listing = Listing.of(big)
    assert type(listing._uids) is str and listing == tuple(big)
    small = listing[:SHARED_UIDS_MAX]
    assert small._uids is None and small == tuple(big[:-1])
    assert small.uids(5, 7) == ["5.M.h", "6.M.h"] and small[-1].uid == f"{SHARED_UIDS_MAX - 1}.M.h"


def test_columns_of_unequal_length_are_refused():
    with pytest.raises(ValueError):
        Listing(["a"], [1, 2], ["k"], [1])


def test_a_transaction_over_a_listing_answers_as_over_the_tuple(listing, infos):
    """LIST, UIDL and STAT from the columns: the same bytes as from the tuple."""
    for messages in (listing, infos):
        transaction = Transaction(None, messages)  # type: ignore[arg-type]
        assert transaction._messages is messages  # kept, not copied
        assert transaction.stat() == (4, 70_000_000_125)
        transaction.delete(2)
        assert transaction.stat() == (3, 70_000_000_120)
        for batch in (1, 3, 4096):
            assert b"".join(transaction.listingChunks(True, batch)) == (
                b"1 120\r\n3 70000000000\r\n4 0\r\n"
            )
            assert b"".join(transaction.listingChunks(False, batch)) == (
                b"1 1000.A.h\r\n3 %s\r\n4 1003.D.h\r\n" % infos[2].uid.encode()
            )
        assert transaction.marked == [infos[1]]
        assert transaction.removals(receivedBefore=1001) == [infos[0], infos[1]]


def test_a_maildir_login_holds_a_listing(tmp_path):
    """The Maildir store lists into a Listing, and the session keeps that very one."""
    box = tmp_path / "alice" / "Maildir"
    for n in range(3):
        deliver(box, b"Subject: %d\n\nbody\n" % n, name=f"{1000 + n}.M{n}.h")
    age_directories(box, 100)
    store = MaildirStore(f"{tmp_path}/%n/Maildir", runInThread=synchronously)
    factory, _ = memoryServer({"alice": "pw"}, store=store)
    client = connect(factory)
    client.send(b"USER alice\r\nPASS pw\r\nUIDL\r\n")
    assert client.lines() == [
        b"+OK Send your password",
        b"+OK Logged in, 3 messages (60 octets)",
        b"+OK Unique-ID listing follows",
        b"1 1000.M0.h",
        b"2 1001.M1.h",
        b"3 1002.M2.h",
        b".",
    ]
    messages = client.protocol.transaction._messages
    assert type(messages) is Listing
    assert messages is store.peekCache(str(box)).listing[1]  # shared with the store's cache
    assert messages.keys() == ["new/1000.M0.h", "new/1001.M1.h", "new/1002.M2.h"]
    assert messages._uids is None  # each UIDL is in its name: stored once


def test_other_stores_may_give_sequences_of_message_infos():
    mailbox = MemoryMailbox(MemoryMaildrop([b"Subject: x\r\n\r\nx\r\n"]))
    transaction = Transaction(mailbox, mailbox.listMessages())  # a list
    assert type(transaction._messages) is tuple and transaction.stat() == (1, 17)


def test_empty_maildrops_share_one_empty_listing(tmp_path):
    """An idle session on an empty maildrop holds no listing of its own."""
    store = MaildirStore(f"{tmp_path}/%n/Maildir", runInThread=synchronously)
    box = tmp_path / "alice" / "Maildir"
    deliver(box, b"a\n", name="1000.A.h")

    age_directories(box, 100)
    first = store.openMailbox("alice").result
    assert len(first.listMessages().result) == 1
    assert store.peekCache(str(box)).listing is not None
    (box / "new" / "1000.A.h").unlink()
    age_directories(box, 50)
    assert first.listMessages().result is EMPTY  # relisted: nothing kept
    first.close()
    store.forget(str(box))
    assert store.openMailbox("alice").result.listMessages().result is EMPTY  # from scratch


@pytest.mark.parametrize("seed", range(4))
def test_big_listings_select_and_concatenate_by_cutting_their_columns(seed):
    """Relisting a big maildrop: the kept runs and the new mail, cut and joined whole."""
    rng = random.Random(seed)
    n = 3 * SHARED_UIDS_MAX
    infos = [
        MessageInfo(f"{i}.M{i}.h", rng.randrange(10**9), f"{rng.choice('cn')}/{i}.M{i}.h:2,", i)
        for i in range(n)
    ]
    listing = Listing.of(infos)
    assert type(listing._uids) is str
    kept = sorted(rng.sample(range(n), rng.choice([SHARED_UIDS_MAX + 1, n - 7, n - 1, n])))
    selected = listing.select(kept)
    assert selected == tuple(infos[i] for i in kept)
    assert selected.totalSize == sum(infos[i].size for i in kept)
    new = [MessageInfo(f"~{i}", i, f"new/{i}", n + i) for i in range(rng.randrange(1, 5))]
    joined = selected + Listing.of(new)
    assert joined == tuple(infos[i] for i in kept) + tuple(new)
    assert joined.uids(-len(new)) == [info.uid for info in new]
    assert joined[len(kept) - 1] == infos[kept[-1]]
    assert joined.totalSize == selected.totalSize + sum(info.size for info in new)
    unordered = listing.select(reversed(kept))  # not ascending: made the general way
    assert unordered == tuple(infos[i] for i in reversed(kept))
    before = Listing.of(new) + selected  # a small listing's 4-byte column spliced first
    assert before == tuple(new) + tuple(infos[i] for i in kept)
    assert before.totalSize == joined.totalSize


@pytest.mark.parametrize(
    "big", [None, "size", "time"], ids=["small values", "a 5 GiB size", "a time after 2038"]
)
def test_a_small_listing_keeps_its_integers_in_4_bytes_when_they_fit(big):
    """Half the memory of an idle session's listing; a value that needs 8 bytes gets them."""
    infos = [
        MessageInfo(f"{i}.M{i}.h", 1000 + i, f"cur/{i}.M{i}.h:2,", 1_700_000_000 + i)
        for i in range(3)
    ]
    if big == "size":
        infos[1] = infos[1]._replace(size=5 * 2**30)
    elif big == "time":
        infos[2] = infos[2]._replace(received=2**31 + 5)
    listing = Listing.of(infos)
    assert listing._ints.itemsize == (4 if big is None else 8)
    assert listing == tuple(infos)
    assert list(listing.sizes()) == [info.size for info in infos]
    assert listing.totalSize == sum(info.size for info in infos)
    assert pickle.loads(pickle.dumps(listing)) == listing


@pytest.mark.parametrize("n", [50, SHARED_UIDS_MAX + 1], ids=["small", "big"])
def test_of_columns_is_the_listing_of_the_same_messages(n):
    """A database's columns kept as they come: the same sequence, every operation alike."""
    from array import array

    infos = tuple(
        MessageInfo(f"P{i}", 100 + i * 7, 9000 + i, 1_700_000_000.25 + i) for i in range(n)
    )
    listing = Listing.ofColumns(
        [i.uid for i in infos],
        array("q", [i.size for i in infos]),
        array("q", [i.key for i in infos]),  # (ids: kept as an array)
        array("d", [i.received for i in infos]),
    )
    assert Listing.ofColumns(
        [i.uid for i in infos],
        array("q", [i.size for i in infos]),
        [str(i.key) for i in infos],
        array("d", [i.received for i in infos]),
    ) == tuple(i._replace(key=str(i.key)) for i in infos)
    assert listing == infos and tuple(listing) == infos and len(listing) == n
    # A small one (an idle session's) joins its UIDLs: no string object each.
    assert (type(listing._uids) is str) == (n <= SHARED_UIDS_MAX)
    assert listing.totalSize == sum(i.size for i in infos)
    assert listing[-1] == infos[-1] and listing[7] == infos[7]
    assert listing[3:9] == infos[3:9] and listing[::5] == infos[::5]
    assert listing.select([4, 2]) == (infos[4], infos[2])
    assert listing + listing == infos + infos
    assert listing.select(range(n - 1, -1, -1)) == infos[::-1]
    assert listing.uids() == [i.uid for i in infos] and listing.keys() == [i.key for i in infos]
    assert list(listing.uids(2, 4)) == ["P2", "P3"] and list(listing.sizes(0, 2)) == [100, 107]
    assert pickle.loads(pickle.dumps(listing)) == infos
    assert Listing.ofColumns([], array("q"), [], array("d")) is EMPTY
    with pytest.raises(ValueError):
        Listing.ofColumns(["P1"], array("q", [1, 2]), [1], array("d", [1.0]))
