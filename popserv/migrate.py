"""
C{popserv migrate}: copy maildrops from one store to another, keeping what
POP3 clients know of each message (its UIDL, its size, its delivery time), so
a client that leaves mail on the server downloads nothing twice.

It works through the store contract alone (L{popserv.interfaces.IMailStore}),
so it moves mail between any two kinds (Maildir, PostgreSQL, ...):

  - each source maildrop is opened as a session would open it, taking its
    lock: a user with a live session is skipped (and reported; run again),
    never half copied; the target maildrop is held (locked) likewise from
    its listing to the last copy;
  - each message the target does not list yet (by UIDL) is streamed over,
    chunk by chunk, into a delivery with the same UIDL and delivery time; the
    target's commit is atomic per message, so an interrupted run resumes
    where it stopped and a second run copies nothing;
  - each maildrop is verified: the target lists every source UIDL with the
    same (exact RETR) size, and each message copied now has the SHA-256 it
    was written with, taken over its wire form (CRLF line endings, as RETR
    sends it): stores keep line endings their own way (an mbox spool in LF,
    a Maildir as delivered), which changes nothing a client sees.

The source may also be a live POP3 server (L{popserv.popsource}).
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import threading
import time
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import IO, Any

from twisted.internet.defer import inlineCallbacks, maybeDeferred
from twisted.python.failure import Failure

from popserv.config import Config, ConfigError
from popserv.errors import MaildropInUse, MessageVanished, PermanentFailure
from popserv.interfaces import IMailStore, IMessageReader, MessageInfo, UIDConflict
from popserv.octets import TransferDecoder
from popserv.threads import synchronously, waitFor

__all__ = [
    "MaildropResult",
    "Migration",
    "Progress",
    "WireDigest",
    "migrate",
    "openStores",
    "openTarget",
]

#: Bytes read from the source and written to the target at a time.
CHUNK = 256 * 1024


@dataclass
class MaildropResult:
    """
    What became of one maildrop.

    @ivar inUse: a session held it: skipped, to be run again.
    @ivar problems: what went wrong, one line each (a failed copy, a
        verification mismatch); empty if all is well.
    @ivar temporary: the problems may go away by themselves (a store away).
    """

    user: str
    copied: int = 0
    skipped: int = 0
    octets: int = 0
    inUse: bool = False
    problems: list[str] = field(default_factory=list)
    temporary: bool = False


class Progress:
    """
    Reports progress on C{out}: on a terminal, a bar redrawn in place per
    maildrop (messages and octets done of the ones to copy); otherwise plain
    lines, as a log would have them: one per maildrop, and one every
    C{every} seconds while a big one is copied.
    """

    def __init__(self, out: IO[str], terminal: bool | None = None, every: float = 10.0) -> None:
        self.out = out
        self.terminal = out.isatty() if terminal is None else terminal
        self.width = 30
        #: Seconds between two plain progress lines.
        self.every = every
        self._drawn = 0.0

    def start(self, user: str, messages: int, octets: int) -> None:
        self._user, self._messages, self._octets = user, messages, octets
        self._drawn = 0.0 if self.terminal else time.monotonic()
        self.update(0, 0)

    def update(self, messages: int, octets: int, force: bool = False) -> None:
        now = time.monotonic()
        if not self.terminal:
            # A line now and then, so a log shows a long maildrop moving.
            if now - self._drawn >= self.every and messages < self._messages:
                self._drawn = now
                self.line(
                    f"{self._user}: {messages}/{self._messages} messages, "
                    f"{_human(octets)}/{_human(self._octets)}"
                )
            return
        if not force and now - self._drawn < 0.1 and messages < self._messages:
            return
        self._drawn = now
        done = octets / self._octets if self._octets else 1.0
        filled = int(done * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        self.out.write(
            f"\r{self._user} [{bar}] {messages}/{self._messages} messages, "
            f"{_human(octets)}/{_human(self._octets)}\x1b[K"
        )
        self.out.flush()

    def line(self, text: str) -> None:
        """A line of its own (after a bar being drawn, which stays)."""
        if self.terminal and self._drawn:  # ends the bar's line
            self.out.write("\n")
            self._drawn = 0.0
        self.out.write(text + "\n")
        self.out.flush()


_BARE_LF = re.compile(rb"(?<!\r)\n")


class WireDigest:
    """
    The SHA-256 of a message's wire form, fed its stored bytes in any
    chunks: bare LFs made CRLF (a lone CR stays data), and a final CRLF
    added to a message that lacks one, as RETR sends it.
    """

    __slots__ = ("_sha", "_heldCR", "_last")

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._heldCR = False
        self._last = b"\n"

    def update(self, data: bytes) -> None:
        if not data:
            return
        out = _BARE_LF.sub(b"\r\n", data)
        if self._heldCR and data[:1] == b"\n":
            out = out[1:]  # that LF ends the CRLF the last chunk began
        self._sha.update(out)
        self._heldCR = data[-1:] == b"\r"
        self._last = data[-1:]

    def hexdigest(self) -> str:
        sha = self._sha.copy()
        if self._last != b"\n":
            sha.update(b"\r\n")
        return sha.hexdigest()


def _human(octets: int) -> str:
    size = float(octets)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def openStores(config: Config, source: str, target: str) -> tuple[IMailStore, IMailStore]:
    """
    The stores that C{source} and C{target} (C{KIND:ARGS} mail locations)
    name, built by their kinds' plugins over C{config} (for its base
    directory and plugin options). A source maildrop is never created; a
    target one is, at its first message.

    @raise ConfigError: a location that names no store.
    """
    from popserv.build import makeStore

    stores = []
    for name, spec, create in (("--from", source, False), ("--to", target, True)):
        located = replace(config, mail_location=spec)
        try:
            stores.append(makeStore(located, synchronously, createMissing=create))
        except (ConfigError, ValueError) as e:
            raise ConfigError(f"{name} {spec}: {e}") from None
    return stores[0], stores[1]


def openTarget(config: Config, target: str) -> IMailStore:
    """The store C{target} names (see L{openStores}); its maildrops are made at first message."""
    from popserv.build import makeStore

    try:
        return makeStore(replace(config, mail_location=target), synchronously, createMissing=True)
    except (ConfigError, ValueError) as e:
        raise ConfigError(f"--to {target}: {e}") from None


class Migration:
    """
    Copies maildrops from C{source} to C{target}, one at a time, reporting
    on C{progress}. Each store call may answer at once or with a Deferred
    (see L{migrate}, which runs it).
    """

    def __init__(self, source: IMailStore, target: IMailStore, progress: Progress) -> None:
        self.source = source
        self.target = target
        self.progress = progress
        self.results: list[MaildropResult] = []
        #: Set to stop after the message being copied (the first Ctrl-C).
        self.stopping = False

    @inlineCallbacks
    def run(self, users: Sequence[str] | None = None) -> Generator[Any, Any, list[MaildropResult]]:
        """Migrate C{users} (default: every maildrop of the source), in turn."""
        if users is None:
            users = list((yield maybeDeferred(self.source.listMaildrops)))
        for user in users:
            if self.stopping:
                break
            result = MaildropResult(user)
            self.results.append(result)
            try:
                yield self.maildrop(result)
            except MaildropInUse:
                result.inUse = True
                self.progress.line(f"{user}: in use by a session, skipped; run again")
                continue
            except Exception:
                failure = Failure()
                result.temporary = not failure.check(PermanentFailure)
                result.problems.append(f"{user}: {failure.getErrorMessage() or failure.type}")
            for problem in result.problems:
                self.progress.line(problem)
            if not result.problems and not self.stopping:
                self.progress.line(
                    f"{user}: {result.copied} copied ({_human(result.octets)}), "
                    f"{result.skipped} already there, verified"
                )
        return self.results

    @inlineCallbacks
    def maildrop(self, result: MaildropResult) -> Generator[Any, Any, None]:
        """
        Copy one maildrop's missing messages, then verify it. The target
        maildrop stays open (locked) from its listing to the last copy, so no
        session of the target server sees it half copied or removes a message
        between the listing and the copy.
        """
        user = result.user
        mailbox = yield maybeDeferred(self.source.openMailbox, user)
        digests: dict[str, str] = {}
        try:
            infos = list((yield maybeDeferred(mailbox.listMessages)))
            target = yield maybeDeferred(self.target.openMailbox, user)
            try:
                present = {i.uid: i.size for i in (yield maybeDeferred(target.listMessages))}
                missing = [info for info in infos if info.uid not in present]
                result.skipped = len(infos) - len(missing)
                self.progress.start(user, len(missing), sum(info.size for info in missing))
                for done, info in enumerate(missing, 1):
                    if self.stopping:
                        return  # not verified: it is not complete
                    try:
                        copied = yield self._copy(mailbox, user, info)
                    except MessageVanished:
                        # Removed by another program since the listing: nothing to keep.
                        infos.remove(info)
                        continue
                    if copied:
                        result.copied += 1
                        result.octets += info.size
                        digests[info.uid] = copied
                    else:
                        result.skipped += 1
                    self.progress.update(done, result.octets)
                self.progress.update(len(missing), result.octets, force=True)
            finally:
                yield maybeDeferred(target.close)
        finally:
            yield maybeDeferred(mailbox.close)
        present = yield self._targetListing(user, digests)
        result.problems += _mismatches(user, infos, present)

    @inlineCallbacks
    def _targetListing(
        self, user: str, digests: dict[str, str] | None = None
    ) -> Generator[Any, Any, dict[str, int]]:
        """
        The target's UIDLs of C{user} now, with their sizes; a message
        copied now (in C{digests}) whose stored bytes hash otherwise is
        listed with size -1, a mismatch.
        """
        mailbox = yield maybeDeferred(self.target.openMailbox, user)
        try:
            infos = yield maybeDeferred(mailbox.listMessages)
            present = {info.uid: info.size for info in infos}
            for info in infos:
                if digests and info.uid in digests:
                    reader = yield maybeDeferred(mailbox.openMessage, info)
                    digest = WireDigest()
                    decode = _decoder(reader)
                    try:
                        while data := (yield maybeDeferred(reader.read, CHUNK)):
                            digest.update(decode(data))
                    finally:
                        reader.close()
                    if digest.hexdigest() != digests[info.uid]:
                        present[info.uid] = -1
        finally:
            yield maybeDeferred(mailbox.close)
        return present

    @inlineCallbacks
    def _copy(self, mailbox: Any, user: str, info: MessageInfo) -> Generator[Any, Any, str]:
        """
        Stream one message into the target: the SHA-256 of what was written,
        or "" if its UIDL got there meanwhile.
        """
        reader = yield maybeDeferred(mailbox.openMessage, info)
        digest = WireDigest()
        decode = _decoder(reader)
        try:
            writer = yield maybeDeferred(
                self.target.deliverMessage, user, uid=info.uid, received=info.received
            )
            try:
                while data := (yield maybeDeferred(reader.read, CHUNK)):
                    data = decode(data)
                    digest.update(data)
                    if data:
                        yield maybeDeferred(writer.write, data)
                octets = getattr(reader, "octets", None)
                if octets is not None and octets != info.size:
                    raise PermanentFailure(
                        f"{info.uid}: {octets} octets sent, {info.size} listed by the source"
                    )
            except BaseException:
                yield maybeDeferred(writer.abort)
                raise
            try:
                yield maybeDeferred(writer.commit)
            except UIDConflict:
                return ""  # another run copied it first
        finally:
            reader.close()
        return digest.hexdigest()


def _decoder(reader: IMessageReader) -> Any:
    """
    What turns C{reader}'s chunks into the message: a store in transfer form
    (stuffed) is decoded, so the target gets the message itself, never
    stuffed dots.
    """
    if getattr(reader, "transferForm", False):
        return TransferDecoder().feed
    return _asStored


def _asStored(data: bytes) -> bytes:
    return data


def _mismatches(user: str, infos: Sequence[MessageInfo], present: dict[str, int]) -> list[str]:
    """Every source message the target lacks, or lists with another size."""
    problems = []
    for info in infos:
        size = present.get(info.uid)
        if size is None:
            problems.append(f"{user}: {info.uid} is missing from the target")
        elif size == -1:
            problems.append(f"{user}: {info.uid} differs in the target (SHA-256)")
        elif size != info.size:
            problems.append(
                f"{user}: {info.uid} is {size} octets in the target, {info.size} in the source"
            )
    return problems


@contextmanager
def _stopOnInterrupt(migration: Migration) -> Iterator[None]:
    """
    While migrating, a first SIGINT (Ctrl-C) stops the migration cleanly
    after the message being copied; a second one interrupts at once.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        migration.stopping = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def migrate(
    source: IMailStore,
    target: IMailStore,
    users: Sequence[str] | None = None,
    out: IO[str] | None = None,
) -> int:
    """
    Migrate, blocking until done, reporting on C{out} (default: standard
    error) and ending with a summary. Returns the exit code: 0 all copied
    and verified, 75 some maildrops in use or a store failing (run again),
    1 a verification found a difference, or no maildrop was found.
    """
    import sys

    progress = Progress(out if out is not None else sys.stderr)
    from popserv.backends.maildir.foreign import storeNote

    note = storeNote(source)
    if note:
        progress.line(note)
    started = time.monotonic()
    migration = Migration(source, target, progress)
    with _stopOnInterrupt(migration):
        outcome = waitFor(migration.run(users))
    results = migration.results
    if migration.stopping:
        progress.line("interrupted: run again to continue")
    if isinstance(outcome, Failure):
        if outcome.check(KeyboardInterrupt):
            progress.line("interrupted: run again to continue")
            raise KeyboardInterrupt
        progress.line(f"cannot list the source's maildrops: {outcome.getErrorMessage()}")
        return os.EX_TEMPFAIL
    if not results:
        progress.line(f"no maildrops in {source.description}: check --from")
        return 1
    inUse = [r.user for r in results if r.inUse]
    progress.line(
        f"{len(results)} maildrops, {sum(r.copied for r in results)} messages copied, "
        f"{sum(r.skipped for r in results)} already there, "
        f"{_human(sum(r.octets for r in results))}, {time.monotonic() - started:.2f} s"
        + (f"; in use, run again: {' '.join(inUse)}" if inUse else "")
    )
    if any(r.problems and not r.temporary for r in results):
        return 1
    if inUse or migration.stopping or any(r.problems for r in results):
        return os.EX_TEMPFAIL
    return os.EX_OK
