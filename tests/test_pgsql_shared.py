"""
What the nodes of a PostgreSQL store share beyond mail, on a real PostgreSQL
(tests/pg.py): the failed-login penalty, the SCRAM salt key, a maildrop's
usage (LMTP quotas); and a server that gives its connections back on stop.
Two stores on one database stand for two nodes.
"""

from __future__ import annotations

import pytest
from test_pgsql import initialized, makeStore
from test_store_contract import deliver, result
from twisted.internet.task import Clock

from popserv.interfaces import IFailedLogins, IMaildropUsage, ISharedKeys
from popserv.limits import AuthPenalty


@pytest.fixture
def nodes(pgdatabase):
    initialized(pgdatabase)
    stores = [makeStore(pgdatabase), makeStore(pgdatabase)]
    yield stores
    for store in stores:
        store.close()


class Counting:
    """A node's store, counting the calls the penalty makes to it."""

    def __init__(self, store):
        self.store = store
        self.calls = 0

    def recordFailure(self, *args):
        self.calls += 1
        return self.store.recordFailure(*args)

    def clearFailures(self, *args):
        self.calls += 1
        return self.store.clearFailures(*args)


def test_failures_on_one_node_delay_the_next_failure_on_another(nodes):
    a, b = nodes
    assert IFailedLogins.providedBy(a)
    clock = Clock()
    clock.advance(1_000_000)
    onA = AuthPenalty(clock, shared=Counting(a))
    onB = AuthPenalty(clock, shared=Counting(b))
    assert result(onA.failed("192.0.2.1")) == 1
    assert result(onA.failed("192.0.2.1")) == 2
    assert result(onB.failed("192.0.2.1")) == 4  # B counts on from A's two
    assert result(onB.failed("198.51.100.9")) == 1  # per address
    onA.succeeded("192.0.2.1")  # A saw failures: the shared count is cleared
    assert result(onB.failed("192.0.2.1")) == 1
    clock.advance(3601)  # forgotten after an hour without failures
    assert result(onA.failed("198.51.100.9")) == 1


def test_a_success_without_failures_costs_no_database_call(nodes):
    clock = Clock()
    shared = Counting(nodes[0])
    penalty = AuthPenalty(clock, shared=shared)
    for _ in range(100):
        penalty.succeeded("192.0.2.2")
    assert shared.calls == 0
    result(penalty.failed("192.0.2.2"))
    penalty.succeeded("192.0.2.2")
    penalty.succeeded("192.0.2.2")
    assert shared.calls == 2  # the failure, and one clearing


def test_penalty_falls_back_on_the_process_count_when_the_database_is_down(nodes, postgresql):
    clock = Clock()
    penalty = AuthPenalty(clock, shared=nodes[0])
    assert result(penalty.failed("192.0.2.3")) == 1
    postgresql.stop()
    try:
        assert result(penalty.failed("192.0.2.3")) == 2  # the process's own count
    finally:
        postgresql.start()


def test_huge_counts_stay_at_the_cap():
    penalty = AuthPenalty(Clock(), cap=15)
    assert penalty.delay(10**6) == 15


def test_shared_key_is_the_same_for_every_node(nodes):
    a, b = nodes
    assert ISharedKeys.providedBy(a)
    key = a.sharedKey("scram-salt")
    assert len(key) == 32
    assert b.sharedKey("scram-salt") == key
    assert a.sharedKey("other") != key


def test_usage_counts_the_listed_sizes(nodes):
    store = nodes[0]
    assert IMaildropUsage.providedBy(store)
    assert result(store.usage("nobody")) == (0, 0)
    deliver(store, [b"Subject: a\n\nbody\n"])
    deliver(store, [b"x" * 1000 + b"\r\n"], user="alice")
    assert result(store.usage("alice")) == (2, 20 + 1002)


def test_server_shares_penalty_and_salt_key_and_closes_the_store(pgdatabase, tmp_path):
    from popserv.config import Config
    from popserv.service import SCRAM_SALT_KEY, PopservService, makeFactory
    from popserv.threads import synchronously

    initialized(pgdatabase)
    (tmp_path / "passwd").write_text("alice:{PLAIN}x\n")
    config = Config(
        passwd=str(tmp_path / "passwd"), mail_location=f"pgsql:{pgdatabase}", auth_penalty=15
    )
    factory = makeFactory(config, Clock())
    store = factory.portal.realm.store
    assert factory.penalty.shared is store
    other = makeStore(pgdatabase)
    try:
        assert other.sharedKey(SCRAM_SALT_KEY) == factory.mechanisms["SCRAM-SHA-256"].saltKey
    finally:
        other.close()
    unshared = makeFactory(config.merged(auth_penalty_shared=False), Clock())
    assert unshared.penalty.shared is None
    unshared.portal.realm.store.close()
    store.runInThread = synchronously
    PopservService(factory, Clock())._closeStore(None)
    assert store.database.pool.closed


def test_a_node_started_with_the_database_down_fetches_the_salt_key_later(
    pgdatabase, tmp_path, postgresql
):
    """
    No per-process key for good: until the shared key is fetched, SCRAM's salts fail
    with [SYS/TEMP], and the first use once the database is back fetches it.
    """
    from popserv.auth.scramkeys import LateKey
    from popserv.config import Config
    from popserv.errors import TemporaryFailure
    from popserv.service import SCRAM_SALT_KEY, makeFactory
    from popserv.threads import synchronously

    initialized(pgdatabase)
    (tmp_path / "passwd").write_text("alice:{PLAIN}x\n")
    config = Config(passwd=str(tmp_path / "passwd"), mail_location=f"pgsql:{pgdatabase}")
    clock = Clock()
    postgresql.stop()
    try:
        factory = makeFactory(config, clock)
        scram = factory.mechanisms["SCRAM-SHA-256"]
        key = scram.saltKey
        assert isinstance(key, LateKey)
        key._runInThread = synchronously
        with pytest.raises(TemporaryFailure):
            scram.fakeKeys("nobody")
    finally:
        postgresql.start()
    with pytest.raises(TemporaryFailure):
        scram.fakeKeys("nobody")  # the last try was under a second ago
    clock.advance(1.5)
    fake = scram.fakeKeys("nobody")
    other = makeStore(pgdatabase)
    try:
        assert key.value == other.sharedKey(SCRAM_SALT_KEY)
    finally:
        other.close()
    assert scram.fakeKeys("nobody") == fake
    factory.portal.realm.store.close()
