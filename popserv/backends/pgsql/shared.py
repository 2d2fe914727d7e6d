"""
What the nodes of a PostgreSQL store share beyond mail (the blocking halves,
run in threads): failed logins per client address, so the auth penalty holds
across nodes (L{popserv.interfaces.IFailedLogins}), and small random keys
every node must agree on (L{popserv.interfaces.ISharedKeys}).
"""

from __future__ import annotations

import itertools
import secrets
from typing import Any

__all__ = ["recordFailure", "clearFailures", "sharedKey", "KEY_SIZE"]

KEY_SIZE = 32

#: Every this many failures a process also deletes the counts that expired.
_PRUNE_EVERY = 1024

_failures = itertools.count(1)

_RECORD = (
    "INSERT INTO auth_failures AS f (address, count, last) VALUES (%(address)s, 1, %(now)s)"
    " ON CONFLICT (address) DO UPDATE SET"
    " count = CASE WHEN f.last < %(now)s - %(forget)s THEN 1"
    " ELSE least(f.count + 1, 1000000) END,"
    " last = greatest(f.last, %(now)s)"
    " RETURNING count"
)


def recordFailure(conn: Any, address: str, now: float, forget: float) -> int:
    """One failure from C{address}: its count since the last success (one statement)."""
    values = {"address": address, "now": now, "forget": forget}
    count = conn.execute(_RECORD, values).fetchone()[0]
    if next(_failures) % _PRUNE_EVERY == 0:
        conn.execute("DELETE FROM auth_failures WHERE last < %s", (now - forget,))
    return int(count)


def clearFailures(conn: Any, address: str) -> None:
    conn.execute("DELETE FROM auth_failures WHERE address = %s", (address,))


def sharedKey(conn: Any, name: str) -> bytes:
    """The key C{name}: the first caller's random one, for every caller after it."""
    row = conn.execute(
        "INSERT INTO shared_keys (name, value) VALUES (%s, %s)"
        " ON CONFLICT (name) DO NOTHING RETURNING value",
        (name, secrets.token_bytes(KEY_SIZE)),
    ).fetchone()
    if row is None:  # someone made it first
        row = conn.execute("SELECT value FROM shared_keys WHERE name = %s", (name,)).fetchone()
    return bytes(row[0])
