"""
The mbox store: one spool file per user (C{mbox:/var/mail/%u}), as Postfix
C{local}, Exim and sendmail write them.

  - A session holds the same per-maildrop lock as the Maildir store (one
    shared lock file, L{popserv.backends.locking}): sessions exclude each
    other. The spool's own locks (dotlock and C{fcntl},
    L{popserv.backends.mbox.lock}) are taken only for short moments: to read
    what was appended, to deliver, to rewrite at UPDATE. Between them, MTAs
    append freely; a session lists what was there at its login.
  - Listing uses the offset index (L{popserv.backends.mbox.index}), cached in
    memory too: an unchanged spool costs one C{stat}.
  - RETR and TOP read the message's byte range, un-quoting C{>From } lines in
    bounded chunks (L{popserv.backends.mbox.format.LineFilter}).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

from popserv.backends.locking import SHARED_LOCK_FILE, PerMaildropLocks, SharedLockFile
from popserv.backends.mbox.delivery import MboxDelivery
from popserv.backends.mbox.format import FORMATS, LineFilter, NotAnMbox, unquoter
from popserv.backends.mbox.index import Index, indexPath, readIndex, refresh, stampOf, writeIndex
from popserv.backends.mbox.lock import SpoolLock
from popserv.backends.mbox.rewrite import removeFromSpool
from popserv.backends.threaded import ThreadedWriter
from popserv.errors import InvalidUserName, MessageVanished, PermanentFailure
from popserv.interfaces import (
    IMailbox,
    IMaildropUsage,
    IMailStore,
    IMessageReader,
    InvalidUID,
    MessageInfo,
    validUID,
)
from popserv.location import MailLocation
from popserv.threads import RunInThread, reactorThreads

__all__ = ["MboxStore", "MboxMailbox", "SpoolReader"]

_log = Logger()

#: Bytes read from the spool per call at most, whatever the caller asks.
_CHUNK = 1 << 16


@implementer(IMessageReader)
class SpoolReader:
    """One message's byte range of an open spool, un-quoted as it is read."""

    transferForm = False

    def __init__(self, fd: int, start: int, end: int, fmt: str) -> None:
        self._fd: int | None = fd
        self._pos = start
        self._end = end
        self._filter = LineFilter(unquoter(fmt))
        self._pending = b""

    def read(self, size: int) -> bytes:
        while not self._pending:
            if self._fd is None:
                return b""
            want = min(max(size, 1), _CHUNK, self._end - self._pos)
            data = os.pread(self._fd, want, self._pos) if want > 0 else b""
            self._pos += len(data)
            final = not data or self._pos >= self._end
            self._pending = self._filter.feed(data, final=final)
            if final:
                self.close()
        out, self._pending = self._pending[:size], self._pending[size:]
        return out

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


@implementer(IMailbox)
class MboxMailbox:
    """
    One user's spool for one session. A message's C{key} is C{(inode, start,
    body, end)}: where it was at the listing. A spool rewritten meanwhile by
    another program makes such a message L{MessageVanished}.
    """

    def __init__(self, path: str, store: MboxStore) -> None:
        self.path = path
        self._store = store
        self._locked = True

    def listMessages(self) -> Deferred[tuple[MessageInfo, ...]]:
        return self._store.listing(self.path)

    def openMessage(self, info: MessageInfo) -> IMessageReader:
        inode, start, body, end = info.key
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise MessageVanished() from None
        try:
            ok = os.fstat(fd).st_ino == inode and os.pread(fd, 5, start) == b"From "
            if ok and start:
                ok = os.pread(fd, 2, start - 2) == b"\n\n"
        except BaseException:
            os.close(fd)
            raise
        if not ok:
            os.close(fd)
            raise MessageVanished()
        return SpoolReader(fd, body, end, self._store.fmt)

    def removeMessages(self, infos: Sequence[MessageInfo]) -> Deferred[list[MessageInfo]]:
        return self._store.runInThread(self._remove, list(infos))

    def _remove(self, infos: list[MessageInfo]) -> list[MessageInfo]:
        if not infos:
            return []
        try:
            index = removeFromSpool(
                self.path, {i.uid for i in infos}, self._store.fmt, self._store.lockTimeout
            )
        except FileNotFoundError:
            return []
        except Exception as e:
            _log.error("{spool}: cannot remove messages: {error}", spool=self.path, error=e)
            return infos
        self._store.remember(self.path, index)
        return []

    def close(self) -> None:
        if self._locked:
            self._locked = False
            self._store.locks.release(self.path)


@implementer(IMailStore, IMaildropUsage)
class MboxStore:
    """
    Spools named by a L{MailLocation} template (C{/var/mail/%u}).

    @param fmt: how C{From } lines are quoted: C{mboxo} or C{mboxrd}.
    @param lockTimeout: seconds to wait for the spool's locks.
    @param createMissing: whether a user without a spool has an empty one
        (else login and delivery fail). The file itself is created by the
        first delivery, as MTAs do.
    """

    def __init__(
        self,
        location: MailLocation | str,
        runInThread: RunInThread | None = None,
        createMissing: bool = True,
        fmt: str = "mboxo",
        lockTimeout: float = 30.0,
        lockFile: str | None = None,
        maxCached: int = 256,
    ) -> None:
        if isinstance(location, str):
            location = MailLocation.parse(location.removeprefix("mbox:"))
        if fmt not in FORMATS:
            raise ValueError(f"mbox format must be one of {', '.join(FORMATS)}, not {fmt!r}")
        self.location = location
        self.runInThread = runInThread or reactorThreads()
        self.createMissing = createMissing
        self.fmt = fmt
        self.lockTimeout = lockTimeout
        self.lockFile = lockFile
        self._locks: SharedLockFile | PerMaildropLocks | None = None
        self._cache: OrderedDict[str, Index] = OrderedDict()
        self._cacheLock = threading.Lock()
        self.maxCached = maxCached

    @property
    def description(self) -> str:
        return f"mbox:{self.location.template}"

    def openMailbox(self, user: str) -> Deferred[MboxMailbox]:
        try:
            path = self.location.expand(user)
            if not self.createMissing and not os.path.lexists(path):
                raise PermanentFailure("Mailbox does not exist")
            self.locks.acquire(path)
        except Exception:
            return fail()
        return succeed(MboxMailbox(path, self))

    # -- listing --

    def remember(self, path: str, index: Index) -> None:
        with self._cacheLock:
            self._cache[path] = index
            self._cache.move_to_end(path)
            while len(self._cache) > self.maxCached:
                self._cache.popitem(last=False)

    def listing(self, path: str) -> Deferred[tuple[MessageInfo, ...]]:
        """The messages of the spool at C{path}: one C{stat} if it has not changed."""
        cached = self._cache.get(path)
        if cached is not None:
            try:
                if stampOf(os.stat(path, follow_symlinks=False)) == cached.stamp:
                    return succeed(_infos(cached))
            except OSError:
                pass
        return self.runInThread(self._list, path)

    def _list(self, path: str) -> tuple[MessageInfo, ...]:
        return _infos(self.index(path))

    def index(self, path: str) -> Index:
        """The spool's current index (blocking): from disk, else read under the locks."""
        where = indexPath(path)
        try:
            st = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            return Index((0, 0, 0, 0, 0), self.fmt)
        index = self._cache.get(path)
        if index is None or index.stamp != stampOf(st):
            # Another process (a delivery, a worker) may have indexed it since.
            index = readIndex(where) or index
        if index is None or index.stamp != stampOf(st) or index.fmt != self.fmt:
            try:
                with SpoolLock(path, timeout=self.lockTimeout) as lock:
                    fresh = refresh(lock.fd, index, self.fmt)
            except FileNotFoundError:
                return Index((0, 0, 0, 0, 0), self.fmt)
            except NotAnMbox as e:
                raise PermanentFailure(f"Mailbox is damaged: {e}") from None
            if fresh is not index:
                writeIndex(where, fresh)
            index = fresh
        self.remember(path, index)
        return index

    def usage(self, user: str) -> Deferred[tuple[int, int]]:
        """C{(messages, octets)} in C{user}'s spool, from its index."""
        try:
            path = self.location.expand(user)
        except Exception:
            return fail()
        return self.runInThread(
            lambda: (lambda e: (len(e), sum(x.size for x in e)))(self.index(path).entries)
        )

    # -- deliveries and migration --

    def deliverMessage(
        self, user: str, uid: str | None = None, received: float | None = None
    ) -> Deferred[ThreadedWriter]:
        """Deliver into C{user}'s spool under its locks (see L{MboxDelivery})."""
        try:
            if uid is not None and not validUID(uid):
                raise InvalidUID(f"not an RFC 1939 UIDL: {uid!r}")
            path = self.location.expand(user)
            if not self.createMissing and not os.path.lexists(path):
                raise PermanentFailure("Mailbox does not exist")
        except Exception:
            return fail()
        return self.runInThread(self._startDelivery, path, uid, received)

    def _startDelivery(self, path: str, uid: str | None, received: float | None) -> ThreadedWriter:
        if self.createMissing:
            # A spool directory of its own (C{%d/%n} templates): made as Maildirs are.
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        delivery = MboxDelivery(path, self.fmt, uid, received, self.lockTimeout)
        return ThreadedWriter(delivery, self.runInThread)

    def listMaildrops(self) -> Deferred[list[str]]:
        """The users with a spool: the regular files the template names."""
        return self.runInThread(spoolUsers, self.location)

    @property
    def locks(self) -> SharedLockFile | PerMaildropLocks:
        """The session locks (one shared lock file in the spool directory if possible)."""
        if self._locks is None:
            lockPath = self.lockFile or os.path.join(self.location.root, SHARED_LOCK_FILE)
            try:
                if self.createMissing:
                    os.makedirs(os.path.dirname(lockPath), mode=0o700, exist_ok=True)
                self._locks = SharedLockFile(lockPath)
            except OSError as e:
                raise PermanentFailure(f"cannot open the session lock file {lockPath}: {e}") from e
        return self._locks


def _infos(index: Index) -> tuple[MessageInfo, ...]:
    if index.listing is None:
        ino = index.stamp[1]
        index.listing = tuple(
            MessageInfo(e.uid, e.size, (ino, e.start, e.body, e.end), e.received)
            for e in index.entries
        )
    return index.listing


def _files(directory: str, parts: list[str], bound: dict[str, str]) -> Iterator[tuple[str, str]]:
    """(user, path) for the spool files the template's C{parts} match below C{directory}."""
    from popserv.backends.maildir.walk import _pattern, _user

    component, rest = parts[0], parts[1:]
    if component == "%d" and "d" not in bound and rest:
        # A user without a domain: the level is absent from the path.
        yield from _files(directory, rest, {**bound, "d": ""})
    if "%" not in component:
        candidates = [(os.path.join(directory, component), {})]
    else:
        pattern = _pattern(component, bound)
        try:
            names = os.listdir(directory)
        except OSError:
            return
        candidates = []
        for name in names:
            if name[0] == "." or name.endswith(".lock"):
                continue  # indexes, popserv's lock file, dotlocks
            m = pattern.fullmatch(name)
            if m is not None:
                found = {k: v for k, v in m.groupdict().items() if v is not None}
                candidates.append((os.path.join(directory, name), found))
    for path, found in candidates:
        if rest:
            if os.path.isdir(path):
                yield from _files(path, rest, {**bound, **found})
        elif os.path.isfile(path):
            user = _user({**bound, **found})
            if user is not None:
                yield user, path


def spoolUsers(location: MailLocation) -> list[str]:
    """
    The users whose spool exists: regular files the template matches (not
    dotfiles nor C{*.lock} dotlocks), each one a name that expands to it.
    Blocking.
    """
    template = location.template.replace("%%", "\0")
    head, _, _ = template.partition("%")
    root = os.path.dirname(head) if "%" in template else head
    parts = [p.replace("\0", "%%") for p in template[len(root) :].split(os.sep) if p]
    users = set()
    for user, path in _files(root.replace("\0", "%") or os.sep, parts, {}):
        try:
            if location.expand(user) == os.path.normpath(path):
                users.add(user)
        except InvalidUserName:
            continue
    return sorted(users)
