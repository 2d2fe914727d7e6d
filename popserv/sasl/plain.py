"""PLAIN (RFC 4616): C{authzid NUL authcid NUL password} in one message."""

from __future__ import annotations

from zope.interface import implementer

from popserv.auth.credentials import Impersonation, UsernamePassword
from popserv.sasl.base import (
    Challenge,
    ISASLExchange,
    ISASLMechanism,
    Outcome,
    SASLContext,
    SASLError,
)

__all__ = ["Plain", "parsePlain"]

#: RFC 4616 section 2: each field is at most 255 octets.
MAX_FIELD = 255


def parsePlain(message: bytes) -> tuple[str, str, bytes]:
    """Split a PLAIN message into (authzid, authcid, password); SASLError if malformed."""
    parts = message.split(b"\x00")
    if len(parts) != 3:
        raise SASLError()
    authzid, authcid, password = parts
    if not authcid or not password or any(len(p) > MAX_FIELD for p in parts):
        raise SASLError()
    try:
        return authzid.decode("utf-8"), authcid.decode("utf-8"), password
    except UnicodeDecodeError:
        raise SASLError() from None


@implementer(ISASLExchange)
class _PlainExchange:
    def __init__(self, context: SASLContext) -> None:
        self._context = context
        self._asked = False

    def step(self, response: bytes | None) -> Challenge | Outcome:
        if response is None and not self._asked:
            self._asked = True
            return Challenge(b"")
        authzid, authcid, password = parsePlain(response or b"")
        credentials = UsernamePassword(authcid, password)
        if authzid and authzid != authcid:
            # Acting for another user: the checker allows it for master users only.
            return Outcome(Impersonation(authzid, credentials))
        return Outcome(credentials)


@implementer(ISASLMechanism)
class Plain:
    name = "PLAIN"
    plaintext = True

    def available(self, context: SASLContext) -> bool:
        return True  # any stored scheme can check a plaintext password

    def exchange(self, context: SASLContext) -> ISASLExchange:
        return _PlainExchange(context)
