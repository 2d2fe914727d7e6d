"""
The command pipeline under every POP3 connection: framing input into lines,
dispatching each through its class's L{CommandTable}, answering strictly in
order, back-pressure on pipelined input, the lifecycle, and the response
texts (every C{-ERR} through L{popserv.errors.errorFor}).

L{CommandPipeline} knows no command: the layers above it declare theirs
with L{popserv.commands.command}.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from popserv import wire
from popserv.commands import Capability, CommandTable
from popserv.errors import CommandError, POP3Error, TooManyBadCommands, errorFor
from popserv.i18n import DEFAULT_LANGUAGE, Language
from popserv.recorder import SessionRecorder
from popserv.states import TRANSITIONS, BadTransition, Lifecycle, State
from popserv.streaming import LinesProducer, MessageProducer
from popserv.tls import tlsConnection

if TYPE_CHECKING:
    from popserv.protocol import POP3Factory

__all__ = [
    "CommandPipeline",
    "MAX_BUFFERED_INPUT",
    "MAX_SASL_LINE",
    "errorReply",
    "fired",
    "PENDING",
]

_log = Logger()

#: Input buffered while a command is in progress (pipelined commands waiting
#: their turn) before the server stops reading from the socket. Back-pressure,
#: not an error: reading resumes once the backlog is processed.
MAX_BUFFERED_INPUT = 64 * 1024

#: RFC 5034 section 4: SASL continuation lines are exempt from the 255-octet
#: limit "up to what the mechanism needs"; this bound fits any mechanism we
#: offer (and a GSSAPI token) while keeping a client from growing our buffer.
MAX_SASL_LINE = 16 * 1024

_OPEN = Lifecycle.OPEN
#: The input buffer of a session with no partial line: shared, never grown
#: (an idle session holds no buffer of its own).
_NO_INPUT = bytearray()


#: What L{fired} says of a Deferred that has no plain result yet.
PENDING: Any = object()


def fired(d: Deferred[Any]) -> Any:
    """
    The result of a Deferred that has already succeeded (a store that
    answered at once), taken out of it; L{PENDING} if it has not fired, has
    failed, or is paused or chained. Most logins and most commands complete
    synchronously: this spares them a callback chain each.
    """
    # (Deferred.callbacks is deprecated: a fired, unpaused Deferred whose
    # callbacks are not running has run them all.)
    if d.called and not d.paused and not getattr(d, "_runningCallbacks", False):
        result = d.result
        if not isinstance(result, (Failure, Deferred)):
            d.result = None  # the result is the caller's now; keep no reference
            return result
    return PENDING


def errorReply(reason: BaseException | Failure, language: Language = DEFAULT_LANGUAGE) -> bytes:
    """The C{-ERR} line for any failure, in C{language} (see L{errorFor})."""
    error = errorFor(reason)
    return wire.err(error.message(language), error.code)


def _authLimit(line: bytes | bytearray, limit: int) -> int:
    """
    The longest line allowed for C{line}: an AUTH command with an initial
    response may be as long as a SASL response. RFC 5034 section 4 forbids
    one over 255 octets, but mpop, for one, sends OAuth bearer tokens so.
    Asked only of lines already over C{limit}.
    """
    return MAX_SASL_LINE if line[:5].upper() == b"AUTH " else limit


class CommandPipeline(LineReceiver):
    """
    Lines in, one command at a time, answers out in order.

    A handler that returns a Deferred (a login, a streamed RETR, a slow
    backend) makes the connection busy: further pipelined lines wait in the
    input buffer, and past L{MAX_BUFFERED_INPUT} the socket stops being read.
    So does a client that sends commands but does not read their answers:
    the session is the transport's producer (L{pauseProducing}), and takes no
    command while the transport holds more unsent output than its buffer.

    @cvar commands: the commands of this class, built from its C{@command}
        declarations when the class is made.
    @cvar CAPABILITIES: capabilities that come with no command, in addition
        to those the commands declare.
    @ivar lifecycle: where the connection is (L{Lifecycle}); it changes only
        in L{_moveTo}.
    @ivar stats: the session's counters and reports.
    """

    #: RFC 2449 section 4: a command line is at most 255 octets with its CRLF.
    MAX_LENGTH = wire.MAX_COMMAND_LINE - 2

    CAPABILITIES: ClassVar[tuple[Capability, ...]] = ()
    commands: ClassVar[CommandTable]

    factory: POP3Factory

    # Slots, not an instance dict: thousands of idle sessions each carry these.
    __slots__ = (
        "state",
        "lifecycle",
        "language",
        "utf8",
        "stats",
        "deadline",
        "_timeout",
        "_inbuf",
        "_busy",
        "_processing",
        "_discarding",
        "_readPaused",
        "_badCommands",
        "_sasl",
        "_producer",
        "_lastStreamed",
        "_outputPaused",
    )

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        extra = [c for k in reversed(cls.__mro__) for c in vars(k).get("CAPABILITIES", ())]
        cls.commands = CommandTable(cls, extra)

    def __init__(self) -> None:
        self.state = State.AUTHORIZATION
        self.lifecycle = _OPEN
        self.language: Language = DEFAULT_LANGUAGE
        #: RFC 6856: UTF-8 mode is on (UTF8 command).
        self.utf8 = False
        self.stats = SessionRecorder()
        #: When the autologout timer ends this session (factory clock seconds).
        self.deadline: float | None = None
        self._timeout: float | None = None
        self._inbuf = _NO_INPUT
        self._busy = False
        self._processing = False
        self._discarding = False
        self._readPaused = False
        self._badCommands = 0
        self._sasl: Any = None  # a SASL exchange in progress: its lines skip dispatch
        self._producer: MessageProducer | LinesProducer | None = None
        self._lastStreamed = 0  # octets the last streamed response wrote
        #: The transport's producer: None (not registered), False, or True (paused).
        self._outputPaused: bool | None = None

    # -- lifecycle -------------------------------------------------------------

    def _moveTo(self, lifecycle: Lifecycle) -> None:
        """The one place the lifecycle changes; a move L{TRANSITIONS} forbids is a bug."""
        if lifecycle not in TRANSITIONS[self.lifecycle]:
            raise BadTransition(f"{self.lifecycle.name} -> {lifecycle.name}")
        self.lifecycle = lifecycle
        if lifecycle is not _OPEN:
            # No command runs any more: a transport closes only once no
            # producer is registered (TLS even waits for that to shut down).
            self._releaseOutput()

    # -- output back-pressure: the session as the transport's producer --------------

    def _watchOutput(self) -> None:
        """Be told when the transport holds too much unsent output (while open)."""
        if self._outputPaused is None and self.lifecycle is _OPEN:
            self._outputPaused = False
            self.transport.registerProducer(self, True)

    def _releaseOutput(self) -> None:
        if self._outputPaused is not None:
            self._outputPaused = None
            self.transport.unregisterProducer()

    def pauseProducing(self) -> None:
        """The transport's buffer is full: take no command until it drains."""
        if self._outputPaused is not None:
            self._outputPaused = True

    def resumeProducing(self) -> None:
        """The transport's buffer drained: go on with pipelined commands."""
        if self._outputPaused is not None:
            self._outputPaused = False
            if not self._busy and self.lifecycle is _OPEN:
                self._processInput()

    def stopProducing(self) -> None:
        """The connection is gone (C{connectionLost} follows): nothing to stop."""
        self._outputPaused = None

    def _close(self) -> None:
        """Run no further command (if still open): the last reply is on its way."""
        if self.lifecycle is _OPEN:
            self._moveTo(Lifecycle.CLOSING)

    def _disconnectNow(self) -> None:
        self._close()
        self.transport.loseConnection()

    def _abort(self) -> None:
        if hasattr(self.transport, "abortConnection"):
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    # -- the autologout timer ----------------------------------------------------

    def setTimeout(self, period: float | None) -> None:
        """Log out after C{period} seconds without a command (None: never)."""
        self._timeout = period
        if period is None:
            self.deadline = None
        else:
            self.deadline = self.factory.clock.seconds() + period
            self.factory.autologout.wake(self.deadline)

    def resetTimeout(self) -> None:
        """Activity: restart the autologout period."""
        if self._timeout is not None:
            # Later than before, so the factory's timer needs no telling.
            self.deadline = self.factory.clock.seconds() + self._timeout

    # -- framing -----------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """
        Split input into lines (CRLF or bare LF), one command at a time.

        Overlong lines are drained and answered in their place in the
        pipeline; nothing is buffered without bound.
        """
        if self.lifecycle is not _OPEN:
            return
        if self._inbuf is _NO_INPUT:
            self._inbuf = bytearray(data)
        else:
            self._inbuf += data
        self._processInput()
        if len(self._inbuf) > MAX_BUFFERED_INPUT and not self._readPaused:
            self._readPaused = True
            self.transport.pauseProducing()

    def _processInput(self) -> None:
        if self._processing:
            return  # re-entered from a command that completed synchronously
        self._processing = True
        try:
            buf = self._inbuf
            while not (self._busy or self._outputPaused) and self.lifecycle is _OPEN:
                limit = MAX_SASL_LINE if self._sasl is not None else self.MAX_LENGTH
                eol = buf.find(b"\n")
                if eol < 0:
                    if len(buf) > limit + 1 and len(buf) > _authLimit(buf, limit) + 1:
                        self._discarding = True
                        del buf[:]
                    break
                line = bytes(buf[:eol])
                del buf[: eol + 1]
                if self._discarding:
                    self._discarding = False
                    self.lineLengthExceeded(line)
                    continue
                if line.endswith(b"\r"):
                    line = line[:-1]
                if len(line) > limit and len(line) > _authLimit(line, limit):
                    self.lineLengthExceeded(line)
                    continue
                self.lineReceived(line)
        finally:
            self._processing = False
        if not self._inbuf:
            self._inbuf = _NO_INPUT
        if self._readPaused and not self._busy and len(self._inbuf) <= MAX_BUFFERED_INPUT:
            # (read on while output is paused: the input buffer then fills and stops it)
            self._readPaused = False
            if self.lifecycle.connected:
                self.transport.resumeProducing()

    def _putBack(self, data: bytes) -> None:
        """Put C{data} back before the buffered input: it is read again first."""
        if self._inbuf is _NO_INPUT:
            self._inbuf = bytearray()
        self._inbuf[0:0] = data

    def lineLengthExceeded(self, line: bytes) -> None:
        self.resetTimeout()
        if self._sasl is not None:
            self._saslTooLong()
            return
        self._badCommand(CommandError("Command line too long"))

    # -- dispatch ----------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        self.resetTimeout()
        if self._sasl is not None:
            self._saslResponse(line)
            return
        cmd = wire.parseCommand(line)
        commands = self.commands
        verb = commands.byState[self.state].get(cmd.verb)
        stats = self.stats
        stats.commands += 1
        if stats.metrics is not None:
            # The table's own string: a session keeps no copy of its verbs.
            stats.command(commands.names.get(cmd.verb, "UNKNOWN"))
        if verb is None:
            if cmd.verb in commands.names:
                self._badCommand(CommandError("{verb} is not valid in this state", verb=cmd.verb))
            else:
                self._badCommand(CommandError("Unknown command"))
            return
        try:
            args = verb.parse(cmd)
        except CommandError as e:
            self._badCommand(e)
            return
        self._run(verb.handler, self, *args)

    def _run(self, handler: Callable[..., Any], *args: Any) -> None:
        """Run a handler and send its answer, now or when its Deferred fires."""
        try:
            result = handler(*args)
        except Exception:
            self._reply(Failure())
            return
        if isinstance(result, Deferred):
            done = fired(result)
            if done is PENDING:
                self._busy = True
                result.addBoth(self._replyAndGoOn)
                return
            result = done
        self._reply(result)

    def _replyAndGoOn(self, result: bytes | Failure | None) -> None:
        try:
            self._reply(result)
        finally:
            self._idle()

    def _reply(self, result: bytes | Failure | None) -> None:
        if isinstance(result, Failure):
            if result.check(ConnectionLost):
                return
            result = errorReply(result, self.language)
        lifecycle = self.lifecycle
        if result and (lifecycle is _OPEN or not lifecycle.silent):
            self.transport.write(result)  # (after an autologout's goodbye: nothing)

    def _idle(self, _: object = None) -> None:
        self._busy = False
        if self.lifecycle is _OPEN or self.lifecycle.connected:
            self._processInput()

    def _badCommand(self, error: POP3Error) -> None:
        self._badCommands += 1
        self.stats.bad_commands += 1
        self.transport.write(errorReply(error, self.language))
        if self._badCommands >= self.factory.maxBadCommands:
            _log.info("closing after {n} bad commands", n=self._badCommands)
            self.stats.reason = "limit"
            self.transport.write(self._fail(TooManyBadCommands()))
            self._disconnectNow()

    # -- streamed responses ------------------------------------------------------

    def _streamLines(self, status: bytes, lines: Iterable[bytes]) -> Deferred[bytes]:
        """A multi-line response from lines (or from chunks of whole lines)."""
        return self._runProducer(
            LinesProducer(self.transport, iter(lines), status, onProgress=self.resetTimeout)
        )

    def _runProducer(self, producer: MessageProducer | LinesProducer) -> Deferred[bytes]:
        """Stream a response; the command is answered when it is all written."""
        self._releaseOutput()  # (the response's producer is the transport's now)
        self._producer = producer
        d = producer.start()
        d.addBoth(self._producerDone)
        return d

    def _producerDone(self, result: None | Failure) -> bytes:
        assert self._producer is not None
        self._lastStreamed = self._producer.written
        self.stats.bytes_out += self._producer.written
        self._producer = None
        if isinstance(result, Failure) and result.check(ConnectionLost):
            # The transport stopped the stream as the connection went, before
            # telling us (connectionLost): no pipelined command may run now
            # (a QUIT behind the RETR would remove what never arrived).
            self._close()
            return b""
        self._watchOutput()
        if isinstance(result, Failure):
            # The +OK line is out: a -ERR now would be read as message data.
            # Cut the connection so the client sees an incomplete response.
            _log.failure("storage failed while streaming to {user}", result, user=self.stats.user)
            self.stats.reason = "error"
            self._close()
            self._abort()
        return b""

    # -- the SASL continuation (provided by the login layer) ------------------

    def _saslResponse(self, line: bytes) -> None:
        """A line of the SASL exchange in progress (RFC 5034 section 4)."""
        raise NotImplementedError()

    def _saslTooLong(self) -> None:
        """A line of the SASL exchange in progress was too long: end the exchange."""
        raise NotImplementedError()

    # -- texts -------------------------------------------------------------------

    def _t(self, template: str, **params: Any) -> str:
        return self.language.text(template, **params)

    def _ok(self, template: str = "", **params: Any) -> bytes:
        return wire.ok(self._t(template, **params) if template else "")

    def _fail(self, error: POP3Error) -> bytes:
        """The C{-ERR} line for C{error}, in this session's language."""
        return errorReply(error, self.language)

    def _counts(self, count: int, size: int) -> dict[str, str]:
        return {
            "messages": self.language.count(count, "message"),
            "octets": self.language.count(size, "octet"),
        }

    @property
    def secure(self) -> bool:
        """Is this connection encrypted (implicit TLS or after STLS)?"""
        return tlsConnection(self.transport) is not None

    def capabilities(self) -> list[str]:
        """
        RFC 2449 capabilities for the current state and connection: only what
        works here and now, from the declarations of the commands and of
        L{CAPABILITIES}.
        """
        return self.commands.capa(self)


CommandPipeline.commands = CommandTable(CommandPipeline)
