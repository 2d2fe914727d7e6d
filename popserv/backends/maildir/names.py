"""
Maildir file names: what a name says (unique part, size fields, UIDL,
delivery time) and the names popserv gives the messages it delivers.

A name is C{UNIQUE[,FIELD=VALUE...][:2,FLAGS]}. The part before C{:} (the
I{base}) never changes once delivered; other programs change the flags and
move the file from C{new/} to C{cur/}. Fields C{S=} (size on disk) and C{W=}
(CRLF size) are size hints and not part of the unique part.

The UIDL of a message is its unique part, or a digest of it when the unique
part is not an RFC 1939 UIDL (L{uidFor}). These UIDLs never change.

A delivery with a given UIDL (migration keeps the UIDLs clients know) cannot
use the UIDL as the name: C{/}, C{:} and C{,} may not stand raw in a unique
part, and the name must still start with the delivery time, which the
listing orders by. Such a message's unique part ends in a C{U=} field
holding the UIDL escaped: C{%%} for C{%}, C{%s} for C{/}, C{%c} for C{:},
C{%m} for C{,} (two characters at most per character: a 70-character UIDL
fits a name's 255 bytes). A unique part whose last field is a well-formed
C{U=} field has the UIDL it holds; any other name keeps its UIDL as before.
No mail program popserv knows writes a C{U=} field, so no UIDL served
before changes. This was chosen over a per-maildrop UIDL list (Dovecot's
C{dovecot-uidlist}): the name alone says everything, so a listing reads no
other file and needs no lock, and a delivery stays one atomic rename.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import time
from itertools import count

from popserv.interfaces import validUID

__all__ = [
    "uniquePart",
    "uidFor",
    "sizeHints",
    "baseName",
    "escapeUID",
    "unescapeUID",
    "formatUnique",
    "newUnique",
    "messageName",
    "LEADING_DIGITS",
]

#: The leading number of a name: its delivery time, in Maildir names.
LEADING_DIGITS = re.compile(r"[0-9]+")

_UID_FIELD = ",U="
_ESCAPES = {"%": "%%", "/": "%s", ":": "%c", ",": "%m"}
_UNESCAPES = {"%": "%", "s": "/", "c": ":", "m": ","}
_ESCAPED = re.compile(r"[%/:,]")
#: A well-formed escaped UIDL: printable ASCII but / : , and % only in an escape.
_ESCAPED_UID = re.compile(r"(?:[!-$&-+\-.0-9;-~]|%[%scm])+")
_UNESCAPE = re.compile(r"%(.)")

#: The longest unique part popserv writes, in bytes: room is left in a name's
#: 255 for the size fields (",S=" and ",W=" of 15 digits each) and the info.
MAX_UNIQUE = 180


def uniquePart(name: str) -> str:
    """The unique part of a Maildir file name: no info, no S=/W= fields."""
    base = name.split(":", 1)[0]
    if "," not in base:
        return base
    first, *fields = base.split(",")
    kept = [f for f in fields if not (f.startswith("S=") or f.startswith("W="))]
    return ",".join([first, *kept])


def heldUID(unique: str) -> str | None:
    """The UIDL a unique part's C{U=} field holds (None: no well-formed one)."""
    if _UID_FIELD not in unique:
        return None
    return unescapeUID(unique.rpartition(_UID_FIELD)[2])


def uidFor(unique: str) -> str:
    """
    The UIDL for a unique part: the UIDL its C{U=} field holds, else itself
    if RFC-valid, else a digest of it.
    """
    held = heldUID(unique)
    if held is not None:
        return held
    if validUID(unique):
        return unique
    digest = hashlib.sha256(unique.encode("utf-8", "surrogateescape")).hexdigest()
    return "~" + digest


def sizeHints(name: str) -> dict[str, int]:
    """The C{S=} and C{W=} fields of a name that hold a number."""
    hints = {}
    for field in name.split(":", 1)[0].split(",")[1:]:
        key, sep, value = field.partition("=")
        # (Up to 18 digits: a size that fits the listing's 64-bit columns; a
        # longer one is no size a file has, and the file is read instead.)
        if sep and key in ("S", "W") and value.isascii() and value.isdigit() and len(value) <= 18:
            hints[key] = int(value)
    return hints


def baseName(path: str) -> str:
    """The part of a message file's name that never changes (no info)."""
    return os.path.basename(path).split(":", 1)[0]


def escapeUID(uid: str) -> str:
    """A UIDL as it stands in a C{U=} field."""
    return _ESCAPED.sub(lambda m: _ESCAPES[m.group()], uid)


def unescapeUID(text: str) -> str | None:
    """The UIDL a C{U=} field's value holds, or None if it holds none."""
    if not _ESCAPED_UID.fullmatch(text):
        return None
    uid = _UNESCAPE.sub(lambda m: _UNESCAPES[m.group(1)], text)
    return uid if validUID(uid) else None


def _hostPart(host: str) -> str:
    # As Maildir writers do: / and : (and , which starts a field) escaped.
    return host.replace("/", "\\057").replace(":", "\\072").replace(",", "\\054")


def formatUnique(when: float, pid: int, serial: int, host: str, uid: str | None = None) -> str:
    """
    A unique part: C{SECONDS.MmicrosPpidQserial.HOST} (micros in six
    digits), then the C{U=} field
    if C{uid} is given. The host is cut so that the whole fits L{MAX_UNIQUE}.
    """
    seconds = int(when)
    micros = min(int((when - seconds) * 1e6), 999_999)
    # Six digits: two deliveries of one second then sort in delivery order
    # (a listing orders them by the unique part; "M99999" sorted after "M100000").
    head = f"{seconds}.M{micros:06d}P{pid}Q{serial}."
    tail = "" if uid is None else _UID_FIELD + escapeUID(uid)
    host = _hostPart(host).encode("utf-8", "surrogateescape")
    room = MAX_UNIQUE - len(head.encode()) - len(tail)
    host = host[: max(room, 1)].decode("utf-8", "ignore") or "h"
    return head + host + tail


_serials = count(1)


def newUnique(when: float | None = None, uid: str | None = None) -> str:
    """A fresh unique part for a message delivered at C{when} (default: now)."""
    return formatUnique(
        time.time() if when is None else when,
        os.getpid(),
        next(_serials),
        socket.gethostname(),
        uid,
    )


def messageName(unique: str, size: int, crlfSize: int) -> str:
    """A new message's name: its unique part with the size on disk and the CRLF size."""
    return f"{unique},S={size},W={crlfSize}"
