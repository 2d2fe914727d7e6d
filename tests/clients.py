"""
Helpers shared by the end-to-end tests with real clients: the forms a message
takes on the wire and after a client delivered it, and client output for
assertion messages.
"""

from __future__ import annotations

import re
import subprocess


def wire(message: bytes) -> bytes:
    """The message as the server sends it (before stuffing): CRLF lines, final CRLF."""
    lf = message.replace(b"\r\n", b"\n")
    if not lf.endswith(b"\n"):
        lf += b"\n"
    return lf.replace(b"\n", b"\r\n")


def local(message: bytes) -> bytes:
    """The message as fetchmail and mpop deliver it: the wire form with LF line endings."""
    return wire(message).replace(b"\r\n", b"\n")


def split_received(data: bytes, client: bytes) -> bytes:
    """Remove the Received: field (with folded lines) that the client put on top."""
    m = re.match(rb"Received:[^\n]*\n(?:[ \t][^\n]*\n)*", data)
    assert m, f"no Received: header added: {data[:300]!r}"
    assert client in m.group(0), m.group(0)
    return data[m.end() :]


def output(proc: subprocess.CompletedProcess[bytes]) -> str:
    return (proc.stdout + proc.stderr).decode("utf-8", "replace")
