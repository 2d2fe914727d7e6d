"""
The test server process: a real popserv (production protocol, a Maildir
store in a temporary directory) on 127.0.0.1, driven by its parent over a
control channel on standard input and output, one JSON object a line each
way (L{ControlProtocol}). C{python -m popserv.testserver.server DIR} runs
it; L{popserv.testserver.client.POP3TestServer} starts and drives it.

The pytest plugin runs the server in a subprocess, not in a thread of the
test process, so that it never shares a reactor with pytest-twisted or an
event loop with pytest-asyncio.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import sys
from collections.abc import Callable
from typing import Any

from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from popserv.auth.realm import MailboxRealm
from popserv.backends.maildir import MaildirStore
from popserv.backends.maildir.names import uidFor, uniquePart
from popserv.limits import AuthPenalty
from popserv.policy import SessionPolicy
from popserv.testing import PlaintextChecker
from popserv.testserver.certs import writeTestCertificates
from popserv.testserver.faults import MALFORMATIONS, Faults, TestFactory
from popserv.threads import reactorThreads
from popserv.tls import PlaintextPolicy, ServerTLS

__all__ = ["TestServerCore", "ControlProtocol", "main"]


def _verb(command: str) -> str:
    verb = command.strip().upper()
    if not verb or " " in verb:
        raise ValueError(f"a command keyword, such as RETR, not {command!r}")
    return verb


def _replyLine(reply: str) -> bytes:
    if not isinstance(reply, str) or "\r" in reply or "\n" in reply:
        raise ValueError(f"a reply is one line of text, not {reply!r}")
    if not reply.startswith(("+OK", "-ERR")):
        reply = "-ERR " + reply
    return reply.encode("utf-8") + b"\r\n"


class TestServerCore:
    """
    One test server: its users, its mail, its listeners and its faults.

    Mail is real store mail: delivered through the Maildir store's
    C{deliverMessage}, served by the production protocol, removed by its
    UPDATE. L{reset} makes it as new (a fresh mail root, no users, no faults)
    in a few milliseconds, so a warm server can serve test after test.
    """

    __test__ = False  # (not a test class, whatever pytest thinks of its name)

    def __init__(self, directory: str, reactor: Any) -> None:
        self.directory = os.path.abspath(directory)
        self.reactor = reactor
        self.run = reactorThreads(reactor)
        self.checker = PlaintextChecker({})
        self.factory = TestFactory(
            self._portal(),
            clock=reactor,
            hostname="localhost",
            penalty=AuthPenalty(reactor, cap=0),  # failed logins answered at once
            allowPlaintext=PlaintextPolicy(),  # production's: TLS or a trusted network
        )
        self.port: Any = None
        self.tlsPort: Any = None
        self.cafile: str | None = None
        self._tls: ServerTLS | None = None

    # -- set-up ------------------------------------------------------------------

    def _portal(self) -> Portal:
        self._generation = getattr(self, "_generation", 0) + 1
        self.mailRoot = os.path.join(self.directory, f"mail-{self._generation}")
        os.makedirs(self.mailRoot, exist_ok=True)
        self.store = MaildirStore(
            os.path.join(self.mailRoot, "%u", "Maildir"), runInThread=self.run
        )
        self.delivered: dict[str, dict[str, bytes]] = {}
        self.policy = SessionPolicy(self.reactor)
        return Portal(MailboxRealm(self.store, self.policy), [self.checker])

    def listen(self, port: int = 0, host: str = "127.0.0.1") -> int:
        self.port = self.reactor.listenTCP(port, self.factory, interface=host)
        return self.port.getHost().port

    def settings(self) -> dict[str, Any]:
        return {
            "port": self.port.getHost().port if self.port else None,
            "tls_port": self.tlsPort.getHost().port if self.tlsPort else None,
            "cafile": self.cafile if self.tlsPort else None,
            "mail_root": self.mailRoot,
        }

    def enableTLS(self, port: int = 0, host: str = "127.0.0.1") -> dict[str, Any]:
        """STLS offered, and an implicit-TLS listener; certificates by a CA of our own."""
        if self._tls is None:
            self.cafile, cert, key = writeTestCertificates(self.directory)
            self._tls = ServerTLS(cert, key)
        self.factory.tls = self._tls
        if self.tlsPort is None:
            wrapped = TLSMemoryBIOFactory(self._tls, False, self.factory)
            self.tlsPort = self.reactor.listenTCP(port, wrapped, interface=host)
        return self.settings()

    @inlineCallbacks
    def reset(self) -> Any:
        """As new: every connection cut, no users, no mail, no faults, no TLS."""
        for connection in list(self.factory.connections):
            connection._abort()
        for _ in range(500):  # aborted connections end at the next reactor turns
            if not self.factory.connections:
                break
            yield deferLater(self.reactor, 0.002, lambda: None)
        self.factory.tls = None
        if self.tlsPort is not None:
            yield self.tlsPort.stopListening()
            self.tlsPort = None
        old = self.mailRoot
        self.checker.users.clear()
        self.factory.portal = self._portal()
        self.factory.policy = self.policy
        self.factory.faults = Faults()
        self.factory.clearTranscript()
        self.run(shutil.rmtree, old, True)  # (a root of its own: no need to wait)
        return self.settings()

    # -- users and mail ----------------------------------------------------------

    def addUser(self, name: str, password: str) -> None:
        if not (isinstance(name, str) and name and isinstance(password, str)):
            raise TypeError("a user name (not empty) and a password, both str")
        self.checker.users[name] = password

    @inlineCallbacks
    def deliver(self, user: str, message: bytes) -> Any:
        writer = yield maybeDeferred(self.store.deliverMessage, user)
        try:
            yield maybeDeferred(writer.write, message)
            uid = yield maybeDeferred(writer.commit)
        except BaseException:
            yield maybeDeferred(writer.abort)
            raise
        self.delivered.setdefault(user, {})[uid] = message
        return uid

    def _present(self, user: str) -> dict[str, str]:
        """The UIDL -> file of every message in C{user}'s Maildir now (blocking)."""
        maildir = self.store.location.expand(user)
        found = {}
        for sub in ("new", "cur"):
            try:
                names = os.listdir(os.path.join(maildir, sub))
            except FileNotFoundError:
                continue
            for name in names:
                found[uidFor(uniquePart(name))] = os.path.join(maildir, sub, name)
        return found

    def _messages(self, user: str) -> list[bytes]:
        present = self._present(user)
        order = [u for u in self.delivered.get(user, {}) if u in present]
        order += sorted(set(present) - set(order))
        out = []
        for uid in order:
            with open(present[uid], "rb") as f:
                out.append(f.read())
        return out

    def messages(self, user: str) -> Deferred[list[bytes]]:
        return self.run(self._messages, user)

    @inlineCallbacks
    def deleted(self, user: str) -> Any:
        present = yield self.run(self._present, user)
        return [m for u, m in self.delivered.get(user, {}).items() if u not in present]

    # -- faults and strictness ---------------------------------------------------

    def fail(self, command: str, reply: str, times: int | None = None) -> None:
        self.factory.faults.failures[_verb(command)] = [_replyLine(reply), times]

    def dropAfter(self, command: str, octets: int) -> None:
        if not isinstance(octets, int) or octets < 0:
            raise ValueError(f"octets: a number, 0 or more, not {octets!r}")
        self.factory.faults.drops[_verb(command)] = octets

    def delay(self, command: str, seconds: float) -> None:
        if not isinstance(seconds, (int, float)) or seconds < 0:
            raise ValueError(f"seconds: a number, 0 or more, not {seconds!r}")
        self.factory.faults.delays[_verb(command)] = seconds

    def neverAnswer(self, command: str | None = None) -> None:
        self.factory.faults.hangs.add("*" if command is None else _verb(command))

    def malformed(self, command: str, kind: str) -> None:
        if kind not in MALFORMATIONS:
            raise ValueError(f"kind must be one of {', '.join(MALFORMATIONS)}, not {kind!r}")
        self.factory.faults.malformed[_verb(command)] = kind

    def noApopTimestamp(self) -> None:
        self.factory.faults.noApopTimestamp = True

    def strictness(self, bare_lf: bool = True, max_line: int = 255) -> None:
        if max_line < 255:
            raise ValueError("max_line: RFC 2449 allows 255 octets; a server may not ask less")
        self.factory.faults.bareLF = bare_lf
        self.factory.faults.maxLine = max_line

    def transcript(self) -> list[list[Any]]:
        return [list(entry) for entry in self.factory.transcript]


def _encode(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    return value


class ControlProtocol(Protocol):
    """
    The control channel: a request a line (C{{"id": N, "op": NAME, "args":
    {...}}}), answered by C{{"id": N, "ok": true, "result": ...}} or C{{"id":
    N, "ok": false, "error": TEXT}}. Bytes travel as C{{"b64": ...}}. End of
    input stops the server.

    A line (a message delivered inline) may be megabytes long: its pieces
    are kept as they come and only each new one searched for the line's end
    (a C{LineReceiver} searched all it held again at every read: 20 MB took
    37 s).
    """

    MAX_LENGTH = 256 * 1024 * 1024

    def __init__(self, core: TestServerCore, onEnd: Callable[[], None]) -> None:
        self.core = core
        self.onEnd = onEnd
        self.ops: dict[str, Callable[..., Any]] = {
            "settings": core.settings,
            "reset": core.reset,
            "enable_tls": core.enableTLS,
            "add_user": core.addUser,
            "deliver": lambda user, message: core.deliver(user, base64.b64decode(message)),
            "messages": core.messages,
            "deleted": core.deleted,
            "transcript": core.transcript,
            "fail": core.fail,
            "drop_after": core.dropAfter,
            "delay": core.delay,
            "never_answer": core.neverAnswer,
            "malformed": core.malformed,
            "no_apop_timestamp": core.noApopTimestamp,
            "strictness": core.strictness,
        }
        self._queue: Deferred[None] | None = None
        self._pieces: list[bytes] = []
        self._held = 0

    def dataReceived(self, data: bytes) -> None:
        while (end := data.find(b"\n")) >= 0:
            line = b"".join([*self._pieces, data[:end]])
            self._pieces, self._held, data = [], 0, data[end + 1 :]
            self.lineReceived(line)
        if data:
            self._pieces.append(data)
            self._held += len(data)
            if self._held > self.MAX_LENGTH:
                self.transport.loseConnection()

    def lineReceived(self, line: bytes) -> None:
        number = None
        try:
            request = json.loads(line)
            number = request.get("id")
            op = self.ops[request["op"]]
            d = maybeDeferred(op, **request.get("args", {}))
        except Exception:
            d = Deferred()
            d.errback(Failure())
        d.addCallbacks(
            lambda result: {"id": number, "ok": True, "result": _encode(result)},
            lambda f: {
                "id": number,
                "ok": False,
                "error": f"{f.type.__name__}: {f.getErrorMessage()}",
            },
        )
        d.addCallback(lambda answer: self.transport.write(json.dumps(answer).encode() + b"\n"))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.onEnd()


def main(argv: list[str] | None = None) -> None:
    """Run a test server over C{argv[0]} (a directory) until standard input closes."""
    from twisted.internet import reactor, stdio
    from twisted.logger import globalLogBeginner, textFileLogObserver

    argv = sys.argv[1:] if argv is None else argv
    directory = argv[0]
    os.makedirs(directory, exist_ok=True)
    log = open(os.path.join(directory, "server.log"), "a", encoding="utf-8")  # noqa: SIM115
    globalLogBeginner.beginLoggingTo([textFileLogObserver(log)], redirectStandardIO=False)
    core = TestServerCore(directory, reactor)
    core.listen()

    def end() -> None:
        if reactor.running:
            reactor.stop()

    control = ControlProtocol(core, end)
    stdio.StandardIO(control)
    control.transport.write(
        json.dumps({"ready": core.settings(), "pid": os.getpid()}).encode() + b"\n"
    )
    reactor.run()


if __name__ == "__main__":
    main()
