"""
Connections to the PostgreSQL store's database: one bounded
C{psycopg_pool.ConnectionPool} per process, used only from threads (the
bounded pool the store's C{runInThread} runs on), never from the reactor.

Every failure to reach the database becomes L{TemporaryFailure}
(C{-ERR [SYS/TEMP]}): a login while the database is down fails at once
(within C{timeout}), nothing is changed, and the pool connects again by
itself when the database is back. Connections broken by a restart are
found when next used: the pool is then checked and the work retried once on
a fresh connection (every piece of work here is one statement or one
transaction, so a retry after a failure repeats nothing that was committed,
except a removal or an upsert, which are idempotent). Work that is not
(counting a failed login) is run with C{retry=False}: the statement may have
run before the connection broke, and running it again would count twice.

The URI is passed to libpq untouched; TCP keepalives and a connect timeout
are added only where it says nothing of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.logger import Logger

from popserv.errors import TemporaryFailure

__all__ = ["Database", "connectionInfo", "DEFAULT_POOL_SIZE", "DEFAULT_TIMEOUT"]

_log = Logger()

T = TypeVar("T")

DEFAULT_POOL_SIZE = 10
DEFAULT_TIMEOUT = 5

#: libpq parameters used unless the URI sets them: a dead peer (a partition,
#: a host that vanished) is noticed within about 10 + 3 * 5 seconds.
_DEFAULTS = {
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "application_name": "popserv",
}


def connectionInfo(uri: str, timeout: int = DEFAULT_TIMEOUT) -> str:
    """C{uri} with the defaults above (and C{connect_timeout}) where it has none."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    given = conninfo_to_dict(uri)
    extra = {k: v for k, v in _DEFAULTS.items() if k not in given}
    if "connect_timeout" not in given:
        extra["connect_timeout"] = str(max(2, timeout))
    return make_conninfo(uri, **extra)


def unreachable(error: BaseException) -> bool:
    """Whether C{error} says the database cannot be reached (rather than a bug)."""
    import psycopg
    from psycopg_pool import PoolTimeout, TooManyRequests

    return isinstance(error, (psycopg.OperationalError, PoolTimeout, TooManyRequests))


class Database:
    """
    The pool of one store.

    @param uri: any libpq URI or connection string.
    @param size: at most this many connections (match the thread pool).
    @param timeout: seconds to wait for a connection before failing.
    """

    def __init__(
        self, uri: str, size: int = DEFAULT_POOL_SIZE, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        from psycopg_pool import ConnectionPool

        self.conninfo = connectionInfo(uri, int(timeout))
        self.timeout = timeout
        self.pool = ConnectionPool(
            self.conninfo,
            min_size=1,
            max_size=max(1, size),
            timeout=timeout,
            # While the database is down the pool retries with a doubling
            # delay; giving up after `timeout` keeps that delay short, and
            # the next caller starts a new attempt at once: a database that
            # is back is used again within about `timeout` seconds.
            reconnect_timeout=max(1.0, timeout),
            open=False,
            name="popserv",
            # A query alone is its own transaction: one round trip, no
            # BEGIN and COMMIT around it (see run's transaction).
            kwargs={"autocommit": True},
        )
        self.pool.open(wait=False)

    def connect(self, **kwargs: Any) -> Any:
        """A connection of its own, outside the pool (the lock connection)."""
        import psycopg

        try:
            return psycopg.connect(self.conninfo, **kwargs)
        except psycopg.Error as e:
            raise self.failure(e) from e

    def run(
        self, work: Callable[..., T], *args: Any, transaction: bool = False, retry: bool = True
    ) -> T:
        """
        C{work(connection, *args)} on a pooled connection (call from a
        thread): each statement on its own, or, if C{transaction}, all in one
        transaction. Unreachable: L{TemporaryFailure}.

        @param retry: run C{work} once more on a fresh connection when the
            one it ran on broke (false for work that must not run twice).
        """
        import psycopg

        for attempt in (1, 2):
            try:
                with self.pool.connection() as conn:
                    try:
                        if not transaction:
                            return work(conn, *args)
                        with conn.transaction():
                            return work(conn, *args)
                    except psycopg.OperationalError:
                        if attempt == 1 and conn.broken:
                            # Stale after a database restart: so may the
                            # others be. Check them all, then try once more.
                            conn.close()
                            self.pool.check()
                            if retry:
                                continue
                        raise
            except Exception as e:
                if unreachable(e):
                    raise self.failure(e) from e
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def runOnce(self, work: Callable[..., T], *args: Any) -> T:
        """L{run} without the retry: for work that must not run twice."""
        return self.run(work, *args, retry=False)

    def failure(self, error: BaseException) -> TemporaryFailure:
        _log.warn("mail database unavailable: {error}", error=str(error).strip() or repr(error))
        return TemporaryFailure()

    def close(self) -> None:
        self.pool.close()
