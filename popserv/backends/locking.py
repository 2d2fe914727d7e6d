"""
Maildrop locks that hold across processes and die with them.

Every session holds its maildrop's lock for its whole life, so a lock must not
cost a file descriptor per session (10,000 idle sessions would need 20,000).
L{SharedLockFile} takes an open-file-description byte-range lock (Linux
C{F_OFD_SETLK}) on a byte chosen by a hash of the maildrop's path, in one of
L{SHARDS} lock files in one directory, chosen by the same hash: a few
descriptors per process, whatever the sessions. The kernel drops the locks
when the process dies; no stale lock survives a crash. Sessions of one
process are kept apart by an in-process set (locks of one open file
description never conflict with each other).

Why several files: the kernel keeps a file's byte-range locks in one list,
and every lock or unlock walks it. On one file, with 5,000 sessions open,
each took about 80 us (a session's lock and unlock were half of what a
login cost); spread over 32 files, the lists stay short.

L{PerMaildropLocks} is the fallback where OFD locks are missing (not Linux)
or the shared file cannot be created: C{flock} on C{.popserv.lock} inside
each maildrop, one descriptor per session.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import struct
import threading

from popserv.errors import MaildropInUse

__all__ = ["SharedLockFile", "PerMaildropLocks", "LOCK_FILE", "SHARED_LOCK_FILE", "SHARDS"]

#: The per-maildrop lock file of the fallback. Never deleted: deleting a lock
#: file others may have open is how lock races start.
LOCK_FILE = ".popserv.lock"

#: The directory of the shared lock files, in the mail root. (Versions
#: before it locked one file, C{.popserv-locks}: stop every older process
#: before starting a newer one on the same maildrops.)
SHARED_LOCK_FILE = ".popserv-locks.d"

#: Lock files in it, each named by its number (two hex digits).
SHARDS = 32

_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", None)
# struct flock on Linux: short l_type, short l_whence, off_t l_start,
# off_t l_len, pid_t l_pid (0 for OFD locks), with natural padding.
_FLOCK = "hh4xqqi4x"


def _offset(path: str) -> int:
    """
    A byte of the lock file for this maildrop: 62 bits of a hash of its path as
    the mail location spells it (every process shares the configuration).
    """
    digest = hashlib.sha256(path.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") >> 2


class _InProcess:
    def __init__(self) -> None:
        self._held: set[str] = set()
        self._lock = threading.Lock()

    def take(self, path: str) -> None:
        with self._lock:
            if path in self._held:
                raise MaildropInUse()
            self._held.add(path)

    def give(self, path: str) -> None:
        with self._lock:
            self._held.discard(path)


class SharedLockFile:
    """
    Byte-range OFD locks on the L{SHARDS} files of the directory
    C{lockPath} (made if missing): a descriptor per file, opened at its
    first lock, for every session.
    """

    def __init__(self, lockPath: str) -> None:
        if _OFD_SETLK is None:
            raise OSError("open file description locks are not available here")
        self.lockPath = lockPath
        os.makedirs(lockPath, mode=0o700, exist_ok=True)
        self._fds: list[int | None] = [None] * SHARDS
        self._opening = threading.Lock()
        self._fileFor(0)  # (a directory it cannot write in fails here, not at login)
        self._local = _InProcess()

    def _fileFor(self, shard: int) -> int:
        fd = self._fds[shard]
        if fd is None:
            with self._opening:
                fd = self._fds[shard]
                if fd is None:
                    fd = self._fds[shard] = os.open(
                        os.path.join(self.lockPath, f"{shard:02x}"),
                        os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                        0o600,
                    )
        return fd

    def _set(self, kind: int, path: str) -> None:
        offset = _offset(path)
        fcntl.fcntl(
            self._fileFor(offset % SHARDS),
            _OFD_SETLK,
            struct.pack(_FLOCK, kind, os.SEEK_SET, offset, 1, 0),
        )

    def acquire(self, path: str) -> None:
        self._local.take(path)
        try:
            self._set(fcntl.F_WRLCK, path)
        except (BlockingIOError, PermissionError):
            self._local.give(path)
            raise MaildropInUse() from None
        except BaseException:
            self._local.give(path)
            raise

    def release(self, path: str) -> None:
        try:
            self._set(fcntl.F_UNLCK, path)
        finally:
            self._local.give(path)


class PerMaildropLocks:
    """C{flock} on C{.popserv.lock} in each maildrop (one descriptor per session)."""

    def __init__(self) -> None:
        self._local = _InProcess()
        self._fds: dict[str, int] = {}

    def acquire(self, path: str) -> None:
        self._local.take(path)
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
            self._local.give(path)
            raise
        self._fds[path] = fd

    def release(self, path: str) -> None:
        fd = self._fds.pop(path, None)
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock
        self._local.give(path)
