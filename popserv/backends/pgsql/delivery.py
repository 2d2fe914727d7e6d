"""
Deliveries into the PostgreSQL store: the body spooled while it arrives,
then stored in one short transaction at commit.

A delivery holds no database connection while its message streams in (an
LMTP transaction keeps one delivery per recipient open for its whole DATA):
the body, in transfer form (L{popserv.octets}: CRLF line endings,
byte-stuffed, what RETR sends but the terminating ".", made once here rather
than at every RETR), goes to a C{tempfile.SpooledTemporaryFile} (in memory up to L{SPOOL_MEMORY},
on disk beyond, never whole in memory). At commit one pooled connection, in
one transaction, inserts the message row and then the body as rows of
L{CHUNK} bytes read back from the spool. The UIDL is checked there: a given
UIDL already in the maildrop is refused (L{UIDConflict}, nothing stored); a
chosen one is C{P} and the message's id from a sequence, never reused, and
another is drawn in the rare case an imported UIDL took that name.
"""

from __future__ import annotations

import time
from tempfile import SpooledTemporaryFile
from typing import Any

from twisted.internet.defer import Deferred, DeferredLock
from zope.interface import implementer

from popserv.errors import PermanentFailure
from popserv.interfaces import IMessageWriter, UIDConflict
from popserv.octets import CRLFSizer, MessageEncoder

__all__ = ["PgDelivery", "PgWriter", "CHUNK", "SPOOL_MEMORY", "maildropId"]

#: Bytes per body row: big enough that a 50 MiB message is 200 rows, small
#: enough that a reader holds one at a time.
CHUNK = 256 * 1024

#: A spooled body up to this size stays in memory; a bigger one goes to disk.
SPOOL_MEMORY = 1024 * 1024


def maildropId(conn: Any, user: str, create: bool) -> int | None:
    """The id of C{user}'s maildrop, made if missing and C{create}; else None."""
    row = conn.execute("SELECT id FROM maildrops WHERE name = %s", (user,)).fetchone()
    if row is None and create:
        row = conn.execute(
            "INSERT INTO maildrops (name) VALUES (%s) ON CONFLICT (name)"
            " DO UPDATE SET name = EXCLUDED.name RETURNING id",
            (user,),
        ).fetchone()
    return None if row is None else row[0]


def _nextId(conn: Any) -> int:
    return conn.execute("SELECT nextval('messages_id_seq')").fetchone()[0]


class PgDelivery:
    """
    The blocking half of a delivery (runs in a thread, one step at a time).

    @param database: the store's L{popserv.backends.pgsql.connections.Database}.
    """

    def __init__(
        self,
        database: Any,
        user: str,
        uid: str | None,
        received: float | None,
        createMissing: bool,
    ) -> None:
        self.database = database
        self.user = user
        self.uid = uid
        self.received = time.time() if received is None else received
        self.createMissing = createMissing
        self.size = CRLFSizer()  # of the message as delivered: the listed size
        self._encoder = MessageEncoder()
        self._spool: Any = SpooledTemporaryFile(max_size=SPOOL_MEMORY)
        self._id: int | None = None

    def begin(self) -> None:
        """Draw the message's id: a database that is down fails the delivery now."""
        self._id = self.database.run(_nextId)

    def write(self, data: bytes) -> None:
        self.size.feed(data)
        self._spool.write(self._encoder.feed(data))

    def commit(self, data: bytes = b"") -> str:
        """Spool C{data}, the body's last bytes, then store the message."""
        try:
            if data:
                self.write(data)
            self._spool.write(self._encoder.flush())
            return self.database.run(self._store, transaction=True)
        finally:
            self.abort()

    def _store(self, conn: Any) -> str:
        import psycopg

        maildrop = maildropId(conn, self.user, self.createMissing)
        if maildrop is None:
            raise PermanentFailure("Mailbox does not exist")
        messageId = self._id
        uid = self.uid if self.uid is not None else f"P{messageId}"
        while True:
            try:
                with conn.transaction():  # a savepoint
                    conn.execute(
                        "INSERT INTO messages (id, maildrop, uid, size, received, transfer_form)"
                        " VALUES (%s, %s, %s, %s, %s, true)",
                        (messageId, maildrop, uid, self.size.size, self.received),
                    )
                break
            except psycopg.errors.UniqueViolation:
                stored = conn.execute(
                    "SELECT uid FROM messages WHERE id = %s", (messageId,)
                ).fetchone()
                if stored is not None:
                    # This very message: an earlier run committed it and its
                    # reply was lost (the database ran this again). Its
                    # chunks came in the same transaction.
                    return str(stored[0])
                if self.uid is not None:
                    raise UIDConflict(f"UIDL {uid!r} is already in the maildrop") from None
                # An imported UIDL took the name: draw another.
                uid = f"P{_nextId(conn)}"
        spool = self._spool
        spool.seek(0)  # from the start again if the database retries this
        with conn.cursor() as cur:
            seq = 0
            while data := spool.read(CHUNK):
                cur.execute(
                    "INSERT INTO chunks (message, seq, data) VALUES (%s, %s, %s)",
                    (messageId, seq, data),
                )
                seq += 1
        return uid

    def abort(self) -> None:
        spool, self._spool = self._spool, None
        if spool is not None:
            spool.close()


@implementer(IMessageWriter)
class PgWriter:
    """
    The L{IMessageWriter} of a L{PgDelivery}: its blocking steps in threads,
    one at a time (a write made while another is in flight waits its turn).

    Small writes gather here, on the reactor thread, until they make a
    L{CHUNK}; the spool is touched only by the delivery's threaded steps.
    """

    def __init__(self, delivery: PgDelivery, runInThread: Any) -> None:
        self.delivery = delivery
        self._run = runInThread
        self._lock = DeferredLock()
        self._pending = bytearray()

    def write(self, data: bytes) -> Deferred[None] | None:
        if not self._lock.locked and len(self._pending) + len(data) < CHUNK:
            self._pending += data
            return None
        data = bytes(data)  # the caller may reuse its buffer
        return self._lock.run(lambda: self._run(self.delivery.write, self._take(data)))

    def _take(self, data: bytes = b"") -> bytes:
        """What is gathered here, and C{data}: for the next threaded step."""
        pending, self._pending = self._pending, bytearray()
        return bytes(pending + data) if pending else data

    def commit(self) -> Deferred[str]:
        return self._lock.run(lambda: self._run(self.delivery.commit, self._take()))

    def abort(self) -> Deferred[None]:
        def abort() -> Deferred[None]:
            self._pending = bytearray()
            return self._run(self.delivery.abort)

        return self._lock.run(abort)
