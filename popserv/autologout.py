"""
The autologout timer (RFC 1939 section 3) of every session of a factory.

A session only records its deadline, a float; one delayed call per factory
wakes at the earliest deadline, logs out whoever is due and sleeps until the
next one. Twisted's C{TimeoutMixin} instead keeps a C{DelayedCall} per
connection, about 300 bytes each, which is most of what an idle session costs
beyond its socket; and pushing a deadline later on each command is cheaper
than resetting a delayed call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

__all__ = ["AutologoutTimer", "Expiring"]

_log = Logger()


class Expiring(Protocol):
    """What the timer needs of a session."""

    #: When the session is to be logged out (clock seconds), or None.
    deadline: float | None

    def timeoutConnection(self) -> None:
        """The deadline has passed: end the session."""


class AutologoutTimer:
    """
    Logs out the sessions of C{sessions()} whose deadline has passed.

    A session that moves its deadline earlier than any before calls
    L{wake}; moving it later needs nothing. When a wake-up finds nobody due
    (every session was active meanwhile), it goes back to sleep until the
    new earliest deadline, but never sooner than C{minInterval} later: with
    thousands of busy sessions, the scan runs at most that often, and a
    session is logged out at most that late.
    """

    def __init__(
        self,
        clock: IReactorTime,
        sessions: Callable[[], Collection[Expiring]],
        minInterval: float = 1.0,
    ) -> None:
        self.clock = clock
        self._sessions = sessions
        self.minInterval = minInterval
        self._call: IDelayedCall | None = None
        self._at = math.inf

    def wake(self, deadline: float) -> None:
        """Make sure the timer runs no later than C{deadline}."""
        if deadline >= self._at:
            return
        if self._call is not None:
            self._call.cancel()
        self._at = deadline
        self._call = self.clock.callLater(max(0.0, deadline - self.clock.seconds()), self._run)

    def stop(self) -> None:
        """Cancel the pending wake-up (the factory is going away)."""
        if self._call is not None:
            self._call.cancel()
        self._call = None
        self._at = math.inf

    def _run(self) -> None:
        self._call = None
        self._at = math.inf
        now = self.clock.seconds()
        soonest = math.inf
        due = []
        for session in self._sessions():
            deadline = session.deadline
            if deadline is None:
                continue
            if deadline <= now:
                due.append(session)
            elif deadline < soonest:
                soonest = deadline
        try:
            for session in due:
                session.deadline = None
                try:
                    session.timeoutConnection()
                except Exception:
                    # One session's failure must not spare the others, nor
                    # stop the timer for everyone.
                    _log.failure("autologout of {session} failed", session=session)
        finally:
            if soonest < math.inf:
                self.wake(max(soonest, now + self.minInterval))
