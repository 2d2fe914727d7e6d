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

__all__ = ["RunInThread", "reactorThreads", "synchronously"]

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
