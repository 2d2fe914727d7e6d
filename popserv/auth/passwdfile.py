"""
A cred checker over a Dovecot-compatible passwd-file.

Each line is C{user:{SCHEME}secret[:uid:gid:gecos:home:shell:extra]}; blank
lines and lines starting with C{#} are ignored. Of the further fields only
the extra fields (space-separated) are read: C{login_delay=N},
C{expire=N|NEVER}, C{quota_bytes=N}, C{quota_messages=N} (also with
Dovecot's C{userdb_} prefix), C{nologin}, and the proxy's routing fields
(C{proxy=y host= port= destuser= proxy_timeout= starttls= ssl=}, see
L{popserv.proxy.fields}).
The file is re-read when it changes on disk, so adding a user needs no restart.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from popserv.auth.cache import VerificationCache
from popserv.auth.credentials import IImpersonation
from popserv.auth.schemes import Scheme, UnknownScheme, parseStoredPassword
from popserv.auth.scramkeys import ISecretSource, ScramKeys
from popserv.auth.verify import NO_PASSWORD, Account, CredentialChecks
from popserv.interfaces import IUserDirectory
from popserv.policy import IUserSettingsSource, parseExpire
from popserv.proxy.fields import routingSetting, yes
from popserv.threads import RunInThread, reactorThreads

__all__ = ["PasswdFileChecker", "parsePasswdFile", "PasswdEntry"]

_log = Logger()


@dataclass(frozen=True)
class PasswdEntry:
    """One account: its password scheme and secret, and its extra fields."""

    scheme: Scheme
    secret: str = field(repr=False)
    settings: dict[str, Any] = field(default_factory=dict)
    disabled: bool = False


#: Quota fields (enforced at LMTP delivery) and their settings' names.
_QUOTAS = {"quota_bytes": "quotaBytes", "quota_messages": "quotaMessages"}


def _extraFields(text: str) -> tuple[dict[str, Any], bool, bool]:
    """The settings of a line's extra fields, and its C{nologin} and C{nopassword}."""
    settings: dict[str, Any] = {}
    disabled = noPassword = False
    for item in text.split():
        key, _, value = item.partition("=")
        key = key.removeprefix("userdb_")
        if key == "nologin":
            disabled = True
        elif key == "nopassword":
            noPassword = yes(value)
        elif key == "login_delay":
            settings["loginDelay"] = int(value)
        elif key == "expire":
            settings["expire"] = parseExpire(value)
        elif key in _QUOTAS:
            if not (value.isascii() and value.isdigit()):
                raise ValueError(f"{key} must be a whole number (0: no limit)")
            settings[_QUOTAS[key]] = int(value)
        else:
            routed = routingSetting(key, value)
            if routed is not None:
                settings[routed[0]] = routed[1]
    return settings, disabled, noPassword


def parsePasswdFile(
    text: str, source: str = "passwd-file", problems: list[str] | None = None
) -> dict[str, PasswdEntry]:
    """
    Parse passwd-file text into {user: entry}. Bad lines are skipped and
    reported: appended to C{problems} if given, logged otherwise.
    """
    users: dict[str, PasswdEntry] = {}

    def bad(lineno: int, why: str) -> None:
        message = f"{source}:{lineno}: {why}; line ignored"
        if problems is not None:
            problems.append(message)
        else:
            _log.warn("{message}", message=message)

    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split(":", 7)
        user = fields[0]
        if len(fields) < 2 or not user:
            bad(lineno, "no user:password")
            continue
        try:
            settings, disabled, noPassword = _extraFields(fields[7] if len(fields) > 7 else "")
            # nopassword=y (Dovecot's): the password field is not read at all.
            scheme, secret = (NO_PASSWORD, "") if noPassword else parseStoredPassword(fields[1])
        except (UnknownScheme, ValueError) as e:
            bad(lineno, f"user {user}: {e}")
            continue
        if user in users:
            bad(lineno, f"user {user} appears again")
            continue
        users[user] = PasswdEntry(scheme, secret, settings, disabled)
    return users


@implementer(ICredentialsChecker, ISecretSource, IUserSettingsSource, IUserDirectory)
class PasswdFileChecker(CredentialChecks):
    """
    Checks USER/PASS and SASL PLAIN/LOGIN (C{IUsernamePassword}), APOP and
    CRAM-MD5 (C{IUsernameHashedPassword}, only for C{{PLAIN}} accounts: no
    other scheme yields the shared secret), SCRAM results
    (L{IVerifiedCredentials}: the keys came from here) and master-user logins
    (L{IImpersonation}, for the users in C{masterUsers}).

    Unknown users and wrong passwords fail alike, with C{UnauthorizedLogin},
    after the same work and with the same answer on the wire; an unknown
    user's failure is its subclass L{UnknownUser}, so that a chain of
    sources can tell the two apart.

    The checks are L{CredentialChecks}; this class finds the accounts in
    the file.

    @param runInThread: runs slow hashes (argon2, bcrypt, crypt, PBKDF2) off
        the reactor thread.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        runInThread: RunInThread | None = None,
        masterUsers: frozenset[str] = frozenset(),
        cache: VerificationCache | None = None,
        recheck: float = 1.0,
        saltKey: bytes | None = None,
    ) -> None:
        self.path = os.fspath(path)
        #: Seconds a check of the file stands for what does not authenticate.
        self.recheck = recheck
        # The salt key: SCRAM salts of plaintext passwords stay the same
        # across reloads of the file (and, given one key, across workers).
        self._setUpChecks(runInThread or reactorThreads(), masterUsers, cache, saltKey)
        self._stamp: tuple[int, int, int, int] | None = None
        self._checked = float("-inf")  # monotonic time of the last stat
        self._users: dict[str, PasswdEntry] = {}
        self._overridden: frozenset[str] = frozenset()
        self._load()

    def _load(self, maxAge: float = 0.0) -> None:
        """
        (Re-)read the file if it changed; keep the old table if it cannot be read.

        With C{maxAge}, a check made less than that many seconds ago stands.
        Authentication always checks (a changed password counts at once);
        what only shapes offers and settings (the APOP challenge, CAPA,
        LOGIN-DELAY) may be L{recheck} seconds late, which spares each login
        three of its four C{stat} calls.
        """
        now = time.monotonic()
        if maxAge and now - self._checked < maxAge:
            return
        self._checked = now
        try:
            st = os.stat(self.path)
            stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if stamp == self._stamp:
                return
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            if self._stamp is None:
                raise
            _log.error(
                "cannot re-read {path}: {error}; keeping the users loaded before",
                path=self.path,
                error=e,
            )
            return
        self._users = parsePasswdFile(text, self.path)
        self._kinds = frozenset()
        self._decoy = None
        for entry in self._users.values():
            self._learnSecret(entry.scheme, entry.secret)
        # With no slow hash in the file, no real check costs a thread either.
        self._decoys = self._decoy is not None
        self._overridden = frozenset(k for e in self._users.values() for k in e.settings)
        self._derived.clear()
        self._stamp = stamp

    @property
    def users(self) -> frozenset[str]:
        """The user names currently in the file."""
        self._load()
        return frozenset(self._users)

    def knowsUser(self, user: str) -> bool:
        """
        Whether C{user} has a line in the file (L{IUserDirectory}), as of at
        most L{recheck} seconds ago: this runs on the reactor for each LMTP
        RCPT, which should not cost a C{stat} (or a re-read) each.
        """
        self._load(self.recheck)
        return user in self._users

    # -- ICredentialsChecker ---------------------------------------------------

    def requestAvatarId(self, credentials: Any) -> Deferred[str]:
        self._load()
        name = credentials.username
        if IImpersonation.providedBy(credentials):
            return self._actAs(name, self._users.get(name), credentials)
        entry = self._users.get(name)
        if entry is None:
            return self._unknownUser(credentials)
        return self._check(name, entry, credentials)

    def _current(self, name: str, found: Account) -> Account | None:
        # The file may have been re-read while a slow hash was checked.
        return self._users.get(name)

    # -- ISecretSource -----------------------------------------------------------

    def secretKinds(self) -> frozenset[str]:
        self._load(self.recheck)
        return self._kinds

    def scramKeys(self, user: str, mechanism: str) -> Deferred[ScramKeys | None]:
        self._load()
        keys = self._keys(self._users.get(user), user, mechanism)
        return keys if isinstance(keys, Deferred) else succeed(keys)

    # -- IUserSettingsSource -------------------------------------------------------

    def settingsFor(self, user: str) -> dict[str, Any]:
        self._load(self.recheck)
        entry = self._users.get(user)
        return entry.settings if entry else {}

    def overriddenSettings(self) -> frozenset[str]:
        self._load(self.recheck)
        return self._overridden
