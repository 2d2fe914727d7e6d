"""
Octet counting: the size POP3 reports for a stored message.

Storage needs it to list messages and the wire needs it to send them; it
depends on nothing of popserv, so storage never imports the wire.
"""

from __future__ import annotations

__all__ = ["CRLFSizer", "crlfSize"]


class CRLFSizer:
    """
    Count the octets a message occupies on the wire before byte-stuffing, from
    its stored bytes, without building the converted copy.

    This is the size that STAT, LIST and the RETR status line report: CRLF line
    endings, plus the CRLF that L{popserv.wire.MessageEncoder.finish} adds to a
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
