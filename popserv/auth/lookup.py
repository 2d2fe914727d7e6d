"""
The half that auth sources which look a user up (a database row, a
directory entry) share: the lookups (in a thread), per-user settings and
the remembered users; the checks of credentials against what was found are
in L{popserv.auth.verify}. A source says how to find a user
(L{LookupPassdb._find}, blocking, run in a thread) and may say how to check
a password (L{CredentialChecks._checkPassword}, e.g. by binding as the user).

The answers: L{UnknownUser} for no user (after a decoy hash check of a
real one's cost, where the source checks hashes itself),
C{UnauthorizedLogin} for a wrong password, L{AccountDisabled} for
C{nologin}, L{TemporaryFailure} while the source is down (raised by
C{_find}).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from popserv.auth.cache import VerificationCache
from popserv.auth.credentials import IImpersonation
from popserv.auth.schemes import Scheme
from popserv.auth.scramkeys import ScramKeys
from popserv.auth.verify import REMEMBERED, CredentialChecks
from popserv.policy import parseExpire
from popserv.proxy.fields import ROUTING_FIELDS, routingSetting
from popserv.threads import RunInThread

__all__ = ["FoundUser", "LookupPassdb", "SETTING_FIELDS", "userSettings"]

_log = Logger()

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


class LookupPassdb(CredentialChecks):
    """
    Credentials checked against looked-up users; see the module docstring.
    A subclass calls L{_setUp} and provides C{_find}.
    """

    def _setUp(
        self,
        runInThread: RunInThread,
        masterUsers: frozenset[str],
        cache: VerificationCache | None,
        saltKey: Any,
        overridden: frozenset[str] = frozenset(),
    ) -> None:
        self._setUpChecks(runInThread, masterUsers, cache, saltKey)
        #: The users remembered (at most L{REMEMBERED}), for their settings.
        self._entries: OrderedDict[str, Any] = OrderedDict()
        self._overridden = overridden

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
        if found.scheme is not None:
            self._learnSecret(found.scheme, found.secret)
        return found

    # -- ICredentialsChecker ---------------------------------------------------------

    def requestAvatarId(self, credentials: Any) -> Deferred[str]:
        d = self.lookup(credentials.username)
        if IImpersonation.providedBy(credentials):
            return d.addCallback(self._target, credentials)
        return d.addCallback(self._checkFound, credentials)

    def _checkFound(self, found: FoundUser | None, credentials: Any) -> Deferred[str]:
        if found is None:
            return self._unknownUser(credentials)
        return self._check(found.name, found, credentials)

    def _target(self, found: FoundUser | None, credentials: Any) -> Deferred[str]:
        name = credentials.username if found is None else found.name
        return self._actAs(name, found, credentials)

    # -- IUserDirectory ------------------------------------------------------------------

    def knowsUser(self, user: str) -> Deferred[bool]:
        return self.lookup(user).addCallback(lambda found: found is not None)

    # -- ISecretSource -------------------------------------------------------------------

    def secretKinds(self) -> frozenset[str]:
        return self._kinds

    def scramKeys(self, user: str, mechanism: str) -> Deferred[ScramKeys | None]:
        return self.lookup(user).addCallback(self._keys, user, mechanism)

    # -- IUserSettingsSource ---------------------------------------------------------------

    def settingsFor(self, user: str) -> dict[str, Any]:
        found = self._entries.get(user)
        return found.settings if found is not None else {}

    def overriddenSettings(self) -> frozenset[str]:
        return self._overridden
