"""
End to end with real POP3 clients (curl, fetchmail, mpop) against a popserv process on
127.0.0.1 (the `server` fixture: twistd plugin, Maildir, users with {PLAIN} passwords).

The server stores messages with LF (or CRLF) line endings and sends them with CRLF, byte-
stuffing lines that start with "."; a message without a final newline gets a CRLF appended
on the wire, and that CRLF is counted in the LIST/RETR sizes (see `wire`). Each client undoes
the stuffing; curl prints the wire form as is (CRLF), fetchmail and mpop deliver with LF
line endings (see `local`) and prepend a Received: header of their own, which the
comparisons split off. No TLS here (the clients are told not to try STLS), and no SASL
either: each client is pinned to APOP or USER/PASS, whatever else CAPA offers.
"""

from __future__ import annotations

import os
import re
import subprocess
import textwrap
from pathlib import Path

import pytest

from clients import local, output, split_received, wire
from support import have

TIMEOUT = 60
USER, PASSWORD = "alice", "wonderland"

# The test messages, keyed by their Maildir file name (which is also their UIDL).
DOTS = (
    b"From: dots@example.org\nTo: alice@test.invalid\nSubject: dots\n\n"
    b".leading dot\n..two dots\n.\n. dot space\nend\n"
)
UTF8 = (
    b"From: utf8@example.org\nTo: alice@test.invalid\nSubject: 8bit\nMIME-Version: 1.0\n"
    b"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
    b"Gr\xc3\xbc\xc3\x9fe, caf\xc3\xa9, \xe2\x82\xac 5, \xf0\x9f\x93\xac\n"
    b"From here on an mbox would have to quote this line\n"
)
NOEOL = (
    b"From: noeol@example.org\nTo: alice@test.invalid\nSubject: no final newline\n\n"
    b"first line\n.last line, dotted, without a newline"
)
CRLF = (
    b"From: crlf@example.org\r\nTo: alice@test.invalid\r\nSubject: stored with CRLF\r\n\r\n"
    b".dot on a CRLF line\r\n.\r\nbody\r\n"
)
MESSAGES = {
    "1700000001.M1P1.e2e": DOTS,
    "1700000002.M2P1.e2e": UTF8,
    "1700000003.M3P1.e2e": NOEOL,
    "1700000004.M4P1.e2e": CRLF,
}
# Not a proper RFC 5322 message (no header), so only for curl, which does not parse it:
# the very first line needs byte-stuffing too, and "..x" tells a stuffing server from a
# non-stuffing one (curl strips one dot from "..x" and passes ".x" through as it is).
FIRSTDOT_NAME = "1700000000.M0P1.e2e"
FIRSTDOT = b"..first line, two dots\n.\nno header at all\n"
LATE_NAME = "1700000005.M5P1.e2e"
LATE = b"From: late@example.org\nTo: alice@test.invalid\nSubject: late\n\n.arrived later\n"


def deliver_all(server) -> None:
    for name, message in MESSAGES.items():
        server.deliver(USER, message, name=name)


def on_server(server) -> list[bytes]:
    """The contents of all messages in alice's Maildir (new/ and cur/), sorted."""
    md = server.maildir(USER)
    return sorted(p.read_bytes() for sub in ("new", "cur") for p in (md / sub).iterdir())


def run(cmd: list[str], home: Path) -> subprocess.CompletedProcess[bytes]:
    """Run a client with HOME in the test's tmp dir (no ~/.netrc, ~/.fetchids etc.)."""
    env = dict(os.environ, HOME=str(home), FETCHMAILHOME=str(home), LC_ALL="C")
    for proxy in ("all_proxy", "ALL_PROXY", "pop3_proxy", "POP3_PROXY"):
        env.pop(proxy, None)
    return subprocess.run(cmd, capture_output=True, timeout=TIMEOUT, env=env, cwd=home)


@pytest.fixture(autouse=True)
def _server_log_clean(server):
    """Whatever the clients did, the server must not have logged a traceback."""
    yield
    assert "Traceback" not in server.log and "Unhandled" not in server.log, server.log


# -- curl ------------------------------------------------------------------------------------


def curl(
    server, path: str = "", *args: str, user: str = USER, password: str = PASSWORD, tmp: Path
):
    """
    curl -v with APOP forced (`--login-options AUTH=+APOP`): left to itself curl prefers
    SASL when CAPA offers it, then APOP; it has no way to ask for USER/PASS.
    """
    url = f"pop3://{user}:{password}@127.0.0.1:{server.port}/{path}"
    cmd = ["curl", "-sS", "-v", "--max-time", "30", "--noproxy", "*"]
    return run([*cmd, "--login-options", "AUTH=+APOP", *args, url], tmp)


@pytest.mark.skipif(not have("curl"), reason="curl is not installed")
def test_curl_list_uidl_retr_byte_exact(server, tmp_path):
    """
    curl with APOP: LIST sizes are the CRLF wire sizes, UIDL gives the Maildir
    names, and `curl pop3://.../N` prints message N exactly as sent: CRLF endings,
    dot-unstuffed (".", "..x", ".x" lines, also as the very first line, come back as
    stored), the terminating "." line removed but the last line's CRLF kept, and a CRLF
    appended to the message that has no final newline. A nonexistent message fails.
    (curl is lenient: it passes an unstuffed ".x" through and only sees the terminator at
    the end of a read, so the "..x" lines are what proves the server stuffs.)
    """
    deliver_all(server)
    server.deliver(USER, FIRSTDOT, name=FIRSTDOT_NAME)
    messages = {**MESSAGES, FIRSTDOT_NAME: FIRSTDOT}
    names = sorted(messages)

    listing = curl(server, tmp=tmp_path)
    assert listing.returncode == 0, output(listing)
    assert "> APOP alice " in listing.stderr.decode(), output(listing)
    assert listing.stdout.endswith(b"\r\n")
    sizes = dict(line.split() for line in listing.stdout.decode().splitlines())

    uidl = curl(server, "", "-X", "UIDL", tmp=tmp_path)
    assert uidl.returncode == 0, output(uidl)
    uids = dict(line.split() for line in uidl.stdout.decode().splitlines())
    assert sorted(uids.values()) == names
    assert sorted(sizes) == sorted(uids) == [str(n) for n in range(1, len(names) + 1)]

    for number, uid in uids.items():
        assert int(sizes[number]) == len(wire(messages[uid])), uid
        retr = curl(server, number, tmp=tmp_path)
        assert retr.returncode == 0, output(retr)
        assert f"> RETR {number}" in retr.stderr.decode()
        assert retr.stdout == wire(messages[uid]), uid

    missing = curl(server, str(len(names) + 1), tmp=tmp_path)
    assert missing.returncode != 0, output(missing)
    assert missing.stdout == b""
    assert "< -ERR" in missing.stderr.decode(), output(missing)
    # curl never sent DELE: everything is still there.
    assert on_server(server) == sorted(messages.values())


@pytest.mark.skipif(not have("curl"), reason="curl is not installed")
def test_curl_wrong_password_or_user_fails(server, tmp_path):
    """
    A wrong password and an unknown user both make curl (APOP) fail with exit code 67
    (CURLE_LOGIN_DENIED) after `-ERR [AUTH]`, without output; the right one then works.
    """
    deliver_all(server)
    for user, password in ((USER, "wrong"), ("nobody", PASSWORD)):
        bad = curl(server, user=user, password=password, tmp=tmp_path)
        assert bad.returncode == 67, output(bad)
        assert bad.stdout == b""
        assert "< -ERR [AUTH]" in bad.stderr.decode(), output(bad)
    good = curl(server, tmp=tmp_path)
    assert good.returncode == 0, output(good)
    assert len(good.stdout.splitlines()) == len(MESSAGES)


@pytest.mark.skipif(not have("curl"), reason="curl is not installed")
def test_curl_dele(server, tmp_path):
    """
    `curl -X DELE -I pop3://.../2` sends DELE 2 and then QUIT (when it closes the connection;
    `-v` does not show that QUIT): exactly message 2 is removed from the Maildir.
    """
    deliver_all(server)
    dele = curl(server, "2", "-X", "DELE", "-I", tmp=tmp_path)
    assert dele.returncode == 0, output(dele)
    assert "> DELE 2" in dele.stderr.decode(), output(dele)
    assert "< +OK" in dele.stderr.decode().split("> DELE 2", 1)[1], output(dele)
    expected = dict(MESSAGES)
    del expected["1700000002.M2P1.e2e"]
    assert on_server(server) == sorted(expected.values())


# -- fetchmail -------------------------------------------------------------------------------


def fetchmail(server, tmp: Path, *options: str, protocol: str = "pop3"):
    """
    One fetchmail run (no daemon). The password is in an rc file (mode 0600, else fetchmail
    refuses it); everything else is on the command line. `--sslproto ''` is required:
    fetchmail 6.4 otherwise sends STLS although CAPA does not offer it, and gives up
    ("upgrade to TLS failed", exit 2). `--norewrite` keeps the headers as they were.
    `--auth password` means USER/PASS (APOP with `--protocol apop`) even if CAPA offers
    SASL. Each message goes to the MDA, which writes it to its own file in tmp/out.
    """
    rc = tmp / "fetchmailrc"
    rc.write_text(f'poll 127.0.0.1 user "{USER}" password "{PASSWORD}"\n')
    rc.chmod(0o600)
    out = tmp / "out"
    out.mkdir(exist_ok=True)
    assert "'" not in str(out)
    mda = f"sh -c 'cat > \"$(mktemp {out}/msg.XXXXXX)\"'"
    cmd = [
        "fetchmail", "-f", str(rc), "--nosyslog", "--verbose", "--sslproto", "",
        "--pidfile", str(tmp / "fetchmail.pid"), "-i", str(tmp / "fetchids"),
        "--protocol", protocol, "--service", str(server.port), "--user", USER,
        "--auth", "password", "--norewrite", "--timeout", "30", "--mda", mda,
        *options, "127.0.0.1",
    ]  # fmt: skip
    return run(cmd, tmp)


def fetched(tmp: Path, client: bytes) -> dict[str, bytes]:
    """The delivered files, by name, with the client's Received: header removed."""
    return {p.name: split_received(p.read_bytes(), client) for p in (tmp / "out").iterdir()}


@pytest.mark.skipif(not have("fetchmail"), reason="fetchmail is not installed")
def test_fetchmail_keep(server, tmp_path):
    """
    fetchmail --keep (USER/PASS, RETR) delivers every message through the MDA with LF line
    endings, unstuffed, 8-bit intact, identical to the stored message apart from its
    Received: header; the server's Maildir still holds all of them afterwards.
    """
    deliver_all(server)
    proc = fetchmail(server, tmp_path, "--keep")
    log = output(proc)
    assert proc.returncode == 0, log
    assert "POP3> STLS" not in log
    assert "POP3> USER alice" in log and "POP3> RETR 4" in log, log
    assert sorted(fetched(tmp_path, b"fetchmail").values()) == sorted(
        local(m) for m in MESSAGES.values()
    )
    assert on_server(server) == sorted(MESSAGES.values())


@pytest.mark.skipif(not have("fetchmail"), reason="fetchmail is not installed")
@pytest.mark.parametrize("protocol", ["pop3", "apop"])
def test_fetchmail_uidl_incremental(server, tmp_path, protocol):
    """
    fetchmail --keep --uidl with an id file (USER/PASS, or APOP with --protocol apop; with
    --uidl fetchmail reads messages with `TOP n 99999999`, not RETR): the first run fetches
    all messages and records their UIDLs; after one more delivery the second run fetches
    only that message; a third run finds no mail (exit 1). The server keeps everything.
    """
    deliver_all(server)
    first = fetchmail(server, tmp_path, "--keep", "--uidl", protocol=protocol)
    log = output(first)
    assert first.returncode == 0, log
    assert ("POP3> APOP alice " if protocol == "apop" else "POP3> USER alice") in log, log
    assert sorted(fetched(tmp_path, b"fetchmail").values()) == sorted(
        local(m) for m in MESSAGES.values()
    )
    ids = (tmp_path / "fetchids").read_text().split()
    assert set(MESSAGES) <= set(ids)
    before = set(fetched(tmp_path, b"fetchmail"))

    server.deliver(USER, LATE, name=LATE_NAME)
    second = fetchmail(server, tmp_path, "--keep", "--uidl", protocol=protocol)
    log = output(second)
    assert second.returncode == 0, log
    assert "5 messages (4 seen)" in log, log
    after = fetched(tmp_path, b"fetchmail")
    assert [after[name] for name in set(after) - before] == [local(LATE)]
    assert LATE_NAME in (tmp_path / "fetchids").read_text().split()

    third = fetchmail(server, tmp_path, "--keep", "--uidl", protocol=protocol)
    assert third.returncode == 1, output(third)  # 1: no mail
    assert len(fetched(tmp_path, b"fetchmail")) == len(MESSAGES) + 1
    assert on_server(server) == sorted([*MESSAGES.values(), LATE])


@pytest.mark.skipif(not have("fetchmail"), reason="fetchmail is not installed")
def test_fetchmail_no_keep_deletes(server, tmp_path):
    """
    fetchmail without --keep fetches every message, DELEs it and QUITs: all messages are
    delivered intact and the server's Maildir is empty; a second run finds no mail.
    """
    deliver_all(server)
    proc = fetchmail(server, tmp_path)
    log = output(proc)
    assert proc.returncode == 0, log
    assert "POP3> DELE 4" in log and "POP3> QUIT" in log, log
    assert sorted(fetched(tmp_path, b"fetchmail").values()) == sorted(
        local(m) for m in MESSAGES.values()
    )
    assert on_server(server) == []
    again = fetchmail(server, tmp_path)
    assert again.returncode == 1, output(again)
    assert len(fetched(tmp_path, b"fetchmail")) == len(MESSAGES)


# -- mpop ------------------------------------------------------------------------------------


def mpop(server, tmp: Path, *, auth: str, delivery: str, keep: bool):
    """
    One mpop run (--debug shows the dialogue) with a config file (mode 0600) in tmp:
    `tls off` (no STLS attempt), the given `auth` method, delivery and keep setting, and
    the UIDL file in tmp. mpop pipelines (USER+PASS, the RETRs, the DELEs).
    """
    conf = tmp / "mpoprc"
    conf.write_text(
        textwrap.dedent(f"""\
            defaults
            timeout 30
            account alice
            host 127.0.0.1
            port {server.port}
            user {USER}
            password {PASSWORD}
            tls off
            auth {auth}
            delivery {delivery}
            keep {"on" if keep else "off"}
            uidls_file {tmp / "mpop-uidls"}
            """)
    )
    conf.chmod(0o600)
    return run(["mpop", "--debug", "-C", str(conf), "alice"], tmp)


def maildir_files(md: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for sub in ("new", "cur") for p in (md / sub).iterdir()}


@pytest.mark.skipif(not have("mpop"), reason="mpop is not installed")
def test_mpop_user_maildir_keep_uidl_then_delete(server, tmp_path):
    """
    mpop, `auth user`, delivery to a local Maildir (LF endings, Received: on top):
    keep on fetches all messages byte for byte and records their UIDLs; a second run fetches
    nothing; after one more delivery only that one is fetched; `keep off` then DELEs all
    (already seen ones without downloading them again) and the server's Maildir is empty.
    """
    deliver_all(server)
    dest = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (dest / sub).mkdir(parents=True)
    delivery = f"maildir {dest}"

    first = mpop(server, tmp_path, auth="user", delivery=delivery, keep=True)
    log = output(first)
    assert first.returncode == 0, log
    assert "--> USER alice" in log and "--> APOP" not in log, log
    assert "--> DELE" not in log
    got = {k: split_received(v, b"mpop") for k, v in maildir_files(dest).items()}
    assert sorted(got.values()) == sorted(local(m) for m in MESSAGES.values())
    assert set(MESSAGES) <= set((tmp_path / "mpop-uidls").read_text().split())
    assert on_server(server) == sorted(MESSAGES.values())

    second = mpop(server, tmp_path, auth="user", delivery=delivery, keep=True)
    assert second.returncode == 0, output(second)
    assert "new: no messages" in output(second), output(second)
    assert "--> RETR" not in output(second)
    assert set(maildir_files(dest)) == set(got)

    server.deliver(USER, LATE, name=LATE_NAME)
    third = mpop(server, tmp_path, auth="user", delivery=delivery, keep=True)
    assert third.returncode == 0, output(third)
    now = maildir_files(dest)
    assert [split_received(now[k], b"mpop") for k in set(now) - set(got)] == [local(LATE)]

    fourth = mpop(server, tmp_path, auth="user", delivery=delivery, keep=False)
    log = output(fourth)
    assert fourth.returncode == 0, log
    assert "--> RETR" not in log and "--> DELE 5" in log, log
    assert on_server(server) == []
    assert maildir_files(dest) == now


def mbox_messages(data: bytes) -> list[bytes]:
    """Split an mbox written by mpop (From_ lines, mboxrd >From quoting, blank separator)."""
    parts = re.split(rb"^From [^\n]*\n", data, flags=re.M)
    assert parts[0] == b"", data[:200]
    messages = []
    for part in parts[1:]:
        assert part.endswith(b"\n\n"), part[-100:]
        messages.append(re.sub(rb"^>(>*From )", rb"\1", part[:-1], flags=re.M))
    return messages


@pytest.mark.skipif(not have("mpop"), reason="mpop is not installed")
def test_mpop_apop_mbox_no_keep(server, tmp_path):
    """
    mpop, `auth apop`, delivery to an mbox, keep off: one run fetches and deletes all
    messages; the mbox holds each message intact (after removing the From_ line, mpop's
    Received: header and the >From quoting) and the server's Maildir is empty.
    """
    deliver_all(server)
    mbox = tmp_path / "mbox"
    proc = mpop(server, tmp_path, auth="apop", delivery=f"mbox {mbox}", keep=False)
    log = output(proc)
    assert proc.returncode == 0, log
    assert "--> APOP alice " in log and "--> USER" not in log, log
    assert "--> DELE 4" in log, log
    got = [split_received(m, b"mpop") for m in mbox_messages(mbox.read_bytes())]
    assert sorted(got) == sorted(local(m) for m in MESSAGES.values())
    assert b"\n>From here on" in mbox.read_bytes()
    assert on_server(server) == []

    again = mpop(server, tmp_path, auth="apop", delivery=f"mbox {mbox}", keep=False)
    assert again.returncode == 0, output(again)
    assert len(mbox_messages(mbox.read_bytes())) == len(MESSAGES)
