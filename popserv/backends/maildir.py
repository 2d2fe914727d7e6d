"""
Maildir storage (cr.yp.to/proto/maildir.html), as Dovecot and Postfix lay it out.

- Messages live in C{cur/} and C{new/}; C{tmp/} and dot-files are ignored, and
  so are symlinks (a message is never read through a link out of the maildrop).
- The UIDL is the unique part of the file name: the part before the C{:2,}
  info, without the C{,S=}/C{,W=} size fields. It survives flag changes, the
  move from C{new/} to C{cur/} and restarts. Names outside the RFC 1939 UIDL
  alphabet or over 70 characters are mapped to a digest of the name.
- Sizes: a C{,W=} field is the CRLF size and is trusted; otherwise the file is
  read once to count its bare LFs, and the result is cached in process by
  (device, inode, size, mtime).
- The maildrop is locked with C{flock} on C{.popserv.lock}: exclusive between
  sessions (in this and other processes) and released by the kernel if the
  process dies, so a crash never leaves a stale lock.
- Directory scans and removals run off the reactor thread.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from zope.interface import implementer

from popserv.errors import MaildropInUse, MessageVanished, PermanentFailure
from popserv.interfaces import IMailbox, IMailStore, IMessageReader, MessageInfo, validUID
from popserv.location import MailLocation
from popserv.threads import RunInThread, reactorThreads
from popserv.wire import CRLFSizer

__all__ = ["MaildirStore", "MaildirMailbox", "uniquePart", "uidFor", "LOCK_FILE"]

_log = Logger()

#: The lock file inside each maildrop. Never deleted: deleting a lock file
#: that others may have open is how lock races start.
LOCK_FILE = ".popserv.lock"

#: Subdirectories holding messages. cur/ is scanned first: a message moved
#: from new/ to cur/ during the scan is then missed once (it shows up next
#: session) rather than listed twice.
_SUBDIRS = ("cur", "new")

_READ_CHUNK = 1024 * 1024
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_LEADING_DIGITS = re.compile(r"\d+")


def uniquePart(name: str) -> str:
    """The unique part of a Maildir file name: no info, no S=/W= fields."""
    base = name.split(":", 1)[0]
    if "," not in base:
        return base
    first, *fields = base.split(",")
    kept = [f for f in fields if not (f.startswith("S=") or f.startswith("W="))]
    return ",".join([first, *kept])


def uidFor(unique: str) -> str:
    """The UIDL for a unique part: itself if RFC-valid, else a digest of it."""
    if validUID(unique):
        return unique
    digest = hashlib.sha256(unique.encode("utf-8", "surrogateescape")).hexdigest()
    return "~" + digest


def _sizeHints(name: str) -> dict[str, int]:
    hints = {}
    for field in name.split(":", 1)[0].split(",")[1:]:
        key, sep, value = field.partition("=")
        if sep and key in ("S", "W") and value.isdigit():
            hints[key] = int(value)
    return hints


class SizeCache:
    """Exact CRLF sizes by file identity, shared by all sessions of a store."""

    def __init__(self, limit: int = 500_000) -> None:
        self._sizes: dict[tuple[int, int, int, int], int] = {}
        self._limit = limit
        self._lock = threading.Lock()

    def get(self, st: os.stat_result) -> int | None:
        return self._sizes.get((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))

    def put(self, st: os.stat_result, size: int) -> None:
        with self._lock:
            if len(self._sizes) >= self._limit:
                self._sizes.clear()
            self._sizes[(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)] = size


@dataclass
class _Location:
    """Where one message's file is now; updated if another program renames it."""

    base: str  # the name before ":" (stable across flag changes)
    path: str


def _countSize(fd: int) -> int:
    sizer = CRLFSizer()
    while chunk := os.read(fd, _READ_CHUNK):
        sizer.feed(chunk)
    return sizer.size


@implementer(IMessageReader)
class _FileReader:
    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def read(self, size: int) -> bytes:
        if self._fd is None:
            return b""
        return os.read(self._fd, size)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


@implementer(IMailbox)
class MaildirMailbox:
    """One locked Maildir for one session."""

    def __init__(self, path: str, lockFD: int, store: MaildirStore) -> None:
        self.path = path
        self._lockFD: int | None = lockFD
        self._store = store

    def listMessages(self) -> Deferred[list[MessageInfo]]:
        return self._store.runInThread(self._scan)

    def _scan(self) -> list[MessageInfo]:
        found: list[tuple[tuple[int, str], MessageInfo]] = []
        seen: set[str] = set()
        cache = self._store.sizes
        for sub in _SUBDIRS:
            directory = os.path.join(self.path, sub)
            try:
                entries = list(os.scandir(directory))
            except FileNotFoundError:
                continue
            for entry in entries:
                name = entry.name
                if name.startswith(".") or not entry.is_file(follow_symlinks=False):
                    continue
                unique = uniquePart(name)
                uid = uidFor(unique)
                if uid in seen:
                    _log.warn(
                        "{maildir}: two files share the unique name {unique}; "
                        "serving the first only",
                        maildir=self.path,
                        unique=unique,
                    )
                    continue
                hints = _sizeHints(name)
                leading = _LEADING_DIGITS.match(unique)
                if "W" in hints and leading:
                    # Everything is in the name: no stat, no read.
                    size, order = hints["W"], int(leading.group())
                else:
                    try:
                        st = entry.stat(follow_symlinks=False)
                        size = hints.get("W")
                        if size is None:
                            size = self._countCached(entry.path, st, cache)
                    except FileNotFoundError:
                        continue  # moved or removed by another program meanwhile
                    order = int(leading.group()) if leading else int(st.st_mtime)
                seen.add(uid)
                base = name.split(":", 1)[0]
                found.append(
                    ((order, unique), MessageInfo(uid, size, key=_Location(base, entry.path)))
                )
        found.sort(key=lambda pair: pair[0])
        return [info for _, info in found]

    @staticmethod
    def _countCached(path: str, st: os.stat_result, cache: SizeCache) -> int:
        size = cache.get(st)
        if size is None:
            fd = os.open(path, _OPEN_FLAGS)
            try:
                size = _countSize(fd)
            finally:
                os.close(fd)
            cache.put(st, size)
        return size

    def _relocate(self, where: _Location) -> bool:
        """Find a message another program renamed (flags, new/ to cur/)."""
        for sub in _SUBDIRS:
            directory = os.path.join(self.path, sub)
            try:
                names = os.listdir(directory)
            except FileNotFoundError:
                continue
            for name in names:
                if name.split(":", 1)[0] == where.base:
                    where.path = os.path.join(directory, name)
                    return True
        return False

    def openMessage(self, info: MessageInfo) -> IMessageReader:
        where: _Location = info.key
        for _attempt in range(2):
            try:
                return _FileReader(os.open(where.path, _OPEN_FLAGS))
            except FileNotFoundError:
                if not self._relocate(where):
                    raise MessageVanished() from None
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise PermanentFailure("Message is not a regular file") from None
                raise
        raise MessageVanished()

    def removeMessages(self, infos: Sequence[MessageInfo]) -> Deferred[list[MessageInfo]]:
        return self._store.runInThread(self._remove, list(infos))

    def _remove(self, infos: list[MessageInfo]) -> list[MessageInfo]:
        failed = []
        for info in infos:
            where: _Location = info.key
            try:
                try:
                    os.unlink(where.path)
                except FileNotFoundError:
                    if self._relocate(where):
                        os.unlink(where.path)
                    # else: already gone, which is what was asked
            except OSError as e:
                _log.error(
                    "{maildir}: cannot remove {path}: {error}",
                    maildir=self.path,
                    path=where.path,
                    error=e,
                )
                failed.append(info)
        self._syncDirectories()
        return failed

    def _syncDirectories(self) -> None:
        """Make the removals durable before the client is told they happened."""
        for sub in _SUBDIRS:
            try:
                fd = os.open(os.path.join(self.path, sub), os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            except OSError:
                pass
            finally:
                os.close(fd)

    def close(self) -> None:
        fd, self._lockFD = self._lockFD, None
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock
            self._store._release(self.path)


@implementer(IMailStore)
class MaildirStore:
    """
    Maildrops found by expanding a L{MailLocation} for each user.

    @param createMissing: create a missing maildrop (cur/, new/, tmp/, mode
        0700) at first login, as Dovecot does, instead of failing it.
    """

    def __init__(
        self,
        location: MailLocation | str,
        runInThread: RunInThread | None = None,
        createMissing: bool = True,
    ) -> None:
        if isinstance(location, str):
            location = MailLocation.parse(location)
        self.location = location
        self.runInThread = runInThread or reactorThreads()
        self.createMissing = createMissing
        self.sizes = SizeCache()
        # Paths locked by this process. flock already excludes other
        # descriptors, but on NFS Linux emulates it with per-process POSIX
        # locks, which would let two sessions of one process in.
        self._held: set[str] = set()
        self._heldLock = threading.Lock()

    @property
    def description(self) -> str:
        return f"maildir:{self.location.template}"

    def openMailbox(self, user: str) -> Deferred[MaildirMailbox]:
        d = maybeDeferred(self.location.expand, user)
        return d.addCallback(lambda path: self.runInThread(self._open, path))

    def _open(self, path: str) -> MaildirMailbox:
        if not os.path.isdir(path):
            if not self.createMissing:
                raise PermanentFailure("Mailbox does not exist")
        if self.createMissing:
            for sub in ("cur", "new", "tmp"):
                os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)
        with self._heldLock:
            if path in self._held:
                raise MaildropInUse()
            self._held.add(path)
        try:
            fd = os.open(
                os.path.join(path, LOCK_FILE),
                os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
            )
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise MaildropInUse() from None
            except BaseException:
                os.close(fd)
                raise
        except BaseException:
            self._release(path)
            raise
        return MaildirMailbox(path, fd, self)

    def _release(self, path: str) -> None:
        with self._heldLock:
            self._held.discard(path)
