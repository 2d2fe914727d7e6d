"""
Streaming multi-line responses to the transport with back-pressure.

A message is never read whole into memory: L{MessageProducer} pulls chunks from
an L{IMessageReader}, runs them through a L{MessageEncoder} and writes them
while the transport wants more. L{LinesProducer} does the same for long
listings (LIST, UIDL of a large maildrop).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from popserv.interfaces import IMessageReader
from popserv.wire import MessageEncoder

__all__ = ["MessageProducer", "LinesProducer", "READ_CHUNK"]

#: Bytes read from storage per step. Large enough that per-chunk Python
#: overhead is negligible next to the bulk bytes operations on it.
READ_CHUNK = 256 * 1024

_log = Logger()


@implementer(IPushProducer)
class _PushProducer:
    """
    The shared pump: write pieces while the consumer is not paused, wait for
    asynchronous pieces, finish once, and fire L{done}.

    Subclasses provide L{_next}, which returns bytes, a Deferred of bytes, or
    None at the end.
    """

    def __init__(
        self,
        consumer: IConsumer,
        prefix: bytes = b"",
        onProgress: Callable[[], object] | None = None,
    ) -> None:
        self._consumer = consumer
        #: A transport's (L{IConsumer} has only C{write}).
        self._writeSequence: Callable[[Sequence[bytes]], object] | None = getattr(
            consumer, "writeSequence", None
        )
        self._prefix = prefix
        self._onProgress = onProgress
        self._paused = False
        self._waiting = False
        self._pumping = False
        self._finished = False
        #: Bytes written so far (the status line included).
        self.written = 0
        self.done: Deferred[None] = Deferred()

    def start(self) -> Deferred[None]:
        """Register with the consumer and start writing; fires when complete."""
        self._consumer.registerProducer(self, True)
        self._pump()
        return self.done

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self._onProgress is not None:
            self._onProgress()
        self._pump()

    def stopProducing(self) -> None:
        """The connection went away: release resources, report it."""
        self._end(Failure(ConnectionLost("connection lost while streaming")))

    def _next(self) -> bytes | Deferred[bytes | None] | None:
        raise NotImplementedError()

    def _close(self) -> None:
        """Release whatever the subclass holds; called exactly once."""

    def _pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            while not (self._paused or self._waiting or self._finished):
                try:
                    piece = self._next()
                except Exception:
                    self._end(Failure())
                    return
                if isinstance(piece, Deferred):
                    self._waiting = True
                    piece.addCallbacks(self._gotAsync, self._end)
                    continue  # it may have fired already
                self._write(piece)
        finally:
            self._pumping = False

    def _gotAsync(self, piece: bytes | None) -> None:
        self._waiting = False
        self._write(piece)
        self._pump()

    def _write(self, piece: bytes | None) -> None:
        if self._finished:
            return
        if self._prefix:
            # The status line goes out with the first data, so a small
            # response is one segment: beside it, not copied in front of it.
            prefix, self._prefix = self._prefix, b""
            if piece and self._writeSequence is not None:
                self.written += len(prefix) + len(piece)
                self._writeSequence((prefix, piece))
            else:
                self._writePiece(prefix + (piece or b""))
        elif piece:
            self._writePiece(piece)
        if piece is None:
            self._end(None)

    def _writePiece(self, piece: bytes) -> None:
        self.written += len(piece)
        self._consumer.write(piece)

    def _end(self, reason: Failure | None) -> None:
        if self._finished:
            return
        self._finished = True
        try:
            self._close()
        except Exception:
            _log.failure("error releasing a streamed resource")
        if reason is None or not reason.check(ConnectionLost):
            self._consumer.unregisterProducer()
        if reason is None:
            self.done.callback(None)
        else:
            self.done.errback(reason)


class MessageProducer(_PushProducer):
    """Stream one message (RETR) or its top (TOP), byte-stuffed and terminated."""

    def __init__(
        self,
        consumer: IConsumer,
        reader: IMessageReader,
        prefix: bytes = b"",
        topLines: int | None = None,
        onProgress: Callable[[], object] | None = None,
        chunkSize: int = READ_CHUNK,
    ) -> None:
        super().__init__(consumer, prefix, onProgress)
        self._reader = reader
        # Transfer form is sent as stored (RETR) or only cut (TOP); a
        # plugin's reader from before the attribute gives the message itself.
        self._encoder = MessageEncoder(topLines, getattr(reader, "transferForm", False))
        self._chunkSize = chunkSize
        self._eof = False

    def _next(self) -> bytes | Deferred[bytes | None] | None:
        if self._eof:
            return None
        if self._encoder.done:
            self._eof = True
            return self._encoder.finish()
        data = self._reader.read(self._chunkSize)
        if isinstance(data, Deferred):
            return data.addCallback(self._encode)
        return self._encode(data)

    def _encode(self, data: bytes) -> bytes:
        if not data:
            self._eof = True
            return self._encoder.finish()
        return self._encoder.feed(data)

    def _close(self) -> None:
        self._reader.close()


class LinesProducer(_PushProducer):
    """
    Stream pre-formatted CRLF-terminated text, then the terminating ".". The
    iterator may yield single lines or chunks of many lines: each item is
    written as it comes, so a long listing goes out in a few large writes.
    """

    def __init__(
        self,
        consumer: IConsumer,
        lines: Iterator[bytes],
        prefix: bytes = b"",
        onProgress: Callable[[], object] | None = None,
    ) -> None:
        super().__init__(consumer, prefix, onProgress)
        self._lines = lines
        self._eof = False

    def _next(self) -> bytes | None:
        if self._eof:
            return None
        piece = next(self._lines, None)
        if piece is None:
            self._eof = True
            return b".\r\n"
        return piece
