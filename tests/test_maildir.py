"""The Maildir store: UIDLs, sizes, locking, removal; run synchronously (no threads)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from twisted.cred.portal import Portal
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from popserv.auth.realm import MailboxRealm
from popserv.backends import maildir as md
from popserv.backends.maildir import MaildirStore, scan, uidFor, uniquePart
from popserv.errors import InvalidUserName, MaildropInUse, MessageVanished, PermanentFailure
from popserv.interfaces import IMailbox, IMailStore, IMessageReader, validUID
from popserv.protocol import POP3Factory
from popserv.testing import PlaintextChecker, connect
from popserv.threads import synchronously
from support import REPO, age_directories, deliver


def result(d):
    """The result of an already-fired Deferred (raising its failure)."""
    out = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


@pytest.fixture
def store(tmp_path):
    return MaildirStore(f"maildir:{tmp_path}/%d/%n/Maildir", runInThread=synchronously)


@pytest.fixture
def box(tmp_path):
    return tmp_path / "alice" / "Maildir"


def open_(store, user="alice"):
    return result(store.openMailbox(user))


def test_interfaces_are_provided(store, box):
    deliver(box, b"x\n")
    assert verifyObject(IMailStore, store)
    mailbox = open_(store)
    assert verifyObject(IMailbox, mailbox)
    (info,) = result(mailbox.listMessages())
    assert verifyObject(IMessageReader, mailbox.openMessage(info))


@pytest.mark.parametrize(
    "name,unique",
    [
        ("1700000000.M1P2.host", "1700000000.M1P2.host"),
        ("1700000000.M1P2.host:2,S", "1700000000.M1P2.host"),
        ("1700000000.M1P2.host,S=1234:2,RS", "1700000000.M1P2.host"),
        ("1700000000.M1P2.host,S=1234,W=1260:2,", "1700000000.M1P2.host"),
        ("1700000000.M1P2.host,X=7,S=1:2,", "1700000000.M1P2.host,X=7"),
    ],
)
def test_unique_part(name, unique):
    assert uniquePart(name) == unique


def test_uid_is_valid_for_any_name():
    """RFC 1939 section 7: 1-70 characters in 0x21-0x7E; odd names map to a digest."""
    for unique in ("ok.name", "has space", "x" * 71, "caf\u00e9", "a\udcffb"):
        uid = uidFor(unique)
        assert validUID(uid)
        assert uid == uidFor(unique)
    assert uidFor("has space") != uidFor("has  space")


def test_uidl_survives_flag_changes_and_the_move_to_cur(store, box):
    """UIDLs never change when another program sets flags or moves new/ -> cur/."""
    path = deliver(box, b"Subject: a\n\nbody\n", name="1700000000.M1P1.host,S=17")
    mailbox = open_(store)
    before = [i.uid for i in result(mailbox.listMessages())]
    mailbox.close()
    os.rename(path, box / "cur" / (path.name + ":2,S"))
    mailbox = open_(store)
    after = result(mailbox.listMessages())
    assert [i.uid for i in after] == before == ["1700000000.M1P1.host"]
    os.rename(box / "cur" / (path.name + ":2,S"), box / "cur" / (path.name + ":2,RS"))
    assert [i.uid for i in result(mailbox.listMessages())] == before


def test_sizes_are_crlf_octets(store, box):
    deliver(box, b"a\nb\n", name="1.A.h")  # LF: 4 bytes -> 6
    deliver(box, b"a\r\nb\r\n", name="2.B.h")  # CRLF stays 6
    deliver(box, b"a\r\nb", name="3.C.h")  # no final newline: +2
    deliver(box, b"", name="4.D.h")
    sizes = [i.size for i in result(open_(store).listMessages())]
    assert sizes == [6, 6, 6, 0]


def test_w_size_hint_is_trusted_and_sizes_are_cached(store, box, monkeypatch):
    deliver(box, b"a\nb\n", name="1.A.h,S=4,W=6")
    deliver(box, b"abc\n", name="2.B.h")
    mailbox = open_(store)
    calls = []
    real = scan._countSize
    monkeypatch.setattr(scan, "_countSize", lambda fd: calls.append(fd) or real(fd))
    assert [i.size for i in result(mailbox.listMessages())] == [6, 5]
    assert len(calls) == 1  # only the file without W=
    assert [i.size for i in result(mailbox.listMessages())] == [6, 5]
    assert len(calls) == 1  # second login: from the cache


def test_ignores_tmp_dotfiles_symlinks_and_directories(store, box, tmp_path):
    deliver(box, b"real\n", name="1.A.h")
    (box / "tmp" / "2.B.h").write_bytes(b"in delivery\n")
    (box / "new" / ".hidden").write_bytes(b"x\n")
    (box / "new" / "3.C.h").mkdir()
    secret = tmp_path / "secret"
    secret.write_bytes(b"not mail\n")
    os.symlink(secret, box / "new" / "4.D.h")
    infos = result(open_(store).listMessages())
    assert [i.uid for i in infos] == ["1.A.h"]


def test_order_is_delivery_order(store, box):
    for t in (300, 100, 200):
        deliver(box, b"%d\n" % t, name=f"{t}.M.h")
    assert [i.uid for i in result(open_(store).listMessages())] == [
        "100.M.h",
        "200.M.h",
        "300.M.h",
    ]


@pytest.mark.parametrize(
    "names, expected",
    [
        # Leading numbers of one width: the names alone give the order.
        (["1700000300.B.h", "1700000100.Z.h", "1700000100.A.h"], [2, 1, 0]),
        # Of different widths: by number, not by text ("9" < "10").
        (["10.A.h", "9.B.h", "100.C.h"], [1, 0, 2]),
        # One name without a number: ordered by its file's time.
        (["20.A.h", "noise.h", "10.B.h"], [2, 0, 1]),
    ],
)
def test_order_by_delivery_time_then_name(store, box, names, expected):
    for name in names:
        path = deliver(box, b"x\n", name=name)
        os.utime(path, (1_000_000_000, 1_000_000_000))  # before all the numbered ones
    got = [i.uid for i in result(open_(store).listMessages())]
    assert got == [names[i] for i in expected]


def test_duplicate_unique_names_are_listed_once(store, box):
    deliver(box, b"one\n", name="5.X.h", sub="cur")
    deliver(box, b"two\n", name="5.X.h:2,S", sub="cur")
    infos = result(open_(store).listMessages())
    assert [i.uid for i in infos] == ["5.X.h"]


def test_read_follows_a_rename_by_another_program(store, box):
    path = deliver(box, b"Subject: x\n\nhello\n", name="1.A.h")
    mailbox = open_(store)
    (info,) = result(mailbox.listMessages())
    os.rename(path, box / "cur" / "1.A.h:2,S")
    reader = mailbox.openMessage(info)
    assert reader.read(1000) == b"Subject: x\n\nhello\n"
    assert reader.read(1000) == b""
    reader.close()


def test_vanished_message(store, box):
    path = deliver(box, b"x\n", name="1.A.h")
    mailbox = open_(store)
    (info,) = result(mailbox.listMessages())
    path.unlink()
    with pytest.raises(MessageVanished):
        mailbox.openMessage(info)


def test_remove_only_given_messages_including_renamed_and_vanished(store, box):
    a = deliver(box, b"a\n", name="1.A.h")
    b = deliver(box, b"b\n", name="2.B.h")
    deliver(box, b"c\n", name="3.C.h")
    mailbox = open_(store)
    infos = result(mailbox.listMessages())
    os.rename(a, box / "cur" / "1.A.h:2,S")
    b.unlink()
    assert result(mailbox.removeMessages(infos[:2])) == []
    assert sorted(os.listdir(box / "new")) == ["3.C.h"]
    assert os.listdir(box / "cur") == []


def test_failed_removal_is_reported(store, box, monkeypatch):
    deliver(box, b"a\n", name="1.A.h")
    deliver(box, b"b\n", name="2.B.h")
    mailbox = open_(store)
    infos = result(mailbox.listMessages())
    real = os.unlink

    def unlink(path, *a, **kw):
        if str(path).endswith("1.A.h"):
            raise PermissionError(13, "Permission denied")
        return real(path, *a, **kw)

    monkeypatch.setattr(os, "unlink", unlink)
    assert result(mailbox.removeMessages(infos)) == list(infos[:1])
    assert os.listdir(box / "new") == ["1.A.h"]


def test_lock_is_exclusive_and_released_on_close(store, box):
    first = open_(store)
    with pytest.raises(MaildropInUse):
        open_(store)
    first.close()
    first.close()  # idempotent
    open_(store).close()


def test_lock_is_exclusive_between_stores_in_one_process(tmp_path, box):
    a = MaildirStore(f"{tmp_path}/%n/Maildir", runInThread=synchronously)
    b = MaildirStore(f"{tmp_path}/%n/Maildir", runInThread=synchronously)
    held = open_(a)
    with pytest.raises(MaildropInUse):
        open_(b)
    held.close()
    open_(b).close()


def hold_lock_in_another_process(root, user="alice", lockFile=None):
    """A child process that opens (and locks) a maildrop with popserv's own code."""
    code = (
        "import sys, time\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from popserv.backends.maildir import MaildirStore\n"
        "from popserv.threads import synchronously\n"
        f"store = MaildirStore({root + '/%n/Maildir'!r}, runInThread=synchronously, "
        f"lockFile={lockFile!r})\n"
        f"store.openMailbox({user!r}).addErrback(lambda f: print('failed', flush=True))\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    return holder


def test_lock_held_by_another_process_then_by_a_dead_one(tmp_path, store, box):
    """Exclusive across processes; SIGKILL of the holder leaves no stale lock."""
    box.mkdir(parents=True)
    holder = hold_lock_in_another_process(str(tmp_path))
    try:
        with pytest.raises(MaildropInUse):
            open_(store)
        open_(store, "bob").close()  # another maildrop is not affected
    finally:
        holder.kill()
        holder.wait()
    open_(store).close()


def test_a_few_descriptors_for_all_locks(tmp_path, store):
    """10,000 idle sessions must not need 10,000 more descriptors for their locks."""
    from popserv.backends.locking import SHARDS

    # Every shared lock file opened from now on (each at its first lock).
    warm = [open_(store, f"w{i}") for i in range(20 * SHARDS)]
    for mailbox in warm:
        mailbox.close()
    assert len(os.listdir(tmp_path / md.SHARED_LOCK_FILE)) == SHARDS

    def descriptors():
        found = set()
        for fd in os.listdir("/proc/self/fd"):
            try:
                found.add((fd, os.readlink(f"/proc/self/fd/{fd}")))
            except FileNotFoundError:
                pass  # listdir's own descriptor, closed already
        return found

    before = descriptors()
    boxes = [open_(store, f"u{i}") for i in range(100)]
    # New descriptors into the mail root, not a count: the garbage collector
    # may close an earlier test's files meanwhile (and free their numbers).
    opened = [path for _, path in descriptors() - before if path.startswith(str(tmp_path))]
    assert opened == []
    for mailbox in boxes:
        mailbox.close()
    assert (tmp_path / md.SHARED_LOCK_FILE).exists()


def test_fallback_to_a_lock_file_per_maildrop(tmp_path, box):
    """Where the shared lock file cannot be made, each maildrop gets its own flock."""
    from popserv.backends.locking import PerMaildropLocks

    (tmp_path / "afile").write_text("not a directory")
    store = MaildirStore(
        f"{tmp_path}/%n/Maildir",
        runInThread=synchronously,
        lockFile=str(tmp_path / "afile" / "locks"),
    )
    first = open_(store)
    assert isinstance(store.locks, PerMaildropLocks)
    with pytest.raises(MaildropInUse):
        open_(store)
    first.close()
    open_(store).close()
    assert (box / md.LOCK_FILE).exists()


def test_missing_maildir_is_created_or_refused(tmp_path):
    store = MaildirStore(f"{tmp_path}/%d/%n", runInThread=synchronously)
    open_(store, "joe@example.org").close()
    assert sorted(os.listdir(tmp_path / "example.org" / "joe")) == ["cur", "new", "tmp"]
    strict = MaildirStore(f"{tmp_path}/%n", runInThread=synchronously, createMissing=False)
    with pytest.raises(PermanentFailure):
        open_(strict, "nobody")


@pytest.mark.parametrize("user", ["..", "../x", "a/b", "a\x00b", ".@x", "a@..", "", "x\n"])
def test_user_names_cannot_escape_the_mail_root(store, user):
    with pytest.raises(InvalidUserName):
        open_(store, user)


def test_protocol_over_maildir_end_to_end(tmp_path):
    """RETR, DELE and QUIT through the protocol remove exactly the marked file."""
    store = MaildirStore(f"{tmp_path}/%n", runInThread=synchronously)
    box = tmp_path / "alice"
    deliver(box, b"Subject: 1\n\n.one\n", name=f"{int(time.time())}.A.h")
    deliver(box, b"Subject: 2\n\ntwo\n", name=f"{int(time.time()) + 1}.B.h")
    factory = POP3Factory(
        Portal(MailboxRealm(store), [PlaintextChecker({"alice": "pw"})]), Clock()
    )
    client = connect(factory)
    client.send(b"USER alice\r\nPASS pw\r\nRETR 1\r\nDELE 2\r\nQUIT\r\n")
    assert client.lines() == [
        b"+OK Send your password",
        b"+OK Logged in, 2 messages (39 octets)",
        b"+OK 20 octets",
        b"Subject: 1",
        b"",
        b"..one",
        b".",
        b"+OK Message 2 deleted",
        b"+OK popserv 0.1.0 signing off (1 message left)",
    ]
    assert [n.split(".")[1] for n in os.listdir(box / "new")] == ["A"]
    open_(store).close()  # the lock was released


def listing(store):
    mailbox = open_(store)
    try:
        return result(mailbox.listMessages())
    finally:
        mailbox.close()


def test_new_mail_is_listed_from_the_previous_listing(store, box, monkeypatch):
    """Only the new file is looked at: the messages still there keep their entries."""
    for n in range(3):
        deliver(box, b"x\n" * (n + 1), name=f"{1000 + n}.M{n}.h")
    age_directories(box, 100)
    before = listing(store)
    deliver(box, b"new\n", name="1003.M3.h")
    age_directories(box, 50)
    looked = []
    collect = scan.collect

    def spy(path, sizes, entries, seen, read=True):
        if read:  # (the pass that may read: the one in a thread)
            looked.extend(entry.name for entry in entries)
        return collect(path, sizes, entries, seen, read)

    monkeypatch.setattr(scan, "collect", spy)
    after = listing(store)
    assert [i.uid for i in after] == ["1000.M0.h", "1001.M1.h", "1002.M2.h", "1003.M3.h"]
    assert looked == ["1003.M3.h"]  # the others kept their entries, not read again
    assert after[:3] == before
    assert after[3].size == 5


def test_mail_sorting_before_the_listed_is_listed_from_scratch(store, box):
    deliver(box, b"a\n", name="1000.M0.h")
    age_directories(box, 100)
    listing(store)
    deliver(box, b"b\n", name="999.M9.h")  # an older name, e.g. a restored backup
    age_directories(box, 50)
    assert [i.uid for i in listing(store)] == ["999.M9.h", "1000.M0.h"]
    assert "999.M9.h\t3" in (box / md.INDEX_FILE).read_text()  # its size was saved


@pytest.mark.parametrize("seed", range(6))
def test_a_listing_made_again_matches_one_made_from_scratch(tmp_path, box, seed, monkeypatch):
    """
    Random deliveries (names of several widths, some with a W= size),
    removals, moves to cur/ and flag changes, listed after each; after a
    delivery that had to be counted, the index holds exactly the sizes of
    the messages present (without W=).
    """
    rng = random.Random(seed)
    paths = {"reused": 0, "scratch": 0}
    relisted = scan.relisted

    def spy(*args):
        infos, counted = relisted(*args)
        paths["reused" if infos is not None else "scratch"] += 1
        return infos, counted

    monkeypatch.setattr(scan, "relisted", spy)
    cached = MaildirStore(f"{tmp_path}/%n/Maildir", runInThread=synchronously)
    files: list[Path] = []
    clock = time.time() - 10_000
    for step in range(40):
        action = rng.choice(["deliver", "deliver", "deliver", "remove", "move", "flag"])
        counted = False
        if action == "deliver" or not files:
            lines = rng.randrange(1, 5)
            stamp = rng.choice([12000 + step, rng.randrange(900, 12100)])
            hinted = rng.random() < 0.3
            name = f"{stamp}.M{step}.h" + (f",S={5 * lines},W={6 * lines}" if hinted else "")
            files.append(deliver(box, b"line\n" * lines, name=name))
            counted = not hinted
        elif action == "remove":
            files.pop(rng.randrange(len(files))).unlink()
        else:
            i = rng.randrange(len(files))
            old = files[i]
            base = old.name.partition(":")[0]
            flags = rng.choice(["S", "RS", "T"]) if action == "flag" else "S"
            files[i] = box / "cur" / f"{base}:2,{flags}"
            os.rename(old, files[i])
        clock += 10
        for sub in ("cur", "new"):
            os.utime(box / sub, (clock, clock))
        fresh = MaildirStore(f"{tmp_path}/%n/Maildir", runInThread=synchronously)
        assert listing(cached) == listing(fresh), (seed, step, action)
        if counted:
            indexed = {
                line.split("\t")[0] for line in (box / md.INDEX_FILE).read_text().split("\n")[1:-1]
            }
            bases = {f.name.partition(":")[0] for f in files}
            assert indexed == {b for b in bases if ",W=" not in b}, (seed, step)
    assert paths["reused"] > 5 and paths["scratch"] > 5, paths


def test_sizes_persist_in_the_index_for_other_processes(tmp_path, box, monkeypatch):
    """A second store (another process, a restart) reads sizes from .popserv.index."""
    deliver(box, b"a\nb\n", name="1.A.h")
    deliver(box, b"ccc\n", name="2.B.h:2,S", sub="cur")
    store = MaildirStore(f"{tmp_path}/%n/Maildir", runInThread=synchronously)
    mailbox = open_(store)
    first = [i.size for i in result(mailbox.listMessages())]
    mailbox.close()
    lines = (box / md.INDEX_FILE).read_text().splitlines()
    assert lines[0] == "popserv-index 1" and sorted(lines[1:]) == ["1.A.h\t6", "2.B.h\t5"]
    monkeypatch.setattr(scan, "_countSize", lambda fd: pytest.fail("file read again"))
    fresh = MaildirStore(f"{tmp_path}/%n/Maildir", runInThread=synchronously)
    assert [i.size for i in result(open_(fresh).listMessages())] == first


def test_size_fields_with_non_ascii_digits_are_ignored(store, box):
    """A W= of Unicode digits (isdigit() says yes, int() no) must not break the listing."""
    deliver(box, b"a\nb\n", name="1.A.h,W=\u00b2")
    assert [i.size for i in result(open_(store).listMessages())] == [6]


def test_index_forgets_removed_messages_when_it_is_next_written(tmp_path, box):
    gone = deliver(box, b"a\nb\n", name="1.A.h")
    deliver(box, b"ccc\n", name="2.B.h")
    store = MaildirStore(f"{tmp_path}/%n/Maildir", runInThread=synchronously)
    mailbox = open_(store)
    result(mailbox.listMessages())
    mailbox.close()
    gone.unlink()  # another client, or an earlier session's QUIT
    deliver(box, b"dddd\n", name="3.C.h")
    deliver(box, b"hinted\n", name="4.D.h,S=7,W=8")  # sized by its name: not indexed
    fresh = MaildirStore(f"{tmp_path}/%n/Maildir", runInThread=synchronously)
    assert [i.size for i in result(open_(fresh).listMessages())] == [5, 6, 8]
    lines = (box / md.INDEX_FILE).read_text().splitlines()
    assert sorted(lines[1:]) == ["2.B.h\t5", "3.C.h\t6"]


@pytest.mark.parametrize("damage", [b"garbage", b"popserv-index 1\nx\tnotanumber\n", b""])
def test_damaged_index_is_rebuilt(tmp_path, box, damage):
    deliver(box, b"a\nb\n", name="1.A.h")
    box.joinpath(md.INDEX_FILE).write_bytes(damage)
    store = MaildirStore(f"{tmp_path}/%n/Maildir", runInThread=synchronously)
    assert [i.size for i in result(open_(store).listMessages())] == [6]
    assert (box / md.INDEX_FILE).read_text() == "popserv-index 1\n1.A.h\t6\n"


def test_index_write_failure_costs_nothing_but_a_warning(tmp_path, box):
    deliver(box, b"a\n", name="1.A.h")
    (box / md.INDEX_FILE).mkdir()  # cannot be replaced by a file
    store = MaildirStore(f"{tmp_path}/%n/Maildir", runInThread=synchronously)
    assert [i.size for i in result(open_(store).listMessages())] == [3]


def test_listing_reused_until_the_maildrop_changes(tmp_path, box, monkeypatch):
    deliver(box, b"a\n", name="1.A.h")
    age_directories(box)
    store = MaildirStore(f"{tmp_path}/%n/Maildir", runInThread=synchronously, cacheThreshold=1)
    mailbox = open_(store)
    first = result(mailbox.listMessages())
    scans = []
    real = os.scandir
    monkeypatch.setattr(os, "scandir", lambda p: scans.append(p) or real(p))
    assert result(mailbox.listMessages()) == first and scans == []
    deliver(box, b"b\n", name="2.B.h")  # changes new/'s mtime
    assert [i.uid for i in result(mailbox.listMessages())] == ["1.A.h", "2.B.h"]
    # Tried on the calling thread (a small maildrop), then in a thread: the
    # new file's size is to be counted.
    assert len(scans) == 4


def test_fresh_directories_are_not_trusted(tmp_path, box, monkeypatch):
    """A directory changed within the timestamp tick may change again unseen: rescan."""
    deliver(box, b"a\n", name="1.A.h")
    store = MaildirStore(f"{tmp_path}/%n/Maildir", runInThread=synchronously)
    mailbox = open_(store)
    result(mailbox.listMessages())
    scans = []
    real = os.scandir
    monkeypatch.setattr(os, "scandir", lambda p: scans.append(p) or real(p))
    result(mailbox.listMessages())
    assert len(scans) == 2


def test_expire_days_uses_the_delivery_time_in_the_name(tmp_path):
    """EXPIRE n removes messages older than n days (by the Maildir name's timestamp)."""
    from popserv.policy import SessionPolicy, UserSettings

    now = time.time()
    store = MaildirStore(f"{tmp_path}/%n", runInThread=synchronously)
    box = tmp_path / "alice"
    deliver(box, b"old\n", name=f"{int(now - 40 * 86400)}.OLD.h")
    deliver(box, b"new\n", name=f"{int(now - 86400)}.NEW.h")
    clock = Clock()
    clock.advance(now)
    policy = SessionPolicy(clock, UserSettings(expire=30))
    factory = POP3Factory(
        Portal(MailboxRealm(store, policy), [PlaintextChecker({"alice": "pw"})]),
        clock,
        policy=policy,
    )
    client = connect(factory)
    client.send(b"USER alice\r\nPASS pw\r\nQUIT\r\n")
    assert client.lines()[-1].endswith(b"(1 message left)")
    assert [n.split(".")[1] for n in os.listdir(box / "new")] == ["NEW"]


def test_small_maildrops_are_not_kept_in_memory(tmp_path, box):
    deliver(box, b"a\n", name="1.A.h")
    age_directories(box)
    store = MaildirStore(f"{tmp_path}/%n/Maildir", runInThread=synchronously, cacheThreshold=2)
    mailbox = open_(store)
    result(mailbox.listMessages())
    mailbox.close()
    assert store.peekCache(str(box)) is None
    deliver(box, b"b\n", name="2.B.h")
    age_directories(box)
    store2 = MaildirStore(f"{tmp_path}/%n/Maildir", runInThread=synchronously, cacheThreshold=2)
    result(open_(store2).listMessages())
    assert store2.peekCache(str(box)).listing is not None


def _threaded(store, calls):
    """Count the store's trips to a thread (run here, synchronously)."""

    def run(f, *args):
        calls.append(f.__name__)
        return synchronously(f, *args)

    store.runInThread = run


def _freshStore(tmp_path, **kw):
    return MaildirStore(f"{tmp_path}/%n/Maildir", runInThread=synchronously, **kw)


def test_small_indexed_maildrop_is_listed_without_a_thread(tmp_path, box):
    """A process's first listing of a small maildrop whose index holds every size: no thread."""
    for i in range(3):
        deliver(box, b"m%d\n" % i, name=f"{1000 + i}.M{i}.h")
    age_directories(box)
    first = listing(_freshStore(tmp_path))  # counts the sizes, writes the index
    store = _freshStore(tmp_path)  # (a new process: nothing cached)
    calls = []
    _threaded(store, calls)
    assert listing(store) == first and calls == []
    assert [i.size for i in first] == [4, 4, 4]
    deliver(box, b"four\n", name="1003.M3.h")  # unknown size: counted in a thread
    age_directories(box)
    assert [i.uid for i in listing(store)][-1] == "1003.M3.h" and calls == ["_scan"]


def test_what_may_block_is_listed_in_a_thread(tmp_path, box):
    deliver(box, b"a\n", name="1000.A.h")
    age_directories(box)
    calls = []
    store = _freshStore(tmp_path)
    _threaded(store, calls)
    listing(store)  # no index yet: the size is read
    assert calls == ["_scan"]
    # A big directory (more than one block of names) is read in a thread too.
    for i in range(120):
        deliver(box, b"x\n", sub="cur", name=f"{2000 + i}.{'N' * 40}{i}.h")
    listing(_freshStore(tmp_path))  # (indexed now)
    assert os.stat(box / "cur").st_size > scan.SMALL_DIRECTORY
    calls.clear()
    store = _freshStore(tmp_path)
    _threaded(store, calls)
    assert len(listing(store)) == 121 and calls == ["_scan"]


def test_carried_over_uidls_are_listed_in_a_thread(tmp_path, box):
    deliver(box, b"a\n", name="1000.A.h")
    age_directories(box)
    listing(_freshStore(tmp_path))
    calls = []
    store = _freshStore(tmp_path, uidlSource="dovecot")
    _threaded(store, calls)
    listing(store)
    assert calls == ["_scan"]


def test_big_index_is_read_in_a_thread(tmp_path, box):
    deliver(box, b"a\n", name="1000.A.h")
    age_directories(box)
    listing(_freshStore(tmp_path))
    index = box / ".popserv.index"
    lines = "".join(f"gone.{i}.{'x' * 60}\t3\n" for i in range(1000))  # stale, under 1024
    index.write_text(index.read_text() + lines)
    assert index.stat().st_size > scan.SMALL_INDEX
    calls = []
    store = _freshStore(tmp_path)
    _threaded(store, calls)
    assert [i.uid for i in listing(store)] == ["1000.A.h"] and calls == ["_scan"]


def test_deliveries_of_one_second_list_in_delivery_order(tmp_path):
    """popserv's names carry the microseconds in six digits: M099999 sorts before M100000."""
    from popserv.backends.maildir.names import formatUnique

    first = formatUnique(1_700_000_000 + 99_999.5e-6, 1, 1, "h")
    second = formatUnique(1_700_000_000 + 100_001.5e-6, 1, 2, "h")
    assert ".M0999" in first and ".M1000" in second and first < second
    box = tmp_path / "alice" / "Maildir"
    deliver(box, b"second\n", name=second)
    deliver(box, b"first\n", name=first)
    assert [i.uid for i in listing(_freshStore(tmp_path))] == [first, second]


def test_absurd_numbers_in_names_and_index_are_no_sizes_or_times(tmp_path, box):
    """Numbers too long for a file's size or a delivery time are not taken as such."""
    deliver(box, b"a\n", name="1000.A.h")
    deliver(box, b"bb\n", name="123456789012345678901234.B.h")  # no delivery time
    deliver(box, b"ccc\n", name=f"1001.C.h,W={'9' * 30}")  # no size: counted
    infos = listing(_freshStore(tmp_path))
    assert sorted((i.uid, i.size) for i in infos) == [
        ("1000.A.h", 3),
        ("1001.C.h", 5),
        ("123456789012345678901234.B.h", 4),
    ]
    index = box / ".popserv.index"
    index.write_text(index.read_text().replace("1000.A.h\t3", "1000.A.h\t" + "7" * 25))
    assert sorted(i.size for i in listing(_freshStore(tmp_path))) == [3, 4, 5]  # recounted


def test_many_names_are_read_in_a_thread_whatever_the_size_says(tmp_path, box, monkeypatch):
    for i in range(scan.SMALL_ENTRIES + 1):
        deliver(box, b"x\n", name=f"{1000 + i}.M{i}.h")
    age_directories(box)
    listing(_freshStore(tmp_path))  # (indexed)
    monkeypatch.setattr(scan, "SMALL_DIRECTORY", 10**9)  # a file system whose size says little
    calls = []
    store = _freshStore(tmp_path)
    _threaded(store, calls)
    assert len(listing(store)) == scan.SMALL_ENTRIES + 1 and calls == ["_scan"]
