"""
`popserv migrate --from pop://...` takes each message's delivery time from
its headers (POP3 itself gives none), so EXPIRE counts from when the mail
really arrived: the top `Received:` field, else `Date:`, else a made-up time
just before the migration. Checked against the real Dovecot of the session
(tests/dovecot.py), migrating into the mbox store.
"""

from __future__ import annotations

import time

from dovecot import PASSWORD
from test_migrate_mbox import listing as storeListing
from test_migrate_pop import migrate
from test_uidlsource_dovecot import listing

from popserv.popsource import headerTime

RECEIVED = (
    b"Received: from mx.example (mx.example [192.0.2.1])\n"
    b"\tby pop.example (Postfix) with ESMTP id 4F1;\n"
    b"\tTue, 14 Nov 2023 22:13:20 +0100 (CET)\n"
    b"Received: from elsewhere; Mon, 13 Nov 2023 10:00:00 +0000\n"
    b"Date: Sun, 12 Nov 2023 08:00:00 +0000\n"
    b"Subject: received\n\nbody\n"
)
DATED = b"Date: Wed, 1 Mar 2023 12:00:00 -0000\nSubject: dated\n\nbody\n"
BROKEN = b"Received: from x; not a date\nDate: Thu, 2 Mar 2023 12:00:00 +0000\n\nbody\n"
NOTHING = b"Subject: no dates at all\n\nbody\n"
FUTURE = b"Date: Fri, 1 Jan 2100 00:00:00 +0000\nSubject: future\n\nbody\n"

EXPECTED = [1699996400, 1677672000, 1677758400, None, None]


def test_header_times():
    lines = RECEIVED.split(b"\n")
    assert headerTime(lines) == 1699996400  # the top Received, unfolded, its zone applied
    assert headerTime(DATED.split(b"\n")) == 1677672000  # -0000: UTC
    assert headerTime(BROKEN.split(b"\n")) == 1677758400  # Date: when Received has none
    assert headerTime(NOTHING.split(b"\n")) is None
    assert headerTime([b"Subject: x", b"", b"Date: Wed, 1 Mar 2023 12:00:00 +0000"]) is None


def addUser(dovecot, user: str) -> None:
    """A user of its own in the running Dovecot (its passwd-file is read again when changed)."""
    line = f"{user}:{{PLAIN}}{PASSWORD}:{dovecot.uid}:{dovecot.gid}::{dovecot.root / user}::\n"
    with open(dovecot.dir / "passwd", "a") as f:
        f.write(line)


def test_migrate_from_dovecot_keeps_delivery_times(dovecot, tmp_path):
    user = "ivan"
    addUser(dovecot, user)
    messages = [RECEIVED, DATED, BROKEN, NOTHING, FUTURE]
    for number, message in enumerate(messages):
        dovecot.deliver(user, f"{1700000100 + number}.M{number}P43.mx.example", message)
    before = listing(dovecot.port, user)
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    url = f"pop://{user};auth=*@127.0.0.1:{dovecot.port}"
    target = f"mbox:{tmp_path}/spool/%u"
    started = time.time()
    for copied in (5, 0):
        done = migrate(tmp_path, "--from", url, "--to", target, "--password-file", str(secret))
        assert done.returncode == 0, done.stderr
        assert f"{copied} messages copied" in done.stderr, done.stderr
    got = storeListing(target, user)
    assert sorted((uid, str(size)) for uid, size, _ in got) == sorted(before)
    times = {uid: when for uid, _, when in got}
    served = [times[uid] for uid, _ in before]
    assert served[:3] == EXPECTED[:3]
    for made in served[3:]:  # none given, or in the future: just before the migration
        assert started - 60 < made <= time.time()
    assert served[3] < served[4]  # made-up times keep the order
