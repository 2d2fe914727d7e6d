"""
SASL mechanisms for the POP3 AUTH command (RFC 5034).

Each mechanism is one module providing L{ISASLMechanism}; an exchange ends in
credentials that the protocol hands to the same C{Portal} as USER/PASS.
"""

from typing import Any

from popserv.auth.scramkeys import LateKey
from popserv.sasl.base import (
    Challenge,
    ISASLExchange,
    ISASLMechanism,
    ISecretSource,
    Outcome,
    SASLContext,
    SASLError,
    ScramKeys,
)
from popserv.sasl.crammd5 import CramMD5
from popserv.sasl.external import External
from popserv.sasl.gssapi import GSSAPI
from popserv.sasl.login import Login
from popserv.sasl.oauthbearer import OAuthBearer
from popserv.sasl.plain import Plain
from popserv.sasl.scram import ScramSHA1, ScramSHA1Plus, ScramSHA256, ScramSHA256Plus, _Scram
from popserv.sasl.xoauth2 import XOAuth2

__all__ = [
    "Challenge",
    "ISASLExchange",
    "ISASLMechanism",
    "ISecretSource",
    "Outcome",
    "SASLContext",
    "SASLError",
    "ScramKeys",
    "Plain",
    "Login",
    "CramMD5",
    "ScramSHA1",
    "ScramSHA256",
    "ScramSHA1Plus",
    "ScramSHA256Plus",
    "External",
    "GSSAPI",
    "OAuthBearer",
    "XOAuth2",
    "ALL_MECHANISMS",
    "mechanismsByName",
]

#: Every mechanism popserv implements, in the order CAPA lists them.
ALL_MECHANISMS: tuple[ISASLMechanism, ...] = (
    ScramSHA256Plus(),
    ScramSHA1Plus(),
    ScramSHA256(),
    ScramSHA1(),
    GSSAPI(),
    External(),
    OAuthBearer(),
    XOAuth2(),
    CramMD5(),
    Plain(),
    Login(),
)


def mechanismsByName(
    names: list[str] | None = None, saltKey: bytes | LateKey | None = None, tokens: Any = None
) -> dict[str, ISASLMechanism]:
    """
    The mechanisms named (all if None), by upper-case name; ValueError if unknown.

    @param saltKey: the key SCRAM derives unknown users' salts from (see
        L{popserv.auth.scramkeys}); the same in every process that answers.
    @param tokens: what checks OAuth bearer tokens (L{popserv.auth.oauth}); without
        it OAUTHBEARER and XOAUTH2 are never offered.
    """
    known = {m.name: m for m in ALL_MECHANISMS}
    if saltKey is not None:
        known = {
            name: type(m)(saltKey) if isinstance(m, _Scram) else m for name, m in known.items()
        }
    if tokens is not None:
        known = {
            name: type(m)(tokens) if isinstance(m, OAuthBearer) else m for name, m in known.items()
        }
    if names is None:
        return known
    chosen = {}
    for name in names:
        mechanism = known.get(name.upper())
        if mechanism is None:
            raise ValueError(f"unknown SASL mechanism {name!r} (known: {', '.join(known)})")
        chosen[mechanism.name] = mechanism
    return chosen
