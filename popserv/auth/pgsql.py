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

from dataclasses import dataclass, field
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.logger import Logger
from zope.interface import implementer

from popserv.auth.cache import VerificationCache
from popserv.auth.lookup import SETTING_FIELDS, LookupPassdb, userSettings
from popserv.auth.schemes import SCHEMES, Scheme, UnknownScheme, parseStoredPassword
from popserv.auth.scramkeys import (
    ISecretSource,
)
from popserv.errors import TemporaryFailure
from popserv.interfaces import IUserDirectory
from popserv.policy import IUserSettingsSource
from popserv.threads import RunInThread, reactorThreads

__all__ = ["PgPassdb", "DEFAULT_QUERY", "UserRow", "parseRow"]

_log = Logger()

#: The query over popserv's own C{users} table.
DEFAULT_QUERY = (
    'SELECT name AS "user", password, login_delay, expire, quota_bytes, quota_messages,'
    " nologin FROM users WHERE name = %(user)s"
)

#: Settings columns and the names of the settings they set.
_SETTINGS = SETTING_FIELDS


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
    settings = userSettings(row.get, "pgsql passdb", str(name))
    return UserRow(str(name), scheme, secret, settings, bool(row.get("nologin")))


@implementer(ICredentialsChecker, ISecretSource, IUserSettingsSource, IUserDirectory)
class PgPassdb(LookupPassdb):
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
        self._setUp(runInThread or reactorThreads(), masterUsers, cache, saltKey)
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

    def _find(self, user: str) -> UserRow | None:
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
