"""
The DATA section of SMTP and LMTP (RFC 5321 section 4.5.2): dot-unstuffing
and the end mark C{CRLF.CRLF}, decoded chunk by chunk as it arrives, in
memory bounded by the chunk: lines may be of any length.
"""

from __future__ import annotations

__all__ = ["DataDecoder"]

_MARK = b"\r\n."


class DataDecoder:
    """
    Turns the octets after C{354} into the message. Only a line that starts
    with a dot matters, so the decoder looks for C{CRLF.} alone: a dot-stuffed
    line loses its dot, and C{CRLF.CRLF} ends the message (its first CRLF is
    the message's last). The message's start counts as a line start, found
    the same way by a CRLF put before the first octet and taken off again.

    @ivar done: the end mark was seen.
    """

    def __init__(self) -> None:
        self._pending = b"\r\n"
        self._skip = 2  # the CRLF put in front, not part of the message
        self.done = False

    def feed(self, data: bytes) -> tuple[bytes, bytes | None]:
        """
        The message octets that C{data} completes, and what followed the end
        mark (the next commands) once it is seen, else None.
        """
        buf = self._pending + data if self._pending else data
        out: list[bytes] = []
        start = 0
        rest: bytes | None = None
        while True:
            i = buf.find(_MARK, start)
            if i < 0:
                tail = len(buf) - (2 if buf.endswith(b"\r\n") else 1 if buf.endswith(b"\r") else 0)
                tail = max(tail, start)
                out.append(buf[start:tail])
                self._pending = buf[tail:]
                break
            if len(buf) < i + 5:  # too short yet to tell a stuffed dot from the end
                out.append(buf[start:i])
                self._pending = buf[i:]
                break
            out.append(buf[start : i + 2])
            if buf[i + 3 : i + 5] == b"\r\n":
                self._pending = b""
                self.done = True
                rest = buf[i + 5 :]
                break
            start = i + 3  # the stuffed dot is dropped
        message = b"".join(out)
        if self._skip:
            skipped = min(self._skip, len(message))
            message = message[skipped:]
            self._skip -= skipped
        return message, rest
