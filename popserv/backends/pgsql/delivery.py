"""
Deliveries into the PostgreSQL store: one transaction per message, holding
one pooled connection from the first write to the commit.

The body goes in as rows of L{CHUNK} bytes while it arrives (never whole in
memory); the message row, which makes it visible, is inserted at commit,
where its UIDL is checked: a given UIDL already in the maildrop is refused
(L{UIDConflict}, the transaction rolled back); a chosen one is C{P} and the
message's id from a sequence, never reused, and another is drawn in the
rare case an imported UIDL took that name.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from popserv.errors import PermanentFailure
from popserv.interfaces import IMessageWriter, UIDConflict
from popserv.octets import CRLFSizer

__all__ = ["PgDelivery", "PgWriter", "CHUNK", "maildropId"]

#: Bytes per body row: big enough that a 50 MiB message is 200 rows, small
#: enough that a reader holds one at a time.
CHUNK = 256 * 1024


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


class PgDelivery:
    """
    The blocking half of a delivery (runs in a thread).

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
        self._sizer = CRLFSizer()
        self._buffer = bytearray()
        self._seq = 0
        self._conn: Any = None
        self._id: int | None = None

    def begin(self) -> None:
        import psycopg

        for attempt in (1, 2):
            conn = self.database.getconn()
            try:
                self._id = conn.execute("SELECT nextval('messages_id_seq')").fetchone()[0]
            except Exception as e:
                broken = isinstance(e, psycopg.OperationalError) and conn.broken
                self.database.putconn(conn)
                if attempt == 1 and broken:  # stale after a database restart
                    self.database.pool.check()
                    continue
                raise self._failure(e) from e
            self._conn = conn
            return

    def write(self, data: bytes) -> None:
        self._sizer.feed(data)
        self._buffer += data
        if len(self._buffer) >= CHUNK:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        buffer = self._buffer
        end = len(buffer) if final else len(buffer) - len(buffer) % CHUNK
        try:
            with self._conn.cursor() as cur:
                for start in range(0, end, CHUNK):
                    cur.execute(
                        "INSERT INTO chunks (message, seq, data) VALUES (%s, %s, %s)",
                        (self._id, self._seq, bytes(buffer[start : start + CHUNK])),
                    )
                    self._seq += 1
        except Exception as e:
            raise self._failure(e) from e
        del buffer[:end]

    def commit(self) -> str:
        import psycopg

        try:
            self._flush(final=True)
            conn = self._conn
            maildrop = maildropId(conn, self.user, self.createMissing)
            if maildrop is None:
                raise PermanentFailure("Mailbox does not exist")
            messageId = self._id
            uid = self.uid if self.uid is not None else f"P{messageId}"
            while True:
                try:
                    with conn.transaction():  # a savepoint
                        conn.execute(
                            "INSERT INTO messages (id, maildrop, uid, size, received)"
                            " VALUES (%s, %s, %s, %s, %s)",
                            (messageId, maildrop, uid, self._sizer.size, self.received),
                        )
                    break
                except psycopg.errors.UniqueViolation:
                    if self.uid is not None:
                        raise UIDConflict(f"UIDL {uid!r} is already in the maildrop") from None
                    # An imported UIDL took the name: draw another.
                    n = conn.execute("SELECT nextval('messages_id_seq')").fetchone()[0]
                    uid = f"P{n}"
            conn.commit()
            return uid
        except (UIDConflict, PermanentFailure):
            raise
        except Exception as e:
            raise self._failure(e) from e
        finally:
            self._end()

    def abort(self) -> None:
        self._end()

    def _end(self) -> None:
        conn, self._conn = self._conn, None
        self._buffer = bytearray()
        if conn is not None:
            try:
                conn.rollback()
            except Exception:
                pass
            self.database.putconn(conn)

    def _failure(self, error: BaseException) -> BaseException:
        from popserv.backends.pgsql.connections import unreachable

        self._end()
        return self.database.failure(error) if unreachable(error) else error


@implementer(IMessageWriter)
class PgWriter:
    """The L{IMessageWriter} of a L{PgDelivery}: its blocking steps in threads."""

    def __init__(self, delivery: PgDelivery, runInThread: Any) -> None:
        self.delivery = delivery
        self._run = runInThread

    def write(self, data: bytes) -> Deferred[None] | None:
        delivery = self.delivery
        if len(delivery._buffer) + len(data) < CHUNK:
            delivery._sizer.feed(data)
            delivery._buffer += data
            return None
        return self._run(delivery.write, bytes(data))

    def commit(self) -> Deferred[str]:
        return self._run(self.delivery.commit)

    def abort(self) -> Deferred[None]:
        if self.delivery._conn is None:
            return succeed(None)
        return self._run(self.delivery.abort)
