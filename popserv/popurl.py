"""
RFC 2384 POP URLs, as a backend's address: C{pop://;AUTH=*@mail2.example.org:110}.

C{pop://} (and its alias C{pop3://}, curl's spelling) is POP3 on port 110,
upgraded with STLS when the URL says C{;STLS} or the caller asks for it;
C{pop3s://} is implicit TLS (RFC 8314) on port 995. The C{;AUTH=} part
chooses how to log in: C{*} (the default here) takes what the server offers
(SASL PLAIN, else USER/PASS), C{+APOP} forces APOP, any other name forces that
SASL mechanism (only C{PLAIN} is implemented), and C{USER} forces USER/PASS.
A user part before C{;AUTH=} names the user to log in as.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

__all__ = ["PopURL", "parsePopURL", "PLAIN_TLS", "STARTTLS", "IMPLICIT_TLS"]

PLAIN_TLS = "none"
STARTTLS = "starttls"
IMPLICIT_TLS = "implicit"

_SCHEMES = {"pop": (110, PLAIN_TLS), "pop3": (110, PLAIN_TLS), "pop3s": (995, IMPLICIT_TLS)}
_AUTHS = ("*", "+APOP", "USER", "PLAIN")


@dataclass(frozen=True)
class PopURL:
    """
    A parsed POP URL.

    @ivar tls: L{PLAIN_TLS}, L{STARTTLS} or L{IMPLICIT_TLS}.
    @ivar auth: C{*}, C{+APOP}, C{USER} or C{PLAIN} (upper case).
    @ivar user: the user named in the URL, if any.
    """

    host: str
    port: int
    tls: str = PLAIN_TLS
    auth: str = "*"
    user: str | None = None

    def __str__(self) -> str:
        scheme = "pop3s" if self.tls == IMPLICIT_TLS else "pop"
        user = self.user or ""
        stls = ";STLS" if self.tls == STARTTLS else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{user};AUTH={self.auth}{stls}@{host}:{self.port}"


def parsePopURL(url: str) -> PopURL:
    """Parse C{url}; ValueError with a reason if it is not a POP URL popserv can use."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        raise ValueError(f"{url!r}: not a POP URL (pop://, pop3:// or pop3s://)")
    port, tls = _SCHEMES[scheme.lower()]
    rest = rest.rstrip("/")
    if "/" in rest or "?" in rest or "#" in rest:
        raise ValueError(f"{url!r}: a POP URL has no path, query or fragment")
    userinfo, at, hostport = rest.rpartition("@")
    if not hostport:
        raise ValueError(f"{url!r}: no host")
    auth = "*"
    user: str | None = None
    if at:
        parts = userinfo.split(";")
        user = unquote(parts[0]) or None
        for part in parts[1:]:
            key, _, value = part.partition("=")
            if key.upper() == "AUTH":
                auth = unquote(value).upper()
                if auth not in _AUTHS:
                    raise ValueError(
                        f"{url!r}: AUTH={value} is not supported ({', '.join(_AUTHS)})"
                    )
            elif key.upper() == "STLS" and not value and tls == PLAIN_TLS:
                tls = STARTTLS
            else:
                raise ValueError(f"{url!r}: unknown parameter {part!r}")
    host, port = _hostPort(url, hostport, port)
    return PopURL(host, port, tls, auth, user)


def _hostPort(url: str, text: str, default: int) -> tuple[str, int]:
    if text.startswith("["):
        host, close, after = text[1:].partition("]")
        if not close or (after and not after.startswith(":")):
            raise ValueError(f"{url!r}: bad IPv6 address")
        portText = after[1:] if after else ""
    else:
        host, _, portText = text.partition(":")
    if not host:
        raise ValueError(f"{url!r}: no host")
    if not portText:
        return host, default
    if not portText.isdigit() or not 0 < int(portText) < 65536:
        raise ValueError(f"{url!r}: bad port {portText!r}")
    return host, int(portText)
