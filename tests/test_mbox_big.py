"""
Big spools: the mbox store's claims, checked without a benchmark.

Fast (always): a RETR of a multi-megabyte message from a spool holds well
under a megabyte of Python memory (tracemalloc), and so does the listing of
a spool of a few megabytes.

Long mode (skipped unless POPSERV_MBOX_BIG is set; e.g.
``POPSERV_MBOX_BIG=1 python -m pytest -q -s tests/test_mbox_big.py``): a
spool of 30,000 messages and 500 MB. The first login reads it once (under
64 MB of Python memory; timed without tracemalloc); a later login, also in a
fresh store (a restarted server: the index on disk), reads no message; after
one more delivery only that delivery and the message before it are read.
Timings are printed, not asserted.
"""

from __future__ import annotations

import os
import time
import tracemalloc

import pytest
from test_store_contract import deliver, listing, result

from popserv.backends.mbox import index as mboxindex
from popserv.backends.mbox.format import WINDOW
from popserv.backends.mbox.store import MboxStore
from popserv.octets import crlfSize
from popserv.threads import synchronously

FROM = b"From MAILER-DAEMON  Sat Dec  5 08:41:02 2026\n"


def writeSpool(path, count: int, bodySize: int) -> int:
    line = b"x" * 75 + b"\n"
    body = line * (bodySize // len(line))
    with open(path, "wb") as f:
        for n in range(count):
            f.write(FROM + b"Message-ID: <%d@big>\nSubject: %d\n\n" % (n, n) + body + b"\n")
        return f.tell()


def readAll(store, info, chunk=65536):
    mailbox = result(store.openMailbox("alice"))
    try:
        reader = mailbox.openMessage(info)
        total = 0
        while data := reader.read(chunk):
            assert len(data) <= chunk
            total += len(data)
        reader.close()
        return total
    finally:
        result(mailbox.close())


def peak(f, *args):
    tracemalloc.start()
    try:
        value = f(*args)
        return value, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_retr_and_listing_in_bounded_memory(tmp_path):
    path = tmp_path / "alice"
    writeSpool(path, 40, 100_000)  # 4 MB
    served = b"Subject: big\n\n" + (b"From quoted\n" + b"y" * 1000 + b"\n") * 6000  # 6 MB
    with open(path, "ab") as f:
        f.write(FROM + served.replace(b"\nFrom ", b"\n>From ") + b"\n")
    store = MboxStore(f"{tmp_path}/%u", runInThread=synchronously)
    infos, used = peak(listing, store)
    assert len(infos) == 41 and used < 3 * WINDOW, used
    assert infos[-1].size == crlfSize(served)
    length, used = peak(readAll, store, infos[-1])
    assert length == len(served) and used < 512 * 1024, used


@pytest.mark.skipif(not os.environ.get("POPSERV_MBOX_BIG"), reason="long mode: POPSERV_MBOX_BIG=1")
def test_30k_messages_500_mb(tmp_path, monkeypatch):
    path = tmp_path / "alice"
    size = writeSpool(path, 30_000, 16_700)
    assert size >= 500_000_000
    scanned = []
    real = mboxindex.scan

    def counting(data, start, end, fmt):
        scanned.append(end - start)
        return real(data, start, end, fmt)

    monkeypatch.setattr(mboxindex, "scan", counting)
    # Timed without tracemalloc (which makes it about three times slower),
    # then read again from scratch (no index) to measure its memory.
    started = time.perf_counter()
    infos = listing(MboxStore(f"{tmp_path}/%u", runInThread=synchronously))
    first = time.perf_counter() - started
    os.unlink(mboxindex.indexPath(str(path)))
    scanned.clear()
    store = MboxStore(f"{tmp_path}/%u", runInThread=synchronously)
    again, used = peak(listing, store)
    assert again == infos
    assert len(infos) == 30_000 and scanned == [size] and used < 64 << 20, used

    scanned.clear()
    started = time.perf_counter()
    assert len(listing(MboxStore(f"{tmp_path}/%u", runInThread=synchronously))) == 30_000
    second = time.perf_counter() - started
    started = time.perf_counter()
    assert len(listing(store)) == 30_000
    cached = time.perf_counter() - started
    assert scanned == []

    deliver(store, [b"Subject: one more\n\nhello\n"])
    started = time.perf_counter()
    after = listing(MboxStore(f"{tmp_path}/%u", runInThread=synchronously))
    appended = time.perf_counter() - started
    assert len(after) == 30_001 and [i.uid for i in after[:-1]] == [i.uid for i in infos]
    assert sum(scanned) < 40_000, scanned
    print(
        f"\n30k/{size / 1e6:.0f} MB: first login {first:.2f} s ({used / 1e6:.1f} MB peak),"
        f" restarted {second:.3f} s, cached {cached * 1e3:.2f} ms, after an append"
        f" {appended:.3f} s ({sum(scanned)} bytes read)"
    )
