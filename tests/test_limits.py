"""Abuse limits: the failed-login penalty, connection caps, the pre-login timeout."""

from __future__ import annotations

import base64

import pytest
from twisted.internet.task import Clock

from popserv.auth.credentials import UsernamePassword
from popserv.auth.passwdfile import PasswdFileChecker
from popserv.limits import AuthPenalty, ConnectionLimits
from popserv.protocol import DEFAULT_LOGIN_TIMEOUT, DEFAULT_TIMEOUT
from popserv.testing import connect, memoryServer


@pytest.fixture
def guarded():
    clock = Clock()
    factory, store = memoryServer({"alice": "pw"}, clock=clock, penalty=AuthPenalty(clock))
    return factory, clock


def fail_once(client):
    client.send(b"USER alice\r\nPASS wrong\r\n")


def test_failed_logins_are_answered_later_and_later(guarded):
    """Delay doubling per failure from one address: 1, 2, 4, 8, then the 15 s cap."""
    factory, clock = guarded
    client = connect(factory, peer="198.51.100.9")
    for delay in (1, 2, 4, 8, 15, 15):
        fail_once(client)
        assert client.lines() == [b"+OK Send your password"]
        clock.advance(delay - 0.01)
        assert client.lines() == []
        clock.advance(0.01)
        assert client.lines() == [b"-ERR [AUTH] Authentication failed"]


def test_penalty_blocks_nobody_else(guarded):
    """While one address waits, other connections are answered at once."""
    factory, clock = guarded
    attacker = connect(factory, peer="198.51.100.9")
    for _ in range(3):
        fail_once(attacker)
        clock.advance(15)
    attacker.output()
    fail_once(attacker)
    other = connect(factory, peer="203.0.113.5")
    other.send(b"USER alice\r\nPASS pw\r\nSTAT\r\n")
    assert other.lines()[-1] == b"+OK 0 0"
    assert attacker.lines() == [b"+OK Send your password"]
    clock.advance(8)
    assert attacker.lines() == [b"-ERR [AUTH] Authentication failed"]


def test_pipelined_commands_wait_behind_a_delayed_failure(guarded):
    factory, clock = guarded
    client = connect(factory, peer="198.51.100.9")
    client.send(b"USER alice\r\nPASS wrong\r\nUSER alice\r\nPASS pw\r\nSTAT\r\n")
    assert client.lines() == [b"+OK Send your password"]
    clock.advance(1)
    assert client.lines() == [
        b"-ERR [AUTH] Authentication failed",
        b"+OK Send your password",
        b"+OK Logged in, 0 messages (0 octets)",
        b"+OK 0 0",
    ]


def test_success_clears_the_penalty(guarded):
    factory, clock = guarded
    client = connect(factory, peer="198.51.100.9")
    for _ in range(3):
        fail_once(client)
        clock.advance(15)
    client.send(b"USER alice\r\nPASS pw\r\nQUIT\r\n")
    client = connect(factory, peer="198.51.100.9")
    client.output()
    fail_once(client)
    clock.advance(1)
    assert client.lines()[-1] == b"-ERR [AUTH] Authentication failed"


def test_sasl_failures_are_penalized_too(guarded):
    factory, clock = guarded
    client = connect(factory, peer="198.51.100.9")
    client.send(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0wrong") + b"\r\n")
    assert client.lines() == []
    clock.advance(1)
    fail_once(client)
    clock.advance(1.5)
    assert client.lines() == [b"-ERR [AUTH] Authentication failed", b"+OK Send your password"]
    clock.advance(0.5)
    assert client.lines() == [b"-ERR [AUTH] Authentication failed"]


def test_a_guesser_who_hangs_up_on_the_late_answer_waits_all_the_same(guarded):
    """
    The late -ERR alone let a guesser hang up and try again at once, the
    right password answered +OK without delay. An address's next login is
    checked only when that late answer would have come, and one whose
    client left meanwhile is never checked (it does not count as a failure).
    """
    factory, clock = guarded
    guesser = connect(factory, peer="198.51.100.9")
    fail_once(guesser)
    guesser.disconnect()  # no waiting for the -ERR
    again = connect(factory, peer="198.51.100.9")
    again.send(b"USER alice\r\nPASS pw\r\n")
    assert again.lines() == [b"+OK Send your password"]
    clock.advance(0.99)
    assert again.lines() == []
    clock.advance(0.01)
    assert again.lines() == [b"+OK Logged in, 0 messages (0 octets)"]
    again.send(b"QUIT\r\n")
    fail_once(connect(factory, peer="198.51.100.9"))  # a fresh count: answered in 1 s
    gone = connect(factory, peer="198.51.100.9")
    fail_once(gone)  # waits its turn (1 s)...
    gone.disconnect()  # ...and leaves before it: never checked
    clock.advance(2)
    late = connect(factory, peer="198.51.100.9")
    fail_once(late)
    clock.advance(1.99)  # the second failure's delay (2 s), not the third's (4 s)
    assert late.lines()[-1] != b"-ERR [AUTH] Authentication failed"
    clock.advance(0.01)
    assert late.lines()[-1] == b"-ERR [AUTH] Authentication failed"


def test_parallel_guesses_from_one_address_are_checked_one_delay_apart(guarded):
    """
    After a failure, three connections guess at once: the first is checked
    at once (its turn had come), the others one delay after the previous
    turn; each failure then answers late as usual (2, 4, 8 s).
    """
    factory, clock = guarded
    fail_once(connect(factory, peer="198.51.100.9"))
    clock.advance(1)
    clients = [connect(factory, peer="198.51.100.9") for _ in range(3)]
    for client in clients:
        fail_once(client)
    answered = []
    for step in range(1, 60):
        clock.advance(0.25)
        answered += [step / 4 for c in clients if c.output().endswith(b"failed\r\n")]
    assert answered == [2, 6, 12]  # checked at 0, 2 and 4 s


def test_no_login_waits_its_turn_longer_than_the_cap():
    """
    A crowd of logins from an address that failed queues one delay apart,
    but none waits longer than the cap: a user behind the guesser's NAT
    waits no longer than the guesser's answers do.
    """
    clock = Clock()
    penalty = AuthPenalty(clock, cap=15)
    for _ in range(4):
        penalty.failed("198.51.100.9")  # the 4th failure: answered in 8 s
    waits = [penalty.admit("198.51.100.9") for _ in range(10)]
    assert waits == [8] + [15] * 9
    assert penalty.admit("203.0.113.5") == 0  # (others wait for nothing)


def test_the_penalty_remembers_a_bounded_number_of_addresses():
    """A flood of failures from ever new addresses (an IPv6 /64) costs bounded memory and time."""
    clock = Clock()
    penalty = AuthPenalty(clock)
    penalty.ADDRESSES = 50
    for n in range(200):
        penalty.failed(f"2001:db8::{n:x}")
        clock.advance(0.1)
    assert len(penalty._failures) == 50
    assert penalty.failed("2001:db8::c7") == 2  # the most recent are kept
    assert penalty.failed("2001:db8::1") == 1  # the oldest forgotten


def test_penalty_is_forgotten_after_quiet_time():
    clock = Clock()
    penalty = AuthPenalty(clock, forget=3600)
    assert [penalty.failed("a") for _ in range(3)] == [1, 2, 4]
    clock.advance(3601)
    assert penalty.failed("a") == 1
    assert AuthPenalty(clock, cap=0).failed("a") == 0


def test_connection_caps_per_address_and_total():
    factory, _ = memoryServer({"alice": "pw"}, limits=ConnectionLimits(total=3, perAddress=2))
    a1 = connect(factory, peer="192.0.2.1")
    connect(factory, peer="192.0.2.1")
    refused = connect(factory, peer="192.0.2.1")
    assert refused.greeting == b"-ERR [SYS/TEMP] Too many connections, try again later\r\n"
    assert refused.transport.disconnecting
    connect(factory, peer="192.0.2.2")
    assert connect(factory, peer="192.0.2.3").greeting.startswith(b"-ERR [SYS/TEMP]")
    a1.disconnect()
    assert connect(factory, peer="192.0.2.3").greeting.startswith(b"+OK")
    refused.disconnect()  # a refused connection releases nothing it never took
    assert connect(factory, peer="192.0.2.1").greeting.startswith(b"-ERR")


def test_refused_connection_that_does_not_go_is_cut():
    """Refused connections are not counted, so no autologout: a grace period bounds them."""
    factory, _ = memoryServer({"alice": "pw"}, limits=ConnectionLimits(total=1))
    connect(factory)
    stays, goes = connect(factory), connect(factory)
    assert stays.transport.disconnecting and not stays.transport.disconnected
    goes.disconnect()  # the usual case: the client reads the -ERR and closes
    factory.clock.advance(factory.abortGrace - 1)
    assert not stays.transport.disconnected
    factory.clock.advance(1)
    assert stays.transport.disconnected  # StringTransport's mark of abortConnection
    stays.disconnect()
    assert len(factory.clock.getDelayedCalls()) == 1  # the open session's autologout


def test_shorter_timeout_before_login():
    factory, _ = memoryServer({"alice": "pw"})
    assert DEFAULT_LOGIN_TIMEOUT < DEFAULT_TIMEOUT
    idle = connect(factory)
    factory.clock.advance(DEFAULT_LOGIN_TIMEOUT)
    assert idle.transport.disconnecting
    active = connect(factory)
    active.send(b"USER alice\r\nPASS pw\r\n")
    factory.clock.advance(DEFAULT_TIMEOUT - 1)
    assert not active.transport.disconnecting
    factory.clock.advance(1)
    assert active.transport.disconnecting


def test_unknown_user_costs_a_real_hash_check(tmp_path):
    """No user enumeration by timing: an unknown name is checked against a real hash."""
    from passlib.hash import argon2

    path = tmp_path / "passwd"
    path.write_text(
        "alice:{ARGON2ID}" + argon2.using(memory_cost=1024, rounds=1).hash("pw") + "\n"
    )
    runs = []

    def run(f, *args):
        from twisted.internet.defer import maybeDeferred

        runs.append(f)
        return maybeDeferred(f, *args)

    checker = PasswdFileChecker(path, runInThread=run)
    failures = []
    checker.requestAvatarId(UsernamePassword("mallory", b"pw")).addErrback(failures.append)
    assert len(runs) == 1 and len(failures) == 1
