"""
Users in an LDAP directory (C{--passdb ldap:URL}), Dovecot's two ways:

  - B{bind as the user} (C{--ldap-auth-bind yes}, the default): the user's
    entry is searched for (anonymously, or bound as C{--ldap-bind-dn}), then
    its DN is bound with the password the client gave;
  - B{password lookup} (C{--ldap-auth-bind no}): the search, bound as
    C{--ldap-bind-dn}, reads C{userPassword}, checked against the schemes of
    L{popserv.auth.schemes} (C{{SSHA}}, C{{SSHA512}}, C{{CRYPT}},
    C{{ARGON2}} and the passwd-file's).

The URL (L{popserv.auth.ldapurl}) names the directory, the search and the
attribute map: per-user settings, C{nologin}, and the canonical user name
that names the maildrop.

The client is ldap3 (pure Python, blocking): every directory call runs in a
thread of this source's own bounded pool, one connection per thread at
most (L{ConnectionPool}), with connect and receive timeouts. A directory
that cannot be reached, times out or answers with an error is
L{TemporaryFailure} (C{-ERR [SYS/TEMP]}); only C{invalidCredentials} to the
user's bind is a wrong password. A pooled connection the directory has
dropped is replaced and the call tried once more.

Passwords (the users' and the bind DN's) never reach a log line: ldap3's
connection objects print theirs, so none is ever logged here.
"""

from __future__ import annotations

import queue
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from popserv.auth.cache import VerificationCache
from popserv.auth.credentials import IImpersonation, IVerifiedCredentials
from popserv.auth.ldapurl import LdapURL
from popserv.auth.lookup import SETTING_FIELDS, LookupPassdb, userSettings
from popserv.auth.schemes import Scheme, UnknownScheme, parseStoredPassword
from popserv.auth.scramkeys import (
    ISecretSource,
    ScramKeys,
)
from popserv.errors import TemporaryFailure
from popserv.interfaces import IUserDirectory
from popserv.policy import IUserSettingsSource
from popserv.threads import RunInThread

__all__ = ["LdapPassdb", "ConnectionPool", "DirectoryEntry", "DirectoryError"]

_log = Logger()

#: ldap3 result codes.
_SUCCESS, _SIZE_LIMIT, _INVALID_CREDENTIALS = 0, 4, 49

#: Settings fields and the names of the settings they set.
_SETTINGS = SETTING_FIELDS
_TRUE = frozenset({"true", "yes", "on", "1"})


class DirectoryError(TemporaryFailure):
    """The directory could not answer; the text is for logs and check-config only."""

    def __init__(self, detail: str) -> None:
        super().__init__()
        self.detail = detail

    def __str__(self) -> str:
        return self.detail


@dataclass(frozen=True)
class DirectoryEntry:
    """One user's entry; C{scheme} None: no usable C{userPassword} (or not read)."""

    dn: str
    name: str
    scheme: Scheme | None = None
    secret: str = field(default="", repr=False)
    settings: dict[str, Any] = field(default_factory=dict)
    disabled: bool = False


class ConnectionPool:
    """
    At most C{size} ldap3 connections, each used by one thread at a time and
    kept open between uses. Blocking: called from threads only.

    @param connect: makes a connection, opened (and bound, for searches).
    """

    def __init__(self, connect: Callable[[], Any], size: int, wait: float) -> None:
        self._connect = connect
        self._idle: queue.LifoQueue[Any] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(size)
        self._wait = wait

    def run(self, work: Callable[[Any], Any]) -> Any:
        """C{work(connection)}; a dropped pooled connection is replaced once."""
        from ldap3.core.exceptions import LDAPException

        if not self._slots.acquire(timeout=self._wait):
            raise DirectoryError(f"no LDAP connection free within {self._wait} s")
        try:
            for attempt in (1, 2):
                try:
                    connection, reused = self._idle.get_nowait(), True
                except queue.Empty:
                    connection, reused = self._open(), False
                try:
                    result = work(connection)
                except LDAPException as e:
                    _close(connection)
                    if reused and attempt == 1:
                        continue  # the directory dropped an idle connection
                    raise DirectoryError(f"{type(e).__name__}: {e}") from None
                self._idle.put(connection)
                return result
        finally:
            self._slots.release()

    def _open(self) -> Any:
        from ldap3.core.exceptions import LDAPException

        try:
            return self._connect()
        except LDAPException as e:
            raise DirectoryError(f"cannot connect: {type(e).__name__}: {e}") from None

    def close(self) -> None:
        while True:
            try:
                _close(self._idle.get_nowait())
            except queue.Empty:
                return


def _close(connection: Any) -> None:
    try:
        connection.unbind()
    except Exception:  # closing a broken connection: nothing more to do
        pass


@implementer(ICredentialsChecker, ISecretSource, IUserSettingsSource, IUserDirectory)
class LdapPassdb(LookupPassdb):
    """
    An auth source over an LDAP directory, with the answers of the other
    sources (see L{popserv.auth.pgsql.PgPassdb}): L{UnknownUser} for no
    entry, C{UnauthorizedLogin} for a wrong password, L{AccountDisabled} for
    C{nologin}, L{TemporaryFailure} while the directory is down.

    @param url: the parsed C{ldap:} argument.
    @param authBind: check passwords by binding as the user (else by reading
        C{userPassword}).
    @param bindDN: the DN searches bind as; None: anonymous.
    @param bindPassword: its password.
    @param caFile: the CA certificates that verify the directory's
        (C{ldaps://}, StartTLS); None: the system's.
    @param runInThread: runs the directory calls; None: this source's own
        pool of C{poolSize} threads on C{reactor}.
    """

    def __init__(
        self,
        url: LdapURL,
        authBind: bool = True,
        bindDN: str | None = None,
        bindPassword: str | None = None,
        caFile: str | None = None,
        runInThread: RunInThread | None = None,
        reactor: Any = None,
        masterUsers: frozenset[str] = frozenset(),
        cache: VerificationCache | None = None,
        saltKey: bytes | None = None,
        poolSize: int = 4,
        connectTimeout: float = 5.0,
        timeout: float = 10.0,
    ) -> None:
        self.url = url
        self.authBind = authBind
        self.bindDN = bindDN
        self._bindPassword = bindPassword
        self.caFile = caFile
        self.connectTimeout = connectTimeout
        self.timeout = timeout
        self.credentialInterfaces: tuple[Any, ...] = (
            (IUsernamePassword, IVerifiedCredentials, IImpersonation)
            if authBind
            else (IUsernamePassword, IUsernameHashedPassword, IVerifiedCredentials, IImpersonation)
        )
        fields = set(url.attributes.values())
        if authBind:
            fields.discard("password")
        self._attributes = [a for a, f in url.attributes.items() if f in fields]
        self._searches = ConnectionPool(self._searchConnection, poolSize, timeout)
        self._binds = ConnectionPool(self._plainConnection, poolSize, timeout)
        self._threadPool: Any = None
        self._decoys = not authBind  # a bind costs the directory's time, not ours
        self._setUp(
            runInThread or self._ownThreads(reactor, poolSize),
            masterUsers,
            cache,
            saltKey,
            frozenset(_SETTINGS[f] for f in fields if f in _SETTINGS),
        )

    def __repr__(self) -> str:
        return str(self.url)

    def _ownThreads(self, reactor: Any, size: int) -> RunInThread:
        from twisted.internet.threads import deferToThreadPool
        from twisted.python.threadpool import ThreadPool

        if reactor is None:
            from twisted.internet import reactor
        pool = self._threadPool = ThreadPool(0, size, name="popserv-ldap")

        def run(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
            if not pool.started:
                pool.start()
                reactor.addSystemEventTrigger("during", "shutdown", self.close)
            return deferToThreadPool(reactor, pool, f, *args)

        return run

    # -- connections (in threads) ----------------------------------------------------

    def _server(self) -> Any:
        import ldap3

        url = self.url
        tls = None
        if url.scheme == "ldaps" or url.startTLS:
            tls = ldap3.Tls(
                validate=ssl.CERT_REQUIRED,
                ca_certs_file=self.caFile,
                version=ssl.PROTOCOL_TLS_CLIENT,
            )
        if url.scheme == "ldapi":
            from urllib.parse import quote

            return ldap3.Server(
                "ldapi://" + quote(url.host, safe=""),
                get_info=ldap3.NONE,
                connect_timeout=self.connectTimeout,
            )
        return ldap3.Server(
            url.host,
            port=url.port,
            use_ssl=url.scheme == "ldaps",
            tls=tls,
            get_info=ldap3.NONE,
            connect_timeout=self.connectTimeout,
        )

    def _plainConnection(self) -> Any:
        """An open connection, TLS started if the URL asks, bound to nobody."""
        import ldap3

        connection = ldap3.Connection(
            self._server(),
            auto_bind=ldap3.AUTO_BIND_NONE,
            receive_timeout=max(1, round(self.timeout)),  # ldap3 packs it as an integer
            raise_exceptions=False,
            read_only=True,
            check_names=False,
        )
        connection.open(read_server_info=False)
        if self.url.startTLS and not connection.start_tls(read_server_info=False):
            _close(connection)
            raise DirectoryError(f"StartTLS failed: {_describe(connection)}")
        return connection

    def _searchConnection(self) -> Any:
        connection = self._plainConnection()
        if self.bindDN is not None:
            bound = connection.rebind(
                user=self.bindDN, password=self._bindPassword, read_server_info=False
            )
            connection.password = None  # kept by ldap3, printed by its repr
            if not bound:
                detail = _describe(connection)
                _close(connection)
                raise DirectoryError(f"cannot bind as {self.bindDN}: {detail}")
        return connection

    # -- the directory (in threads) -------------------------------------------------

    def _find(self, user: str) -> DirectoryEntry | None:
        url = self.url
        search = url.filterFor(user)

        def work(connection: Any) -> list[dict[str, Any]]:
            connection.search(
                url.base,
                search,
                search_scope=url.scope,
                attributes=self._attributes or ["1.1"],
                size_limit=2,
                time_limit=max(1, int(self.timeout)),
            )
            code = connection.result.get("result")
            if code == _SIZE_LIMIT:
                raise DirectoryError(f"more than one entry matches {search}")
            if code != _SUCCESS:
                raise DirectoryError(f"search failed: {_describe(connection)}")
            return [r for r in connection.response or () if r.get("type") == "searchResEntry"]

        entries = self._searches.run(work)
        if not entries:
            return None
        if len(entries) > 1:
            raise DirectoryError(f"more than one entry matches {search}")
        return self._entry(user, entries[0])

    def _entry(self, user: str, found: dict[str, Any]) -> DirectoryEntry:
        values: dict[str, list[Any]] = {}
        for attribute, got in (found.get("raw_attributes") or {}).items():
            for mapped, name in self.url.attributes.items():
                if mapped.lower() == attribute.lower():
                    values[name] = got
        name = _first(values.get("user")) or user
        scheme: Scheme | None = None
        secret = ""
        for stored in values.get("password", ()):
            try:
                scheme, secret = parseStoredPassword(stored.decode("utf-8"))
                break
            except (UnknownScheme, ValueError, UnicodeDecodeError) as e:
                # The error's text may quote the stored value: name its kind only.
                _log.warn(
                    "{source}: user {user}: a userPassword popserv cannot read ({kind})",
                    source=self,
                    user=name,
                    kind="unknown scheme" if isinstance(e, UnknownScheme) else "malformed",
                )
        settings = userSettings(lambda field: _first(values.get(field)), self, name)
        disabled = (_first(values.get("nologin")) or "").lower() in _TRUE
        return DirectoryEntry(found["dn"], name, scheme, secret, settings, disabled)

    def _bindAs(self, dn: str, password: bytes) -> bool:
        """Whether C{password} binds as C{dn}; DirectoryError if the directory fails."""
        if not password:
            return False  # an empty password is an unauthenticated bind (RFC 4513 5.1.2)

        def work(connection: Any) -> bool:
            bound = connection.rebind(user=dn, password=password, read_server_info=False)
            connection.password = None
            if bound:
                return True
            if connection.result.get("result") == _INVALID_CREDENTIALS:
                return False
            raise DirectoryError(f"bind as {dn} failed: {_describe(connection)}")

        return self._binds.run(work)  # type: ignore[no-any-return]

    def status(self) -> str:
        """
        Blocking, for C{popserv check-config}: connect, bind as the search DN
        and read the search base; DirectoryError says what failed.
        """

        def work(connection: Any) -> None:
            connection.search(
                self.url.base, "(objectClass=*)", search_scope="BASE", attributes=["1.1"]
            )
            if connection.result.get("result") != _SUCCESS:
                raise DirectoryError(f"cannot read {self.url.base}: {_describe(connection)}")

        self._searches.run(work)
        return f"{self}: reachable, {self.url.base} found"

    # -- checks ------------------------------------------------------------------------

    def _checkPassword(self, name: str, found: Any, password: bytes) -> Deferred[bool]:
        """In the bind mode, the directory checks the password: bind as the user."""
        if not self.authBind:
            return super()._checkPassword(name, found, password)
        return self._runInThread(self._bindAs, found.dn, password)  # type: ignore[no-any-return]

    def scramKeys(self, user: str, mechanism: str) -> Deferred[ScramKeys | None]:
        if self.authBind:
            return succeed(None)  # no password read, no keys: no lookup
        return super().scramKeys(user, mechanism)

    def close(self) -> None:
        """Close the pooled connections and stop this source's threads."""
        if self._threadPool is not None and self._threadPool.started:
            self._threadPool.stop()
        self._searches.close()
        self._binds.close()


def _first(values: Any) -> str | None:
    if not values:
        return None
    value = values[0]
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _describe(connection: Any) -> str:
    """The directory's answer, without the connection (whose repr holds a password)."""
    result = connection.result or {}
    text = result.get("description") or "no answer"
    message = result.get("message")
    return f"{text} ({message})" if message else str(text)
