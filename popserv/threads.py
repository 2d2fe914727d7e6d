"""
How blocking work (directory scans, file reads, slow password hashes) is kept
off the reactor thread.

Components that block take a L{RunInThread} callable instead of reaching for
the global reactor, so tests can run the same code synchronously.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred

__all__ = ["RunInThread", "reactorThreads", "synchronously", "waitFor"]

#: C{runInThread(f, *args)} returns a Deferred firing with C{f(*args)}.
RunInThread = Callable[..., Deferred[Any]]


def reactorThreads(reactor: Any = None) -> RunInThread:
    """Run in the reactor's thread pool (the global reactor if none is given)."""
    from twisted.internet.threads import deferToThreadPool

    def run(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        r = reactor
        if r is None:
            from twisted.internet import reactor as r
        return deferToThreadPool(r, r.getThreadPool(), f, *args)

    return run


def synchronously(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """Run on the calling thread: for tests and for callers that accept blocking."""
    return maybeDeferred(f, *args)


def waitFor(d: Deferred[Any]) -> Any:
    """
    The result (or Failure) of C{d}, blocking, for command-line tools: at
    once from a store that answers at once (files, with L{synchronously}),
    else once the reactor, run for this alone, brings it (a store across the
    network). The reactor runs at most once per process: wait for one
    Deferred covering all the work.

    @raise KeyboardInterrupt: the reactor stopped first (SIGINT, SIGTERM).
    """
    results: list[Any] = []
    d.addBoth(results.append)
    if not results:
        from twisted.internet import reactor

        d.addBoth(lambda _: reactor.stop())
        reactor.run()
        if not results:
            raise KeyboardInterrupt
    return results[0]
