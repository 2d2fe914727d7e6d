"""
SCRAM keys (RFC 5802 section 3): what a server stores instead of the
password, who offers them, and the one key popserv's own salts come from.

A passwd-file may hold the keys (C{{SCRAM-SHA-256}iterations,salt,...}); for
a C{{PLAIN}} password popserv derives them; for an unknown user it makes up
keys nothing can match, so the exchange fails at the proof like a wrong
password. The salts of the last two come from the I{salt key}: one random
key per process (L{PROCESS_SALT_KEY}) or, for every worker, restart and node
sharing a mail root, the key kept in it (L{saltKeyForRoot}). A user then
gets the same salt wherever they ask, and a salt that changes never tells
an unknown user from a real one.

scramp, which derives the keys, is imported only when keys are derived.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import Interface

__all__ = [
    "ScramKeys",
    "ISecretSource",
    "ITERATIONS",
    "PROCESS_SALT_KEY",
    "SCRAM_KEY_FILE",
    "stableSalt",
    "deriveScramKeys",
    "fakeScramKeys",
    "parseScramSecret",
    "formatScramSecret",
    "loadKeyFile",
    "saltKeyForRoot",
    "LateKey",
    "keyBytes",
]

_log = Logger()

#: The iteration count of the keys popserv makes (for unknown users, and
#: from plaintext passwords): scramp's and Dovecot's default.
ITERATIONS = 4096

#: The salt key of a process that has no shared one: stable for the
#: process, unguessable. Where several processes answer, give every one the
#: same key kept on disk (L{saltKeyForRoot}).
PROCESS_SALT_KEY = secrets.token_bytes(32)

#: In the mail root: the salt key shared by every worker, node and restart
#: that serves the mail storage.
SCRAM_KEY_FILE = ".popserv-scram-key"

_KEY_SIZE = 32

_DIGESTS = {"SCRAM-SHA-1": hashlib.sha1, "SCRAM-SHA-256": hashlib.sha256}


@dataclass(frozen=True)
class ScramKeys:
    """What a server stores for SCRAM (RFC 5802 section 3): no password needed."""

    salt: bytes
    storedKey: bytes = field(repr=False)
    serverKey: bytes = field(repr=False)
    iterations: int


class ISecretSource(Interface):
    """
    What the credentials store can offer beyond checking a password: which
    kinds of secret some account holds (so only mechanisms that can succeed
    are advertised), and SCRAM keys.
    """

    def secretKinds() -> frozenset[str]:
        """Kinds held by at least one account: C{"plaintext"}, C{"SCRAM-SHA-256"}, ..."""

    def scramKeys(user: str, mechanism: str) -> Deferred[ScramKeys | None]:
        """The SCRAM keys of C{user} for C{mechanism} (e.g. SCRAM-SHA-256), or None."""


class LateKey:
    """
    A shared salt key that could not be fetched yet (its database was down
    when the server started). Until it is, whatever needs it fails with
    L{TemporaryFailure} (C{[SYS/TEMP]}), and each such call, at most one a
    C{retry} seconds, fetches it again in a thread: a node never settles on
    a key of its own that the other nodes do not share.

    @param fetch: gets the key (blocking; run through C{runInThread}).
    """

    def __init__(
        self,
        fetch: Callable[[], bytes],
        runInThread: Callable[..., Deferred[Any]],
        clock: Any,
        retry: float = 1.0,
    ) -> None:
        self.value: bytes | None = None
        self._fetch = fetch
        self._runInThread = runInThread
        self._clock = clock
        self._retry = retry
        self._pending = False
        self._next = 0.0

    def __repr__(self) -> str:
        return f"LateKey({'fetched' if self.value is not None else 'pending'})"

    def get(self) -> bytes:
        """The key; L{TemporaryFailure} while it is not fetched (and a new try)."""
        if self.value is not None:
            return self.value
        self.refresh()
        if self.value is not None:  # fetched at once (a synchronous fetch)
            return self.value
        from popserv.errors import TemporaryFailure

        raise TemporaryFailure()

    def refresh(self) -> None:
        """Fetch the key in a thread, unless a try is under way or too recent."""
        now = self._clock.seconds()
        if self.value is not None or self._pending or now < self._next:
            return
        self._pending, self._next = True, now + self._retry
        d = self._runInThread(self._fetch)
        d.addCallbacks(self._fetched, self._failed)

    def _fetched(self, value: bytes) -> None:
        self._pending = False
        self.value = value
        _log.info("the shared key for SCRAM's salts is fetched")

    def _failed(self, failure: Any) -> None:
        self._pending = False
        _log.debug("the shared key for SCRAM's salts: {error}", error=failure.getErrorMessage())


def keyBytes(saltKey: bytes | LateKey) -> bytes:
    """C{saltKey}'s bytes (L{LateKey.get} for a key still to be fetched)."""
    return saltKey if isinstance(saltKey, bytes) else saltKey.get()


def stableSalt(saltKey: bytes | LateKey, mechanism: str, user: str) -> bytes:
    """
    A salt for C{user} that is the same wherever C{saltKey} is: for keys
    derived from a plaintext password, and for the made-up keys of unknown
    users, so the two look alike. C{mechanism} is the base name (no
    C{-PLUS}), as a stored secret serves both variants.
    """
    key = keyBytes(saltKey)
    return hmac.new(key, f"salt\0{mechanism}\0{user}".encode(), hashlib.sha256).digest()[:16]


def deriveScramKeys(
    mechanism: str, password: str, salt: bytes | None = None, iterations: int = ITERATIONS
) -> ScramKeys:
    """
    The keys of C{password} for C{mechanism} (its base name): PBKDF2 after
    SASLprep, as scramp computes them. Slow on purpose: call it in a thread.

    @param salt: C{stableSalt(saltKey, mechanism, user)} for the keys of a
        plaintext password; None for a new random salt (a stored secret).
    """
    import scramp

    salt, stored, server, iterations = scramp.ScramMechanism(mechanism).make_auth_info(
        password, iterations, salt
    )
    return ScramKeys(salt, stored, server, iterations)


def fakeScramKeys(saltKey: bytes | LateKey, mechanism: str, user: str) -> ScramKeys:
    """
    Made-up keys for an unknown C{user}: nothing can match them, and their
    salt and iteration count look like a plaintext user's (L{stableSalt}).
    """
    digest = _DIGESTS[mechanism]
    seed = hmac.new(keyBytes(saltKey), f"{mechanism}\0{user}".encode(), digest).digest()
    return ScramKeys(stableSalt(saltKey, mechanism, user), seed, seed, ITERATIONS)


def parseScramSecret(secret: str) -> ScramKeys:
    """
    Dovecot's stored SCRAM form C{iterations,salt,StoredKey,ServerKey} (the
    last three in base64). Raises ValueError if malformed.
    """
    try:
        iterations, salt, stored, server = secret.split(",")
        keys = ScramKeys(
            base64.b64decode(salt, validate=True),
            base64.b64decode(stored, validate=True),
            base64.b64decode(server, validate=True),
            int(iterations),
        )
    except (ValueError, binascii.Error):
        raise ValueError(
            "malformed SCRAM secret (want iterations,salt,storedkey,serverkey)"
        ) from None
    if keys.iterations < 1 or not keys.salt:
        raise ValueError("malformed SCRAM secret")
    return keys


def formatScramSecret(keys: ScramKeys) -> str:
    """The stored form L{parseScramSecret} reads."""
    b64 = base64.b64encode
    return (
        f"{keys.iterations},{b64(keys.salt).decode()},"
        f"{b64(keys.storedKey).decode()},{b64(keys.serverKey).decode()}"
    )


# -- the salt key kept in the mail root -------------------------------------------


def loadKeyFile(path: str) -> bytes:
    """
    The random key kept in C{path}: read it, or make it (mode 0600) if there
    is none. Processes starting together agree on one: each writes its own
    candidate aside and links it in place, and whoever comes second reads
    the winner's. OSError if it cannot be read or made, ValueError if short.
    """
    try:
        return _readKey(path)
    except FileNotFoundError:
        pass
    candidate = f"{path}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, secrets.token_bytes(_KEY_SIZE))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(candidate, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(candidate)
    return _readKey(path)


def _readKey(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        key = os.read(fd, _KEY_SIZE)
    finally:
        os.close(fd)
    if len(key) < _KEY_SIZE:
        raise ValueError(f"{path}: {len(key)} bytes, a key needs {_KEY_SIZE}")
    return key


def saltKeyForRoot(root: str | os.PathLike[str]) -> bytes:
    """
    The salt key of the mail root C{root} (its L{SCRAM_KEY_FILE}, made if
    missing). If it can neither be read nor made, a warning says what that
    costs and the process's own L{PROCESS_SALT_KEY} is used.
    """
    path = os.path.join(root, SCRAM_KEY_FILE)
    try:
        os.makedirs(root, exist_ok=True)  # as the shared lock file is
        return loadKeyFile(path)
    except (OSError, ValueError) as e:
        _log.warn(
            "cannot use {path} ({error}): SCRAM's salts for unknown users are made "
            "up per process, so with several workers or nodes they tell unknown "
            "users from real ones",
            path=path,
            error=e,
        )
        return PROCESS_SALT_KEY
