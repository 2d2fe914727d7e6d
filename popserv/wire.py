"""
The POP3 wire format, pure: parse command lines, format status lines, and turn
message bytes into the body of a multi-line response.

Nothing here touches a reactor, a transport or a file, so every function can be
tested (and fuzzed) on bytes alone.
"""

from __future__ import annotations

import re
from typing import NamedTuple

# Where they lived before popserv.octets (which storage uses without the wire).
from popserv.octets import CRLFSizer, crlfSize  # noqa: F401

__all__ = [
    "MAX_COMMAND_LINE",
    "MAX_RESPONSE_LINE",
    "Command",
    "parseCommand",
    "ok",
    "err",
    "TopLimiter",
    "MessageEncoder",
]

#: RFC 2449 section 4: a command line is at most 255 octets, CRLF included.
MAX_COMMAND_LINE = 255

#: RFC 2449 section 4: a response line is at most 512 octets, CRLF included.
MAX_RESPONSE_LINE = 512

CRLF = b"\r\n"
TERMINATOR = b".\r\n"


class Command(NamedTuple):
    """
    One parsed command line (a named tuple: one is made per command, and a
    frozen dataclass costs several times as much to make).

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
    if text.__class__ is str and len(text) < _SHORT and "\r" not in text and "\n" not in text:
        # The common case, made in one go: short enough that its UTF-8 fits.
        return b"+OK " + text.encode() + CRLF if text else b"+OK\r\n"
    return _status(b"+OK", text, None)


#: Texts shorter than this fit a response line whatever their UTF-8 (4 octets
#: a character at most).
_SHORT = (MAX_RESPONSE_LINE - len(b"+OK \r\n")) // 4


def err(text: str | bytes = "", code: str | None = None) -> bytes:
    """
    Format a negative status line, with an RFC 2449 response code if given.

    The server sends none but through L{popserv.pipeline.errorReply}: texts
    and codes come from L{popserv.errors}, never from the caller.
    """
    return _status(b"-ERR", text, code)


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
    """

    __slots__ = ("_heldCR", "_atLineStart", "_limiter")

    def __init__(self, topLines: int | None = None) -> None:
        self._heldCR = False
        self._atLineStart = True
        self._limiter = TopLimiter(topLines) if topLines is not None else None

    @property
    def done(self) -> bool:
        """True when no more input is wanted (TOP has sent all it needs)."""
        return self._limiter is not None and self._limiter.done

    def feed(self, chunk: bytes) -> bytes:
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
        stuffed = _STUFF.sub(b"\n..", data)
        if self._atLineStart and data[0] == 0x2E:
            stuffed = b"." + stuffed
        self._atLineStart = data[-1] == 0x0A
        return stuffed.replace(b"\n", b"\r\n")

    def finish(self) -> bytes:
        out = b""
        if self._heldCR:
            self._heldCR = False
            out = self._emit(b"\r")
        if self._atLineStart:
            return out + TERMINATOR
        return out + CRLF + TERMINATOR
