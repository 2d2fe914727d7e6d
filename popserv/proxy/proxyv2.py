"""
The PROXY protocol version 2 header (HAProxy's C{proxy-protocol.txt}, section
2.2) that the proxy sends a backend first, so that the backend logs, limits
and penalizes by the client's address rather than the proxy's.
"""

from __future__ import annotations

import ipaddress
import struct

__all__ = ["SIGNATURE", "proxyHeader"]

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

_LOCAL = SIGNATURE + b"\x20\x00\x00\x00"  # version 2, LOCAL, unspecified family


def proxyHeader(source: object, destination: object) -> bytes:
    """
    The v2 header for a TCP connection from C{source} to C{destination}
    (Twisted C{IPv4Address}/C{IPv6Address}); a LOCAL header, which makes the
    backend use the proxy's own address, for any other kind (a Unix socket).
    """
    try:
        src = ipaddress.ip_address(getattr(source, "host", ""))
        dst = ipaddress.ip_address(getattr(destination, "host", ""))
    except ValueError:
        return _LOCAL
    if src.version != dst.version:  # an IPv4 client on a dual-stack socket
        if src.version == 6 and src.ipv4_mapped is not None:
            src = src.ipv4_mapped
        elif dst.version == 6 and dst.ipv4_mapped is not None:
            dst = dst.ipv4_mapped
        else:
            return _LOCAL
    ports = struct.pack("!HH", getattr(source, "port", 0), getattr(destination, "port", 0))
    family = b"\x11" if src.version == 4 else b"\x21"  # TCP over IPv4 / IPv6
    body = src.packed + dst.packed + ports
    return SIGNATURE + b"\x21" + family + struct.pack("!H", len(body)) + body
