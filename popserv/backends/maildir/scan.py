"""
Listing a maildrop: which messages are in C{cur/} and C{new/}, in delivery
order, with their UIDLs and exact sizes.

  - C{tmp/}, dot-files, symlinks and directories are not messages.
  - Sizes come from the index (L{popserv.backends.maildir.index}), else a
    C{,W=} field, else from reading the file once.
  - A listing is reused while the directories' stamps (inode and mtime) say
    nothing changed, and made again from the previous one (only new files
    read) when they do; from scratch if a new file would not sort last.
  - The order is the delivery time: a name's leading number, else the file's
    mtime; then the unique part.
  - The listing is a L{Listing}; a message's key is its file's name relative
    to the maildir (C{cur/NAME} or C{new/NAME}).
"""

from __future__ import annotations

import os
import threading
import time
from operator import itemgetter

from twisted.logger import Logger

from popserv.backends.maildir.index import INDEX_FILE, MaildropCache
from popserv.backends.maildir.names import LEADING_DIGITS, baseName, sizeHints, uidFor, uniquePart
from popserv.interfaces import validUID
from popserv.listing import EMPTY, Listing
from popserv.octets import CRLFSizer

__all__ = [
    "Found",
    "ORDER",
    "UNIQUE",
    "UID",
    "SIZE",
    "PATH",
    "SUBDIRS",
    "stamps",
    "cachedListing",
    "listing",
    "smallListing",
    "NeedsThread",
    "OPEN_FLAGS",
]

_log = Logger()

#: Subdirectories holding messages. cur/ is scanned first: a message moved
#: from new/ to cur/ during the scan is then missed once (it shows up next
#: session) rather than listed twice.
SUBDIRS = ("cur", "new")

_READ_CHUNK = 1024 * 1024
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC

#: A directory whose mtime is this recent may still change within the same
#: timestamp tick: its listing is not trusted from the cache (nanoseconds).
_RACY_NS = 2_000_000_000

Stamps = tuple[int, ...]


#: One message file met while listing, before the listing is sorted:
#: C{(order, unique, uid, size, path)}, fields named by the indexes below;
#: C{order} is the delivery time in seconds (the sort key), C{unique} the
#: unique part (the tie-break). A plain tuple, not a named one: with named
#: tuples the first listing of 100,000 messages took 20% longer (the garbage
#: collector never untracks a tuple subclass, and each costs a copy).
Found = tuple[int, str, str, int, str]
ORDER, UNIQUE, UID, SIZE, PATH = range(5)

_unique = itemgetter(UNIQUE)

#: A leading number longer than this is no delivery time (and would not fit
#: the listing's 64-bit columns).
_MAX_DIGITS = 18


def stamps(path: str) -> Stamps | None:
    """What says whether the maildrop changed: None if too fresh to vouch for."""
    return _stamps(path)[0]


def _stamps(path: str) -> tuple[Stamps | None, int]:
    """L{stamps}, and the size (C{st_size}) of the biggest directory."""
    found: list[int] = []
    biggest = 0
    for sub in SUBDIRS:
        try:
            st = os.stat(f"{path}/{sub}")  # (a doubled slash names the same directory)
        except FileNotFoundError:
            found += [0, 0]
            continue
        found += [st.st_ino, st.st_mtime_ns]
        biggest = max(biggest, st.st_size)
    if time.time_ns() - max(found[1::2]) < _RACY_NS:
        return None, biggest
    return tuple(found), biggest


def cachedListing(path: str, cache: MaildropCache | None) -> Listing | None:
    """The cached listing if it still holds (two stat calls), else None."""
    if cache is None or cache.listing is None:
        return None
    now = stamps(path)
    if now is not None and cache.listing[0] == now:
        return cache.listing[1]
    return None


#: A directory no bigger than this (C{st_size}: one block of ext4 or xfs,
#: about 70 names; 200 on tmpfs) is read on the calling thread by
#: L{smallListing}, and so is an index no bigger than L{SMALL_INDEX}.
SMALL_DIRECTORY = 4096
SMALL_INDEX = 64 * 1024
#: And no more names than this are read there, whatever C{st_size} says.
SMALL_ENTRIES = 256


class NeedsThread(Exception):
    """The listing would read a message file or write the index: not here."""


def smallListing(path: str, cache: MaildropCache) -> tuple[Listing, Stamps | None] | None:
    """
    L{listing} of a small maildrop whose sizes are all known (from the index
    or C{,W=}), on the calling thread: a few C{stat}s, two small directory
    reads and at most one small index read, never a message file; None if
    the maildrop is not such a one (list it in a thread then). The first
    login of a maildrop a process has not cached (after a start, or once
    evicted) is then no trip through the thread pool, which costs more on
    one core than the listing (about 100 us against 60, measured).
    """
    if cache.source is not None or cache.uids:
        return None  # carried-over UIDLs read the previous server's files
    before, biggest = _stamps(path)
    if biggest > SMALL_DIRECTORY:
        return None
    if not cache.loaded:
        try:
            if os.stat(f"{path}/{INDEX_FILE}").st_size > SMALL_INDEX:
                return None
        except FileNotFoundError:
            pass  # (sizes to count then: NeedsThread)
    try:
        return listing(path, cache, read=False, before=before)
    except NeedsThread:
        return None


_UNSTAMPED = (-1,)


def listing(
    path: str, cache: MaildropCache, read: bool = True, before: Stamps | None = _UNSTAMPED
) -> tuple[Listing, Stamps | None]:
    """
    The listing of the maildrop at C{path} (blocking: run it in a thread),
    and the stamps it was made under (None: not to be trusted later).

    @param read: whether message files may be read (sizes counted) and the
        index written; if not, L{NeedsThread} is raised where they would be.
    @param before: the maildrop's L{stamps} taken just now, if they were.
    """
    if before is _UNSTAMPED:
        before = stamps(path)
    if before is not None and cache.listing is not None and cache.listing[0] == before:
        return cache.listing[1], before  # nothing was added, removed or renamed
    if not cache.loaded:
        cache.load()
    entries: list[os.DirEntry[str]] = []
    for sub in SUBDIRS:
        try:
            with os.scandir(os.path.join(path, sub)) as found:
                if read:
                    entries += found
                    continue
                for entry in found:
                    # Whatever a file system says a directory's size is (ZFS:
                    # its entries; some report 0): no more names read here.
                    if len(entries) >= SMALL_ENTRIES:
                        raise NeedsThread()
                    entries.append(entry)
        except FileNotFoundError:
            continue
    infos, counted = None, 0
    if cache.listing is not None:
        infos, counted = relisted(path, cache, cache.listing[1], entries, read)
    if infos is None:
        infos = listed(path, cache, entries, counted, read)
    return infos, before


def listed(
    path: str,
    cache: MaildropCache,
    entries: list[os.DirEntry[str]],
    counted: int = 0,
    read: bool = True,
) -> Listing:
    """The listing made from scratch (C{counted} sizes were counted already)."""
    sizes = cache.sizes
    found, more, indexed, width = collect(path, sizes, entries, set(), read)
    counted += more
    if cache.source is not None or cache.uids:
        counted += _carryOver(path, cache, found, set())
    if width:
        # Every name starts with a number of the same width (the delivery
        # time, as Maildir names do): the names alone sort the same, and
        # sorting strings is three times faster than sorting tuples.
        found.sort(key=_unique)
    else:
        found.sort()
    infos = _listing(path, found)
    stale = len(sizes) - indexed  # sizes of messages no longer present
    if counted or stale > 1024:
        if not read:
            raise NeedsThread()
        cache.save({baseName(key) for key in infos.keys()} if stale else None)
    return infos


def relisted(
    path: str,
    cache: MaildropCache,
    previous: Listing,
    entries: list[os.DirEntry[str]],
    read: bool = True,
) -> tuple[Listing | None, int]:
    """
    The listing again after a change, from the previous one, and how many
    sizes were counted for it. A message still at its path keeps its entry,
    and only the other files are read: new mail in a big leave-on-server
    maildrop costs a directory read, not the whole listing made again (100k:
    480 -> 200 ms). No listing if a new file would not sort after the
    messages kept (a rename, an older name): it is then made from scratch.
    """
    cut = len(os.path.join(path, ""))
    keys = previous.keys()
    known = set(keys)
    # Only files are messages (collect() checks the rest): keyed as in the listing.
    present = {
        entry.path[cut:]: entry for entry in entries if entry.is_file(follow_symlinks=False)
    }
    keptAt = [i for i, key in enumerate(keys) if key in present]
    if len(keptAt) == len(previous):
        kept = previous
    else:
        kept = previous.select(keptAt) if keptAt else EMPTY
    fresh = [entry for key, entry in present.items() if key not in known]
    sizes = cache.sizes
    taken = set(kept.uids())
    found, counted, _, _ = collect(path, sizes, fresh, taken, read)
    found.sort()
    if found and (cache.source is not None or cache.uids):
        counted += _carryOver(path, cache, found, taken)
    if found and kept:
        last = kept[-1]
        first = found[0]
        if (first[ORDER], first[UNIQUE]) <= (last.received, uniquePart(baseName(last.key))):
            return None, counted
    if not found:
        infos = kept
    elif not kept:
        infos = _listing(path, found)
    else:
        infos = kept + _listing(path, found)
    if counted:
        # Rewritten whole anyway: drop the sizes of messages gone meanwhile.
        cache.save({baseName(key) for key in infos.keys()})
    return infos, counted


def collect(
    path: str,
    sizes: dict[str, int],
    entries: list[os.DirEntry[str]],
    seen: set[str],
    read: bool = True,
) -> tuple[list[Found], int, int, int | None]:
    """
    What the files C{entries} hold, unsorted; how many sizes were counted
    now; how many of them have a size in C{sizes}; the width of every name's
    leading number (0: not all alike). A UID already in C{seen} is a
    duplicate and skipped.
    """
    counted = indexed = 0
    width: int | None = None
    found: list[Found] = []
    for entry in entries:
        name = entry.name
        if name[0] == "." or not entry.is_file(follow_symlinks=False):
            continue
        base = name.partition(":")[0]
        if "," in base:
            unique = uniquePart(base)
            uid = uidFor(unique) if ",U=" in unique or not validUID(unique) else unique
        else:
            unique = base
            uid = unique if validUID(unique) else uidFor(unique)
        if uid in seen:
            _log.warn(
                "{maildir}: two files share the unique name {unique}; serving the first only",
                maildir=path,
                unique=unique,
            )
            continue
        size = sizes.get(base)
        if size is None and ",W=" in base:
            size = sizeHints(name).get("W")
        leading = LEADING_DIGITS.match(unique)
        if leading and leading.end() > _MAX_DIGITS:
            leading = None  # no delivery time: ordered by the file's mtime
        try:
            if size is None:
                if not read:
                    raise NeedsThread()
                fd = os.open(entry.path, OPEN_FLAGS)
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


def _carryOver(path: str, cache: MaildropCache, found: list[Found], taken: set[str]) -> int:
    """
    Carried-over UIDLs (see L{popserv.backends.maildir.foreign}): only when
    a source is set or some were recorded, so a native listing pays nothing.
    Returns how many were recorded now (the index is then to be saved).
    """
    from popserv.backends.maildir.foreign import UIDLSource, carryOver

    found.sort()  # the foreign sources number messages in delivery order
    recorded = carryOver(cache.source or UIDLSource(), path, found, cache.uids, taken)
    if recorded:
        for entry in found:  # an index line needs the size
            cache.sizes.setdefault(baseName(entry[PATH]), entry[SIZE])
    return recorded


def _listing(path: str, found: list[Found]) -> Listing:
    """
    The listing of sorted C{found} (in the maildir at C{path}). Shared by
    sessions, never copied. Its columns are made in listing order: objects
    made while reading the directory lie in its (hashed) order, and walking
    them in listing order missed the CPU cache for each (100k: LIST and UIDL
    took 36 ms instead of 14); the listing's joined strings and array are
    contiguous.
    """
    if not found:
        return EMPTY  # shared
    cut = len(os.path.join(path, ""))
    return Listing(
        map(_uid, found),
        map(_size, found),
        [full[cut:] for full in map(_path, found)],
        map(_order, found),
    )


_uid, _size, _path, _order = itemgetter(UID), itemgetter(SIZE), itemgetter(PATH), itemgetter(ORDER)


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
