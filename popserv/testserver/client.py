"""
L{POP3TestServer}: a real popserv in a subprocess, driven from the test.

This module imports nothing but the standard library: the test process
never loads Twisted for it, so it sits beside pytest-twisted's reactor and
pytest-asyncio's loops without touching either.
"""

from __future__ import annotations

import base64
import email.message
import email.policy
import json
import os
import selectors
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

__all__ = ["POP3TestServer", "TestServerError"]

#: RFC 2449 extended response codes a test may put in an injected -ERR.
RESPONSE_CODES = ("IN-USE", "LOGIN-DELAY", "SYS/TEMP", "SYS/PERM", "AUTH")


class TestServerError(RuntimeError):
    """The test server refused a request or could not be started; the message says why."""

    __test__ = False  # (not a test class, whatever pytest thinks of its name)


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"b64"}:
        return base64.b64decode(value["b64"])
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _messageBytes(message: bytes | str | email.message.Message) -> bytes:
    if isinstance(message, bytes):
        return message
    if isinstance(message, str):
        return message.encode("utf-8")
    if isinstance(message, email.message.Message):
        return message.as_bytes(policy=email.policy.SMTP)
    raise TypeError(f"a message is bytes, str or an email.message.Message, not {message!r}")


class POP3TestServer:
    """
    A popserv on 127.0.0.1, on an ephemeral port, in a subprocess.

    @ivar host: always C{127.0.0.1}.
    @ivar port: the plain POP3 port (STLS offered once L{enable_tls} is called).
    @ivar tls_port: the implicit-TLS port (RFC 8314), after L{enable_tls}.
    @ivar cafile: the CA file to verify the server with, after L{enable_tls}.
    @ivar directory: where its mail, certificates and C{server.log} are.
    """

    host = "127.0.0.1"

    def __init__(self, directory: str | os.PathLike[str] | None = None, timeout: float = 30):
        self._own = directory is None
        self.directory = str(directory or tempfile.mkdtemp(prefix="popserv-test-"))
        self.timeout = timeout
        self.port: int | None = None
        self.tls_port: int | None = None
        self.cafile: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._buffer = b""
        self._lock = threading.Lock()
        self._requests = 0

    # -- the process -------------------------------------------------------------

    @property
    def log_path(self) -> str:
        """The server's log (every session's logout line, every error)."""
        return os.path.join(self.directory, "server.log")

    @property
    def stderr_path(self) -> str:
        """The server process's standard error (a crash's traceback)."""
        return os.path.join(self.directory, "stderr.log")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The server process's id (None when stopped)."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> POP3TestServer:
        """
        Start the subprocess and wait until it listens. If it does not, it is
        stopped (killed if need be) and L{TestServerError} says why.
        """
        self._buffer = b""
        os.makedirs(self.directory, exist_ok=True)  # (the server would; its log goes there first)
        with open(self.stderr_path, "ab") as stderr:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "popserv.testserver.server", self.directory],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
            )
        try:
            ready = json.loads(self._readLine())
            if "ready" not in ready:
                raise TestServerError(f"unexpected start-up message: {ready!r}")
        except BaseException as e:
            problem = self._problem(str(e), where=not self._own)  # (own: removed now)
            self.stop()
            if isinstance(e, (TestServerError, ValueError)):
                raise TestServerError(f"the test server did not start: {problem}") from None
            raise
        self._settings(ready["ready"])
        return self

    def stop(self) -> None:
        """Stop the subprocess (its sessions end without UPDATE)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        self._buffer = b""
        if self._own:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> POP3TestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _readLine(self) -> bytes:
        assert self._proc is not None and self._proc.stdout is not None
        deadline = time.monotonic() + self.timeout
        fd = self._proc.stdout.fileno()
        if (end := self._buffer.find(b"\n")) >= 0:
            line, self._buffer = self._buffer[:end], self._buffer[end + 1 :]
            return line
        pieces = [self._buffer]  # (a long answer: each piece searched once)
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    self._buffer = b"".join(pieces)
                    raise TestServerError(f"no answer in {self.timeout}s")
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise TestServerError("the test server exited")
                if (end := chunk.find(b"\n")) >= 0:
                    self._buffer = chunk[end + 1 :]
                    return b"".join([*pieces, chunk[:end]])
                pieces.append(chunk)

    def _problem(self, what: str, where: bool = True) -> str:
        """C{what}, and if the process ended, its exit status and last words."""
        proc = self._proc
        if proc is not None:
            try:
                proc.wait(0.5)  # (a process that closed its output is about to end)
            except subprocess.TimeoutExpired:
                pass
        if proc is not None and proc.returncode is not None:
            what += f" (exit status {proc.returncode})"
            try:
                with open(self.stderr_path, "rb") as f:
                    f.seek(max(0, os.fstat(f.fileno()).st_size - 2000))
                    tail = f.read().decode("utf-8", "replace").strip()
            except OSError:
                tail = ""
            if tail:
                what += f"; its standard error ends:\n{tail}\n"
        return f"{what}; see {self.log_path}" if where else what

    def _call(self, op: str, **args: Any) -> Any:
        if not self.running:
            raise TestServerError(self._problem("the test server is not running"))
        assert self._proc is not None and self._proc.stdin is not None
        with self._lock:
            # Numbered: the answer to a request that timed out is recognised
            # when it comes late, and skipped, not taken for the next one's.
            self._requests += 1
            number = self._requests
            request = {"id": number, "op": op, "args": args}
            try:
                self._proc.stdin.write(json.dumps(request).encode() + b"\n")
                self._proc.stdin.flush()
            except OSError:
                raise TestServerError(self._problem("the test server exited")) from None
            try:
                while (answer := json.loads(self._readLine())).get("id") != number:
                    pass
            except TestServerError as e:
                raise TestServerError(self._problem(f"{op}: {e}")) from None
        if not answer["ok"]:
            raise TestServerError(f"{op}: {answer['error']}")
        return _decode(answer["result"])

    def _settings(self, settings: dict[str, Any]) -> None:
        self.port = settings["port"]
        self.tls_port = settings["tls_port"]
        self.cafile = settings["cafile"]

    # -- state -------------------------------------------------------------------

    def reset(self) -> None:
        """As new: connections cut, no users, no mail, no faults, TLS off, transcript empty."""
        self._settings(self._call("reset"))

    def enable_tls(self) -> str:
        """
        Offer STLS and listen for implicit TLS on L{tls_port}, with a
        certificate for localhost and 127.0.0.1 signed by a CA made for this
        server. Returns L{cafile}, for the client under test.
        """
        self._settings(self._call("enable_tls"))
        assert self.cafile is not None
        return self.cafile

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts this server (and only this server's CA)."""
        return ssl.create_default_context(cafile=self.cafile or self.enable_tls())

    def add_user(self, name: str, password: str) -> None:
        """A user who may log in with any mechanism (USER/PASS, APOP, SASL)."""
        self._call("add_user", name=name, password=password)

    def deliver(self, user: str, message: bytes | str | email.message.Message) -> str:
        """Deliver into C{user}'s maildrop through the store; returns the UIDL."""
        data = base64.b64encode(_messageBytes(message)).decode("ascii")
        return str(self._call("deliver", user=user, message=data))

    def messages(self, user: str) -> list[bytes]:
        """The messages in C{user}'s maildrop now, in delivery order, as stored."""
        return list(self._call("messages", user=user))

    def deleted(self, user: str) -> list[bytes]:
        """The messages delivered to C{user} that a session's UPDATE has removed."""
        return list(self._call("deleted", user=user))

    def transcript(self, connection: int | None = None) -> list[str]:
        """
        Every line of every session since the last reset, in order: C{"C: ..."}
        from the client, C{"S: ..."} from the server. Passwords, APOP digests
        and SASL responses read C{***}.

        @param connection: only this connection's (1 is the first; -1 the last).
        """
        entries = self._call("transcript")
        if connection is not None:
            numbers = sorted({n for n, _ in entries})
            if not numbers:
                return []
            wanted = numbers[connection] if connection < 0 else connection
            entries = [e for e in entries if e[0] == wanted]
        return [text for _, text in entries]

    # -- faults ------------------------------------------------------------------

    def fail(
        self,
        command: str,
        reply: str = "-ERR [SYS/TEMP] failure injected by the test",
        times: int | None = None,
    ) -> None:
        """
        Answer C{command} with C{reply} (a C{-ERR} line; put a response code
        such as C{[IN-USE]} in it) instead of running it, C{times} times
        (None: until reset).
        """
        self._call("fail", command=command, reply=reply, times=times)

    def drop_after(self, command: str, octets: int) -> None:
        """Cut the connection once C{octets} octets of C{command}'s reply are out."""
        self._call("drop_after", command=command, octets=octets)

    def delay(self, command: str, seconds: float) -> None:
        """Wait C{seconds} before taking up C{command} (and all that follows it)."""
        self._call("delay", command=command, seconds=seconds)

    def never_answer(self, command: str | None = None) -> None:
        """Never answer C{command}; with none, new connections get not even a greeting."""
        self._call("never_answer", command=command)

    def malformed(self, command: str, kind: str) -> None:
        """
        Spoil C{command}'s multi-line reply: C{"no_terminator"} (the final
        dot left out, then the connection closed), C{"bare_lf"} (LF instead
        of CRLF) or C{"unstuffed"} (lines starting with a dot sent as they
        are, not dot-stuffed).
        """
        self._call("malformed", command=command, kind=kind)

    def no_apop_timestamp(self) -> None:
        """Greet without an APOP timestamp (so APOP is not offered)."""
        self._call("no_apop_timestamp")

    def strictness(self, bare_lf: bool = True, max_line: int = 255) -> None:
        """
        What command lines are taken. The defaults are production's: a bare
        LF is taken as a line end, a line is at most 255 octets with its CRLF
        (RFC 2449). C{bare_lf=False} answers a line without CR with C{-ERR};
        C{max_line} takes longer lines from a sloppy client.
        """
        self._call("strictness", bare_lf=bare_lf, max_line=max_line)
