"""Credentials the POP3 protocol builds from USER/PASS, APOP and SASL exchanges."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from zope.interface import Attribute, Interface, implementer

__all__ = [
    "UsernamePassword",
    "APOPCredentials",
    "CramMD5Credentials",
    "IVerifiedCredentials",
    "VerifiedCredentials",
    "IImpersonation",
    "Impersonation",
]


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


@implementer(IUsernameHashedPassword)
@dataclass(frozen=True)
class CramMD5Credentials:
    """RFC 2195: HMAC-MD5 of the challenge keyed by the shared secret, in hex."""

    username: str
    challenge: bytes
    digest: bytes = field(repr=False)

    def checkPassword(self, password: bytes) -> bool:
        expected = hmac.new(password, self.challenge, hashlib.md5).hexdigest().encode("ascii")
        return hmac.compare_digest(expected, self.digest)


class IVerifiedCredentials(Interface):
    """
    A user proven by a mechanism that used the checker's own secrets (SCRAM
    with the checker's keys) or by the transport (a TLS client certificate).
    The checker still decides whether that user exists and may log in.
    """

    username = Attribute("The proven user name.")
    mechanism = Attribute("How it was proven, for logs.")


@implementer(IVerifiedCredentials)
@dataclass(frozen=True)
class VerifiedCredentials:
    username: str
    mechanism: str


class IImpersonation(Interface):
    """Credentials of one user (a master user) asking to act as another."""

    username = Attribute("The user to log in as (the SASL authorization id).")
    credentials = Attribute("The credentials of the acting user.")


@implementer(IImpersonation)
@dataclass(frozen=True)
class Impersonation:
    username: str
    credentials: object
