"""The producers: back-pressure, asynchronous reads, clean-up on disconnect."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IConsumer
from zope.interface import implementer

from popserv.streaming import LinesProducer, MessageProducer


@implementer(IConsumer)
class PausingConsumer:
    """Pauses its producer after every write, as a full socket buffer would."""

    def __init__(self):
        self.data = []
        self.producer = None
        self.unregistered = False

    def registerProducer(self, producer, streaming):
        assert streaming
        self.producer = producer

    def unregisterProducer(self):
        self.unregistered = True

    def write(self, data):
        self.data.append(data)
        self.producer.pauseProducing()


class Reader:
    transferForm = False

    def __init__(self, data: bytes, asynchronous: bool = False):
        self.data = data
        self.pos = 0
        self.reads = 0
        self.closed = 0
        self.asynchronous = asynchronous
        self.pending: list[Deferred] = []

    def read(self, size):
        self.reads += 1
        chunk = self.data[self.pos : self.pos + size]
        self.pos += len(chunk)
        if self.asynchronous:
            d = Deferred()
            self.pending.append((d, chunk))
            return d
        return chunk

    def close(self):
        self.closed += 1


def test_one_chunk_per_resume_never_the_whole_message():
    """Back-pressure: while paused nothing is read, so memory stays one chunk."""
    message = b"x" * 100 + b"\n"
    consumer = PausingConsumer()
    reader = Reader(message * 100)
    producer = MessageProducer(consumer, reader, b"+OK\r\n", chunkSize=1000)
    done = producer.start()
    assert reader.reads == 1 and len(consumer.data) == 1
    while not done.called:
        producer.resumeProducing()
        assert reader.pos <= 1000 * len(consumer.data)
    out = b"".join(consumer.data)
    assert out == b"+OK\r\n" + (b"x" * 100 + b"\r\n") * 100 + b".\r\n"
    assert reader.closed == 1 and consumer.unregistered


def test_asynchronous_reads():
    consumer = PausingConsumer()
    reader = Reader(b".a\nb\n", asynchronous=True)
    producer = MessageProducer(consumer, reader, b"+OK\r\n", chunkSize=2)
    done = producer.start()
    while reader.pending:
        d, chunk = reader.pending.pop(0)
        d.callback(chunk)
        producer.resumeProducing()
    assert done.called
    assert b"".join(consumer.data) == b"+OK\r\n..a\r\nb\r\n.\r\n"


def test_top_stops_reading_early():
    consumer = PausingConsumer()
    reader = Reader(b"H: 1\n\nline\n" * 10000)
    producer = MessageProducer(consumer, reader, b"", topLines=1, chunkSize=64)
    done = producer.start()
    while not done.called:
        producer.resumeProducing()
    assert b"".join(consumer.data) == b"H: 1\r\n\r\nline\r\n.\r\n"
    assert reader.reads == 1


def test_disconnect_mid_stream_closes_the_reader_once():
    consumer = PausingConsumer()
    reader = Reader(b"y\n" * 10000)
    producer = MessageProducer(consumer, reader, b"+OK\r\n", chunkSize=10)
    done = producer.start()
    failures = []
    done.addErrback(failures.append)
    producer.stopProducing()
    producer.stopProducing()
    producer.resumeProducing()
    assert failures and failures[0].check(ConnectionLost)
    assert reader.closed == 1
    assert len(consumer.data) == 1


def test_lines_producer_writes_chunk_by_chunk_and_waits_when_paused():
    consumer = PausingConsumer()
    pulled = []

    def chunks():
        for i in range(10):
            pulled.append(i)
            yield b"".join(b"%d 100\r\n" % (i * 1000 + j) for j in range(1, 1001))

    producer = LinesProducer(consumer, chunks(), b"+OK\r\n")
    done = producer.start()
    assert pulled == [0]  # paused after the first write: nothing more is built
    while not done.called:
        producer.resumeProducing()
    assert len(consumer.data) == 11
    out = b"".join(consumer.data)
    assert out.startswith(b"+OK\r\n1 100\r\n") and out.endswith(b"10000 100\r\n.\r\n")
