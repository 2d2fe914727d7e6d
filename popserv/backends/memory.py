"""
An in-memory store, for tests and for embedders who want a POP3 endpoint over
messages they already hold. Same locking and UPDATE semantics as on disk.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Sequence

from zope.interface import implementer

from popserv.errors import MaildropInUse, MessageVanished
from popserv.interfaces import (
    IMailbox,
    IMaildropUsage,
    IMailStore,
    IMessageReader,
    IMessageWriter,
    InvalidUID,
    MessageInfo,
    UIDConflict,
    validUID,
)
from popserv.octets import crlfSize

__all__ = ["MemoryStore", "MemoryMaildrop", "MemoryMailbox", "MemoryWriter"]


class MemoryMaildrop:
    """One user's messages: an ordered dict of uid -> bytes, plus the lock flag."""

    def __init__(self, messages: Iterable[bytes] = ()) -> None:
        self.messages: dict[str, bytes] = {}
        self.received: dict[str, float] = {}
        self.locked = False
        self._counter = itertools.count(1)
        for m in messages:
            self.deliver(m)

    def deliver(
        self, message: bytes, uid: str | None = None, received: float | None = None
    ) -> str:
        """Add a message (as a delivery would) and return its UID."""
        if uid is None:
            uid = f"mem{next(self._counter):08d}"
            while uid in self.messages:
                uid = f"mem{next(self._counter):08d}"
        elif not validUID(uid):
            raise InvalidUID(f"not an RFC 1939 UIDL: {uid!r}")
        if uid in self.messages:
            raise UIDConflict(f"UIDL {uid!r} is already in the maildrop")
        self.messages[uid] = message
        self.received[uid] = time.time() if received is None else received
        return uid


@implementer(IMessageReader)
class _BytesReader:
    transferForm = False

    def __init__(self, data: bytes) -> None:
        self._view = memoryview(data)
        self._pos = 0

    def read(self, size: int) -> bytes:
        chunk = bytes(self._view[self._pos : self._pos + size])
        self._pos += len(chunk)
        return chunk

    def close(self) -> None:
        self._view.release()


@implementer(IMessageWriter)
class MemoryWriter:
    """A delivery into a L{MemoryMaildrop}: the chunks are kept until commit."""

    def __init__(self, maildrop: MemoryMaildrop, uid: str | None, received: float | None):
        self._maildrop = maildrop
        self._uid = uid
        self._received = received
        self._chunks: list[bytes] | None = []

    def write(self, data: bytes) -> None:
        if self._chunks is None:
            raise ValueError("write after the delivery ended")
        self._chunks.append(bytes(data))

    def commit(self) -> str:
        if self._chunks is None:
            raise ValueError("commit after the delivery ended")
        data, self._chunks = b"".join(self._chunks), None
        return self._maildrop.deliver(data, self._uid, self._received)

    def abort(self) -> None:
        self._chunks = None


@implementer(IMailbox)
class MemoryMailbox:
    """A locked session view of a L{MemoryMaildrop}."""

    def __init__(self, maildrop: MemoryMaildrop) -> None:
        self._maildrop = maildrop
        self._closed = False

    def listMessages(self) -> list[MessageInfo]:
        received = self._maildrop.received
        return [
            MessageInfo(uid, crlfSize(data), key=uid, received=received.get(uid))
            for uid, data in self._maildrop.messages.items()
        ]

    def openMessage(self, info: MessageInfo) -> IMessageReader:
        data = self._maildrop.messages.get(info.key)
        if data is None:
            raise MessageVanished()
        return _BytesReader(data)

    def removeMessages(self, infos: Sequence[MessageInfo]) -> list[MessageInfo]:
        for info in infos:
            self._maildrop.messages.pop(info.key, None)
            self._maildrop.received.pop(info.key, None)
        return []

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._maildrop.locked = False


@implementer(IMailStore, IMaildropUsage)
class MemoryStore:
    """Maildrops by user name; a user without one gets an empty maildrop."""

    description = "memory"

    def __init__(self, maildrops: dict[str, MemoryMaildrop] | None = None) -> None:
        self.maildrops: dict[str, MemoryMaildrop] = dict(maildrops or {})

    def maildrop(self, user: str) -> MemoryMaildrop:
        """The maildrop of C{user}, created empty if needed."""
        return self.maildrops.setdefault(user, MemoryMaildrop())

    def openMailbox(self, user: str) -> MemoryMailbox:
        drop = self.maildrop(user)
        if drop.locked:
            raise MaildropInUse()
        drop.locked = True
        return MemoryMailbox(drop)

    def deliverMessage(
        self, user: str, uid: str | None = None, received: float | None = None
    ) -> MemoryWriter:
        """A delivery to C{user}'s maildrop (made if missing); no lock taken."""
        if uid is not None and not validUID(uid):
            raise InvalidUID(f"not an RFC 1939 UIDL: {uid!r}")
        return MemoryWriter(self.maildrop(user), uid, received)

    def listMaildrops(self) -> list[str]:
        return sorted(self.maildrops)

    def usage(self, user: str) -> tuple[int, int]:
        """C{(messages, octets)} in C{user}'s maildrop (L{IMaildropUsage})."""
        drop = self.maildrops.get(user)
        if drop is None:
            return (0, 0)
        return (len(drop.messages), sum(crlfSize(m) for m in drop.messages.values()))
