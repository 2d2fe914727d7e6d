"""
The size index of a maildrop, C{.popserv.index}, and what a process keeps
in memory about a maildrop between listings (L{MaildropCache}).

Format: the line C{popserv-index 1}, then one line per message,
C{BASE<TAB>SIZE}: the base name (a delivered Maildir file never changes, so
its size never does) and the exact CRLF size; with a third field C{U=UIDL}
for a message whose UIDL was carried over from another server (C{U=} alone:
it was looked for and none taken; see L{popserv.backends.maildir.foreign}).
A missing or damaged file is
rebuilt by counting; it is written atomically (a reader sees the old file or
the new one, never a mix) and shared by every process serving the maildrop.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING

from twisted.logger import Logger

from popserv.backends.durable import syncDirectory

if TYPE_CHECKING:
    from popserv.backends.maildir.foreign import UIDLSource
    from popserv.listing import Listing

__all__ = ["MaildropCache", "INDEX_FILE"]

_log = Logger()

INDEX_FILE = ".popserv.index"
#: An index shorter than this is read in one go.
_SMALL_READ = 64 * 1024
_INDEX_HEADER = "popserv-index 1\n"


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
        #: Held by whoever lists the maildrop (L{popserv.backends.maildir.scan}):
        #: a second lister meanwhile (a login beside LMTP's quota check) must
        #: not see the index half loaded, nor its own carried-over UIDLs lost.
        self.lock = threading.Lock()
        self.sizes: dict[str, int] = {}
        self.loaded = False
        self.listing: tuple[tuple[int, ...], Listing] | None = None
        #: Carried-over UIDLs by base name ("": none; see L{popserv.backends.maildir.foreign}).
        self.uids: dict[str, str] = {}
        #: Where UIDLs come from at first listing: None for native.
        self.source: UIDLSource | None = None

    def load(self) -> None:
        """Read the index file; a missing or damaged one is simply rebuilt."""
        try:
            self._load()
        finally:
            self.loaded = True  # (only now: see L{lock})

    def _load(self) -> None:
        path = os.path.join(self.path, INDEX_FILE)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                # A small index (most maildrops) in one read, without the
                # text file's layers: a first login pays 4 us here, not 14.
                data = b""
                while len(data) < _SMALL_READ and (more := os.read(fd, _SMALL_READ - len(data))):
                    data += more
                if len(data) < _SMALL_READ:
                    lines = data.decode("utf-8", "surrogateescape").split("\n")
                    if lines[-1] == "":
                        lines.pop()  # (after the last line's end)
                    found = self._parse(lines)
                else:
                    os.lseek(fd, 0, os.SEEK_SET)
                    with open(fd, encoding="utf-8", errors="surrogateescape", closefd=False) as f:
                        found = self._parse(f)
            finally:
                os.close(fd)
        except (OSError, ValueError):
            return
        if found is None:
            return
        sizes, uids = found
        sizes.update(self.sizes)
        self.sizes = sizes
        if uids:
            uids.update(self.uids)
            self.uids = uids

    @staticmethod
    def _parse(lines: Iterable[str]) -> tuple[dict[str, int], dict[str, str]] | None:
        """The sizes and carried-over UIDLs of an index's lines; None if damaged."""
        lines = iter(lines)
        if next(lines, "").rstrip("\n") + "\n" != _INDEX_HEADER:
            return None
        sizes: dict[str, int] = {}
        uids: dict[str, str] = {}
        for line in lines:
            base, sep, size = line.rstrip("\n").rpartition("\t")
            if not sep or not (size.isascii() and size.isdigit()):
                if size[:2] != "U=" or not sep:
                    return None  # damaged: ignore it all
                uids[base.rpartition("\t")[0]] = size[2:]
                base, sep, size = base.rpartition("\t")
                if not sep or not (size.isascii() and size.isdigit()):
                    return None
            if len(size) > 18:
                return None  # no file's size: damaged
            sizes[base] = int(size)
        return sizes, uids

    def save(self, live: set[str] | None) -> None:
        """
        Write the sizes of the messages still present (base names C{live};
        None: all of them), atomically (a reader sees the old file or the new
        one, never a mix), and durably if it holds carried-over UIDLs. Failure
        (disk full, read-only maildrop) only costs recounting later.
        """
        if live is not None:
            self.sizes = {base: size for base, size in self.sizes.items() if base in live}
            if self.uids:
                self.uids = {base: uid for base, uid in self.uids.items() if base in live}
        temporary = os.path.join(self.path, f"{INDEX_FILE}.{os.getpid()}.{threading.get_ident()}")
        try:
            with open(temporary, "w", encoding="utf-8", errors="surrogateescape") as f:
                f.write(_INDEX_HEADER)
                if self.uids:
                    uids = self.uids
                    f.write(
                        "".join(
                            [
                                f"{base}\t{size}\n"
                                if (uid := uids.get(base)) is None
                                else f"{base}\t{size}\tU={uid}\n"
                                for base, size in self.sizes.items()
                            ]
                        )
                    )
                else:
                    f.write("".join([f"{base}\t{size}\n" for base, size in self.sizes.items()]))
                if self.uids:
                    # Carried-over UIDLs may be kept nowhere else (their
                    # source gone): a power cut must leave the old index or
                    # the new one, never an empty file. Sizes alone are only
                    # counted again.
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(temporary, os.path.join(self.path, INDEX_FILE))
            if self.uids:
                syncDirectory(self.path)
        except OSError as e:
            _log.warn(
                "{maildir}: cannot write the size index: {error}", maildir=self.path, error=e
            )
            try:
                os.unlink(temporary)
            except OSError:
                pass
