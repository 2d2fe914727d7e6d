"""
The seams between the wire protocol and storage.

Every method here may return its result directly or as a Deferred: the
protocol wraps each call in C{maybeDeferred}, so a local Maildir and a remote
database fit the same protocol code.

Text and bytes: user names are C{str} (decoded from the wire as UTF-8);
message content is C{bytes}, always; UIDs are C{str} of printable ASCII.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

__all__ = [
    "MessageInfo",
    "IMessageReader",
    "IMessageWriter",
    "IMailbox",
    "IMailStore",
    "ILoginMemory",
    "IMaildropUsage",
    "IFailedLogins",
    "ISharedKeys",
    "IUserDirectory",
    "IRelayedSession",
    "LoginMind",
    "UnverifiedUser",
    "validUID",
    "InvalidUID",
    "UIDConflict",
]


def validUID(uid: str) -> bool:
    """RFC 1939 section 7: 1 to 70 characters in the range 0x21 to 0x7E."""
    # Printable ASCII is 0x20-0x7E; these C-level checks beat a regex for
    # the 100,000 names of a big maildrop.
    return 0 < len(uid) <= 70 and uid.isascii() and uid.isprintable() and " " not in uid


class InvalidUID(ValueError):
    """A UIDL given for a delivery is not an RFC 1939 UIDL (see L{validUID})."""


class UIDConflict(ValueError):
    """A UIDL given for a delivery is already present in the maildrop."""


class MessageInfo(NamedTuple):
    """
    What a session knows about one message present at login.

    A named tuple of plain values: small, and never part of a cycle (the
    garbage collector still tracks each one: it never untracks a tuple
    subclass).

    @ivar uid: the unique id (RFC 1939 UIDL): unique in the maildrop, never
        changing, never reused.
    @ivar size: the exact octet count RETR sends, before byte-stuffing (CRLF
        line endings, a final CRLF included).
    @ivar key: the backend's own handle for the message; opaque to the protocol.
    @ivar received: when it was delivered (POSIX time), if known: EXPIRE uses it.
    """

    uid: str
    size: int
    key: Any = None
    received: float | None = None


class IMessageReader(Interface):
    """An open message, read sequentially in chunks by the protocol's producer."""

    transferForm = Attribute(
        """
        True if L{read} gives the message in transfer form (see
        L{popserv.octets}): exactly what RETR sends but the terminating "."
        line, CRLF line endings, byte-stuffed, so that RETR passes it through
        untouched; a consumer that wants the message itself decodes it with
        L{popserv.octets.TransferDecoder}. False: the message as stored (any
        line endings, not stuffed). A reader without the attribute is taken
        as False.
        """
    )

    def read(size: int) -> bytes | Deferred[bytes]:
        """Up to C{size} more bytes of the stored message; C{b""} at its end."""

    def close() -> None:
        """Release the message; called exactly once, also on a dropped connection."""


class IMessageWriter(Interface):
    """
    One message being delivered, written sequentially in chunks and made
    visible in the maildrop, whole, only by L{commit}.

    Exactly one of L{commit} and L{abort} is called, once, and nothing after
    it. The caller waits for each call's result before the next call (a
    returned Deferred is the back-pressure of a slow store).
    """

    def write(data: bytes) -> None | Deferred[None]:
        """
        Append C{data} to the message as stored (line endings as given: the
        listed size is still the exact CRLF size). The store never needs
        the whole message in memory.
        """

    def commit() -> str | Deferred[str]:
        """
        Make the message visible, atomically: a session listing the maildrop
        sees all of it or nothing. It is durable (synced to disk, or
        committed by the database) before the result is given.

        @return: the message's UIDL: the one given to
            L{IMailStore.deliverMessage}, else the one the store chose.
        @raise UIDConflict: the given UIDL is present in the maildrop now;
            nothing is delivered (as after L{abort}).
        """

    def abort() -> None | Deferred[None]:
        """Give up the delivery: nothing becomes visible, nothing is left behind."""


class IMailbox(Interface):
    """
    One locked maildrop for the length of one session.

    Deletion marks are not the mailbox's business: the session keeps them and
    calls L{removeMessages} only in the UPDATE state, after QUIT.
    """

    def listMessages() -> Sequence[MessageInfo] | Deferred[Sequence[MessageInfo]]:
        """The messages present now, in the order they are to be numbered."""

    def openMessage(info: MessageInfo) -> IMessageReader | Deferred[IMessageReader]:
        """Open one message of the listing for reading."""

    def removeMessages(
        infos: Sequence[MessageInfo],
    ) -> Sequence[MessageInfo] | Deferred[Sequence[MessageInfo]]:
        """
        Remove these messages for good; return those that could not be
        removed (a message already gone counts as removed).
        """

    def close() -> None | Deferred[None]:
        """Release the maildrop lock. Called exactly once per opened mailbox."""


class LoginMind(NamedTuple):
    """
    What a realm may know of a login besides the user's name (the C{mind}
    of C{Portal.login}): the credentials as the client gave them (a proxy
    forwards a password) and the client's transport (its addresses).
    """

    credentials: Any
    transport: Any


class UnverifiedUser(str):
    """
    The name of a user whose password the front did not check (a
    passwd-file line with C{nopassword=y}, or a proxy with no auth source of
    its own), as a checker hands it to the realm: only a backend that checks
    the user's own, forwarded password may serve such a user. A realm that
    cannot do that refuses the login.
    """

    __slots__ = ()


class IRelayedSession(Interface):
    """
    The avatar of a user whose session is relayed to another server (the
    proxy mode): a realm hands it out in place of an L{IMailbox}, already
    logged in there.
    """

    greeting = Attribute("The other server's +OK answer to the login, CRLF included (bytes).")
    backendName = Attribute("The other server, as the logout line names it (str).")

    def start(transport: Any, leftover: bytes, stats: Any, activity: Any) -> Any:
        """
        Relay between the client's C{transport} and the other server from
        now on. C{leftover}: what the client sent after its login command;
        C{stats.bytes_out} counts what the client is sent; C{activity()} is
        called on traffic (the idle timer). Return the callable the client's
        further bytes are to be given to.
        """


class IMailStore(Interface):
    """
    Where maildrops live: turns an authenticated user into a locked mailbox,
    takes deliveries (LMTP, C{popserv deliver}, migration) and says which
    maildrops exist (migration).
    """

    description = Attribute("A short human-readable description for logs.")

    # Optional: a store may have C{close() -> None}, blocking, which gives
    # back what it holds (connections, pools); the server calls it in a
    # thread once it has stopped and its sessions have ended.

    def openMailbox(user: str) -> IMailbox | Deferred[IMailbox]:
        """
        Open and lock the maildrop of C{user}.

        Fails with L{popserv.errors.MaildropInUse} when another session holds
        it, L{popserv.errors.InvalidUserName} for a name that cannot name a
        maildrop, or another L{popserv.errors.POP3Error}.
        """

    def deliverMessage(
        user: str, uid: str | None = None, received: float | None = None
    ) -> IMessageWriter | Deferred[IMessageWriter]:
        """
        Start delivering one message to C{user}'s maildrop (created if the
        store creates missing maildrops at login).

        Delivery takes no session lock and never fails with
        L{popserv.errors.MaildropInUse}: it is safe while a session has the
        maildrop open, which lists the new message at its next login (or
        never, if it was delivered after the session's listing).

        @param uid: store the message under exactly this UIDL, kept for good
            (migration keeps the UIDLs clients know); None: the store
            chooses a new one.
        @param received: the delivery time (POSIX), which EXPIRE and the
            listing order use; None: now.
        @raise InvalidUID: C{uid} is not an RFC 1939 UIDL.
        @raise popserv.errors.InvalidUserName: C{user} cannot name a maildrop.
        @raise popserv.errors.PermanentFailure: there is no maildrop and the
            store does not create one.
        """

    def listMaildrops() -> Iterable[str] | Deferred[Iterable[str]]:
        """
        The users that have a maildrop, each once, by the name that opens it
        (L{openMailbox} and L{deliverMessage} accept it).
        """


class ILoginMemory(Interface):
    """
    When each user last logged in, kept where every process serving the
    maildrop sees it (LOGIN-DELAY across workers and nodes). A store may
    provide it; the session policy then consults it for users with a delay.

    Checking and recording are two steps, not one: logins checked at the same
    moment on two nodes may both pass (the maildrop lock still admits only
    one session at a time).
    """

    def lastLogin(user: str) -> float | None | Deferred[float | None]:
        """The POSIX time of C{user}'s last recorded login, or None if unknown."""

    def recordLogin(user: str, when: float) -> None | Deferred[None]:
        """Record a login of C{user} at POSIX time C{when}."""


class IMaildropUsage(Interface):
    """
    What a maildrop holds now, for quotas enforced at delivery (LMTP). A
    store may provide it; without it, quotas are not enforced.
    """

    def usage(user: str) -> tuple[int, int] | Deferred[tuple[int, int]]:
        """
        C{(messages, octets)} in C{user}'s maildrop now (octets: the sum of
        the listed, exact RETR sizes); C{(0, 0)} for a maildrop not made yet.
        Cheap: from what the store keeps, not by reading every message.
        """


class IFailedLogins(Interface):
    """
    Failed logins per client address, kept where every process and node
    sees them, so the failed-login penalty holds across a cluster. A store
    may provide it; L{popserv.limits.AuthPenalty} then keeps its counts
    there rather than in the process alone.
    """

    def recordFailure(address: str, when: float, forget: float) -> int | Deferred[int]:
        """
        Count one failed login from C{address} at POSIX time C{when}: the
        number of failures from it since the last success, counting from 1
        again after C{forget} seconds without one. One statement.
        """

    def clearFailures(address: str) -> None | Deferred[None]:
        """Forget C{address}'s failures (a login from it succeeded)."""


class ISharedKeys(Interface):
    """
    Small random secrets shared by every process and node serving a store
    (the key SCRAM's made-up salts come from). A store may provide it.
    """

    def sharedKey(name: str) -> bytes:
        """
        The 32-byte key called C{name}, made at random by whoever asks first
        and the same for everyone afterwards. Blocking: called once, at
        start-up, before the server listens.

        @raise popserv.errors.TemporaryFailure: it cannot be read or made now.
        """


class IUserDirectory(Interface):
    """
    An auth source that can tell whether a user exists without a password:
    LMTP refuses mail for unknown recipients with it.
    """

    def knowsUser(user: str) -> bool | None | Deferred[bool | None]:
        """Whether C{user} is an account of this source; None if it cannot tell."""
