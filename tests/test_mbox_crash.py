"""
Crash safety of the mbox store's UPDATE: a process running popserv's UPDATE
(popserv.backends.mbox: list, then removeMessages) is killed with SIGKILL at
random moments, mostly in the middle of its rewrite, again and again, while a
separate process appends mail the way an MTA does (its own implementation of
the dotlock + fcntl protocol, as Postfix local and procmail follow it).

After every kill, the spool is checked through a fresh store:

- it parses, and every message in it is one the MTA delivered, byte for byte
  (by SHA-256), with its exact size; nothing is duplicated;
- every message the MTA logged as delivered is there, unless an UPDATE that
  chose it finished; for a killed UPDATE, the messages it chose are either
  all there (the old spool) or all gone (the new one), never some;
- each message keeps the UIDL it had when first seen (the index may be stale
  after a kill between the rename and the index write).

Default: 30 kills (a few seconds). Long mode, e.g.::

    POPSERV_MBOX_CRASH_KILLS=2000 python -m pytest -q -s tests/test_mbox_crash.py

POPSERV_MBOX_CRASH_SEED fixes the random choices (timing still varies).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KILLS = int(os.environ.get("POPSERV_MBOX_CRASH_KILLS", "30"))
SEED = int(os.environ.get("POPSERV_MBOX_CRASH_SEED", str(random.randrange(1 << 32))))
_SERIAL = re.compile(rb"^Message-ID: <(\d+)@crash>$", re.M)


# -- the MTA: its own locking, as Postfix local does it ------------------------------------


def _dotlock(path: str) -> None:
    while True:
        try:
            fd = os.open(path + ".lock", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                pid = int(Path(path + ".lock").read_text().strip() or "0")
                if pid > 1:
                    os.kill(pid, 0)
            except ProcessLookupError:
                try:
                    os.unlink(path + ".lock")  # stale: its process is dead
                except FileNotFoundError:
                    pass
                continue
            except (OSError, ValueError):
                pass
            time.sleep(0.002)
            continue
        os.write(fd, b"%d\n" % os.getpid())
        os.close(fd)
        return


def mta(spool: str, log: str, seed: int) -> None:
    """Deliver numbered messages until killed; log each once it is synced."""
    rng = random.Random(seed)
    serial = 0
    logfd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    while True:
        serial += 1
        lines = [b"Message-ID: <%d@crash>" % serial, b"Subject: %d" % serial, b""]
        for _ in range(rng.choice((3, 30, 300, 3000))):
            lines.append(rng.choice((b"From a line to quote", b"body %d" % rng.random(), b"")))
        message = b"\n".join(lines) + b"\n"
        stored = b"\n".join(b">" + x if x.startswith(b"From ") else x for x in lines) + b"\n"
        _dotlock(spool)
        fd = os.open(spool, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            os.write(fd, b"From mta@crash  Sat Dec  5 08:41:02 2026\n" + stored + b"\n")
            os.fsync(fd)
            digest = hashlib.sha256(message).hexdigest()
            os.write(logfd, b"%d %s\n" % (serial, digest.encode()))
        finally:
            os.close(fd)
            os.unlink(spool + ".lock")
        time.sleep(rng.random() * 0.01)


def update(root: str, seed: int) -> None:
    """One session's UPDATE: list, choose messages, say which, remove them."""
    sys.path.insert(0, str(REPO))
    from popserv.backends.mbox.store import MboxStore
    from popserv.threads import synchronously

    rng = random.Random(seed)
    store = MboxStore(f"{root}/%u", runInThread=synchronously)
    out: list = []
    store.openMailbox("alice").addCallback(out.append)
    mailbox = out.pop()
    mailbox.listMessages().addCallback(out.append)
    infos = out.pop()
    chosen = [i for i in infos if rng.random() < 0.3]
    said = []
    for info in chosen:
        reader = mailbox.openMessage(info)
        serial = _SERIAL.search(reader.read(200)).group(1).decode()
        reader.close()
        said.append(f"{serial}:{info.uid}")
    print("CHOSE " + " ".join(said), flush=True)
    mailbox.removeMessages(chosen).addCallback(out.append)
    print("DONE" if out.pop() == [] else "FAILED", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "mta":
        mta(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        update(sys.argv[2], int(sys.argv[3]))


# -- the test --------------------------------------------------------------------------------


def _run(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, __file__, *args],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
        **kw,
    )


def _logged(log: Path) -> dict[int, str]:
    out = {}
    for line in log.read_text().splitlines():
        serial, digest = line.split()
        out[int(serial)] = digest
    return out


def test_sigkill_during_update_while_an_mta_appends(tmp_path):
    from popserv.backends.mbox.store import MboxStore
    from popserv.octets import crlfSize
    from popserv.threads import synchronously

    rng = random.Random(SEED)
    spool, log = tmp_path / "alice", tmp_path / "delivered"
    log.touch()
    deliverer = _run("mta", str(spool), str(log), str(SEED))
    uids: dict[int, str] = {}  # serial -> the UIDL first seen
    removed: set[int] = set()
    stats = {"kills": 0, "all-gone": 0, "all-kept": 0, "finished": 0}
    try:
        while len(_logged(log)) < 20:
            time.sleep(0.01)
        for _ in range(KILLS):
            updater = _run("update", str(tmp_path), str(rng.randrange(1 << 32)))
            line = updater.stdout.readline()
            assert line.startswith("CHOSE"), line
            chosen = dict(x.split(":", 1) for x in line.split()[1:])
            for serial, uid in chosen.items():
                assert uids.setdefault(int(serial), uid) == uid, f"UIDL changed ({SEED})"
            # Mostly short delays: the rewrite takes a few milliseconds, and on a fast
            # machine longer ones would all land after it (a fifth kill at once).
            time.sleep(0 if rng.random() < 0.2 else rng.random() ** 3 * 0.03)
            updater.send_signal(signal.SIGKILL)
            rest = updater.communicate()[0]
            finished = "DONE" in rest
            stats["kills"] += 1
            # Check, through a store of its own (no memory shared with the killed one).
            logged = _logged(log)  # before listing: all of these must be listed
            store = MboxStore(f"{tmp_path}/%u", runInThread=synchronously)
            out: list = []
            store.openMailbox("alice").addCallback(out.append)
            mailbox = out.pop()
            mailbox.listMessages().addCallback(out.append)
            infos = out.pop()
            present: dict[int, str] = {}
            for info in infos:
                reader = mailbox.openMessage(info)
                data = b""
                while chunk := reader.read(65536):
                    data += chunk
                reader.close()
                serial = int(_SERIAL.search(data).group(1))
                assert serial not in present, f"message {serial} twice (seed {SEED})"
                present[serial] = info.uid
                assert crlfSize(data) == info.size
                if serial in logged:
                    assert hashlib.sha256(data).hexdigest() == logged[serial], serial
                assert uids.setdefault(serial, info.uid) == info.uid, f"UIDL changed ({SEED})"
            mailbox.close()
            chosenSerials = {int(serial) for serial in chosen}
            gone = chosenSerials - set(present)
            if finished:
                assert not gone & set(present)
                assert gone == chosenSerials, f"a finished UPDATE kept mail (seed {SEED})"
                stats["finished"] += 1
            elif gone:
                assert gone == chosenSerials, f"UPDATE half done: {gone} (seed {SEED})"
                stats["all-gone"] += 1
            else:
                stats["all-kept"] += 1
            removed |= gone
            missing = set(logged) - removed - set(present)
            assert not missing, f"delivered mail lost: {sorted(missing)} (seed {SEED})"
            assert not (set(present) & removed), f"removed mail came back (seed {SEED})"
    finally:
        deliverer.send_signal(signal.SIGKILL)
        deliverer.wait()
    print(f"\nmbox crash test: {stats}, {len(_logged(log))} delivered, seed {SEED}")
    # Some kills must land in the middle of a rewrite, before and after the rename.
    if KILLS >= 30:
        assert stats["all-kept"] and (stats["all-gone"] + stats["finished"]), stats
