"""
Stateful fuzzing of the protocol (Hypothesis RuleBasedStateMachine): random
sequences of valid commands, invalid arguments and garbage bytes, sent in
random chunks, checked response by response against a simple reference model
of the session and the maildrop, and the final maildrop checked after QUIT.

Budget: POPSERV_FUZZ_EXAMPLES (default 300 programs of up to 60 steps each in
the default run); the long mode is e.g.

    POPSERV_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz.py
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from popserv.octets import crlfSize
from popserv.protocol import MAX_BUFFERED_INPUT
from popserv.testing import connect, memoryServer

EXAMPLES = int(os.environ.get("POPSERV_FUZZ_EXAMPLES", "300"))

message_bytes = st.lists(
    st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"..x", b"Subject: s", b"\x00", b"\xff"]),
    max_size=40,
).map(b"".join)
numbers = st.one_of(
    st.integers(0, 8).map(lambda n: str(n).encode()),
    st.sampled_from([b"-1", b"+1", b"1.0", b"0x1", b"abc", b"99999999999", b"", b"\xff"]),
)
garbage = st.binary(max_size=300).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b""))


def expected_wire(message: bytes, top: int | None = None) -> bytes:
    """Reference encoding, line by line (independent of popserv.wire)."""
    lines = message.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if top is not None:
        try:
            blank = lines.index(b"")
        except ValueError:
            blank = len(lines)
        lines = lines[: blank + 1 + top]
    out = b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
    return out + b".\r\n"


class POP3Session(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.factory, self.store = memoryServer({"alice": "pw"}, maxBadCommands=10**9)
        self.drop = self.store.maildrop("alice")
        self.client = None
        self.messages: list[tuple[str, bytes]] = []
        self.deleted: set[int] = set()
        self.state = "new"
        self.user_given = False

    # -- plumbing ----------------------------------------------------------------

    @initialize(contents=st.lists(message_bytes, max_size=6))
    def start(self, contents):
        for content in contents:
            self.drop.deliver(content)
        self.messages = list(self.drop.messages.items())
        self.client = connect(self.factory)
        assert self.client.greeting.startswith(b"+OK ")
        self.state = "auth"

    def send(self, line: bytes, cuts: list[int]) -> bytes:
        data = line + b"\r\n"
        pos = 0
        for cut in sorted(c % (len(data) + 1) for c in cuts):
            self.client.send(data[pos:cut])
            pos = cut
        self.client.send(data[pos:])
        return self.client.output()

    def status(self, out: bytes) -> bytes:
        line, sep, _ = out.partition(b"\r\n")
        assert sep, out
        assert line.startswith((b"+OK", b"-ERR")), out
        assert b"Traceback" not in out and b"Error:" not in line, out
        return line

    # -- AUTHORIZATION -----------------------------------------------------------------

    @rule(cuts=st.lists(st.integers(0, 40), max_size=3))
    @precondition(lambda self: self.state == "auth")
    def user(self, cuts):
        assert self.status(self.send(b"USER alice", cuts)).startswith(b"+OK")
        self.user_given = True

    @rule(good=st.booleans(), cuts=st.lists(st.integers(0, 40), max_size=3))
    @precondition(lambda self: self.state == "auth")
    def password(self, good, cuts):
        out = self.send(b"PASS " + (b"pw" if good else b"nope"), cuts)
        line = self.status(out)
        if self.user_given and good:
            assert line.startswith(b"+OK Logged in"), out
            self.state = "trans"
        else:
            assert line.startswith(b"-ERR"), out
        self.user_given = False

    # -- TRANSACTION -------------------------------------------------------------------

    def number_ok(self, raw: bytes) -> int | None:
        """The message number raw names, if it is a live one."""
        if not raw.isdigit() or len(raw) > 9:
            return None
        n = int(raw)
        if 1 <= n <= len(self.messages) and n not in self.deleted:
            return n
        return None

    @rule(cuts=st.lists(st.integers(0, 10), max_size=2))
    @precondition(lambda self: self.state == "trans")
    def stat(self, cuts):
        live = [m for i, m in enumerate(self.messages, 1) if i not in self.deleted]
        total = sum(crlfSize(c) for _, c in live)
        assert self.send(b"STAT", cuts) == b"+OK %d %d\r\n" % (len(live), total)

    @rule(
        verb=st.sampled_from([b"RETR", b"LIST", b"UIDL", b"DELE"]),
        raw=numbers,
        cuts=st.lists(st.integers(0, 20), max_size=3),
    )
    @precondition(lambda self: self.state == "trans")
    def numbered(self, verb, raw, cuts):
        out = self.send(verb + b" " + raw if raw else verb, cuts)
        line = self.status(out)
        n = self.number_ok(raw)
        if not raw and verb in (b"LIST", b"UIDL"):
            assert line.startswith(b"+OK") and out.endswith(b"\r\n.\r\n"), out
            listed = out.split(b"\r\n")[1:-2]
            live = [i for i in range(1, len(self.messages) + 1) if i not in self.deleted]
            assert [int(x.split()[0]) for x in listed] == live
            return
        if n is None:
            assert line.startswith(b"-ERR") and out.count(b"\r\n") == 1, out
            return
        uid, content = self.messages[n - 1]
        if verb == b"RETR":
            assert out == b"+OK %d octets\r\n" % crlfSize(content) + expected_wire(content)
        elif verb == b"LIST":
            assert out == b"+OK %d %d\r\n" % (n, crlfSize(content))
        elif verb == b"UIDL":
            assert out == b"+OK %d %s\r\n" % (n, uid.encode())
        else:
            assert out == b"+OK Message %d deleted\r\n" % n
            self.deleted.add(n)

    @rule(raw=numbers, lines=st.integers(0, 5))
    @precondition(lambda self: self.state == "trans")
    def top(self, raw, lines):
        out = self.send(b"TOP " + raw + b" %d" % lines, [])
        n = self.number_ok(raw)
        if n is None:
            assert self.status(out).startswith(b"-ERR") and out.count(b"\r\n") == 1
        else:
            body = out.partition(b"\r\n")[2]
            assert body == expected_wire(self.messages[n - 1][1], lines)

    @rule()
    @precondition(lambda self: self.state == "trans")
    def rset(self):
        assert self.status(self.send(b"RSET", [])).startswith(b"+OK")
        self.deleted.clear()

    @rule(verb=st.sampled_from([b"NOOP", b"CAPA", b"noop", b"capa"]))
    @precondition(lambda self: self.state in ("auth", "trans"))
    def harmless(self, verb):
        out = self.send(verb, [])
        if verb.upper() == b"NOOP" and self.state == "auth":
            assert out == b"-ERR NOOP is not valid in this state\r\n"
            return
        assert self.status(out).startswith(b"+OK")
        if verb.upper() == b"CAPA":
            assert out.endswith(b"\r\n.\r\n")

    # -- garbage -----------------------------------------------------------------------

    @rule(junk=garbage, cuts=st.lists(st.integers(0, 300), max_size=4))
    @precondition(lambda self: self.state in ("auth", "trans"))
    def junk(self, junk, cuts):
        line = b"\x00" + junk  # never a real command
        out = self.send(line, cuts)
        assert out.startswith(b"-ERR ") and out.count(b"\r\n") == 1, out
        assert len(self.client.protocol._inbuf) <= MAX_BUFFERED_INPUT

    @rule(
        verb=st.sampled_from(
            [
                b"USER x",
                b"PASS y",
                b"APOP a b",
                b"STLS",
                b"UTF8",
                b"AUTH PLAIN",
                b"STAT",
                b"RETR 1",
                b"TOP 1 1",
                b"XYZZY",
            ]
        )
    )
    @precondition(lambda self: self.state == "trans")
    def wrong_state(self, verb):
        out = self.send(verb, [])
        if verb in (b"STAT", b"RETR 1", b"TOP 1 1"):
            return  # valid here; covered by other rules
        assert out.startswith(b"-ERR") and out.count(b"\r\n") == 1, out

    # -- the end -------------------------------------------------------------------------

    @rule(drop_connection=st.booleans())
    @precondition(lambda self: self.state in ("auth", "trans"))
    def finish(self, drop_connection):
        before = dict(self.drop.messages)
        if drop_connection:
            self.client.disconnect()
            assert self.drop.messages == before  # no UPDATE without QUIT
        else:
            out = self.send(b"QUIT", [])
            assert self.status(out).startswith(b"+OK"), out
            self.client.disconnect()
            if self.state == "trans":
                kept = {
                    uid for i, (uid, _) in enumerate(self.messages, 1) if i not in self.deleted
                }
                assert set(self.drop.messages) == kept
            else:
                assert self.drop.messages == before
        assert not self.drop.locked
        self.state = "done"

    @rule()
    @precondition(lambda self: self.state == "done")
    def closed(self):
        assert self.client.transport.disconnecting

    @invariant()
    def lock_held_only_in_transaction(self):
        if self.state in ("new", "done"):
            return
        assert self.drop.locked == (self.state == "trans")


TestPOP3Session = POP3Session.TestCase
TestPOP3Session.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
