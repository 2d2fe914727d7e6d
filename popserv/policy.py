"""
Per-user session policy: LOGIN-DELAY and EXPIRE (RFC 2449 sections 6.5, 6.7).

Server-wide defaults come from the configuration; a user's own values come
from an L{IUserSettingsSource} (the passwd-file's extra fields
C{login_delay=N} and C{expire=N|NEVER}).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface

from popserv.errors import LoginDelayed
from popserv.interfaces import ILoginMemory

__all__ = ["UserSettings", "IUserSettingsSource", "SessionPolicy", "parseExpire", "NEVER"]

#: The EXPIRE value meaning messages are never removed by the server.
NEVER = None

_DAY = 86400

#: A shared login record this many seconds in the future came from a node
#: whose clock is ahead; it locks nobody out.
_SKEW = 60

_log = Logger()


def parseExpire(value: str | int | None) -> int | None:
    """C{"NEVER"}/None -> None; a whole number of days (0 allowed) -> int; else ValueError."""
    if value is None or (isinstance(value, str) and value.upper() == "NEVER"):
        return None
    days = int(value)
    if days < 0:
        raise ValueError("expire must be NEVER or a number of days >= 0")
    return days


@dataclass(frozen=True)
class UserSettings:
    """
    @ivar loginDelay: minimum seconds between two logins of the user (0: none).
    @ivar expire: days a message stays on the server (None: NEVER; 0: removed
        at UPDATE once retrieved).
    """

    loginDelay: int = 0
    expire: int | None = None

    def expireText(self) -> str:
        return "NEVER" if self.expire is None else str(self.expire)


class IUserSettingsSource(Interface):
    """Per-user overrides of the session policy."""

    def settingsFor(user: str) -> dict[str, Any]:
        """Overrides for C{user}: keys C{loginDelay} and/or C{expire}."""

    def overriddenSettings() -> frozenset[str]:
        """The setting names some user overrides (so CAPA says C{USER})."""


class SessionPolicy:
    """
    Defaults plus per-user overrides, and the memory of recent logins that
    LOGIN-DELAY needs.

    Logins are remembered in this process and, given an L{ILoginMemory}
    (the Maildir store is one), where every worker and node serving the
    maildrop sees them. The shared memory is only touched for users with a
    delay; if it fails, this process's own memory still applies.
    """

    def __init__(
        self,
        clock: IReactorTime,
        defaults: UserSettings = UserSettings(),
        source: IUserSettingsSource | None = None,
        memory: ILoginMemory | None = None,
    ) -> None:
        self.clock = clock
        self.defaults = defaults
        self.source = source
        self.memory = memory
        self._lastLogin: dict[str, float] = {}
        self._lock = threading.Lock()

    def settingsFor(self, user: str) -> UserSettings:
        if self.source is None:
            return self.defaults
        return self.settingsFrom(self.source.settingsFor(user))

    def overridesFor(self, user: str) -> dict[str, Any]:
        """
        The source's whole dictionary for C{user} (the proxy's routing fields
        too), to make L{settingsFrom} of without asking the source again.
        """
        return {} if self.source is None else self.source.settingsFor(user)

    def settingsFrom(self, overrides: dict[str, Any]) -> UserSettings:
        """The settings of a user whose source gave C{overrides}."""
        if not overrides:
            return self.defaults
        return UserSettings(
            loginDelay=overrides.get("loginDelay", self.defaults.loginDelay),
            expire=overrides.get("expire", self.defaults.expire),
        )

    def variesPerUser(self, setting: str) -> bool:
        return self.source is not None and setting in self.source.overriddenSettings()

    @property
    def enforcesLoginDelay(self) -> bool:
        return self.defaults.loginDelay > 0 or self.variesPerUser("loginDelay")

    def checkLogin(self, user: str, settings: UserSettings | None = None) -> Deferred[None] | None:
        """
        Fail with L{LoginDelayed} if C{user} logged in less than its delay
        ago: raise it, or, when the shared memory is asked, return a Deferred.

        @param settings: the user's, if the caller has them already.
        """
        if settings is None:
            settings = self.settingsFor(user)
        delay = settings.loginDelay
        if delay <= 0:
            return None
        last = self._lastLogin.get(user)
        if self.memory is None:
            self._refuseIfRecent(delay, last)
            return None
        d = maybeDeferred(self.memory.lastLogin, user)
        d.addErrback(self._memoryFailed, "read", user)
        return d.addCallback(lambda shared: self._refuseIfRecent(delay, last, shared))

    def _refuseIfRecent(self, delay: int, *logins: float | None) -> None:
        now = self.clock.seconds()
        known = [t for t in logins if t is not None and t - now <= _SKEW]
        if not known:
            return
        ago = now - max(known)
        if ago < delay:
            raise LoginDelayed(seconds=int(delay - ago) + 1)

    def _memoryFailed(self, failure: Failure, what: str, user: str) -> None:
        _log.warn(
            "cannot {what} the last login of {user} ({error}); this process's own memory applies",
            what=what,
            user=user,
            error=failure.getErrorMessage(),
        )

    def recordLogin(self, user: str, settings: UserSettings | None = None) -> None:
        """
        C{user} logged in now (the protocol calls this as it answers +OK,
        with the user's C{settings} if it has them already).
        """
        now = self.clock.seconds()
        if settings is None:
            settings = self.settingsFor(user)
        if self.memory is not None and settings.loginDelay > 0:
            d = maybeDeferred(self.memory.recordLogin, user, now)
            d.addErrback(self._memoryFailed, "record", user)
        with self._lock:
            self._lastLogin[user] = now
            if len(self._lastLogin) > 100_000:
                # Forget logins old enough that no delay can still apply.
                horizon = now - max(self.defaults.loginDelay, 86400)
                self._lastLogin = {u: t for u, t in self._lastLogin.items() if t > horizon}

    def expiryCutoff(self, settings: UserSettings) -> float | None:
        """Messages received before this time are expired (None: no age limit)."""
        if settings.expire is None or settings.expire == 0:
            return None
        return self.clock.seconds() - settings.expire * _DAY
