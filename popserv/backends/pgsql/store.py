"""
The PostgreSQL store: maildrops opened and locked for one session each,
listed by one indexed query, read chunk by chunk, updated in one transaction;
deliveries (L{popserv.backends.pgsql.delivery}); users' last logins.

Every database call runs in the store's C{runInThread} (a bounded thread
pool) on a connection of the bounded pool; an unreachable database is
L{popserv.errors.TemporaryFailure} (C{[SYS/TEMP]}).
"""

from __future__ import annotations

import re
import sys
import threading
import time
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence
from operator import le, lt
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from zope.interface import implementer

from popserv.backends.pgsql import shared
from popserv.backends.pgsql.connections import (
    DEFAULT_POOL_SIZE,
    DEFAULT_TIMEOUT,
    Database,
    unreachable,
)
from popserv.backends.pgsql.delivery import PgDelivery, PgWriter, maildropId
from popserv.backends.pgsql.locks import AdvisoryLocks
from popserv.backends.pgsql.prepared import Prepared
from popserv.backends.pgsql.schema import CURRENT, schemaVersion
from popserv.errors import MessageVanished, PermanentFailure, TemporaryFailure
from popserv.interfaces import (
    IFailedLogins,
    ILoginMemory,
    IMailbox,
    IMaildropUsage,
    IMailStore,
    IMessageReader,
    InvalidUID,
    ISharedKeys,
    MessageInfo,
    validUID,
)
from popserv.listing import Listing
from popserv.threads import RunInThread, reactorThreads

__all__ = ["PgStore", "PgMailbox"]

_log = Logger()

#: The listing as one row of columns: the UIDLs joined by newlines (never in
#: a UIDL), then the sizes, ids and delivery times packed big-endian, from
#: one index-only scan in listing order (no sort: the aggregates read the
#: ordered subquery as it comes; L{_columns} checks the order all the same).
#: One row of five values rather than a row per message: a 100k listing
#: costs the node about 10 ms of CPU rather than 110 (loading 400,000
#: values one by one), and the database about the same as before.
_LISTING = Prepared(
    "listing_columns",
    "SELECT string_agg(uid, E'\\n'), string_agg(int8send(size), ''::bytea),"
    " string_agg(int8send(id), ''::bytea), string_agg(float8send(received), ''::bytea),"
    " count(*)"
    " FROM (SELECT uid, size, id, received FROM messages WHERE maildrop = $1::int8"
    " ORDER BY received, id) m",
    binary=True,
)


def _packed(data: bytes | None, kind: str) -> array[Any]:
    """A column packed big-endian by C{int8send}/C{float8send}, as an array."""
    column = array(kind)
    if data:
        column.frombytes(data)
        if sys.byteorder == "little":
            column.byteswap()
    return column


def _inOrder(received: array[float], ids: array[int]) -> bool:
    """Whether the messages are sorted by (received, id), the listing order."""
    later = received[1:]
    if all(map(lt, received, later)):
        return True  # (no two delivered at the same time: the usual case)
    if not all(map(le, received, later)):
        return False
    if all(map(lt, ids, ids[1:])):
        return True  # (ids mostly grow with delivery: no tie to look at)
    keys = list(zip(received, ids, strict=True))
    return all(map(le, keys, keys[1:]))


def _columns(res: Any) -> tuple[list[str], array[int], array[int], array[float]]:
    """The listing's columns from L{_LISTING}'s row, in listing order."""
    count = int.from_bytes(res.get_value(0, 4), "big")
    if not count:
        return [], array("q"), array("q"), array("d")
    uids = res.get_value(0, 0).decode("utf-8").split("\n")
    sizes = _packed(res.get_value(0, 1), "q")
    ids = _packed(res.get_value(0, 2), "q")
    received = _packed(res.get_value(0, 3), "d")
    if not len(uids) == len(sizes) == len(ids) == len(received) == count:
        raise RuntimeError("the maildrop's listing came back garbled")  # (a bug: logged)
    if not _inOrder(received, ids):
        # Not in listing order (an aggregate that read its input otherwise):
        # sort here rather than number the messages wrongly.
        keys = list(zip(received, ids, strict=True))
        order = sorted(range(count), key=keys.__getitem__)
        uids = [uids[i] for i in order]
        sizes = array("q", [sizes[i] for i in order])
        ids = array("q", [ids[i] for i in order])
        received = array("d", [received[i] for i in order])
    return uids, sizes, ids, received


#: The message (none: it vanished), its first rows (none: an empty body),
#: its last row's number, so that reading stops without asking for more,
#: and whether its body is in transfer form.
_OPEN = Prepared(
    "open",
    "SELECT c.data, (SELECT max(seq) FROM chunks l WHERE l.message = m.id), m.transfer_form"
    " FROM messages m LEFT JOIN chunks c ON c.message = m.id AND c.seq < $1::int4"
    " WHERE m.id = $2::int8 AND m.maildrop = $3::int8 ORDER BY c.seq",
    binary=True,
)


#: Messages, all listings together, that a process keeps listings of.
LISTING_CACHE = 250_000


class _Listings:
    """
    The listings this process read lately, each under the change counter
    its maildrop had when it was read (thread-safe). A listing is read
    after its counter, so it is never older than the counter says: a stale
    entry can only cost a new query, never show a wrong list.
    """

    def __init__(self, limit: int = LISTING_CACHE) -> None:
        self.limit = limit
        self._entries: OrderedDict[int, tuple[int, Listing]] = OrderedDict()
        self._total = 0
        self._mutex = threading.Lock()

    def get(self, maildrop: int, changes: int) -> Listing | None:
        with self._mutex:
            entry = self._entries.get(maildrop)
            if entry is None or entry[0] != changes:
                return None
            self._entries.move_to_end(maildrop)
            return entry[1]

    def put(self, maildrop: int, changes: int, listing: Listing) -> None:
        if len(listing) > self.limit:
            return
        with self._mutex:
            old = self._entries.pop(maildrop, None)
            if old is not None:
                self._total -= len(old[1])
            self._entries[maildrop] = (changes, listing)
            self._total += len(listing)
            while self._total > self.limit:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._total -= len(dropped)


#: Body rows fetched per query while reading a message: with the next batch
#: fetched ahead, at most about C{(2 * _BATCH + 1) * CHUNK} bytes of it in
#: memory at once. One row (four round trips per MiB) costs the node less
#: CPU than two: less memory in flight stays in the caches (and the RSS
#: grows less: 0.2 rather than 1.1 MiB during a 50 MiB RETR, measured).
_BATCH = 1

_CHUNKS = Prepared(
    "chunks",
    "SELECT data FROM chunks WHERE message = $1::int8 AND seq >= $2::int4 ORDER BY seq"
    " LIMIT $3::int8",
    binary=True,
)


def _fetchChunks(conn: Any, messageId: int, seq: int) -> list[bytes]:
    # Binary: bytea as it is stored, not as hex text twice its size to decode.
    res = _CHUNKS.result(conn, (b"%d" % messageId, b"%d" % seq, b"%d" % _BATCH))
    return [res.get_value(i, 0) for i in range(res.ntuples)]


@implementer(IMessageReader)
class _ChunkReader:
    """
    One message read batch by batch: each batch of L{_BATCH} rows fetched
    (in a thread, on a pooled connection held only for that query) while
    the last row of the previous one is being sent.

    @ivar transferForm: the rows are in transfer form (every delivery since
        schema 5); False for a message stored before, the bytes as delivered.
    """

    transferForm = False

    def __init__(
        self,
        mailbox: PgMailbox,
        messageId: int,
        first: list[bytes],
        last: int = -1,
        transferForm: bool = False,
    ) -> None:
        self.transferForm = transferForm
        self._mailbox = mailbox
        self._id = messageId
        self._chunks = deque(first)
        self._current = memoryview(b"")
        self._pos = 0
        self._seq = len(first)
        self._last = last
        self._more = self._seq <= last
        self._pending: Deferred[None] | None = None

    def read(self, size: int) -> bytes | Deferred[bytes]:
        if self._pos >= len(self._current):
            if not self._chunks:
                pending = self._pending
                if pending is None:
                    if not self._more:
                        return b""
                    pending = self._fetch()
                self._pending = None
                return pending.addCallback(lambda _: self.read(size))
            chunk = self._chunks.popleft()
            if not self._chunks and self._more and self._pending is None:
                self._pending = self._fetch()
            if size >= len(chunk):
                self._current = memoryview(b"")
                return chunk
            self._current = memoryview(chunk)
            self._pos = 0
        data = bytes(self._current[self._pos : self._pos + size])
        self._pos += len(data)
        return data

    def _fetch(self) -> Deferred[None]:
        store = self._mailbox._store
        seq = self._seq
        self._seq += _BATCH
        self._more = False
        return store.runInThread(store.database.run, _fetchChunks, self._id, seq).addCallback(
            self._got
        )

    def _got(self, rows: list[bytes]) -> None:
        self._chunks.extend(rows)
        self._more = bool(rows) and self._seq <= self._last

    def close(self) -> None:
        self._chunks.clear()
        self._current = memoryview(b"")
        self._more = False
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.addErrback(lambda _: None)


@implementer(IMailbox)
class PgMailbox:
    """One locked maildrop of a L{PgStore} for one session; C{key} is the message id."""

    __slots__ = ("_store", "user", "maildrop", "changes", "_locked")

    def __init__(self, store: PgStore, user: str, maildrop: int, changes: int = -1) -> None:
        self._store = store
        self.user = user
        self.maildrop = maildrop
        self.changes = changes
        self._locked = True

    def listMessages(self) -> Sequence[MessageInfo] | Deferred[Sequence[MessageInfo]]:
        listing = self._store.listings.get(self.maildrop, self.changes)
        if listing is not None:
            return listing
        return self._store.runInThread(self._store.database.run, self._list)

    def _list(self, conn: Any) -> Listing:
        uids, sizes, ids, received = _columns(_LISTING.result(conn, (b"%d" % self.maildrop,)))
        listing = Listing.ofColumns(uids, sizes, ids, received)
        if self.changes >= 0:
            self._store.listings.put(self.maildrop, self.changes, listing)
        return listing

    def openMessage(self, info: MessageInfo) -> Deferred[IMessageReader]:
        return self._store.runInThread(self._open, info.key)

    def _open(self, messageId: int) -> IMessageReader:
        def query(conn: Any) -> tuple[list[bytes], bytes | None, bytes] | None:
            params = (b"%d" % _BATCH, b"%d" % messageId, b"%d" % self.maildrop)
            res = _OPEN.result(conn, params)
            if res.ntuples == 0:
                return None
            first = [res.get_value(i, 0) for i in range(res.ntuples)]
            return (
                [data for data in first if data is not None],
                res.get_value(0, 1),
                res.get_value(0, 2),
            )

        found = self._store.database.run(query)
        if found is None:
            raise MessageVanished()
        first, last, transferForm = found
        # The last row's number: a binary int4 (None: no rows); a binary bool.
        return _ChunkReader(
            self,
            messageId,
            first,
            -1 if last is None else int.from_bytes(last, "big", signed=True),
            transferForm == b"\x01",
        )

    def removeMessages(self, infos: Sequence[MessageInfo]) -> Deferred[list[MessageInfo]]:
        ids = [info.key for info in infos]
        return self._store.runInThread(self._removeLocked, ids)

    def _removeLocked(self, ids: list[int]) -> list[MessageInfo]:
        # Only while this process holds the lock, checked in the DELETE's
        # own transaction: a lost lock connection frees it, and another
        # node may be serving the maildrop now.
        self._store.locks.remove(self.user, self.maildrop, ids)
        return []

    def close(self) -> Deferred[None] | None:
        if not self._locked:
            return None
        self._locked = False
        return self._store.serial(self._store.locks.release, self.user)


@implementer(IMailStore, ILoginMemory, IMaildropUsage, IFailedLogins, ISharedKeys)
class PgStore:
    """
    Maildrops in a PostgreSQL database whose schema C{popserv db init} made,
    and what the nodes serving them share: last logins (LOGIN-DELAY), failed
    logins (the auth penalty) and the SCRAM salt key.

    @param uri: any libpq URI or connection string, passed on untouched.
    @param createMissing: make a missing maildrop at first login.
    @param poolSize: connections at most (the thread pool's size is a good fit).
    @param timeout: seconds to wait for a connection before C{[SYS/TEMP]}.
    @param serial: runs the maildrop locks' work, which their one
        connection serializes anyway, e.g. in order on one thread of its own
        (a L{popserv.backends.pgsql.serial.SerialThread}, what a server's
        store uses: a login's lock and unlock cost less than two trips
        through C{runInThread}'s pool); None: C{runInThread}.
    """

    def __init__(
        self,
        uri: str,
        runInThread: RunInThread | None = None,
        createMissing: bool = True,
        poolSize: int = DEFAULT_POOL_SIZE,
        timeout: float = DEFAULT_TIMEOUT,
        serial: RunInThread | None = None,
    ) -> None:
        self.uri = uri
        self.runInThread = runInThread or reactorThreads()
        self.createMissing = createMissing
        self.database = Database(uri, poolSize, timeout)
        self.locks = AdvisoryLocks(self.database)
        self.listings = _Listings()
        self._serial = serial

    def serial(self, f: Any, *args: Any) -> Deferred[Any]:
        """C{f(*args)} in the lane of the locks' work (see C{serial} above)."""
        if self._serial is None:
            return self.runInThread(f, *args)
        return self._serial(f, *args)

    @property
    def description(self) -> str:
        return "pgsql:" + re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", self.uri)

    def openMailbox(self, user: str) -> Deferred[PgMailbox]:
        return self.serial(self._openMailbox, user, time.monotonic())

    def _openMailbox(self, user: str, asked: float | None = None) -> PgMailbox:
        if asked is not None and time.monotonic() - asked > self.database.timeout:
            # Queued behind lock work that waited on an unreachable
            # database: fail as a login that waited for a connection does.
            raise TemporaryFailure()
        found = self.locks.acquire(user)  # and, in the same round trip, the maildrop
        if found is not None:
            return PgMailbox(self, user, *found)
        try:
            maildrop = self.database.run(maildropId, user, self.createMissing)
            if maildrop is None:
                raise PermanentFailure("Mailbox does not exist")
        except BaseException:
            self.locks.release(user)
            raise
        return PgMailbox(self, user, maildrop)

    def deliverMessage(
        self, user: str, uid: str | None = None, received: float | None = None
    ) -> Deferred[PgWriter]:
        if uid is not None and not validUID(uid):
            return fail(InvalidUID(f"not an RFC 1939 UIDL: {uid!r}"))
        delivery = PgDelivery(self.database, user, uid, received, self.createMissing)
        return self.runInThread(delivery.begin).addCallback(
            lambda _: PgWriter(delivery, self.runInThread)
        )

    def listMaildrops(self) -> Deferred[list[str]]:
        return self.runInThread(
            self.database.run,
            lambda conn: [r[0] for r in conn.execute("SELECT name FROM maildrops ORDER BY name")],
        )

    # -- ILoginMemory --

    def lastLogin(self, user: str) -> Deferred[float | None]:
        def query(conn: Any) -> float | None:
            row = conn.execute("SELECT last FROM logins WHERE name = %s", (user,)).fetchone()
            return None if row is None else row[0]

        return self.runInThread(self.database.run, query)

    def recordLogin(self, user: str, when: float) -> Deferred[None]:
        def record(conn: Any) -> None:
            conn.execute(
                "INSERT INTO logins (name, last) VALUES (%s, %s)"
                " ON CONFLICT (name) DO UPDATE SET last = EXCLUDED.last",
                (user, when),
            )

        return self.runInThread(self.database.run, record)

    # -- IMaildropUsage --

    def usage(self, user: str) -> Deferred[tuple[int, int]]:
        def query(conn: Any) -> tuple[int, int]:
            row = conn.execute(
                "SELECT count(*), coalesce(sum(m.size), 0) FROM messages m"
                " JOIN maildrops d ON d.id = m.maildrop WHERE d.name = %s",
                (user,),
            ).fetchone()
            return int(row[0]), int(row[1])

        return self.runInThread(self.database.run, query)

    # -- IFailedLogins --

    def recordFailure(self, address: str, when: float, forget: float) -> Deferred[int]:
        # Not retried: a statement whose answer was lost may have counted.
        return self.runInThread(self.database.runOnce, shared.recordFailure, address, when, forget)

    def clearFailures(self, address: str) -> Deferred[None]:
        return self.runInThread(self.database.run, shared.clearFailures, address)

    # -- ISharedKeys --

    def sharedKey(self, name: str) -> bytes:
        # Blocking, at start-up: a connection of its own fails at once if
        # the database is down (rather than after the pool's timeout).
        with self.database.connect(autocommit=True) as conn:
            try:
                return shared.sharedKey(conn, name)
            except Exception as e:
                if unreachable(e):
                    raise self.database.failure(e) from e
                raise

    # -- administration --

    def status(self) -> str:
        """
        One line: the database reached and its schema version (blocking).

        @raise popserv.errors.TemporaryFailure: the database cannot be reached.
        @raise ValueError: its schema is not this popserv's (the message says what to run).
        """
        try:  # one connection of its own: an answer at once, not after the pool's timeout
            with self.database.connect(autocommit=True) as conn:
                version = schemaVersion(conn)
        except TemporaryFailure as e:
            reason = str(e.__cause__).strip()
            raise TemporaryFailure(f"cannot reach the database: {reason}") from None
        if version < CURRENT:
            raise ValueError(
                f"database reached, schema version {version} but {CURRENT} is needed:"
                " run popserv db upgrade"
            )
        if version > CURRENT:
            raise ValueError(f"schema version {version} is newer than this popserv's {CURRENT}")
        return f"database reached, schema version {version}"

    def close(self) -> None:
        stop = getattr(self._serial, "stop", None)
        if stop is not None:
            stop()
        self.locks.close()
        self.database.close()
