"""
Several auth sources asked in turn, with the outcome Dovecot's passdb
defaults give (C{result_failure=continue}, C{result_internalfail=continue},
C{result_success=return-ok}):

  - a source that does not know the user (L{UnknownUser}) passes the login
    on to the next one;
  - a wrong password (any other L{UnauthorizedLogin}) passes it on too; the
    login fails with C{[AUTH]} only if no later source accepts;
  - a source that is down (L{TemporaryFailure}, an C{OSError}, any error
    that is not a L{POP3Error}, or no answer within the timeout) passes it
    on as well, but if no source accepts, the login fails with
    C{[SYS/TEMP]}: the source that was down might have accepted;
  - any other L{POP3Error}, such as L{AccountDisabled} (C{nologin}) from the
    source that knows the user, ends the login at once.

SCRAM keys and per-user settings come from the first source that knows
the user; the kinds of secret and the overridden settings of all sources
are offered together. A source that lacks L{ISecretSource} or
L{IUserSettingsSource} has none to give.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet.defer import Deferred, TimeoutError, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from popserv.auth.scramkeys import ISecretSource, ScramKeys
from popserv.errors import POP3Error, TemporaryFailure, UnknownUser
from popserv.policy import IUserSettingsSource

__all__ = ["PassdbChain", "chainSources", "SOURCE_TIMEOUT"]

#: Seconds a source may take to answer before it counts as down. Generous:
#: a slow hash waits its turn in the thread pool; the login timer is longer.
SOURCE_TIMEOUT = 30.0

#: The users whose accepting source is remembered (for their settings).
_REMEMBERED = 100_000

_log = Logger()

#: What the sources asked so far said, as bits: nothing but unknown user,
#: a wrong password, a source down.
_UNKNOWN, _WRONG, _DOWN = 0, 1, 2


@implementer(ICredentialsChecker, ISecretSource, IUserSettingsSource)
class PassdbChain:
    """
    Auth sources (cred checkers) asked in order until one accepts; see the
    module docstring for the outcome. Use L{chainSources}, which gives a
    single source back unwrapped.

    @param sources: the checkers, in the order they are asked.
    @param clock: times the sources (with C{timeout}); without one a source
        may take as long as it likes.
    """

    def __init__(
        self,
        sources: Sequence[ICredentialsChecker],
        clock: IReactorTime | None = None,
        timeout: float = SOURCE_TIMEOUT,
    ) -> None:
        if not sources:
            raise ValueError("an auth chain needs at least one source")
        self.sources = tuple(sources)
        self.clock = clock
        self.timeout = timeout
        interfaces: dict[Any, None] = {}
        for source in self.sources:
            interfaces.update(dict.fromkeys(source.credentialInterfaces))
        self.credentialInterfaces = tuple(interfaces)
        self._secretSources = [s for s in self.sources if ISecretSource.providedBy(s)]
        self._settingsSources = [s for s in self.sources if IUserSettingsSource.providedBy(s)]
        #: user -> the source that last accepted them (their settings' source).
        self._acceptedBy: dict[str, ICredentialsChecker] = {}

    def __repr__(self) -> str:
        return f"PassdbChain({list(self.sources)!r})"

    # -- ICredentialsChecker ---------------------------------------------------

    def requestAvatarId(self, credentials: Any) -> Deferred[str]:
        return self._ask(credentials, 0, _UNKNOWN, None)

    def _ask(
        self, credentials: Any, start: int, worst: int, down: Failure | None
    ) -> Deferred[str]:
        for index in range(start, len(self.sources)):
            source = self.sources[index]
            for interface in source.credentialInterfaces:
                if interface.providedBy(credentials):
                    break
            else:
                continue
            d = self._timed(maybeDeferred(source.requestAvatarId, credentials))
            return d.addBoth(self._answered, credentials, index, worst, down)
        if worst & _DOWN:
            assert down is not None
            # A wrong password counts as a failed login even if another
            # source's outage is what the client is told: an outage must not
            # switch the failed-login penalty off.
            down.value.penalize = bool(worst & _WRONG)
            return fail(down)
        return fail(UnauthorizedLogin() if worst & _WRONG else UnknownUser())

    def _answered(
        self, answer: str | Failure, credentials: Any, index: int, worst: int, down: Failure | None
    ) -> str | Deferred[str] | Failure:
        if not isinstance(answer, Failure):
            accepted, source = self._acceptedBy, self.sources[index]
            if accepted.get(answer) is not source:
                if len(accepted) >= _REMEMBERED:
                    accepted.clear()
                accepted[answer] = source
            return answer
        failure = answer
        if failure.check(UnknownUser, UnhandledCredentials):
            pass
        elif failure.check(UnauthorizedLogin):
            worst |= _WRONG
        elif failure.check(POP3Error) and not failure.check(TemporaryFailure):
            return failure  # AccountDisabled and the like: the source decided
        else:
            worst |= _DOWN
            generic = self._down(failure, self.sources[index])  # logs every source down
            down = down or generic
        return self._ask(credentials, index + 1, worst, down)

    def _timed(self, d: Deferred[Any]) -> Deferred[Any]:
        if not d.called and self.clock is not None and self.timeout > 0:
            d.addTimeout(self.timeout, self.clock)
        return d

    def _down(self, failure: Failure, source: object) -> Failure:
        """
        Log a source that is down; the failure the login gets if no source
        accepts: the generic one, as the source's own text may say more
        about the back end than a client should read.
        """
        if failure.check(TemporaryFailure, TimeoutError):
            _log.warn(
                "auth source {source} is unavailable: {error}",
                source=source,
                error=failure.getErrorMessage() or f"no answer in {self.timeout} s",
            )
        else:
            _log.failure("auth source {source} failed", failure, source=source)
        return Failure(TemporaryFailure())

    # -- ISecretSource -----------------------------------------------------------

    def secretKinds(self) -> frozenset[str]:
        kinds: frozenset[str] = frozenset()
        for source in self._secretSources:
            kinds |= source.secretKinds()
        return kinds

    def scramKeys(self, user: str, mechanism: str) -> Deferred[ScramKeys | None]:
        return self._keysFrom(0, user, mechanism, None)

    def _keysFrom(
        self, start: int, user: str, mechanism: str, down: Failure | None
    ) -> Deferred[ScramKeys | None]:
        if start >= len(self._secretSources):
            return succeed(None) if down is None else fail(down)
        source = self._secretSources[start]
        d = self._timed(maybeDeferred(source.scramKeys, user, mechanism))

        def answered(keys: ScramKeys | None) -> Deferred[ScramKeys | None] | ScramKeys:
            if keys is None:
                return self._keysFrom(start + 1, user, mechanism, down)
            return keys

        def failed(failure: Failure) -> Deferred[ScramKeys | None]:
            generic = self._down(failure, source)
            return self._keysFrom(start + 1, user, mechanism, down or generic)

        return d.addCallbacks(answered, failed)

    # -- IUserSettingsSource -------------------------------------------------------

    def settingsFor(self, user: str) -> dict[str, Any]:
        """
        The settings of the source that accepted C{user} (the login asks
        once the user is in); failing that, the first source's that has some.
        """
        source = self._acceptedBy.get(user)
        if source is not None:
            if IUserSettingsSource.providedBy(source):
                return source.settingsFor(user)  # type: ignore[no-any-return]
            return {}
        for candidate in self._settingsSources:
            settings = candidate.settingsFor(user)
            if settings:
                return settings  # type: ignore[no-any-return]
        return {}

    def overriddenSettings(self) -> frozenset[str]:
        names: frozenset[str] = frozenset()
        for source in self._settingsSources:
            names |= source.overriddenSettings()
        return names

    @property
    def users(self) -> frozenset[str]:
        """The users of every source that can list its own."""
        names: frozenset[str] = frozenset()
        for source in self.sources:
            names |= frozenset(getattr(source, "users", ()))
        return names


def chainSources(
    sources: Sequence[ICredentialsChecker],
    clock: IReactorTime | None = None,
    timeout: float = SOURCE_TIMEOUT,
) -> ICredentialsChecker:
    """
    One checker for C{sources}: a single source itself (the login path stays
    as short as it was), several as a L{PassdbChain}.
    """
    if len(sources) == 1:
        return sources[0]
    return PassdbChain(sources, clock, timeout)
