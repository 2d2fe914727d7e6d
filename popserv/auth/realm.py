"""The realm: an authenticated user name in, a locked mailbox avatar out."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from zope.interface import implementer

from popserv.interfaces import IMailbox, IMailStore

__all__ = ["MailboxRealm"]

_log = Logger()


@implementer(IRealm)
class MailboxRealm:
    """
    Hands out L{IMailbox} avatars from an L{IMailStore}.

    Opening the mailbox takes its lock, so a maildrop that is in use fails the
    login (with L{popserv.errors.MaildropInUse}). The logout callable closes
    the mailbox, releasing the lock; it does so once however often it is called.
    """

    def __init__(self, store: IMailStore) -> None:
        self.store = store

    def requestAvatar(
        self, avatarId: str, mind: object, *interfaces: Any
    ) -> Deferred[tuple[Any, IMailbox, Callable[[], None]]]:
        if IMailbox not in interfaces:
            raise NotImplementedError("popserv's realm only provides IMailbox")
        d = maybeDeferred(self.store.openMailbox, avatarId)
        return d.addCallback(lambda mailbox: (IMailbox, mailbox, _logoutOnce(mailbox)))


def _logoutOnce(mailbox: IMailbox) -> Callable[[], None]:
    done = False

    def logout() -> None:
        nonlocal done
        if done:
            return
        done = True
        maybeDeferred(mailbox.close).addErrback(
            lambda f: _log.failure("error releasing a mailbox", f)
        )

    return logout
