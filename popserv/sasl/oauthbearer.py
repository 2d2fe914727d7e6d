"""
OAUTHBEARER (RFC 7628): an OAuth 2.0 bearer token in a GS2-style message::

    n,a=user@example.org,^Ahost=pop.example.org^Aport=110^Aauth=Bearer TOKEN^A^A

The token is checked by an L{ITokenValidator} (L{popserv.auth.oauth}); the
user is the one it names, who must then exist in an auth source (looked up
without a password, as for EXTERNAL: L{VerifiedCredentials}). A refused
token gets RFC 7628's error challenge, C{+ base64(json status)}; the client
answers it with a dummy response (C{^A}) and the login fails with
C{-ERR [AUTH]}. An identity provider that cannot be reached fails the login
with C{-ERR [SYS/TEMP]} at once.

A bearer token is as good as a password to whoever sees it: the mechanism
is C{plaintext} (TLS only, outside the trusted networks), and no log line
holds one.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from popserv.auth.credentials import Impersonation, VerifiedCredentials
from popserv.sasl.base import (
    Challenge,
    ISASLExchange,
    ISASLMechanism,
    Outcome,
    SASLContext,
    SASLError,
)

if TYPE_CHECKING:
    # At run time, only once a validator exists: PyJWT and twisted.web cost 50 ms to import.
    from popserv.auth.oauth import ITokenValidator

__all__ = ["OAuthBearer", "BearerExchange", "parseKeyValues", "bearerToken"]

_log = Logger()

#: The separator of RFC 7628's key/value pairs.
KVSEP = b"\x01"


def parseKeyValues(data: bytes) -> dict[str, str]:
    """
    What follows the GS2 header in RFC 7628 section 3.1: C{kvsep *kvpair
    kvsep}, each pair C{key=value} ended by C{^A}; SASLError if malformed.
    """
    if len(data) < 2 or not data.startswith(KVSEP) or not data.endswith(KVSEP + KVSEP):
        raise SASLError()
    pairs: dict[str, str] = {}
    for item in data[1:-2].split(KVSEP) if len(data) > 2 else []:
        key, sep, value = item.partition(b"=")
        if not sep or not key.isalpha():
            raise SASLError()
        try:
            pairs[key.decode("ascii")] = value.decode("utf-8")
        except UnicodeDecodeError:
            raise SASLError() from None
    return pairs


def bearerToken(pairs: dict[str, str]) -> str:
    """The token of an C{auth=Bearer TOKEN} pair (the scheme is case-insensitive)."""
    scheme, _, token = pairs.get("auth", "").partition(" ")
    if scheme.lower() != "bearer" or not token or " " in token.strip():
        raise SASLError()
    return token.strip()


def _saslName(text: str) -> str:
    """RFC 5801's saslname: C{=2C} is a comma, C{=3D} an equals sign, nothing else after C{=}."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "=":
            escape = text[i : i + 3]
            if escape not in ("=2C", "=3D"):
                raise SASLError()
            out.append("," if escape == "=2C" else "=")
            i += 3
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


@implementer(ISASLExchange)
class BearerExchange:
    """
    One run of a bearer-token mechanism: one message with the token, and on
    refusal an error challenge and the client's dummy response.

    @cvar mechanism: the name logins are logged under.
    """

    mechanism = "OAUTHBEARER"

    def __init__(self, tokens: ITokenValidator) -> None:
        self._tokens = tokens
        self._asked = False
        self._refused = False

    def step(self, response: bytes | None) -> Challenge | Outcome | Deferred[Any]:
        if self._refused:
            raise SASLError()  # the dummy response after the error challenge
        if response is None and not self._asked:
            self._asked = True
            return Challenge(b"")
        authzid, token = self.parse(response or b"")
        d = self._tokens.validate(token)
        d.addCallbacks(self._valid, self._invalid, callbackArgs=(authzid,))
        return d

    def parse(self, message: bytes) -> tuple[str | None, str]:
        """The authorization id (None if absent) and the token; SASLError if malformed."""
        header, sep, rest = message.partition(b",")
        # "y" (the client could do channel binding, the server did not offer it) is fine;
        # "p=" asks for channel binding, which OAUTHBEARER does not do (RFC 7628 3.1).
        if not sep or header not in (b"n", b"y"):
            raise SASLError()
        authzid, sep, rest = rest.partition(b",")
        if not sep or (authzid and not authzid.startswith(b"a=")):
            raise SASLError()
        try:
            name = _saslName(authzid[2:].decode("utf-8")) if authzid else None
        except UnicodeDecodeError:
            raise SASLError() from None
        return name or None, bearerToken(parseKeyValues(rest))

    def _valid(self, user: str, authzid: str | None) -> Outcome:
        credentials = VerifiedCredentials(user, self.mechanism)
        if authzid is not None and authzid != user:
            # Acting for another user: the checker allows it for master users only.
            return Outcome(Impersonation(authzid, credentials))
        return Outcome(credentials)

    def _invalid(self, failure: Failure) -> Challenge | Failure:
        from popserv.auth.oauth import InvalidToken

        if not failure.check(InvalidToken):
            return failure  # the identity provider is down: [SYS/TEMP] now
        _log.info(
            "{mechanism}: token refused: {why}",
            mechanism=self.mechanism,
            why=failure.getErrorMessage(),
        )
        self._refused = True
        return Challenge(self.errorStatus())

    def errorStatus(self) -> bytes:
        """RFC 7628 section 3.2.2's error: a JSON object, sent as a challenge."""
        return json.dumps({"status": "invalid_token", "schemes": "bearer"}).encode("ascii")


@implementer(ISASLMechanism)
class OAuthBearer:
    """
    OAUTHBEARER, offered when a token validator is configured.

    @ivar tokens: what checks the tokens (None: the mechanism is not offered).
    """

    name = "OAUTHBEARER"
    plaintext = True
    exchangeType: type[BearerExchange] = BearerExchange

    def __init__(self, tokens: ITokenValidator | None = None) -> None:
        self.tokens = tokens

    def available(self, context: SASLContext) -> bool:
        return self.tokens is not None

    def exchange(self, context: SASLContext) -> ISASLExchange:
        assert self.tokens is not None
        return self.exchangeType(self.tokens)
