"""
popserv: a POP3 server (RFC 1939 and extensions) built on Twisted.

The public surface for embedders:

- L{makeService} builds a listening service from settings or a L{Config};
- L{makeFactory} gives the protocol factory to listen on with any endpoint;
- L{loadConfig} reads the TOML configuration file;
- L{POP3Factory} over any C{Portal} whose realm hands out L{IMailbox}es,
  for example L{MailboxRealm} over L{MaildirStore} or L{MemoryStore};
- L{popserv.testing} has helpers to test an embedding without sockets.
"""

from popserv._version import __version__
from popserv.auth.passwdfile import PasswdFileChecker
from popserv.auth.realm import MailboxRealm
from popserv.backends.maildir import MaildirStore
from popserv.backends.memory import MemoryStore
from popserv.config import Config, ConfigError, loadConfig
from popserv.interfaces import IMailbox, IMailStore, IMessageReader, MessageInfo
from popserv.protocol import POP3Factory, POP3Protocol, State
from popserv.service import makeFactory, makePortal, makeService

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
