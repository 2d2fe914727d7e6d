"""
What LMTP delivery decides beyond the wire: who a recipient address is,
whether the auth sources know them, whether their quota has room, and the
store's writer for each accepted recipient. Every answer that is not a
success is a L{Refusal} carrying its reply.

  - An address is the user name as it is (C{user@domain}: Postfix's
    C{virtual_transport} hands over the virtual address). An address at
    this server's own host name (Postfix's C{mailbox_transport} sends
    C{user@$myhostname}) is the user named by its local part when no user
    has the whole address as its name.
  - A user is unknown (C{550 5.1.1}) only when every auth source can tell
    (L{IUserDirectory}, or a C{users} listing) and none knows them; a source
    that cannot tell lets the address through to the store.
  - Quotas (per user, from the auth source's settings C{quotaBytes} and
    C{quotaMessages}, 0 or absent: no limit) need a store that says its
    usage (L{IMaildropUsage}). They are soft: deliveries that run at the
    same time are each checked against the usage before them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.logger import Logger

from popserv.errors import InvalidUserName, PermanentFailure
from popserv.interfaces import IMaildropUsage, IMailStore, IMessageWriter, IUserDirectory
from popserv.policy import IUserSettingsSource

__all__ = ["Reply", "Refusal", "Recipient", "Deliverer"]

_log = Logger()


@dataclass(frozen=True)
class Reply:
    """One LMTP reply: the code, the enhanced status code (RFC 3463), the text."""

    code: int
    status: str
    text: str

    def line(self) -> bytes:
        """The reply as sent (a reply without an enhanced code: 220, 354)."""
        status = f" {self.status}" if self.status else ""
        return f"{self.code}{status} {self.text}\r\n".encode("utf-8", "replace")


class Refusal(Exception):
    """A recipient or message is refused with L{reply}."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


UNKNOWN_USER = Reply(550, "5.1.1", "No such user here")
BAD_MAILBOX = Reply(550, "5.1.3", "Bad destination mailbox address")
NO_MAILBOX = Reply(550, "5.2.1", "Mailbox unavailable")
TOO_BIG_FOR_QUOTA = Reply(552, "5.2.2", "Message is larger than the mailbox quota")
MAILBOX_FULL = Reply(452, "4.2.2", "Mailbox full, try again later")
UNAVAILABLE = Reply(451, "4.3.0", "Temporary failure, try again later")


@dataclass
class Recipient:
    """
    An accepted recipient.

    @ivar address: the address as given in RCPT TO.
    @ivar user: the user (maildrop) it delivers to.
    @ivar room: the octets the quota has left (None: no limit).
    @ivar quotaBytes: the whole quota in octets (None: no limit).
    """

    address: str
    user: str
    room: int | None = None
    quotaBytes: int | None = None

    def check(self, size: int) -> None:
        """Refuse a message of C{size} octets the quota has no room for."""
        if self.quotaBytes is not None and size > self.quotaBytes:
            raise Refusal(TOO_BIG_FOR_QUOTA)
        if self.room is not None and size > self.room:
            raise Refusal(MAILBOX_FULL)


def refusalFor(failure: Any, user: str) -> Reply:
    """The reply for a store or directory failure; logs the unexpected ones."""
    if failure.check(Refusal):
        return failure.value.reply  # type: ignore[no-any-return]
    if failure.check(InvalidUserName):
        return BAD_MAILBOX
    if failure.check(PermanentFailure):
        return NO_MAILBOX
    _log.warn(
        "LMTP delivery to {user} failed for now: {error}",
        user=user,
        error=failure.getErrorMessage() or failure.type.__name__,
    )
    return UNAVAILABLE


class Deliverer:
    """
    Recipients and their deliveries over one store.

    @param store: where messages go (L{IMailStore.deliverMessage}).
    @param checker: the auth sources (a checker, or a chain with C{sources}),
        asked whether a user exists and for its quotas; None accepts anyone,
        without quotas.
    @param hostname: this server's host name: an address at it may name a
        user by its local part.
    @param names: the user-name rules logins follow (name -> canonical name),
        so a recipient is the user its login name would be.
    """

    def __init__(
        self,
        store: IMailStore,
        checker: Any = None,
        hostname: str | None = None,
        names: Callable[[str], str] | None = None,
    ):
        self.store = store
        self.names = names
        self.hostname = hostname.lower() if hostname else None
        self._sources = tuple(getattr(checker, "sources", (checker,))) if checker else ()
        self._settings = checker if IUserSettingsSource.providedBy(checker) else None
        self._usage = store if IMaildropUsage.providedBy(store) else None
        self._warned = False

    @inlineCallbacks
    def recipient(self, address: str, size: int | None = None) -> Any:
        """
        The L{Recipient} for C{address} (a Deferred), or a L{Refusal}: an
        unknown user, a quota that a declared C{size} would exceed.
        """
        candidates = [address]
        local, at, domain = address.rpartition("@")
        if at and local and self.hostname and domain.lower() == self.hostname:
            candidates.append(local)
        if self.names is not None:
            candidates = list(dict.fromkeys(self.names(c) for c in candidates))
        user = None
        for candidate in candidates:
            known = yield self._knows(candidate)
            if known is not False:
                user = candidate
                break
        if user is None:
            raise Refusal(UNKNOWN_USER)
        recipient = Recipient(address, user)
        yield self._quota(recipient)
        if size is not None:
            recipient.check(size)
        return recipient

    def _knows(self, user: str) -> Deferred[bool | None]:
        return knowsUser(self._sources, user)

    @inlineCallbacks
    def _quota(self, recipient: Recipient) -> Any:
        settings = self._settings.settingsFor(recipient.user) if self._settings else {}
        maxBytes = settings.get("quotaBytes") or None
        maxMessages = settings.get("quotaMessages") or None
        if maxBytes is None and maxMessages is None:
            return
        if self._usage is None:
            if not self._warned:
                self._warned = True
                _log.warn(
                    "{store} cannot say a maildrop's usage: quotas are not enforced",
                    store=getattr(self.store, "description", self.store),
                )
            return
        messages, octets = yield maybeDeferred(self._usage.usage, recipient.user)
        if (maxMessages is not None and messages >= maxMessages) or (
            maxBytes is not None and octets >= maxBytes
        ):
            raise Refusal(MAILBOX_FULL)
        if maxBytes is not None:
            recipient.quotaBytes = maxBytes
            recipient.room = maxBytes - octets

    def open(self, recipient: Recipient) -> Deferred[IMessageWriter]:
        """The store's writer for one recipient's copy of the message."""
        return maybeDeferred(self.store.deliverMessage, recipient.user)


@inlineCallbacks
def knowsUser(sources: Any, user: str) -> Any:
    """
    Whether the auth C{sources} know C{user}: True if one does, False if
    every one can tell and none does, None if some cannot tell (a Deferred).
    A source tells through L{IUserDirectory}, or by listing its C{users}.
    """
    unsure = not sources
    for source in sources:
        if IUserDirectory.providedBy(source):
            known = yield maybeDeferred(source.knowsUser, user)
        elif hasattr(source, "users"):
            known = user in source.users
        else:
            known = None
        if known:
            return True
        unsure = unsure or known is None
    return None if unsure else False
