"""
SCRAM-SHA-1 and SCRAM-SHA-256 (RFC 5802, RFC 7677), computed by scramp, and
their -PLUS variants bound to the TLS channel with tls-server-end-point
(RFC 5929), offered on TLS connections.

The server needs only the stored keys (salt, StoredKey, ServerKey, iteration
count), which a passwd-file can hold as C{{SCRAM-SHA-256}} instead of the
password. An unknown user gets a made-up but stable salt, so the exchange
does not reveal which users exist; it fails at the proof like a wrong password.
The keys and salts themselves are L{popserv.auth.scramkeys}'s (L{stableSalt}
and L{ITERATIONS} are re-exported from there).
"""

from __future__ import annotations

import scramp
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from popserv.auth.credentials import Impersonation, VerifiedCredentials
from popserv.auth.scramkeys import (
    ITERATIONS,
    PROCESS_SALT_KEY,
    LateKey,
    fakeScramKeys,
    stableSalt,
)
from popserv.sasl.base import (
    Challenge,
    ISASLExchange,
    ISASLMechanism,
    Outcome,
    SASLContext,
    SASLError,
    ScramKeys,
)

#: The name this module gave the per-process salt key before
#: L{popserv.auth.scramkeys} owned it.
PROCESS_KEY = PROCESS_SALT_KEY

__all__ = [
    "ScramSHA1",
    "ScramSHA256",
    "ScramSHA1Plus",
    "ScramSHA256Plus",
    "parseClientFirst",
    "stableSalt",
    "ITERATIONS",
]

#: The channel-binding type the -PLUS variants use (RFC 5929 section 4).
CHANNEL_BINDING = "tls-server-end-point"


def _unescape(name: str) -> str:
    # RFC 5802 section 5.1: "," and "=" in names are sent as =2C and =3D.
    if "=" in name.replace("=2C", "").replace("=3D", ""):
        raise SASLError()
    return name.replace("=2C", ",").replace("=3D", "=")


def parseClientFirst(message: str) -> tuple[str, str, str]:
    """(cbind flag, authzid, username) from a client-first message; SASLError if bad."""
    parts = message.split(",", 3)
    if len(parts) != 4:
        raise SASLError()
    flag, authz, bare, _ = parts
    if not (flag in ("n", "y") or flag.startswith("p=")):
        raise SASLError()
    if authz and not authz.startswith("a="):
        raise SASLError()
    if not bare.startswith("n="):
        raise SASLError()
    user = _unescape(bare[2:])
    if not user:
        raise SASLError()
    return flag, _unescape(authz[2:]) if authz else "", user


@implementer(ISASLExchange)
class _ScramExchange:
    def __init__(self, mechanism: _Scram, context: SASLContext) -> None:
        self._mechanism = mechanism
        self._context = context
        self._server: scramp.core.ScramServer | None = None
        self._user = ""
        self._authzid = ""
        self._real = False
        self._finalSent = False
        #: Fixed server nonce, for reproducing the RFCs' test vectors only.
        self.serverNonce: str | None = None

    def step(self, response: bytes | None) -> Challenge | Outcome | Deferred:
        if self._finalSent:
            if response:
                raise SASLError()
            creds = VerifiedCredentials(self._user, self._mechanism.name)
            if self._authzid and self._authzid != self._user:
                return Outcome(Impersonation(self._authzid, creds))
            return Outcome(creds)
        if self._server is None:
            if response is None:
                return Challenge(b"")
            return self._clientFirst(response)
        return self._clientFinal(response or b"")

    def _clientFirst(self, response: bytes) -> Deferred:
        try:
            text = response.decode("utf-8")
        except UnicodeDecodeError:
            raise SASLError() from None
        flag, self._authzid, self._user = parseClientFirst(text)
        if self._mechanism.plus:
            if flag != "p=" + CHANNEL_BINDING:
                raise SASLError()
        elif flag.startswith("p="):
            raise SASLError()  # channel binding is only for the -PLUS variants
        source = self._context.source
        base = self._mechanism.base
        d = source.scramKeys(self._user, base) if source else succeed(None)
        return d.addCallback(self._serverFirst, text)

    def _serverFirst(self, keys: ScramKeys | None, clientFirst: str) -> Challenge:
        self._real = keys is not None
        if keys is None:
            keys = self._mechanism.fakeKeys(self._user)
        auth = (keys.salt, keys.storedKey, keys.serverKey, keys.iterations)
        # With the channel-binding data even the plain variant can tell a
        # client that was fooled into thinking we offer no -PLUS ("y" flag).
        cb = self._context.channelBinding
        self._server = self._mechanism.scram.make_server(
            lambda _user: auth,
            channel_binding=(CHANNEL_BINDING, cb) if cb else None,
            s_nonce=self.serverNonce,
        )
        try:
            self._server.set_client_first(clientFirst)
            return Challenge(self._server.get_server_first().encode("utf-8"))
        except scramp.ScramException:
            raise SASLError() from None

    def _clientFinal(self, response: bytes) -> Challenge:
        assert self._server is not None
        try:
            self._server.set_client_final(response.decode("utf-8"))
        except (scramp.ScramException, UnicodeDecodeError):
            raise UnauthorizedLogin() from None
        if not self._real:
            raise UnauthorizedLogin()
        self._finalSent = True
        return Challenge(self._server.get_server_final().encode("utf-8"))


@implementer(ISASLMechanism)
class _Scram:
    base = ""
    plus = False
    plaintext = False

    def __init__(self, saltKey: bytes | LateKey | None = None) -> None:
        """
        @param saltKey: the key unknown users' salts derive from (see
            L{popserv.auth.scramkeys}); the same in every process that answers.
        """
        self.name = self.base + ("-PLUS" if self.plus else "")
        self.scram = scramp.ScramMechanism(self.name)
        self.saltKey = saltKey or PROCESS_SALT_KEY

    def available(self, context: SASLContext) -> bool:
        source = context.source
        if source is None or (self.plus and context.channelBinding is None):
            return False
        kinds = source.secretKinds()
        return "plaintext" in kinds or self.base in kinds

    def exchange(self, context: SASLContext) -> ISASLExchange:
        return _ScramExchange(self, context)

    def fakeKeys(self, user: str) -> ScramKeys:
        """Made-up keys for an unknown user: nothing can match them."""
        return fakeScramKeys(self.saltKey, self.base, user)


class ScramSHA1(_Scram):
    base = "SCRAM-SHA-1"


class ScramSHA256(_Scram):
    base = "SCRAM-SHA-256"


class ScramSHA1Plus(ScramSHA1):
    plus = True


class ScramSHA256Plus(ScramSHA256):
    plus = True
