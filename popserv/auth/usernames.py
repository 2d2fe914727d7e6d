"""
User-name rules: the one canonical form of a login name, whatever the
mechanism and whichever auth source answers (Dovecot's
C{auth_username_translation}, C{auth_default_realm} and the C{%Lu} of
C{auth_username_format}).

They run in Dovecot's order:

  1. translation: each character of a pair becomes its partner
     (C{'%@*@'}: C{john%example.org} and C{john*example.org} both become
     C{john@example.org}, the SDPS-style logins);
  2. a default domain for a bare name (C{john} -> C{john@example.org});
  3. lower-casing, when asked for.

The same rules map LMTP recipients and C{popserv deliver}'s user, so mail
goes where the login finds it. Without rules nothing is wrapped: the login
path is as short as before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.internet.defer import Deferred
from zope.interface import alsoProvides, implementer

from popserv.auth.credentials import IImpersonation
from popserv.auth.scramkeys import ISecretSource, ScramKeys
from popserv.policy import IUserSettingsSource

__all__ = ["UsernameRules", "NameRulesChecker", "parseTranslation"]


def parseTranslation(pairs: str) -> dict[str, str]:
    """
    C{'%@*@'} as C{{'%': '@', '*': '@'}}: characters taken two by two, the
    first of each pair becoming the second. ValueError on an odd length.
    """
    if len(pairs) % 2:
        raise ValueError(f"{pairs!r}: characters in pairs (from, to), so an even number")
    return {pairs[i]: pairs[i + 1] for i in range(0, len(pairs), 2)}


@dataclass(frozen=True)
class UsernameRules:
    """
    The rules; calling them gives a name's canonical form.

    @ivar lowercase: lower-case the whole name.
    @ivar defaultDomain: appended as C{@DOMAIN} to a name without C{@}.
    @ivar translation: character -> character (L{parseTranslation}).
    """

    lowercase: bool = False
    defaultDomain: str | None = None
    translation: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def identity(self) -> bool:
        """True when the rules change no name."""
        return not (self.lowercase or self.defaultDomain or self.translation)

    def __call__(self, name: str) -> str:
        if self.translation:
            name = name.translate(str.maketrans(self.translation))
        if self.defaultDomain and "@" not in name:
            name = f"{name}@{self.defaultDomain}"
        if self.lowercase:
            name = name.lower()
        return name


def _renamed(credentials: Any, rules: Callable[[str], str]) -> Any:
    """C{credentials} with the user name (and a master user's) in canonical form."""
    if not dataclasses.is_dataclass(credentials) or isinstance(credentials, type):
        return credentials  # a third party's credentials: left as they are
    changes: dict[str, Any] = {}
    name = getattr(credentials, "username", None)
    if isinstance(name, str):
        changes["username"] = rules(name)
    if IImpersonation.providedBy(credentials):
        actor = _renamed(credentials.credentials, rules)
        if getattr(actor, "username", None) == changes.get("username"):
            return actor  # the user acting as themselves, in another spelling
        changes["credentials"] = actor
    return dataclasses.replace(credentials, **changes) if changes else credentials


@implementer(ICredentialsChecker, IUserSettingsSource)
class NameRulesChecker:
    """
    A checker (one source or a chain) asked with user names in canonical
    form. It offers the inner checker's SCRAM secrets (L{ISecretSource})
    when that does, looked up by the canonical name too.

    @ivar sources: the inner checker's sources, for LMTP's recipient
        lookups, which apply the rules themselves (L{rules}).
    """

    def __init__(self, checker: ICredentialsChecker, rules: UsernameRules) -> None:
        self.checker = checker
        self.rules = rules
        self.credentialInterfaces = checker.credentialInterfaces
        self.sources = tuple(getattr(checker, "sources", (checker,)))
        if ISecretSource.providedBy(checker):
            alsoProvides(self, ISecretSource)

    def __repr__(self) -> str:
        return f"NameRulesChecker({self.checker!r}, {self.rules!r})"

    def requestAvatarId(self, credentials: Any) -> Deferred[str]:
        return self.checker.requestAvatarId(_renamed(credentials, self.rules))  # type: ignore[no-any-return]

    # -- ISecretSource, offered when the inner checker is one -------------------

    def secretKinds(self) -> frozenset[str]:
        return self.checker.secretKinds()  # type: ignore[attr-defined, no-any-return]

    def scramKeys(self, user: str, mechanism: str) -> Deferred[ScramKeys | None]:
        return self.checker.scramKeys(self.rules(user), mechanism)  # type: ignore[attr-defined, no-any-return]

    # -- IUserSettingsSource -------------------------------------------------------

    def settingsFor(self, user: str) -> dict[str, Any]:
        if IUserSettingsSource.providedBy(self.checker):
            return self.checker.settingsFor(self.rules(user))  # type: ignore[no-any-return]
        return {}

    def overriddenSettings(self) -> frozenset[str]:
        if IUserSettingsSource.providedBy(self.checker):
            return self.checker.overriddenSettings()  # type: ignore[no-any-return]
        return frozenset()
