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
    closes its socket and PostgreSQL ends the session at once. A node cut
    off by a partition is noticed by the server through its TCP keepalives
    (C{tcp_keepalives_idle}/C{_interval}/C{_count} in postgresql.conf, e.g.
    10/5/3: about 25 s) or C{tcp_user_timeout}; only then may another node
    open the maildrop. The node notices through its own keepalives (set on
    every connection, see L{popserv.backends.pgsql.connections}).
  - When the lock connection is lost, the next lock operation opens a new
    one and takes again every lock this process holds. A session whose lock
    was meanwhile taken by another node keeps running (it is logged), but
    its UPDATE removes nothing: L{AdvisoryLocks.check}, on the lock
    connection right before the removal, finds the lock not held and the
    session ends with C{[SYS/TEMP]}. So a lost lock can show a message to
    two clients but never lets two nodes remove from one maildrop at once
    (but for the instant between the check and the removal).
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

from twisted.logger import Logger

from popserv.errors import MaildropInUse, TemporaryFailure

__all__ = ["AdvisoryLocks", "lockKey"]

_log = Logger()


def lockKey(user: str) -> int:
    """The advisory lock key (a signed bigint) of C{user}'s maildrop."""
    digest = hashlib.blake2b(user.encode("utf-8"), digest_size=8, person=b"popserv").digest()
    return int.from_bytes(digest, "big", signed=True)


#: The lock, and the maildrop's id and change counter (if it exists).
_ACQUIRE = (
    "SELECT pg_try_advisory_lock(%s), d.id, d.changes"
    " FROM (SELECT 1) one LEFT JOIN maildrops d ON d.name = %s"
)

#: Whether this connection holds an advisory lock: pg_advisory_lock(bigint)
#: shows in pg_locks as the key's high and low 32 bits, objsubid 1.
_HOLDS = (
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
    " AND pid = pg_backend_pid() AND classid = %s::oid AND objid = %s::oid AND objsubid = 1)"
)


class AdvisoryLocks:
    """
    The maildrop locks of this process, on their one connection; every
    method blocks (call it from a thread) and is thread-safe.

    @param database: a L{popserv.backends.pgsql.connections.Database}.
    """

    def __init__(self, database: Any) -> None:
        self.database = database
        self._conn: Any = None
        self._held: set[str] = set()
        self._mutex = threading.Lock()

    def acquire(self, user: str) -> tuple[int, int] | None:
        """
        Lock C{user}'s maildrop, or fail with L{MaildropInUse} at once.

        @return: in the same round trip, the maildrop's id and change
            counter, or None if it has no maildrop yet.
        """
        with self._mutex:
            if user in self._held:
                raise MaildropInUse()
            row = self._query(_ACQUIRE, (lockKey(user), user))
            if not row[0]:
                raise MaildropInUse()
            self._held.add(user)
            return None if row[1] is None else (row[1], row[2])

    def release(self, user: str) -> None:
        """
        Unlock C{user}'s maildrop (a lost connection has unlocked it already).
        An unlock that cannot be confirmed drops the lock connection, which
        frees every lock of this process on the server, and takes the others
        again: a lock is never left behind until the process ends.
        """
        with self._mutex:
            if user not in self._held:
                return
            try:
                # False: not held on this connection (lost, and not taken again).
                self._query("SELECT pg_advisory_unlock(%s)", (lockKey(user),))
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

    def check(self, user: str) -> None:
        """
        Make sure this process still holds C{user}'s maildrop lock on the
        server (call it right before removing messages): a lost lock
        connection has freed it, and another node may have taken it since.

        @raise TemporaryFailure: it does not (or the database cannot say).
        """
        with self._mutex:
            key = lockKey(user) & 0xFFFFFFFFFFFFFFFF
            if user not in self._held or not self._query(_HOLDS, (key >> 32, key & 0xFFFFFFFF))[0]:
                _log.error("maildrop {user}: lock lost, nothing removed", user=user)
                raise TemporaryFailure()

    @property
    def held(self) -> frozenset[str]:
        return frozenset(self._held)

    def _query(self, sql: str, params: tuple[Any, ...]) -> Any:
        """
        C{sql}'s one row on the lock connection, (re)connected if need be.
        Any database error drops the connection; unreachable, or an error
        twice: L{TemporaryFailure}.
        """
        import psycopg

        for attempt in (1, 2):
            try:
                return self._connection().execute(sql, params).fetchone()
            except psycopg.Error as e:
                self._lost()
                if attempt == 2 or not isinstance(e, psycopg.OperationalError):
                    raise self.database.failure(e) from e
        raise AssertionError("unreachable")  # pragma: no cover

    def _connection(self) -> Any:
        if self._conn is None or self._conn.closed:
            self._conn = self.database.connect(autocommit=True)
            self._retake()
        return self._conn

    def _lost(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # pragma: no cover (closing a broken one)
                pass

    def _retake(self) -> None:
        """After a reconnection: take again the locks the sessions of this process hold."""
        for user in sorted(self._held):
            row = self._conn.execute(
                "SELECT pg_try_advisory_lock(%s)", (lockKey(user),)
            ).fetchone()
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
