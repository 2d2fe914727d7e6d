"""
CRAM-MD5 (RFC 2195): the client answers a challenge with HMAC-MD5 keyed by the
password. The server needs the plaintext-equivalent secret, so it is offered
only when some account stores one ({PLAIN}).
"""

from __future__ import annotations

import secrets
import time

from zope.interface import implementer

from popserv.auth.credentials import CramMD5Credentials
from popserv.sasl.base import (
    Challenge,
    ISASLExchange,
    ISASLMechanism,
    Outcome,
    SASLContext,
    SASLError,
)

__all__ = ["CramMD5"]


@implementer(ISASLExchange)
class _CramExchange:
    def __init__(self, context: SASLContext) -> None:
        self._challenge = (
            f"<{secrets.randbelow(10**10)}.{int(time.time())}@{context.hostname}>".encode()
        )
        self._sent = False

    def step(self, response: bytes | None) -> Challenge | Outcome:
        if not self._sent:
            if response is not None:
                raise SASLError()  # RFC 2195: the server speaks first
            self._sent = True
            return Challenge(self._challenge)
        user, sep, digest = (response or b"").rpartition(b" ")
        if not sep or not user or len(digest) != 32:
            raise SASLError()
        try:
            name = user.decode("utf-8")
            int(digest, 16)
        except ValueError:
            raise SASLError() from None
        return Outcome(CramMD5Credentials(name, self._challenge, digest.lower()))


@implementer(ISASLMechanism)
class CramMD5:
    name = "CRAM-MD5"
    plaintext = False

    def available(self, context: SASLContext) -> bool:
        source = context.source
        return source is not None and "plaintext" in source.secretKinds()

    def exchange(self, context: SASLContext) -> ISASLExchange:
        return _CramExchange(context)
