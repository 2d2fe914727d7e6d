"""
A live POP3 server as the source of C{popserv migrate}: maildrops read over
POP3 (UIDL, LIST, RETR) through the part of the store contract a migration
uses (C{listMaildrops}, C{openMailbox}, C{listMessages}, C{openMessage}).

The source is an RFC 2384 POP URL (L{popserv.popurl}, the parser the proxy
uses too): C{pop://user;auth=*@host:port}, with C{pop3://} as an alias and
C{pop3s://} for TLS from the first byte (curl's spelling). Over C{pop://},
STLS is used when offered (and required with C{;STLS}); a password goes in
the clear only to a loopback address or with C{insecure}. Certificates are
verified against the system's CAs (or C{caFile}) unless C{insecure}.

It never deletes: the client has no DELE at all, and QUIT removes nothing
that was not marked. Blocking socket I/O: a command-line tool's, never the
server's reactor.
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import hashlib
import ipaddress
import socket
import ssl
import time
from typing import IO

from popserv.errors import MaildropInUse, PermanentFailure
from popserv.interfaces import MessageInfo, validUID
from popserv.popurl import STARTTLS, PopURL, parsePopURL

__all__ = ["parsePOPURL", "SourceError", "POP3Source", "readCredentials"]

#: The longest line accepted from the server (RFC 2449: 512 octets a response).
_MAX_LINE = 64 * 1024


class SourceError(Exception):
    """The source server answered -ERR, or broke the protocol."""


#: The C{;AUTH=} values a migration implements (no APOP).
MIGRATE_AUTHS = ("*", "+USER", "PLAIN")


def parsePOPURL(url: str) -> PopURL:
    """
    RFC 2384: C{pop://[user[;auth=MECH]@]host[:port]}; also C{pop3://} and
    C{pop3s://} (L{popserv.popurl.parsePopURL}). Supported mechanisms: C{*}
    (USER/PASS, or SASL PLAIN for a master user), C{+USER} and C{PLAIN}.

    @raise ValueError: not such a URL.
    """
    return parsePopURL(url, MIGRATE_AUTHS)


def readCredentials(path: str) -> dict[str, str]:
    """C{user:password} lines (blank lines and C{#} comments skipped)."""
    found: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            user, sep, password = line.partition(":")
            if not sep or not user:
                raise ValueError(f"{path}:{number}: not user:password")
            found[user] = password
    return found


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class _Connection:
    """One POP3 session: commands, single-line and multi-line responses."""

    def __init__(self, url: PopURL, context: ssl.SSLContext, insecure: bool, timeout: float):
        self.url = url
        sock = socket.create_connection((url.host, url.port), timeout=timeout)
        if url.implicitTLS:
            sock = context.wrap_socket(sock, server_hostname=url.host)
        self.sock = sock
        self.file: IO[bytes] = sock.makefile("rb")
        self.response()  # the greeting
        if not url.implicitTLS:
            capabilities = self.capabilities()
            if "STLS" in capabilities:
                self.command("STLS")
                self.sock = context.wrap_socket(self.sock, server_hostname=url.host)
                self.file = self.sock.makefile("rb")
            elif url.tls == STARTTLS or not (insecure or _loopback(url.host)):
                self.close()
                raise PermanentFailure(
                    f"{url.host} offers no STLS: use pop3s://, or --insecure to send "
                    "passwords in the clear"
                )

    def line(self) -> bytes:
        data = self.file.readline(_MAX_LINE + 1)
        if not data:
            raise SourceError("the server closed the connection")
        if len(data) > _MAX_LINE:
            raise SourceError("a line too long from the server")
        if data.endswith(b"\r\n"):
            return data[:-2]
        return data[:-1] if data.endswith(b"\n") else data

    def piece(self) -> bytes:
        """The next line as sent, or its next L{_MAX_LINE} octets if longer (a body's)."""
        data = self.file.readline(_MAX_LINE)
        if not data:
            raise SourceError("the server closed the connection")
        return data

    def response(self) -> str:
        line = self.line()
        if line.startswith(b"+OK"):
            return line[3:].strip().decode("utf-8", "replace")
        raise SourceError(line.decode("utf-8", "replace"))

    def command(self, text: str) -> str:
        self.sock.sendall(text.encode("utf-8") + b"\r\n")
        return self.response()

    def lines(self) -> list[bytes]:
        """A multi-line response's lines, unstuffed (small ones: UIDL, LIST, CAPA)."""
        out = []
        while (line := self.line()) != b".":
            out.append(line[1:] if line.startswith(b".") else line)
        return out

    def capabilities(self) -> set[str]:
        try:
            self.command("CAPA")
        except SourceError:
            return set()
        return {line.split(b" ")[0].decode("ascii", "replace").upper() for line in self.lines()}

    def close(self) -> None:
        try:
            self.sock.sendall(b"QUIT\r\n")  # removes nothing: nothing was marked
            self.line()
        except (OSError, SourceError):
            pass
        self.sock.close()


class _Reader:
    """
    One message, streamed from RETR as it is stored (LF line endings, the
    stuffing undone), hashing its wire form (CRLF) on the way: C{sha256},
    C{octets} when done.
    """

    transferForm = False

    def __init__(self, connection: _Connection, number: int) -> None:
        self._connection = connection
        connection.command(f"RETR {number}")
        self._done = False
        self._lineStart = True
        self._heldCR = False  # a piece ended in CR: half of a CRLF, or data
        self.sha256 = hashlib.sha256()
        self.octets = 0

    def read(self, size: int) -> bytes:
        # Piece by piece, not line by line: a line may be longer than any
        # limit a status line has (generated HTML, unwrapped base64).
        out = []
        count = 0
        while not self._done and count < size:
            piece = self._connection.piece()
            if self._lineStart:
                if piece in (b".\r\n", b".\n"):
                    self._done = True
                    break
                if piece.startswith(b"."):
                    piece = piece[1:]
            ends = piece.endswith(b"\n")
            body = piece[: -2 if piece.endswith(b"\r\n") else -1] if ends else piece
            if self._heldCR:
                self._heldCR = False
                if piece != b"\n":
                    body = b"\r" + body  # (the CR of a CRLF split across pieces: dropped)
            if not ends and body.endswith(b"\r"):
                body = body[:-1]
                self._heldCR = True
            self._lineStart = ends
            self.sha256.update(body)
            self.octets += len(body)
            out.append(body)
            if ends:
                self.sha256.update(b"\r\n")
                self.octets += 2
                out.append(b"\n")
            count += len(body) + ends
        return b"".join(out)

    def close(self) -> None:
        while not self._done:  # the rest of the response, so the session goes on
            self.read(1 << 20)


class _Mailbox:
    def __init__(self, connection: _Connection, received: float) -> None:
        self._connection = connection
        self._received = received

    def listMessages(self) -> list[MessageInfo]:
        """
        UIDL and LIST, then each message's delivery time from its headers
        (L{arrivals}); a message whose headers tell none gets a made-up time,
        one second apart in message order, just before the migration began.
        """
        connection = self._connection
        connection.command("UIDL")
        uidls = dict(line.decode("utf-8", "replace").split(" ", 1) for line in connection.lines())
        connection.command("LIST")
        sizes = dict(line.decode("ascii", "replace").split(" ")[:2] for line in connection.lines())
        infos = []
        seen = set()
        for number in sorted(sizes, key=int):
            uid = uidls.get(number, "").strip()
            if not validUID(uid) or uid in seen:
                raise PermanentFailure(
                    f"message {number}: no usable UIDL from the server: {uid!r}"
                )
            seen.add(uid)
            infos.append(MessageInfo(uid, int(sizes[number]), int(number)))
        times = arrivals(connection, [info.key for info in infos], self._received)
        start = self._received - len(infos)
        return [
            info._replace(received=start + i if when is None else when)
            for i, (info, when) in enumerate(zip(infos, times, strict=True))
        ]

    def openMessage(self, info: MessageInfo) -> _Reader:
        return _Reader(self._connection, info.key)

    def close(self) -> None:
        self._connection.close()


#: Header octets of a message read for its delivery time at most.
_MAX_HEADER = 64 * 1024
#: TOP commands sent at once to a server that offers PIPELINING (RFC 2449).
_BATCH = 64


def arrivals(connection: _Connection, numbers: list[int], now: float) -> list[float | None]:
    """
    When each message arrived at the source, as its headers tell (TOP n 0):
    the date of its top C{Received:} field (the source's own MTA wrote it
    last), else its C{Date:}; None when neither parses, the server has no
    TOP, or the time is in the future. Pipelined when the server offers it.
    """
    if not numbers:
        return []
    batch = _BATCH if "PIPELINING" in connection.capabilities() else 1
    found: list[float | None] = []
    for first in range(0, len(numbers), batch):
        chunk = numbers[first : first + batch]
        connection.sock.sendall(b"".join(b"TOP %d 0\r\n" % n for n in chunk))
        for _ in chunk:
            try:
                connection.response()
            except SourceError:  # no TOP, or a message gone: no time for it
                found.append(None)
                continue
            when = headerTime(_headerLines(connection))
            found.append(when if when is not None and when <= now + 300 else None)
    return found


def _headerLines(connection: _Connection) -> list[bytes]:
    """A TOP response's lines, unstuffed, keeping the first L{_MAX_HEADER} octets."""
    kept: list[bytes] = []
    total = 0
    while (line := connection.line()) != b".":
        if total < _MAX_HEADER:
            kept.append(line[1:] if line.startswith(b".") else line)
            total += len(line) + 2
    return kept


def headerTime(lines: list[bytes]) -> float | None:
    """
    The time of the first C{Received:} field (after its last C{;}), else of
    C{Date:}, in a message's header C{lines}; None if neither parses. A
    time without a zone (C{-0000}) is taken as UTC.
    """
    fields: dict[bytes, bytes] = {}
    name = b""
    for line in lines:
        if not line:
            break  # the end of the header
        if line[:1] in (b" ", b"\t"):
            if name:
                fields[name] += b" " + line.strip()
            continue
        name, colon, value = line.partition(b":")
        name = name.strip().lower()
        if not colon or name in fields:
            name = b""  # only the first of each field counts: the top Received
            continue
        fields[name] = value.strip()
    for key in (b"received", b"date"):
        value = fields.get(key)
        if value is None:
            continue
        if key == b"received":
            value = value.rpartition(b";")[2]
        when = _parseDate(value.decode("latin-1").strip())
        if when is not None:
            return when
    return None


def _parseDate(text: str) -> float | None:
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    try:
        return when.timestamp()
    except (OverflowError, OSError, ValueError):
        return None


class POP3Source:
    """
    Maildrops on a live POP3 server (see the module's docstring), for
    L{popserv.migrate.Migration}.

    @param passwords: each user's password (for a URL naming none: every
        user to migrate), or the master user's through C{master}.
    @param master: a master user of the source: C{(name, password)}; logs in
        with SASL PLAIN, the user as the authorization identity.
    """

    def __init__(
        self,
        url: PopURL,
        passwords: dict[str, str],
        master: tuple[str, str] | None = None,
        caFile: str | None = None,
        insecure: bool = False,
        timeout: float = 60.0,
    ) -> None:
        self.url = url
        self.passwords = passwords
        self.master = master
        self.insecure = insecure
        self.timeout = timeout
        self.context = ssl.create_default_context(cafile=caFile)
        if insecure:
            self.context.check_hostname = False
            self.context.verify_mode = ssl.CERT_NONE
        self.started = time.time()

    @property
    def description(self) -> str:
        return str(self.url)

    def listMaildrops(self) -> list[str]:
        return [self.url.user] if self.url.user else sorted(self.passwords)

    def openMailbox(self, user: str) -> _Mailbox:
        connection = _Connection(self.url, self.context, self.insecure, self.timeout)
        try:
            if self.master is not None:
                name, password = self.master
                self._plain(connection, user, name, password)
            elif self.url.auth == "PLAIN":
                self._plain(connection, "", user, self.passwords[user])
            else:
                connection.command(f"USER {user}")
                connection.command(f"PASS {self.passwords[user]}")
        except SourceError as e:
            connection.close()
            if "[IN-USE]" in str(e):
                raise MaildropInUse() from None
            raise PermanentFailure(f"cannot log in to {self.url.host}: {e}") from None
        except KeyError:
            connection.close()
            raise PermanentFailure(f"no password for {user}") from None
        return _Mailbox(connection, self.started)

    @staticmethod
    def _plain(connection: _Connection, authzid: str, authcid: str, password: str) -> None:
        token = base64.b64encode(f"{authzid}\0{authcid}\0{password}".encode()).decode()
        connection.command(f"AUTH PLAIN {token}")
