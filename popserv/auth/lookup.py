"""
The half that auth sources which look a user up (a database row, a
directory entry) share: checking credentials against what was found, the
answers every source gives, SCRAM keys, per-user settings and the
remembered users. A source says how to find a user (L{LookupPassdb._find},
blocking, run in a thread) and may say how to check a password
(L{LookupPassdb._checkPassword}, e.g. by binding as the user).

The answers: L{UnknownUser} for no user (after a decoy hash check of a
real one's cost, where the source checks hashes itself),
C{UnauthorizedLogin} for a wrong password, L{AccountDisabled} for
C{nologin}, L{TemporaryFailure} while the source is down (raised by
C{_find}).
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger

from popserv.auth.cache import VerificationCache
from popserv.auth.credentials import IImpersonation, IVerifiedCredentials
from popserv.auth.schemes import Scheme, parseStoredPassword
from popserv.auth.scramkeys import (
    PROCESS_SALT_KEY,
    ScramKeys,
    deriveScramKeys,
    parseScramSecret,
    stableSalt,
)
from popserv.errors import AccountDisabled, UnknownUser
from popserv.interfaces import UnverifiedUser
from popserv.policy import parseExpire
from popserv.proxy.fields import ROUTING_FIELDS, routingSetting
from popserv.threads import RunInThread

__all__ = ["FoundUser", "LookupPassdb", "SETTING_FIELDS", "userSettings"]

_log = Logger()

#: The users remembered (for their settings and accepting source).
REMEMBERED = 100_000

#: Per-user fields (a column, an attribute) and the settings they set.
SETTING_FIELDS = {
    "login_delay": "loginDelay",
    "expire": "expire",
    "quota_bytes": "quotaBytes",
    "quota_messages": "quotaMessages",
}


def userSettings(value: Callable[[str], Any], source: object, user: str) -> dict[str, Any]:
    """
    A user's settings from the fields C{value(field)} gives (None: absent):
    L{SETTING_FIELDS} and the proxy mode's routing fields. A bad value is
    left out with a warning.
    """
    settings: dict[str, Any] = {}
    for field, setting in SETTING_FIELDS.items():
        given = value(field)
        if given is None:
            continue
        try:
            if field == "expire":
                settings[setting] = parseExpire(given)
            elif int(given) < 0:
                raise ValueError("negative")
            else:
                settings[setting] = int(given)
        except (TypeError, ValueError) as e:
            _bad(source, user, field, given, e)
    for field in ROUTING_FIELDS:
        given = value(field)
        if given is None or field == "port" and given == "":
            continue
        try:
            routed = routingSetting(field, given)
        except (TypeError, ValueError) as e:
            _bad(source, user, field, given, e)
            continue
        if routed is not None:
            settings[routed[0]] = routed[1]
    return settings


def _bad(source: object, user: str, field: str, given: object, error: Exception) -> None:
    _log.warn(
        "{source}: user {user}: bad {field} {value!r} ignored ({error})",
        source=source,
        user=user,
        field=field,
        value=given,
        error=error,
    )


class FoundUser(Protocol):
    """What a lookup found: a row, an entry. C{scheme} None: no usable password."""

    name: str
    scheme: Scheme | None
    secret: str
    settings: dict[str, Any]
    disabled: bool


class LookupPassdb:
    """
    Credentials checked against looked-up users; see the module docstring.
    A subclass calls L{_setUp} and provides C{_find}.

    @ivar masterUsers: users who may act as another (L{IImpersonation}).
    @ivar cache: remembers successful slow-hash checks, or None.
    @ivar saltKey: what SCRAM salts of plaintext passwords derive from.
    """

    #: Whether an unknown user costs a decoy hash check (False where the
    #: source does not check hashes itself).
    _decoys = True

    def _setUp(
        self,
        runInThread: RunInThread,
        masterUsers: frozenset[str],
        cache: VerificationCache | None,
        saltKey: Any,
        overridden: frozenset[str] = frozenset(),
    ) -> None:
        self._runInThread = runInThread
        self.masterUsers = frozenset(masterUsers)
        self.cache = cache
        self.saltKey = saltKey or PROCESS_SALT_KEY
        self._entries: OrderedDict[str, Any] = OrderedDict()
        self._kinds: frozenset[str] = frozenset()
        self._overridden = overridden
        self._derived: dict[tuple[str, str, str], ScramKeys] = {}
        self._decoy: tuple[Scheme, str] | None = None

    def _find(self, user: str) -> FoundUser | None:
        """The user, or None (blocking: runs in a thread)."""
        raise NotImplementedError

    # -- lookups (on the reactor) ------------------------------------------------------

    def lookup(self, user: str) -> Deferred[Any]:
        """The user found, or None; remembered for L{settingsFor}."""
        return self._runInThread(self._find, user).addCallback(self._remember, user)

    def _remember(self, found: FoundUser | None, user: str) -> FoundUser | None:
        entries = self._entries
        if found is None:
            entries.pop(user, None)
            return None
        for name in {user, found.name}:
            entries[name] = found
            entries.move_to_end(name)
        while len(entries) > REMEMBERED:
            entries.popitem(last=False)
        if found.settings.keys() - self._overridden:
            self._overridden |= found.settings.keys()
        scheme = found.scheme
        if scheme is not None:
            self._learnKinds(scheme)
            if scheme.slow and self._decoy is None:
                self._decoy = (scheme, found.secret)
        return found

    def _learnKinds(self, scheme: Scheme) -> None:
        """Secrets of C{scheme} exist here: the mechanisms they allow are offered."""
        if scheme.plaintext and "plaintext" not in self._kinds:
            self._kinds |= {"plaintext"}
        if scheme.scram and scheme.scram not in self._kinds:
            self._kinds |= {scheme.scram}

    # -- ICredentialsChecker ---------------------------------------------------------

    def requestAvatarId(self, credentials: Any) -> Deferred[str]:
        if IImpersonation.providedBy(credentials):
            return self._impersonate(credentials)
        return self.lookup(credentials.username).addCallback(self._check, credentials)

    def _check(self, found: FoundUser | None, credentials: Any) -> Deferred[str]:
        if found is None:
            return self._unknownUser(credentials)
        if IVerifiedCredentials.providedBy(credentials):
            d: Deferred[bool] = succeed(True)
        else:
            d = self._checkPassword(found, credentials)
        return d.addCallback(_verdict, found)

    def _checkPassword(self, found: FoundUser, credentials: Any) -> Deferred[bool]:
        """Whether C{credentials} match the password found."""
        scheme, secret = found.scheme, found.secret
        if scheme is None:
            return succeed(False)
        if IUsernamePassword.providedBy(credentials):
            password = credentials.password
            cache = self.cache
            if not scheme.slow:
                return succeed(scheme.verify(password, secret))
            if cache is not None and cache.known(found.name, secret, password):
                return succeed(True)
            d = self._runInThread(scheme.verify, password, secret)
            if cache is not None:
                d.addCallback(self._cached, found.name, secret, password)
            return d
        if IUsernameHashedPassword.providedBy(credentials) and scheme.plaintext:
            return succeed(credentials.checkPassword(secret.encode("utf-8")))
        return succeed(False)

    def _cached(self, matched: bool, user: str, secret: str, password: bytes) -> bool:
        if matched and self.cache is not None:
            self.cache.remember(user, secret, password)
        return matched

    def _unknownUser(self, credentials: Any) -> Deferred[str]:
        """Fail after the work a real account's check costs (see the passwd-file's)."""
        if not self._decoys or not IUsernamePassword.providedBy(credentials):
            return fail(UnknownUser())
        d = self._runInThread(self._decoyCheck, credentials.password)
        return d.addCallback(_unknown)

    def _decoyCheck(self, password: bytes) -> bool:
        decoy = self._decoy
        if decoy is None:
            from popserv.auth.schemes import hashPassword

            decoy = parseStoredPassword(hashPassword("ARGON2ID", secrets.token_urlsafe(16)))
            self._decoy = decoy
        return decoy[0].verify(password, decoy[1])

    def _impersonate(self, credentials: Any) -> Deferred[str]:
        actor = credentials.credentials

        def target(found: FoundUser | None) -> Deferred[str]:
            if found is None:
                return fail(UnknownUser())
            if actor.username not in self.masterUsers:
                return fail(UnauthorizedLogin())
            d = self.requestAvatarId(actor)
            return d.addCallback(_actedAs, found)

        return self.lookup(credentials.username).addCallback(target)

    # -- IUserDirectory ------------------------------------------------------------------

    def knowsUser(self, user: str) -> Deferred[bool]:
        return self.lookup(user).addCallback(lambda found: found is not None)

    # -- ISecretSource -------------------------------------------------------------------

    def secretKinds(self) -> frozenset[str]:
        return self._kinds

    def scramKeys(self, user: str, mechanism: str) -> Deferred[ScramKeys | None]:
        return self.lookup(user).addCallback(self._keys, user, mechanism)

    def _keys(
        self, found: FoundUser | None, user: str, mechanism: str
    ) -> ScramKeys | Deferred[ScramKeys] | None:
        if found is None or found.scheme is None:
            return None
        if found.scheme.scram == mechanism:
            return parseScramSecret(found.secret)
        if not found.scheme.plaintext:
            return None
        key = (user, mechanism, found.secret)
        if key in self._derived:
            return self._derived[key]
        salt = stableSalt(self.saltKey, mechanism, user)
        d = self._runInThread(deriveScramKeys, mechanism, found.secret, salt)
        return d.addCallback(self._keep, key)

    def _keep(self, keys: ScramKeys, key: tuple[str, str, str]) -> ScramKeys:
        if len(self._derived) >= REMEMBERED:
            self._derived.clear()
        return self._derived.setdefault(key, keys)

    # -- IUserSettingsSource ---------------------------------------------------------------

    def settingsFor(self, user: str) -> dict[str, Any]:
        found = self._entries.get(user)
        return found.settings if found is not None else {}

    def overriddenSettings(self) -> frozenset[str]:
        return self._overridden


def _verdict(matched: bool, found: FoundUser) -> str:
    if not matched:
        raise UnauthorizedLogin()
    if found.disabled:
        raise AccountDisabled()
    return found.name


def _actedAs(actor: str, found: FoundUser) -> str:
    if isinstance(actor, UnverifiedUser):
        raise UnauthorizedLogin()  # a master user's password is checked here or never
    return _verdict(True, found)


def _unknown(_matched: object) -> str:
    raise UnknownUser()
