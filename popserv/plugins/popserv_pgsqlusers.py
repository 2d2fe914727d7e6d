"""The C{pgsql:} auth-source kind: users in PostgreSQL, any libpq URI after the colon."""

from __future__ import annotations

from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from popserv.registry import IAuthSourceKind, SourceContext
from popserv.settings import STR, Setting


def _checkQuery(query: str | None) -> None:
    if query is not None and "%(user)s" not in query:
        raise ValueError("the query must contain %(user)s where the user name goes")


@implementer(IPlugin, IAuthSourceKind)
class PgsqlPassdbKind:
    """Users in a PostgreSQL table: popserv's own (C{popserv db init}) or any, by a query."""

    name = "pgsql"
    description = "users in PostgreSQL, e.g. pgsql:postgresql:///popserv?host=/run/postgresql"
    options = (
        Setting(
            "password_query",
            STR,
            None,
            "SQL returning the user's password ({SCHEME}secret) and optional per-user "
            "settings (login_delay, expire, quota_bytes, quota_messages, nologin); %(user)s "
            "stands for the user name, bound as a parameter.",
            defaultText="a query over popserv's own users table",
            check=_checkQuery,
            metavar="SQL",
        ),
    )

    def check(self, args: str, baseDir: str) -> None:
        if not args:
            raise ValueError("pgsql: needs a libpq URI, e.g. pgsql:postgresql:///popserv")

    def makeSource(self, args: str, context: SourceContext) -> Any:
        import re

        from popserv.auth.pgsql import DEFAULT_QUERY, PgPassdb
        from popserv.backends.pgsql.connections import Database

        self.check(args, context.baseDir)
        return PgPassdb(
            Database(args),
            context.options.get("password_query") or DEFAULT_QUERY,
            runInThread=context.runInThread,
            masterUsers=context.masterUsers,
            cache=context.cache,
            saltKey=context.saltKey,
            description="pgsql:" + re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", args),
        )


pgsqlPassdb = PgsqlPassdbKind()
