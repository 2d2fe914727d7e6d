"""
End to end: C{twistd popserv --passdb pgsql:URI} on a real PostgreSQL
(tests/pg.py), with mail in PostgreSQL or in Maildirs, driven by poplib and
smtplib.LMTP: logins, their failures, per-user settings from columns, SCRAM
for C{{PLAIN}} users, a chain behind a passwd-file, LMTP's recipient check,
and a database that goes away and comes back.
"""

from __future__ import annotations

import base64
import poplib
import smtplib
import time

import pytest
import scramp
from test_e2e_pgsql import eventually
from test_pgsql import initialized
from test_pgsql_users import addUser, run

from support import ServerProcess


def configure(server: ServerProcess, uri: str, mail: str, passwd: bool, extra: str = "") -> None:
    text = server.config.read_text().replace(
        'mail_location = "maildir:mail/%d/%n/Maildir"', f'mail_location = "{mail}"'
    )
    if not passwd:
        text = text.replace('passwd = "passwd"\n', "")
    server.config.write_text(text + f'passdb = ["pgsql:{uri}"]\npgsql_timeout = 2\n' + extra)


@pytest.fixture
def users(pgdatabase):
    """alice ({PLAIN}), bob ({PLAIN}, a login delay of 300 s) in popserv's users table."""
    initialized(pgdatabase)
    assert addUser(pgdatabase, "alice", "wonderland") == 0
    assert addUser(pgdatabase, "bob", "builder") == 0
    run(pgdatabase, "UPDATE users SET login_delay = 300 WHERE name = 'bob'")
    return pgdatabase


@pytest.fixture
def pgserver(tmp_path, users):
    """Users and mail in PostgreSQL, and an LMTP listener."""
    server = ServerProcess(tmp_path, {})
    sock = tmp_path / "lmtp.sock"
    configure(server, users, f"pgsql:{users}", passwd=False, extra=f'lmtp = ["unix:{sock}"]\n')
    server.lmtpSocket = str(sock)
    server.start()
    server.waitForLog("LMTPFactory starting on")
    yield server
    server.stop()


def login(server, user="alice", password="wonderland"):
    pop = poplib.POP3("127.0.0.1", server.port, timeout=10)
    pop.user(user)
    pop.pass_(password)
    return pop


def refusal(server, user, password):
    with pytest.raises(poplib.error_proto) as refused:
        login(server, user, password)
    return refused.value.args[0]


def test_login_failures_and_settings(pgserver):
    pop = login(pgserver)
    assert pop.stat() == (0, 0)
    pop.quit()
    wrong = refusal(pgserver, "alice", "nope")
    assert wrong.startswith(b"-ERR [AUTH]")
    assert refusal(pgserver, "nobody", "nope") == wrong  # the same text
    pop = login(pgserver, "bob", "builder")
    assert "LOGIN-DELAY 300" in [c.decode() for c in pop._longcmd("CAPA")[1]]
    pop.quit()
    assert b"[LOGIN-DELAY]" in refusal(pgserver, "bob", "builder")


def test_scram_for_a_plain_user(pgserver):
    deadline = time.monotonic() + 5
    while True:  # the secrets' kinds are read just after start-up
        capa = poplib.POP3("127.0.0.1", pgserver.port, timeout=10)
        sasl = [c for c in capa._longcmd("CAPA")[1] if c.startswith(b"SASL")]
        if b"SCRAM-SHA-256" in sasl[0] or time.monotonic() > deadline:
            break
        capa.quit()
    assert b"SCRAM-SHA-256" in sasl[0]
    scram = scramp.ScramClient(["SCRAM-SHA-256"], "alice", "wonderland")
    first = base64.b64encode(scram.get_client_first().encode()).decode()
    line = capa._shortcmd(f"AUTH SCRAM-SHA-256 {first}")
    scram.set_server_first(base64.b64decode(line[2:]).decode())
    line = capa._shortcmd(base64.b64encode(scram.get_client_final().encode()).decode())
    scram.set_server_final(base64.b64decode(line[2:]).decode())
    assert capa._shortcmd("").startswith(b"+OK Logged in")
    capa.quit()


def test_lmtp_checks_recipients_in_sql(pgserver):
    client = smtplib.LMTP(pgserver.lmtpSocket)
    client.ehlo("mta.test")
    client.mail("sender@example.org")
    code, text = client.rcpt("nobody")
    assert code == 550 and text.startswith(b"5.1.1")
    assert client.rcpt("alice")[0] == 250
    client.data(b"Subject: hi\r\n\r\nhello\r\n")
    client.quit()
    pop = eventually(lambda: login(pgserver))
    assert pop.stat()[0] == 1
    pop.quit()


def test_database_down_then_back(pgserver, postgresql):
    login(pgserver).quit()
    postgresql.stop()
    try:
        assert refusal(pgserver, "alice", "wonderland").startswith(b"-ERR [SYS/TEMP]")
    finally:
        postgresql.start()
    eventually(lambda: login(pgserver), timeout=15).quit()  # no restart of popserv


def test_maildir_store_chained_behind_a_passwd_file(tmp_path, users):
    """--passwd first, then --passdb pgsql:, mail in Maildirs."""
    server = ServerProcess(tmp_path, {"carol": "{PLAIN}carolpw", "alice": "{PLAIN}fromfile"})
    configure(server, users, "maildir:mail/%d/%n/Maildir", passwd=True)
    server.start()
    try:
        login(server, "carol", "carolpw").quit()  # in the file only
        login(server, "alice", "fromfile").quit()  # the file is asked first
        login(server, "alice", "wonderland").quit()  # then the table
        pop = login(server, "bob", "builder")  # in the table only
        pop.quit()
        assert server.maildir("bob").is_dir()
        assert refusal(server, "nobody", "x").startswith(b"-ERR [AUTH]")
    finally:
        server.stop()
