"""
EXTERNAL (RFC 4422 appendix A): the identity a verified TLS client
certificate establishes. Offered only on a TLS connection whose client
presented a certificate that the configured CA verified.
"""

from __future__ import annotations

from zope.interface import implementer

from popserv.auth.credentials import VerifiedCredentials
from popserv.sasl.base import (
    Challenge,
    ISASLExchange,
    ISASLMechanism,
    Outcome,
    SASLContext,
    SASLError,
)

__all__ = ["External"]


@implementer(ISASLExchange)
class _ExternalExchange:
    def __init__(self, user: str) -> None:
        self._user = user
        self._asked = False

    def step(self, response: bytes | None) -> Challenge | Outcome:
        if response is None and not self._asked:
            self._asked = True
            return Challenge(b"")
        try:
            authzid = (response or b"").decode("utf-8")
        except UnicodeDecodeError:
            raise SASLError() from None
        if authzid and authzid != self._user:
            raise SASLError()  # the certificate names someone else
        return Outcome(VerifiedCredentials(self._user, "EXTERNAL"))


@implementer(ISASLMechanism)
class External:
    name = "EXTERNAL"
    plaintext = False

    def available(self, context: SASLContext) -> bool:
        return context.externalUser is not None

    def exchange(self, context: SASLContext) -> ISASLExchange:
        assert context.externalUser is not None
        return _ExternalExchange(context.externalUser)
