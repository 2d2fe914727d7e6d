"""The small interface every SASL mechanism module implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from popserv.errors import CommandError, ResponseCode

__all__ = [
    "SASLError",
    "Challenge",
    "Outcome",
    "ScramKeys",
    "ISecretSource",
    "SASLContext",
    "ISASLMechanism",
    "ISASLExchange",
]


class SASLError(CommandError):
    """The client's SASL data is malformed or out of sequence: the login failed."""

    code = ResponseCode.AUTH
    text = "Authentication failed"


@dataclass(frozen=True)
class Challenge:
    """Send C{data} to the client as C{+ base64} and wait for its response."""

    data: bytes


@dataclass(frozen=True)
class Outcome:
    """The exchange is over: log in through the Portal with C{credentials}."""

    credentials: Any


@dataclass(frozen=True)
class ScramKeys:
    """What a server stores for SCRAM (RFC 5802 section 3): no password needed."""

    salt: bytes
    storedKey: bytes = field(repr=False)
    serverKey: bytes = field(repr=False)
    iterations: int


class ISecretSource(Interface):
    """
    What the credentials store can offer beyond checking a password: which
    kinds of secret some account holds (so only mechanisms that can succeed
    are advertised), and SCRAM keys.
    """

    def secretKinds() -> frozenset[str]:
        """Kinds held by at least one account: C{"plaintext"}, C{"SCRAM-SHA-256"}, ..."""

    def scramKeys(user: str, mechanism: str) -> Deferred[ScramKeys | None]:
        """The SCRAM keys of C{user} for C{mechanism} (e.g. SCRAM-SHA-256), or None."""


@dataclass
class SASLContext:
    """
    What a mechanism may need from the connection.

    @ivar source: the secret source (None if the checker offers none).
    @ivar hostname: the server name for challenges (CRAM-MD5).
    @ivar tls: the connection is encrypted.
    @ivar channelBinding: RFC 5929 tls-server-end-point data (SCRAM-PLUS).
    @ivar externalUser: the user a verified TLS client certificate names.
    """

    source: ISecretSource | None
    hostname: str
    tls: bool = False
    channelBinding: bytes | None = field(default=None, repr=False)
    externalUser: str | None = None


class ISASLExchange(Interface):
    """One run of a mechanism."""

    def step(response: bytes | None) -> Challenge | Outcome | Deferred[Challenge | Outcome]:
        """
        Take the client's next response (None: the AUTH command carried no
        initial response) and return the next challenge or the outcome.
        Raise L{SASLError} for malformed data.
        """


class ISASLMechanism(Interface):
    """A SASL mechanism: a name, a policy flag and a way to start an exchange."""

    name = Attribute("The IANA mechanism name, upper case.")
    plaintext = Attribute("True if the password itself crosses the wire.")

    def available(context: SASLContext) -> bool:
        """Can this mechanism succeed for some account, on this connection?"""

    def exchange(context: SASLContext) -> ISASLExchange:
        """Start an exchange."""
