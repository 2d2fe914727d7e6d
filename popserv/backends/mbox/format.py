"""
The mbox format as MTAs write it: C{From } separator lines, C{>From } quoting
(mboxo or mboxrd), the blank line that ends every message, and what each
message is worth to POP3 (its exact CRLF size, its C{X-UIDL}, a digest that
names it across rewrites, its delivery time).

A message starts at a line beginning with C{From } at the start of the file
or after a blank line; its content runs to the line feed before the next
such separator's blank line, or to the end of the file (where a final blank
line, the separator Postfix writes after every message, is not counted).

Quoting, both as the spool is read and as deliveries write it:
  - C{mboxo} (Postfix C{local}, procmail, Exim): a line C{From } is stored
    as C{>From }, and every stored C{>From } is served as C{From }. A message
    that really held C{>From } comes back as C{From }: mboxo is lossy there.
  - C{mboxrd}: C{>*From } gains one C{>} on the way in and loses one on the
    way out: lossless.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from popserv.interfaces import validUID
from popserv.octets import CRLFSizer

__all__ = [
    "FORMATS",
    "Scanned",
    "NotAnMbox",
    "scan",
    "unquoter",
    "quoter",
    "LineFilter",
    "fromLine",
    "copyRange",
]

FORMATS = ("mboxo", "mboxrd")

#: Reading and measuring work in windows of this size, cut at line ends.
WINDOW = 1 << 22
#: Headers read for the digest and X-UIDL at most.
MAX_HEADERS = 1 << 16

#: Headers mail readers rewrite in place (read state, IMAP UIDs): a message
#: keeps its digest when they change.
_VOLATILE = frozenset(
    b"status x-status x-uid x-imap x-imapbase x-keywords content-length lines".split()
)
_MONTHS = {
    m: i for i, m in enumerate(b"Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split(), 1)
}
_DATE = re.compile(
    rb"([A-Z][a-z]{2}) +(\d{1,2}) +(\d{1,2}):(\d{2})(?::(\d{2}))?"
    rb"(?: +[A-Z]{3,4}| +[-+]\d{4})? +(\d{4})"
)
_RD_QUOTED = re.compile(rb"\n>(>*From )")
_RD_FROM = re.compile(rb"\n(>*From )")


class NotAnMbox(ValueError):
    """The spool does not start with a C{From } line."""


@dataclass(slots=True)
class Scanned:
    """
    One message as found in the spool.

    @ivar start: offset of its C{From } line.
    @ivar body: offset of its content (after the C{From } line).
    @ivar end: offset just past its content (before the separating blank line).
    @ivar size: its exact POP3 size: CRLF line endings, C{>From } un-quoted.
    @ivar received: the delivery time the C{From } line gives, or None.
    @ivar digest: names the message's content, status headers left out.
    @ivar xuidl: its C{X-UIDL} if that is a valid RFC 1939 UIDL, else None.
    """

    start: int
    body: int
    end: int
    size: int
    received: float | None
    digest: str
    xuidl: str | None


def received(line: bytes) -> float | None:
    """The delivery time a C{From } line gives (its C{asctime} date, local time), or None."""
    m = _DATE.search(line)
    if m is None or m.group(1) not in _MONTHS:
        return None
    month, day, hour, minute, second, year = m.groups()
    try:
        fields = (int(year), _MONTHS[month], int(day), int(hour), int(minute))
        return time.mktime((*fields, int(second or 0), 0, 0, -1))
    except (OverflowError, ValueError):
        return None


def fromLine(when: float | None = None, sender: str = "MAILER-DAEMON") -> bytes:
    """A separator line as Postfix writes it: C{From sender asctime}."""
    return b"From %s  %s\n" % (sender.encode("ascii", "replace"), time.ctime(when).encode())


def _headers(block: bytes) -> tuple[str, str | None]:
    """The digest of a header block without its volatile fields, and its X-UIDL."""
    kept = []
    xuidl: str | None = None
    skipping = False
    for line in block.split(b"\n"):
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                kept.append(line)
            continue
        name = line.split(b":", 1)[0].strip().lower()
        skipping = name in _VOLATILE
        if not skipping:
            kept.append(line)
        if name == b"x-uidl" and xuidl is None and b":" in line:
            value = line.split(b":", 1)[1].strip().decode("latin-1")
            xuidl = value if validUID(value) else ""
    return hashlib.sha1(b"\n".join(kept)).hexdigest(), (xuidl or None)


def _measure(data, body: int, end: int, quoted: re.Pattern[bytes] | bytes) -> int:
    """The CRLF size of C{data[body:end]} with its quoted C{From } lines un-quoted."""
    if end - body <= WINDOW:
        # One window (nearly every message): the same counts as below, without
        # the sizer's per-call work. The byte before is the From line's LF.
        chunk = data[body - 1 : end]
        size = len(chunk) + chunk.count(b"\n") - 2
        if b"\r" in chunk:
            size -= chunk.count(b"\r\n")
        if chunk[-1] != 0x0A:
            size += 2  # the CRLF the wire adds to a last line without one
        if b">From " in chunk:
            if isinstance(quoted, bytes):
                size -= chunk.count(quoted)
            else:
                size -= len(quoted.findall(chunk))
        return size
    sizer = CRLFSizer()
    quotes = extra = 0
    pos = body
    while pos < end:
        stop = min(end, pos + WINDOW)
        if stop < end:
            cut = data.rfind(b"\n", pos, stop)
            stop = cut + 1 if cut >= pos else stop
        # The byte before each window is a line feed (the From line's, or a
        # cut): counted with it (two octets as CRLF), then taken off.
        chunk = data[pos - 1 : stop]
        sizer.feed(chunk)
        extra += 2
        if b">From " in chunk:
            if isinstance(quoted, bytes):
                quotes += chunk.count(quoted)
            else:
                quotes += len(quoted.findall(chunk))
        pos = stop
    return sizer.size - extra - quotes


def scan(data, start: int, end: int, fmt: str) -> list[Scanned]:
    """
    The messages of C{data[start:end]} (an mmap of the spool, or bytes);
    C{start} is 0 or the offset of a C{From } line.

    @raise NotAnMbox: the data does not start with a C{From } line.
    """
    if start >= end:
        return []
    if data[start : start + 5] != b"From ":
        raise NotAnMbox("the spool does not start with a 'From ' line")
    quoted: re.Pattern[bytes] | bytes = _RD_QUOTED if fmt == "mboxrd" else b"\n>From "
    found = []
    pos = start
    while pos < end:
        lineEnd = data.find(b"\n", pos, end)
        body = end if lineEnd < 0 else lineEnd + 1
        nxt = data.find(b"\n\nFrom ", max(body - 1, pos), end)
        if nxt >= 0:
            contentEnd, following = nxt + 1, nxt + 2
        else:
            contentEnd = following = end
            if end - body >= 1 and data[end - 2 : end] == b"\n\n":
                contentEnd = end - 1  # the blank line after the last message
        headEnd = data.find(b"\n\n", body - 1, min(contentEnd, body + MAX_HEADERS))
        headers = data[body : headEnd if headEnd >= 0 else min(contentEnd, body + MAX_HEADERS)]
        digest, xuidl = _headers(bytes(headers))
        # The length after the headers: status headers mail readers add change
        # the message's length but not this.
        bodyLength = contentEnd - headEnd if headEnd >= 0 else 0
        digest = hashlib.sha1(b"%s %d" % (digest.encode(), bodyLength)).hexdigest()
        found.append(
            Scanned(
                start=pos,
                body=body,
                end=contentEnd,
                size=_measure(data, body, contentEnd, quoted) if contentEnd > body else 0,
                received=received(bytes(data[pos:body])),
                digest=digest,
                xuidl=xuidl,
            )
        )
        pos = following
    return found


def unquoter(fmt: str) -> Callable[[bytes], bytes]:
    """Un-quotes C{From } lines of text that starts with a line feed."""
    if fmt == "mboxrd":
        return lambda text: _RD_QUOTED.sub(rb"\n\1", text)
    return lambda text: text.replace(b"\n>From ", b"\nFrom ")


def quoter(fmt: str) -> Callable[[bytes], bytes]:
    """Quotes C{From } lines of text that starts with a line feed (and makes LF endings)."""
    if fmt == "mboxrd":
        return lambda text: _RD_FROM.sub(rb"\n>\1", text.replace(b"\r\n", b"\n"))
    return lambda text: text.replace(b"\r\n", b"\n").replace(b"\nFrom ", b"\n>From ")


class LineFilter:
    """
    Applies a line-wise transformation to a stream given in arbitrary chunks,
    holding back at most one incomplete line (up to C{limit} octets; a longer
    line passes through in pieces, its continuation untouched).

    @param transform: takes text whose first byte is a line feed (a line
        starts after it) or another byte (the text continues a line), and
        gives it back with that byte in front.
    """

    __slots__ = ("_transform", "_carry", "_atStart", "_limit")

    def __init__(self, transform: Callable[[bytes], bytes], limit: int = 1 << 16) -> None:
        self._transform = transform
        self._carry = b""
        self._atStart = True
        self._limit = limit

    def feed(self, data: bytes, final: bool = False) -> bytes:
        data = self._carry + data if self._carry else data
        if final:
            cut = len(data)
        else:
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                if len(data) < self._limit:
                    self._carry = data
                    return b""
                cut = len(data) - (data[-1:] == b"\r")  # keep a CR with its LF
        piece, self._carry = data[:cut], data[cut:]
        if not piece:
            return b""
        # A first byte that is no line feed: the piece continues a line.
        out = self._transform((b"\n" if self._atStart else b"x") + piece)[1:]
        self._atStart = piece[-1:] == b"\n"
        return out


def copyRange(src: int, dst: int, start: int, length: int) -> None:
    """
    Append C{length} bytes of C{src} from C{start} to C{dst} at its offset,
    in the kernel where it can (no copy in memory), else in bounded chunks.
    """
    while length > 0:
        try:
            n = os.copy_file_range(src, dst, min(length, 1 << 30), start)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            data = os.pread(src, min(length, 1 << 20), start)
            n = len(data)
            view = memoryview(data)
            while view:
                view = view[os.write(dst, view) :]
        if n == 0:
            raise OSError(errno.EIO, "the file ended while it was copied")
        start += n
        length -= n
