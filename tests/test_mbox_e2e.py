"""
The mbox store end to end: real MTAs deliver into a spool, a real client
fetches from a popserv process serving it (`mail_location = "mbox:..."`).

- procmail (with formail writing the From line) appends under its own
  dotlock and kernel lock, quoting body "From " lines (mboxo);
- Postfix `local` (a private instance, as in test_e2e_postfix.py, with
  `mail_spool_directory` in the test's directory) delivers to a Unix account;
- fetchmail fetches with --keep --uidl (an incremental second run fetches
  only the new mail), then without --keep (DELE + QUIT: UPDATE rewrites the
  spool, which the MTA keeps appending to);
- mpop does the same with its own UIDL file (keep on, then off).
"""

from __future__ import annotations

import os
import pwd
import shutil
import smtplib
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from test_e2e_clients import DOTS, NOEOL, UTF8, fetched, fetchmail

from clients import local, output, split_received
from support import ServerProcess, have

PASSWORD = "wonderland"


def need(program: str, package: str) -> None:
    if not have(program):
        if os.environ.get("CI"):
            pytest.fail(f"{program} is not installed (.ci/run installs {package})")
        pytest.skip(f"{program} is not installed")


def mboxServer(root: Path, user: str, spoolDir: Path) -> ServerProcess:
    srv = ServerProcess(root, {user: "{PLAIN}" + PASSWORD})
    text = srv.config.read_text().replace(
        'mail_location = "maildir:mail/%d/%n/Maildir"', f'mail_location = "mbox:{spoolDir}/%u"'
    )
    assert "mbox:" in text
    srv.config.write_text(text)
    return srv


def procmail(spool: Path, message: bytes) -> None:
    """formail adds the From line, procmail appends under its locks (as an MDA)."""
    rc = spool.parent / "procmailrc"
    rc.touch()
    formail = subprocess.run(["formail"], input=message, capture_output=True, check=True)
    done = subprocess.run(
        ["procmail", "-m", f"DEFAULT={spool}", str(rc)],
        input=formail.stdout, capture_output=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_procmail_delivers_fetchmail_fetches(tmp_path):
    need("procmail", "procmail")
    need("formail", "procmail")
    need("fetchmail", "fetchmail")
    spoolDir = tmp_path / "spool"
    spoolDir.mkdir()
    spool = spoolDir / "alice"
    messages = [DOTS, UTF8, NOEOL, DOTS]  # two identical: two UIDLs
    for message in messages:
        procmail(spool, message)
    assert b"\n>From here on" in spool.read_bytes()  # quoted on disk
    srv = mboxServer(tmp_path / "server", "alice", spoolDir).start()
    try:
        home = tmp_path / "home"
        home.mkdir()
        first = fetchmail(srv, home, "--keep", "--uidl")
        assert first.returncode == 0, output(first)
        got = sorted(fetched(home, b"fetchmail").values())
        assert got == sorted(local(m) for m in messages), output(first)
        ids = (home / "fetchids").read_text().split()
        assert len(set(ids)) >= 4

        late = b"From: late@example.org\nSubject: late\n\nFrom the MTA, later\n"
        procmail(spool, late)
        before = set(fetched(home, b"fetchmail"))
        second = fetchmail(srv, home, "--keep", "--uidl")
        assert second.returncode == 0 and "5 messages (4 seen)" in output(second), output(second)
        after = fetched(home, b"fetchmail")
        assert [after[n] for n in set(after) - before] == [local(late)]

        gone = fetchmail(srv, home, "--all")  # DELE everything, QUIT: UPDATE
        assert gone.returncode == 0 and "POP3> QUIT" in output(gone), output(gone)
        assert spool.read_bytes() == b""
        procmail(spool, late)  # the MTA appends to the rewritten spool
        assert spool.read_bytes().count(b"\nSubject: late\n") == 1
        assert not (spoolDir / "alice.lock").exists()
    finally:
        srv.stop()


# -- Postfix local --------------------------------------------------------------------------

POSTFIX = "/usr/sbin/postfix"
ACCOUNT = "nobody"  # a Unix account Postfix local can deliver to; never root


def mainCf(directory: Path, spoolDir: Path) -> str:
    return f"""\
compatibility_level = 3.6
queue_directory = {directory}/queue
data_directory = {directory}/data
maillog_file = {directory}/maillog
maillog_file_prefixes = {directory}
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.test
mydomain = test
myorigin = $myhostname
mydestination = mx.test
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtputf8_enable = no
biff = no
default_transport = error:no mail leaves a test
mail_spool_directory = {spoolDir}
mailbox_delivery_lock = fcntl, dotlock
home_mailbox =
mailbox_command =
"""


def test_postfix_local_delivers_into_the_spool(tmp_path):
    """
    Postfix's `local` delivers over SMTP into spoolDir/nobody with its
    dotlock and fcntl locks (as the account, in a 1777 directory); popserv
    serves it, and fetchmail's DELE rewrites it keeping owner and mode.
    """
    if not (os.path.exists(POSTFIX) and have("postconf")):
        need("postfix", "postfix")
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("a private Postfix instance needs root (CI runs as root)")
        pytest.skip("a private Postfix instance needs root")
    need("fetchmail", "fetchmail")
    from test_e2e_postfix import freePort, masterCf, stopPostfix

    root = Path(tempfile.mkdtemp(prefix="popserv-mbox-postfix-"))
    root.chmod(0o755)
    config, spoolDir = root / "postfix", root / "spool"
    for d in (config, config / "queue", config / "data", spoolDir):
        d.mkdir()
    shutil.chown(config / "data", "postfix")
    spoolDir.chmod(0o1777)
    port = freePort()
    (config / "main.cf").write_text(mainCf(config, spoolDir))
    (config / "master.cf").write_text(masterCf(port))
    srv = mboxServer(root / "server", ACCOUNT, spoolDir)
    try:
        started = subprocess.run(
            [POSTFIX, "-c", str(config), "start"], capture_output=True, text=True, timeout=60
        )
        log = config / "maillog"
        why = log.read_text() if log.exists() else "(see syslog)"
        assert started.returncode == 0, started.stdout + started.stderr + why
        bodies = [
            b"Subject: one\n\nFrom the start of a line\nend\n",
            b"Subject: two\n\n.a dot\n",
        ]
        deadline = time.time() + 20
        while True:
            try:
                smtp = smtplib.SMTP("127.0.0.1", port, timeout=10)
                break
            except OSError:
                assert time.time() < deadline, "postfix's smtpd did not listen"
                time.sleep(0.1)
        with smtp:
            for body in bodies:  # smtplib sends bytes as they are: CRLF them
                crlf = body.replace(b"\n", b"\r\n")
                smtp.sendmail("sender@example.org", [f"{ACCOUNT}@mx.test"], crlf)
        spool = spoolDir / ACCOUNT
        deadline = time.time() + 30
        while not (spool.exists() and spool.read_bytes().count(b"\nSubject: ") == 2):
            log = (config / "maillog").read_text() if (config / "maillog").exists() else ""
            assert time.time() < deadline, f"postfix did not deliver:\n{log}"
            time.sleep(0.1)
        data = spool.read_bytes()
        assert data.startswith(b"From sender@example.org ") and b"\n>From the start" in data
        owner = pwd.getpwnam(ACCOUNT).pw_uid
        assert spool.stat().st_uid == owner
        srv.start()
        home = root / "home"
        home.mkdir()
        rc = home / "fetchmailrc"
        import test_e2e_clients

        saved = test_e2e_clients.USER
        test_e2e_clients.USER = ACCOUNT
        try:
            proc = fetchmail(srv, home)
        finally:
            test_e2e_clients.USER = saved
        assert proc.returncode == 0, output(proc)
        got = sorted(p.read_bytes() for p in (home / "out").iterdir())
        assert len(got) == 2
        # Postfix local adds Return-Path and Delivered-To; the bodies come back un-quoted.
        assert any(m.endswith(b"\n\nFrom the start of a line\nend\n") for m in got), got
        assert any(m.endswith(b"\n\n.a dot\n") for m in got), got
        assert spool.read_bytes() == b"" and spool.stat().st_uid == owner
        assert rc.exists()
    finally:
        stopPostfix(config)
        srv.stop()
        shutil.rmtree(root, ignore_errors=True)


# -- mpop -----------------------------------------------------------------------------------


def mpop(srv: ServerProcess, home: Path, keep: bool):
    """One mpop run: USER/PASS without TLS, into home/Maildir, its UIDL file in home."""
    dest = home / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    conf = home / "mpoprc"
    conf.write_text(
        f"account test\nhost 127.0.0.1\nport {srv.port}\nuser alice\npassword {PASSWORD}\n"
        f"tls off\nauth user\ntimeout 30\ndelivery maildir {dest}\n"
        f"keep {'on' if keep else 'off'}\nuidls_file {home / 'mpop-uidls'}\n"
    )
    conf.chmod(0o600)  # mpop refuses a readable file holding a password
    env = dict(os.environ, HOME=str(home), LC_ALL="C")
    return subprocess.run(
        ["mpop", "--debug", "-C", str(conf), "test"],
        capture_output=True, timeout=60, env=env, cwd=home,
    )  # fmt: skip


def delivered(home: Path) -> list[bytes]:
    """What mpop put into home/Maildir, its Received: field taken off, sorted."""
    return sorted(
        split_received(p.read_bytes(), b"mpop")
        for sub in ("new", "cur")
        for p in (home / "Maildir" / sub).iterdir()
    )


def test_procmail_delivers_mpop_fetches(tmp_path):
    """
    mpop (keep on, its own UIDL file) fetches the spool byte-exact (dots,
    8-bit, a quoted From line, no final newline, two identical
    messages); a second run fetches only what procmail appended since; with
    keep off, its DELE and QUIT empty the spool.
    """
    need("procmail", "procmail")
    need("formail", "procmail")
    need("mpop", "mpop")
    spoolDir = tmp_path / "spool"
    spoolDir.mkdir()
    spool = spoolDir / "alice"
    messages = [DOTS, UTF8, NOEOL, DOTS]
    for message in messages:
        procmail(spool, message)
    srv = mboxServer(tmp_path / "server", "alice", spoolDir).start()
    try:
        home = tmp_path / "home"
        home.mkdir()
        first = mpop(srv, home, keep=True)
        assert first.returncode == 0, output(first)
        assert delivered(home) == sorted(local(m) for m in messages), output(first)
        assert len((home / "mpop-uidls").read_text().split("\n")) >= len(messages)

        late = b"From: late@example.org\nSubject: late\n\nFrom the MTA, later\n"
        procmail(spool, late)
        second = mpop(srv, home, keep=True)
        assert second.returncode == 0, output(second)
        assert delivered(home) == sorted(local(m) for m in [*messages, late]), output(second)

        gone = mpop(srv, home, keep=False)
        assert gone.returncode == 0 and "QUIT" in output(gone), output(gone)
        assert delivered(home) == sorted(local(m) for m in [*messages, late])
        assert spool.read_bytes() == b"", output(gone)
    finally:
        srv.stop()
    assert "Traceback" not in srv.log, srv.log
