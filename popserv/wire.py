"""
The POP3 wire format, pure: parse command lines, format status lines, and turn
message bytes into the body of a multi-line response.

Nothing here touches a reactor, a transport or a file, so every function can be
tested (and fuzzed) on bytes alone.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "MAX_COMMAND_LINE",
    "MAX_RESPONSE_LINE",
    "Command",
    "parseCommand",
    "ok",
    "err",
    "LineEndingNormalizer",
    "DotStuffer",
    "TopLimiter",
    "MessageEncoder",
    "crlfSize",
]

#: RFC 2449 section 4: a command line is at most 255 octets, CRLF included.
MAX_COMMAND_LINE = 255

#: RFC 2449 section 4: a response line is at most 512 octets, CRLF included.
MAX_RESPONSE_LINE = 512

CRLF = b"\r\n"
TERMINATOR = b".\r\n"


@dataclass(frozen=True)
class Command:
    """
    One parsed command line.

    @ivar verb: the keyword, upper-cased (RFC 1939 keywords are case-insensitive).
    @ivar rest: everything after the first space, as sent (PASS needs it whole:
        a password may contain spaces).
    """

    verb: str
    rest: bytes

    @property
    def args(self) -> list[bytes]:
        """The space-separated arguments (empty strings from doubled spaces dropped)."""
        return self.rest.split()


def parseCommand(line: bytes) -> Command:
    """
    Split a command line (without its line ending) into verb and arguments.

    Never raises: a verb that is not printable ASCII is returned as an empty
    string, which no command table knows, so it gets the unknown-command reply.
    """
    verb, _, rest = line.partition(b" ")
    if verb.isalnum() and verb.isascii():
        name = verb.decode("ascii").upper()
    else:
        name = ""
    return Command(name, rest)


def _status(indicator: bytes, text: str | bytes, code: str | None) -> bytes:
    if isinstance(text, str):
        text = text.encode("utf-8")
    parts = [indicator]
    if code:
        parts.append(b"[" + code.encode("ascii") + b"]")
    if text:
        parts.append(text)
    line = b" ".join(parts)
    # CR or LF inside the text would let it forge further responses.
    line = line.replace(b"\r", b" ").replace(b"\n", b" ")
    return line[: MAX_RESPONSE_LINE - 2] + CRLF


def ok(text: str | bytes = "") -> bytes:
    """Format a positive status line, CRLF included."""
    return _status(b"+OK", text, None)


def err(text: str | bytes = "", code: str | None = None) -> bytes:
    """Format a negative status line, with an RFC 2449 response code if given."""
    return _status(b"-ERR", text, code)


class LineEndingNormalizer:
    """
    Turn bare LF line endings into CRLF, chunk by chunk.

    CRLF stays CRLF and a lone CR stays as it is. A CR at the end of a chunk is
    held back until the next chunk shows whether an LF follows it, so that the
    output never depends on how the input was split.
    """

    __slots__ = ("_heldCR",)

    def __init__(self) -> None:
        self._heldCR = False

    def feed(self, chunk: bytes) -> bytes:
        if self._heldCR:
            chunk = b"\r" + chunk
            self._heldCR = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._heldCR = True
        if b"\n" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        return chunk

    def finish(self) -> bytes:
        held, self._heldCR = self._heldCR, False
        return b"\r" if held else b""


class DotStuffer:
    """
    Byte-stuff CRLF-normalized data (RFC 1939 section 3) and terminate it.

    Every line that starts with "." gets one more, the first line included,
    wherever the chunk boundaries fall. L{finish} adds the CRLF a message
    without a final line ending lacks, then the terminating ".".
    """

    __slots__ = ("_atLineStart",)

    def __init__(self) -> None:
        self._atLineStart = True

    def feed(self, data: bytes) -> bytes:
        if not data:
            return b""
        out = data.replace(b"\r\n.", b"\r\n..")
        if self._atLineStart and data[0] == 0x2E:
            out = b"." + out
        self._atLineStart = data[-1] == 0x0A
        return out

    def finish(self) -> bytes:
        return TERMINATOR if self._atLineStart else CRLF + TERMINATOR


class TopLimiter:
    """
    Pass CRLF-normalized message data through up to the end of the header, the
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
            if self._atLineStart and data.startswith(CRLF):
                pos = 2
            else:
                blank = data.find(b"\r\n\r\n")
                if blank < 0:
                    self._atLineStart = data[-1] == 0x0A
                    return data
                pos = blank + 4
            self._inHeader = False
        while self._left > 0:
            eol = data.find(CRLF, pos)
            if eol < 0:
                return data
            pos = eol + 2
            self._left -= 1
        self.done = True
        return data[:pos]


class MessageEncoder:
    """
    The whole pipeline from stored message bytes to the wire: line endings to
    CRLF, optionally cut for TOP, byte-stuffed, terminated.
    """

    __slots__ = ("_normalizer", "_limiter", "_stuffer")

    def __init__(self, topLines: int | None = None) -> None:
        self._normalizer = LineEndingNormalizer()
        self._limiter = TopLimiter(topLines) if topLines is not None else None
        self._stuffer = DotStuffer()

    @property
    def done(self) -> bool:
        """True when no more input is wanted (TOP has sent all it needs)."""
        return self._limiter is not None and self._limiter.done

    def feed(self, chunk: bytes) -> bytes:
        data = self._normalizer.feed(chunk)
        if self._limiter is not None:
            data = self._limiter.feed(data)
        return self._stuffer.feed(data)

    def finish(self) -> bytes:
        data = self._normalizer.finish()
        if self._limiter is not None:
            data = self._limiter.feed(data)
        return self._stuffer.feed(data) + self._stuffer.finish()


class CRLFSizer:
    """
    Count the octets a message occupies on the wire before byte-stuffing, from
    its stored bytes, without building the converted copy.

    This is the size that STAT, LIST and the RETR status line report: CRLF line
    endings, plus the CRLF that L{DotStuffer.finish} adds to a non-empty message
    that does not end in a line ending.
    """

    __slots__ = ("_size", "_heldCR", "_last")

    def __init__(self) -> None:
        self._size = 0
        self._heldCR = False
        self._last = 0x0A

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        size = len(chunk) + chunk.count(b"\n") - chunk.count(b"\r\n")
        if self._heldCR and chunk[0] == 0x0A:
            size -= 1  # the LF completes a CRLF split across chunks
        self._size += size
        self._heldCR = chunk[-1] == 0x0D
        self._last = chunk[-1]

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
