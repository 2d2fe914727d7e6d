"""
Maildrop locks: PostgreSQL session-level advisory locks, all held on ONE
dedicated connection per process (as the Maildir store holds all its locks
on one descriptor), not one connection per POP3 session.

  - The key of a maildrop is a 64-bit hash of its user name (BLAKE2b); two
    names sharing a key (odds 2**-64 per pair) would merely lock each other.
  - Advisory locks are re-entrant on one connection, so the process keeps
    its own set of the maildrops it holds: a second session on the same
    node is refused from that set, one on another node by PostgreSQL.
  - A lock frees itself when its holder goes: a node that dies (SIGKILL)
    closes its socket and PostgreSQL ends the session at once.
  - The lock connection never makes logins queue behind a dead or cut-off
    database: a login waits at most C{timeout} for it (else C{[SYS/TEMP]});
    a query on it that outlasts C{timeout} is ended by shutting its socket
    down (L{_Deadline}), as no TCP timer would end it in time; and after a
    failed reconnection the next second of logins fails at once rather than
    each trying again. The first lock operation after that reconnects and
    takes again every lock this process holds: recovery needs nothing else.
  - A network partition: the node sees its lock query fail after
    C{timeout} (above) and its idle pooled connections die by their TCP
    keepalives (L{popserv.backends.pgsql.connections}). PostgreSQL sees the
    node's lock session die by its own keepalives, which the lock connection
    sets to 10/5/3 (about 25 s) where postgresql.conf leaves the system's
    (two hours): only then are its locks freed and may another node open
    its maildrops.
  - When the lock connection is lost, a session whose lock was meanwhile
    taken by another node keeps running (it is logged), but its UPDATE
    removes nothing: see L{AdvisoryLocks.remove}, which checks the
    lock and removes in one statement, behind a barrier that another node
    taking the lock waits for.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from typing import Any

from twisted.logger import Logger

from popserv.backends.pgsql.prepared import Prepared, boolean, integer
from popserv.errors import MaildropInUse, TemporaryFailure

__all__ = ["AdvisoryLocks", "lockKey"]

_log = Logger()

#: Seconds after a failed reconnection during which lock operations fail at
#: once instead of each trying again.
RECONNECT_DELAY = 1.0


def lockKey(user: str) -> int:
    """The advisory lock key (a signed bigint) of C{user}'s maildrop."""
    digest = hashlib.blake2b(user.encode("utf-8"), digest_size=8, person=b"popserv").digest()
    return int.from_bytes(digest, "big", signed=True)


def _halves(key: int) -> tuple[int, int]:
    """C{key} as two signed int4: the removal barrier's key, in the (int4, int4)
    lock space, which is apart from the bigint one of the maildrop locks."""
    hi, lo = _unsignedHalves(key)
    return hi - (hi >> 31 << 32), lo - (lo >> 31 << 32)


#: The lock, and the maildrop's id and change counter (if it exists). The
#: first column is NULL when the lock is taken, false when it was free but a
#: removal by a node that just lost it is still running (see L{_SETTLE}).
_ACQUIRE = Prepared(
    "acquire",
    "SELECT CASE WHEN pg_try_advisory_lock($1::int8)"
    " THEN pg_try_advisory_xact_lock_shared($2::int4, $3::int4)"
    " END, d.id, d.changes FROM (SELECT 1) one LEFT JOIN maildrops d ON d.name = $4::text",
)

#: True, or false if not held on this connection (lost, and not taken again).
_RELEASE = Prepared("release", "SELECT pg_advisory_unlock($1::int8)")

#: Wait for that removal to end (its own statement: the next one's snapshot
#: then sees what it removed).
_SETTLE = "SELECT pg_advisory_xact_lock_shared(%s, %s) IS NULL"

_MAILDROP = "SELECT true, d.id, d.changes FROM (SELECT 1) one LEFT JOIN maildrops d ON d.name = %s"

#: Whether backend C{pid} holds an advisory lock: pg_advisory_lock(bigint)
#: shows in pg_locks as the key's high and low 32 bits, objsubid 1.
_HELD_BY = (
    "EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
    " AND pid = %(pid)s AND classid = %(hi)s::oid AND objid = %(lo)s::oid AND objsubid = 1)"
)

_HOLDS = "SELECT " + _HELD_BY.replace("%(pid)s", "pg_backend_pid()")

#: The removal: the barrier, then the check, then the DELETE, in one
#: statement and so one transaction (see L{AdvisoryLocks.remove}).
_REMOVE = (
    "WITH ok AS MATERIALIZED (SELECT CASE WHEN pg_advisory_xact_lock(%(b1)s, %(b2)s) IS NULL"
    " THEN false ELSE " + _HELD_BY + " END AS held),"
    " gone AS (DELETE FROM messages WHERE maildrop = %(maildrop)s AND id = ANY(%(ids)s)"
    " AND (SELECT held FROM ok))"
    " SELECT held FROM ok"
)

#: The server's TCP keepalives on the lock session, where postgresql.conf
#: leaves the system's: a node cut off frees its locks within about 25 s.
_KEEPALIVES = (
    "SELECT CASE WHEN current_setting('tcp_keepalives_idle')::int = 0 THEN"
    " set_config('tcp_keepalives_idle', '10', false) END,"
    " CASE WHEN current_setting('tcp_keepalives_interval')::int = 0 THEN"
    " set_config('tcp_keepalives_interval', '5', false) END,"
    " CASE WHEN current_setting('tcp_keepalives_count')::int = 0 THEN"
    " set_config('tcp_keepalives_count', '3', false) END"
)


class _Deadline:
    """
    Ends a query on the lock connection that outlasts C{seconds}: a
    watchdog thread shuts its socket down, and the blocked call fails at
    once. Nothing else would end it in time: TCP keepalives start only on
    an idle socket and take half a minute, and a server that hangs answers
    them. One thread, started at first use, asleep while no query runs.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._cond = threading.Condition(threading.Lock())
        self._fd = -1
        self._due = 0.0
        self._fired = False
        self._thread: threading.Thread | None = None
        self._idle = False
        self._closed = False

    def arm(self, fd: int) -> None:
        with self._cond:
            self._fd, self._due, self._fired = fd, time.monotonic() + self.seconds, False
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._watch, name="popserv-pgsql-lock-deadline", daemon=True
                )
                self._thread.start()
            elif self._idle:
                self._cond.notify()

    def disarm(self) -> bool:
        """The query ended; whether it was ended by the deadline."""
        with self._cond:
            self._fd = -1
            return self._fired

    def _watch(self) -> None:
        with self._cond:
            while not self._closed:
                if self._fd < 0:
                    self._idle = True
                    self._cond.wait()
                    self._idle = False
                    continue
                left = self._due - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                # Still armed, so the connection (and its descriptor) is open.
                try:
                    with socket.socket(fileno=os.dup(self._fd)) as sock:
                        sock.shutdown(socket.SHUT_RDWR)
                except OSError as e:  # pragma: no cover (already shut)
                    _log.debug("lock connection deadline: {error}", error=e)
                self._fired = True
                self._fd = -1

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()


class AdvisoryLocks:
    """
    The maildrop locks of this process, on their one connection; every
    method blocks (call it from a thread) and is thread-safe.

    @param database: a L{popserv.backends.pgsql.connections.Database}.
    @param timeout: seconds a lock operation may wait for the lock
        connection, and a query on it may take (default: the database's).
    """

    def __init__(self, database: Any, timeout: float | None = None) -> None:
        self.database = database
        self.timeout = float(database.timeout if timeout is None else timeout)
        self._conn: Any = None
        self._pid: int | None = None
        self._held: set[str] = set()
        self._mutex = threading.Lock()
        self._deadline = _Deadline(self.timeout)
        self._retryAt = 0.0

    def _enter(self) -> None:
        """Take the mutex, waiting at most C{timeout}: a lock connection that is
        reconnecting or stuck must not make logins queue."""
        if not self._mutex.acquire(timeout=self.timeout):
            _log.warn("maildrop locks: lock connection busy (database slow or cut off)")
            raise TemporaryFailure()

    def acquire(self, user: str) -> tuple[int, int] | None:
        """
        Lock C{user}'s maildrop, or fail with L{MaildropInUse} at once.

        @return: in the same round trip, the maildrop's id and change
            counter, or None if it has no maildrop yet.
        """
        self._enter()
        try:
            if user in self._held:
                raise MaildropInUse()
            key = lockKey(user)
            barrier = _halves(key)
            hi, lo = barrier
            raw = self._query(_ACQUIRE, (b"%d" % key, b"%d" % hi, b"%d" % lo, user.encode()))
            row = (boolean(raw[0]), integer(raw[1]), integer(raw[2]))
            if row[0] is None:
                raise MaildropInUse()
            self._held.add(user)
            if not row[0]:
                # A node that lost this lock is removing: wait for its commit.
                try:
                    self._query(_SETTLE, barrier)
                    row = self._query(_MAILDROP, (user,))
                except BaseException:
                    self._held.discard(user)  # a failed query dropped the connection
                    raise
            return None if row[1] is None else (row[1], row[2])
        finally:
            self._mutex.release()

    def release(self, user: str) -> None:
        """
        Unlock C{user}'s maildrop (a lost connection has unlocked it already).
        An unlock that cannot be confirmed drops the lock connection, which
        frees every lock of this process on the server, and takes the others
        again: a lock is never left behind until the process ends.

        Unlike the other operations it waits for the mutex as long as it
        takes (whoever holds it is bounded by the query deadline): an unlock
        given up would keep the maildrop locked, here and on every node,
        for as long as the process lives.
        """
        self._mutex.acquire()
        try:
            if user not in self._held:
                return
            try:
                self._query(_RELEASE, (b"%d" % lockKey(user),))
            except Exception as e:
                _log.warn("cannot unlock maildrop {user}: {error}", user=user, error=e)
                self._held.discard(user)
                self._lost()
                try:
                    self._query("SELECT 1", ())  # reconnect: take the others again
                except Exception as e:
                    _log.warn("cannot take the maildrop locks again: {error}", error=e)
            else:
                self._held.discard(user)
        finally:
            self._mutex.release()

    def check(self, user: str) -> None:
        """
        Make sure this process still holds C{user}'s maildrop lock on the
        server: a lost lock connection has freed it, and another node may
        have taken it since.

        @raise TemporaryFailure: it does not (or the database cannot say).
        """
        self._enter()
        try:
            hi, lo = _unsignedHalves(lockKey(user))
            if user not in self._held or not self._query(_HOLDS, {"hi": hi, "lo": lo})[0]:
                _log.error("maildrop {user}: lock lost, nothing removed", user=user)
                raise TemporaryFailure()
        finally:
            self._mutex.release()

    def remove(self, user: str, maildrop: int, ids: list[int]) -> None:
        """
        Remove messages C{ids} of C{user}'s maildrop (on a pooled
        connection), only while this process holds the maildrop's lock.

        Why one statement with a barrier rather than a check on the lock
        connection before the DELETE: that check is stale as soon as it is
        answered; the lock session may die right after it, and another node
        take the maildrop and list it while the DELETE runs. Nor can the
        DELETE's transaction take the maildrop lock itself
        (C{pg_try_advisory_xact_lock} on its key): our own lock session
        holds that key. So the statement (L{_REMOVE}) first takes the
        maildrop's removal barrier, a transaction-scoped lock on a second
        key, then checks in C{pg_locks} that our lock session still holds
        the maildrop lock, and deletes only if so; the barrier is held until
        the statement commits. A node that takes the maildrop lock takes the
        barrier too (shared) before it lists: it waits for this removal to
        commit, and then sees it. One statement is one transaction: a node
        that dies midway removes all of the messages or none; run again, it
        removes nothing twice.

        A lock connection that was lost is first reconnected (taking the
        lock again if nobody took it meanwhile) and the removal tried once
        more.

        @raise TemporaryFailure: the lock is not held (nothing was removed).
        """
        for attempt in (1, 2):
            if self.database.run(self._remove, user, maildrop, ids):
                return
            if attempt == 1:
                self.check(user)  # reconnected, the lock taken again: or it raises
        _log.error("maildrop {user}: lock lost, nothing removed", user=user)
        raise TemporaryFailure()

    def _remove(self, conn: Any, user: str, maildrop: int, ids: list[int]) -> bool:
        pid = self._pid if user in self._held else None
        if pid is None:
            return False
        key = lockKey(user)
        hi, lo = _unsignedHalves(key)
        b1, b2 = _halves(key)
        values = {"b1": b1, "b2": b2, "pid": pid, "hi": hi, "lo": lo}
        values.update(maildrop=maildrop, ids=ids)
        return bool(conn.execute(_REMOVE, values).fetchone()[0])

    @property
    def held(self) -> frozenset[str]:
        return frozenset(self._held)

    def _query(self, sql: str | Prepared, params: Any) -> Any:
        """
        C{sql}'s one row on the lock connection, (re)connected if need be.
        Any database error drops the connection; unreachable, an error
        twice, or a query ended by its deadline: L{TemporaryFailure}.
        """
        import psycopg

        for attempt in (1, 2):
            try:
                return self._execute(self._connection(), sql, params)
            except psycopg.Error as e:
                self._lost()
                if attempt == 2 or not isinstance(e, psycopg.OperationalError):
                    raise self.database.failure(e) from e
        raise AssertionError("unreachable")  # pragma: no cover

    def _execute(self, conn: Any, sql: str | Prepared, params: Any) -> Any:
        import psycopg

        self._deadline.arm(conn.fileno())
        try:
            if isinstance(sql, Prepared):
                row = sql.row(conn, params)
            else:
                row = conn.execute(sql, params).fetchone()
        except psycopg.Error as e:
            if self._deadline.disarm():
                self._lost()
                raise self.database.failure(
                    TimeoutError(f"the lock connection gave no answer in {self.timeout:g} s")
                ) from e
            raise
        self._deadline.disarm()
        return row

    def _connection(self) -> Any:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        self._lost()
        if time.monotonic() < self._retryAt:
            raise TemporaryFailure()  # the failed attempt was logged
        try:
            conn = self.database.connect(autocommit=True)
        except TemporaryFailure:
            self._retryAt = time.monotonic() + RECONNECT_DELAY
            raise
        self._conn, self._pid = conn, conn.info.backend_pid
        self._execute(conn, _KEEPALIVES, ())
        self._retake()
        return conn

    def _lost(self) -> None:
        conn, self._conn, self._pid = self._conn, None, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # pragma: no cover (closing a broken one)
                pass

    def _retake(self) -> None:
        """After a reconnection: take again the locks the sessions of this process hold."""
        for user in sorted(self._held):
            row = self._execute(self._conn, "SELECT pg_try_advisory_lock(%s)", (lockKey(user),))
            if not row[0]:
                _log.error(
                    "maildrop {user}: lock lost with the database connection and "
                    "taken meanwhile by another node; its session goes on",
                    user=user,
                )

    def close(self) -> None:
        with self._mutex:
            self._held.clear()
            self._lost()
        self._deadline.close()


def _unsignedHalves(key: int) -> tuple[int, int]:
    """The high and low 32 bits of C{key}, as pg_locks shows a bigint key."""
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    return unsigned >> 32, unsigned & 0xFFFFFFFF
