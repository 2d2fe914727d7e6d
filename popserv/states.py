"""
The two state machines of a connection: the session states of RFC 1939
(L{State}) and the connection's own lifecycle (L{Lifecycle}), with the moves
the lifecycle may make.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["State", "Lifecycle", "TRANSITIONS", "BadTransition"]


class State(Enum):
    """The session states of RFC 1939 section 3."""

    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"

    # Members are singletons: hash by identity, in C. (Enum's own hashes the
    # name in Python, and every command looks its state up in a table.)
    __hash__ = object.__hash__


class Lifecycle(Enum):
    """
    Where a connection is between accept and the end of its accounting.

    Only L{OPEN} reads commands. A connection is accounted for (its logout
    line, the factory's sessions and limits) exactly once, on reaching
    L{ENDED}.
    """

    #: Reading and answering commands.
    OPEN = "open"
    #: Over a connection limit: told so, never counted, waiting to go.
    REFUSED = "refused"
    #: Told to go (QUIT before login, a limit, shutdown, a storage failure):
    #: no further command runs; the last reply is on its way.
    CLOSING = "closing"
    #: The autologout timer said goodbye: nothing more is written, and a
    #: client that does not go is cut after the factory's C{abortGrace}.
    TIMED_OUT = "timed out"
    #: QUIT in TRANSACTION: the UPDATE state is removing messages.
    UPDATING = "updating"
    #: UPDATE is done and its answer sent; waiting for the connection to go.
    UPDATED = "updated"
    #: The connection went away during UPDATE, which ends the session when done.
    ABANDONED = "abandoned"
    #: The connection went away (not during UPDATE): nothing more runs or is
    #: written while what it had open is released and the session accounted for.
    LOST = "lost"
    #: The connection is gone and the session accounted for.
    ENDED = "ended"

    __hash__ = object.__hash__  # as State's

    @property
    def connected(self) -> bool:
        """Is the connection still there?"""
        return self is not _ENDED and self is not _ABANDONED and self is not _LOST

    @property
    def silent(self) -> bool:
        """Must nothing more be written (the connection is gone, or timed out)?"""
        return self is _TIMED_OUT or not self.connected


_ENDED = Lifecycle.ENDED
_ABANDONED = Lifecycle.ABANDONED
_LOST = Lifecycle.LOST
_TIMED_OUT = Lifecycle.TIMED_OUT

#: The moves a lifecycle may make; anything else is a bug.
TRANSITIONS: dict[Lifecycle, frozenset[Lifecycle]] = {
    Lifecycle.OPEN: frozenset(
        {
            Lifecycle.REFUSED,
            Lifecycle.CLOSING,
            Lifecycle.TIMED_OUT,
            Lifecycle.UPDATING,
            Lifecycle.LOST,
        }
    ),
    Lifecycle.REFUSED: frozenset({Lifecycle.ENDED}),
    Lifecycle.CLOSING: frozenset({Lifecycle.LOST}),
    Lifecycle.TIMED_OUT: frozenset({Lifecycle.LOST}),
    Lifecycle.UPDATING: frozenset({Lifecycle.UPDATED, Lifecycle.ABANDONED}),
    Lifecycle.UPDATED: frozenset({Lifecycle.LOST}),
    Lifecycle.ABANDONED: frozenset({Lifecycle.ENDED}),
    Lifecycle.LOST: frozenset({Lifecycle.ENDED}),
    Lifecycle.ENDED: frozenset(),
}


class BadTransition(RuntimeError):
    """A lifecycle move L{TRANSITIONS} does not allow: a bug in the protocol."""
