"""
The C{--passdb ldap:URL} argument: an RFC 4516 LDAP URL, its search filter
with C{%u} escaped as RFC 4515 asks, and the attribute map. The form is
C{ldap[s|i]://host[:port]/BASE?ATTRIBUTES?SCOPE?FILTER?EXTENSIONS}:

  - BASE: the search base (a DN), percent-encoded as URLs are;
  - ATTRIBUTES: what to read, comma-separated: C{ATTRIBUTE=FIELD} maps a
    directory attribute to one of L{FIELDS}; a bare C{userPassword} is the
    C{password} field, any other bare name must be a field's own name;
  - SCOPE: C{base}, C{one} or C{sub} (RFC 4516's default is C{base}; a
    user search wants C{sub}, so C{sub} is the default here);
  - FILTER: with C{%u} (the login name), C{%n} (its part before C{@}) and
    C{%d} (after it), each escaped per RFC 4515; default C{(uid=%u)};
  - EXTENSIONS: C{StartTLS} (or its OID, C{1.3.6.1.4.1.1466.20037}),
    optionally critical (C{!StartTLS}); an unknown critical extension is
    refused (RFC 4516 section 2).

Nothing here does I/O: the configuration check parses URLs too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import unquote

from popserv.proxy.fields import ROUTING_FIELDS

__all__ = [
    "LdapURL",
    "parseLdapURL",
    "escapeFilterValue",
    "FIELDS",
    "DEFAULT_FILTER",
    "STARTTLS_OID",
]

DEFAULT_FILTER = "(uid=%u)"
STARTTLS_OID = "1.3.6.1.4.1.1466.20037"

#: What an attribute may set: the password, the canonical user name (which
#: names the maildrop through C{mail_location}'s C{%u}, C{%n}, C{%d}), the
#: per-user settings, C{nologin}, and the proxy mode's routing fields
#: (L{popserv.proxy.fields.ROUTING_FIELDS}: C{proxy}, C{host}, C{port}...).
FIELDS = frozenset(
    {"password", "user", "login_delay", "expire", "quota_bytes", "quota_messages", "nologin"}
) | frozenset(ROUTING_FIELDS)

_SCOPES = {"base": "BASE", "one": "LEVEL", "sub": "SUBTREE"}
_DEFAULT_PORTS = {"ldap": 389, "ldaps": 636}
#: RFC 4512 attribute descriptions: a name or an OID, with options after ';'.
_ATTRIBUTE = re.compile(r"(?:[A-Za-z][A-Za-z0-9-]*|[0-9]+(?:\.[0-9]+)+)(?:;[A-Za-z0-9-]+)*")
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")


@dataclass(frozen=True)
class LdapURL:
    """
    A parsed C{ldap:} argument.

    @ivar scheme: C{ldap}, C{ldaps} (TLS from the start) or C{ldapi} (a Unix socket).
    @ivar host: the host name or address; for C{ldapi}, the socket's path.
    @ivar scope: C{BASE}, C{LEVEL} or C{SUBTREE} (ldap3's names).
    @ivar attributes: directory attribute -> field (see L{FIELDS}).
    @ivar startTLS: upgrade a C{ldap://} connection with StartTLS before anything else.
    """

    scheme: str
    host: str
    port: int | None
    base: str
    attributes: dict[str, str] = field(default_factory=dict)
    scope: str = "SUBTREE"
    filter: str = DEFAULT_FILTER
    startTLS: bool = False

    def filterFor(self, user: str) -> str:
        """The search filter for C{user}, every substituted part escaped (RFC 4515)."""
        local, _, domain = user.partition("@")
        values = {"u": user, "n": local, "d": domain}
        return re.sub(
            r"%([und%])",
            lambda m: "%" if m.group(1) == "%" else escapeFilterValue(values[m.group(1)]),
            self.filter,
        )

    def fieldAttributes(self, name: str) -> list[str]:
        """The attributes mapped to the field C{name}."""
        return [a for a, f in self.attributes.items() if f == name]

    def __str__(self) -> str:
        where = self.host if self.port is None else f"{self.host}:{self.port}"
        tls = " StartTLS" if self.startTLS else ""
        return f"ldap:{self.scheme}://{where}/{self.base}{tls}"


def escapeFilterValue(value: str) -> str:
    """RFC 4515 section 3: C{*}, C{(}, C{)}, C{\\} and NUL as C{\\XX}."""
    out = []
    for char in value:
        if char in "*()\\\x00":
            out.append(f"\\{ord(char):02x}")
        else:
            out.append(char)
    return "".join(out)


def _decode(part: str) -> str:
    """Percent-decoding that leaves C{%u}, C{%n}, C{%d} (not hex escapes) alone."""
    return unquote(_PERCENT.sub(lambda m: "%" + m.group(1), part))


def _checkFilter(text: str) -> None:
    if not (text.startswith("(") and text.endswith(")")):
        raise ValueError(f"the filter {text!r} must be in parentheses")
    depth = 0
    escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                break
    if depth != 0:
        raise ValueError(f"the filter {text!r} has unbalanced parentheses")
    if not re.search(r"%[und]", text):
        raise ValueError(f"the filter {text!r} must contain %u (the user name)")
    if re.search(r"%[^und%]", text.replace("%%", "")):
        raise ValueError(f"the filter {text!r} has a % other than %u, %n, %d or %%")


def _parseAttributes(text: str) -> dict[str, str]:
    attributes: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        attribute, sep, name = item.partition("=")
        if not _ATTRIBUTE.fullmatch(attribute):
            raise ValueError(f"{attribute!r} is not an attribute name")
        if not sep:
            name = "password" if attribute.lower() == "userpassword" else attribute.lower()
        name = name.strip().lower().removeprefix("userdb_")
        if name not in FIELDS:
            raise ValueError(
                f"attribute {attribute}: {name!r} is not one of {', '.join(sorted(FIELDS))}"
            )
        if name in attributes.values():
            raise ValueError(f"two attributes set {name}")
        attributes[attribute] = name
    return attributes


def parseLdapURL(url: str) -> LdapURL:
    """Parse an C{ldap:} argument (see the module docstring); ValueError says what is wrong."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("ldap", "ldaps", "ldapi"):
        raise ValueError(f"{url!r}: expected ldap://, ldaps:// or ldapi:// URL")
    hostport, _, query = rest.partition("/")
    parts = query.split("?")
    if len(parts) > 5:
        raise ValueError(f"{url!r}: too many '?' parts (BASE?ATTRIBUTES?SCOPE?FILTER?EXTENSIONS)")
    parts += [""] * (5 - len(parts))
    base, attributes, scope, filterText, extensions = parts
    port: int | None = None
    if scheme == "ldapi":
        host = unquote(hostport) or "/var/run/slapd/ldapi"
    else:
        if hostport.startswith("["):  # an IPv6 address
            host, bracket, portText = hostport[1:].partition("]")
            if not bracket:
                raise ValueError(f"{url!r}: unterminated [IPv6 address]")
            portText = portText.removeprefix(":")
        else:
            host, _, portText = hostport.partition(":")
        host = unquote(host) or "localhost"
        try:
            port = int(portText) if portText else _DEFAULT_PORTS[scheme]
        except ValueError:
            raise ValueError(f"{url!r}: bad port {portText!r}") from None
        if not 0 < port < 65536:
            raise ValueError(f"{url!r}: bad port {port}")
    base = _decode(base)
    if not base:
        raise ValueError(f"{url!r}: the search base (a DN after the host) is missing")
    scope = scope.lower() or "sub"
    if scope not in _SCOPES:
        raise ValueError(f"{url!r}: the scope must be base, one or sub, not {scope!r}")
    filterText = _decode(filterText) or DEFAULT_FILTER
    _checkFilter(filterText)
    startTLS = False
    for extension in filter(None, extensions.split(",")):
        critical = extension.startswith("!")
        name = _decode(extension.removeprefix("!")).split("=", 1)[0]
        if name.lower() == "starttls" or name == STARTTLS_OID:
            startTLS = True
        elif critical:
            raise ValueError(f"{url!r}: unknown critical extension {name!r}")
    if startTLS and scheme != "ldap":
        raise ValueError(f"{url!r}: StartTLS is for ldap:// URLs")
    return LdapURL(
        scheme,
        host,
        port,
        base,
        _parseAttributes(_decode(attributes)),
        _SCOPES[scope],
        filterText,
        startTLS,
    )
