"""
The PostgreSQL store (C{pgsql:}) on a real PostgreSQL (tests/pg.py): the
store contract, the schema commands, locks, and a server that outlives its
database going away.
"""

from __future__ import annotations

import hashlib
import sys
import time

import pytest
from test_store_contract import (  # noqa: F401 (run here again, for pgsql)
    crlf,
    deliver,
    listing,
    read,
    result,
    test_abort_leaves_nothing,
    test_delivery_streams_and_is_visible_only_at_commit,
    test_delivery_while_a_session_holds_the_maildrop,
    test_duplicate_uid_is_refused_and_leaves_nothing,
    test_every_provider_verifies,
    test_given_uid_and_received_are_kept_and_listed_next_session,
    test_invalid_uid_is_refused,
    test_uid_of_an_earlier_ordinary_delivery_is_refused,
)
from twisted.internet.defer import Deferred

from popserv.admin import main
from popserv.backends.pgsql.schema import CURRENT
from popserv.errors import MaildropInUse, PermanentFailure, TemporaryFailure
from popserv.interfaces import ILoginMemory
from popserv.octets import TransferDecoder, crlfSize
from popserv.threads import synchronously


def initialized(uri: str) -> str:
    assert main(["db", "init", "--mail-location", f"pgsql:{uri}"]) == 0
    return uri


def makeStore(uri: str, **kw):
    from popserv.backends.pgsql import PgStore

    kw.setdefault("runInThread", synchronously)
    return PgStore(uri, **kw)


class Pgsql:
    #: The message as read back: decoded from transfer form, CRLF line endings.
    given = staticmethod(crlf)

    def __init__(self, uri):
        self.uri = initialized(uri)
        self.store = makeStore(uri)

    def leftovers(self, user="alice"):
        """Body rows of no message (a delivery's traces)."""
        rows = self.store.database.run(
            lambda conn: conn.execute(
                "SELECT count(*) FROM chunks c WHERE NOT EXISTS"
                " (SELECT 1 FROM messages m WHERE m.id = c.message)"
            ).fetchone()
        )
        return [] if rows[0] == 0 else [rows[0]]


@pytest.fixture
def kind(pgdatabase):
    kind = Pgsql(pgdatabase)
    yield kind
    kind.store.close()


@pytest.fixture
def store(pgdatabase):
    store = makeStore(initialized(pgdatabase))
    yield store
    store.close()


# -- schema ----------------------------------------------------------------------------


def test_db_commands(pgdatabase, capsys):
    location = ["--mail-location", f"pgsql:{pgdatabase}"]
    assert main(["db", "status", *location]) == 1
    assert "schema version 0" in capsys.readouterr().out
    assert main(["db", "init", *location]) == 0
    assert main(["db", "init", *location]) == 1  # not twice
    assert main(["db", "upgrade", *location]) == 0
    assert "(unchanged)" in capsys.readouterr().out
    assert main(["db", "status", *location]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["db", "status", "--mail-location", "maildir:/tmp/x"]) == 64


def test_db_init_by_a_role_that_may_not_create_tables_is_one_line(postgresql, pgdatabase, capsys):
    """PostgreSQL 15+: a role that does not own the database may not create in public."""
    postgresql.execute(
        "DO $$BEGIN CREATE ROLE mailer LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END$$"
    )
    uri = pgdatabase.replace("user=postgres", "user=mailer")
    assert uri != pgdatabase
    assert main(["db", "init", "--mail-location", f"pgsql:{uri}"]) == 1
    assert "the database refused: permission denied" in capsys.readouterr().err


def test_check_config_reports_the_database(pgdatabase, tmp_path, capsys):
    (tmp_path / "passwd").write_text("alice:{PLAIN}x\n")
    config = tmp_path / "popserv.conf"
    config.write_text(f'passwd = "passwd"\nmail_location = "pgsql:{pgdatabase}"\n')
    assert main(["check-config", "--config", str(config)]) == 1
    assert "run popserv db upgrade" in capsys.readouterr().out
    initialized(pgdatabase)
    assert main(["check-config", "--config", str(config)]) == 0
    assert f"database reached, schema version {CURRENT}" in capsys.readouterr().out
    config.write_text(
        'passwd = "passwd"\nmail_location = "pgsql:postgresql:///x?host=/nonexistent"\n'
    )
    assert main(["check-config", "--config", str(config)]) == 1
    assert "cannot reach the database" in capsys.readouterr().out


def test_deliver_command(pgdatabase, monkeypatch, capsys):
    import io

    initialized(pgdatabase)
    stdin = io.TextIOWrapper(io.BytesIO(b"Subject: hi\n\nbody\n"))
    monkeypatch.setattr(sys, "stdin", stdin)
    assert main(["deliver", "-v", "carol", "--mail-location", f"pgsql:{pgdatabase}"]) == 0
    uid = capsys.readouterr().out.split()[-1]
    store = makeStore(pgdatabase)
    try:
        (info,) = listing(store, "carol")
        assert info.uid == uid and info.size == 21
    finally:
        store.close()


# -- the store -------------------------------------------------------------------------


def test_big_message_is_chunked_and_read_back(store):
    from popserv.backends.pgsql.delivery import CHUNK

    body = bytes(range(256)) * (CHUNK * 3 // 256) + b"tail\n"
    deliver(store, [body[i : i + 100_000] for i in range(0, len(body), 100_000)])
    (info,) = listing(store)
    chunks = store.database.run(
        lambda conn: conn.execute("SELECT count(*) FROM chunks WHERE message = %s", (info.key,))
    ).fetchone()[0]
    assert chunks == 4
    assert read(store, info) == crlf(body)


def test_reading_a_big_message_holds_a_few_rows_at_a_time(store):
    """RETR of a big message: at most 2 MiB of it in memory at once (here 12 MiB)."""
    import tracemalloc

    from popserv.backends.pgsql.delivery import CHUNK

    piece = bytes(range(256)) * 4096
    deliver(store, [piece] * 12)
    (info,) = listing(store)
    mailbox = result(store.openMailbox("alice"))
    try:
        tracemalloc.start()
        reader = result(mailbox.openMessage(info))
        decoder, sha, total = TransferDecoder(), hashlib.sha256(), 0
        while data := result(reader.read(CHUNK)):
            data = decoder.feed(data)
            sha.update(data)
            total += len(data)
        reader.close()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    finally:
        result(mailbox.close())
    assert total == info.size == len(crlf(piece * 12))
    assert sha.digest() == hashlib.sha256(crlf(piece * 12)).digest()
    assert peak <= 2 * 1024 * 1024, peak


def test_open_deliveries_hold_no_connection(pgdatabase):
    """
    15 deliveries streaming at once (an LMTP DATA to 15 recipients) on a pool of
    10 connections: the store still serves a login and a listing at once, and all
    15 are stored at commit.
    """
    from popserv.backends.pgsql.connections import DEFAULT_POOL_SIZE
    from popserv.backends.pgsql.delivery import CHUNK

    store = makeStore(initialized(pgdatabase), timeout=1)
    writers = []
    try:
        deliver(store, [b"waiting\n"], user="bob")
        n = DEFAULT_POOL_SIZE + 5
        for i in range(n):
            writers.append(result(store.deliverMessage(f"user{i}")))
        bodies = [f"Subject: {i}\n\n".encode() + b"x" * (CHUNK + i) for i in range(n)]
        for writer, body in zip(writers, bodies, strict=True):
            result(writer.write(body[:100]))
            result(writer.write(body[100:]))  # past a chunk: spooled in a thread
        started = time.monotonic()
        mailbox = result(store.openMailbox("bob"))
        assert [i.size for i in result(mailbox.listMessages())] == [9]
        result(mailbox.close())
        assert time.monotonic() - started < 0.5
        uids = [result(writer.commit()) for writer in writers]
        assert len(set(uids)) == n
        for i, body in enumerate(bodies):
            (info,) = listing(store, f"user{i}")
            assert info.uid == uids[i] and info.size == crlfSize(body)
        assert read(store, info, f"user{n - 1}") == crlf(bodies[-1])
        writers = []
    finally:
        for writer in writers:
            result(writer.abort())
        store.close()


def test_a_write_made_while_another_is_in_flight_waits_its_turn(pgdatabase):
    """Writes keep their order even when the caller does not wait for each one."""
    from twisted.internet.defer import Deferred, maybeDeferred

    from popserv.backends.pgsql.delivery import CHUNK

    held = []

    def later(f, *args):  # a thread pool that runs work when the test says so
        d = Deferred()
        held.append((f, args, d))
        return d

    def runHeld():
        while held:
            f, args, d = held.pop(0)
            maybeDeferred(f, *args).chainDeferred(d)

    store = makeStore(initialized(pgdatabase), runInThread=later)
    try:
        first, second, third = b"a" * CHUNK, b"small\n", b"b" * CHUNK
        opened = store.deliverMessage("alice")
        runHeld()
        writer = result(opened)
        done = [writer.write(first), writer.write(second), writer.write(third)]
        committed = writer.commit()
        runHeld()
        for d in done:
            result(d)
        uid = result(committed)
        store.runInThread = synchronously
        (info,) = listing(store)
        assert info.uid == uid and info.size == crlfSize(first + second + third)
        if read(store, info) != crlf(first + second + third):
            pytest.fail("the body's pieces were stored out of order")
    finally:
        store.close()


def test_update_removes_exactly_the_marked_messages(store):
    uids = [deliver(store, [f"m{i}\n".encode()]) for i in range(5)]
    mailbox = result(store.openMailbox("alice"))
    infos = result(mailbox.listMessages())
    assert [i.uid for i in infos] == uids
    assert result(mailbox.removeMessages([infos[1], infos[3]])) == []
    result(mailbox.close())
    assert [i.uid for i in listing(store)] == [uids[0], uids[2], uids[4]]
    assert (
        store.database.run(lambda c: c.execute("SELECT count(*) FROM chunks").fetchone())[0] == 3
    )


def test_listing_is_in_delivery_order_ties_by_id(store):
    """Ordered by delivery time, then id, whatever order the ids came in (imports)."""
    times = [200.0, 100.0, 100.5, 100.0, 300.0, 50.25]
    uids = [deliver(store, [b"m%d\n" % i], received=t) for i, t in enumerate(times)]
    expected = store.database.run(
        lambda c: c.execute(
            "SELECT uid, size, id, received FROM messages ORDER BY received, id"
        ).fetchall()
    )
    got = listing(store)
    assert [tuple(info) for info in got] == [tuple(row) for row in expected]
    assert [info.uid for info in got] == [uids[i] for i in (5, 1, 3, 2, 0, 4)]
    assert [info.received for info in got] == sorted(times)


def test_listing_order_check():
    from array import array

    from popserv.backends.pgsql.store import _inOrder

    assert _inOrder(array("d", [1, 2, 2, 3]), array("q", [1, 2, 3, 4]))
    assert _inOrder(array("d", [1, 2, 2, 3]), array("q", [9, 2, 3, 1]))  # ids of imports
    assert not _inOrder(array("d", [1, 2, 2, 3]), array("q", [1, 3, 2, 4]))  # a tie misordered
    assert not _inOrder(array("d", [1, 3, 2]), array("q", [1, 2, 3]))
    assert _inOrder(array("d"), array("q"))


def test_kept_listing_follows_changes_made_by_another_node(store, pgdatabase):
    """A node lists an unchanged maildrop from memory, anything another node changed anew."""
    other = makeStore(pgdatabase)
    try:
        first = deliver(store, [b"one\n"])
        assert [i.uid for i in listing(store)] == [first]
        mailbox = result(store.openMailbox("alice"))
        kept = mailbox.listMessages()
        assert not isinstance(kept, Deferred) and [i.uid for i in kept] == [first]  # no query
        result(mailbox.close())
        second = deliver(other, [b"two\n"])  # another node delivers
        assert [i.uid for i in listing(store)] == [first, second]
        mailbox = result(other.openMailbox("alice"))  # another node removes
        result(mailbox.removeMessages(result(mailbox.listMessages())[:1]))
        result(mailbox.close())
        assert [i.uid for i in listing(store)] == [second]
    finally:
        other.close()


def test_missing_maildrop_is_refused_without_create(pgdatabase):
    strict = makeStore(initialized(pgdatabase), createMissing=False)
    try:
        with pytest.raises(PermanentFailure):
            result(strict.openMailbox("nobody"))
        assert strict.locks.held == frozenset()
    finally:
        strict.close()


def test_list_maildrops_and_login_memory(store):
    deliver(store, [b"x\n"], user="bob")
    listing(store, "alice@example.org")
    assert list(result(store.listMaildrops())) == ["alice@example.org", "bob"]
    assert ILoginMemory.providedBy(store)
    assert result(store.lastLogin("bob")) is None
    result(store.recordLogin("bob", 1_700_000_000.5))
    result(store.recordLogin("bob", 1_700_000_001.5))
    assert result(store.lastLogin("bob")) == 1_700_000_001.5


def test_lock_in_one_process_and_across_processes(store, pgdatabase):
    first = result(store.openMailbox("alice"))
    with pytest.raises(MaildropInUse):  # same process: its own set of held maildrops
        result(store.openMailbox("alice"))
    other = makeStore(pgdatabase)  # another lock connection: as another node
    try:
        with pytest.raises(MaildropInUse):
            result(other.openMailbox("alice"))
        result(other.openMailbox("bob")).close()
        result(first.close())
        result(other.openMailbox("alice")).close()
    finally:
        other.close()


def test_lock_of_a_killed_process_frees_itself(store, pgdatabase):
    import subprocess

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from popserv.backends.pgsql import PgStore\n"
            "from popserv.threads import synchronously\n"
            "s = PgStore(sys.argv[1], runInThread=synchronously)\n"
            "s.openMailbox('alice')\n"
            "print('locked', flush=True)\n"
            "time.sleep(60)\n",
            pgdatabase,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(MaildropInUse):
            result(store.openMailbox("alice"))
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 10
    while True:
        try:
            result(store.openMailbox("alice")).close()
            break
        except MaildropInUse:
            assert time.monotonic() < deadline, "the lock was not freed"
            time.sleep(0.05)


def recovered(attempt, within=10.0):
    """C{attempt()}'s result once the database, just started again, answers."""
    deadline = time.monotonic() + within
    while True:
        try:
            return attempt()
        except TemporaryFailure:
            assert time.monotonic() < deadline, "no recovery"
            time.sleep(0.1)


def test_database_down_is_a_temporary_failure_then_recovers(postgresql, pgdatabase):
    store = makeStore(initialized(pgdatabase), timeout=1)
    try:
        deliver(store, [b"kept\n"])
        held = result(store.openMailbox("bob"))  # its lock goes with the database
        postgresql.stop()
        try:
            with pytest.raises(TemporaryFailure):
                result(store.openMailbox("alice"))
            with pytest.raises(TemporaryFailure):
                result(store.deliverMessage("alice"))
        finally:
            postgresql.start()
        (info,) = recovered(lambda: listing(store))  # no new store needed
        assert read(store, info) == b"kept\r\n"
        other = makeStore(pgdatabase)
        try:
            with pytest.raises(MaildropInUse):  # re-taken on the new lock connection
                result(other.openMailbox("bob"))
            result(held.close())
            result(other.openMailbox("bob")).close()
        finally:
            other.close()
    finally:
        store.close()


def terminate(store, pid: int) -> None:
    """End backend C{pid} from one of C{store}'s pooled connections, and wait until it is gone."""

    def kill(conn):
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        deadline = time.monotonic() + 10
        while conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone():
            assert time.monotonic() < deadline, "backend not terminated"
            time.sleep(0.02)

    store.database.run(kill)


def test_lock_key_shows_in_pg_locks_as_checked(store):
    """The check of a held lock matches the key as PostgreSQL shows it (both signs)."""
    for user in ("alice", "bob", "carol", "dave"):
        mailbox = result(store.openMailbox(user))
        store.locks.check(user)
        result(mailbox.close())
        with pytest.raises(TemporaryFailure):
            store.locks.check(user)


def test_update_after_a_lost_and_taken_lock_removes_nothing(store, pgdatabase):
    """Another node took the maildrop while the lock connection was lost: no removal."""
    uids = [deliver(store, [f"m{i}\n".encode()]) for i in range(2)]
    mailbox = result(store.openMailbox("alice"))
    infos = result(mailbox.listMessages())
    other = makeStore(pgdatabase)
    try:
        terminate(other, store.locks._conn.info.backend_pid)  # the server frees the lock
        taken = result(other.openMailbox("alice"))  # another node serves the maildrop
        with pytest.raises(TemporaryFailure) as failed:
            result(mailbox.removeMessages(infos[:1]))
        assert failed.value.code.value == "SYS/TEMP"
        result(mailbox.close())
        assert [i.uid for i in result(taken.listMessages())] == uids
        result(taken.close())
    finally:
        other.close()
    # Nobody else holds it: the lock is taken again and removing is fine.
    mailbox = result(store.openMailbox("alice"))
    terminate(store, store.locks._conn.info.backend_pid)
    assert result(mailbox.removeMessages(result(mailbox.listMessages())[:1])) == []
    result(mailbox.close())
    assert [i.uid for i in listing(store)] == uids[1:]


def test_failed_reconnection_of_the_lock_connection_is_a_temporary_failure(store):
    """The database dies between the reconnection and the re-taking: [SYS/TEMP]."""
    held = result(store.openMailbox("bob"))
    connect = store.database.connect

    def connectThenDie(**kwargs):
        conn = connect(**kwargs)
        terminate(store, conn.info.backend_pid)
        return conn

    store.database.connect = connectThenDie
    terminate(store, store.locks._conn.info.backend_pid)
    with pytest.raises(TemporaryFailure):
        result(store.openMailbox("alice"))
    assert store.locks._conn is None
    del store.database.connect
    result(store.openMailbox("alice")).close()
    result(held.close())
    assert store.locks.held == frozenset()


def test_unconfirmed_unlock_drops_the_lock_connection_and_retakes_the_others(store, pgdatabase):
    """An unlock that fails frees its lock with the connection; the others are taken again."""
    alice = result(store.openMailbox("alice"))
    result(store.openMailbox("bob"))
    connect, failures = store.database.connect, [1, 2]

    def connectThenDie(**kwargs):
        conn = connect(**kwargs)
        if failures:
            failures.pop()
            terminate(store, conn.info.backend_pid)
        return conn

    store.database.connect = connectThenDie
    terminate(store, store.locks._conn.info.backend_pid)
    result(alice.close())  # the unlock fails: dead connection, dead reconnection
    assert store.locks.held == frozenset({"bob"})
    other = makeStore(pgdatabase)
    try:
        with pytest.raises(MaildropInUse):  # re-taken at once, not at the next login
            result(other.openMailbox("bob"))
        result(other.openMailbox("alice")).close()
    finally:
        other.close()
