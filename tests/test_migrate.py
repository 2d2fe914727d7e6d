"""
`popserv migrate`, end to end: real subprocess runs between two Maildir
locations, checked by the target's listing, `popserv uidl` and a POP3 server
serving the target.
"""

from __future__ import annotations

import io
import os
import poplib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from popserv import admin
from popserv.backends.maildir import MaildirStore
from popserv.backends.memory import MemoryStore
from popserv.migrate import Migration, Progress, migrate
from popserv.threads import synchronously
from support import REPO, ServerProcess, deliver

USERS = {"alice": "{PLAIN}wonderland", "bob@example.org": "{PLAIN}builder"}


def popserv(*args: str, stdin: bytes = b"", **kw: object) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "popserv", *args],
        input=stdin.decode(),
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        **kw,
    )


def command(source: str, target: str, *more: str) -> list[str]:
    return [sys.executable, "-m", "popserv", "migrate", "--from", source, "--to", target, *more]


def listing(location: str, user: str) -> list[tuple[str, int, int]]:
    """(UIDL, size, whole seconds of the delivery time) of each message, as the store lists."""
    store = MaildirStore(location, runInThread=synchronously, createMissing=False)
    results: list[object] = []
    store.openMailbox(user).addBoth(results.append)
    mailbox = results.pop()
    mailbox.listMessages().addBoth(results.append)
    mailbox.close()
    return [(i.uid, i.size, int(i.received)) for i in results.pop()]  # type: ignore[union-attr]


@pytest.fixture
def locations(tmp_path: Path) -> tuple[str, str, Path]:
    """A source location with odd and ordinary messages for two users, a target location."""
    source = f"maildir:{tmp_path}/old/%d/%n/Maildir"
    target = f"maildir:{tmp_path}/new/%d/%n/Maildir"
    store = MaildirStore(source, runInThread=synchronously)
    for user in USERS:
        for n in range(3):
            message = f"Subject: {n} for {user}\n\nline one\nline two\n".encode()
            admin.deliver(store.location.expand(user), io.BytesIO(message))
    alice = tmp_path / "old" / "alice" / "Maildir"
    deliver(alice, b"bare LF\nno final newline", name="1700000000.odd name with spaces")
    deliver(alice, b"CRLF\r\nalready\r\n", sub="cur", name="1700000001.seen.host:2,S")
    deliver(alice, b"sized\n", name="1700000002.w.host,S=6,W=7")
    deliver(alice, b"long\n", name="1700000003." + "x" * 90)
    deliver(alice, b"comma\n", sub="cur", name="1700000004.a,b=c.host:2,RS")
    return source, target, tmp_path


def test_migrate_keeps_uidls_sizes_and_times_then_copies_nothing(locations):
    source, target, root = locations
    first = popserv("migrate", "--from", source, "--to", target)
    assert first.returncode == 0, first.stderr
    assert "2 maildrops, 11 messages copied, 0 already there" in first.stderr
    assert "alice: 8 copied" in first.stderr and "verified" in first.stderr
    for user in USERS:
        # The same UIDLs, sizes and delivery times; a Maildir target may number
        # messages delivered in the same second in another order.
        before = sorted(listing(source, user))
        assert sorted(listing(target, user)) == before and before
        uidl = [
            popserv("uidl", "--sizes", "--mail-location", loc, user) for loc in (source, target)
        ]
        assert uidl[0].returncode == 0
        assert sorted(line.split()[1:] for line in uidl[0].stdout.splitlines()) == sorted(
            line.split()[1:] for line in uidl[1].stdout.splitlines()
        )
    names = sorted(p.name for p in (root / "new").rglob("*") if p.is_file())

    again = popserv("migrate", "--from", source, "--to", target)
    assert again.returncode == 0, again.stderr
    assert "11 messages" not in again.stderr
    assert "2 maildrops, 0 messages copied, 11 already there" in again.stderr
    assert sorted(p.name for p in (root / "new").rglob("*") if p.is_file()) == names


def test_pop3_server_over_the_target_serves_the_same_uidls(locations):
    source, _, root = locations
    server = ServerProcess(root / "srv", USERS)  # its mail: srv/mail/%d/%n/Maildir
    target = f"maildir:{server.mailRoot}/%d/%n/Maildir"
    out = popserv("migrate", "--from", source, "--to", target, "--user", "alice")
    assert out.returncode == 0, out.stderr
    assert "1 maildrops, 8 messages copied" in out.stderr
    assert not (server.mailRoot / "example.org").exists()  # only the user asked for
    server.start()
    try:
        client = poplib.POP3("127.0.0.1", server.port, timeout=10)
        client.user("alice")
        client.pass_("wonderland")
        served = dict(line.decode().split()[:2] for line in client.uidl()[1])
        sizes = dict(line.decode().split() for line in client.list()[1])
        odd = next(n for n, uid in served.items() if uid.startswith("~"))  # the digest UIDL
        body = client.retr(int(odd))[1]
        client.quit()
    finally:
        server.stop()
    known = {uid: size for uid, size, _ in listing(source, "alice")}
    assert sorted(served.values()) == sorted(known)
    assert {served[n]: int(size) for n, size in sizes.items()} == known
    assert body == [b"bare LF", b"no final newline"]


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGINT], ids=["KILL", "INT"])
def test_interrupted_run_completes(tmp_path, signum):
    source = f"maildir:{tmp_path}/old/%n"
    target = f"maildir:{tmp_path}/new/%n"
    payload = b"x" * 60_000 + b"\n"
    for n in range(300):
        deliver(tmp_path / "old" / "carol", b"Subject: %d\n\n" % n + payload)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(command(source, target), env=env, stderr=subprocess.PIPE)
    landed = tmp_path / "new" / "carol" / "new"
    deadline = time.monotonic() + 60
    while not (landed.is_dir() and len(os.listdir(landed)) >= 10):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.002)
    proc.send_signal(signum)
    code = proc.wait(10)
    partial = len(os.listdir(landed))
    if signum == signal.SIGINT:  # stops cleanly after the message being copied
        assert code == 75 and b"interrupted: run again" in proc.stderr.read()
        assert os.listdir(tmp_path / "new" / "carol" / "tmp") == []
    assert 10 <= partial < 300

    out = popserv("migrate", "--from", source, "--to", target)
    assert out.returncode == 0, out.stderr
    assert f"{300 - partial} messages copied, {partial} already there" in out.stderr
    assert sorted(listing(target, "carol")) == sorted(listing(source, "carol"))

    # A target with some messages already, a message more in the source: only it is copied.
    os.unlink(next((tmp_path / "new" / "carol" / "new").iterdir()))
    deliver(tmp_path / "old" / "carol", b"late\n")
    out = popserv("migrate", "--from", source, "--to", target)
    assert "2 messages copied, 299 already there" in out.stderr, out.stderr
    assert sorted(listing(target, "carol")) == sorted(listing(source, "carol"))


def test_user_in_use_is_skipped_and_reported(locations):
    _, target, root = locations
    server = ServerProcess(root / "srv", USERS)
    source = f"maildir:{server.mailRoot}/%d/%n/Maildir"
    deliver(server.maildir("alice"), b"for alice\n")
    deliver(server.maildir("bob@example.org"), b"for bob\n")
    server.start()
    try:
        client = poplib.POP3("127.0.0.1", server.port, timeout=10)
        client.user("alice")
        client.pass_("wonderland")
        out = popserv("migrate", "--from", source, "--to", target)
        client.quit()
    finally:
        server.stop()
    assert out.returncode == 75, out.stderr
    assert "alice: in use by a session, skipped; run again" in out.stderr
    assert "in use, run again: alice" in out.stderr
    assert "bob@example.org: 1 copied" in out.stderr
    assert not (root / "new" / "alice").exists() or not listing(target, "alice")
    out = popserv("migrate", "--from", source, "--to", target)
    assert out.returncode == 0, out.stderr
    assert "1 messages copied, 1 already there" in out.stderr
    assert sorted(listing(target, "alice")) == sorted(listing(source, "alice"))


def test_verification_reports_a_size_mismatch(locations):
    source, target, root = locations
    assert popserv("migrate", "--from", source, "--to", target).returncode == 0
    copied = next((root / "new" / "example.org" / "bob" / "Maildir" / "new").iterdir())
    tampered = copied.with_name(copied.name.replace(",W=", ",W=9"))
    copied.rename(tampered)
    out = popserv("migrate", "--from", source, "--to", target)
    assert out.returncode == 1, out.stderr
    uid = next(u for u, _, _ in listing(source, "bob@example.org") if u in copied.name)
    assert f"bob@example.org: {uid} is 9" in out.stderr and "in the source" in out.stderr
    assert "alice: 0 copied" in out.stderr  # the other maildrop is still migrated


def test_usage_errors(tmp_path):
    out = popserv("migrate", "--from", f"maildir:{tmp_path}/a/%n", "--to", "nosuch:x")
    assert out.returncode == 64 and "--to nosuch:x" in out.stderr
    out = popserv("migrate", "--from", f"maildir:{tmp_path}/a/%n", "--to", "memory:", "-h")
    assert out.returncode == 0 and "--user" in out.stdout
    missing = popserv(
        "migrate", "--from", f"maildir:{tmp_path}/a/%n", "--to", f"maildir:{tmp_path}/b/%n"
    )
    assert missing.returncode == 1 and f"no maildrops in maildir:{tmp_path}/a/%n" in missing.stderr
    nouser = popserv(
        "migrate",
        "--from",
        f"maildir:{tmp_path}/a/%n",
        "--to",
        f"maildir:{tmp_path}/b/%n",
        "--user",
        "ghost",
    )
    assert nouser.returncode == 1 and "ghost: Mailbox does not exist" in nouser.stderr


def test_in_process_into_memory_with_a_progress_bar(locations):
    source, _, _ = locations
    target = MemoryStore()
    out = io.StringIO()
    code = migrate(MaildirStore(source, runInThread=synchronously), target, ["alice"], out)
    assert code == 0
    uids = [uid for uid, _, _ in listing(source, "alice")]
    assert list(target.maildrops["alice"].messages) == uids
    bar = Progress(io.StringIO(), terminal=True)
    migration = Migration(MaildirStore(source, runInThread=synchronously), target, bar)
    migration.run(["alice"])
    assert migration.results[0].skipped == 8 and migration.results[0].copied == 0
    assert "\ralice [##############################] 0/0 messages" in bar.out.getvalue()


def test_migrate_from_maildir_into_postgresql_keeps_uidls(locations, pgdatabase):
    """Into the pgsql: store: UIDLs, sizes and delivery times kept; a second run copies nothing."""
    source, _, root = locations
    target = f"pgsql:{pgdatabase}"
    init = popserv("db", "init", "--mail-location", target)
    assert init.returncode == 0, init.stderr
    first = popserv("migrate", "--from", source, "--to", target)
    assert first.returncode == 0, first.stderr
    again = popserv("migrate", "--from", source, "--to", target)
    assert again.returncode == 0 and "0 messages copied, 11 already there" in again.stderr, again
    from popserv.backends.pgsql.store import PgStore  # noqa: F401  (the store is installed)
    from popserv.build import makeStore
    from popserv.config import Config

    pg = makeStore(Config(mail_location=target), synchronously)
    for user in USERS:
        results: list[object] = []
        pg.openMailbox(user).addBoth(results.append)
        mailbox = results.pop()
        mailbox.listMessages().addBoth(results.append)
        mailbox.close()
        got = sorted((i.uid, i.size, int(i.received)) for i in results.pop())
        assert got == sorted(listing(source.removeprefix("maildir:"), user))
    pg.close()
