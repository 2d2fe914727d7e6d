"""
The protocol's structure, as an embedder or a newcomer relies on it: commands
declared per class (a subclass overrides or adds one, and CAPA follows), the
connection lifecycle and its allowed moves, and the session recorder.
"""

from __future__ import annotations

import time

import pytest
from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs

from popserv import commands, wire
from popserv.commands import Capability, command
from popserv.errors import CommandError
from popserv.limits import ConnectionLimits
from popserv.metrics import Metrics
from popserv.protocol import POP3Protocol, State
from popserv.recorder import SessionRecorder
from popserv.states import TRANSITIONS, BadTransition, Lifecycle
from popserv.testing import connect, memoryServer


@pytest.fixture
def pop():
    factory, store = memoryServer({"alice": "pw"})
    store.maildrop("alice").deliver(b"Subject: one\r\n\r\nfirst\r\n")
    return factory, store


def login(factory):
    client = connect(factory)
    client.send(b"USER alice\r\nPASS pw\r\n")
    assert client.lines()[-1].startswith(b"+OK")
    return client


def capa(client) -> list[bytes]:
    client.send(b"CAPA\r\n")
    return client.lines()[1:-1]


# -- commands declared per class ------------------------------------------------


class CountingRETR(POP3Protocol):
    """Overrides RETR without declaring it again."""

    __slots__ = ()
    retrieved: list[int] = []

    def do_RETR(self, number):
        CountingRETR.retrieved.append(number)
        return super().do_RETR(number)


class WithXSTAT(POP3Protocol):
    """Adds a verb of its own, with a capability, valid after login only."""

    __slots__ = ()

    @command(
        "XSTAT",
        states=(State.TRANSACTION,),
        parse=commands.message,
        capability=Capability("X-STAT", rank=115),
    )
    def do_XSTAT(self, number):
        return wire.ok(f"{number} {self.transaction.get(number).uid}")


def test_a_subclass_override_is_dispatched(pop):
    """A subclass's do_RETR runs in place of the base's: tables are built per class."""
    factory, _ = pop
    factory.protocol = CountingRETR
    client = login(factory)
    client.send(b"RETR 1\r\n")
    assert client.lines()[0] == b"+OK 23 octets"
    assert CountingRETR.retrieved == [1]
    assert POP3Protocol.commands.byState[State.TRANSACTION]["RETR"].handler is (
        POP3Protocol.do_RETR
    )


def test_a_subclass_verb_is_dispatched_in_its_states_and_listed(pop):
    """A new verb is parsed, dispatched only where declared, and CAPA lists it in rank order."""
    factory, _ = pop
    factory.protocol = WithXSTAT
    client = connect(factory)
    client.send(b"XSTAT 1\r\n")
    assert client.lines() == [b"-ERR XSTAT is not valid in this state"]
    before = capa(client)
    assert before[before.index(b"UTF8 USER") + 1] == b"X-STAT"
    client.send(b"USER alice\r\nPASS pw\r\n")
    client.output()
    client.send(b"XSTAT 1\r\nXSTAT\r\nXSTAT 2\r\n")
    lines = client.lines()
    assert lines[0].startswith(b"+OK 1 ") and len(lines[0]) > 7
    assert lines[1] == b"-ERR XSTAT takes one message number"
    assert lines[2] == b"-ERR No such message"
    assert b"X-STAT" not in b"".join(capa(connect(memoryServer({})[0])))


def test_a_redeclared_verb_replaces_the_declaration(pop):
    """Declaring NOOP again (here: valid before login too) changes where it is accepted."""

    class EarlyNOOP(POP3Protocol):
        __slots__ = ()

        @command("NOOP")
        def do_NOOP(self):
            return wire.ok("still here")

    factory, _ = pop
    factory.protocol = EarlyNOOP
    client = connect(factory)
    client.send(b"NOOP\r\n")
    assert client.lines() == [b"+OK still here"]


def test_capa_is_unchanged_by_the_declarations(pop):
    """The declared capabilities list in the order RFC 2449 clients have always seen."""
    factory, _ = pop
    client = connect(factory)
    assert capa(client) == [
        b"TOP",
        b"UIDL",
        b"RESP-CODES",
        b"PIPELINING",
        b"USER",
        b"SASL SCRAM-SHA-256 SCRAM-SHA-1 CRAM-MD5 PLAIN LOGIN",
        b"AUTH-RESP-CODE",
        b"EXPIRE NEVER",
        b"UTF8 USER",
        b"LANG",
        b"IMPLEMENTATION " + factory.implementation.encode(),
    ]


def test_parsers_reject_before_the_handler_runs():
    """The shared parsers raise CommandError: a handler never sees bad arguments."""
    for parse, line in [
        (commands.message, b"RETR x"),
        (commands.message, b"RETR 1 2"),
        (commands.top, b"TOP 1 9999999999"),
        (commands.noArgs, b"STAT 1"),
        (commands.auth, b"AUTH PLAIN !!!"),
    ]:
        with pytest.raises(CommandError):
            parse(wire.parseCommand(line))


# -- the lifecycle -----------------------------------------------------------------


def test_lifecycle_of_a_session_that_quits_after_update(pop):
    """OPEN -> UPDATING -> UPDATED -> LOST -> ENDED; the session is accounted once, at the end."""
    factory, _ = pop
    client = login(factory)
    protocol = client.protocol
    assert protocol.lifecycle is Lifecycle.OPEN
    pending = []
    protocol.transaction.mailbox.removeMessages = lambda infos: (
        pending.append(Deferred()) or pending[-1]
    )
    client.send(b"DELE 1\r\nQUIT\r\n")
    assert protocol.lifecycle is Lifecycle.UPDATING and protocol in factory.sessions
    pending[0].callback([])
    assert protocol.lifecycle is Lifecycle.UPDATED
    client.disconnect()
    assert protocol.lifecycle is Lifecycle.ENDED and protocol not in factory.sessions


def test_lifecycle_when_the_client_goes_during_update(pop):
    """UPDATING -> ABANDONED -> ENDED: UPDATE finishes, then the session is accounted."""
    factory, _ = pop
    client = login(factory)
    protocol = client.protocol
    pending = []
    protocol.transaction.mailbox.removeMessages = lambda infos: (
        pending.append(Deferred()) or pending[-1]
    )
    client.send(b"DELE 1\r\nQUIT\r\n")
    client.output()
    client.disconnect()
    assert protocol.lifecycle is Lifecycle.ABANDONED and protocol in factory.sessions
    pending[0].callback([])
    assert protocol.lifecycle is Lifecycle.ENDED and protocol not in factory.sessions
    assert client.output() == b""


def test_lifecycle_of_timeout_limit_and_refusal(pop):
    """Autologout -> TIMED_OUT; a bad-command flood -> CLOSING; over a limit -> REFUSED."""
    factory, _ = pop
    timedOut = login(factory)
    factory.clock.advance(factory.timeout)
    assert timedOut.protocol.lifecycle is Lifecycle.TIMED_OUT
    timedOut.send(b"NOOP\r\n")  # nothing runs, nothing is written after the goodbye
    assert timedOut.lines() == [b"-ERR Disconnected for inactivity"]
    flood = connect(factory)
    flood.send(b"X\r\n" * factory.maxBadCommands)
    assert flood.protocol.lifecycle is Lifecycle.CLOSING
    factory.limits = ConnectionLimits(total=1)
    connect(factory)  # holds the one slot
    refused = connect(factory)
    assert refused.greeting == b"-ERR [SYS/TEMP] Too many connections, try again later\r\n"
    assert refused.protocol.lifecycle is Lifecycle.REFUSED
    refused.disconnect()
    assert refused.protocol.lifecycle is Lifecycle.ENDED


def test_a_forbidden_move_is_a_bug():
    """The lifecycle only moves along TRANSITIONS; ENDED is final."""
    protocol = POP3Protocol()
    with pytest.raises(BadTransition):
        protocol._moveTo(Lifecycle.UPDATED)
    with pytest.raises(BadTransition):
        protocol._moveTo(Lifecycle.ENDED)  # a gone connection is LOST first
    protocol._moveTo(Lifecycle.LOST)
    protocol._moveTo(Lifecycle.ENDED)
    for target in Lifecycle:
        with pytest.raises(BadTransition):
            protocol._moveTo(target)
    assert TRANSITIONS[Lifecycle.ENDED] == frozenset()
    gone = (Lifecycle.ABANDONED, Lifecycle.LOST, Lifecycle.ENDED)
    assert all(not s.connected and s.silent for s in gone)


# -- the recorder ------------------------------------------------------------------


def test_recorder_reports_logins_backend_and_the_end():
    """The recorder alone turns a session's events into metrics and one logout line."""
    metrics = Metrics()
    recorder = SessionRecorder(ip="192.0.2.1", metrics=metrics)
    recorder.opened(secure=True)
    recorder.loginFailed("in_use", "PLAIN")
    recorder.penalized()
    recorder.loggedIn("alice", "PLAIN")
    recorder.backend("list", time.monotonic())
    recorder.command("STAT")
    recorder.reason = "quit"
    sample = metrics.registry.get_sample_value
    assert sample("popserv_connections_open") == 1
    with capturedLogs() as events:
        recorder.ended("bye {user} {mechanism} {tls} {reason}", tls=True)
    assert [e["session_line"] for e in events] == ["bye alice PLAIN yes quit"]
    assert sample("popserv_connections_total", {"tls": "yes"}) == 1
    assert sample("popserv_connections_open") == 0
    assert sample("popserv_logins_total", {"result": "in_use", "mechanism": "PLAIN"}) == 1
    assert sample("popserv_logins_total", {"result": "ok", "mechanism": "PLAIN"}) == 1
    assert sample("popserv_lock_conflicts_total") == 1
    assert sample("popserv_auth_penalties_total") == 1
    assert sample("popserv_backend_seconds_count", {"operation": "list"}) == 1
    assert sample("popserv_commands_total", {"command": "STAT"}) == 1
    assert sample("popserv_session_duration_seconds_count", {"reason": "quit"}) == 1


def test_recorder_without_metrics_still_logs():
    """No metrics configured: the recorder counts and logs, and touches nothing else."""
    recorder = SessionRecorder()
    recorder.loggedIn("bob", "USER")
    recorder.penalized()
    recorder.backend("open", time.monotonic())
    with capturedLogs() as events:
        recorder.ended("{user} {tls}", tls=False)
    assert [e["session_line"] for e in events] == ["bob no"]


def test_one_reporter_per_session_costs_no_object():
    """The recorder is the session's stats: an idle session gains a slot, not an object."""
    protocol = POP3Protocol()
    assert isinstance(protocol.stats, SessionRecorder)
    assert not hasattr(protocol.stats, "__dict__")
