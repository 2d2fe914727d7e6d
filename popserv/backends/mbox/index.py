"""
The offset index of a spool: where each message is, its size and its UIDL,
so that a login reads no message when the spool has not changed, and only
what was appended when it has grown.

The index is valid for the spool whose device, inode, size, mtime and ctime
it records (any write changes the ctime, which nothing can set back).
When the spool has grown on the same inode and the bytes before its last
indexed message are unchanged, only that message and what follows are read
again. Otherwise (a rewrite by a mail reader, a truncation) the whole spool
is read again, and each message gets back the UIDL it had by its digest.

UIDLs: a message's C{X-UIDL} if it is valid and unique in the spool (the
sender controls that header), else one made from its digest, with C{.2},
C{.3} ... for identical messages. Once given, a UIDL is kept in the index:
it survives appends, removals and rewrites.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from popserv.backends.mbox.format import Scanned, scan

__all__ = [
    "Entry",
    "Index",
    "readIndex",
    "writeIndex",
    "refresh",
    "stampOf",
    "indexPath",
    "tailOf",
]

_MAGIC = "popserv-mbox-index 1"
#: Bytes before the last message's separator whose digest is kept, to tell an
#: append from a rewrite.
_TAIL = 4096


@dataclass(slots=True)
class Entry:
    """One listed message: where it is in the spool, and its UIDL."""

    start: int
    body: int
    end: int
    size: int
    received: float | None
    digest: str
    xuidl: str | None
    uid: str


Stamp = tuple[int, int, int, int, int]


def stampOf(st: os.stat_result) -> Stamp:
    """What identifies one state of a spool: device, inode, size, mtime, ctime."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(slots=True)
class Index:
    """The messages of one state of a spool (L{stamp}), in spool order."""

    stamp: Stamp
    fmt: str
    tail: str = ""
    entries: list[Entry] = field(default_factory=list)
    #: The session listing made from it, kept by the store (not stored).
    listing: tuple[Any, ...] | None = None


def indexPath(spool: str) -> str:
    """Where the index of C{spool} lives: C{.NAME.popserv-index} beside it."""
    directory, name = os.path.split(spool)
    return os.path.join(directory, f".{name}.popserv-index")


def readIndex(path: str) -> Index | None:
    """The index stored at C{path}, or None (missing or unreadable: read the spool)."""
    try:
        with open(path, encoding="ascii") as f:
            head = f.readline().split()
            if " ".join(head[:2]) != _MAGIC or len(head) != 9:
                return None
            stamp = tuple(int(x) for x in head[2:7])
            index = Index(stamp, head[7], "" if head[8] == "-" else head[8])  # type: ignore[arg-type]
            add = index.entries.append
            for line in f:
                s, b, e, z, r, d, x, u = line.split()
                add(
                    Entry(
                        int(s), int(b), int(e), int(z), None if r == "-" else float(r),
                        d, None if x == "-" else x[1:], u,
                    )
                )  # fmt: skip
            return index
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def writeIndex(path: str, index: Index) -> None:
    """Store C{index} at C{path} atomically; a failure only costs a later re-read."""
    lines = [f"{_MAGIC} {' '.join(map(str, index.stamp))} {index.fmt} {index.tail or '-'}\n"]
    lines.extend(
        f"{e.start} {e.body} {e.end} {e.size} {'-' if e.received is None else repr(e.received)} "
        f"{e.digest} {'-' if e.xuidl is None else '=' + e.xuidl} {e.uid}\n"
        for e in index.entries
    )
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.rename(temporary, path)
    except OSError:
        try:
            os.unlink(temporary)
        except OSError:
            pass


def tailOf(fd: int, entries: list[Entry]) -> str:
    """A digest of the bytes before the last message's content (tells appends from rewrites)."""
    if not entries:
        return ""
    end = entries[-1].body
    start = max(0, end - _TAIL)
    return hashlib.sha1(os.pread(fd, end - start, start)).hexdigest()


def _assign(kept: list[Entry], found: list[Scanned], reuse: dict[str, list[str]]) -> list[Entry]:
    """UIDLs for the messages C{found} after C{kept}, taking back C{reuse}'s by digest."""
    taken = {e.uid for e in kept}
    reserved = {uid for uids in reuse.values() for uid in uids}
    xuidls = Counter(e.xuidl for e in kept if e.xuidl)
    xuidls.update(s.xuidl for s in found if s.xuidl)
    out = []
    for s in found:
        uid = None
        old = reuse.get(s.digest)
        while old:
            candidate = old.pop(0)
            if candidate not in taken:
                uid = candidate
                break
        if uid is None and s.xuidl and xuidls[s.xuidl] == 1:
            if s.xuidl not in taken and s.xuidl not in reserved:
                uid = s.xuidl
        if uid is None:
            uid, n = s.digest, 1
            while uid in taken or uid in reserved:
                n += 1
                uid = f"{s.digest}.{n}"
        taken.add(uid)
        out.append(Entry(s.start, s.body, s.end, s.size, s.received, s.digest, s.xuidl, uid))
    return out


def refresh(fd: int, old: Index | None, fmt: str) -> Index:
    """
    The index of the spool open at C{fd} (locked against writers by the
    caller), from C{old} where it still holds: C{old} itself if the spool has
    not changed, else C{old} extended by a read of what was appended, else a
    read of the whole spool.
    """
    stamp = stampOf(os.fstat(fd))
    if old is not None and old.stamp == stamp and old.fmt == fmt:
        return old
    size = stamp[2]
    kept: list[Entry] = []
    reuse: dict[str, list[str]] = {}
    begin = 0
    if old is not None and old.fmt == fmt:
        # Equal sizes are no append (a mail reader may have rewritten in place).
        grown = old.stamp[:2] == stamp[:2] and size > old.stamp[2]
        if grown and old.entries and tailOf(fd, old.entries) == old.tail:
            kept = old.entries[:-1]
            last = old.entries[-1]
            begin = last.start
            reuse[last.digest] = [last.uid]
        else:
            for e in old.entries:
                reuse.setdefault(e.digest, []).append(e.uid)
    found: list[Scanned] = []
    if size > begin:
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as data:
            found = scan(data, begin, size, fmt)
    entries = kept + _assign(kept, found, reuse)
    return Index(stamp, fmt, tailOf(fd, entries), entries)
