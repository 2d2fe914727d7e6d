"""
Authentication: credentials, password schemes, auth sources (the
passwd-file checker, a chain of sources), SCRAM keys, and the realm that
turns an authenticated user into a locked mailbox.

The protocol only ever calls C{Portal.login}; it never sees the password store.
Nothing here imports L{popserv.sasl}: SASL builds on this package, not the
reverse. The names below are imported when first used (PEP 562), so that
importing one module of the package does not load every hash library.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from popserv.auth.chain import PassdbChain, chainSources
    from popserv.auth.credentials import APOPCredentials, UsernamePassword
    from popserv.auth.passwdfile import PasswdFileChecker
    from popserv.auth.realm import MailboxRealm
    from popserv.auth.scramkeys import ISecretSource, ScramKeys

__all__ = [
    "APOPCredentials",
    "UsernamePassword",
    "PasswdFileChecker",
    "MailboxRealm",
    "PassdbChain",
    "chainSources",
    "ISecretSource",
    "ScramKeys",
]

_WHERE = {
    "APOPCredentials": "credentials",
    "UsernamePassword": "credentials",
    "PasswdFileChecker": "passwdfile",
    "MailboxRealm": "realm",
    "PassdbChain": "chain",
    "chainSources": "chain",
    "ISecretSource": "scramkeys",
    "ScramKeys": "scramkeys",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
