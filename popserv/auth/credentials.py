"""Credentials the POP3 protocol builds from USER/PASS and APOP."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from zope.interface import implementer

__all__ = ["UsernamePassword", "APOPCredentials"]


@implementer(IUsernamePassword)
@dataclass(frozen=True)
class UsernamePassword:
    """A user name (text) and a password (bytes, as the client sent it)."""

    username: str
    password: bytes = field(repr=False)

    def checkPassword(self, password: bytes) -> bool:
        """Compare with a plaintext password, in constant time."""
        return hmac.compare_digest(self.password, password)


@implementer(IUsernameHashedPassword)
@dataclass(frozen=True)
class APOPCredentials:
    """
    RFC 1939 section 7 APOP: the MD5 of the greeting's timestamp followed by
    the shared secret. Only a store holding a plaintext-equivalent secret can
    check it.
    """

    username: str
    challenge: bytes
    digest: bytes = field(repr=False)

    def checkPassword(self, password: bytes) -> bool:
        expected = hashlib.md5(self.challenge + password).hexdigest().encode("ascii")
        return hmac.compare_digest(expected, self.digest.lower())
