"""
XOAUTH2: the bearer-token mechanism Google and Microsoft defined before
RFC 7628, still what many clients send::

    user=alice@example.org^Aauth=Bearer TOKEN^A^A

The C{user} must be the one the token names (after the user-name rules),
unless the token's user is a master user. A refused token gets the
error challenge C{+ base64({"status":"401","schemes":"bearer"})}; the
client answers with an empty response and the login fails with
C{-ERR [AUTH]}. Otherwise as L{popserv.sasl.oauthbearer}.
"""

from __future__ import annotations

import json

from zope.interface import implementer

from popserv.sasl.base import ISASLMechanism, SASLError
from popserv.sasl.oauthbearer import KVSEP, BearerExchange, OAuthBearer, bearerToken

__all__ = ["XOAuth2"]


class _XOAuth2Exchange(BearerExchange):
    mechanism = "XOAUTH2"

    def parse(self, message: bytes) -> tuple[str | None, str]:
        if not message.endswith(KVSEP + KVSEP):
            raise SASLError()
        pairs = {}
        for item in message[:-2].split(KVSEP):
            key, sep, value = item.partition(b"=")
            if not sep:
                raise SASLError()
            try:
                pairs[key.decode("ascii")] = value.decode("utf-8")
            except UnicodeDecodeError:
                raise SASLError() from None
        if not pairs.get("user"):
            raise SASLError()
        return pairs["user"], bearerToken(pairs)

    def errorStatus(self) -> bytes:
        return json.dumps({"status": "401", "schemes": "bearer"}).encode("ascii")


@implementer(ISASLMechanism)
class XOAuth2(OAuthBearer):
    """XOAUTH2, offered when a token validator is configured."""

    name = "XOAUTH2"
    exchangeType = _XOAuth2Exchange
