"""
The PostgreSQL store and passdb when the database is cut off, answers
late or not at all (a relay in front of a real PostgreSQL, tests/pgproxy.py):
logins fail fast and recover, a removal never runs without the lock, a
retried statement counts nothing twice.
"""

from __future__ import annotations

import threading
import time

import pytest
from pgproxy import Relay
from test_pgsql import initialized, makeStore, terminate
from test_store_contract import deliver, result

from popserv.errors import TemporaryFailure


@pytest.fixture
def relay(postgresql):
    relay = Relay(postgresql.socketDir)
    yield relay
    relay.close()


def dbname(uri: str) -> str:
    return uri.split("?")[0].rsplit("/", 1)[1]


def timed(call):
    """(seconds, outcome) of call(): its result or the exception it raised."""
    start = time.monotonic()
    try:
        outcome = call()
    except Exception as e:
        outcome = e
    return time.monotonic() - start, outcome


def test_logins_fail_fast_under_a_partition_and_recover(pgdatabase, relay):
    """Cut off: every login gets [SYS/TEMP] within a bounded time, none queue
    behind the stuck lock connection; healed: logins work again by themselves."""
    initialized(pgdatabase)
    store = makeStore(relay.uri(dbname(pgdatabase)), timeout=1)
    try:
        result(store.openMailbox("bob"))  # the lock connection is up
        relay.partition()
        outcomes: dict[str, tuple[float, object]] = {}

        def login(user):
            outcomes[user] = timed(lambda: result(store.openMailbox(user)))

        threads = [threading.Thread(target=login, args=(f"u{i}",)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)
        assert not any(t.is_alive() for t in threads), "logins queued behind the lock connection"
        for seconds, outcome in outcomes.values():
            assert isinstance(outcome, TemporaryFailure)
            assert outcome.code.value == "SYS/TEMP"
            assert seconds < 4.5
        relay.heal()
        deadline = time.monotonic() + 15
        while True:
            seconds, outcome = timed(lambda: result(store.openMailbox("alice")))
            if not isinstance(outcome, Exception):
                break
            assert isinstance(outcome, TemporaryFailure)
            assert time.monotonic() < deadline, "no recovery"
            time.sleep(0.2)
        result(outcome.close())
    finally:
        relay.close()
        store.close()


def test_removal_of_a_node_that_lost_its_lock_mid_update_is_seen_by_the_next(pgdatabase):
    """Node A checked its lock and is deleting when its lock session dies;
    node B takes the maildrop: B must list after A's removal, never before."""
    a = makeStore(initialized(pgdatabase))
    b = makeStore(pgdatabase)
    blocker = makeStore(pgdatabase)
    try:
        uids = [deliver(a, [f"m{i}\n".encode()]) for i in range(3)]
        mailbox = result(a.openMailbox("alice"))
        infos = result(mailbox.listMessages())
        # Hold the first message's row: A's DELETE waits on it, its lock check done.
        conn = blocker.database.connect(autocommit=False)
        conn.execute("SELECT 1 FROM messages WHERE id = %s FOR UPDATE", (infos[0].key,))
        removal = {}
        remover = threading.Thread(
            target=lambda: removal.update(
                r=timed(lambda: result(mailbox.removeMessages(infos[:1])))
            )
        )
        remover.start()
        deadline = time.monotonic() + 10
        while not blocker.database.run(
            lambda c: c.execute(
                "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND query LIKE '%%DELETE FROM messages%%'"
            ).fetchone()
        ):
            assert time.monotonic() < deadline, "the removal never waited"
            time.sleep(0.02)
        terminate(b, a.locks._conn.info.backend_pid)  # A's lock session dies now
        seen = {}
        taker = threading.Thread(
            target=lambda: seen.update(
                r=timed(
                    lambda: [i.uid for i in result(result(b.openMailbox("alice")).listMessages())]
                )
            )
        )
        taker.start()
        time.sleep(0.5)
        conn.rollback()
        conn.close()
        remover.join(10)
        taker.join(10)
        assert removal["r"][1] == []  # A's check preceded the loss: its removal stands
        assert seen["r"][1] == uids[1:]  # B listed after it, not before
        left = blocker.database.run(
            lambda c: c.execute("SELECT uid FROM messages ORDER BY received, id").fetchall()
        )
        assert [uid for (uid,) in left] == uids[1:]
    finally:
        for store in (a, b, blocker):
            store.close()


def test_a_lost_reply_does_not_count_a_failed_login_twice(pgdatabase, relay):
    initialized(pgdatabase)
    store = makeStore(relay.uri(dbname(pgdatabase)))
    try:
        assert result(store.recordFailure("192.0.2.7", 1000.0, 3600.0)) == 1
        relay.dropNextReply()  # the statement runs, its answer is lost
        try:
            result(store.recordFailure("192.0.2.7", 1001.0, 3600.0))
        except TemporaryFailure:
            pass  # the penalty then counts in the process (see AuthPenalty)
        count = store.database.run(
            lambda conn: conn.execute(
                "SELECT count FROM auth_failures WHERE address = '192.0.2.7'"
            ).fetchone()[0]
        )
        assert count == 2
    finally:
        store.close()


@pytest.mark.parametrize("uid", [None, "given-uidl-1"], ids=["drawn UIDL", "given UIDL"])
def test_a_delivery_whose_commit_reply_is_lost_is_stored_once(pgdatabase, relay, uid):
    """
    The COMMIT ran but its reply never came: the database runs the delivery
    again on a fresh connection. That retry finds the message stored and
    reports it, rather than taking its own row for a UIDL clash (it drew
    UIDLs for ever) or refusing a given UIDL that it stored itself.
    """
    initialized(pgdatabase)
    store = makeStore(relay.uri(dbname(pgdatabase)))
    outcome = []
    try:
        writer = result(store.deliverMessage("alice", uid=uid))
        result(writer.write(b"Subject: once\r\n\r\nonly once\r\n"))
        relay.dropReplyTo(b"COMMIT")
        thread = threading.Thread(target=lambda: outcome.append(timed(writer.commit)))
        thread.start()
        thread.join(20)
        assert not thread.is_alive(), "the delivery never ended"
        stored = store.database.run(
            lambda conn: conn.execute("SELECT uid FROM messages").fetchall()
        )
        assert [row[0] for row in stored] == [result(outcome[0][1])]
        assert uid is None or stored[0][0] == uid
    finally:
        relay.close()  # (ends a delivery still looping)
        store.close()


def test_an_unlock_waits_out_a_busy_lock_connection(pgdatabase):
    """A logout while another lock operation holds the lock connection longer
    than the timeout still unlocks: a given-up unlock would lock the user out
    on every node until the process ends."""
    from popserv.backends.pgsql.locks import AdvisoryLocks

    a = makeStore(initialized(pgdatabase))
    b = makeStore(pgdatabase)
    try:
        locks = AdvisoryLocks(a.database, timeout=0.3)
        locks.acquire("alice")
        busy = threading.Thread(
            target=lambda: (locks._mutex.acquire(), time.sleep(0.6), locks._mutex.release())
        )
        busy.start()
        time.sleep(0.05)
        locks.release("alice")
        busy.join()
        assert locks.held == frozenset()
        result(b.openMailbox("alice")).close()  # another node gets it
        locks.acquire("alice")  # and so does this one, again
        locks.release("alice")
    finally:
        a.close()
        b.close()
