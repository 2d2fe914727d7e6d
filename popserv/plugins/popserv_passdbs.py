"""popserv's own auth-source kinds: C{passwd-file:}."""

from __future__ import annotations

import os
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from popserv.registry import IAuthSourceKind, SourceContext


@implementer(IPlugin, IAuthSourceKind)
class PasswdFileKind:
    """A Dovecot-style passwd-file, re-read when it changes."""

    name = "passwd-file"
    description = "a Dovecot-style passwd-file, e.g. passwd-file:/etc/popserv/passwd"
    options = ()

    def check(self, args: str, baseDir: str) -> None:
        if not args:
            raise ValueError("passwd-file: needs the file's path")

    def makeSource(self, args: str, context: SourceContext) -> Any:
        from popserv.auth.passwdfile import PasswdFileChecker

        return PasswdFileChecker(
            os.path.join(context.baseDir, os.path.expanduser(args)),
            runInThread=context.runInThread,
            masterUsers=context.masterUsers,
            cache=context.cache,
            saltKey=context.saltKey,
        )


passwdFile = PasswdFileKind()
