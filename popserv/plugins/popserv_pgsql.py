"""The C{pgsql:} store kind: maildrops in PostgreSQL, any libpq URI after the colon."""

from __future__ import annotations

from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from popserv.registry import IStoreKind, StoreContext
from popserv.settings import INT, Setting


@implementer(IPlugin, IStoreKind)
class PgsqlKind:
    """Maildrops in a PostgreSQL database (C{popserv db init} makes its schema)."""

    name = "pgsql"
    description = "maildrops in PostgreSQL, e.g. pgsql:postgresql:///popserv?host=/run/postgresql"
    options = (
        Setting(
            "pool_size",
            INT,
            10,
            "Database connections each process keeps at most for the pgsql store.",
        ),
        Setting(
            "timeout",
            INT,
            5,
            "Seconds to wait for a database connection before a login fails with [SYS/TEMP].",
        ),
    )

    def check(self, args: str, baseDir: str) -> None:
        if not args:
            raise ValueError("pgsql: needs a libpq URI, e.g. pgsql:postgresql:///popserv")

    def makeStore(self, args: str, context: StoreContext) -> Any:
        from popserv.backends.pgsql import PgStore
        from popserv.backends.pgsql.serial import SerialThread
        from popserv.threads import synchronously

        self.check(args, context.baseDir)
        # The locks' work on a thread of its own, unless the caller (a
        # command) runs everything on its own thread.
        serial = None if context.runInThread is synchronously else SerialThread()
        return PgStore(
            args,
            runInThread=context.runInThread,
            createMissing=context.createMissing,
            poolSize=context.options.get("pool_size", 10),
            timeout=context.options.get("timeout", 5),
            serial=serial,
        )


pgsql = PgsqlKind()
