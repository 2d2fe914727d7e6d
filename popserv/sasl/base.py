"""
The small interface every SASL mechanism module implements.

L{ScramKeys} and L{ISecretSource} belong to L{popserv.auth.scramkeys} (auth
sources provide them); they are re-exported here and from L{popserv.sasl}.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from popserv.auth.scramkeys import ISecretSource, ScramKeys
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
