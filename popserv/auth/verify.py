"""
The checks every auth source that holds or reads its users' password hashes
makes alike (the passwd-file, L{popserv.auth.passwdfile}; SQL and LDAP,
L{popserv.auth.lookup}): credentials against an account found, the decoy
check for an unknown user, master-user logins, the verdict, and SCRAM keys.

A source finds the account (at once, or in a thread) and hands it to
L{CredentialChecks._check}, L{CredentialChecks._unknownUser} or
L{CredentialChecks._actAs}. Its answers: L{UnknownUser} for no account
(after a decoy hash check of a real one's cost), C{UnauthorizedLogin} for a
wrong password, L{AccountDisabled} for C{nologin}.
"""

from __future__ import annotations

import secrets
from typing import Any, Protocol

from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed

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
from popserv.threads import RunInThread

__all__ = ["Account", "CredentialChecks", "NO_PASSWORD", "REMEMBERED"]

#: The users (and derived SCRAM keys) a source remembers at most.
REMEMBERED = 100_000


def _nothingMatches(password: bytes, secret: str) -> bool:
    return False


#: The scheme of a C{nopassword=y} account: nothing is checked here, and
#: nothing matches (APOP, CRAM-MD5 and SCRAM need a secret; there is none).
NO_PASSWORD = Scheme("NOPASSWORD", _nothingMatches, slow=False)


class Account(Protocol):
    """What the checks read of an account found. C{scheme} None: no usable password."""

    @property
    def scheme(self) -> Scheme | None: ...

    @property
    def secret(self) -> str: ...

    @property
    def disabled(self) -> bool: ...


class CredentialChecks:
    """
    Checks L{IUsernamePassword} (slow schemes in a thread, through the
    L{VerificationCache}), L{IUsernameHashedPassword} (APOP, CRAM-MD5: only
    against plaintext secrets), L{IVerifiedCredentials} (the account must
    exist) and L{IImpersonation} (for the users in C{masterUsers}) against
    an account found; see the module docstring. A source calls
    L{_setUpChecks}.

    @ivar masterUsers: users who may act as another (L{IImpersonation}).
    @ivar cache: remembers successful slow-hash checks, or None.
    @ivar saltKey: what SCRAM salts of plaintext passwords derive from, so a
        user keeps one salt (see L{popserv.auth.scramkeys}).
    """

    credentialInterfaces: tuple[Any, ...] = (
        IUsernamePassword,
        IUsernameHashedPassword,
        IVerifiedCredentials,
        IImpersonation,
    )

    #: Whether an unknown user costs a decoy hash check: L{_decoy}'s, or a
    #: throw-away argon2 hash's while none is known (False where the source
    #: does not check hashes itself, or no real check would cost one).
    _decoys = True

    def _setUpChecks(
        self,
        runInThread: RunInThread,
        masterUsers: frozenset[str],
        cache: VerificationCache | None,
        saltKey: bytes | None,
    ) -> None:
        self._runInThread = runInThread
        self.masterUsers = frozenset(masterUsers)
        self.cache = cache
        self.saltKey = saltKey or PROCESS_SALT_KEY
        self._kinds: frozenset[str] = frozenset()
        self._decoy: tuple[Scheme, str] | None = None
        self._derived: dict[tuple[str, str, str], ScramKeys] = {}

    def _learnKinds(self, scheme: Scheme) -> None:
        """Secrets of C{scheme} exist here: the mechanisms they allow are offered."""
        if scheme.plaintext and "plaintext" not in self._kinds:
            self._kinds |= {"plaintext"}
        if scheme.scram and scheme.scram not in self._kinds:
            self._kinds |= {scheme.scram}

    def _learnSecret(self, scheme: Scheme, secret: str) -> None:
        """A secret exists here: see L{_learnKinds}; the first slow one is the decoy."""
        self._learnKinds(scheme)
        if scheme.slow and self._decoy is None:
            self._decoy = (scheme, secret)

    # -- credentials against an account ----------------------------------------------

    def _check(self, name: str, found: Account, credentials: Any) -> Deferred[str]:
        """The verdict on C{credentials} for C{found}, the account of C{name}."""
        scheme = found.scheme
        if IUsernamePassword.providedBy(credentials):
            if scheme is NO_PASSWORD:
                # Only the user's backend may check this password (see UnverifiedUser).
                return maybeDeferred(self._verdict, True, UnverifiedUser(name), found)
            d = self._checkPassword(name, found, credentials.password)
        elif IUsernameHashedPassword.providedBy(credentials) and _plaintext(scheme):
            d = succeed(credentials.checkPassword(found.secret.encode("utf-8")))
        elif IVerifiedCredentials.providedBy(credentials):
            d = succeed(True)
        else:
            return fail(UnauthorizedLogin())
        return d.addCallback(self._verdict, name, found)

    def _checkPassword(self, name: str, found: Account, password: bytes) -> Deferred[bool]:
        """Whether C{password} matches the secret found (a source may check it otherwise)."""
        scheme, secret = found.scheme, found.secret
        if scheme is None:
            return succeed(False)
        if not scheme.slow:
            return maybeDeferred(scheme.verify, password, secret)
        cache = self.cache
        if cache is not None and cache.known(name, secret, password):
            return succeed(True)
        d = self._runInThread(scheme.verify, password, secret)
        if cache is not None:
            d.addCallback(self._cached, name, secret, password)
        return d

    def _cached(self, matched: bool, name: str, secret: str, password: bytes) -> bool:
        if matched and self.cache is not None:
            self.cache.remember(name, secret, password)
        return matched

    def _current(self, name: str, found: Account) -> Account | None:
        """
        The account the verdict goes by: the one found, or (a source whose
        accounts may change while a check runs) the one C{name} has now.
        """
        return found

    def _verdict(self, matched: bool, name: str, found: Account) -> str:
        if not matched:
            raise UnauthorizedLogin()
        account = self._current(name, found)
        if account is None:
            raise UnknownUser()
        if account.disabled:
            raise AccountDisabled()
        return name

    # -- no account ----------------------------------------------------------------------

    def _unknownUser(self, credentials: Any) -> Deferred[str]:
        """
        Fail, but only after the work a real account's check would cost: a
        quick refusal would tell a guesser which user names exist.
        """
        if not self._decoys or not IUsernamePassword.providedBy(credentials):
            return fail(UnknownUser())
        d = self._runInThread(self._decoyCheck, self._decoy, credentials.password)
        return d.addCallback(_unknown)

    def _decoyCheck(self, decoy: tuple[Scheme, str] | None, password: bytes) -> bool:
        """The decoy check (in a thread); with no decoy known yet, one is made."""
        if decoy is None:
            from popserv.auth.schemes import hashPassword

            decoy = parseStoredPassword(hashPassword("ARGON2ID", secrets.token_urlsafe(16)))
            self._decoy = decoy
        return decoy[0].verify(password, decoy[1])

    # -- master users --------------------------------------------------------------------

    def _actAs(self, name: str, found: Account | None, credentials: Any) -> Deferred[str]:
        """
        L{IImpersonation} C{credentials}: a master user asks to act as
        C{name}, whose account is C{found} (None: unknown).
        """
        if found is None:
            return fail(UnknownUser())
        actor = credentials.credentials
        if actor.username not in self.masterUsers:
            return fail(UnauthorizedLogin())
        d: Deferred[str] = self.requestAvatarId(actor)  # type: ignore[attr-defined]
        return d.addCallback(self._actedAs, name, found)

    def _actedAs(self, actor: str, name: str, found: Account) -> str:
        if isinstance(actor, UnverifiedUser):
            # A master user's password must be checked here: nobody checks
            # it later when the master acts as someone else.
            raise UnauthorizedLogin()
        return self._verdict(True, name, found)

    # -- SCRAM ---------------------------------------------------------------------------

    def _keys(
        self, found: Account | None, user: str, mechanism: str
    ) -> ScramKeys | Deferred[ScramKeys] | None:
        """
        C{user}'s keys for the SCRAM C{mechanism}: stored ones, or derived
        (in a thread, once) from a plaintext secret; None: no such keys.
        """
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


def _plaintext(scheme: Scheme | None) -> bool:
    """Whether the secret is the password itself (APOP and CRAM-MD5 need it)."""
    return scheme is not None and scheme.plaintext


def _unknown(_matched: object) -> str:
    raise UnknownUser()
