"""
popserv's own users table (schema migration 2), as C{popserv user
add|del|list --passdb pgsql:URI} edits it. Passwords arrive hashed
(C{{SCHEME}secret}): hashing is the auth layer's business, not storage's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["UserTable", "UserExists", "NoSuchUser", "userCommand"]


class UserExists(ValueError):
    """C{add} of a name the table has."""


class NoSuchUser(LookupError):
    """C{del} of a name the table lacks."""


class UserTable:
    """
    The C{users} table of one database, over one connection of its own
    (blocking: for the admin command).

    @raise popserv.errors.TemporaryFailure: the database cannot be reached.
    @raise ValueError: the schema has no users table (run C{popserv db init}).
    """

    def __init__(self, uri: str) -> None:
        import psycopg

        from popserv.backends.pgsql.connections import connectionInfo
        from popserv.backends.pgsql.schema import schemaVersion
        from popserv.errors import TemporaryFailure

        try:
            self.conn: Any = psycopg.connect(connectionInfo(uri), autocommit=True)
        except psycopg.OperationalError as e:
            raise TemporaryFailure(f"cannot reach the database: {str(e).strip()}") from None
        if schemaVersion(self.conn) < 2:
            self.conn.close()
            raise ValueError("the database has no users table: run popserv db init|upgrade")

    def add(self, name: str, password: str) -> None:
        import psycopg

        try:
            self.conn.execute(
                "INSERT INTO users (name, password) VALUES (%s, %s)", (name, password)
            )
        except psycopg.errors.UniqueViolation:
            raise UserExists(f"user {name} already exists") from None

    def delete(self, name: str) -> None:
        if self.conn.execute("DELETE FROM users WHERE name = %s", (name,)).rowcount == 0:
            raise NoSuchUser(f"no user {name}")

    def list(self) -> Iterator[tuple[str, str, bool]]:
        """(name, scheme, disabled) of every user, by name, streamed."""
        with self.conn.transaction(), self.conn.cursor(name="users") as cursor:
            cursor.execute(
                "SELECT name, coalesce(upper(substring(password from '^[{]([^}]*)[}]')),"
                " 'CRYPT'), nologin FROM users ORDER BY name"
            )
            yield from cursor

    def close(self) -> None:
        self.conn.close()


def userCommand(uri: str, action: str, name: str | None, password: Callable[[], str]) -> int:
    """
    C{popserv user add|del|list} on the table at C{uri}, printing what it
    did; C{password()} gives the new user's hashed password.
    """
    table = UserTable(uri)
    try:
        if action == "list":
            for user, scheme, disabled in table.list():
                print(f"{user}\t{scheme}" + (" (disabled)" if disabled else ""))
        elif action == "add":
            assert name is not None
            table.add(name, password())
            print(f"added {name} to the users table")
        else:
            assert name is not None
            table.delete(name)
            print(f"removed {name} from the users table")
    finally:
        table.close()
    return 0
