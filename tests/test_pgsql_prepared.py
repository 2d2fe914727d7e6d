"""The pgsql store's prepared statements, run through libpq directly."""

from __future__ import annotations

import psycopg
import pytest
from test_pgsql import initialized, makeStore
from test_store_contract import result

from popserv.backends.pgsql.prepared import Prepared, boolean, integer
from popserv.errors import MaildropInUse

_ADD = Prepared("test_add", "SELECT $1::int8 + $2::int8, $3::text IS NULL, 1 / $2::int4")


def test_runs_prepares_once_per_connection_and_again_when_dropped(pgdatabase):
    with psycopg.connect(pgdatabase, autocommit=True) as conn:
        raw = _ADD.row(conn, (b"40", b"2", None))
        assert (integer(raw[0]), boolean(raw[1]), integer(raw[2])) == (42, True, 0)
        names = "SELECT name FROM pg_prepared_statements"
        assert [r[0] for r in conn.execute(names)] == ["popserv_test_add"]
        assert _ADD.row(conn, (b"1", b"1", b"x"))[:2] == (b"2", b"f")
        conn.execute("DEALLOCATE ALL")  # as psycopg does after some rollbacks
        assert _ADD.row(conn, (b"1", b"1", b"x"))[0] == b"2"
    with psycopg.connect(pgdatabase, autocommit=True) as other:  # a new connection
        assert _ADD.row(other, (b"2", b"1", b"x"))[0] == b"3"


def test_errors_are_psycopgs(pgdatabase):
    with psycopg.connect(pgdatabase, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero):
            _ADD.row(conn, (b"1", b"0", None))
        assert _ADD.row(conn, (b"1", b"1", None))[0] == b"2"  # still usable
        pid = conn.info.backend_pid
        with psycopg.connect(pgdatabase, autocommit=True) as killer:
            killer.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(psycopg.OperationalError):
            _ADD.row(conn, (b"1", b"1", None))
        assert conn.closed


def test_locks_hold_after_their_statements_were_dropped(pgdatabase):
    store = makeStore(initialized(pgdatabase))
    other = makeStore(pgdatabase)
    try:
        result(store.openMailbox("alice")).close()
        store.locks._conn.execute("DEALLOCATE ALL")
        alice = result(store.openMailbox("alice"))
        with pytest.raises(MaildropInUse):
            result(other.openMailbox("alice"))
        result(alice.close())
        result(other.openMailbox("alice")).close()
    finally:
        other.close()
        store.close()
