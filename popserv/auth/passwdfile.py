"""
A cred checker over a Dovecot-compatible passwd-file.

Each line is C{user:{SCHEME}secret[:uid:gid:gecos:home:shell:extra]}; blank
lines and lines starting with C{#} are ignored; only the first two fields are
read. The file is re-read when it changes on disk, so adding a user needs no
restart.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from popserv.auth.schemes import Scheme, UnknownScheme, parseStoredPassword
from popserv.threads import RunInThread, reactorThreads

__all__ = ["PasswdFileChecker", "parsePasswdFile"]

_log = Logger()


def parsePasswdFile(text: str, source: str = "passwd-file") -> dict[str, tuple[Scheme, str]]:
    """Parse passwd-file text into {user: (scheme, secret)}; bad lines are logged and skipped."""
    users: dict[str, tuple[Scheme, str]] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, sep, rest = line.partition(":")
        password = rest.split(":", 1)[0]
        if not sep or not user:
            _log.warn(
                "{source}:{lineno}: no user:password, line ignored", source=source, lineno=lineno
            )
            continue
        try:
            users[user] = parseStoredPassword(password)
        except UnknownScheme as e:
            _log.warn(
                "{source}:{lineno}: user {user}: unsupported password ({why}), line ignored",
                source=source,
                lineno=lineno,
                user=user,
                why=e,
            )
    return users


@implementer(ICredentialsChecker)
class PasswdFileChecker:
    """
    Check USER/PASS (L{IUsernamePassword}) and APOP (L{IUsernameHashedPassword})
    against a passwd-file. APOP succeeds only for accounts stored as
    C{{PLAIN}}: no other scheme yields the shared secret it needs.

    Unknown users and wrong passwords fail identically (L{UnauthorizedLogin}).
    """

    credentialInterfaces = (IUsernamePassword, IUsernameHashedPassword)

    def __init__(
        self, path: str | os.PathLike[str], runInThread: RunInThread | None = None
    ) -> None:
        self.path = os.fspath(path)
        #: Slow hashes (argon2, bcrypt, crypt) are checked in a thread.
        self._runInThread = runInThread or reactorThreads()
        self._stamp: tuple[int, int, int, int] | None = None
        self._users: dict[str, tuple[Scheme, str]] = {}
        self._load()

    def _load(self) -> None:
        """(Re-)read the file if it changed; keep the old table if it cannot be read."""
        try:
            st = os.stat(self.path)
            stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if stamp == self._stamp:
                return
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            if self._stamp is None:
                raise
            _log.error(
                "cannot re-read {path}: {error}; keeping the users loaded before",
                path=self.path,
                error=e,
            )
            return
        self._users = parsePasswdFile(text, self.path)
        self._stamp = stamp

    @property
    def users(self) -> frozenset[str]:
        """The user names currently in the file."""
        self._load()
        return frozenset(self._users)

    def requestAvatarId(self, credentials: Any) -> Deferred[str]:
        self._load()
        entry = self._users.get(credentials.username)
        if entry is None:
            return fail(UnauthorizedLogin())
        scheme, secret = entry
        if IUsernamePassword.providedBy(credentials):
            password = credentials.password
            if scheme.slow:
                d = self._runInThread(scheme.verify, password, secret)
            else:
                d = maybeDeferred(scheme.verify, password, secret)
        elif IUsernameHashedPassword.providedBy(credentials) and scheme.plaintext:
            d = succeed(credentials.checkPassword(secret.encode("utf-8")))
        else:
            return fail(UnauthorizedLogin())
        return d.addCallback(self._verdict, credentials.username)

    @staticmethod
    def _verdict(matched: bool, username: str) -> str:
        if not matched:
            raise UnauthorizedLogin()
        return username
