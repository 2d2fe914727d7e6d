"""
The mbox store (popserv.backends.mbox): the format (separators, >From
quoting, exact sizes), UIDLs (X-UIDL rules, stable ids), the offset index,
locking as MTAs lock, delivery and UPDATE; and the store contract's tests
run against it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import test_store_contract as contract
from test_store_contract import deliver, listing, read, result

from popserv.backends.mbox import index as mboxindex
from popserv.backends.mbox.format import LineFilter, quoter, unquoter
from popserv.backends.mbox.index import indexPath, readIndex
from popserv.backends.mbox.lock import SpoolLock, SpoolLocked
from popserv.backends.mbox.store import MboxStore
from popserv.errors import PermanentFailure
from popserv.octets import crlfSize
from popserv.registry import storeKind
from popserv.testing import connect, memoryServer
from popserv.threads import synchronously

FROM = b"From MAILER-DAEMON  Sat Dec  5 08:41:02 2026\n"


class Mbox:
    def __init__(self, root):
        self.root = root
        self.store = MboxStore(f"mbox:{root}/%u", runInThread=synchronously)

    def leftovers(self, user="alice"):
        """Files beside the spool other than the spool, its index and the session locks."""
        expected = {user, f".{user}.popserv-index", ".popserv-locks.d"}
        return sorted(set(os.listdir(self.root)) - expected)


@pytest.fixture
def kind(tmp_path):
    return Mbox(tmp_path)


# The store contract, as the Maildir and memory stores pass it.
test_contract_verifies = contract.test_every_provider_verifies
test_contract_abort = contract.test_abort_leaves_nothing
test_contract_given_uid = contract.test_given_uid_and_received_are_kept_and_listed_next_session
test_contract_duplicate = contract.test_duplicate_uid_is_refused_and_leaves_nothing
test_contract_earlier = contract.test_uid_of_an_earlier_ordinary_delivery_is_refused
test_contract_invalid = contract.test_invalid_uid_is_refused
test_contract_beside_session = contract.test_delivery_while_a_session_holds_the_maildrop


def test_contract_streams(kind):
    """
    The contract's streaming test, but an mbox cannot end a message without a
    line feed (the next From line needs it): such a message comes back with
    one, which changes nothing on the wire (its size counts a final CRLF).
    """
    store = kind.store
    chunks = [b"Subject: big\n\n", *([b"line\n" * 1000] * 50), b"end"]
    message = b"".join(chunks)
    writer = result(store.deliverMessage("alice"))
    for chunk in chunks:
        result(writer.write(chunk))
        assert listing(store) == []
    uid = result(writer.commit())
    (info,) = listing(store)
    assert info.uid == uid and info.size == crlfSize(message)
    assert read(store, info) == message + b"\n"
    assert kind.leftovers() == []


def spool(tmp_path, *messages: bytes, name="alice", fmt="mboxo"):
    """A spool as Postfix writes it: From line, message, blank line."""
    path = tmp_path / name
    path.write_bytes(b"".join(FROM + m + b"\n" for m in messages))
    return MboxStore(f"mbox:{tmp_path}/%u", runInThread=synchronously, fmt=fmt), path


def contents(store, user="alice"):
    return [read(store, info, user) for info in listing(store, user)]


def test_messages_sizes_and_unquoting(tmp_path):
    """
    The blank line before each From belongs to no message; >From is served
    un-quoted (mboxo), sizes are the exact CRLF octets RETR sends.
    """
    one = b"Subject: one\n\nHello\n>From the start\n>>From kept\n"
    two = b"Subject: two\r\n\r\nCRLF body\r\n\n\nwith blank lines\n\n"
    three = b"Subject: three\n\nno final newline"
    store, path = spool(tmp_path, one, two, three)
    infos = listing(store)
    served = contents(store)
    assert served == [
        b"Subject: one\n\nHello\nFrom the start\n>>From kept\n",
        two,
        three + b"\n",  # the separator's line feed ends its last line
    ]
    assert [i.size for i in infos] == [crlfSize(m) for m in served]
    assert infos[0].received == time.mktime((2026, 12, 5, 8, 41, 2, 0, 0, -1))


def test_mboxrd_unquotes_one_level(tmp_path):
    store, _ = spool(tmp_path, b"S: x\n\n>From a\n>>From b\n>x\n", fmt="mboxrd")
    (info,) = listing(store)
    assert read(store, info) == b"S: x\n\nFrom a\n>From b\n>x\n"
    assert info.size == crlfSize(b"S: x\n\nFrom a\n>From b\n>x\n")


def test_a_body_line_from_without_blank_line_is_no_separator(tmp_path):
    path = tmp_path / "alice"
    path.write_bytes(FROM + b"S: x\n\nbody\nFrom here, unquoted\n\n" + FROM + b"S: y\n\n")
    store = MboxStore(f"{tmp_path}/%u", runInThread=synchronously)
    assert contents(store) == [b"S: x\n\nbody\nFrom here, unquoted\n", b"S: y\n"]


def test_empty_and_missing_spools(tmp_path):
    store = MboxStore(f"{tmp_path}/%u", runInThread=synchronously)
    assert listing(store) == []
    (tmp_path / "alice").write_bytes(b"")
    assert listing(store) == []
    strict = MboxStore(f"{tmp_path}/%u", runInThread=synchronously, createMissing=False)
    with pytest.raises(PermanentFailure):
        result(strict.openMailbox("bob"))


def test_a_file_that_is_no_mbox_is_refused(tmp_path):
    (tmp_path / "alice").write_bytes(b"Subject: not an mbox\n")
    store = MboxStore(f"{tmp_path}/%u", runInThread=synchronously)
    mailbox = result(store.openMailbox("alice"))
    with pytest.raises(PermanentFailure, match="damaged"):
        result(mailbox.listMessages())
    result(mailbox.close())


def test_line_filter_across_any_chunking():
    text = b"a\n>From x\r\n>From y\nFrom z\n" + b"q" * 70000 + b">From not a line start\n>From w"
    for size in (1, 2, 3, 7, 4096, 100000):
        out = LineFilter(unquoter("mboxo"))
        got = b"".join(out.feed(text[i : i + size]) for i in range(0, len(text), size))
        got += out.feed(b"", final=True)
        assert got == unquoter("mboxo")(b"\n" + text)[1:]
        inp = LineFilter(quoter("mboxrd"))
        got = b"".join(inp.feed(text[i : i + size]) for i in range(0, len(text), size))
        got += inp.feed(b"", final=True)
        assert got == quoter("mboxrd")(b"\n" + text)[1:]


# -- UIDLs --


def test_x_uidl_used_only_when_valid_and_unique(tmp_path):
    store, _ = spool(
        tmp_path,
        b"X-UIDL: qpopper-1\nS: a\n\n",
        b"X-UIDL: has space\nS: b\n\n",
        b"X-UIDL: " + b"x" * 71 + b"\nS: c\n\n",
        b"X-UIDL: twice\nS: d\n\n",
        b"X-UIDL: twice\nS: e\n\n",
        b"S: none\n\n",
    )
    uids = [i.uid for i in listing(store)]
    assert uids[0] == "qpopper-1"
    assert "twice" not in uids and len(set(uids)) == 6
    assert all(0 < len(u) <= 70 for u in uids)


def test_uids_survive_appends_removals_and_duplicates(tmp_path):
    same = b"Subject: same\n\nidentical\n"
    store, path = spool(tmp_path, same, same, b"S: other\n\n")
    first = [i.uid for i in listing(store)]
    assert len(set(first)) == 3
    # Remove the first of the two identical messages: the second keeps its id.
    mailbox = result(store.openMailbox("alice"))
    infos = result(mailbox.listMessages())
    assert result(mailbox.removeMessages([infos[0]])) == []
    result(mailbox.close())
    assert [i.uid for i in listing(store)] == first[1:]
    # An append, from another program: ids kept, and a new one for the new mail.
    with open(path, "ab") as f:
        f.write(FROM + b"X-UIDL: " + first[2].encode() + b"\n\n")
    after = [i.uid for i in listing(store)]
    assert after[:2] == first[1:] and after[2] not in first


def test_uids_survive_a_rewrite_by_a_mail_reader(tmp_path):
    """mutt rewrites Status: headers; a message keeps its id by its digest."""
    same = b"Subject: same\n\nidentical\n"
    store, path = spool(tmp_path, b"S: a\n\n", same, same)
    before = [i.uid for i in listing(store)]
    data = path.read_bytes().replace(b"S: a\n", b"S: a\nStatus: RO\nX-Status: A\n")
    replacement = tmp_path / "new"
    replacement.write_bytes(data)
    os.rename(replacement, path)
    assert [i.uid for i in listing(store)] == before


# -- the offset index --


def test_index_reads_only_what_was_appended(tmp_path, monkeypatch):
    """
    A login over an unchanged spool reads no message; after an append, only
    the last indexed message and the new mail are read; a restarted server
    (no memory cache) reads nothing either. Counted in bytes given to scan().
    """
    big = b"Subject: big\n\n" + b"x" * 1000 + b"\n"
    store, path = spool(tmp_path, *[big] * 200)
    scanned = []
    real = mboxindex.scan

    def counting(data, start, end, fmt):
        scanned.append(end - start)
        return real(data, start, end, fmt)

    monkeypatch.setattr(mboxindex, "scan", counting)
    assert len(listing(store)) == 200
    assert scanned == [path.stat().st_size]
    scanned.clear()
    assert len(listing(store)) == 200
    fresh = MboxStore(f"{tmp_path}/%u", runInThread=synchronously)
    assert len(listing(fresh)) == 200
    assert scanned == []
    deliver(fresh, [b"Subject: new\n\nnew\n"])
    assert len(listing(store)) == 201
    assert sum(scanned) < 2 * (len(FROM) + len(big) + 1) + 100
    index = readIndex(indexPath(str(path)))
    assert index is not None and index.stamp == mboxindex.stampOf(path.stat())


# -- delivery and UPDATE --


def test_delivery_quotes_from_and_makes_lf(tmp_path):
    store = MboxStore(f"{tmp_path}/%u", runInThread=synchronously)
    message = b"Subject: q\r\n\r\nFrom me\r\n>From you\r\nend"
    deliver(store, [message[:20], message[20:]])
    deliver(store, [b"S: 2\n\nsecond\n"])
    data = (tmp_path / "alice").read_bytes()
    assert b"\n>From me\n>From you\nend\n\nFrom " in data and b"\r" not in data
    infos = listing(store)
    # mboxo: a stored >From comes back as From (documented as lossy).
    assert read(store, infos[0]) == b"Subject: q\n\nFrom me\nFrom you\nend\n"
    assert infos[0].size == crlfSize(b"Subject: q\n\nFrom me\nFrom you\nend\n")


def test_update_keeps_mail_appended_after_the_listing(tmp_path):
    store, path = spool(tmp_path, b"S: 1\n\n", b"S: 2\n\n", b"S: 3\n\n")
    mode = 0o660
    os.chmod(path, mode)
    mailbox = result(store.openMailbox("alice"))
    infos = result(mailbox.listMessages())
    deliver(store, [b"S: late\n\nlate\n"])
    assert result(mailbox.removeMessages([infos[0], infos[2]])) == []
    result(mailbox.close())
    assert contents(store) == [b"S: 2\n\n", b"S: late\n\nlate\n"]
    assert [i.uid for i in listing(store)][0] == infos[1].uid
    assert os.stat(path).st_mode & 0o777 == mode
    assert sorted(os.listdir(tmp_path)) == [".alice.popserv-index", ".popserv-locks.d", "alice"]


def test_a_spool_rewritten_under_a_session_makes_its_messages_vanish(tmp_path):
    store, path = spool(tmp_path, b"S: 1\n\n", b"S: 2\n\n")
    mailbox = result(store.openMailbox("alice"))
    infos = result(mailbox.listMessages())
    replacement = tmp_path / "new"
    replacement.write_bytes(FROM + b"S: 2\n\n")
    os.rename(replacement, path)
    from popserv.errors import MessageVanished

    with pytest.raises(MessageVanished):
        mailbox.openMessage(infos[0])
    result(mailbox.close())


def test_pop3_session_over_an_mbox(tmp_path):
    """RETR, TOP, DELE and QUIT through the protocol."""
    store, path = spool(tmp_path, b"Subject: a\n\n>From x\n.dot\n", b"Subject: b\n\nbody\n")
    factory, _ = memoryServer({"alice": "pw"}, store=store)
    client = connect(factory)
    for line in (b"USER alice", b"PASS pw", b"LIST", b"RETR 1", b"TOP 2 0", b"DELE 1", b"QUIT"):
        client.send(line + b"\r\n")
    out = client.output()
    assert b"+OK 2 messages" in out or b"2 " in out
    assert b"Subject: a\r\n\r\nFrom x\r\n..dot\r\n.\r\n" in out
    assert b"Subject: b\r\n\r\n.\r\n" in out
    assert path.read_bytes() == FROM + b"Subject: b\n\nbody\n\n"


# -- locking --


def test_dotlock_of_a_dead_process_is_stale(tmp_path):
    path = tmp_path / "alice"
    path.write_bytes(b"")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    (tmp_path / "alice.lock").write_text(dead + "\n")
    with SpoolLock(str(path), timeout=1) as lock:
        assert (tmp_path / "alice.lock").read_text() == f"{os.getpid()}\n"
        assert lock.fd >= 0
    assert not (tmp_path / "alice.lock").exists()


def test_a_rewrite_clears_what_killed_processes_left(tmp_path):
    """A half-made dotlock of a dead process and a new spool never renamed."""
    store, path = spool(tmp_path, b"S: 1\n\n", b"S: 2\n\n")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    (tmp_path / f".alice.popserv-lock.{dead}.1").write_text(dead)
    (tmp_path / f".alice.popserv-lock.{os.getpid()}.1").write_text("live")
    (tmp_path / ".alice.popserv-new.1").write_bytes(b"half")
    mailbox = result(store.openMailbox("alice"))
    infos = result(mailbox.listMessages())
    assert result(mailbox.removeMessages(infos[:1])) == []
    result(mailbox.close())
    assert sorted(os.listdir(tmp_path)) == [
        ".alice.popserv-index",
        f".alice.popserv-lock.{os.getpid()}.1",
        ".popserv-locks.d",
        "alice",
    ]


def test_live_and_fresh_dotlocks_are_respected_old_ones_are_not(tmp_path):
    path = tmp_path / "alice"
    path.write_bytes(b"")
    lock = tmp_path / "alice.lock"
    lock.write_text("")  # Postfix's: empty
    with pytest.raises(SpoolLocked):
        SpoolLock(str(path), timeout=0.2).acquire()
    assert lock.exists()
    old = time.time() - 600
    os.utime(lock, (old, old))
    with SpoolLock(str(path), timeout=0.2):
        pass


def test_fcntl_lock_of_another_process_is_waited_for(tmp_path):
    path = tmp_path / "alice"
    path.write_bytes(b"")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
         "fcntl.lockf(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(0.5)",
         str(path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(SpoolLocked):
        SpoolLock(str(path), timeout=0.1).acquire()
    assert not (tmp_path / "alice.lock").exists()  # given back with the failure
    started = time.monotonic()
    with SpoolLock(str(path), timeout=10):
        assert time.monotonic() - started > 0.1
    holder.wait()


def test_threads_of_one_process_take_a_spool_in_turn_even_without_a_dotlock(tmp_path, monkeypatch):
    """
    A spool directory popserv may not write in leaves it fcntl alone, and
    fcntl locks are the process's: two deliveries in two threads both got
    one and appended at the same offset. Threads now wait for each other.
    """
    import errno
    import threading

    def refused(self):
        raise PermissionError(errno.EACCES, "Permission denied", self.lockPath)

    monkeypatch.setattr(SpoolLock, "_makeDotlock", refused)
    path = tmp_path / "alice"
    path.write_bytes(b"")
    held, done = threading.Event(), threading.Event()

    def holder():
        with SpoolLock(str(path), timeout=1):
            held.set()
            done.wait(5)

    thread = threading.Thread(target=holder)
    thread.start()
    assert held.wait(5)
    try:
        with pytest.raises(SpoolLocked):
            SpoolLock(str(tmp_path / "." / "alice"), timeout=0.2).acquire()
        assert not (tmp_path / "alice.lock").exists()
    finally:
        done.set()
        thread.join(5)
    with SpoolLock(str(path), timeout=0.2) as lock:  # given back
        assert lock.fd >= 0


def test_lock_follows_a_spool_replaced_while_waiting(tmp_path):
    """The path is checked after locking: the lock is on the inode the path names."""
    path = tmp_path / "alice"
    path.write_bytes(b"old")
    with SpoolLock(str(path)) as lock:
        replacement = tmp_path / "x"
        replacement.write_bytes(b"new")
        os.rename(replacement, path)
        assert os.fstat(lock.fd).st_ino != path.stat().st_ino
    with SpoolLock(str(path)) as lock:
        assert os.fstat(lock.fd).st_ino == path.stat().st_ino


# -- the plugin and migration's listing --


def test_plugin_and_list_maildrops(tmp_path):
    for name in ("alice", "bob", "alice.lock", ".alice.popserv-index"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "dir").mkdir()
    kind = storeKind("mbox")
    kind.check(f"{tmp_path}/%u", str(tmp_path))
    with pytest.raises(ValueError):
        kind.check(f"{tmp_path}/spool", str(tmp_path))
    from popserv.registry import StoreContext

    store = kind.makeStore(f"{tmp_path}/%u", StoreContext(str(tmp_path), synchronously))
    assert store.description == f"mbox:{tmp_path}/%u"
    assert result(store.listMaildrops()) == ["alice", "bob"]
