"""
popserv: a POP3 server (RFC 1939 and extensions) built on Twisted.

The public surface for embedders:

  - L{makeService} builds a listening service from settings or a L{Config};
  - L{makeFactory} gives the protocol factory to listen on with any endpoint;
  - L{loadConfig} reads the TOML configuration file;
  - L{POP3Factory} over any C{Portal} whose realm hands out L{IMailbox}es,
    for example L{MailboxRealm} over L{MaildirStore} or L{MemoryStore};
  - L{popserv.testing} has helpers to test an embedding without sockets.

Each name is imported when first used (PEP 562), so a short-lived command
such as C{popserv deliver} loads no TLS, metrics or hashing library it does
not need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from popserv._lazy import lazyNames
from popserv._version import __version__

if TYPE_CHECKING:
    from popserv.auth.passwdfile import PasswdFileChecker
    from popserv.auth.realm import MailboxRealm
    from popserv.backends.maildir import MaildirStore
    from popserv.backends.memory import MemoryStore
    from popserv.config import Config, ConfigError, loadConfig
    from popserv.interfaces import IMailbox, IMailStore, IMessageReader, MessageInfo
    from popserv.protocol import POP3Factory, POP3Protocol, State
    from popserv.service import makeFactory, makePortal, makeService

#: Where each public name lives.
_WHERE = {
    "Config": "popserv.config",
    "ConfigError": "popserv.config",
    "loadConfig": "popserv.config",
    "makeService": "popserv.service",
    "makeFactory": "popserv.service",
    "makePortal": "popserv.service",
    "POP3Factory": "popserv.protocol",
    "POP3Protocol": "popserv.protocol",
    "State": "popserv.protocol",
    "IMailbox": "popserv.interfaces",
    "IMailStore": "popserv.interfaces",
    "IMessageReader": "popserv.interfaces",
    "MessageInfo": "popserv.interfaces",
    "MailboxRealm": "popserv.auth.realm",
    "PasswdFileChecker": "popserv.auth.passwdfile",
    "MaildirStore": "popserv.backends.maildir",
    "MemoryStore": "popserv.backends.memory",
}

__all__ = [
    "__version__",
    "Config",
    "ConfigError",
    "loadConfig",
    "makeService",
    "makeFactory",
    "makePortal",
    "POP3Factory",
    "POP3Protocol",
    "State",
    "IMailbox",
    "IMailStore",
    "IMessageReader",
    "MessageInfo",
    "MailboxRealm",
    "PasswdFileChecker",
    "MaildirStore",
    "MemoryStore",
]


__getattr__, __dir__ = lazyNames(globals(), _WHERE, __all__)
