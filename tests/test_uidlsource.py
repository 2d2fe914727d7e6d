"""
UIDLs carried over from another server's files and headers (--uidl-source,
popserv.backends.maildir.foreign), on Maildirs written as those servers
leave them; the real Dovecot is in test_uidlsource_dovecot.py.
"""

from __future__ import annotations

import os
import threading

import pytest

from popserv.backends.maildir import MaildirStore
from popserv.backends.maildir.foreign import expandDovecot, parseSource, readCourier
from popserv.backends.maildir.index import INDEX_FILE, MaildropCache
from popserv.threads import synchronously
from support import age_directories


def maildir(tmp_path, files: dict[str, bytes]):
    root = tmp_path / "alice" / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


def uidls(tmp_path, source: str) -> list[str]:
    store = MaildirStore(
        f"maildir:{tmp_path}/%u/Maildir", runInThread=synchronously, uidlSource=source
    )
    results: list[object] = []
    store.openMailbox("alice").addCallback(
        lambda box: (
            box.listMessages().addCallback(results.append).addBoth(lambda r: (box.close(), r)[1])
        )
    )
    return [info.uid for info in results[0]]  # type: ignore[attr-defined]


def test_dovecot_format_expansion():
    """var_expand as Dovecot: X is lowercase hex, 0N pads, N alone cuts, %% is %."""
    assert expandDovecot("%08Xu%08Xv", 1, 1796460240, "f", None) == "000000016b13ced0"
    assert expandDovecot("%v.%u", 3, 17, "f", None) == "17.3"
    assert expandDovecot("%f", 3, 17, "name,S=5", None) == "name,S=5"
    assert expandDovecot("%g-%%-%3f", 1, 1, "abcdef", "guid") == "guid-%-abc"
    assert expandDovecot("%{uid}", 9, 1, "f", None) == "9"
    assert expandDovecot("%m", 1, 1, "f", None) is None


@pytest.mark.parametrize(
    "spec", ["mbox", "courier:x", "dovecot:", "dovecot:%m", "dovecot:%Qu", "native:x"]
)
def test_bad_sources_are_refused(spec):
    with pytest.raises(ValueError):
        parseSource(spec)


def test_dovecot_uidlist_version_1_and_saved_uidls(tmp_path):
    """Version 1 (UID FILENAME); in version 3 a P field wins, an empty P is the base name."""
    root = maildir(tmp_path, {"cur/100.a:2,S": b"a\n", "cur/200.b:2,": b"b\n", "new/300.c": b"c"})
    (root / "dovecot-uidlist").write_text("1 1234 3\n1 100.a:2,S\n2 200.b\n")
    assert uidls(tmp_path, "dovecot:%v.%u") == ["1234.1", "1234.2", "300.c"]

    tmp2 = tmp_path / "v3"
    root = maildir(tmp2, {"cur/100.a:2,S": b"a\n", "cur/200.b:2,": b"b\n", "new/300.c": b"c"})
    (root / "dovecot-uidlist").write_text(
        "3 V99 N4 Gabc\n1 W2 Pold-uidl :100.a:2,S\n2 P :200.b:2,\n3 W1 :300.c\n"
    )
    assert uidls(tmp2, "dovecot") == ["old-uidl", "200.b", "0000000300000063"]


def test_courier_sizelist(tmp_path):
    """courierpop3dsizelist version 3 and 2: UIDn-v, or UIDn with UIDVALIDITY 0."""
    root = maildir(tmp_path, {"cur/100.a:2,S": b"a\n", "cur/200.b:2,": b"b\n", "cur/300.c": b"c"})
    (root / "courierpop3dsizelist").write_text(
        "/3 3 1700000000\n100.a:2,S 3 1:1700000000:0\n200.b:2, 3 2:0:0\n"
    )
    assert uidls(tmp_path, "courier") == ["UID1-1700000000", "UID2", "300.c"]
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "sizelist").write_text("/2 2 5\nx y:2,S 3 1:5\n")
    assert readCourier(str(tmp_path / "v2" / "sizelist")) == {"x y": "UID1-5"}


def test_xuidl_valid_and_unique_only(tmp_path):
    """X-UIDL is taken only when an RFC 1939 UIDL and unique in the maildrop."""
    maildir(
        tmp_path,
        {
            "cur/1.a": b"X-UIDL: 7f3a\nSubject: x\n\nbody\n",
            "cur/2.b": b"X-UIDL: dup\n\n",
            "cur/3.c": b"X-UIDL: dup\n\n",
            "cur/4.d": b"X-UIDL: has space\n\n",
            "cur/5.e": b"X-UIDL: " + b"y" * 71 + b"\n\n",
            "cur/6.f": b"Subject: none\n\nX-UIDL: in-the-body\n",
        },
    )
    assert uidls(tmp_path, "xuidl") == ["7f3a", "2.b", "3.c", "4.d", "5.e", "6.f"]


def test_uw_ipop3d(tmp_path):
    """UW ipop3d's %08lx%08lx of UIDVALIDITY (X-IMAP/X-IMAPbase) and X-UID."""
    maildir(
        tmp_path,
        {
            "cur/1.a": b"X-IMAPbase: 1234567890 3\nX-UID: 1\n\n",
            "cur/2.b": b"X-UID: 2\nStatus: RO\n\n",
            "cur/3.c": b"Subject: no uid\n\n",
        },
    )
    assert uidls(tmp_path, "uw") == ["499602d200000001", "499602d200000002", "3.c"]


def test_a_name_that_holds_its_uidl_keeps_it_whatever_the_source_says(tmp_path):
    """
    A message migrated in (or delivered with a given UIDL) has it in its
    name's U= field: a store configured to carry foreign UIDLs over (for
    other maildrops taken over in place) must not give it its X-UIDL.
    """
    maildir(
        tmp_path, {"cur/1.a,U=given-1:2,S": b"X-UIDL: header\n\n", "cur/2.b": b"X-UIDL: b\n\n"}
    )
    assert uidls(tmp_path, "xuidl") == ["given-1", "b"]
    assert uidls(tmp_path, "native") == ["given-1", "b"]


def test_recorded_uidls_stay(tmp_path):
    """
    Once listed, a carried-over UIDL is in the index and stays (source gone,
    uidl_source back to native); a message listed without one stays native
    even if the source names it later.
    """
    root = maildir(tmp_path, {"cur/1.a": b"X-UIDL: kept\n\n", "cur/2.b": b"\n"})
    assert uidls(tmp_path, "xuidl") == ["kept", "2.b"]
    index = (root / INDEX_FILE).read_text()
    assert "1.a\t16\tU=kept\n" in index and "2.b\t2\tU=\n" in index, index
    (root / "cur/2.b").write_bytes(b"X-UIDL: late\n")  # never mind: recorded native
    (root / "cur/1.a").rename(root / "cur/1.a:2,S")
    assert uidls(tmp_path, "xuidl") == ["kept", "2.b"]
    assert uidls(tmp_path, "native") == ["kept", "2.b"]
    (root / "cur/3.c").write_bytes(b"X-UIDL: new\n\n")
    assert uidls(tmp_path, "native") == ["kept", "2.b", "3.c"]


def test_a_second_lister_waits_for_the_index_and_keeps_the_carried_uidls(tmp_path, monkeypatch):
    """
    A login while LMTP's quota check is still reading the index (a fresh
    process, both listing one maildrop): the login never lists it without
    its carried-over UIDLs, neither then nor in the listing it caches.
    """
    root = maildir(tmp_path, {"cur/1.a": b"X-UIDL: kept\n\n", "cur/2.b": b"\n"})
    assert uidls(tmp_path, "xuidl") == ["kept", "2.b"]  # recorded in the index
    age_directories(root)  # (listings of fresh directories are not cached)
    store = MaildirStore(f"maildir:{tmp_path}/%u/Maildir", runInThread=synchronously)
    inLoad, goOn = threading.Event(), threading.Event()
    parse = MaildropCache._parse

    def slowParse(lines):  # the quota check's index read takes a moment
        if threading.current_thread().name == "usage":
            inLoad.set()
            goOn.wait(5)
        return parse(lines)

    monkeypatch.setattr(MaildropCache, "_parse", staticmethod(slowParse))
    usage = threading.Thread(target=store._scanUsage, args=(str(root),), name="usage")
    usage.start()
    assert inLoad.wait(5)
    listed: list[object] = []
    # The login, on the reactor thread: it must not list the maildrop now.
    threading.Timer(0.2, goOn.set).start()
    store.listing(str(root)).addCallback(listed.append)
    usage.join(5)
    assert [info.uid for info in listed[0]] == ["kept", "2.b"]  # type: ignore[attr-defined]
    assert uidls(tmp_path, "native") == ["kept", "2.b"]
    later: list[object] = []
    store.listing(str(root)).addCallback(later.append)  # cached in this process
    assert [info.uid for info in later[0]] == ["kept", "2.b"]  # type: ignore[attr-defined]


def test_an_index_with_carried_uidls_is_written_durably(tmp_path, monkeypatch):
    """
    The index may be the only record of carried-over UIDLs (their source
    gone): it is synced before it replaces the old one, and its directory
    after, so a power cut leaves one or the other, not an empty file.
    """
    root = maildir(tmp_path, {"cur/1.a": b"X-UIDL: kept\n\n"})
    synced: list[str] = []
    fsync = os.fsync

    def recording(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    assert uidls(tmp_path, "xuidl") == ["kept"]
    index = str(root / INDEX_FILE)
    assert [path.startswith(f"{index}.") for path in synced] == [True, False]
    assert synced[1] == str(root)
    synced.clear()
    assert uidls(tmp_path, "native") == ["kept"]
    (root / "cur/2.b").write_bytes(b"\n")
    assert uidls(tmp_path, "native") == ["kept", "2.b"]  # (a size counted: saved again)
    assert len(synced) == 2


def test_native_writes_the_index_as_before(tmp_path):
    root = maildir(tmp_path, {"cur/1.a": b"X-UIDL: kept\n\n"})
    assert uidls(tmp_path, "native") == ["1.a"]
    assert (root / INDEX_FILE).read_text() == "popserv-index 1\n1.a\t16\n"


def test_check_config_points_out_foreign_files(tmp_path):
    """check-config names the other servers' UIDL files it finds, and the setting."""
    import subprocess
    import sys

    from support import REPO

    root = maildir(tmp_path, {"cur/1.a": b"x\n"})
    (root / "dovecot-uidlist").write_text("3 V1 N2\n1 :1.a\n")
    (tmp_path / "passwd").write_text("alice:{PLAIN}pw\n")
    done = subprocess.run(
        [sys.executable, "-m", "popserv", "check-config", "--passwd", str(tmp_path / "passwd"),
         "--mail-location", f"maildir:{tmp_path}/%u/Maildir"],
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "found dovecot-uidlist in 1 maildrops; --uidl-source is native" in done.stdout, (
        done.stdout + done.stderr
    )
