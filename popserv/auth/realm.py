"""The realm: an authenticated user name in, a locked mailbox avatar out."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from zope.interface import implementer

from popserv.errors import AuthenticationFailed
from popserv.interfaces import IMailbox, IMailStore, UnverifiedUser
from popserv.policy import SessionPolicy, UserSettings

__all__ = ["MailboxRealm"]

_log = Logger()


@implementer(IRealm)
class MailboxRealm:
    """
    Hands out L{IMailbox} avatars from an L{IMailStore}.

    Opening the mailbox takes its lock, so a maildrop that is in use fails the
    login (with L{popserv.errors.MaildropInUse}). The logout callable closes
    the mailbox, releasing the lock; it does so once however often it is called.

    With a L{SessionPolicy}, a login sooner than the user's LOGIN-DELAY after
    the previous one fails with L{popserv.errors.LoginDelayed} before the
    maildrop is locked or listed. The protocol records a login when it
    answers +OK (RFC 2449 counts the delay from there), so a login that
    fails later, or whose client is gone, does not count.
    """

    def __init__(self, store: IMailStore, policy: SessionPolicy | None = None) -> None:
        self.store = store
        self.policy = policy

    def requestAvatar(
        self, avatarId: str, mind: object, *interfaces: Any
    ) -> Deferred[tuple[Any, IMailbox, Callable[[], None]]]:
        settings = None if self.policy is None else self.policy.settingsFor(avatarId)
        return self.avatarFor(avatarId, settings, *interfaces)

    def avatarFor(
        self, avatarId: str, settings: UserSettings | None, *interfaces: Any
    ) -> Deferred[tuple[Any, IMailbox, Callable[[], None]]]:
        """
        L{requestAvatar} for a user whose C{settings} were looked up already
        (by the proxy's realm, which looks once for both); they go with the
        logout to the protocol, which needs them too.
        """
        if IMailbox not in interfaces:
            raise NotImplementedError("popserv's realm only provides IMailbox")
        if isinstance(avatarId, UnverifiedUser):  # only a proxy's backend may serve them
            _log.warn("user {user} has no password here (nopassword=y)", user=str(avatarId))
            raise AuthenticationFailed()
        checked = None if self.policy is None else self.policy.checkLogin(avatarId, settings)
        if checked is None:
            d = maybeDeferred(self.store.openMailbox, avatarId)
        else:
            d = checked.addCallback(lambda _: self.store.openMailbox(avatarId))
        return d.addCallback(
            lambda mailbox: (IMailbox, mailbox, _LogoutOnce(mailbox, avatarId, settings))
        )


class _LogoutOnce:
    """
    The logout callable: closes the mailbox the first time it is called.

    @ivar avatarId: the user as the auth source named it (which may differ
        from what the client typed: a canonical spelling), for the protocol
        to record the login and look the user's settings up under.
    @ivar settings: the user's settings, as the realm's policy found them
        (None without one): the protocol need not look them up again.
    """

    __slots__ = ("_mailbox", "avatarId", "settings")

    def __init__(
        self, mailbox: IMailbox, avatarId: str, settings: UserSettings | None = None
    ) -> None:
        self._mailbox: IMailbox | None = mailbox
        self.avatarId = avatarId
        self.settings = settings

    def __call__(self) -> Deferred[None] | None:
        """Close the mailbox (the first time); the Deferred of its release, if it takes time."""
        mailbox, self._mailbox = self._mailbox, None
        if mailbox is None:
            return None
        return maybeDeferred(mailbox.close).addErrback(
            lambda f: _log.failure("error releasing a mailbox", f)
        )
