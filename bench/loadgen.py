"""
The load generator: many POP3 client connections in one process, on raw
non-blocking sockets and one epoll loop.

Each client is a script, a Python generator that yields what to do next and
receives the responses:

    def script():
        greeting = yield GREETING
        yield Step(b"USER alice\\r\\n")
        listing = yield Step(b"UIDL\\r\\n", MULTI)
        retr, dele = yield Step(b"RETR 1\\r\\nDELE 1\\r\\n", 1234, SINGLE)  # pipelined;
                                  # 1234: a multi-line response of at least 1234 octets
        yield Park("ready")       # wait until the driver releases the "ready" group
        yield Step(b"QUIT\\r\\n")
        yield EOF                 # wait until the server closes the connection

Every status line must be "+OK"; anything else (an -ERR, an early close, a
stalled server) raises L{BenchError} out of L{Engine.run}, so no figure is
ever computed from a failed run.
"""

from __future__ import annotations

import errno
import hashlib
import resource
import select
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass
from time import perf_counter
from typing import Any

__all__ = [
    "BenchError",
    "Engine",
    "Step",
    "Park",
    "Response",
    "GREETING",
    "EOF",
    "STARTTLS",
    "SINGLE",
    "MULTI",
    "unstuff",
    "checkMessage",
    "raiseFileLimit",
]

SINGLE = -1
#: A multi-line response of unknown length. A multi-line response whose
#: un-stuffed body is known to be at least N octets (a RETR) is expected as
#: the number N itself: the terminator is then not searched for before N
#: octets have arrived.
MULTI = 0
#: Bodies at least this long are handed over without a copy.
_HANDOVER = 1024 * 1024
_RECV = 4 * 1024 * 1024
_TERMINATOR = b"\r\n.\r\n"


class BenchError(Exception):
    """A server misbehaved (or stalled): the run is invalid."""


@dataclass(frozen=True)
class Response:
    status: bytes  # the status line, without CRLF
    #: multi-line: the data lines (still byte-stuffed), CRLFs kept; a large
    #: body is a memoryview of the receive buffer
    body: bytes | memoryview | None = None
    at: float = 0.0  # perf_counter() when the response was complete (before any copying)


@dataclass(frozen=True)
class Step:
    """Send C{data} (may be empty) and wait for one response per entry of C{expect}."""

    data: bytes
    expect: tuple[int, ...]

    def __init__(self, data: bytes, *expect: int) -> None:
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "expect", expect or (SINGLE,))


@dataclass(frozen=True)
class Park:
    """Wait until the driver calls L{Engine.release} for C{tag}."""

    tag: str


GREETING = Step(b"", SINGLE)
EOF = object()
#: Start TLS on the connection now (after the server's +OK to STLS); the
#: script resumes when the handshake is done.
STARTTLS = object()

Script = Generator[Any, Any, Any]


def unstuff(body: bytes) -> bytes:
    """Undo RFC 1939 byte-stuffing of a multi-line body (CRLFs kept)."""
    out = body.replace(b"\r\n..", b"\r\n.")
    if out.startswith(b".."):
        out = out[1:]
    return out


def checkMessage(body: bytes | memoryview, size: int, digest: bytes | None, what: str) -> int:
    """Check a RETR body against the seeded message; returns its un-stuffed length."""
    data = unstuff(bytes(body))
    if len(data) != size:
        raise BenchError(f"{what}: received {len(data)} octets, the message has {size}")
    if digest is not None and hashlib.sha256(data).digest() != digest:
        raise BenchError(f"{what}: content differs from the seeded message")
    return len(data)


def raiseFileLimit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class _Conn:
    __slots__ = (
        "sock",
        "fd",
        "script",
        "name",
        "inbuf",
        "pos",
        "statusEnd",
        "scan",
        "expect",
        "got",
        "out",
        "connected",
        "waitEOF",
        "last",
        "onDone",
        "handshaking",
    )

    def __init__(self, sock: socket.socket, script: Script, name: str, onDone: Any) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.script = script
        self.name = name
        self.inbuf = bytearray()
        self.pos = 0
        self.statusEnd = -1
        self.scan = 0
        self.expect: deque[int] = deque()
        self.got: list[Response] = []
        self.out = b""
        self.connected = False
        self.waitEOF = False
        self.last = b"(connect)"
        self.onDone = onDone
        self.handshaking = False


class Engine:
    """One epoll loop driving any number of scripted connections to one port."""

    def __init__(
        self,
        port: int,
        host: str = "127.0.0.1",
        stallTimeout: float = 60,
        tls: ssl.SSLContext | None = None,
        implicitTLS: bool = False,
        resume: bool = False,
    ) -> None:
        self.address = (host, port)
        self.stallTimeout = stallTimeout
        #: TLS: from the start (implicitTLS) or when a script yields STARTTLS;
        #: with C{resume}, each handshake offers the last session the server gave.
        self.tls = tls
        self.implicitTLS = implicitTLS
        self.resume = resume
        self.session: ssl.SSLSession | None = None
        self.handshakes = 0
        self.resumed = 0
        self._ep = select.epoll()
        self._conns: dict[int, _Conn] = {}
        self._parked: dict[str, list[_Conn]] = {}
        self._buf = bytearray(_RECV)
        self._view = memoryview(self._buf)
        self.completed = 0

    # -- driver API ------------------------------------------------------------

    @property
    def active(self) -> int:
        return len(self._conns)

    def parked(self, tag: str) -> int:
        return len(self._parked.get(tag, ()))

    def start(
        self,
        script: Script,
        name: str = "client",
        onDone: Callable[[Any], object] | None = None,
    ) -> None:
        """Connect and run C{script}; C{onDone(result)} when it returns."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(self.address)
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            raise BenchError(f"{name}: connect: {errno.errorcode.get(err, err)}")
        conn = _Conn(sock, script, name, onDone)
        self._conns[conn.fd] = conn
        self._ep.register(conn.fd, select.EPOLLIN | select.EPOLLOUT)

    def release(self, tag: str) -> None:
        """Resume every connection parked on C{tag}."""
        for conn in self._parked.pop(tag, []):
            if conn.fd in self._conns:
                self._advance(conn, None)

    def run(self, until: Callable[[], bool] | None = None, timeout: float | None = None) -> None:
        """
        Run until C{until()} is true, or until no connection is left that is
        not parked. Raises L{BenchError} if nothing happens for
        C{stallTimeout} seconds or after C{timeout} seconds in all.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        lastEvent = time.monotonic()
        poll, conns = self._ep.poll, self._conns
        while True:
            if until is not None and until():
                return
            parked = sum(len(v) for v in self._parked.values())
            if until is None and len(conns) <= parked:
                return
            events = poll(0.5)
            now = time.monotonic()
            if events:
                lastEvent = now
            elif now - lastEvent > self.stallTimeout:
                raise BenchError(
                    f"no response for {self.stallTimeout:.0f}s; {len(conns)} connections open, "
                    f"e.g. {self._describeStalled()}"
                )
            if deadline is not None and now > deadline:
                raise BenchError(f"timed out; {len(conns)} connections still open")
            for fd, mask in events:
                conn = conns.get(fd)
                if conn is None:
                    continue
                if not conn.connected:
                    self._connected(conn)
                    if fd not in conns:
                        continue
                    if conn.handshaking:
                        continue
                if conn.handshaking:
                    self._handshake(conn)
                    continue
                if mask & select.EPOLLOUT and conn.out:
                    self._flush(conn)
                if mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                    self._read(conn)
                    if self.tls is not None:
                        self._drain(conn)

    def close(self) -> None:
        for conn in list(self._conns.values()):
            self._drop(conn)
        self._parked.clear()
        self._ep.close()

    # -- internals -------------------------------------------------------------

    def _describeStalled(self) -> str:
        for conn in self._conns.values():
            if conn.expect or conn.waitEOF:
                return f"{conn.name} waiting after {conn.last[:40]!r}"
        return "all parked"

    def _connected(self, conn: _Conn) -> None:
        err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(conn, f"connect failed: {errno.errorcode.get(err, err)}")
        conn.connected = True
        self._ep.modify(conn.fd, select.EPOLLIN)
        if self.implicitTLS:
            self._startTLS(conn)
            return
        self._advance(conn, None)

    def _startTLS(self, conn: _Conn) -> None:
        assert self.tls is not None
        conn.sock = self.tls.wrap_socket(
            conn.sock,
            do_handshake_on_connect=False,
            session=self.session if self.resume else None,
        )
        conn.handshaking = True
        self._handshake(conn)

    def _handshake(self, conn: _Conn) -> None:
        sock = conn.sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._ep.modify(conn.fd, select.EPOLLIN)
            return
        except ssl.SSLWantWriteError:
            self._ep.modify(conn.fd, select.EPOLLIN | select.EPOLLOUT)
            return
        except (ssl.SSLError, OSError) as e:
            self._fail(conn, f"TLS handshake: {e}")
        conn.handshaking = False
        self._ep.modify(conn.fd, select.EPOLLIN)
        self.handshakes += 1
        if sock.session_reused:
            self.resumed += 1
        self._advance(conn, None)
        if conn.fd in self._conns:
            self._drain(conn)

    def _drain(self, conn: _Conn) -> None:
        """Read what TLS has decrypted already: epoll will not say so again."""
        while conn.fd in self._conns and isinstance(conn.sock, ssl.SSLSocket):
            if not conn.sock.pending():
                return
            self._read(conn)

    def _fail(self, conn: _Conn, why: str) -> None:
        raise BenchError(f"{conn.name}: {why} (last command sent: {conn.last[:60]!r})")

    def _advance(self, conn: _Conn, value: Any) -> None:
        try:
            action = conn.script.send(value)
        except StopIteration as stop:
            self._finish(conn, stop.value)
            return
        if isinstance(action, Step):
            conn.expect.extend(action.expect)
            conn.got = []
            if action.data:
                conn.last = action.data
                self._send(conn, action.data)
            # Responses may already be buffered (read along with earlier ones).
            if conn.inbuf:
                self._parse(conn)
        elif isinstance(action, Park):
            self._parked.setdefault(action.tag, []).append(conn)
        elif action is STARTTLS:
            self._startTLS(conn)
        elif action is EOF:
            conn.waitEOF = True
            if conn.inbuf[conn.pos :]:
                self._fail(conn, f"unexpected data before close: {bytes(conn.inbuf[:60])!r}")
        else:
            raise TypeError(f"script yielded {action!r}")

    def _send(self, conn: _Conn, data: bytes) -> None:
        if conn.out:
            conn.out += data
            return
        try:
            n = conn.sock.send(data)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            n = 0
        except OSError as e:
            self._fail(conn, f"send: {e}")
        if n < len(data):
            conn.out = data[n:]
            self._ep.modify(conn.fd, select.EPOLLIN | select.EPOLLOUT)

    def _flush(self, conn: _Conn) -> None:
        try:
            n = conn.sock.send(conn.out)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except OSError as e:
            self._fail(conn, f"send: {e}")
        conn.out = conn.out[n:]
        if not conn.out:
            self._ep.modify(conn.fd, select.EPOLLIN)

    def _read(self, conn: _Conn) -> None:
        try:
            n = conn.sock.recv_into(self._buf)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except ssl.SSLZeroReturnError:
            n = 0
        except OSError as e:
            if conn.waitEOF and isinstance(e, ssl.SSLError):
                n = 0  # a server that closes without close_notify
            else:
                self._fail(conn, f"recv: {e}")
        if n == 0:
            if conn.waitEOF:
                conn.waitEOF = False
                self._drop(conn)
                self._advance(conn, None)
                return
            self._fail(conn, "server closed the connection")
        if conn.waitEOF:
            self._fail(conn, f"unexpected data before close: {bytes(self._view[: min(n, 60)])!r}")
        conn.inbuf += self._view[:n]
        if conn.expect:
            self._parse(conn)
        else:
            self._fail(conn, f"unexpected data: {bytes(conn.inbuf[:60])!r}")

    def _parse(self, conn: _Conn) -> None:
        buf = conn.inbuf
        expect = conn.expect
        while expect:
            if conn.statusEnd < 0:
                eol = buf.find(b"\r\n", conn.pos)
                if eol < 0:
                    if len(buf) - conn.pos > 4096:
                        self._fail(conn, "status line too long")
                    return
                status = bytes(buf[conn.pos : eol])
                if not status.startswith(b"+OK"):
                    self._fail(conn, f"server said {status[:200]!r}")
                if expect[0] == SINGLE:
                    conn.got.append(Response(status, None, perf_counter()))
                    conn.pos = eol + 2
                    expect.popleft()
                    continue
                conn.statusEnd = eol + 2
                # The body's last CRLF starts the terminator: not before
                # (known minimum length - 2) octets of body.
                conn.scan = max(eol, eol + expect[0])
            if len(buf) < conn.scan + 5:
                return
            end = buf.find(_TERMINATOR, conn.scan)
            if end < 0:
                conn.scan = max(conn.scan, len(buf) - 4)
                return
            at = perf_counter()
            start = conn.statusEnd
            status = bytes(buf[conn.pos : start - 2])
            if end + 2 - start >= _HANDOVER:
                # Hand the whole buffer over; the connection continues in a new one.
                body: bytes | memoryview = memoryview(buf)[start : end + 2]
                conn.inbuf = buf = bytearray(buf[end + 5 :])
                conn.pos = 0
            else:
                with memoryview(buf) as view:
                    body = bytes(view[start : end + 2])
                conn.pos = end + 5
            conn.got.append(Response(status, body, at))
            conn.statusEnd = -1
            expect.popleft()
        # The step is complete: drop what was consumed and hand the responses over.
        del buf[: conn.pos]
        conn.pos = 0
        got = conn.got
        conn.got = []
        self._advance(conn, got[0] if len(got) == 1 else got)

    def _drop(self, conn: _Conn) -> None:
        if conn.fd in self._conns:
            if self.resume and isinstance(conn.sock, ssl.SSLSocket):
                session = conn.sock.session
                if session is not None and session.has_ticket:
                    self.session = session  # for the next handshakes to offer
            del self._conns[conn.fd]
            try:
                self._ep.unregister(conn.fd)
            except (OSError, ValueError):
                pass
            conn.sock.close()

    def _finish(self, conn: _Conn, result: Any) -> None:
        self._drop(conn)
        self.completed += 1
        if conn.onDone is not None:
            conn.onDone(result)
