"""The L{IMessageWriter} of a blocking delivery whose steps run in threads."""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.defer import Deferred
from zope.interface import implementer

from popserv.interfaces import IMessageWriter
from popserv.threads import RunInThread

__all__ = ["BlockingDelivery", "ThreadedWriter"]


class BlockingDelivery(Protocol):
    """A delivery written, committed or aborted by blocking calls (files)."""

    def write(self, data: bytes) -> Any: ...

    def commit(self) -> str: ...

    def abort(self) -> Any: ...


@implementer(IMessageWriter)
class ThreadedWriter:
    """L{IMessageWriter} for a L{BlockingDelivery}: each step in a thread."""

    def __init__(self, delivery: BlockingDelivery, runInThread: RunInThread) -> None:
        self.delivery = delivery
        self._run = runInThread

    def write(self, data: bytes) -> Deferred[None]:
        return self._run(self.delivery.write, data)

    def commit(self) -> Deferred[str]:
        return self._run(self.delivery.commit)

    def abort(self) -> Deferred[None]:
        return self._run(self.delivery.abort)
