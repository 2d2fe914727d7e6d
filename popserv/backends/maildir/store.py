"""
The Maildir store: maildrops found by expanding a mail location, opened and
locked for one session each, delivered into, listed for migration; and the
users' last logins.

  - A message's UIDL, size and order come from its name and the index (see
    L{popserv.backends.maildir.names}, L{popserv.backends.maildir.scan}).
  - The maildrop is locked for the session with a byte-range lock in one shared
    lock file (see L{popserv.backends.locking}): exclusive between sessions in
    this and other processes, one descriptor per process rather than per
    session, and released by the kernel if the process dies, so a crash never
    leaves a stale lock. Deliveries take no lock.
  - Directory scans, removals and deliveries run off the reactor thread.
  - For LOGIN-DELAY, a user's last login is the mtime of C{.popserv.login} in
    the maildrop, so every worker and node serving it sees the same one.
"""

from __future__ import annotations

import errno
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

from popserv.backends.locking import SHARED_LOCK_FILE, PerMaildropLocks, SharedLockFile
from popserv.backends.maildir import scan
from popserv.backends.maildir.delivery import MaildirDelivery, makeMaildir
from popserv.backends.maildir.foreign import parseSource
from popserv.backends.maildir.index import MaildropCache
from popserv.backends.maildir.names import baseName
from popserv.backends.maildir.walk import maildropUsers
from popserv.backends.threaded import ThreadedWriter
from popserv.errors import InvalidUserName, MessageVanished, PermanentFailure
from popserv.interfaces import (
    ILoginMemory,
    IMailbox,
    IMaildropUsage,
    IMailStore,
    IMessageReader,
    InvalidUID,
    MessageInfo,
    validUID,
)
from popserv.listing import Listing
from popserv.location import MailLocation
from popserv.threads import RunInThread, reactorThreads

__all__ = ["MaildirStore", "MaildirMailbox", "LOGIN_FILE"]

_log = Logger()

#: Its mtime is the user's last login (L{MaildirStore.recordLogin}).
LOGIN_FILE = ".popserv.login"

_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


@implementer(IMessageReader)
class _FileReader:
    transferForm = False

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
    """
    One locked Maildir for one session. A message's C{key} is the path of its
    file at listing time, relative to the maildir (C{cur/NAME}: short, so a
    listing stays small); if another program renames it (a flag change, the
    move from new/ to cur/), the new path is found by its base name.
    """

    __slots__ = ("path", "_locked", "_store", "_moved")

    def __init__(self, path: str, store: MaildirStore, locked: bool = True) -> None:
        self.path = path
        self._locked = locked
        self._store = store
        self._moved: dict[str, str] | None = None  # made when a file is found renamed

    def listMessages(self) -> Deferred[Listing]:
        return self._store.listing(self.path)

    def _current(self, info: MessageInfo) -> str:
        path = os.path.join(self.path, info.key)
        if self._moved is None:
            return path
        return self._moved.get(baseName(info.key), path)

    def _relocate(self, info: MessageInfo) -> str | None:
        """Find a message another program renamed (flags, new/ to cur/)."""
        base = baseName(info.key)
        for sub in scan.SUBDIRS:
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
                return _FileReader(os.open(path, scan.OPEN_FLAGS))
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
        for sub in scan.SUBDIRS:
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


def _usage(infos: Listing) -> tuple[int, int]:
    return len(infos), infos.totalSize


@implementer(IMailStore, ILoginMemory, IMaildropUsage)
class MaildirStore:
    """
    Maildrops found by expanding a L{MailLocation} for each user.

    @param createMissing: create a missing maildrop (cur/, new/, tmp/, mode
        0700) at first login, as Dovecot does, instead of failing it.
    @param lockFile: the directory of the shared lock files of every
        maildrop of this store (default: C{.popserv-locks.d} in the mail
        root); every process serving the same maildrops must use the same one.
    @param uidlSource: C{uidl_source}: UIDLs carried over from the previous
        server (L{popserv.backends.maildir.foreign}), or C{native}.
    """

    def __init__(
        self,
        location: MailLocation | str,
        runInThread: RunInThread | None = None,
        createMissing: bool = True,
        maxCachedMaildrops: int = 1024,
        cacheThreshold: int = 0,
        lockFile: str | None = None,
        uidlSource: str = "native",
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
        #: Where a message's UIDL comes from at first listing (see
        #: L{popserv.backends.maildir.foreign}); None: its name (native).
        self.uidlSource = None if uidlSource == "native" else parseSource(uidlSource)

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
        self._ensure(path)
        self.locks.acquire(path)
        return MaildirMailbox(path, self)

    def _ensure(self, path: str) -> None:
        """A missing maildrop is created (cur/, new/, tmp/, mode 0700), or refused."""
        if not os.path.isdir(os.path.join(path, "cur")):
            if not self.createMissing:
                raise PermanentFailure("Mailbox does not exist")
            makeMaildir(path)

    # -- deliveries and migration (IMailStore) --

    def deliverMessage(
        self, user: str, uid: str | None = None, received: float | None = None
    ) -> Deferred[ThreadedWriter]:
        """
        Deliver into C{user}'s maildrop (see L{MaildirDelivery}); a given
        UIDL is kept in the name (L{popserv.backends.maildir.names}). Its
        commit reads the maildrop's names once to refuse a UIDL present.
        """
        try:
            if uid is not None and not validUID(uid):
                raise InvalidUID(f"not an RFC 1939 UIDL: {uid!r}")
            path = self.location.expand(user)
        except Exception:
            return fail()
        return self.runInThread(self._startDelivery, path, uid, received)

    def _startDelivery(self, path: str, uid: str | None, received: float | None) -> ThreadedWriter:
        self._ensure(path)
        os.makedirs(os.path.join(path, "tmp"), mode=0o700, exist_ok=True)
        return ThreadedWriter(MaildirDelivery(path, uid, received), self.runInThread)

    def listing(self, path: str) -> Deferred[Listing]:
        """The messages of the maildrop at C{path}, from the cache if it still holds."""
        # Two stat calls tell whether the cached listing still holds; only a
        # real scan (which may read many files) goes to a thread.
        cached = scan.cachedListing(path, self.peekCache(path))
        if cached is not None:
            return succeed(cached)
        try:
            small = self._smallScan(path)
        except Exception:
            return fail()
        if small is not None:
            return succeed(small)
        return self.runInThread(self._scan, path)

    def _smallScan(self, path: str) -> Listing | None:
        """A small maildrop listed here, as L{scan.smallListing} allows; else None."""
        cache = self.cacheFor(path)
        if not cache.lock.acquire(blocking=False):
            return None  # being listed in a thread: never wait for it here
        try:
            found = scan.smallListing(path, cache)
            if found is None:
                return None
            return self._keep(path, cache, *found)
        except OSError:
            return None  # (the thread's listing reports it)
        finally:
            cache.lock.release()

    def _scan(self, path: str) -> Listing:
        cache = self.cacheFor(path)
        with cache.lock:
            return self._keep(path, cache, *scan.listing(path, cache))

    def _keep(
        self, path: str, cache: MaildropCache, infos: Listing, stamps: scan.Stamps | None
    ) -> Listing:
        """Keep C{infos} in C{cache} if they are still the maildrop's; return them."""
        if len(infos) < self.cacheThreshold:
            # Small maildrops are cheap to list again (their index is on disk):
            # holding many of them in memory would cost more than it saves.
            self.forget(path)
        elif stamps is not None and stamps == scan.stamps(path):
            cache.listing = (stamps, infos)
        return infos

    def usage(self, user: str) -> Deferred[tuple[int, int]]:
        """
        C{(messages, octets)} in C{user}'s maildrop (L{IMaildropUsage}), from
        the listing a session would get: cached, and extended by the names of
        new deliveries (their C{,W=} size), so no message is read again.
        """
        try:
            path = self.location.expand(user)
        except Exception:
            return fail()
        cached = scan.cachedListing(path, self.peekCache(path))
        if cached is not None:
            return succeed(_usage(cached))
        return self.runInThread(self._scanUsage, path)

    def _scanUsage(self, path: str) -> tuple[int, int]:
        if not os.path.lexists(path):
            return (0, 0)  # no maildrop yet: the delivery will make it
        return _usage(self._scan(path))

    def listMaildrops(self) -> Deferred[list[str]]:
        """The users with a maildrop under the location (see L{maildropUsers})."""
        return self.runInThread(maildropUsers, self.location)

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
                cache.source = self.uidlSource
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
