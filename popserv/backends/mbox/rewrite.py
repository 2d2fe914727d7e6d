"""
UPDATE for a spool: removing messages by writing the spool anew.

Under the spool's locks (L{popserv.backends.mbox.lock}), the index is brought
up to date (so mail the MTA appended after the session's listing is in it and
kept), the messages kept are copied into a new file beside the spool
(C{.NAME.popserv-new.PID}), which is synced, given the spool's owner, group
and mode, and renamed over the spool; then the directory is synced.

A kill at any moment leaves the old spool (before the rename: a left-over
new file, removed by the next rewrite under the same locks) or the new one
(after it), never a mixture or a truncated one. The locks are held until
after the rename: an MTA waiting on the dotlock opens the spool only after
we released it, and so finds the new inode; one that locked the old inode
with C{fcntl} alone would re-check the path (as popserv's own deliveries do,
L{popserv.backends.mbox.lock.SpoolLock}).
"""

from __future__ import annotations

import os
from collections.abc import Collection

from popserv.backends.durable import syncDirectory
from popserv.backends.mbox.format import copyRange
from popserv.backends.mbox.index import (
    Entry,
    Index,
    indexPath,
    readIndex,
    refresh,
    stampOf,
    tailOf,
    writeIndex,
)
from popserv.backends.mbox.lock import LINK_PREFIX, SpoolLock, processAlive

__all__ = ["removeFromSpool", "NEW_SUFFIX"]

NEW_SUFFIX = ".popserv-new"


def _clearLeftovers(directory: str, name: str) -> None:
    """
    Remove new spools a killed rewrite left (we hold the locks: none is
    live), and dotlocks in the making whose process is dead.
    """
    rewrites = f".{name}{NEW_SUFFIX}."
    links = LINK_PREFIX % name
    for entry in os.listdir(directory):
        if entry.startswith(links):
            pid = entry[len(links) :].split(".", 1)[0]
            if not pid.isdigit() or processAlive(int(pid)):
                continue
        elif not entry.startswith(rewrites):
            continue
        try:
            os.unlink(os.path.join(directory, entry))
        except OSError:
            pass


def removeFromSpool(spool: str, uids: Collection[str], fmt: str, lockTimeout: float) -> Index:
    """
    Remove the messages with these UIDLs from the spool, keeping every other
    one (also those delivered since the listing). Blocking. Returns the
    spool's new index; one already gone counts as removed.
    """
    directory, name = os.path.split(spool)
    where = indexPath(spool)
    prefix = f".{name}{NEW_SUFFIX}."
    with SpoolLock(spool, timeout=lockTimeout) as lock:
        old = readIndex(where)
        index = refresh(lock.fd, old, fmt)
        gone = set(uids)
        keep = [e for e in index.entries if e.uid not in gone]
        if len(keep) == len(index.entries):
            if index is not old:
                writeIndex(where, index)
            return index
        _clearLeftovers(directory, name)
        temporary = os.path.join(directory, f"{prefix}{os.getpid()}")
        st = os.fstat(lock.fd)
        out = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            entries = _write(lock, out, keep)
            os.fsync(out)
            if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                os.fchown(out, st.st_uid, st.st_gid)
            os.fchmod(out, st.st_mode & 0o7777)
            os.rename(temporary, spool)
        except BaseException:
            os.close(out)
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise
        try:
            syncDirectory(directory)
            new = Index(stampOf(os.fstat(out)), fmt, tailOf(out, entries), entries)
        finally:
            os.close(out)
        writeIndex(where, new)
        return new


def _write(lock: SpoolLock, out: int, keep: list[Entry]) -> list[Entry]:
    """Copy the kept messages, each followed by its blank line; their new entries."""
    entries = []
    pos = 0
    for n, e in enumerate(keep):
        if n % 256 == 0:
            lock.touch()
        copyRange(lock.fd, out, e.start, e.end - e.start)
        last = os.pread(lock.fd, 1, e.end - 1) if e.end > e.body else b"\n"
        # A content without a final line feed gets one: its POP3 size (which
        # counts a final CRLF anyway) does not change.
        os.write(out, b"\n" if last == b"\n" else b"\n\n")
        shift = pos - e.start
        added = 0 if last == b"\n" else 1  # the line feed that ends its content now
        entries.append(
            Entry(
                e.start + shift, e.body + shift, e.end + shift + added, e.size, e.received,
                e.digest, e.xuidl, e.uid,
            )
        )  # fmt: skip
        pos += e.end - e.start + 1 + added
    return entries
