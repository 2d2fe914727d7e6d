"""
`popserv migrate` into and out of the mbox store, and `popserv uidl` over any
store: real subprocess runs between Maildir, mbox and PostgreSQL locations,
each checked by the target's own listing (UIDL, size, delivery time) and by
`popserv uidl`; a second run copies nothing.
"""

from __future__ import annotations

import hashlib

from test_migrate import USERS, locations, popserv  # noqa: F401  (a fixture)

from popserv.build import makeStore
from popserv.config import Config
from popserv.migrate import WireDigest
from popserv.threads import synchronously, waitFor


def listing(location: str, user: str) -> list[tuple[str, int, int]]:
    """(UIDL, size, whole seconds of the delivery time) of each message, as any store lists."""
    store = makeStore(Config(mail_location=location), synchronously, createMissing=False)
    try:
        mailbox = waitFor(store.openMailbox(user))
        infos = waitFor(mailbox.listMessages())
        mailbox.close()
    finally:
        getattr(store, "close", lambda: None)()
    return sorted((i.uid, i.size, int(i.received)) for i in infos)


def uidl(location: str, user: str) -> list[tuple[str, str]]:
    """What `popserv uidl --sizes` prints: (UIDL, size) of each message, sorted."""
    out = popserv("uidl", "--sizes", "--mail-location", location, user)
    assert out.returncode == 0, out.stderr
    return sorted(tuple(line.split()[1:]) for line in out.stdout.splitlines())


def migrated(source: str, target: str, copied: int, *more: str) -> None:
    """Migrate twice: C{copied} messages the first time, none the second."""
    first = popserv("migrate", "--from", source, "--to", target, *more)
    assert first.returncode == 0, first.stderr
    assert f"{copied} messages copied, 0 already there" in first.stderr, first.stderr
    again = popserv("migrate", "--from", source, "--to", target, *more)
    assert again.returncode == 0, again.stderr
    assert f"0 messages copied, {copied} already there" in again.stderr, again.stderr
    for user in USERS:
        assert listing(target, user) == listing(source, user)
        assert uidl(target, user) == uidl(source, user)


def test_maildir_to_mbox_and_back_keeps_everything(locations):  # noqa: F811
    """
    Maildir -> mbox (a %d/%n spool tree, made as needed) -> Maildir: the same
    UIDLs, sizes and delivery times at every step, also for a message without
    a final line feed and one in CRLF (stored otherwise in mbox, the same on
    the wire); `popserv uidl` serves the same from all three.
    """
    source, _, root = locations
    spool = f"mbox:{root}/spool/%d/%n"
    migrated(source, spool, 11)
    assert (root / "spool" / "alice").is_file()
    assert (root / "spool" / "example.org" / "bob").is_file()
    migrated(spool, f"maildir:{root}/back/%d/%n/Maildir", 11)


def test_mbox_to_postgresql(locations, pgdatabase):  # noqa: F811
    source, _, root = locations
    spool = f"mbox:{root}/spool/%d/%n"
    migrated(source, spool, 11)
    target = f"pgsql:{pgdatabase}"
    init = popserv("db", "init", "--mail-location", target)
    assert init.returncode == 0, init.stderr
    migrated(spool, target, 11)


def test_mboxo_loses_a_stored_quote_and_says_so(tmp_path):
    """
    A message holding ">From " cannot be stored as it is in an mboxo spool
    (it would be served as "From "): the verification reports it; an mboxrd
    target (mbox_format) keeps it.
    """
    source = f"maildir:{tmp_path}/old/%u/Maildir"
    from support import deliver

    deliver(tmp_path / "old" / "carol" / "Maildir", b"Subject: q\n\n>From a quote\nFrom x\n")
    lossy = popserv("migrate", "--from", source, "--to", f"mbox:{tmp_path}/o/%u")
    assert lossy.returncode == 1 and "differs in the target" in lossy.stderr, lossy.stderr
    config = tmp_path / "rd.toml"
    config.write_text('mbox_format = "mboxrd"\n')
    target = f"mbox:{tmp_path}/rd/%u"
    done = popserv("migrate", "--config", str(config), "--from", source, "--to", target)
    assert done.returncode == 0 and "verified" in done.stderr, done.stderr
    assert b"\n>>From a quote\n>From x\n" in (tmp_path / "rd" / "carol").read_bytes()


def test_uidl_refuses_a_maildrop_in_a_session(tmp_path):
    """`popserv uidl` opens the maildrop as a session does: one in use is 75, run again."""
    location = f"mbox:{tmp_path}/spool/%u"
    store = makeStore(Config(mail_location=location), synchronously)
    writer = waitFor(store.deliverMessage("dora"))
    waitFor(writer.write(b"Subject: hi\n\nhello\n"))
    uid = waitFor(writer.commit())
    mailbox = waitFor(store.openMailbox("dora"))
    try:
        busy = popserv("uidl", "--mail-location", location, "dora")
        assert busy.returncode == 75 and "dora is in a session now" in busy.stderr, busy
    finally:
        mailbox.close()
    assert popserv("uidl", "--mail-location", location, "dora").stdout == f"1 {uid}\n"
    missing = popserv("uidl", "--mail-location", location, "ghost")
    assert missing.returncode == 1 and "ghost: Mailbox does not exist" in missing.stderr


def test_wire_digest_is_the_retr_form_whatever_the_chunks():
    wire = b"a\r\nb\r\n\r\nlone\rcr\r\nend\r\n"
    for stored in (b"a\nb\n\nlone\rcr\nend", b"a\r\nb\n\r\nlone\rcr\r\nend\n"):
        for size in (1, 2, 3, 100):
            digest = WireDigest()
            for i in range(0, len(stored), size):
                digest.update(stored[i : i + size])
            assert digest.hexdigest() == hashlib.sha256(wire).hexdigest(), (stored, size)
    assert WireDigest().hexdigest() == hashlib.sha256(b"").hexdigest()


def test_check_config_warns_of_uidl_source_outside_maildir(tmp_path):
    """uidl_source applies to Maildir only: set for mbox, check-config says it is ignored."""
    (tmp_path / "passwd").write_text("alice:{PLAIN}x\n")
    config = tmp_path / "popserv.toml"
    for location, warned in (("mbox:spool/%u", True), ("maildir:mail/%u/Maildir", False)):
        config.write_text(
            f'passwd = "passwd"\nmail_location = "{location}"\nuidl_source = "dovecot"\n'
        )
        out = popserv("check-config", "--config", str(config))
        assert out.returncode == 0, out.stdout + out.stderr
        assert out.stdout.endswith("configuration OK\n"), out.stdout
        warning = (
            "warning: uidl_source = dovecot applies to Maildir stores only; "
            "the mbox store ignores it (its X-UIDL rule is always on)\n"
        )
        assert (warning in out.stdout) is warned, out.stdout
