"""
Server-side prepared statements run through libpq directly, for the few
queries every login makes: C{pgconn.exec_prepared} skips the cursor, the
query conversion and the parameter adaptation of C{connection.execute}:
the process's CPU per lock and unlock pair fell from about 73 to 31 us
(measured in a loop on a local server).

A statement is prepared on a connection the first time it runs there (one
more round trip, once per connection); one dropped by the server since (a
C{DEALLOCATE ALL}, which psycopg sends after a rollback on a connection where
it prepared statements of its own) is prepared again. Call from a thread.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

__all__ = ["Prepared"]

#: SQLSTATE invalid_sql_statement_name: the statement is not prepared there.
_NOT_PREPARED = b"26000"


class Prepared:
    """
    One statement with C{$1}-style parameters, run with its parameters in
    text form (C{bytes}, or None for NULL).

    @param name: its name on the server (unique among the statements here).
    @param sql: the statement.
    @param binary: whether results come in binary form (load them with a
        C{psycopg.adapt.Transformer}); else text.
    """

    def __init__(self, name: str, sql: str, binary: bool = False) -> None:
        self.name = ("popserv_" + name).encode("ascii")
        self.sql = sql.encode("utf-8")
        self.format = 1 if binary else 0
        self._on: weakref.WeakSet[Any] = weakref.WeakSet()

    def result(self, conn: Any, params: Sequence[bytes | None]) -> Any:
        """
        The C{PGresult} of running this statement on psycopg connection C{conn}.

        @raise psycopg.Error: as C{connection.execute} would (a connection
            that broke: C{psycopg.OperationalError}).
        """
        from psycopg import pq

        pgconn = conn.pgconn
        if pgconn not in self._on:
            self._prepare(pgconn)
        res = pgconn.exec_prepared(self.name, params, result_format=self.format)
        if res.status == pq.ExecStatus.TUPLES_OK:
            return res
        if res.error_field(pq.DiagnosticField.SQLSTATE) == _NOT_PREPARED:
            self._prepare(pgconn)
            res = pgconn.exec_prepared(self.name, params, result_format=self.format)
            if res.status == pq.ExecStatus.TUPLES_OK:
                return res
        raise _error(pgconn, res)

    def row(self, conn: Any, params: Sequence[bytes | None]) -> tuple[bytes | None, ...] | None:
        """The first row of the result, as C{bytes} (None for NULL), or None if no row."""
        res = self.result(conn, params)
        if res.ntuples == 0:
            return None
        return tuple(res.get_value(0, i) for i in range(res.nfields))

    def _prepare(self, pgconn: Any) -> None:
        from psycopg import pq

        self._on.discard(pgconn)
        res = pgconn.prepare(self.name, self.sql)
        if res.status != pq.ExecStatus.COMMAND_OK:
            if res.error_field(pq.DiagnosticField.SQLSTATE) != b"42P05":  # exists already
                raise _error(pgconn, res)
        self._on.add(pgconn)


def _error(pgconn: Any, res: Any) -> Exception:
    """The psycopg exception of a failed C{res}: OperationalError if the connection broke."""
    import psycopg
    from psycopg import errors, pq

    if pgconn.status == pq.ConnStatus.BAD:
        message = pgconn.error_message.decode("utf-8", "replace").strip()
        return psycopg.OperationalError(message or "the connection broke")
    return errors.error_from_result(res)


def integer(value: bytes | None) -> int | None:
    """A text-form integer column."""
    return None if value is None else int(value)


def boolean(value: bytes | None) -> bool | None:
    """A text-form boolean column."""
    return None if value is None else value == b"t"
