"""
Delivering into a spool as an MDA does (Postfix C{local}, procmail).

The message is first spooled to an anonymous temporary file (LF line endings,
C{From } lines quoted): never whole in memory, and the spool stays unlocked
while a slow client sends it. The commit takes the spool's locks, appends a
C{From } line, the message and its blank line, syncs, and lists the spool
again (only what was appended is read) to give the message's UIDL. A given
UIDL is kept in the offset index (the message is stored as given, without an
C{X-UIDL} header), and found again by the message's digest if the spool is
rewritten by another program. If anything fails, the spool is truncated back to where
it was, as Postfix does.
"""

from __future__ import annotations

import os
import tempfile

from popserv.backends.mbox.format import LineFilter, copyRange, fromLine, quoter
from popserv.backends.mbox.index import Index, indexPath, readIndex, refresh, writeIndex
from popserv.backends.mbox.lock import SpoolLock
from popserv.interfaces import UIDConflict

__all__ = ["MboxDelivery", "ownerFor"]


def ownerFor(spool: str) -> tuple[int, int] | None:
    """
    The uid and gid a new spool gets when root creates it: those of the
    account named like the spool file, with group C{mail} where it exists
    (Debian's C{/var/mail} is C{root:mail} mode 2775).
    """
    if os.geteuid() != 0:
        return None
    import grp
    import pwd

    try:
        account = pwd.getpwnam(os.path.basename(spool))
    except KeyError:
        return None
    try:
        gid = grp.getgrnam("mail").gr_gid
    except KeyError:
        gid = account.pw_gid
    return account.pw_uid, gid


class MboxDelivery:
    """
    One delivery into the spool at C{spool}, blocking (see
    L{popserv.backends.threaded.ThreadedWriter}).
    """

    def __init__(
        self,
        spool: str,
        fmt: str,
        uid: str | None = None,
        received: float | None = None,
        lockTimeout: float = 30.0,
    ) -> None:
        self.spool = spool
        self.fmt = fmt
        self.uid = uid
        self.received = received
        self.lockTimeout = lockTimeout
        self._filter = LineFilter(quoter(fmt))
        self._file: tempfile._TemporaryFileWrapper | None = tempfile.TemporaryFile(  # type: ignore[type-arg]
            dir=os.path.dirname(spool) if os.access(os.path.dirname(spool), os.W_OK) else None
        )
        self._last = b"\n"

    def write(self, data: bytes) -> None:
        if self._file is None:
            raise ValueError("write after the delivery ended")
        self._put(self._filter.feed(data))

    def _put(self, data: bytes) -> None:
        if data:
            assert self._file is not None
            self._file.write(data)
            self._last = data[-1:]

    def commit(self) -> str:
        """Append the message to the spool under its locks; its UIDL."""
        if self._file is None:
            raise ValueError("commit after the delivery ended")
        self._put(self._filter.feed(b"", final=True))
        message, self._file = self._file, None
        try:
            message.flush()
            return self._append(message.fileno())
        finally:
            message.close()

    def _append(self, message: int) -> str:
        where = indexPath(self.spool)
        with SpoolLock(self.spool, create=True, timeout=self.lockTimeout) as lock:
            fd = lock.fd
            before = refresh(fd, readIndex(where), self.fmt)
            if self.uid is not None and any(self.uid == e.uid for e in before.entries):
                raise UIDConflict(f"UIDL {self.uid!r} is already in {self.spool}")
            st = os.fstat(fd)
            if st.st_size == 0 and st.st_uid == os.geteuid():
                owner = ownerFor(self.spool)
                if owner is not None:
                    os.fchown(fd, *owner)
            size = st.st_size
            try:
                self._appendAt(fd, size, message)
                os.fsync(fd)
                after = refresh(fd, before, self.fmt)
                uid = self._uidOf(after, size)
            except BaseException:
                os.ftruncate(fd, size)
                os.fsync(fd)
                raise
            writeIndex(where, after)
            return uid

    def _appendAt(self, fd: int, size: int, message: int) -> None:
        head = b""
        if size:
            end = os.pread(fd, 2, max(0, size - 2))
            head = b"" if end == b"\n\n" else b"\n" if end[-1:] == b"\n" else b"\n\n"
        head += fromLine(self.received)
        os.lseek(fd, size, os.SEEK_SET)
        os.write(fd, head)
        copyRange(message, fd, 0, os.fstat(message).st_size)
        os.write(fd, b"\n" if self._last == b"\n" else b"\n\n")

    def _uidOf(self, index: Index, size: int) -> str:
        entry = index.entries[-1]
        if entry.start < size:
            raise OSError("the delivered message is not where it was written")
        if self.uid is not None:
            entry.uid = self.uid  # checked unused above; kept by the index
        return entry.uid

    def abort(self) -> None:
        """Forget the message (idempotent); the spool was never touched."""
        message, self._file = self._file, None
        if message is not None:
            message.close()
