"""
A Maildir that a real Dovecot (Debian's dovecot-pop3d, see dovecot.py) has
served is taken over by popserv with --uidl-source: the UIDL list a client
sees is the same before and after, and fetchmail with `keep` and its id file
downloads nothing again (fetchmail keys the id file by user and host: both
servers are on 127.0.0.1 as the same user).
"""

from __future__ import annotations

import os
import poplib
import subprocess
from pathlib import Path

import pytest
from dovecot import PASSWORD

from support import ServerProcess, have

#: What popserv is told for each user.
SOURCES = {
    "alice": "dovecot",
    "bob": "dovecot:%v.%u",
    "carol": "dovecot:%f",
    "dave": "dovecot",
}

MESSAGES = [
    b"From: a@example.org\nSubject: one\n\nfirst\n",
    b"From: b@example.org\nSubject: two\n\nsecond\n.dotted\n",
    b"From: c@example.org\nSubject: three\n\n" + b"x" * 5000 + b"\n",
]


def listing(port: int, user: str, password: str = PASSWORD) -> list[tuple[str, str]]:
    """(UIDL, size) of every message, in order, as a client sees them."""
    client = poplib.POP3("127.0.0.1", port, timeout=30)
    try:
        client.user(user)
        client.pass_(password)
        uidls = [line.decode().split()[1] for line in client.uidl()[1]]
        sizes = [line.decode().split()[1] for line in client.list()[1]]
    finally:
        client.quit()
    return list(zip(uidls, sizes, strict=True))


def fill(dovecot, user: str) -> None:
    for number, message in enumerate(MESSAGES):
        dovecot.deliver(user, f"{1700000000 + number}.M{number}P42.mx.example", message)


def fetchmail(port: int, user: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    """fetchmail --keep --uidl, its id file in C{tmp}; each message to a file in tmp/out."""
    rc = tmp / "fetchmailrc"
    rc.write_text(f'poll 127.0.0.1 user "{user}" password "{PASSWORD}"\n')
    rc.chmod(0o600)
    out = tmp / "out"
    out.mkdir(exist_ok=True)
    mda = f"sh -c 'cat > \"$(mktemp {out}/msg.XXXXXX)\"'"
    cmd = [
        "fetchmail", "-f", str(rc), "--nosyslog", "--verbose", "--sslproto", "",
        "--pidfile", str(tmp / "fetchmail.pid"), "-i", str(tmp / "fetchids"),
        "--protocol", "pop3", "--service", str(port), "--user", user,
        "--auth", "password", "--timeout", "30", "--keep", "--uidl", "--mda", mda,
        "127.0.0.1",
    ]  # fmt: skip
    env = {**os.environ, "HOME": str(tmp)}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def popserv(tmp: Path, dovecot, source: str, users: list[str]) -> ServerProcess:
    """popserv over Dovecot's Maildirs (as root: it reads what nobody owns)."""
    (tmp / "mail").symlink_to(dovecot.root)
    server = ServerProcess(
        tmp, {user: f"{{PLAIN}}{PASSWORD}" for user in users}, extra=f'uidl_source = "{source}"\n'
    )
    return server.start()


def requireFetchmail() -> None:
    if not have("fetchmail"):
        if os.environ.get("CI"):
            pytest.fail("fetchmail is not installed")
        pytest.skip("fetchmail is not installed")


@pytest.mark.parametrize("user", sorted(SOURCES))
def test_uidls_carried_over_from_dovecot(dovecot, tmp_path, user):
    """
    Dovecot serves the Maildir (and writes dovecot-uidlist); popserv then
    serves the same UIDLs and sizes, and keeps them once the uidlist is gone.
    """
    requireFetchmail()
    fill(dovecot, user)
    before = listing(dovecot.port, user)
    first = fetchmail(dovecot.port, user, tmp_path)
    assert first.returncode == 0, first.stderr
    assert len(list((tmp_path / "out").iterdir())) == len(MESSAGES)
    if user == "dave":
        uidlist = (dovecot.maildir(user) / "dovecot-uidlist").read_text()
        assert " P" in uidlist, uidlist  # the saved UIDLs are what popserv reads

    server = popserv(tmp_path, dovecot, SOURCES[user], [user])
    try:
        assert listing(server.port, user) == before
        again = fetchmail(server.port, user, tmp_path)
        log = again.stdout + again.stderr
        assert again.returncode == 1, log  # 1: no mail
        assert "3 messages (3 seen)" in log or "no mail" in log, log
        assert len(list((tmp_path / "out").iterdir())) == len(MESSAGES)
        # Recorded in popserv's index: the UIDLs stay without Dovecot's file.
        os.unlink(dovecot.maildir(user) / "dovecot-uidlist")
    finally:
        server.stop()
    server = ServerProcess(tmp_path, {user: f"{{PLAIN}}{PASSWORD}"})  # native now
    server.start()
    try:
        assert listing(server.port, user) == before
    finally:
        server.stop()


def test_native_is_the_default(dovecot, tmp_path):
    """Without --uidl-source, popserv serves its own UIDLs (the names), as before."""
    user = "frank"
    fill(dovecot, user)
    before = listing(dovecot.port, user)
    (tmp_path / "mail").symlink_to(dovecot.root)
    server = ServerProcess(tmp_path, {user: f"{{PLAIN}}{PASSWORD}"}).start()
    try:
        served = listing(server.port, user)
    finally:
        server.stop()
    assert [size for _, size in served] == [size for _, size in before]
    assert [uidl for uidl, _ in served] == [
        f"{1700000000 + n}.M{n}P42.mx.example" for n in range(len(MESSAGES))
    ]
