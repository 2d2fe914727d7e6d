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

from typing import TYPE_CHECKING

from popserv._lazy import lazyNames

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
    "APOPCredentials": "popserv.auth.credentials",
    "UsernamePassword": "popserv.auth.credentials",
    "PasswdFileChecker": "popserv.auth.passwdfile",
    "MailboxRealm": "popserv.auth.realm",
    "PassdbChain": "popserv.auth.chain",
    "chainSources": "popserv.auth.chain",
    "ISecretSource": "popserv.auth.scramkeys",
    "ScramKeys": "popserv.auth.scramkeys",
}


__getattr__, __dir__ = lazyNames(globals(), _WHERE, __all__)
