"""
RFC 2384 POP URLs, the one parser for every place popserv takes one: a proxy
backend (C{--proxy-backend pop://;AUTH=*@mail2.example.org:110}) and the
source of C{popserv migrate --from pop://user@host}.

C{pop://} (and its alias C{pop3://}, curl's spelling) is POP3 on port 110,
upgraded with STLS when the URL says C{;STLS} (and, for C{migrate}, whenever
the server offers it); C{pop3s://} is implicit TLS (RFC 8314) on port 995.
The C{;AUTH=} part chooses how to log in: C{*} (the default) takes what the
server offers, C{+APOP} forces APOP, C{+USER} (or C{USER}) forces USER/PASS,
and C{PLAIN} forces SASL PLAIN; each user of the parser says which of these
it implements. A user part before C{;AUTH=} names the user to log in as; a
password in the URL is refused (it would end up in logs and process lists).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

__all__ = [
    "PopURL",
    "parsePopURL",
    "PLAIN_TLS",
    "STARTTLS",
    "IMPLICIT_TLS",
    "AUTHS",
]

PLAIN_TLS = "none"
STARTTLS = "starttls"
IMPLICIT_TLS = "implicit"

_SCHEMES = {"pop": (110, PLAIN_TLS), "pop3": (110, PLAIN_TLS), "pop3s": (995, IMPLICIT_TLS)}
#: Every C{;AUTH=} value the parser knows (C{USER} is read as C{+USER}).
AUTHS = ("*", "+APOP", "+USER", "PLAIN")


@dataclass(frozen=True)
class PopURL:
    """
    A parsed POP URL.

    @ivar tls: L{PLAIN_TLS}, L{STARTTLS} or L{IMPLICIT_TLS}.
    @ivar auth: one of L{AUTHS} (upper case).
    @ivar user: the user named in the URL, if any.
    """

    host: str
    port: int
    tls: str = PLAIN_TLS
    auth: str = "*"
    user: str | None = None

    @property
    def implicitTLS(self) -> bool:
        return self.tls == IMPLICIT_TLS

    def __str__(self) -> str:
        scheme = "pop3s" if self.tls == IMPLICIT_TLS else "pop"
        params = "" if self.auth == "*" else f";AUTH={self.auth}"
        if self.tls == STARTTLS:
            params += ";STLS"
        user = (self.user or "") + params
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{user + '@' if user else ''}{host}:{self.port}"


def parsePopURL(url: str, auths: tuple[str, ...] = AUTHS) -> PopURL:
    """
    Parse C{url}: C{pop://[user][;AUTH=type][;STLS]@host[:port]}.

    @param auths: the C{;AUTH=} values the caller implements.
    @raise ValueError: with a reason, if it is not a POP URL popserv can use.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        raise ValueError(f"{url!r}: not a POP URL (pop://, pop3:// or pop3s://)")
    port, tls = _SCHEMES[scheme.lower()]
    rest = rest.removesuffix("/")
    if "/" in rest or "?" in rest or "#" in rest:
        raise ValueError(f"{url!r}: a POP URL has no path, query or fragment")
    userinfo, at, hostport = rest.rpartition("@")
    if not hostport:
        raise ValueError(f"{url!r}: no host")
    auth = "*"
    user: str | None = None
    if at:
        name, *params = userinfo.split(";")
        if ":" in name:
            raise ValueError(f"{url!r}: no passwords in the URL")
        user = unquote(name) or None
        for part in params:
            key, _, value = part.partition("=")
            if key.upper() == "AUTH" and value:
                auth = unquote(value).upper()
                auth = "+USER" if auth == "USER" else auth
                if auth not in auths:
                    raise ValueError(
                        f"{url!r}: AUTH={value} is not supported ({', '.join(auths)})"
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
