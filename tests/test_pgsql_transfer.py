"""
The PostgreSQL store keeps bodies in transfer form (what RETR sends but the
terminating "."), on a real PostgreSQL (tests/pg.py): what is stored, RETR and
TOP byte for byte as the Maildir store sends them, rows stored before schema
5 served as before, the upgrade that keeps them, and a migration out of it.
"""

from __future__ import annotations

import io
import os

import psycopg
import pytest
from test_pgsql import initialized, makeStore
from test_store_contract import crlf, deliver, listing

from popserv.admin import main
from popserv.backends.maildir import MaildirStore
from popserv.backends.pgsql.delivery import CHUNK
from popserv.backends.pgsql.schema import CURRENT, MIGRATIONS
from popserv.migrate import migrate
from popserv.testing import connect, memoryServer
from popserv.threads import synchronously

#: Messages as delivered, each as the writes that deliver it.
MESSAGES = [
    [b"Subject: dots\n\n.\n..\n.dot\n...three\nlast"],
    [b"Subject: crlf\r\n\r\nlone\rCR\r\r\nline\r", b"\n.split\r", b"\n.\n"],
    [b".first line\n\nbody\n"],
    [b""],
    [b"no header or body, no newline"],
    # Over several rows, a dot line and a CRLF across write boundaries.
    [
        b"Subject: big\n\n" + b"x" * (CHUNK - 20) + b"\n",
        b".at the boundary\r",
        b"\n" + b"y" * CHUNK,
    ],
    [b"H: 1\n\n" + b"line\n.line\n" * 60_000 + b"end\r\n"],
]


def pgStore(uri):
    return makeStore(initialized(uri))


def sessionBytes(store, commands: list[bytes]) -> list[bytes]:
    """Each command's whole response over the POP3 protocol, as a client reads it."""
    factory, _ = memoryServer({"alice": "secret"}, store=store)
    client = connect(factory)
    client.send(b"USER alice\r\nPASS secret\r\n")
    client.output()
    out = []
    for command in commands:
        client.send(command + b"\r\n")
        out.append(client.output())
    client.send(b"QUIT\r\n")
    return out


def commandsFor(count: int) -> list[bytes]:
    commands = [b"STAT", b"LIST"]
    for n in range(1, count + 1):
        commands.append(b"RETR %d" % n)
        commands += [b"TOP %d %d" % (n, lines) for lines in (0, 1, 2, 5, 100)]
    return commands


@pytest.fixture
def maildir(tmp_path):
    return MaildirStore(f"maildir:{tmp_path}/%n/Maildir", runInThread=synchronously)


@pytest.fixture
def store(pgdatabase):
    store = pgStore(pgdatabase)
    yield store
    store.close()


def stored(store, info):
    """The message's row flag and its body as its chunks hold it."""

    def query(conn):
        flag = conn.execute(
            "SELECT transfer_form FROM messages WHERE id = %s", (info.key,)
        ).fetchone()[0]
        rows = conn.execute(
            "SELECT data FROM chunks WHERE message = %s ORDER BY seq", (info.key,)
        ).fetchall()
        return flag, b"".join(bytes(r[0]) for r in rows)

    return store.database.run(query)


def test_a_delivery_is_stored_in_transfer_form(store):
    deliver(store, MESSAGES[0])
    deliver(store, MESSAGES[1])
    first, second = listing(store)
    one = b"Subject: dots\r\n\r\n..\r\n...\r\n..dot\r\n....three\r\nlast\r\n"
    two = b"Subject: crlf\r\n\r\nlone\rCR\r\r\nline\r\n..split\r\n..\r\n"
    assert stored(store, first) == (True, one)
    assert stored(store, second) == (True, two)
    # The listed size is still the message's, before stuffing: one less per stuffed line.
    assert (first.size, second.size) == (len(one) - 4, len(two) - 2)


def test_retr_and_top_send_what_the_maildir_store_sends(store, maildir):
    for writes in MESSAGES:
        deliver(store, writes)
        deliver(maildir, writes)
    commands = commandsFor(len(MESSAGES))
    fromPg = sessionBytes(store, commands)
    fromMaildir = sessionBytes(maildir, commands)
    for command, pg, md in zip(commands, fromPg, fromMaildir, strict=True):
        assert pg == md, command
    assert fromPg[2].startswith(b"+OK") and b"\r\n...\r\n" in fromPg[2]


def insertOldWay(conn, user: str, uid: str, chunks: list[bytes]) -> None:
    """A message as deliveries stored it before schema 5: the bytes as delivered."""
    maildrop = conn.execute(
        "INSERT INTO maildrops (name) VALUES (%s) ON CONFLICT (name)"
        " DO UPDATE SET name = EXCLUDED.name RETURNING id",
        (user,),
    ).fetchone()[0]
    body = b"".join(chunks)
    message = conn.execute(
        "INSERT INTO messages (maildrop, uid, size, received) VALUES (%s, %s, %s, 1e9)"
        " RETURNING id",
        (maildrop, uid, len(crlf(body))),
    ).fetchone()[0]
    for seq, data in enumerate(chunks):
        conn.execute(
            "INSERT INTO chunks (message, seq, data) VALUES (%s, %s, %s)", (message, seq, data)
        )


OLD = [b"Subject: old\r", b"\n\r\n.dot\n.", b".\nlone\r", b"\rend"]


def test_a_row_stored_the_old_way_is_served_as_before(store, maildir):
    with psycopg.connect(store.uri) as conn:
        insertOldWay(conn, "alice", "old", OLD)
    deliver(maildir, [b"".join(OLD)])
    (info,) = listing(store)
    assert stored(store, info) == (False, b"".join(OLD))
    commands = commandsFor(1)
    assert sessionBytes(store, commands) == sessionBytes(maildir, commands)


def test_upgrade_from_4_keeps_old_rows(pgdatabase, maildir, capsys):
    with psycopg.connect(pgdatabase) as conn:  # what popserv db init made at version 4
        conn.execute(
            "CREATE TABLE popserv_schema_version ("
            " version integer PRIMARY KEY, applied timestamptz NOT NULL DEFAULT now())"
        )
        for version, sql in enumerate(MIGRATIONS[:4], 1):
            conn.execute(sql)
            conn.execute("INSERT INTO popserv_schema_version (version) VALUES (%s)", (version,))
        insertOldWay(conn, "alice", "old", OLD)
    location = ["--mail-location", f"pgsql:{pgdatabase}"]
    assert main(["db", "status", *location]) == 1
    assert "schema version 4" in capsys.readouterr().out
    assert main(["db", "upgrade", *location]) == 0
    assert f"schema version {CURRENT} (was 4)" in capsys.readouterr().out
    assert CURRENT == 5
    store = makeStore(pgdatabase)
    try:
        deliver(store, [b"Subject: new\n\n.new\n"])
        old, new = listing(store)
        assert old.uid == "old" and stored(store, old) == (False, b"".join(OLD))
        assert stored(store, new) == (True, b"Subject: new\r\n\r\n..new\r\n")
        deliver(maildir, [b"".join(OLD)])
        deliver(maildir, [b"Subject: new\n\n.new\n"])
        commands = commandsFor(2)
        assert sessionBytes(store, commands) == sessionBytes(maildir, commands)
    finally:
        store.close()


def test_migrate_into_maildir_gives_the_messages_not_their_transfer_form(store, tmp_path):
    for writes in MESSAGES:
        deliver(store, writes)
    with psycopg.connect(store.uri) as conn:
        insertOldWay(conn, "alice", "old", OLD)
    target = MaildirStore(f"maildir:{tmp_path}/target/%n", runInThread=synchronously)
    out = io.StringIO()
    assert migrate(store, target, ["alice"], out) == 0, out.getvalue()
    assert "differs" not in out.getvalue()
    infos = listing(target)
    assert [i.size for i in infos] == [i.size for i in listing(store)]
    directory = tmp_path / "target" / "alice" / "new"
    bodies = sorted((directory / name).read_bytes() for name in os.listdir(directory))
    # Delivered ones as RETR sends them unstuffed (CRLF); the old row as it was stored.
    expected = sorted([crlf(b"".join(w)) for w in MESSAGES] + [b"".join(OLD)])
    assert bodies == expected
