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
    # An IPv4 client on a dual-stack socket has IPv4-mapped IPv6 addresses
    # (one or both): sent as IPv4 if both then are, else left as they are.
    # The family and the body's length must agree whatever the pair.
    src4, dst4 = _unmapped(src), _unmapped(dst)
    if src4.version == dst4.version:
        src, dst = src4, dst4
    elif src.version != dst.version:
        return _LOCAL
    ports = struct.pack("!HH", getattr(source, "port", 0), getattr(destination, "port", 0))
    family = b"\x11" if src.version == 4 else b"\x21"  # TCP over IPv4 / IPv6
    body = src.packed + dst.packed + ports
    return SIGNATURE + b"\x21" + family + struct.pack("!H", len(body)) + body


def _unmapped(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The IPv4 address of an IPv4-mapped IPv6 C{address}; any other as it is."""
    return getattr(address, "ipv4_mapped", None) or address
