"""
Locking a spool the way MTAs and mail readers do: a dotlock C{FILE.lock},
then a POSIX C{fcntl} lock on the spool itself. Postfix
(C{mailbox_delivery_lock = fcntl, dotlock}, Debian's default), procmail,
Exim and mutt all honour both, so whoever holds them owns the spool.

Lock order: the dotlock first, then the spool is opened and C{fcntl}-locked.
Both are tried without blocking and retried until a deadline, so a program
taking them in the other order (mutt takes C{fcntl} first) delays us but can
never deadlock with us.

A dotlock is stale, and removed, when it names a process (its content is a
pid, as procmail, mutt and popserv write) that no longer exists on this
host, or when it is older than C{staleAfter} seconds (Postfix writes empty
dotlocks and removes them after 500 s). A holder that works longer touches
its dotlock (L{SpoolLock.touch}).

After the C{fcntl} lock is held, the spool's path is checked to still name
the locked inode: a rewrite (ours, or mutt's) may have replaced the file
while we waited, and appending to the old inode would lose the mail.

Before both, a thread takes the spool's lock within this process: POSIX
C{fcntl} locks belong to the process, so two threads (two LMTP deliveries
at once) would both get one, and closing any descriptor of the spool drops
it. Without a dotlock (a spool directory popserv may not write in) that
was all that stood between two appends at the same offset.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading
import time

from twisted.logger import Logger

from popserv.errors import TemporaryFailure

__all__ = ["SpoolLock", "SpoolLocked", "isStale", "processAlive", "LINK_PREFIX"]

_log = Logger()

#: The name (with the spool's name filled in) under which a dotlock is
#: written before it is linked into place; one a killed process left is
#: removed by the next rewrite.
LINK_PREFIX = ".%s.popserv-lock."

_OWN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
_DOT_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class SpoolLocked(TemporaryFailure):
    """The spool stayed locked by another program until the deadline."""

    def __init__(self) -> None:
        super().__init__("Mailbox is locked by another program, try again later")


def processAlive(pid: int) -> bool:
    """Whether a process of this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def isStale(lockPath: str, staleAfter: float, now: float | None = None) -> bool:
    """Whether the dotlock at C{lockPath} is left over: its pid is dead, or it is old."""
    try:
        st = os.stat(lockPath, follow_symlinks=False)
        with open(lockPath, "rb") as f:
            content = f.read(64)
    except FileNotFoundError:
        return False
    except OSError:
        return False
    if (now or time.time()) - st.st_mtime > staleAfter:
        return True
    text = content.strip()
    if text.isdigit():
        pid = int(text)
        # procmail and Exim write 0 or their own formats: only a real pid counts.
        if pid > 1 and not processAlive(pid):
            return True
    return False


class _ThreadLocks:
    """One lock per spool path for the threads of this process, forgotten once unused."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    def acquire(self, path: str, timeout: float) -> bool:
        with self._guard:
            lock, users = self._locks.get(path, (None, 0))
            if lock is None:
                lock = threading.Lock()
            self._locks[path] = (lock, users + 1)
        if lock.acquire(timeout=max(timeout, 0)):
            return True
        self._done(path)
        return False

    def release(self, path: str) -> None:
        self._locks[path][0].release()
        self._done(path)

    def _done(self, path: str) -> None:
        with self._guard:
            lock, users = self._locks[path]
            if users == 1:
                del self._locks[path]
            else:
                self._locks[path] = (lock, users - 1)


_threads = _ThreadLocks()


class SpoolLock:
    """
    The dotlock and C{fcntl} lock of one spool, held by one thread; use as a
    context manager. L{fd} is the locked spool, open for reading and
    writing, the very inode the path names.

    @param create: create a missing spool (mode 0600) rather than fail.
    @param timeout: seconds to keep trying before L{SpoolLocked}.
    """

    def __init__(
        self,
        path: str,
        create: bool = False,
        timeout: float = 30.0,
        staleAfter: float = 300.0,
    ) -> None:
        self.path = path
        self.lockPath = path + ".lock"
        self.create = create
        self.timeout = timeout
        self.staleAfter = staleAfter
        self.fd = -1
        self._dotlock: tuple[int, int] | None = None  # (dev, ino) of our dotlock
        self._key = os.path.realpath(path)  # (the threads' lock: one per spool)
        self._threadHeld = False

    def __enter__(self) -> SpoolLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        deadline = time.monotonic() + self.timeout
        if not _threads.acquire(self._key, self.timeout):
            raise SpoolLocked()
        self._threadHeld = True
        try:
            self._takeDotlock(deadline)
            try:
                self._takeFcntl(deadline)
            except BaseException:
                self._dropDotlock()
                raise
        except BaseException:
            self._releaseThreads()
            raise

    def _releaseThreads(self) -> None:
        if self._threadHeld:
            self._threadHeld = False
            _threads.release(self._key)

    def _sleep(self, deadline: float, attempt: int) -> None:
        if time.monotonic() >= deadline:
            raise SpoolLocked()
        time.sleep(min(0.005 * (2 ** min(attempt, 6)), 0.25))

    def _takeDotlock(self, deadline: float) -> None:
        attempt = 0
        while True:
            try:
                mine = self._makeDotlock()
            except FileExistsError:
                if isStale(self.lockPath, self.staleAfter):
                    _log.warn("removing the stale lock {path}", path=self.lockPath)
                    try:
                        os.unlink(self.lockPath)
                    except FileNotFoundError:
                        pass
                    continue
                self._sleep(deadline, attempt)
                attempt += 1
                continue
            except OSError as e:
                if e.errno in (errno.EACCES, errno.EROFS):
                    # No right to create files beside the spool: fcntl alone,
                    # as mutt and Postfix do then.
                    return
                raise
            self._dotlock = mine
            return

    def _makeDotlock(self) -> tuple[int, int]:
        """
        Make C{FILE.lock} holding our pid, atomically: written under a name of
        our own, then linked into place (as mutt and procmail do), so that no
        one ever sees it empty, even if we are killed.
        """
        directory, name = os.path.split(self.path)
        own = os.path.join(directory, f"{LINK_PREFIX % name}{os.getpid()}.{threading.get_ident()}")
        fd = os.open(
            own, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
        )
        try:
            os.write(fd, b"%d\n" % os.getpid())
            st = os.fstat(fd)
        finally:
            os.close(fd)
        try:
            os.link(own, self.lockPath)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            # No hard links here: the plain exclusive create.
            fd = os.open(self.lockPath, _DOT_FLAGS, 0o644)
            try:
                os.write(fd, b"%d\n" % os.getpid())
                st = os.fstat(fd)
            finally:
                os.close(fd)
        finally:
            os.unlink(own)
        return (st.st_dev, st.st_ino)

    def _takeFcntl(self, deadline: float) -> None:
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if self.create else 0)
        attempt = 0
        while True:
            fd = os.open(self.path, flags, 0o600)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise OSError(errno.EINVAL, "the spool is not a regular file", self.path)
                while True:
                    try:
                        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except OSError as e:
                        if e.errno not in (errno.EAGAIN, errno.EACCES):
                            raise
                        self._sleep(deadline, attempt)
                        attempt += 1
                try:
                    now = os.stat(self.path, follow_symlinks=False)
                except FileNotFoundError:
                    now = None
                if now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                    self.fd = fd
                    return
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # replaced while we waited: lock the new one

    def touch(self) -> None:
        """Keep the dotlock fresh during long work (others judge it by age)."""
        if self._dotlock is not None:
            try:
                os.utime(self.lockPath)
            except OSError:
                pass

    def _dropDotlock(self) -> None:
        mine, self._dotlock = self._dotlock, None
        if mine is None:
            return
        try:
            st = os.stat(self.lockPath, follow_symlinks=False)
            if (st.st_dev, st.st_ino) == mine:
                os.unlink(self.lockPath)
        except FileNotFoundError:
            pass

    def release(self) -> None:
        """Close the spool (dropping the fcntl lock), then remove the dotlock."""
        fd, self.fd = self.fd, -1
        try:
            if fd >= 0:
                os.close(fd)
            self._dropDotlock()
        finally:
            self._releaseThreads()
