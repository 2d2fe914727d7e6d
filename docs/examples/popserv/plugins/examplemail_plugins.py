"""
The plugins of the examplemail distribution: a C{jsonfile:} store and a
C{static:} auth source. Kept small: the implementation (C{examplemail}) is
imported only when a store or a source is built.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from popserv.registry import IAuthSourceKind, IStoreKind, SourceContext, StoreContext
from popserv.settings import BOOL, Setting


@implementer(IPlugin, IStoreKind)
class JSONFileKind:
    name = "jsonfile"
    description = "maildrops in a JSON file (an example), e.g. jsonfile:/srv/mail.json"
    options = ()

    def check(self, args: str, baseDir: str) -> None:
        if not args.endswith(".json"):
            raise ValueError("jsonfile: needs the path of a .json file")

    def makeStore(self, args: str, context: StoreContext) -> Any:
        from examplemail import JSONStore

        # Start-up, before the reactor runs: blocking I/O is allowed here.
        return JSONStore(os.path.join(context.baseDir, args))


@implementer(IPlugin, IAuthSourceKind)
class StaticKind:
    name = "static"
    description = "users and passwords in the arguments (an example), e.g. static:alice=secret"
    options = (
        Setting(
            name="ignore_case",
            kind=BOOL,
            default=False,
            help="Match user names without regard to case.",
        ),
    )

    def check(self, args: str, baseDir: str) -> None:
        from examplemail import parseUsers

        parseUsers(args)

    def makeSource(self, args: str, context: SourceContext) -> Any:
        from examplemail import StaticChecker, parseUsers

        return StaticChecker(parseUsers(args), ignoreCase=context.options["ignore_case"])


jsonFile = JSONFileKind()
static = StaticKind()
