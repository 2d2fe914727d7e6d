"""
RFC 1939 transaction semantics, independent of storage and of the wire.

A L{Transaction} is the snapshot taken at login: messages numbered 1..N for
the whole session, deletion marks kept here (never in the backend), and the
removal of exactly the marked messages in the UPDATE state.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from operator import attrgetter

from twisted.internet.defer import Deferred, maybeDeferred, succeed

from popserv.errors import NoSuchMessage
from popserv.interfaces import IMailbox, MessageInfo
from popserv.listing import Listing

__all__ = ["Transaction"]

_NONE: frozenset[int] = frozenset()
_size = attrgetter("size")


class Transaction:
    """The per-login view of one maildrop."""

    __slots__ = (
        "mailbox",
        "_messages",
        "_deleted",
        "_retrieved",
        "_deletedSize",
        "_totalSize",
    )

    def __init__(self, mailbox: IMailbox, messages: Sequence[MessageInfo]) -> None:
        self.mailbox = mailbox
        # Kept as given if a Listing (see L{popserv.listing}) or a tuple: both
        # are immutable, and a store's cached listing is shared, never copied.
        if type(messages) is not Listing:
            messages = tuple(messages)
        self._messages: Listing | tuple[MessageInfo, ...] = messages
        # Most sessions never mark anything: the sets are made on first use.
        self._deleted: set[int] | frozenset[int] = _NONE
        self._retrieved: set[int] | frozenset[int] = _NONE
        self._deletedSize = 0
        # A Listing keeps its total (in its array: no int object per session).
        self._totalSize: int | None = (
            None if type(messages) is Listing else sum(map(_size, messages))
        )

    def __len__(self) -> int:
        """The number of messages at login, deleted or not."""
        return len(self._messages)

    def get(self, number: int) -> MessageInfo:
        """The message numbered C{number}; NoSuchMessage if out of range or marked."""
        if not 1 <= number <= len(self._messages):
            raise NoSuchMessage()
        if number in self._deleted:
            raise NoSuchMessage("Message is marked deleted")
        return self._messages[number - 1]

    def stat(self) -> tuple[int, int]:
        """Count and total size of the messages not marked deleted (STAT)."""
        total = self._totalSize
        if total is None:
            total = self._messages.totalSize  # type: ignore[union-attr]
        return len(self._messages) - len(self._deleted), total - self._deletedSize

    def listingChunks(self, sizes: bool, batch: int = 4096) -> Iterator[bytes]:
        """
        The lines of LIST (C{sizes}) or UIDL for every message not marked
        deleted, in chunks of up to C{batch} lines, each made in one go.
        """
        messages, deleted = self._messages, self._deleted
        listing = messages if type(messages) is Listing else None
        for start in range(0, len(messages), batch):
            stop = start + batch
            values: Sequence[object]
            if listing is not None:  # straight from the column: no MessageInfo made
                values = listing.sizes(start, stop) if sizes else listing.uids(start, stop)
            elif sizes:
                values = [m.size for m in messages[start:stop]]
            else:
                values = [m.uid for m in messages[start:stop]]
            part = enumerate(values, start + 1)
            if deleted:
                part = ((n, v) for n, v in part if n not in deleted)
            # str formatting, encoded once per chunk: UIDs are printable ASCII.
            lines = [f"{n} {v}\r\n" for n, v in part]
            if lines:
                yield "".join(lines).encode("ascii")

    def retrieved(self, number: int) -> None:
        """Note that RETR sent this message (EXPIRE 0 removes it at UPDATE)."""
        if self._retrieved is _NONE:
            self._retrieved = set()
        self._retrieved.add(number)  # type: ignore[union-attr]

    def delete(self, number: int) -> None:
        """Mark a message deleted (DELE); nothing is removed until UPDATE."""
        info = self.get(number)
        if self._deleted is _NONE:
            self._deleted = set()
        self._deleted.add(number)  # type: ignore[union-attr]
        self._deletedSize += info.size

    def reset(self) -> None:
        """Unmark every message (RSET)."""
        self._deleted = _NONE
        self._deletedSize = 0

    @property
    def marked(self) -> list[MessageInfo]:
        """The messages marked deleted, in message-number order."""
        return [self._messages[n - 1] for n in sorted(self._deleted)]

    def removals(
        self, expireRetrieved: bool = False, receivedBefore: float | None = None
    ) -> list[MessageInfo]:
        """
        What UPDATE removes: the marked messages, plus (RFC 2449 EXPIRE) those
        retrieved when C{expireRetrieved} (EXPIRE 0), plus those delivered
        before C{receivedBefore} (EXPIRE n days). Message-number order.
        """
        numbers = set(self._deleted)
        if expireRetrieved:
            numbers |= self._retrieved
        if receivedBefore is not None:
            numbers.update(
                n
                for n, info in enumerate(self._messages, 1)
                if info.received is not None and info.received < receivedBefore
            )
        return [self._messages[n - 1] for n in sorted(numbers)]

    def commit(
        self, removals: Sequence[MessageInfo] | None = None
    ) -> Deferred[Sequence[MessageInfo]]:
        """
        UPDATE: remove C{removals} (by default exactly the marked messages).

        Fires with those that could not be removed (empty on full success).
        """
        if removals is None:
            removals = self.marked
        if not removals:
            return succeed(())
        return maybeDeferred(self.mailbox.removeMessages, list(removals))
