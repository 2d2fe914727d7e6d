"""
Mail stored in PostgreSQL (C{--mail-location pgsql:URI}), so that any number
of stateless popserv nodes serve the same maildrops.

  - L{schema}: the tables, made and changed by numbered migrations only.
  - L{connections}: the bounded connection pool; unreachable is C{[SYS/TEMP]}.
  - L{locks}: maildrop locks, advisory locks on one connection per process.
  - L{store}: the store, its mailboxes, readers and login memory.
  - L{delivery}: deliveries, one streaming transaction each.

Bodies are stored as rows of 256 KiB chunks (table C{chunks}) rather than
large objects: rows are deleted with their message by a cascade in the same
transaction (large objects need their own unlink and leak when one is
missed), are replicated and dumped like any row, and a reader fetches one
chunk per query on any pooled connection, so RETR and TOP hold at most one
chunk in memory and no connection between reads. The listing's index
(C{maildrop, received, id} including C{uid, size}) answers STAT, LIST and
UIDL of a maildrop with one index-only scan.

A delivery stores the body in transfer form (L{popserv.octets}): what RETR
sends but the terminating "." line, CRLF line endings and byte-stuffed,
encoded once there instead of at every RETR, so that RETR passes the rows
through untouched and TOP only cuts them (C{messages.transfer_form}; the
rows stored before schema 5 hold the message as delivered and are encoded
as they are sent, as before). The listed size is the message's, counted
from the bytes delivered.
"""

from popserv.backends.pgsql.store import PgMailbox, PgStore

__all__ = ["PgStore", "PgMailbox"]
