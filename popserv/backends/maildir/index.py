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
from typing import TYPE_CHECKING

from twisted.logger import Logger

if TYPE_CHECKING:
    from popserv.backends.maildir.foreign import UIDLSource
    from popserv.listing import Listing

__all__ = ["MaildropCache", "INDEX_FILE"]

_log = Logger()

INDEX_FILE = ".popserv.index"
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
        self.sizes: dict[str, int] = {}
        self.loaded = False
        self.listing: tuple[tuple[int, ...], Listing] | None = None
        #: Carried-over UIDLs by base name ("": none; see L{popserv.backends.maildir.foreign}).
        self.uids: dict[str, str] = {}
        #: Where UIDLs come from at first listing: None for native.
        self.source: UIDLSource | None = None

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
                uids: dict[str, str] = {}
                for line in f:
                    base, sep, size = line.rstrip("\n").rpartition("\t")
                    if not sep or not (size.isascii() and size.isdigit()):
                        if size[:2] != "U=" or not sep:
                            return  # damaged: ignore it all
                        uids[base.rpartition("\t")[0]] = size[2:]
                        base, sep, size = base.rpartition("\t")
                        if not sep or not (size.isascii() and size.isdigit()):
                            return
                    sizes[base] = int(size)
        except (OSError, ValueError):
            return
        sizes.update(self.sizes)
        self.sizes = sizes
        if uids:
            uids.update(self.uids)
            self.uids = uids

    def save(self, live: set[str] | None) -> None:
        """
        Write the sizes of the messages still present (base names C{live};
        None: all of them), atomically (a reader sees the old file or the new
        one, never a mix). Failure (disk full, read-only maildrop) only costs
        recounting later.
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
            os.replace(temporary, os.path.join(self.path, INDEX_FILE))
        except OSError as e:
            _log.warn(
                "{maildir}: cannot write the size index: {error}", maildir=self.path, error=e
            )
            try:
                os.unlink(temporary)
            except OSError:
                pass
