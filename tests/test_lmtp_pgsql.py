"""
LMTP quotas through the PostgreSQL store, with the quotas from a pgsql
passdb's users table (real PostgreSQL, tests/pg.py).
"""

from __future__ import annotations

import pytest
from test_lmtp import connect, said, send
from test_pgsql import initialized, makeStore

from popserv.auth.pgsql import PgPassdb
from popserv.backends.pgsql.connections import Database
from popserv.threads import synchronously


@pytest.fixture
def setup(pgdatabase):
    uri = initialized(pgdatabase)
    store = makeStore(uri)
    store.database.run(
        lambda conn: conn.execute(
            "INSERT INTO users (name, password, quota_bytes, quota_messages)"
            " VALUES ('bob@example.org', '{PLAIN}x', 100, 2)"
        )
    )
    passdb = PgPassdb(Database(uri), runInThread=synchronously)
    yield store, passdb
    passdb.close()
    store.close()


def test_quotas_from_sql_enforced_on_the_pgsql_store(setup):
    store, passdb = setup
    proto, t, _ = connect(store, passdb)
    said(t)
    send(proto, t, b"LHLO c\r\n")
    assert send(proto, t, b"MAIL FROM:<> SIZE=101\r\nRCPT TO:<bob@example.org>\r\n") == [
        "250 2.1.0 Sender OK",
        "552 5.2.2 Message is larger than the mailbox quota",
    ]
    send(proto, t, b"RSET\r\n")
    for _ in range(2):
        send(proto, t, b"MAIL FROM:<>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
        assert send(proto, t, b"small\r\n.\r\n") == ["250 2.0.0 <bob@example.org> Saved"]
    assert send(proto, t, b"MAIL FROM:<>\r\nRCPT TO:<bob@example.org>\r\n")[-1] == (
        "452 4.2.2 Mailbox full, try again later"
    )
    assert store.usage("bob@example.org").result == (2, 14)
