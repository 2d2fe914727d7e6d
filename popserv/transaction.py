"""
The TRANSACTION state's commands (RFC 1939 section 5: STAT, LIST, UIDL,
RETR, TOP, DELE, NOOP, RSET) and QUIT with the UPDATE state it starts
(section 6). What they mean for the maildrop is L{popserv.session.Transaction}'s
business; here they are read off the wire and answered.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from popserv import commands, wire
from popserv.commands import Capability, command
from popserv.errors import RemovalIncomplete
from popserv.interfaces import MessageInfo
from popserv.login import Authorization
from popserv.session import Transaction
from popserv.states import Lifecycle, State
from popserv.streaming import MessageProducer

__all__ = ["TransactionCommands"]

_log = Logger()

_TRANSACTION = (State.TRANSACTION,)


class TransactionCommands(Authorization):
    """The commands of a logged-in session, and the end of it in UPDATE."""

    __slots__ = ()

    def _session(self) -> Transaction:
        assert self.transaction is not None
        return self.transaction

    @command("STAT", states=_TRANSACTION)
    def do_STAT(self) -> bytes:
        count, size = self._session().stat()
        return wire.ok(f"{count} {size}")

    @command("LIST", states=_TRANSACTION, parse=commands.optionalMessage)
    def do_LIST(self, number: int | None) -> bytes | Deferred[bytes]:
        session = self._session()
        if number is not None:
            return wire.ok(f"{number} {session.get(number).size}")
        count, size = session.stat()
        return self._streamLines(
            self._ok("{messages} ({octets})", **self._counts(count, size)),
            session.listingChunks(sizes=True),
        )

    @command(
        "UIDL",
        states=_TRANSACTION,
        parse=commands.optionalMessage,
        capability=Capability("UIDL", rank=20),
    )
    def do_UIDL(self, number: int | None) -> bytes | Deferred[bytes]:
        session = self._session()
        if number is not None:
            return wire.ok(f"{number} {session.get(number).uid}")
        return self._streamLines(
            self._ok("Unique-ID listing follows"), session.listingChunks(sizes=False)
        )

    @command("RETR", states=_TRANSACTION, parse=commands.message)
    def do_RETR(self, number: int) -> Deferred[bytes]:
        session = self._session()
        info = session.get(number)
        # The status line stays "<size> octets" in every language: clients parse it.
        d = self._streamMessage(info, wire.ok(f"{info.size} octets"), None)
        return d.addCallback(self._retrieved, number)

    def _retrieved(self, result: bytes, number: int) -> bytes:
        self._session().retrieved(number)
        self.stats.retr += 1
        self.stats.retr_bytes += self._lastStreamed
        return result

    @command("TOP", states=_TRANSACTION, parse=commands.top, capability=Capability("TOP", rank=10))
    def do_TOP(self, number: int, lines: int) -> Deferred[bytes]:
        info = self._session().get(number)
        d = self._streamMessage(info, self._ok("Top of message follows"), lines)
        return d.addCallback(self._topped)

    def _topped(self, result: bytes) -> bytes:
        self.stats.top += 1
        self.stats.top_bytes += self._lastStreamed
        return result

    @command("DELE", states=_TRANSACTION, parse=commands.message)
    def do_DELE(self, number: int) -> bytes:
        self._session().delete(number)
        self.stats.dele += 1
        return self._ok("Message {number} deleted", number=number)

    @command("NOOP", states=_TRANSACTION)
    def do_NOOP(self) -> bytes:
        return wire.ok()

    @command("RSET", states=_TRANSACTION)
    def do_RSET(self) -> bytes:
        session = self._session()
        session.reset()
        count, size = session.stat()
        return self._ok("Maildrop has {messages} ({octets})", **self._counts(count, size))

    # -- streaming a message -------------------------------------------------------

    def _streamMessage(
        self, info: MessageInfo, status: bytes, topLines: int | None
    ) -> Deferred[bytes]:
        started = time.monotonic()
        d = maybeDeferred(self._session().mailbox.openMessage, info)
        d.addCallback(self._startMessage, status, topLines, started)
        return d

    def _startMessage(
        self, reader: Any, status: bytes, topLines: int | None, started: float
    ) -> Deferred[bytes] | bytes:
        self.stats.backend("open", started)
        if self.lifecycle.silent:
            reader.close()
            return b""
        producer = MessageProducer(
            self.transport, reader, status, topLines, onProgress=self.resetTimeout
        )
        return self._runProducer(producer)

    # -- QUIT and UPDATE -------------------------------------------------------------

    @command("QUIT")
    def do_QUIT(self) -> Deferred[bytes] | bytes | None:
        implementation = self.factory.implementation
        self.stats.reason = "quit"
        if self.state is State.AUTHORIZATION:
            self.transport.write(
                self._ok("{implementation} signing off", implementation=implementation)
            )
            self._disconnectNow()
            return None
        # TRANSACTION -> UPDATE (RFC 1939 section 6). Anything pipelined after
        # QUIT is ignored.
        self.state = State.UPDATE
        self._moveTo(Lifecycle.UPDATING)
        self.setTimeout(None)  # UPDATE finishes whatever the client does
        session = self._session()
        assert self.settings is not None
        removals = session.removals(
            expireRetrieved=self.settings.expire == 0,
            receivedBefore=self.factory.policy.expiryCutoff(self.settings),
        )
        started = time.monotonic()
        if not removals:  # most sessions: nothing to remove, no callback chain
            return self._updated((), removals, started)
        d = session.commit(removals)
        d.addCallbacks(self._updated, self._updateFailed, callbackArgs=(removals, started))
        return d

    def _updated(
        self, notRemoved: list[MessageInfo], removals: list[MessageInfo], started: float
    ) -> bytes | Deferred[bytes]:
        if removals:
            self.stats.backend("remove", started)
        session = self._session()
        released = self._runLogout()
        self.stats.removed = len(removals) - len(notRemoved)
        self.stats.left = len(session) - self.stats.removed
        if notRemoved:
            _log.warn(
                "{user}: {failed} of {marked} deleted messages could not be removed",
                user=self.user,
                marked=len(removals),
                failed=len(notRemoved),
            )
            reply = self._fail(RemovalIncomplete())
        else:
            left = len(session) - len(removals)
            reply = self._ok(
                "{implementation} signing off ({messages} left)",
                implementation=self.factory.implementation,
                messages=self.language.count(left, "message"),
            )
        return self._updateFinished(reply, released)

    def _updateFailed(self, failure: Failure) -> bytes | Deferred[bytes]:
        _log.failure("UPDATE failed for {user}", failure, user=self.user)
        released = self._runLogout()
        self.stats.reason = "error"
        return self._updateFinished(self._fail(RemovalIncomplete()), released)

    def _updateFinished(self, reply: bytes, released: Any = None) -> bytes | Deferred[bytes]:
        """
        Say goodbye once the maildrop is released (a client that logs in again
        at once must find it free), or end the session if the client is gone.
        """
        if isinstance(released, Deferred) and not released.called:
            return released.addBoth(lambda _: self._goodbye(reply))
        return self._goodbye(reply)

    def _goodbye(self, reply: bytes) -> bytes:
        if self.lifecycle is Lifecycle.ABANDONED:
            self._endSession()
            return b""
        self._moveTo(Lifecycle.UPDATED)
        self.transport.write(reply)
        self.transport.loseConnection()
        return b""

    def _endSession(self) -> None:
        """Account for the session, once: see L{popserv.protocol.POP3Protocol}."""
        raise NotImplementedError()
