"""
Users in PostgreSQL (C{--passdb pgsql:URI}) on a real PostgreSQL
(tests/pg.py): the checker's answers, per-user settings from columns, SCRAM
keys, C{popserv user add|del|list --passdb pgsql:URI}, and PostfixAdmin's
C{mailbox} table through the documented password query.
"""

from __future__ import annotations

import io
import sys

import pytest
from test_pgsql import initialized
from test_store_contract import result
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import task

from popserv.admin import main
from popserv.auth.cache import VerificationCache
from popserv.auth.credentials import APOPCredentials, Impersonation, UsernamePassword
from popserv.backends.pgsql.schema import CURRENT
from popserv.errors import AccountDisabled, TemporaryFailure, UnknownUser
from popserv.threads import synchronously

#: The query docs/guide/users.rst gives for PostfixAdmin (tested below as written there).
POSTFIXADMIN_QUERY = (
    'SELECT username AS "user", password, quota AS quota_bytes, NOT active AS nologin'
    " FROM mailbox WHERE username = %(user)s"
)


def addUser(uri, name, password, scheme="PLAIN"):
    sys.stdin = io.TextIOWrapper(io.BytesIO(password.encode() + b"\n"))
    try:
        return main(
            [
                "user",
                "add",
                name,
                "--scheme",
                scheme,
                "--password-stdin",
                "--passdb",
                f"pgsql:{uri}",
            ]
        )
    finally:
        sys.stdin = sys.__stdin__


def makePassdb(uri, query=None, **kw):
    from popserv.auth.pgsql import DEFAULT_QUERY, PgPassdb
    from popserv.backends.pgsql.connections import Database

    return PgPassdb(Database(uri, 2, 2), query or DEFAULT_QUERY, runInThread=synchronously, **kw)


@pytest.fixture
def users(pgdatabase):
    """A users table with alice ({PLAIN}), bob (bcrypt, settings) and a disabled carol."""
    initialized(pgdatabase)
    assert addUser(pgdatabase, "alice", "wonderland") == 0
    assert addUser(pgdatabase, "bob", "builder", scheme="BLF-CRYPT") == 0
    assert addUser(pgdatabase, "carol", "secret") == 0
    run(
        pgdatabase,
        "UPDATE users SET login_delay = 300, expire = 'NEVER', quota_bytes = 1000,"
        " quota_messages = 5 WHERE name = 'bob'",
        "UPDATE users SET nologin = true WHERE name = 'carol'",
    )
    return pgdatabase


def run(uri, *statements):
    import psycopg

    with psycopg.connect(uri, autocommit=True) as conn:
        for sql in statements:
            conn.execute(sql)


@pytest.fixture
def passdb(users):
    source = makePassdb(users, cache=VerificationCache(task.Clock()))
    yield source
    source.close()


def login(source, user, password):
    return result(source.requestAvatarId(UsernamePassword(user, password.encode())))


def test_right_wrong_unknown_and_disabled(passdb):
    assert login(passdb, "alice", "wonderland") == "alice"
    assert login(passdb, "bob", "builder") == "bob"
    with pytest.raises(UnauthorizedLogin) as wrong:
        login(passdb, "bob", "nope")
    assert not isinstance(wrong.value, UnknownUser)
    with pytest.raises(UnknownUser):
        login(passdb, "nobody", "builder")
    with pytest.raises(AccountDisabled):
        login(passdb, "carol", "secret")
    with pytest.raises(UnauthorizedLogin):
        login(passdb, "carol", "wrong")  # a disabled account tells nothing to a guesser


def test_the_user_name_is_bound_never_pasted(passdb):
    with pytest.raises(UnknownUser):
        login(passdb, "x' OR '1'='1", "wonderland")
    with pytest.raises(UnknownUser):
        login(passdb, "%(user)s", "wonderland")


def test_settings_come_from_columns(passdb):
    assert passdb.overriddenSettings() == {"loginDelay", "expire", "quotaBytes", "quotaMessages"}
    login(passdb, "bob", "builder")
    assert passdb.settingsFor("bob") == {
        "loginDelay": 300,
        "expire": None,
        "quotaBytes": 1000,
        "quotaMessages": 5,
    }
    assert passdb.settingsFor("alice") == {}


def test_knows_user_for_lmtp(passdb):
    assert result(passdb.knowsUser("bob")) is True
    assert result(passdb.knowsUser("nobody")) is False
    assert passdb.settingsFor("bob")["quotaBytes"] == 1000  # the lookup brought them


def test_slow_hash_is_cached(passdb, users):
    login(passdb, "bob", "builder")
    assert len(passdb.cache._entries) == 1
    run(users, "UPDATE users SET password = '{PLAIN}changed' WHERE name = 'bob'")
    with pytest.raises(UnauthorizedLogin):
        login(passdb, "bob", "builder")  # a changed hash never hits the old entry


def test_scram_keys_for_plain_users(passdb):
    assert "plaintext" in passdb.secretKinds()
    keys = result(passdb.scramKeys("alice", "SCRAM-SHA-256"))
    assert keys is not None and keys.iterations > 0
    assert result(passdb.scramKeys("alice", "SCRAM-SHA-256")) is keys  # derived once
    assert result(passdb.scramKeys("bob", "SCRAM-SHA-256")) is None  # bcrypt yields none
    assert result(passdb.scramKeys("nobody", "SCRAM-SHA-256")) is None


def test_a_master_user_acts_as_another(users):
    """Master-user logins, as the passwd-file has them (the checks are shared)."""
    source = makePassdb(users, masterUsers=frozenset({"alice"}))
    try:
        acting = Impersonation("bob", UsernamePassword("alice", b"wonderland"))
        assert result(source.requestAvatarId(acting)) == "bob"
        with pytest.raises(UnauthorizedLogin) as wrong:
            result(source.requestAvatarId(Impersonation("bob", UsernamePassword("alice", b"x"))))
        assert not isinstance(wrong.value, UnknownUser)
        with pytest.raises(UnauthorizedLogin):  # bob is no master user
            result(
                source.requestAvatarId(Impersonation("alice", UsernamePassword("bob", b"builder")))
            )
        with pytest.raises(UnknownUser):
            result(
                source.requestAvatarId(Impersonation("nobody", UsernamePassword("alice", b"x")))
            )
        with pytest.raises(AccountDisabled):
            result(source.requestAvatarId(Impersonation("carol", acting.credentials)))
    finally:
        source.close()


def test_slow_hashes_and_decoys_run_in_the_thread_runner(users):
    """
    Only the lookup runs in a thread for a fast scheme; a slow one's check
    runs there too, and an unknown user costs a check of the same kind: a
    slow hash seen before, or a throw-away argon2 one while there is none.
    """
    runs = []

    def run(f, *args):
        runs.append(f.__name__)
        return synchronously(f, *args)

    from popserv.auth.pgsql import PgPassdb
    from popserv.backends.pgsql.connections import Database

    source = PgPassdb(Database(users, 2, 2), runInThread=run)
    fresh = PgPassdb(Database(users, 2, 2), runInThread=run)
    try:
        for checker, user, password, checks in [
            (source, "alice", "wonderland", []),
            (source, "bob", "builder", ["verify"]),
            (source, "nobody", "pw", ["_decoyCheck"]),
            (fresh, "nobody", "pw", ["_decoyCheck"]),
        ]:
            runs.clear()
            if user == "nobody":
                with pytest.raises(UnknownUser):
                    login(checker, user, password)
            else:
                login(checker, user, password)
            assert runs == ["_find", *checks]
        assert source._decoy[0].name == "BLF-CRYPT"  # bob's: a real check's cost
        assert fresh._decoy[0].name == "ARGON2ID"  # nothing slow seen: made up
        runs.clear()
        apop = APOPCredentials("nobody", b"<1.2@h>", b"0" * 32)
        with pytest.raises(UnknownUser):  # APOP checks no hash: no decoy either
            result(source.requestAvatarId(apop))
        assert runs == ["_find"]
    finally:
        source.close()
        fresh.close()


def test_database_unreachable_is_temporary():
    source = makePassdb("postgresql:///x?host=/nonexistent")
    try:
        with pytest.raises(TemporaryFailure):
            login(source, "alice", "wonderland")
        with pytest.raises(TemporaryFailure):
            result(source.knowsUser("alice"))
    finally:
        source.close()


def test_a_failing_query_is_temporary(users):
    source = makePassdb(users, "SELECT password FROM nosuchtable WHERE name = %(user)s")
    try:
        with pytest.raises(TemporaryFailure):
            login(source, "alice", "wonderland")
    finally:
        source.close()


def test_query_needs_the_user_placeholder(users):
    with pytest.raises(ValueError, match=r"%\(user\)s"):
        makePassdb(users, "SELECT password FROM users")


# -- popserv user --passdb pgsql: ----------------------------------------------------------


def test_user_commands(users, capsys):
    passdb = ["--passdb", f"pgsql:{users}"]
    capsys.readouterr()
    assert main(["user", "list", *passdb]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "alice\tPLAIN",
        "bob\tBLF-CRYPT",
        "carol\tPLAIN (disabled)",
    ]
    assert addUser(users, "alice", "again") == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["user", "del", "alice", *passdb]) == 0
    assert main(["user", "del", "alice", *passdb]) == 67
    assert main(["user", "del", "bad:name", *passdb]) == 64
    capsys.readouterr()
    assert main(["user", "list", *passdb]) == 0
    assert "alice" not in capsys.readouterr().out
    assert main(["user", "list", "--passdb", "pgsql:postgresql:///x?host=/nonexistent"]) == 75


def test_user_commands_need_the_schema(pgdatabase, capsys):
    passdb = ["--passdb", f"pgsql:{pgdatabase}"]
    assert main(["user", "list", *passdb]) == 1
    assert "popserv db init" in capsys.readouterr().err
    assert main(["db", "init", *passdb]) == 0  # users without mail in PostgreSQL
    assert main(["user", "list", *passdb]) == 0


# -- PostfixAdmin ------------------------------------------------------------------------------

#: PostfixAdmin's mailbox table (its PostgreSQL schema, the columns that matter here).
POSTFIXADMIN_SCHEMA = """
CREATE TABLE mailbox (
    username varchar(255) PRIMARY KEY,
    password varchar(255) NOT NULL DEFAULT '',
    name varchar(255) NOT NULL DEFAULT '',
    maildir varchar(255) NOT NULL DEFAULT '',
    quota bigint NOT NULL DEFAULT 0,
    local_part varchar(255) NOT NULL,
    domain varchar(255) NOT NULL,
    created timestamptz DEFAULT now(),
    modified timestamptz DEFAULT now(),
    active boolean NOT NULL DEFAULT true
)
"""


def test_postfixadmin_mailbox_table(pgdatabase):
    from passlib.hash import bcrypt, md5_crypt, sha512_crypt

    run(
        pgdatabase,
        POSTFIXADMIN_SCHEMA,
        "INSERT INTO mailbox (username, password, quota, local_part, domain, active) VALUES"
        f" ('ann@example.org', '{{BLF-CRYPT}}{bcrypt.using(rounds=4).hash('annpw')}',"
        "   2048000, 'ann', 'example.org', true),"
        f" ('ben@example.org', '{md5_crypt.hash('benpw')}', 0, 'ben', 'example.org', true),"
        f" ('cy@example.org', '{sha512_crypt.using(rounds=1000).hash('cypw')}', 0,"
        "   'cy', 'example.org', false)",
    )
    source = makePassdb(pgdatabase, POSTFIXADMIN_QUERY)
    try:
        assert login(source, "ann@example.org", "annpw") == "ann@example.org"
        assert source.settingsFor("ann@example.org") == {"quotaBytes": 2048000}
        assert login(source, "ben@example.org", "benpw") == "ben@example.org"
        assert source.settingsFor("ben@example.org") == {"quotaBytes": 0}  # 0: no limit
        with pytest.raises(UnauthorizedLogin):
            login(source, "ann@example.org", "benpw")
        with pytest.raises(AccountDisabled):
            login(source, "cy@example.org", "cypw")
        with pytest.raises(UnknownUser):
            login(source, "dan@example.org", "x")
        assert source.overriddenSettings() == {"quotaBytes"}
    finally:
        source.close()


def test_postfixadmin_query_is_the_documented_one():
    import pathlib

    guide = pathlib.Path(__file__).parent.parent / "docs" / "guide" / "users.rst"
    documented = " ".join(guide.read_text().split())
    assert " ".join(POSTFIXADMIN_QUERY.split()) in documented


def test_deliver_knows_the_users_in_sql(users, tmp_path):
    """popserv deliver asks a pgsql: passdb as LMTP does: an unknown recipient is 67."""
    import os
    import subprocess
    import sys

    from support import REPO

    def deliver(user):
        return subprocess.run(
            [sys.executable, "-m", "popserv", "deliver", user, "--passdb", f"pgsql:{users}"]
            + ["--mail-location", f"maildir:{tmp_path}/%u"],
            input=b"Subject: x\n\nhi\n",
            capture_output=True,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            timeout=60,
        )

    assert deliver("alice").returncode == 0
    out = deliver("nobody")
    assert out.returncode == 67 and b"no user nobody" in out.stderr, out
    assert not (tmp_path / "nobody").exists()


def test_check_config_reports_the_users_database(pgdatabase, tmp_path, capsys):
    """check-config says whether a pgsql passdb's database is reached and its schema."""
    config = tmp_path / "popserv.conf"
    mail = f'mail_location = "maildir:{tmp_path}/mail/%u"\ncreate_maildirs = true\n'
    config.write_text(mail + f'passdb = ["pgsql:{pgdatabase}"]\n')
    assert main(["check-config", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "passdb pgsql:" in out and "schema version 0" in out and "popserv db init" in out
    assert main(["db", "init", "--passdb", f"pgsql:{pgdatabase}"]) == 0
    capsys.readouterr()
    assert main(["check-config", "--config", str(config)]) == 0
    assert f"database reached, schema version {CURRENT}" in capsys.readouterr().out
    config.write_text(mail + 'passdb = ["pgsql:postgresql:///x?host=/nonexistent"]\n')
    assert main(["check-config", "--config", str(config)]) == 1
    assert "passdb pgsql:" in (out := capsys.readouterr().out)
    assert "cannot reach the database" in out
