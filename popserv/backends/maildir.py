"""
Maildir storage (cr.yp.to/proto/maildir.html), as Dovecot and Postfix lay it out.

- Messages live in C{cur/} and C{new/}; C{tmp/} and dot-files are ignored, and
  so are symlinks (a message is never read through a link out of the maildrop).
- The UIDL is the unique part of the file name: the part before the C{:2,}
  info, without the C{,S=}/C{,W=} size fields. It survives flag changes, the
  move from C{new/} to C{cur/} and restarts. Names outside the RFC 1939 UIDL
  alphabet or over 70 characters are mapped to a digest of the name.
- Sizes: a C{,W=} field is the CRLF size and is trusted; otherwise the file is
  read once to count its bare LFs. Sizes are kept by base name (a delivered
  Maildir file never changes) in memory and in C{.popserv.index} in the
  maildrop, written atomically and shared by every process; the listing is
  reused while the directories' mtimes say nothing changed, and made again
  from the previous one (only new files read) when they do.
- The maildrop is locked for the session with a byte-range lock in one shared
  lock file (see L{popserv.backends.locking}): exclusive between sessions in
  this and other processes, one descriptor per process rather than per
  session, and released by the kernel if the process dies, so a crash never
  leaves a stale lock.
- Directory scans and removals run off the reactor thread.
- For LOGIN-DELAY, a user's last login is the mtime of C{.popserv.login} in
  the maildrop, so every worker and node serving it sees the same one.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from functools import partial
from operator import itemgetter

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

from popserv.backends.locking import (
    LOCK_FILE,
    SHARED_LOCK_FILE,
    PerMaildropLocks,
    SharedLockFile,
)
from popserv.errors import InvalidUserName, MessageVanished, PermanentFailure
from popserv.interfaces import (
    ILoginMemory,
    IMailbox,
    IMailStore,
    IMessageReader,
    MessageInfo,
    validUID,
)
from popserv.location import MailLocation
from popserv.octets import CRLFSizer
from popserv.threads import RunInThread, reactorThreads

__all__ = [
    "MaildirStore",
    "MaildirMailbox",
    "MaildropCache",
    "uniquePart",
    "uidFor",
    "LOCK_FILE",
    "INDEX_FILE",
]

_log = Logger()


#: Subdirectories holding messages. cur/ is scanned first: a message moved
#: from new/ to cur/ during the scan is then missed once (it shows up next
#: session) rather than listed twice.
_SUBDIRS = ("cur", "new")

_READ_CHUNK = 1024 * 1024
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_LEADING_DIGITS = re.compile(r"[0-9]+")


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
        if sep and key in ("S", "W") and value.isascii() and value.isdigit():
            hints[key] = int(value)
    return hints


INDEX_FILE = ".popserv.index"

#: Its mtime is the user's last login (L{MaildirStore.recordLogin}).
LOGIN_FILE = ".popserv.login"
_INDEX_HEADER = "popserv-index 1\n"

#: A directory whose mtime is this recent may still change within the same
#: timestamp tick: its listing is not trusted from the cache (nanoseconds).
_RACY_NS = 2_000_000_000


class MaildropCache:
    """
    What is known about one maildrop without reading it again: the exact
    CRLF size of each message by its base name (Maildir files never change
    once delivered), persisted in C{.popserv.index} so that other processes
    and later starts share it, and the last listing with the directory
    stamps it was made under.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.sizes: dict[str, int] = {}
        self.loaded = False
        self.listing: tuple[tuple[int, ...], tuple[MessageInfo, ...]] | None = None

    def load(self) -> None:
        """Read the index file; a missing or damaged one is simply rebuilt."""
        self.loaded = True
        try:
            with open(
                os.path.join(self.path, INDEX_FILE), encoding="utf-8", errors="surrogateescape"
            ) as f:
                if f.readline() != _INDEX_HEADER:
                    return
                sizes = {}
                for line in f:
                    base, sep, size = line.rstrip("\n").rpartition("\t")
                    if not sep or not (size.isascii() and size.isdigit()):
                        return  # damaged: ignore it all
                    sizes[base] = int(size)
        except (OSError, ValueError):
            return
        sizes.update(self.sizes)
        self.sizes = sizes

    def save(self, live: set[str] | None) -> None:
        """
        Write the sizes of the messages still present (base names C{live};
        None: all of them), atomically (a reader sees the old file or the new
        one, never a mix). Failure (disk full, read-only maildrop) only costs
        recounting later.
        """
        if live is not None:
            self.sizes = {base: size for base, size in self.sizes.items() if base in live}
        temporary = os.path.join(self.path, f"{INDEX_FILE}.{os.getpid()}.{threading.get_ident()}")
        try:
            with open(temporary, "w", encoding="utf-8", errors="surrogateescape") as f:
                f.write(_INDEX_HEADER)
                f.write("".join([f"{base}\t{size}\n" for base, size in self.sizes.items()]))
            os.replace(temporary, os.path.join(self.path, INDEX_FILE))
        except OSError as e:
            _log.warn(
                "{maildir}: cannot write the size index: {error}", maildir=self.path, error=e
            )
            try:
                os.unlink(temporary)
            except OSError:
                pass


_unique = itemgetter(1)


#: MessageInfo(*fields) without the named tuple's Python-level __new__.
_newInfo = partial(tuple.__new__, MessageInfo)


def _infos(found: list[tuple[int, str, str, int, str]]) -> tuple[MessageInfo, ...]:
    """
    The listing's entries for sorted C{found}. Shared by sessions, never
    copied; made in listing order, with fresh copies of the values LIST,
    UIDL and STAT read: objects made while reading the directory lie in its
    (hashed) order, and walking them in listing order missed the CPU cache
    for each (100k: LIST and UIDL took 36 ms instead of 14).
    """
    return tuple(
        [
            _newInfo((uid.encode().decode(), size + 0, path, order))
            for order, _, uid, size, path in found
        ]
    )


_buffers = threading.local()


def _countSize(fd: int) -> int:
    # Read into one buffer per thread: a fresh megabyte for each of 100,000
    # files costs more in allocation and page faults than the counting.
    buffer = getattr(_buffers, "buffer", None)
    if buffer is None:
        buffer = _buffers.buffer = bytearray(_READ_CHUNK)
    sizer = CRLFSizer()
    while n := os.readv(fd, (buffer,)):
        sizer.feed(buffer, n)
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


def _base(path: str) -> str:
    return os.path.basename(path).split(":", 1)[0]


@implementer(IMailbox)
class MaildirMailbox:
    """
    One locked Maildir for one session. A message's C{key} is the path of its
    file at listing time; if another program renames it (a flag change, the
    move from new/ to cur/), the new path is found by its base name.
    """

    __slots__ = ("path", "_locked", "_store", "_moved")

    def __init__(self, path: str, store: MaildirStore, locked: bool = True) -> None:
        self.path = path
        self._locked = locked
        self._store = store
        self._moved: dict[str, str] | None = None  # made when a file is found renamed

    def listMessages(self) -> Deferred[tuple[MessageInfo, ...]]:
        # Two stat calls tell whether the cached listing still holds; only a
        # real scan (which may read many files) goes to a thread.
        cached = self._cachedListing()
        if cached is not None:
            return succeed(cached)
        return self._store.runInThread(self._scan)

    def _cachedListing(self) -> tuple[MessageInfo, ...] | None:
        cache = self._store.peekCache(self.path)
        if cache is None or cache.listing is None:
            return None
        stamps = self._stamps()
        if stamps is not None and cache.listing[0] == stamps:
            return cache.listing[1]
        return None

    def _stamps(self) -> tuple[int, ...] | None:
        stamps: list[int] = []
        for sub in _SUBDIRS:
            try:
                st = os.stat(os.path.join(self.path, sub))
            except FileNotFoundError:
                stamps += [0, 0]
                continue
            stamps += [st.st_ino, st.st_mtime_ns]
        if time.time_ns() - max(stamps[1::2]) < _RACY_NS:
            return None  # too fresh to vouch for
        return tuple(stamps)

    def _scan(self) -> tuple[MessageInfo, ...]:
        cache = self._store.cacheFor(self.path)
        stamps = self._stamps()
        if stamps is not None and cache.listing is not None and cache.listing[0] == stamps:
            return cache.listing[1]  # nothing was added, removed or renamed
        if not cache.loaded:
            cache.load()
        entries: list[os.DirEntry[str]] = []
        for sub in _SUBDIRS:
            try:
                entries += list(os.scandir(os.path.join(self.path, sub)))
            except FileNotFoundError:
                continue
        infos, counted = None, 0
        if cache.listing is not None:
            infos, counted = self._relisted(cache, cache.listing[1], entries)
        if infos is None:
            infos = self._listed(cache, entries, counted)
        if len(infos) < self._store.cacheThreshold:
            # Small maildrops are cheap to list again (their index is on disk):
            # holding many of them in memory would cost more than it saves.
            self._store.forget(self.path)
        elif stamps is not None and stamps == self._stamps():
            cache.listing = (stamps, infos)
        return infos

    def _listed(
        self, cache: MaildropCache, entries: list[os.DirEntry[str]], counted: int = 0
    ) -> tuple[MessageInfo, ...]:
        """The listing made from scratch (C{counted} sizes were counted already)."""
        sizes = cache.sizes
        found, more, indexed, width = self._collect(sizes, entries, set())
        counted += more
        if width:
            # Every name starts with a number of the same width (the delivery
            # time, as Maildir names do): the names alone sort the same, and
            # sorting strings is three times faster than sorting tuples.
            found.sort(key=_unique)
        else:
            found.sort()
        infos = _infos(found)
        stale = len(sizes) - indexed  # sizes of messages no longer present
        if counted or stale > 1024:
            cache.save({_base(info.key) for info in infos} if stale else None)
        return infos

    def _relisted(
        self,
        cache: MaildropCache,
        previous: tuple[MessageInfo, ...],
        entries: list[os.DirEntry[str]],
    ) -> tuple[tuple[MessageInfo, ...] | None, int]:
        """
        The listing again after a change, from the previous one, and how
        many sizes were counted for it. A message still at its path keeps
        its entry, and only the other files are read: new mail in a big
        leave-on-server maildrop costs a directory read, not the whole
        listing made again (100k: 480 -> 200 ms). No listing if a new file
        would not sort after the messages kept (a rename, an older name): it
        is then made from scratch.
        """
        known = {info.key for info in previous}
        present = {entry.path for entry in entries if entry.is_file(follow_symlinks=False)}
        kept = [info for info in previous if info.key in present]
        fresh = [entry for entry in entries if entry.path not in known]
        sizes = cache.sizes
        found, counted, _, _ = self._collect(sizes, fresh, {info.uid for info in kept})
        found.sort()
        if found and kept:
            last = kept[-1]
            if found[0][:2] <= (last.received, uniquePart(_base(last.key))):
                return None, counted
        infos = (*kept, *_infos(found))
        if counted:
            # Rewritten whole anyway: drop the sizes of messages gone meanwhile.
            cache.save({_base(info.key) for info in infos})
        return infos, counted

    def _collect(
        self, sizes: dict[str, int], entries: list[os.DirEntry[str]], seen: set[str]
    ) -> tuple[list[tuple[int, str, str, int, str]], int, int, int | None]:
        """
        What the files C{entries} hold, unsorted: (order, unique, uid, size,
        path) each; how many sizes were counted now; how many of them have a
        size in C{sizes}; the width of every name's leading number (0: not
        all alike). A UID already in C{seen} is a duplicate and skipped.
        """
        counted = indexed = 0
        width: int | None = None
        found: list[tuple[int, str, str, int, str]] = []
        for entry in entries:
            name = entry.name
            if name[0] == "." or not entry.is_file(follow_symlinks=False):
                continue
            base = name.partition(":")[0]
            unique = uniquePart(base) if "," in base else base
            uid = unique if validUID(unique) else uidFor(unique)
            if uid in seen:
                _log.warn(
                    "{maildir}: two files share the unique name {unique}; serving the first only",
                    maildir=self.path,
                    unique=unique,
                )
                continue
            size = sizes.get(base)
            if size is None and ",W=" in base:
                size = _sizeHints(name).get("W")
            leading = _LEADING_DIGITS.match(unique)
            try:
                if size is None:
                    fd = os.open(entry.path, _OPEN_FLAGS)
                    try:
                        size = _countSize(fd)
                    finally:
                        os.close(fd)
                    sizes[base] = size
                    counted += 1
                if leading:
                    order = int(leading.group())
                    if width != leading.end():
                        width = leading.end() if width is None else 0
                else:
                    order = int(entry.stat(follow_symlinks=False).st_mtime)
                    width = 0
            except FileNotFoundError:
                continue  # moved or removed by another program meanwhile
            seen.add(uid)
            if base in sizes:
                indexed += 1
            found.append((order, unique, uid, size, entry.path))
        return found, counted, indexed, width

    def _current(self, info: MessageInfo) -> str:
        if self._moved is None:
            return info.key
        return self._moved.get(_base(info.key), info.key)

    def _relocate(self, info: MessageInfo) -> str | None:
        """Find a message another program renamed (flags, new/ to cur/)."""
        base = _base(info.key)
        for sub in _SUBDIRS:
            directory = os.path.join(self.path, sub)
            try:
                names = os.listdir(directory)
            except FileNotFoundError:
                continue
            for name in names:
                if name.split(":", 1)[0] == base:
                    path = os.path.join(directory, name)
                    if self._moved is None:
                        self._moved = {}
                    self._moved[base] = path
                    return path
        return None

    def openMessage(self, info: MessageInfo) -> IMessageReader:
        path: str | None = self._current(info)
        for _attempt in range(2):
            if path is None:
                break
            try:
                return _FileReader(os.open(path, _OPEN_FLAGS))
            except FileNotFoundError:
                path = self._relocate(info)
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
            path = self._current(info)
            try:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    moved = self._relocate(info)
                    if moved is not None:
                        os.unlink(moved)
                    # else: already gone, which is what was asked
            except OSError as e:
                _log.error(
                    "{maildir}: cannot remove {path}: {error}",
                    maildir=self.path,
                    path=path,
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
        if self._locked:
            self._locked = False
            self._store.locks.release(self.path)


@implementer(IMailStore, ILoginMemory)
class MaildirStore:
    """
    Maildrops found by expanding a L{MailLocation} for each user.

    @param createMissing: create a missing maildrop (cur/, new/, tmp/, mode
        0700) at first login, as Dovecot does, instead of failing it.
    @param lockFile: the shared lock file of every maildrop of this store
        (default: C{.popserv-locks} in the mail root); every process serving
        the same maildrops must use the same one.
    """

    def __init__(
        self,
        location: MailLocation | str,
        runInThread: RunInThread | None = None,
        createMissing: bool = True,
        maxCachedMaildrops: int = 1024,
        cacheThreshold: int = 0,
        lockFile: str | None = None,
    ) -> None:
        if isinstance(location, str):
            location = MailLocation.parse(location)
        self.location = location
        self.runInThread = runInThread or reactorThreads()
        self.createMissing = createMissing
        self._caches: OrderedDict[str, MaildropCache] = OrderedDict()
        self._cachesLock = threading.Lock()
        self.maxCachedMaildrops = maxCachedMaildrops
        #: Maildrops with fewer messages are not kept in memory between logins.
        self.cacheThreshold = cacheThreshold
        self.lockFile = lockFile
        self._locks: SharedLockFile | PerMaildropLocks | None = None

    @property
    def description(self) -> str:
        return f"maildir:{self.location.template}"

    def openMailbox(self, user: str) -> Deferred[MaildirMailbox]:
        # A few local syscalls (stat, open, a non-blocking flock): cheaper on
        # the calling thread than a trip through the thread pool.
        try:
            return succeed(self._open(self.location.expand(user)))
        except Exception:
            return fail()

    def _open(self, path: str) -> MaildirMailbox:
        if not os.path.isdir(os.path.join(path, "cur")):
            if not self.createMissing:
                raise PermanentFailure("Mailbox does not exist")
            for sub in ("cur", "new", "tmp"):
                os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)
        self.locks.acquire(path)
        return MaildirMailbox(path, self)

    # -- ILoginMemory: a stat or a utime, quick enough for the calling thread --

    def lastLogin(self, user: str) -> float | None:
        try:
            path = os.path.join(self.location.expand(user), LOGIN_FILE)
            return os.stat(path, follow_symlinks=False).st_mtime_ns / 1e9
        except (FileNotFoundError, NotADirectoryError, InvalidUserName):
            return None

    def recordLogin(self, user: str, when: float) -> None:
        path = os.path.join(self.location.expand(user), LOGIN_FILE)
        stamp = int(when * 1e9)
        try:
            os.utime(path, ns=(stamp, stamp), follow_symlinks=False)
            return
        except FileNotFoundError:
            pass
        try:
            # O_EXCL: never open what appeared meanwhile (a FIFO would block).
            os.close(os.open(path, _CREATE_FLAGS, 0o600))
        except FileExistsError:
            pass
        os.utime(path, ns=(stamp, stamp), follow_symlinks=False)

    def cacheFor(self, path: str) -> MaildropCache:
        """The cache of one maildrop (the least recently used are dropped)."""
        with self._cachesLock:
            cache = self._caches.get(path)
            if cache is None:
                cache = self._caches[path] = MaildropCache(path)
                while len(self._caches) > self.maxCachedMaildrops:
                    self._caches.popitem(last=False)
            else:
                self._caches.move_to_end(path)
            return cache

    def peekCache(self, path: str) -> MaildropCache | None:
        return self._caches.get(path)

    def forget(self, path: str) -> None:
        with self._cachesLock:
            self._caches.pop(path, None)

    @property
    def locks(self) -> SharedLockFile | PerMaildropLocks:
        """The maildrop locks: one shared lock file if possible (L{popserv.backends.locking})."""
        if self._locks is None:
            self._locks = self._makeLocks()
        return self._locks

    def _makeLocks(self) -> SharedLockFile | PerMaildropLocks:
        lockPath = self.lockFile or os.path.join(self.location.root, SHARED_LOCK_FILE)
        try:
            os.makedirs(os.path.dirname(lockPath) or ".", exist_ok=True)
            return SharedLockFile(lockPath)
        except OSError as e:
            _log.warn(
                "cannot use the shared lock file {path} ({error}); locking each "
                "maildrop with its own lock file instead",
                path=lockPath,
                error=e,
            )
            return PerMaildropLocks()
