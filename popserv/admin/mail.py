"""C{popserv deliver}, C{uidl} and C{migrate}: mail into, out of and between stores."""

from __future__ import annotations

import argparse
import sys
from typing import IO, Any

from twisted.internet.defer import inlineCallbacks, maybeDeferred
from twisted.python.failure import Failure

from popserv.admin.common import (
    EX_NOUSER,
    EX_OK,
    EX_TEMPFAIL,
    EX_USAGE,
    AdminError,
    configFrom,
)
from popserv.config import Config, ConfigError
from popserv.errors import InvalidUserName, MaildropInUse, PermanentFailure

__all__ = ["deliver", "cmdDeliver", "cmdUidl", "cmdMigrate", "checkRecipient"]

#: Bytes read from standard input at a time by deliver.
_CHUNK = 1024 * 1024


def deliver(maildir: str, source: IO[bytes], chunk: int = 1024 * 1024) -> str:
    """
    Deliver a message into a Maildir the safe way (see
    L{popserv.backends.maildir.delivery}): written in tmp/, synced, renamed
    into new/ with its ,S= (size on disk) and ,W= (CRLF size, what POP3
    reports) fields, the directory synced. Returns the new file's path.
    Streams: the message is never held in memory whole.
    """
    from popserv.backends.maildir.delivery import MaildirDelivery, makeMaildir

    makeMaildir(maildir)
    delivery = MaildirDelivery(maildir)
    try:
        while data := source.read(chunk):
            delivery.write(data)
        delivery.commit()
    except BaseException:
        delivery.abort()
        raise
    assert delivery.path is not None
    return delivery.path


def checkRecipient(config: Config, user: str) -> None:
    """
    A user none of the auth sources knows is refused (EX_NOUSER), when every
    source can tell (as LMTP decides whom to accept mail for).
    """
    from popserv.build import makeChecker
    from popserv.lmtp.delivery import knowsUser
    from popserv.threads import synchronously, waitFor

    if not config.mail_location:
        raise AdminError("say where mail is: --mail-location or --config", EX_USAGE)
    if not config.authSources:
        return
    try:
        checker = makeChecker(config, None, synchronously)
    except ConfigError as e:
        raise AdminError(str(e), EX_TEMPFAIL) from None
    known = waitFor(knowsUser(getattr(checker, "sources", (checker,)), user))
    if isinstance(known, Failure):
        raise AdminError(f"cannot look {user} up: {known.getErrorMessage()}", EX_TEMPFAIL)
    if known is False:
        raise AdminError(f"no user {user}", EX_NOUSER)


def cmdDeliver(args: argparse.Namespace) -> int:
    """Deliver standard input into the user's maildrop, through the configured store."""
    from popserv.build import makeStore
    from popserv.threads import synchronously, waitFor

    config = configFrom(args)
    args.user = config.usernameRules(args.user)
    checkRecipient(config, args.user)
    try:
        store = makeStore(config, synchronously, createMissing=True)
    except ConfigError as e:
        raise AdminError(str(e), EX_USAGE) from None
    outcome = waitFor(_deliver(store, args.user, sys.stdin.buffer))
    if isinstance(outcome, Failure):
        if outcome.check(InvalidUserName):
            raise AdminError(f"user {args.user!r}: {outcome.getErrorMessage()}", EX_NOUSER)
        raise AdminError(
            f"delivery to {args.user} failed: {outcome.getErrorMessage()}", EX_TEMPFAIL
        )
    if args.verbose:
        print(outcome)
    return EX_OK


@inlineCallbacks
def _deliver(store: Any, user: str, source: IO[bytes]) -> Any:
    """Copy C{source} into a delivery to C{user}, in chunks; its path if it has one, or UIDL."""
    writer = yield maybeDeferred(store.deliverMessage, user)
    try:
        while data := source.read(_CHUNK):
            yield maybeDeferred(writer.write, data)
        uid = yield maybeDeferred(writer.commit)
    except BaseException:
        yield maybeDeferred(writer.abort)
        raise
    delivery = getattr(writer, "delivery", None)
    return getattr(delivery, "path", None) or uid


def cmdUidl(args: argparse.Namespace) -> int:
    """
    Print the UIDLs (and sizes) a session of C{args.user} would be served,
    from any store, through the store contract: the maildrop is opened as a
    session opens it (so a user in a session now is refused: run again),
    listed, and closed. Nothing is created or changed.
    """
    from popserv.build import makeStore
    from popserv.threads import synchronously, waitFor

    config = configFrom(args)
    args.user = config.usernameRules(args.user)
    checkRecipient(config, args.user)
    try:
        store = makeStore(config, synchronously, createMissing=False)
    except ConfigError as e:
        raise AdminError(str(e), EX_USAGE) from None
    try:
        outcome = waitFor(_listing(store, args.user))
    finally:
        getattr(store, "close", lambda: None)()
    if isinstance(outcome, Failure):
        if outcome.check(MaildropInUse):
            raise AdminError(f"{args.user} is in a session now: run again", EX_TEMPFAIL)
        if outcome.check(InvalidUserName):
            raise AdminError(f"user {args.user!r}: {outcome.getErrorMessage()}", EX_NOUSER)
        if outcome.check(PermanentFailure):
            raise AdminError(f"{args.user}: {outcome.getErrorMessage()}")
        raise AdminError(f"{args.user}: {outcome.getErrorMessage()}", EX_TEMPFAIL)
    for number, info in enumerate(outcome, 1):
        print(f"{number} {info.uid}" + (f" {info.size}" if args.sizes else ""))
    return EX_OK


@inlineCallbacks
def _listing(store: Any, user: str) -> Any:
    """C{user}'s messages as a session lists them (the maildrop opened, listed, closed)."""
    mailbox = yield maybeDeferred(store.openMailbox, user)
    try:
        return list((yield maybeDeferred(mailbox.listMessages)))
    finally:
        yield maybeDeferred(mailbox.close)


def addPOPSourceOptions(parser: argparse.ArgumentParser) -> None:
    """C{popserv migrate}'s options for a POP3 server as the source."""
    parser.add_argument(
        "--credentials",
        metavar="FILE",
        help="user:password lines: the users to migrate from a POP URL naming none "
        "(or the password of the one it names)",
    )
    parser.add_argument("--master-user", metavar="NAME", help="a master user of the source")
    parser.add_argument("--master-password-file", metavar="FILE", help="its password")
    parser.add_argument(
        "--password-file", metavar="FILE", help="the password of the user the URL names"
    )
    parser.add_argument(
        "--ca-file", metavar="FILE", help="CAs the source's certificate is checked with"
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="accept any certificate, and send passwords in the clear without STLS",
    )


def _readSecret(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.readline().rstrip("\r\n")


def popSource(args: argparse.Namespace) -> Any:
    """The POP3 server C{--from} names, with the credentials the options give."""
    from popserv.popsource import POP3Source, parsePOPURL, readCredentials

    try:
        url = parsePOPURL(args.source)
        passwords = readCredentials(args.credentials) if args.credentials else {}
        master = None
        if args.master_user:
            if not args.master_password_file:
                raise ValueError("--master-user needs --master-password-file")
            master = (args.master_user, _readSecret(args.master_password_file))
        if url.user and args.password_file:
            passwords[url.user] = _readSecret(args.password_file)
    except (OSError, ValueError) as e:
        raise AdminError(str(e), EX_USAGE) from None
    if master is None:
        if url.user and url.user not in passwords:
            raise AdminError(f"no password for {url.user}: --password-file or --credentials")
        if not url.user and not passwords:
            raise AdminError("the URL names no user: say whom with --credentials", EX_USAGE)
    elif not url.user and not passwords and not args.users:
        raise AdminError("the URL names no user: --user or --credentials", EX_USAGE)
    for user in args.users or ():
        passwords.setdefault(user, "")
    try:
        return POP3Source(url, passwords, master, caFile=args.ca_file, insecure=args.insecure)
    except OSError as e:  # (a --ca-file that is missing, or no PEM: ssl.SSLError)
        raise AdminError(f"--ca-file {args.ca_file}: {e.strerror or e}", EX_USAGE) from None


def cmdMigrate(args: argparse.Namespace) -> int:
    from popserv.migrate import migrate, openStores, openTarget

    config = configFrom(args)
    try:
        if "://" in args.source:
            source = popSource(args)
            return migrate(source, openTarget(config, args.target), args.users)
        stores = openStores(config, args.source, args.target)
    except ConfigError as e:
        raise AdminError(str(e), EX_USAGE) from None
    return migrate(*stores, args.users)
