"""
`popserv migrate --from pop://...`: maildrops fetched from a live, real Dovecot
(tests/dovecot.py) over POP3 into a popserv store under their old UIDLs;
checked, resumable, never deleting on the source. Afterwards a fetchmail that
kept its mail on Dovecot downloads nothing again from popserv.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from dovecot import MASTER_PASSWORD, PASSWORD
from test_uidlsource_dovecot import MESSAGES, fetchmail, fill, listing, requireFetchmail

from popserv.popsource import parsePOPURL
from support import REPO, ServerProcess, deliver


def migrate(tmp, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "popserv", "migrate", *args],
        cwd=tmp,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_pop_urls():
    url = parsePOPURL("pop://erin;auth=*@mail.example:1110")
    assert (url.host, url.port, url.implicitTLS, url.user, url.auth) == (
        "mail.example",
        1110,
        False,
        "erin",
        "*",
    )
    assert parsePOPURL("pop3s://mail.example").port == 995
    assert parsePOPURL("pop3://a%40b.example;AUTH=+USER@h").user == "a@b.example"
    assert parsePOPURL("pop://h").user is None
    for bad in ("imap://h", "pop://u:pw@h", "pop://u;auth=APOP@h", "pop://h/INBOX", "pop://"):
        with pytest.raises(ValueError):
            parsePOPURL(bad)


def test_lines_longer_than_any_status_line_migrate_exactly(tmp_path):
    """
    Generated HTML and unwrapped base64 have lines of hundreds of KiB: a
    source's RETR is read in pieces, its stuffing and line ends undone
    across piece boundaries, and every message arrives byte for byte.
    """
    piece = 64 * 1024  # (what the source is read by)
    bodies = [
        b"Subject: one\n\nshort\n",
        b"Subject: html\n\n<html>" + b"x" * 300_000 + b"</html>\n.dot after\n",
        b"Subject: edge\n\n" + b"y" * (piece - 2) + b"\r\n" + b"z" * (piece - 1) + b"\r\rw\n",
        b"Subject: dots\n\n" + b"." + b"q" * (2 * piece) + b"\n..\n.\n",
    ]
    server = ServerProcess(tmp_path / "src", {"u": "{PLAIN}pw"}).start()
    try:
        for body in bodies:
            deliver(server.maildir("u"), body)
        (tmp_path / "pw").write_text("pw\n")
        done = migrate(
            tmp_path,
            "--from",
            f"pop://u@127.0.0.1:{server.port}",
            "--to",
            f"maildir:{tmp_path}/dst/%u",
            "--password-file",
            str(tmp_path / "pw"),
        )
    finally:
        server.stop()
    assert done.returncode == 0, done.stdout + done.stderr
    copied = tmp_path / "dst" / "u" / "new"
    got = sorted((copied / name).read_bytes() for name in os.listdir(copied))
    crlf = [body.replace(b"\r\n", b"\n") for body in bodies]  # (stored with LF line ends)
    assert got == sorted(crlf)


def test_a_ca_file_that_is_missing_or_no_pem_is_a_usage_error(tmp_path):
    (tmp_path / "pw").write_text("pw\n")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    for ca in (tmp_path / "missing.pem", tmp_path / "junk.pem"):
        done = migrate(
            tmp_path,
            "--from",
            "pop3s://u@127.0.0.1:1",
            "--to",
            f"maildir:{tmp_path}/dst/%u",
            "--password-file",
            str(tmp_path / "pw"),
            "--ca-file",
            str(ca),
        )
        assert done.returncode == 64 and "--ca-file" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def test_migrate_from_dovecot(dovecot, tmp_path):
    """
    One user named in the URL: every message copied with its Dovecot UIDL,
    verified; a second run copies nothing; Dovecot still has everything; a
    fetchmail that kept mail on Dovecot finds nothing new on popserv.
    """
    requireFetchmail()
    user = "erin"
    fill(dovecot, user)
    before = listing(dovecot.port, user)
    kept = fetchmail(dovecot.port, user, tmp_path)
    assert kept.returncode == 0, kept.stderr
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    target = f"maildir:{tmp_path}/mail/%u/Maildir"
    url = f"pop://{user};auth=*@127.0.0.1:{dovecot.port}"

    first = migrate(tmp_path, "--from", url, "--to", target, "--password-file", str(secret))
    assert first.returncode == 0, first.stderr
    assert "3 messages copied" in first.stderr, first.stderr
    second = migrate(tmp_path, "--from", url, "--to", target, "--password-file", str(secret))
    assert second.returncode == 0, second.stderr
    assert "0 messages copied, 3 already there" in second.stderr, second.stderr
    assert listing(dovecot.port, user) == before  # nothing deleted on the source
    assert "DELE" not in dovecot.log()

    server = ServerProcess(tmp_path, {user: f"{{PLAIN}}{PASSWORD}"}).start()
    try:
        assert listing(server.port, user) == before
        again = fetchmail(server.port, user, tmp_path)
        log = again.stdout + again.stderr
        assert again.returncode == 1, log  # no new mail
        assert len(list((tmp_path / "out").iterdir())) == len(MESSAGES)
        # The bodies arrived intact: RETR from popserv gives what Dovecot gave.
    finally:
        server.stop()


def test_migrate_every_user_with_a_master_user(dovecot, tmp_path):
    """A URL naming no user, the users from --credentials, logged in as a master user."""
    for user in ("gina", "hugo"):
        fill(dovecot, user)
    expected = {user: listing(dovecot.port, user) for user in ("gina", "hugo")}
    credentials = tmp_path / "users"
    credentials.write_text("gina:\nhugo:\n")
    master = tmp_path / "master"
    master.write_text(MASTER_PASSWORD + "\n")
    args = [
        "--from", f"pop://127.0.0.1:{dovecot.port}",
        "--to", f"maildir:{tmp_path}/mail/%u/Maildir",
        "--credentials", str(credentials),
        "--master-user", "master", "--master-password-file", str(master),
    ]  # fmt: skip
    done = migrate(tmp_path, *args)
    assert done.returncode == 0, done.stderr
    assert "2 maildrops, 6 messages copied" in done.stderr, done.stderr
    server = ServerProcess(tmp_path, {u: f"{{PLAIN}}{PASSWORD}" for u in expected}).start()
    try:
        assert {user: listing(server.port, user) for user in expected} == expected
    finally:
        server.stop()


def test_wrong_password_is_reported(dovecot, tmp_path):
    secret = tmp_path / "password"
    secret.write_text("wrong\n")
    done = migrate(
        tmp_path,
        "--from", f"pop://erin@127.0.0.1:{dovecot.port}",
        "--to", f"maildir:{tmp_path}/mail/%u/Maildir",
        "--password-file", str(secret),
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "cannot log in" in done.stderr, done.stderr
