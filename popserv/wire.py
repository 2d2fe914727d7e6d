"""
The POP3 wire format, pure: parse command lines, format status lines, and turn
message bytes into the body of a multi-line response (the encoder lives in
L{popserv.octets} with the other byte transforms storage shares).

Nothing here touches a reactor, a transport or a file, so every function can be
tested (and fuzzed) on bytes alone.
"""

from __future__ import annotations

from typing import NamedTuple

# Where they lived before popserv.octets (which storage uses without the wire).
from popserv.octets import (  # noqa: F401
    CRLF,
    TERMINATOR,
    CRLFSizer,
    MessageEncoder,
    TopLimiter,
    crlfSize,
)

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
