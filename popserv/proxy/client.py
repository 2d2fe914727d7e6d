"""
The proxy's POP3 client: one connection to a backend, logged in as the
user, then handed to the L{popserv.proxy.relay} for the rest of the session.

The login is a short exchange, parsed line by line::

    greeting -> [STLS -> TLS] -> CAPA -> AUTH PLAIN | USER/PASS | APOP -> +OK

C{;AUTH=*} takes SASL PLAIN if CAPA lists it (one round trip with the
initial response), else USER/PASS; CAPA is not asked when the connector
remembers that this backend offers PLAIN (C{plainKnown}); master-user logins are always SASL PLAIN
with the user as the authorization id. After the final C{+OK} the protocol
parses nothing more: it passes the backend's bytes on as they come.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from popserv.popurl import IMPLICIT_TLS, STARTTLS

__all__ = ["BackendLogin", "BackendRefused", "BackendFailed", "LoginAs"]

#: A backend's line is at most this long during the login (RFC 2449: 512).
_MAX_LINE = 4096

_CODE = re.compile(rb"^-ERR \[([A-Za-z0-9/-]+)\]")
_TIMESTAMP = re.compile(rb"<[^<>@\s]+@[^<>\s]+>")


class BackendRefused(Exception):
    """
    The backend answered the login with C{-ERR}: the user's answer, not a
    reason to try another backend.

    @ivar line: the backend's whole line (without CRLF).
    @ivar code: its response code (C{AUTH}, C{IN-USE}, C{SYS/TEMP}...) or None.
    """

    def __init__(self, line: bytes) -> None:
        super().__init__(line.decode("utf-8", "replace"))
        self.line = line
        match = _CODE.match(line)
        self.code = match.group(1).decode("ascii").upper() if match else None


class BackendFailed(Exception):
    """The backend could not be used (no greeting, a broken exchange, TLS): try another."""


@dataclass(frozen=True)
class LoginAs:
    """
    How to log in at the backend.

    @ivar user: the user at the backend (C{destuser}, or the front's name).
    @ivar password: the user's own password (forwarding), or None.
    @ivar masterUser: log in as this master user, for C{user}, with
        C{masterPassword} (SASL PLAIN with an authorization id).
    @ivar auth: C{*}, C{PLAIN}, C{+USER} or C{+APOP} (from the POP URL).
    """

    user: str
    password: bytes | None = field(default=None, repr=False)
    masterUser: str | None = None
    masterPassword: bytes | None = field(default=None, repr=False)
    auth: str = "*"

    def plainResponse(self) -> bytes:
        """The SASL PLAIN message (RFC 4616): authzid NUL authcid NUL password."""
        user = self.user.encode("utf-8")
        if self.masterUser is not None:
            assert self.masterPassword is not None
            return user + b"\0" + self.masterUser.encode("utf-8") + b"\0" + self.masterPassword
        assert self.password is not None
        return b"\0" + user + b"\0" + self.password


class BackendLogin(Protocol):
    """
    Logs in to a backend; C{done} fires with the backend's final C{+OK} line
    (without CRLF), or fails with L{BackendRefused} or L{BackendFailed}.

    @param tls: the TLS client options for STLS or implicit TLS (None: none).
    @param tlsMode: L{popserv.popurl.STARTTLS}, L{popserv.popurl.IMPLICIT_TLS} or none.
    @param header: bytes to send first (a PROXY v2 header), or empty.
    @param plainKnown: the backend is known to offer SASL PLAIN: send
        C{AUTH PLAIN} without asking C{CAPA}.
    @ivar offeredPlain: what C{CAPA} said of SASL PLAIN (None: not asked,
        or a C{plainKnown} that the backend refused without a response code,
        which it is no longer).
    """

    def __init__(
        self,
        login: LoginAs,
        tlsMode: str,
        tls: Any,
        header: bytes = b"",
        plainKnown: bool = False,
    ) -> None:
        self.login = login
        self.plainKnown = plainKnown
        self.offeredPlain: bool | None = None
        self.tlsMode = tlsMode
        self.tls = tls
        self.header = header
        self.done: Deferred[bytes] = Deferred()
        self._buffer = b""
        self._step = self._greeting
        self._capa: list[bytes] | None = None
        self._timestamp: bytes | None = None
        #: After the login: where the backend's bytes go (see L{popserv.proxy.relay}).
        self.relay: Any = None

    def attach(self, relay: Any) -> None:
        """Pass the backend's bytes to C{relay} from now on (any that came early first)."""
        self.relay = relay
        if self._buffer:
            rest, self._buffer = self._buffer, b""
            relay.fromBackend(rest)

    # -- connection events -----------------------------------------------------

    def connectionMade(self) -> None:
        if hasattr(self.transport, "setTcpNoDelay"):
            # Short commands, each awaited: Nagle would hold them for a delayed ACK.
            self.transport.setTcpNoDelay(True)
        if self.header:
            self.transport.write(self.header)
        if self.tlsMode == IMPLICIT_TLS:
            self.transport.startTLS(self.tls)

    def dataReceived(self, data: bytes) -> None:
        relay = self.relay
        if relay is not None:
            relay.fromBackend(data)
            return
        self._buffer += data
        while self._step is not None:
            eol = self._buffer.find(b"\n")
            if eol < 0:
                if len(self._buffer) > _MAX_LINE:
                    self._fail(BackendFailed("overlong line from the backend"))
                return
            line = self._buffer[:eol].rstrip(b"\r")
            self._buffer = self._buffer[eol + 1 :]
            self._step(line)

    def giveUp(self, why: str) -> None:
        """Time is up: fail the login (another backend may be tried) and drop the connection."""
        self._step = None
        if not self.done.called:
            self.done.errback(BackendFailed(why))
        if self.transport is not None:
            self.transport.abortConnection()

    def connectFailed(self, reason: Failure) -> None:
        """The connection could not be made (refused, timed out, cancelled)."""
        self._step = None
        if not self.done.called:
            self.done.errback(BackendFailed(f"cannot connect: {_why(reason)}"))

    def connectionLost(self, reason: Failure | None = None) -> None:
        relay = self.relay
        if relay is not None:
            relay.backendLost()
            return
        self._fail(BackendFailed(f"connection lost during the login: {_why(reason)}"))

    # -- the exchange ------------------------------------------------------------

    def _send(self, line: bytes) -> None:
        self.transport.write(line + b"\r\n")

    def _fail(self, error: Exception) -> None:
        self._step = None
        if not self.done.called:
            self.done.errback(error)
            self.transport.loseConnection()

    def _expectOK(self, line: bytes) -> bool:
        if line.startswith(b"+OK"):
            return True
        if line.startswith(b"-ERR"):
            self._fail(BackendRefused(line))
        else:
            self._fail(BackendFailed(f"unexpected answer {line[:80]!r}"))
        return False

    def _greeting(self, line: bytes) -> None:
        if not line.startswith(b"+OK"):
            # A backend that refuses sessions now (-ERR [SYS/TEMP] ...) is one to skip.
            self._fail(BackendFailed(f"greeting {line[:80]!r}"))
            return
        match = _TIMESTAMP.search(line)
        self._timestamp = match.group(0) if match else None
        if self.tlsMode == STARTTLS:
            self._step = self._stls
            self._send(b"STLS")
        else:
            self._askCapa()

    def _stls(self, line: bytes) -> None:
        if not line.startswith(b"+OK"):
            self._fail(BackendFailed(f"STLS refused: {line[:80]!r}"))
            return
        if self._buffer:
            # Bytes behind the +OK came in the clear, where a man in the
            # middle may have put them (CVE-2011-0411, the client's side):
            # read as answers over TLS they could log the user in.
            self._fail(BackendFailed("data in the clear after the STLS answer"))
            return
        self.transport.startTLS(self.tls)
        self._askCapa()

    def _askCapa(self) -> None:
        if self.login.masterUser is not None or self.login.auth in ("PLAIN", "+USER", "+APOP"):
            self._authenticate(())
            return
        if self.plainKnown:
            self._authenticate((b"SASL PLAIN",))
            return
        self._step = self._capaStatus
        self._send(b"CAPA")

    def _capaStatus(self, line: bytes) -> None:
        if line.startswith(b"+OK"):
            self._capa = []
            self._step = self._capaLine
        else:
            self._authenticate(())  # no CAPA (RFC 1939 only): USER/PASS

    def _capaLine(self, line: bytes) -> None:
        if line == b".":
            capa, self._capa = self._capa or [], None
            sasl = next((c.split()[1:] for c in capa if c.startswith(b"SASL ")), [])
            self.offeredPlain = b"PLAIN" in sasl
            self._authenticate(capa)
        elif self._capa is not None and len(self._capa) < 100:
            self._capa.append(line.upper())

    def _authenticate(self, capa: Any) -> None:
        login = self.login
        sasl = next((c.split()[1:] for c in capa if c.startswith(b"SASL ")), [])
        if login.auth == "+APOP":
            if self._timestamp is None or login.password is None:
                self._fail(BackendRefused(b"-ERR [SYS/TEMP] the backend offers no APOP"))
                return
            digest = hashlib.md5(self._timestamp + login.password).hexdigest()
            self._step = self._final
            self._send(b"APOP " + login.user.encode("utf-8") + b" " + digest.encode("ascii"))
        elif login.masterUser is not None or login.auth == "PLAIN" or b"PLAIN" in sasl:
            self._step = self._final
            self._send(b"AUTH PLAIN " + base64.b64encode(login.plainResponse()))
        else:
            self._step = self._userSent
            self._send(b"USER " + login.user.encode("utf-8"))

    def _userSent(self, line: bytes) -> None:
        if self._expectOK(line):
            assert self.login.password is not None
            self._step = self._final
            self._send(b"PASS " + self.login.password)

    def _final(self, line: bytes) -> None:
        if line.startswith(b"+ "):  # a server that ignored the initial response
            self._send(base64.b64encode(self.login.plainResponse()))
            return
        if self.plainKnown and line.startswith(b"-ERR") and not _CODE.match(line):
            # Perhaps no PLAIN there any more: the next login asks CAPA again.
            self.offeredPlain = False
        if self._expectOK(line):
            self._step = None
            self.done.callback(line)


def _why(reason: Failure | None) -> str:
    return "closed" if reason is None else reason.getErrorMessage()
