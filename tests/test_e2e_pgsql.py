"""
End to end: C{twistd popserv --mail-location pgsql:URI} on a real PostgreSQL
(tests/pg.py), driven by poplib: a whole session, the maildrop lock, and a
database that goes away and comes back while popserv runs on.
"""

from __future__ import annotations

import poplib
import time

import pytest
from test_pgsql import deliver, initialized, listing, makeStore, result

from popserv.errors import MaildropInUse
from support import ServerProcess

MSG1 = b"From: a@example.org\nSubject: one\n\n.dotted line\nbody\n"
MSG2 = b"From: b@example.org\r\nSubject: two\r\n\r\n" + b"line\r\n" * 100_000


@pytest.fixture
def pgserver(tmp_path, pgdatabase):
    """popserv on a fresh database, users alice and bob ({PLAIN} passwords)."""
    initialized(pgdatabase)
    server = ServerProcess(tmp_path, {"alice": "{PLAIN}wonderland", "bob": "{PLAIN}builder"})
    server.config.write_text(
        server.config.read_text().replace(
            'mail_location = "maildir:mail/%d/%n/Maildir"',
            f'mail_location = "pgsql:{pgdatabase}"\npgsql_timeout = 2',
        )
    )
    store = makeStore(pgdatabase)
    server.store = store
    server.start()
    yield server
    server.stop()
    store.close()


def eventually(attempt, timeout=5.0):
    """C{attempt()} once the maildrop is free (a session releases it just after QUIT's reply)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return attempt()
        except (MaildropInUse, poplib.error_proto):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def login(server, user="alice", password="wonderland"):
    pop = poplib.POP3("127.0.0.1", server.port, timeout=10)
    pop.user(user)
    pop.pass_(password)
    return pop


def test_session_lists_retrieves_and_deletes(pgserver):
    store = pgserver.store
    first = deliver(store, [MSG1])
    second = deliver(store, [MSG2[:70_000], MSG2[70_000:]], uid="imported-2")
    pop = login(pgserver)
    count, total = pop.stat()
    _, sizes, _ = pop.list()
    _, uidls, _ = pop.uidl()
    assert [u.split()[1].decode() for u in uidls] == [first, second]
    for n, original in ((1, MSG1), (2, MSG2)):
        _, lines, _ = pop.retr(n)
        received = b"\r\n".join(lines) + b"\r\n"
        assert received == original.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        assert len(received) == int(sizes[n - 1].split()[1])
    assert count == 2 and total == sum(int(s.split()[1]) for s in sizes)
    _, top, _ = pop.top(2, 1)
    assert top == [b"From: b@example.org", b"Subject: two", b"", b"line"]
    pop.dele(1)
    pop.quit()
    assert [i.uid for i in listing(store)] == [second]


def test_second_session_gets_in_use(pgserver):
    pop = login(pgserver)
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        login(pgserver)  # the same node
    with pytest.raises(MaildropInUse):  # this process, as another node
        result(pgserver.store.openMailbox("alice"))
    pop.quit()
    mailbox = eventually(lambda: result(pgserver.store.openMailbox("alice")))  # another node's
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        login(pgserver)
    result(mailbox.close())
    eventually(lambda: login(pgserver)).quit()


def test_database_down_gives_sys_temp_then_recovers(pgserver, postgresql):
    deliver(pgserver.store, [MSG1])
    login(pgserver).quit()  # the pool and the lock connection are in use
    postgresql.stop()
    try:
        with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
            login(pgserver)
        with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
            login(pgserver, "bob", "builder")
    finally:
        postgresql.start()
    pop = eventually(lambda: login(pgserver), timeout=10)  # no restart of popserv
    assert pop.stat()[0] == 1
    pop.quit()
    assert pgserver.proc.poll() is None
