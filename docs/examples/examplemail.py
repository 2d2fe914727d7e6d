"""
An example store and auth source for popserv (see docs/plugins/).

C{jsonfile:PATH} serves maildrops from a JSON file, C{{"user": {"uid":
"message", ...}, ...}}, read at start-up; deletions last until the server
stops. C{static:alice=secret,bob=hunter2} checks passwords given in its
arguments. Both are for demonstration only.
"""

from __future__ import annotations

import io
import json
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from popserv.errors import MaildropInUse, UnknownUser
from popserv.interfaces import IMailbox, IMailStore, IMessageReader, MessageInfo


@implementer(IMessageReader)
class MessageReader:
    """One message, read in chunks."""

    transferForm = False  # read() gives the message as stored

    def __init__(self, content: bytes) -> None:
        self._stream = io.BytesIO(content)

    def read(self, size: int) -> bytes:
        return self._stream.read(size)

    def close(self) -> None:
        self._stream.close()


@implementer(IMailbox)
class JSONMailbox:
    """One user's messages, locked while a session has them."""

    def __init__(self, store: JSONStore, user: str) -> None:
        self.store = store
        self.user = user
        self.messages = store.maildrops.setdefault(user, {})

    def listMessages(self) -> list[MessageInfo]:
        return [MessageInfo(uid, len(content), key=uid) for uid, content in self.messages.items()]

    def openMessage(self, info: MessageInfo) -> MessageReader:
        return MessageReader(self.messages[info.key])

    def removeMessages(self, infos: list[MessageInfo]) -> list[MessageInfo]:
        for info in infos:
            self.messages.pop(info.key, None)
        return []  # none failed: a message already gone counts as removed

    def close(self) -> None:
        self.store.locked.discard(self.user)


@implementer(IMailStore)
class JSONStore:
    """Maildrops read from a JSON file at start-up."""

    def __init__(self, path: str) -> None:
        self.description = f"JSON file {path}"
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        # Sizes are what RETR sends: CRLF line endings.
        self.maildrops = {
            user: {
                uid: text.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8")
                for uid, text in messages.items()
            }
            for user, messages in data.items()
        }
        self.locked: set[str] = set()

    def openMailbox(self, user: str) -> JSONMailbox:
        if user in self.locked:
            raise MaildropInUse()
        self.locked.add(user)
        return JSONMailbox(self, user)


@implementer(ICredentialsChecker)
class StaticChecker:
    """Passwords from a C{user=password,...} list."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, users: dict[str, str], ignoreCase: bool = False) -> None:
        self.ignoreCase = ignoreCase
        self.users = {self._key(user): (user, pw) for user, pw in users.items()}

    def _key(self, user: str) -> str:
        return user.casefold() if self.ignoreCase else user

    def requestAvatarId(self, credentials: Any) -> Deferred[str]:
        found = self.users.get(self._key(credentials.username))
        if found is None:
            # The next auth source is asked; the client sees [AUTH] either way.
            return fail(UnknownUser())
        user, password = found
        if not credentials.checkPassword(password.encode("utf-8")):
            return fail(UnauthorizedLogin())
        return succeed(user)  # the avatar id names the maildrop


def parseUsers(args: str) -> dict[str, str]:
    """C{alice=secret,bob=hunter2} -> {"alice": "secret", "bob": "hunter2"}."""
    users = {}
    for item in filter(None, args.split(",")):
        user, sep, password = item.partition("=")
        if not sep or not user:
            raise ValueError(f"static: expected user=password, not {item!r}")
        users[user] = password
    return users
