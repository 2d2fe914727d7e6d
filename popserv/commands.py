"""
What the commands are: the argument parsers, the C{@command} declaration of a
verb (its states, its parser, the capability it brings), and the per-class
tables and CAPA list built from those declarations.

A handler only ever runs with arguments its parser accepted: each parser
raises L{CommandError}, never lets a Python C{TypeError} be the check.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from popserv import wire
from popserv.errors import CommandError
from popserv.states import State

__all__ = [
    "MAX_NUMBER_DIGITS",
    "APOP_DIGEST_LENGTH",
    "Capability",
    "Verb",
    "CommandTable",
    "command",
    "noArgs",
    "message",
    "optionalMessage",
    "top",
    "userName",
    "password",
    "apop",
    "optionalWord",
    "auth",
    "base64Data",
]

#: Digits accepted in a message number or TOP line count: 10**9 is far beyond
#: any maildrop, and the bound keeps int() cheap on hostile input.
MAX_NUMBER_DIGITS = 9

#: Longest APOP digest field: an MD5 in hex (RFC 1939 section 7).
APOP_DIGEST_LENGTH = 32

Parser = Callable[[wire.Command], tuple[Any, ...]]

# ---------------------------------------------------------------------------
# Argument parsers: one per argument shape.


def noArgs(cmd: wire.Command) -> tuple[()]:
    if cmd.args:
        raise CommandError("{verb} takes no arguments", verb=cmd.verb)
    return ()


def _number(raw: bytes) -> int:
    if not raw.isdigit() or len(raw) > MAX_NUMBER_DIGITS:
        raise CommandError("Invalid message number")
    return int(raw)


def message(cmd: wire.Command) -> tuple[int]:
    args = cmd.args
    if len(args) != 1:
        raise CommandError("{verb} takes one message number", verb=cmd.verb)
    return (_number(args[0]),)


def optionalMessage(cmd: wire.Command) -> tuple[int | None]:
    args = cmd.args
    if len(args) > 1:
        raise CommandError("{verb} takes at most one message number", verb=cmd.verb)
    return (_number(args[0]),) if args else (None,)


def top(cmd: wire.Command) -> tuple[int, int]:
    args = cmd.args
    if len(args) != 2:
        raise CommandError("TOP takes a message number and a line count")
    if not args[1].isdigit() or len(args[1]) > MAX_NUMBER_DIGITS:
        raise CommandError("Invalid line count")
    return (_number(args[0]), int(args[1]))


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _text(raw: bytes) -> str:
    # User names are UTF-8 (RFC 6856 "UTF8 USER"); control characters never.
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandError("Invalid user name or password encoding") from None
    if not text or _CONTROL.search(text):
        raise CommandError("Invalid argument")
    return text


def userName(cmd: wire.Command) -> tuple[str]:
    # The whole rest of the line: some sites have user names with spaces.
    return (_text(cmd.rest.strip(b" ")),)


def password(cmd: wire.Command) -> tuple[bytes]:
    # RFC 1939 section 7: the password may contain spaces; keep it as sent.
    if not cmd.rest:
        raise CommandError("PASS takes a password")
    return (cmd.rest,)


def apop(cmd: wire.Command) -> tuple[str, bytes]:
    args = cmd.args
    if len(args) != 2:
        raise CommandError("APOP takes a user name and a digest")
    digest = args[1]
    if len(digest) != APOP_DIGEST_LENGTH or not all(
        c in b"0123456789abcdefABCDEF" for c in digest
    ):
        raise CommandError("Invalid APOP digest")
    return (_text(args[0]), digest)


def optionalWord(cmd: wire.Command) -> tuple[str | None]:
    args = cmd.args
    if len(args) > 1:
        raise CommandError("Invalid argument")
    return (_text(args[0]),) if args else (None,)


def auth(cmd: wire.Command) -> tuple[str | None, bytes | None]:
    # RFC 5034 section 4; "AUTH" alone lists the mechanisms (as RFC 1734
    # clients expect), and a trailing space (Outlook) is tolerated.
    args = cmd.args
    if len(args) > 2:
        raise CommandError("AUTH takes a mechanism and an optional initial response")
    if not args:
        return (None, None)
    mechanism = _text(args[0]).upper()
    if len(args) == 1:
        return (mechanism, None)
    return (mechanism, base64Data(args[1]))


def base64Data(data: bytes) -> bytes:
    """Decode a base64 argument or SASL response (C{=} is empty, RFC 5034)."""
    if data == b"=":
        return b""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise CommandError("Invalid base64 data") from None


# ---------------------------------------------------------------------------
# Declarations and the tables built from them.


@dataclass(frozen=True)
class Capability:
    """
    One line of the CAPA response (RFC 2449).

    @ivar text: the line, or a function of the protocol giving it (None:
        not offered on this connection now).
    @ivar rank: where it goes in the listing: lower first; equal ranks keep
        the order of their declarations.
    """

    text: str | Callable[[Any], str | None]
    rank: int = 500

    def line(self, protocol: Any) -> str | None:
        text = self.text
        return text if isinstance(text, str) else text(protocol)


@dataclass(frozen=True)
class Verb:
    """One command as a class dispatches it: parse the line, then call C{handler}."""

    name: str
    parse: Parser
    handler: Callable[..., Any]


@dataclass(frozen=True)
class _Declaration:
    name: str
    states: frozenset[State]
    parse: Parser
    capability: Capability | None


_MARK = "_pop3Command"


def command(
    name: str,
    *,
    states: Iterable[State] = (State.AUTHORIZATION, State.TRANSACTION),
    parse: Parser = noArgs,
    capability: str | Capability | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """
    Declare the method it decorates as the handler of the command C{name}.

    The handler is found by the method's name on each class, so a subclass
    that overrides the method (decorated or not) is the one dispatched; a
    subclass that declares a new verb adds it; declaring an existing verb
    again replaces its states, parser and capability.

    @param states: the RFC 1939 states it is valid in.
    @param parse: turns the command line into the handler's arguments.
    @param capability: the CAPA line it brings (a string, or a L{Capability}
        for a rank or a condition).
    """
    if isinstance(capability, str):
        capability = Capability(capability)
    declaration = _Declaration(name.upper(), frozenset(states), parse, capability)

    def mark(method: Callable[..., Any]) -> Callable[..., Any]:
        setattr(method, _MARK, declaration)
        return method

    return mark


class CommandTable:
    """
    The commands of one protocol class, built from its declarations (and its
    bases'), and its capabilities.

    @ivar byState: for each state, the L{Verb}s valid in it, by name.
    @ivar names: every verb name the class knows (in any state), by itself:
        the table's own strings, so that counting commands copies none.
    @ivar capabilities: the CAPA lines in listing order.
    """

    def __init__(self, cls: type, extra: Iterable[Capability] = ()) -> None:
        declared: dict[str, tuple[str, _Declaration]] = {}
        for klass in reversed(cls.__mro__):
            for attribute, value in vars(klass).items():
                declaration = getattr(value, _MARK, None)
                if isinstance(declaration, _Declaration):
                    declared.pop(declaration.name, None)  # a redeclaration goes last
                    declared[declaration.name] = (attribute, declaration)
        self.byState: dict[State, dict[str, Verb]] = {state: {} for state in State}
        self.names: dict[str, str] = {}
        capabilities: list[Capability] = list(extra)
        for name, (attribute, declaration) in declared.items():
            verb = Verb(name, declaration.parse, getattr(cls, attribute))
            for state in declaration.states:
                self.byState[state][name] = verb
            self.names[name] = name
            if declaration.capability is not None:
                capabilities.append(declaration.capability)
        self.capabilities: tuple[Capability, ...] = tuple(
            sorted(capabilities, key=lambda c: c.rank)
        )

    def capa(self, protocol: Any) -> list[str]:
        """The CAPA lines for C{protocol} as it is now."""
        lines = []
        for capability in self.capabilities:
            line = capability.line(protocol)
            if line is not None:
                lines.append(line)
        return lines
