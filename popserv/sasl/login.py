"""
LOGIN (draft-murchison-sasl-login): the widely deployed two-prompt mechanism
("Username:", "Password:"), as Outlook and many phones use it.
"""

from __future__ import annotations

from zope.interface import implementer

from popserv.auth.credentials import UsernamePassword
from popserv.sasl.base import (
    Challenge,
    ISASLExchange,
    ISASLMechanism,
    Outcome,
    SASLContext,
    SASLError,
)

__all__ = ["Login"]


@implementer(ISASLExchange)
class _LoginExchange:
    def __init__(self) -> None:
        self._user: str | None = None

    def step(self, response: bytes | None) -> Challenge | Outcome:
        if self._user is None:
            if response is None:
                return Challenge(b"Username:")
            try:
                self._user = response.decode("utf-8")
            except UnicodeDecodeError:
                raise SASLError() from None
            if not self._user:
                raise SASLError()
            return Challenge(b"Password:")
        if not response:
            raise SASLError()
        return Outcome(UsernamePassword(self._user, response))


@implementer(ISASLMechanism)
class Login:
    name = "LOGIN"
    plaintext = True

    def available(self, context: SASLContext) -> bool:
        return True

    def exchange(self, context: SASLContext) -> ISASLExchange:
        return _LoginExchange()
