"""
Users in PostgreSQL (C{--passdb pgsql:URI}): a cred checker over the rows a
password query returns, Dovecot's C{password_query} model.

The query is SQL with C{%(user)s} where the login name goes; it is bound
as a parameter (never pasted into the text; a literal C{%} is written
C{%%}). Its columns are found by name:

  - C{password} (required): C{{SCHEME}secret} or a bare crypt string, the
    schemes of the passwd-file (L{popserv.auth.schemes.parseStoredPassword});
  - C{user} (optional): the user's canonical name, which the maildrop, the
    settings and the logs go by (default: the name given);
  - C{login_delay}, C{expire} (days or C{NEVER}), C{quota_bytes},
    C{quota_messages} (optional; NULL: the server's setting; also with
    Dovecot's C{userdb_} prefix): per-user settings;
  - C{nologin} (optional): true refuses the account (C{[AUTH]} after the
    password matched).

No row: the user is unknown (L{UnknownUser}, after the cost of a real
check). The default query reads popserv's own C{users} table, which
C{popserv db init} makes and C{popserv user add|del|list --passdb pgsql:URI}
manages.

Every query runs in a thread on a bounded pool
(L{popserv.backends.pgsql.connections.Database}); a database that cannot be
reached, or a query that fails, is L{TemporaryFailure} (C{[SYS/TEMP]}).
Slow hashes are checked in a thread too, and the auth cache applies. The
settings and secret kinds come from the rows seen (the protocol asks for
them without waiting): a user's settings are those of their latest lookup,
which every login and every LMTP recipient check makes.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

from popserv.auth.cache import VerificationCache
from popserv.auth.credentials import IImpersonation, IVerifiedCredentials
from popserv.auth.schemes import SCHEMES, Scheme, UnknownScheme, parseStoredPassword
from popserv.auth.scramkeys import (
    PROCESS_SALT_KEY,
    ISecretSource,
    ScramKeys,
    deriveScramKeys,
    parseScramSecret,
    stableSalt,
)
from popserv.errors import AccountDisabled, TemporaryFailure, UnknownUser
from popserv.interfaces import IUserDirectory
from popserv.policy import IUserSettingsSource, parseExpire
from popserv.proxy.fields import ROUTING_FIELDS, routingSetting
from popserv.threads import RunInThread, reactorThreads

__all__ = ["PgPassdb", "DEFAULT_QUERY", "UserRow", "parseRow"]

_log = Logger()

#: The query over popserv's own C{users} table.
DEFAULT_QUERY = (
    'SELECT name AS "user", password, login_delay, expire, quota_bytes, quota_messages,'
    " nologin FROM users WHERE name = %(user)s"
)

#: Settings columns and the names of the settings they set.
_SETTINGS = {
    "login_delay": "loginDelay",
    "expire": "expire",
    "quota_bytes": "quotaBytes",
    "quota_messages": "quotaMessages",
}

#: Users whose latest row is remembered (for their settings).
_REMEMBERED = 100_000


@dataclass(frozen=True)
class UserRow:
    """One user as the query returned them; C{scheme} None: no usable password."""

    name: str
    scheme: Scheme | None
    secret: str = field(repr=False)
    settings: dict[str, Any] = field(default_factory=dict)
    disabled: bool = False


def _column(name: str) -> str:
    return name.lower().removeprefix("userdb_")


def parseRow(given: str, columns: list[str], values: tuple[Any, ...]) -> UserRow:
    """
    The L{UserRow} of one result row. A bad password field leaves the user
    without a usable password; a bad setting is left out; both are logged.
    """
    row = dict(zip(map(_column, columns), values, strict=True))
    name = row.get("user") or row.get("username") or given
    scheme: Scheme | None = None
    secret = ""
    try:
        scheme, secret = parseStoredPassword(str(row.get("password") or ""))
    except (UnknownScheme, ValueError) as e:
        _log.warn("pgsql passdb: user {user}: bad password field: {error}", user=name, error=e)
    settings: dict[str, Any] = {}
    for column, setting in _SETTINGS.items():
        value = row.get(column)
        if value is None:
            continue
        try:
            if column == "expire":
                settings[setting] = parseExpire(value)
            elif int(value) < 0:
                raise ValueError("negative")
            else:
                settings[setting] = int(value)
        except (TypeError, ValueError) as e:
            _log.warn(
                "pgsql passdb: user {user}: bad {column} {value!r} ignored ({error})",
                user=name,
                column=column,
                value=value,
                error=e,
            )
    for column in ROUTING_FIELDS:
        value = row.get(column)
        if value is None or column == "port" and value == "":
            continue
        try:
            routed = routingSetting(column, value)
        except (TypeError, ValueError) as e:
            _log.warn(
                "pgsql passdb: user {user}: bad {column} {value!r} ignored ({error})",
                user=name,
                column=column,
                value=value,
                error=e,
            )
            continue
        if routed is not None:
            settings[routed[0]] = routed[1]
    return UserRow(str(name), scheme, secret, settings, bool(row.get("nologin")))


@implementer(ICredentialsChecker, ISecretSource, IUserSettingsSource, IUserDirectory)
class PgPassdb:
    """
    Checks the credentials the passwd-file checker does
    (L{popserv.auth.passwdfile.PasswdFileChecker}), against the rows of
    C{query}, with the same answers: L{UnknownUser} for no row (after a
    decoy check of the same cost), C{UnauthorizedLogin} for a wrong
    password, L{AccountDisabled} for C{nologin}, L{TemporaryFailure} while
    the database is down.

    @param database: a L{popserv.backends.pgsql.connections.Database}.
    @param query: the password query (see the module docstring).
    """

    credentialInterfaces = (
        IUsernamePassword,
        IUsernameHashedPassword,
        IVerifiedCredentials,
        IImpersonation,
    )

    def __init__(
        self,
        database: Any,
        query: str = DEFAULT_QUERY,
        runInThread: RunInThread | None = None,
        masterUsers: frozenset[str] = frozenset(),
        cache: VerificationCache | None = None,
        saltKey: bytes | None = None,
        description: str = "pgsql",
    ) -> None:
        if "%(user)s" not in query:
            raise ValueError("password_query must contain %(user)s where the user name goes")
        self.database = database
        self.query = query
        self.description = description
        self._runInThread = runInThread or reactorThreads()
        self.masterUsers = frozenset(masterUsers)
        self.cache = cache
        self.saltKey = saltKey or PROCESS_SALT_KEY
        self._rows: OrderedDict[str, UserRow] = OrderedDict()
        self._kinds: frozenset[str] = frozenset()
        self._overridden: frozenset[str] = frozenset()
        self._derived: dict[tuple[str, str, str], ScramKeys] = {}
        self._decoy: tuple[Scheme, str] | None = None
        self._runInThread(self._probe).addCallback(self._learn).addErrback(
            lambda f: _log.warn(
                "{source}: cannot check the password query yet: {error}",
                source=self,
                error=f.getErrorMessage() or f.type.__name__,
            )
        )

    def __repr__(self) -> str:
        return self.description

    # -- the database (in threads) -------------------------------------------------

    def _probe(self) -> tuple[list[str], list[Scheme]]:
        """The query's columns (the settings it may set) and, for popserv's own
        table, the schemes of the secrets stored: applied by L{_learn} on the
        reactor, where lookups update the same state."""

        def probe(conn: Any) -> tuple[list[str], list[Scheme]]:
            cursor = conn.execute(self.query, {"user": ""})
            columns = [c.name for c in cursor.description or ()]
            schemes: list[Scheme] = []
            if self.query == DEFAULT_QUERY:
                for (name,) in conn.execute(
                    "SELECT DISTINCT upper(substring(password from '^[{]([^}]*)[}]')) FROM users"
                ):
                    scheme = SCHEMES.get(name or "")
                    if scheme is not None:
                        schemes.append(scheme)
            return columns, schemes

        return self._run(probe)  # type: ignore[no-any-return]

    def _run(self, work: Any, *args: Any) -> Any:
        import psycopg

        try:
            return self.database.run(work, *args)
        except psycopg.Error as e:
            _log.error("{source}: the password query failed: {error}", source=self, error=e)
            raise TemporaryFailure() from e

    def _fetch(self, user: str) -> UserRow | None:
        def query(conn: Any) -> UserRow | None:
            cursor = conn.execute(self.query, {"user": user})
            values = cursor.fetchone()
            if values is None:
                return None
            return parseRow(user, [c.name for c in cursor.description], values)

        return self._run(query)  # type: ignore[no-any-return]

    # -- lookups (on the reactor) ------------------------------------------------------

    def _learn(self, probed: tuple[list[str], list[Scheme]]) -> None:
        columns, schemes = probed
        self._overridden |= {_SETTINGS[c] for c in map(_column, columns) if c in _SETTINGS}
        for scheme in schemes:
            self._learnKinds(scheme)

    def _learnKinds(self, scheme: Scheme) -> None:
        if scheme.plaintext and "plaintext" not in self._kinds:
            self._kinds |= {"plaintext"}
        if scheme.scram and scheme.scram not in self._kinds:
            self._kinds |= {scheme.scram}

    def lookup(self, user: str) -> Deferred[UserRow | None]:
        """The user's row, or None; remembered for L{settingsFor}."""
        return self._runInThread(self._fetch, user).addCallback(self._remember, user)

    def _remember(self, row: UserRow | None, user: str) -> UserRow | None:
        rows = self._rows
        if row is None:
            rows.pop(user, None)
            return None
        for name in {user, row.name}:
            rows[name] = row
            rows.move_to_end(name)
        while len(rows) > _REMEMBERED:
            rows.popitem(last=False)
        if row.settings.keys() - self._overridden:
            self._overridden |= row.settings.keys()
        if row.scheme is not None:
            self._learnKinds(row.scheme)
            if row.scheme.slow and self._decoy is None:
                self._decoy = (row.scheme, row.secret)
        return row

    # -- ICredentialsChecker ---------------------------------------------------------

    def requestAvatarId(self, credentials: Any) -> Deferred[str]:
        if IImpersonation.providedBy(credentials):
            return self._impersonate(credentials)
        d = self.lookup(credentials.username)
        return d.addCallback(self._check, credentials)

    def _check(self, row: UserRow | None, credentials: Any) -> Deferred[str]:
        if row is None:
            return self._unknownUser(credentials)
        scheme, secret = row.scheme, row.secret
        if scheme is None:
            d: Deferred[bool] = succeed(False)
        elif IUsernamePassword.providedBy(credentials):
            password = credentials.password
            cache = self.cache
            if not scheme.slow:
                d = succeed(scheme.verify(password, secret))
            elif cache is not None and cache.known(row.name, secret, password):
                d = succeed(True)
            else:
                d = self._runInThread(scheme.verify, password, secret)
                if cache is not None:
                    d.addCallback(self._cached, row.name, secret, password)
        elif IUsernameHashedPassword.providedBy(credentials) and scheme.plaintext:
            d = succeed(credentials.checkPassword(secret.encode("utf-8")))
        elif IVerifiedCredentials.providedBy(credentials):
            d = succeed(True)
        else:
            return fail(UnauthorizedLogin())
        return d.addCallback(_verdict, row)

    def _cached(self, matched: bool, user: str, secret: str, password: bytes) -> bool:
        if matched and self.cache is not None:
            self.cache.remember(user, secret, password)
        return matched

    def _unknownUser(self, credentials: Any) -> Deferred[str]:
        """Fail after the work a real account's check costs (see the passwd-file's)."""
        if not IUsernamePassword.providedBy(credentials):
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

        def target(row: UserRow | None) -> Deferred[str]:
            if row is None:
                return fail(UnknownUser())
            if actor.username not in self.masterUsers:
                return fail(UnauthorizedLogin())
            d = self.requestAvatarId(actor)
            return d.addCallback(lambda _actor: _verdict(True, row))

        return self.lookup(credentials.username).addCallback(target)

    # -- IUserDirectory ------------------------------------------------------------------

    def knowsUser(self, user: str) -> Deferred[bool]:
        return self.lookup(user).addCallback(lambda row: row is not None)

    # -- ISecretSource -------------------------------------------------------------------

    def secretKinds(self) -> frozenset[str]:
        return self._kinds

    def scramKeys(self, user: str, mechanism: str) -> Deferred[ScramKeys | None]:
        return self.lookup(user).addCallback(self._keys, user, mechanism)

    def _keys(
        self, row: UserRow | None, user: str, mechanism: str
    ) -> ScramKeys | Deferred[ScramKeys] | None:
        if row is None or row.scheme is None:
            return None
        if row.scheme.scram == mechanism:
            return parseScramSecret(row.secret)
        if not row.scheme.plaintext:
            return None
        key = (user, mechanism, row.secret)
        if key in self._derived:
            return self._derived[key]
        salt = stableSalt(self.saltKey, mechanism, user)
        d = self._runInThread(deriveScramKeys, mechanism, row.secret, salt)
        return d.addCallback(self._keep, key)

    def _keep(self, keys: ScramKeys, key: tuple[str, str, str]) -> ScramKeys:
        if len(self._derived) >= _REMEMBERED:
            self._derived.clear()
        return self._derived.setdefault(key, keys)

    # -- IUserSettingsSource ---------------------------------------------------------------

    def settingsFor(self, user: str) -> dict[str, Any]:
        row = self._rows.get(user)
        return row.settings if row is not None else {}

    def overriddenSettings(self) -> frozenset[str]:
        return self._overridden

    def status(self) -> str:
        """
        One line for C{popserv check-config} (blocking): the database
        reached and, for popserv's own table, its schema version; for an
        operator's query, that it runs and returns a password column.

        @raise TemporaryFailure: the database cannot be reached.
        @raise ValueError: the schema is missing or old, or the query fails.
        """
        import psycopg

        from popserv.backends.pgsql.schema import CURRENT, schemaVersion

        try:  # a connection of its own: an answer at once, not after the pool's timeout
            conn = self.database.connect(autocommit=True)
        except TemporaryFailure as e:
            reason = str(e.__cause__).strip()
            raise TemporaryFailure(f"cannot reach the database: {reason}") from None
        with conn:
            version = schemaVersion(conn)
            if self.query == DEFAULT_QUERY:
                if version < CURRENT:
                    raise ValueError(
                        f"database reached, schema version {version} but {CURRENT} is"
                        " needed: run popserv db init|upgrade"
                    )
                return f"database reached, schema version {version}"
            try:
                cursor = conn.execute(self.query, {"user": ""})
            except psycopg.Error as e:
                raise ValueError(f"database reached, the password query fails: {e}") from None
            columns = {_column(c.name) for c in cursor.description or ()}
            if "password" not in columns:
                raise ValueError("database reached, the password query returns no password")
            return "database reached, the password query runs"

    def close(self) -> None:
        self.database.close()


def _verdict(matched: bool, row: UserRow) -> str:
    if not matched:
        raise UnauthorizedLogin()
    if row.disabled:
        raise AccountDisabled()
    return row.name


def _unknown(_matched: object) -> str:
    raise UnknownUser()
