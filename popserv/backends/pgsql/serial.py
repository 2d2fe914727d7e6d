"""
One thread running a store's blocking calls in the order they were made,
for work that is serialized anyway (the maildrop locks all live on one
connection behind one mutex).

It costs the reactor less per call than the shared thread pool
(C{deferToThreadPool}: a context copy, a coordinator hop and a wake-up per
call): a call is one put on a C{queue.SimpleQueue}, and results go back to
the reactor in batches, one C{callFromThread} for all the results that
piled up while the reactor was busy. A login under load takes its lock and
gives it back through here.

Order is kept: a release queued before an acquire of the same maildrop
runs first, so a user who logs in again right after QUIT is not refused.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

__all__ = ["SerialThread"]

_STOP = object()


class SerialThread:
    """
    C{serial(f, *args)}: a Deferred of C{f(*args)} run on this object's one
    thread (started at the first call), fired on the reactor thread.

    @param reactor: the reactor to report to (the global one if None).
    @param name: the thread's name.
    """

    def __init__(self, reactor: Any = None, name: str = "popserv-pgsql-locks") -> None:
        self._reactor = reactor
        self._name = name
        self._queue: SimpleQueue[Any] = SimpleQueue()
        self._thread: threading.Thread | None = None
        self._done: list[tuple[Deferred[Any], bool, Any]] = []
        self._doneLock = threading.Lock()
        self._startLock = threading.Lock()

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        if self._thread is None:
            self._start()
        self._queue.put((d, f, args))
        return d

    def _start(self) -> None:
        with self._startLock:
            if self._thread is not None:
                return
            if self._reactor is None:
                from twisted.internet import reactor

                self._reactor = reactor
            thread = threading.Thread(
                target=self._work, args=(self._queue,), name=self._name, daemon=True
            )
            thread.start()
            self._thread = thread

    def _work(self, queue: SimpleQueue[Any]) -> None:
        get, done, lock = queue.get, self._done, self._doneLock
        while True:
            item = get()
            if item is _STOP:
                return
            d, f, args = item
            try:
                outcome = (d, True, f(*args))
            except BaseException:
                outcome = (d, False, Failure())
            with lock:
                done.append(outcome)
                wake = len(done) == 1
            if wake:  # else the reactor has a delivery of them coming already
                self._reactor.callFromThread(self._deliver)
            del item, d, outcome

    def _deliver(self) -> None:
        with self._doneLock:
            results = self._done[:]
            self._done.clear()
        for d, ok, value in results:
            if ok:
                d.callback(value)
            else:
                d.errback(value)

    def stop(self) -> None:
        """
        End the thread once the calls queued so far have run (it does not
        wait); a call after this starts a new one.
        """
        with self._startLock:
            if self._thread is not None:
                self._queue.put(_STOP)
                self._queue = SimpleQueue()
                self._thread = None
