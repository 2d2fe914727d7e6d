"""
The byte transforms storage and the wire share: the size POP3 reports for a
stored message (L{CRLFSizer}), and the encoding of message bytes into the
body of a RETR or TOP response (L{MessageEncoder}, L{TopLimiter}).

A store may keep a message in I{transfer form}: the bytes RETR sends,
without the terminating "." line (CRLF line endings, byte-stuffed as RFC
1939 section 3 says, the first line included, ending in CRLF unless empty).
L{MessageEncoder}C{(stuffed=True)} sends such data as it is, and
L{TransferDecoder} turns it back into the message.

It depends on nothing of popserv, so storage never imports the wire
(L{popserv.wire} re-exports the names it always had).
"""

from __future__ import annotations

import re

__all__ = [
    "CRLF",
    "TERMINATOR",
    "CRLFSizer",
    "crlfSize",
    "TopLimiter",
    "MessageEncoder",
    "TransferDecoder",
]

CRLF = b"\r\n"

#: The line that ends a multi-line response.
TERMINATOR = b".\r\n"


class CRLFSizer:
    """
    Count the octets a message occupies on the wire before byte-stuffing, from
    its stored bytes, without building the converted copy.

    This is the size that STAT, LIST and the RETR status line report: CRLF line
    endings, plus the CRLF that L{MessageEncoder.finish} adds to a
    non-empty message that does not end in a line ending.
    """

    __slots__ = ("_size", "_heldCR", "_last")

    def __init__(self) -> None:
        self._size = 0
        self._heldCR = False
        self._last = 0x0A

    def feed(self, chunk: bytes | bytearray, length: int | None = None) -> None:
        """Count C{chunk}, or only its first C{length} octets (a reused read buffer)."""
        n = len(chunk) if length is None else length
        if not n:
            return
        size = n + chunk.count(b"\n", 0, n)
        if chunk.find(b"\r", 0, n) >= 0:  # a fast scan; counting CRLF is the slow one
            size -= chunk.count(b"\r\n", 0, n)
        if self._heldCR and chunk[0] == 0x0A:
            size -= 1  # the LF completes a CRLF split across chunks
        self._size += size
        self._last = last = chunk[n - 1]
        self._heldCR = last == 0x0D

    @property
    def size(self) -> int:
        if self._size and self._last != 0x0A:
            return self._size + 2
        return self._size


def crlfSize(data: bytes) -> int:
    """The wire size (before byte-stuffing) of a message held in memory."""
    sizer = CRLFSizer()
    sizer.feed(data)
    return sizer.size


_STUFF = re.compile(rb"\n\.")  # re's literal search beats bytes.replace here


class TopLimiter:
    """
    Pass LF-normalized message data through up to the end of the header, the
    blank line, and then C{bodyLines} lines of the body (RFC 1939 TOP).

    A message without a blank line is all header and passes through whole.
    """

    __slots__ = ("_inHeader", "_atLineStart", "_left", "done")

    def __init__(self, bodyLines: int) -> None:
        self._inHeader = True
        self._atLineStart = True
        self._left = bodyLines
        #: True once the limit is reached; nothing more will pass.
        self.done = False

    def feed(self, data: bytes) -> bytes:
        if self.done or not data:
            return b""
        pos = 0
        if self._inHeader:
            if self._atLineStart and data[0] == 0x0A:
                pos = 1
            else:
                blank = data.find(b"\n\n")
                if blank < 0:
                    self._atLineStart = data[-1] == 0x0A
                    return data
                pos = blank + 2
            self._inHeader = False
        while self._left > 0:
            eol = data.find(b"\n", pos)
            if eol < 0:
                return data
            pos = eol + 1
            self._left -= 1
        self.done = True
        return data[:pos]


class MessageEncoder:
    """
    The whole pipeline from stored message bytes to the wire: line endings to
    CRLF (a lone CR stays data), optionally cut for TOP, byte-stuffed (RFC 1939
    section 3, the first line included), terminated, whatever the chunking.

    Internally the data is brought to bare LF first, so that stuffing and TOP
    look for one-byte line ends, and turned into CRLF last: three bulk passes
    over each chunk, never a loop over lines.

    With C{stuffed}, the input is already in transfer form (see the module's
    docstring): RETR passes it through untouched, TOP cuts it without
    stuffing it again; the output is byte for byte what the message itself
    gives without C{stuffed}.

    L{finish} ends the response with its terminator; L{flush} ends the
    transfer form, without it (what a store keeps).

    @param topLines: the body lines TOP sends; None for RETR.
    @param stuffed: the input is in transfer form.
    """

    __slots__ = ("_heldCR", "_atLineStart", "_limiter", "_stuffed", "_passThrough")

    def __init__(self, topLines: int | None = None, stuffed: bool = False) -> None:
        self._heldCR = False
        self._atLineStart = True
        self._limiter = TopLimiter(topLines) if topLines is not None else None
        self._stuffed = stuffed
        self._passThrough = stuffed and topLines is None

    @property
    def done(self) -> bool:
        """True when no more input is wanted (TOP has sent all it needs)."""
        return self._limiter is not None and self._limiter.done

    def feed(self, chunk: bytes) -> bytes:
        if self._passThrough:
            if chunk:
                self._atLineStart = chunk[-1] == 0x0A
            return chunk
        if self._heldCR:
            chunk = b"\r" + chunk
            self._heldCR = False
        if chunk[-1:] == b"\r":
            # A CR at the end may be half of a CRLF: decide with the next chunk.
            chunk = chunk[:-1]
            self._heldCR = True
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n")
        return self._emit(chunk)

    def _emit(self, data: bytes) -> bytes:
        if self._limiter is not None:
            data = self._limiter.feed(data)
        if not data:
            return b""
        if self._stuffed:
            stuffed = data
        else:
            stuffed = _STUFF.sub(b"\n..", data)
            if self._atLineStart and data[0] == 0x2E:
                stuffed = b"." + stuffed
        self._atLineStart = data[-1] == 0x0A
        return stuffed.replace(b"\n", b"\r\n")

    def flush(self) -> bytes:
        """
        The end of the transfer form: what is held back, and the CRLF that
        a non-empty message not ending in a line ending gets.
        """
        out = b""
        if self._heldCR:
            self._heldCR = False
            out = self._emit(b"\r")
        if self._atLineStart:
            return out
        self._atLineStart = True
        return out + CRLF

    def finish(self) -> bytes:
        """The end of the response: L{flush}, then the terminator."""
        return self.flush() + TERMINATOR


class TransferDecoder:
    """
    Turn transfer form (see the module's docstring) back into the message,
    whatever the chunking: the stuffing undone, line endings left CRLF.
    """

    __slots__ = ("_atLineStart",)

    def __init__(self) -> None:
        self._atLineStart = True

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        if self._atLineStart and chunk[0] == 0x2E:
            chunk = chunk[1:]  # every line that starts with "." was given one more
        self._atLineStart = chunk[-1:] == b"\n"
        if b"\n." in chunk:
            chunk = chunk.replace(b"\n.", b"\n")
        return chunk
