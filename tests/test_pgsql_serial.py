"""The PostgreSQL store's serial lane: one thread, calls in order, results on the reactor."""

from __future__ import annotations

import threading
import time

import pytest
from test_pgsql import initialized, makeStore
from twisted.internet.defer import Deferred, gatherResults

from popserv.backends.pgsql.serial import SerialThread
from popserv.errors import TemporaryFailure


class FakeReactor:
    """Collects callFromThread calls; the test runs them as the reactor would."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.lock = threading.Lock()

    def callFromThread(self, f, *args) -> None:
        with self.lock:
            self.calls.append((f, args))

    def runCalls(self) -> int:
        with self.lock:
            calls, self.calls = self.calls, []
        for f, args in calls:
            f(*args)
        return len(calls)


def fired(d: Deferred) -> list:
    out: list = []
    d.addBoth(out.append)
    return out


def test_calls_run_in_order_on_one_thread_and_fire_on_the_reactor():
    reactor = FakeReactor()
    serial = SerialThread(reactor)
    gate = threading.Event()
    order: list[int] = []
    threads: set[str] = set()

    def work(n: int) -> int:
        gate.wait(10)
        order.append(n)
        threads.add(threading.current_thread().name)
        return n * 10

    try:
        results = [fired(serial(work, n)) for n in range(50)]
        done = serial(lambda: None)
        assert not any(results)  # nothing fires off the reactor thread
        gate.set()
        finished = threading.Event()
        serial(finished.set)
        assert finished.wait(10)
        wakeups = reactor.runCalls()
        assert order == list(range(50))
        assert threads == {"popserv-pgsql-locks"}
        assert [r[0] for r in results] == [n * 10 for n in range(50)]
        # Results that piled up while the reactor was away go back together.
        assert wakeups < 50
        assert fired(done) == [None]
    finally:
        serial.stop()


def test_a_failure_is_delivered_as_a_failure():
    reactor = FakeReactor()
    serial = SerialThread(reactor)
    finished = threading.Event()
    try:
        failed = fired(serial(lambda: 1 / 0))
        serial(finished.set)
        assert finished.wait(10)
        reactor.runCalls()
        assert failed[0].check(ZeroDivisionError)
        failed[0].trap(ZeroDivisionError)
    finally:
        serial.stop()


def test_stop_lets_queued_calls_run_and_a_later_call_starts_a_new_thread():
    reactor = FakeReactor()
    serial = SerialThread(reactor)
    first = threading.Event()
    second = threading.Event()
    serial(first.set)
    serial.stop()
    assert first.wait(10)
    serial(second.set)
    try:
        assert second.wait(10)
    finally:
        serial.stop()
    reactor.runCalls()


@pytest.mark.parametrize("count", [1, 200])
def test_every_call_fires_once(count):
    reactor = FakeReactor()
    serial = SerialThread(reactor)
    try:
        ds = [serial(lambda n=n: n) for n in range(count)]
        finished = threading.Event()
        serial(finished.set)
        assert finished.wait(10)
        reactor.runCalls()
        assert fired(gatherResults(ds)) == [list(range(count))]
    finally:
        serial.stop()


def test_a_login_queued_longer_than_the_timeout_fails_without_locking(pgdatabase):
    """Behind lock work stuck on the database, a login gets [SYS/TEMP], not a wait without end."""
    store = makeStore(initialized(pgdatabase), timeout=1)
    try:
        with pytest.raises(TemporaryFailure):
            store._openMailbox("alice", time.monotonic() - 2)
        assert "alice" not in store.locks.held
        mailbox = store._openMailbox("alice", time.monotonic())
        assert "alice" in store.locks.held
        mailbox.close()
    finally:
        store.close()
