"""
GSSAPI (RFC 4752, for POP3 through RFC 5034): a Kerberos 5 ticket, checked
with a key from the server's keytab.

The exchange: the client's tokens go to C{accept_sec_context} until the
context is established (its last output token, the mutual-authentication
reply, goes back as a challenge the client answers with an empty response);
then the server offers its security layers in a wrapped message, and the
client answers with its choice and an authorization id, wrapped too. popserv
offers "no security layer" only (bit 0x01, maximum buffer 0): TLS is the
layer, and a session wrapped in GSSAPI messages would need a second framing
of the whole protocol.

The client's principal becomes a user name through L{PrincipalMap}; the
result is L{VerifiedCredentials} (or L{Impersonation} for an authorization id
naming someone else, which only a master user may use), so the user must
exist in an auth source, looked up without a password, as for EXTERNAL.

python-gssapi is imported only when the mechanism is configured or used: a
server without it starts, and simply never offers GSSAPI. Tickets and tokens
never reach a log line; failures are logged by their GSS-API status text.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from popserv.auth.credentials import Impersonation, VerifiedCredentials
from popserv.errors import TemporaryFailure
from popserv.sasl.base import (
    Challenge,
    ISASLExchange,
    ISASLMechanism,
    Outcome,
    SASLContext,
    SASLError,
)
from popserv.threads import RunInThread, synchronously

__all__ = ["GSSAPI", "PrincipalMap", "NO_SECURITY_LAYER", "gssapiMissing"]

_log = Logger()

#: RFC 4752 section 3.3: the bit of the "no security layer" choice.
NO_SECURITY_LAYER = 0x01

#: The server's offer: only "no security layer", and a maximum buffer of 0.
_OFFER = struct.pack("!B3s", NO_SECURITY_LAYER, b"\x00\x00\x00")

#: Seconds a check that the keytab is readable stands (CAPA runs it often).
_RECHECK = 1.0


def gssapiMissing() -> str | None:
    """Why python-gssapi cannot be used (it is not installed), or None if it can."""
    try:
        import gssapi  # noqa: F401
    except ImportError as e:
        return f"python-gssapi is not installed ({e}); pip install 'popserv[kerberos]'"
    return None


@dataclass(frozen=True)
class PrincipalMap:
    """
    Which Kerberos principals are users, and which users.

    C{user@DEFAULT.REALM} is C{user}; a principal of another realm is refused
    unless C{realms} names it: C{realms[REALM]} is the domain its users get
    (C{user@domain}), or C{""} for bare names. A principal with an instance
    (C{user/admin@REALM}) is never a user.

    @ivar defaultRealm: the realm of the Kerberos configuration (None if it
        has none: then only the realms in C{realms} are users).
    """

    defaultRealm: str | None
    realms: MappingProxyType[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def parse(cls, defaultRealm: str | None, entries: Iterable[str]) -> PrincipalMap:
        """From C{--gssapi-realm-map} entries, C{REALM} or C{REALM=DOMAIN}; ValueError if bad."""
        realms = {}
        for entry in entries:
            realm, _, domain = entry.partition("=")
            realm, domain = realm.strip(), domain.strip()
            if not realm or "@" in realm or "/" in realm or "@" in domain or "/" in domain:
                raise ValueError(f"{entry!r}: expected REALM or REALM=DOMAIN")
            realms[realm] = domain
        return cls(defaultRealm, MappingProxyType(realms))

    def user(self, principal: str) -> str | None:
        """The user C{principal} (C{name@REALM}) is, or None if it is none."""
        name, at, realm = principal.rpartition("@")
        if not at or not name or not realm or "/" in name or "@" in name:
            return None
        domain = self.realms.get(realm)
        if domain is None:
            if realm != self.defaultRealm:
                return None
            domain = ""
        return f"{name}@{domain}" if domain else name


def defaultRealm() -> str | None:
    """
    The default realm of the Kerberos configuration (C{KRB5_CONFIG}, else
    C{/etc/krb5.conf}), or None: a bare name made canonical gets it.
    """
    import gssapi

    try:
        name = gssapi.Name("popserv", gssapi.NameType.kerberos_principal)
        canonical = str(name.canonicalize(gssapi.MechType.kerberos))
    except gssapi.exceptions.GSSError:
        return None
    _, at, realm = canonical.rpartition("@")
    return realm if at and realm else None


def _failure(error: Exception) -> str:
    """What a GSS-API error says (status texts, never token bytes)."""
    text = getattr(error, "gen_message", None)
    try:
        return text() if callable(text) else str(error)
    except Exception:
        return type(error).__name__


@implementer(ISASLExchange)
class _GSSAPIExchange:
    """
    One run of RFC 4752 section 3.1, server side. Establishing the context
    (C{accept_sec_context}, which reads the keytab and may write the replay
    cache) runs in a thread; wrapping the four-octet messages is arithmetic.
    """

    def __init__(self, mechanism: GSSAPI) -> None:
        self._mechanism = mechanism
        self._context: Any = None
        self._user: str | None = None
        self._asked = False
        self._stage = "token"  # then "reply-sent", "offered"

    def step(self, response: bytes | None) -> Challenge | Outcome | Deferred[Any]:
        if self._stage == "token":
            if response is None and not self._asked:
                self._asked = True
                return Challenge(b"")
            if not response:
                raise SASLError()
            return self._mechanism.runInThread(self._accept, response)
        if self._stage == "reply-sent":
            if response:
                raise SASLError()  # the reply to the mutual-authentication token is empty
            return self._offer()
        if self._stage == "offered":
            return self._choice(response or b"")
        raise SASLError()

    def _accept(self, token: bytes) -> Challenge | Outcome:
        """In a thread: take one context token; the next challenge."""
        import gssapi

        if self._context is None:
            try:
                credentials = self._mechanism.acceptorCredentials()
            except gssapi.exceptions.GSSError as e:
                # The server's fault, not the client's: [SYS/TEMP], no failed login.
                _log.error(
                    "GSSAPI: no service key in {keytab}: {why}",
                    keytab=self._mechanism.keytab,
                    why=_failure(e),
                )
                raise TemporaryFailure() from None
            self._context = gssapi.SecurityContext(creds=credentials, usage="accept")
        try:
            reply = self._context.step(token)
            if not self._context.complete:
                return Challenge(reply or b"")
            principal = str(self._context.initiator_name)
        except gssapi.exceptions.GSSError as e:
            _log.info("GSSAPI: the client's token was refused: {why}", why=_failure(e))
            raise SASLError() from None
        self._user = self._mechanism.principals.user(principal)
        if self._user is None:
            _log.info("GSSAPI: {who} is no user here (realm or instance)", who=principal)
            raise SASLError()
        if reply:
            self._stage = "reply-sent"
            return Challenge(reply)
        return self._offer()

    def _offer(self) -> Challenge:
        import gssapi

        try:
            wrapped = self._context.wrap(_OFFER, False).message
        except gssapi.exceptions.GSSError as e:
            _log.info("GSSAPI: cannot wrap the offer: {why}", why=_failure(e))
            raise SASLError() from None
        self._stage = "offered"
        return Challenge(wrapped)

    def _choice(self, response: bytes) -> Outcome:
        import gssapi

        self._stage = "done"
        try:
            message = self._context.unwrap(response).message
        except gssapi.exceptions.GSSError as e:
            _log.info("GSSAPI: the client's choice does not unwrap: {why}", why=_failure(e))
            raise SASLError() from None
        # The chosen layer (exactly "none": the only one offered), three octets
        # of maximum buffer (meaningless without a layer), the authorization id.
        if len(message) < 4 or message[0] != NO_SECURITY_LAYER:
            raise SASLError()
        try:
            authzid = message[4:].decode("utf-8")
        except UnicodeDecodeError:
            raise SASLError() from None
        assert self._user is not None
        proven = VerifiedCredentials(self._user, "GSSAPI")
        if authzid and authzid != self._user:
            # Acting for another user: the checker allows it for master users only.
            return Outcome(Impersonation(authzid, proven))
        return Outcome(proven)


@implementer(ISASLMechanism)
class GSSAPI:
    """
    The GSSAPI mechanism, with Kerberos 5 as its only GSS-API mechanism.

    Unconfigured (no keytab, as in L{popserv.sasl.ALL_MECHANISMS}) it is never
    offered; L{configured} makes the one a server uses.

    @ivar keytab: the keytab holding the service keys (absolute path).
    @ivar principal: the service principal to accept tickets for (C{pop/host}
        or C{pop/host@REALM}); None accepts tickets for any key in the keytab.
    @ivar principals: how client principals become users.
    @ivar runInThread: where context establishment runs.
    """

    name = "GSSAPI"
    plaintext = False

    def __init__(
        self,
        keytab: str | None = None,
        principal: str | None = None,
        principals: PrincipalMap | None = None,
        runInThread: RunInThread = synchronously,
    ) -> None:
        self.keytab = keytab
        self.principal = principal
        self.principals = principals or PrincipalMap(None)
        self.runInThread = runInThread
        self._readable = False
        self._checked = float("-inf")

    @classmethod
    def configured(
        cls,
        keytab: str,
        principal: str | None,
        realmMap: Iterable[str],
        runInThread: RunInThread,
    ) -> GSSAPI:
        """
        The mechanism a server offers; at start-up, since it reads the Kerberos
        configuration for its default realm.

        @raise ValueError: python-gssapi is missing, or a realm-map entry is bad.
        """
        missing = gssapiMissing()
        if missing:
            raise ValueError(missing)
        principals = PrincipalMap.parse(defaultRealm(), realmMap)
        if principals.defaultRealm is None and not principals.realms:
            _log.warn(
                "GSSAPI: the Kerberos configuration names no default realm and "
                "--gssapi-realm-map none: no principal can log in"
            )
        return cls(keytab, principal, principals, runInThread)

    def acceptorCredentials(self) -> Any:
        """The acceptor credentials from the keytab (read at each login: keys rotate)."""
        import gssapi

        name = None
        if self.principal is not None:
            name = gssapi.Name(self.principal, gssapi.NameType.kerberos_principal)
        return gssapi.Credentials(name=name, usage="accept", store={"keytab": self.keytab})

    def status(self) -> str:
        """
        Blocking, for C{popserv check-config}: the keytab is readable and
        holds the service key; ValueError says what is wrong.
        """
        import gssapi

        if self.keytab is None:
            raise ValueError("no keytab configured")
        if not os.access(self.keytab, os.R_OK):
            raise ValueError(f"{self.keytab} is not readable")
        try:
            self.acceptorCredentials()
        except gssapi.exceptions.GSSError as e:
            raise ValueError(_failure(e)) from None
        which = f"a key for {self.principal}" if self.principal else "service keys"
        return f"{self.keytab}: readable, holds {which}"

    def available(self, context: SASLContext) -> bool:
        # Without TLS too: the ticket exchange gives a listener nothing to
        # replay or crack (the session itself is as exposed as any cleartext one).
        if self.keytab is None:
            return False
        now = time.monotonic()
        if now - self._checked >= _RECHECK:
            self._checked = now
            self._readable = os.access(self.keytab, os.R_OK)
        return self._readable

    def exchange(self, context: SASLContext) -> ISASLExchange:
        return _GSSAPIExchange(self)
