"""popserv's own store kinds: C{maildir:} and C{memory:}."""

from __future__ import annotations

from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from popserv.registry import IStoreKind, StoreContext


@implementer(IPlugin, IStoreKind)
class MaildirKind:
    """Maildirs on a file system, one per user, named by a template."""

    name = "maildir"
    description = "Maildirs on a file system, e.g. maildir:/var/mail/%d/%n/Maildir"
    options = ()

    def check(self, args: str, baseDir: str) -> None:
        from popserv.location import MailLocation

        MailLocation.parse(args, baseDir)

    def makeStore(self, args: str, context: StoreContext) -> Any:
        from popserv.backends.maildir import MaildirStore
        from popserv.location import MailLocation

        return MaildirStore(
            MailLocation.parse(args, context.baseDir),
            runInThread=context.runInThread,
            createMissing=context.createMissing,
            uidlSource=context.uidlSource,
        )


@implementer(IPlugin, IStoreKind)
class MemoryKind:
    """Maildrops in this process's memory: for tests and demos, gone at exit."""

    name = "memory"
    description = "maildrops in memory (tests and demos; lost when the server stops)"
    options = ()

    def check(self, args: str, baseDir: str) -> None:
        if args:
            raise ValueError("memory: takes no arguments")

    def makeStore(self, args: str, context: StoreContext) -> Any:
        from popserv.backends.memory import MemoryStore

        return MemoryStore()


maildir = MaildirKind()
memory = MemoryKind()
