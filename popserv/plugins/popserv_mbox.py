"""The C{mbox:} store kind: one mbox spool per user, e.g. C{mbox:/var/mail/%u}."""

from __future__ import annotations

from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from popserv.registry import IStoreKind, StoreContext
from popserv.settings import STR, Setting


@implementer(IPlugin, IStoreKind)
class MboxKind:
    """mbox spools as MTAs write them, locked as they lock them."""

    name = "mbox"
    description = "mbox spools, one file per user, e.g. mbox:/var/mail/%u"
    options = (
        Setting(
            "format",
            STR,
            "mboxo",
            "How the mbox store quotes lines starting with 'From ': mboxo (Postfix, procmail,"
            " Exim; a stored '>From ' is served as 'From ') or mboxrd (lossless).",
            choices=("mboxo", "mboxrd"),
        ),
    )

    def check(self, args: str, baseDir: str) -> None:
        from popserv.location import MailLocation

        location = MailLocation.parse(args, baseDir)
        if "%" not in location.template:
            raise ValueError("mbox: the spool path needs a variable, e.g. mbox:/var/mail/%u")

    def makeStore(self, args: str, context: StoreContext) -> Any:
        from popserv.backends.mbox import MboxStore
        from popserv.location import MailLocation

        self.check(args, context.baseDir)
        return MboxStore(
            MailLocation.parse(args, context.baseDir),
            runInThread=context.runInThread,
            createMissing=context.createMissing,
            fmt=context.options.get("format", "mboxo"),
        )


mbox = MboxKind()
