"""
Errors popserv raises, and the one place that turns any failure into the
error a client is told of: L{errorFor}.

Backends and checkers raise these (or plain OSErrors); the protocol never
chooses a response code or a text itself: every C{-ERR} line it sends is a
L{POP3Error}, through L{errorFor}, formatted by the protocol (this module
imports nothing of popserv but the text catalogue).
"""

from __future__ import annotations

import errno
from enum import StrEnum

from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.logger import Logger
from twisted.python.failure import Failure

from popserv.i18n import DEFAULT_LANGUAGE, Language

__all__ = [
    "ResponseCode",
    "UnknownUser",
    "POP3Error",
    "CommandError",
    "NoSuchMessage",
    "AuthenticationFailed",
    "MaildropInUse",
    "TemporaryFailure",
    "PermanentFailure",
    "InvalidUserName",
    "MessageVanished",
    "AccountDisabled",
    "LoginDelayed",
    "PlaintextRefused",
    "TooManyConnections",
    "ShuttingDown",
    "AutologoutExpired",
    "TooManyBadCommands",
    "RemovalIncomplete",
    "AuthenticationCancelled",
    "errorFor",
]

_log = Logger()


class ResponseCode(StrEnum):
    """Extended response codes: RFC 2449 section 8 and RFC 3206."""

    IN_USE = "IN-USE"
    LOGIN_DELAY = "LOGIN-DELAY"
    SYS_TEMP = "SYS/TEMP"
    SYS_PERM = "SYS/PERM"
    AUTH = "AUTH"


class POP3Error(Exception):
    """
    A failure with a text meant for the client.

    @cvar code: the response code sent with it, if any.
    @cvar text: the default text: an English template (see L{popserv.i18n});
        an instance may carry its own, with C{params} to fill it in.
    """

    code: ResponseCode | None = None
    text = "Command failed"

    def __init__(self, text: str | None = None, **params: object) -> None:
        super().__init__(text or self.text)
        if text:
            self.text = text
        self.params = params

    def message(self, language: Language = DEFAULT_LANGUAGE) -> str:
        """The text for the client, in C{language}."""
        return language.text(self.text, **self.params)


class CommandError(POP3Error):
    """A command was unknown, not allowed in this state, or had bad arguments."""


class NoSuchMessage(POP3Error):
    """The message number is out of range or the message is marked deleted."""

    text = "No such message"


class AuthenticationFailed(POP3Error):
    """Bad credentials. Unknown user and wrong password deliberately read the same."""

    code = ResponseCode.AUTH
    text = "Authentication failed"


class MaildropInUse(POP3Error):
    """Another session holds the maildrop lock (RFC 2449 [IN-USE])."""

    code = ResponseCode.IN_USE
    text = "Mailbox is locked by another session"


class TemporaryFailure(POP3Error):
    """
    A problem that retrying later may cure: storage unavailable, I/O error.

    @ivar penalize: a login that fails with it still counts as a failed one
        (a source rejected the password while another was down).
    """

    code = ResponseCode.SYS_TEMP
    text = "Temporary server failure, try again later"
    penalize = False


class PermanentFailure(POP3Error):
    """A problem retrying will not cure: unreadable maildrop, disabled account."""

    code = ResponseCode.SYS_PERM
    text = "Permanent server failure"


class InvalidUserName(PermanentFailure):
    """A user name that cannot name a maildrop (it would escape the mail root)."""

    text = "Invalid user name"


class MessageVanished(POP3Error):
    """The message was removed from storage by another program during the session."""

    text = "Message was removed from the maildrop by another program"


class AccountDisabled(PermanentFailure):
    """The credentials were right but the account may not log in."""

    text = "Account is disabled"


class LoginDelayed(POP3Error):
    """RFC 2449 LOGIN-DELAY: this user logged in too recently."""

    code = ResponseCode.LOGIN_DELAY
    text = "Logged in too recently, wait {seconds} seconds"


class PlaintextRefused(POP3Error):
    """Policy forbids sending a password in the clear on this connection."""

    code = ResponseCode.AUTH
    text = "Plaintext authentication is not allowed on this connection; use STLS first"


class TooManyConnections(TemporaryFailure):
    """A connection over a limit (L{popserv.limits.ConnectionLimits}) is refused."""

    text = "Too many connections, try again later"


class ShuttingDown(TemporaryFailure):
    """The server is stopping and ends the session."""

    text = "Server shutting down"


class AutologoutExpired(POP3Error):
    """The autologout timer ran out (RFC 1939 section 3)."""

    text = "Disconnected for inactivity"


class TooManyBadCommands(POP3Error):
    """The client sent too many unknown or malformed commands; it is disconnected."""

    text = "Too many bad commands, closing connection"


class RemovalIncomplete(TemporaryFailure):
    """UPDATE could not remove every message it was to remove (RFC 1939 section 6)."""

    text = "Some deleted messages not removed"


class AuthenticationCancelled(POP3Error):
    """The client cancelled a SASL exchange with C{*} (RFC 5034 section 4)."""

    text = "Authentication cancelled"


_PERMANENT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.ELOOP})


def errorFor(reason: BaseException | Failure) -> POP3Error:
    """
    The error a client is told of for any failure: its code is
    C{error.code}, its text C{error.message(language)}.

    POP3Errors are their own answer. Cred failures become the one
    authentication failure. OS errors become [SYS/TEMP] or [SYS/PERM] by errno.
    Anything else is a bug: it is logged with its traceback and the client gets
    a generic line, never a class name or a Python message.
    """
    exc = reason.value if isinstance(reason, Failure) else reason
    if isinstance(exc, POP3Error):
        return exc
    if isinstance(exc, (UnauthorizedLogin, UnhandledCredentials)):
        return AuthenticationFailed()
    failure = reason if isinstance(reason, Failure) else Failure(exc)
    if isinstance(exc, OSError):
        _log.failure("storage error", failure)
        return PermanentFailure() if exc.errno in _PERMANENT_ERRNOS else TemporaryFailure()
    _log.failure("unexpected error while handling a command", failure)
    return TemporaryFailure("Internal server error")


class UnknownUser(UnauthorizedLogin):
    """
    An auth source does not know the user. Raise it, rather than a bare
    L{UnauthorizedLogin} (a wrong password), for an unknown user: a chain of
    sources (L{popserv.auth.chain.PassdbChain}) then knows that this source
    had no say about the user. It is a cred failure, so the client reads
    exactly what a wrong password gets (C{-ERR [AUTH]}); take as long to
    raise it as a check of a real password takes.
    """
