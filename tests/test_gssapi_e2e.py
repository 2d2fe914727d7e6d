"""
SASL GSSAPI end to end: a popserv process (twistd) with a keytab from the
throw-away MIT realm of tests/kdc.py, and real clients holding tickets of
that realm in their credential caches: mpop (`auth gssapi`, GNU SASL) and
curl (`AUTH=GSSAPI`, built with GSS-API on Debian). Neither knows a password.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import textwrap
from pathlib import Path

import pytest

from clients import local, split_received, wire
from support import ServerProcess, deliver, have

TIMEOUT = 30
MESSAGE = b"From: a@example.org\nSubject: ticket\n\nNo password crossed the wire.\n"


@pytest.fixture
def gssServer(kdc, tmp_path, monkeypatch):
    """popserv with GSSAPI over the realm's keytab; alice and master in its passwd-file."""
    for name, value in kdc.env.items():
        monkeypatch.setenv(name, value)  # the server process inherits the realm
    srv = ServerProcess(
        tmp_path / "server",
        {"alice": "{PLAIN}wonderland", "master": "{PLAIN}x"},
        extra=f'gssapi_keytab = "{kdc.keytab}"\nmaster_users = ["master"]\n',
    )
    srv.start()
    deliver(srv.maildir("alice"), MESSAGE)
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log and "Unhandled" not in srv.log, srv.log


def run(cmd: list[str], kdc, user: str, home: Path) -> subprocess.CompletedProcess[bytes]:
    env = {**kdc.clientEnv(user), "HOME": str(home), "LC_ALL": "C"}
    for proxy in ("all_proxy", "ALL_PROXY", "pop3_proxy", "POP3_PROXY"):
        env.pop(proxy, None)
    return subprocess.run(cmd, capture_output=True, timeout=TIMEOUT + 10, env=env, cwd=home)


def output(proc: subprocess.CompletedProcess[bytes]) -> str:
    return (proc.stdout + proc.stderr).decode("utf-8", "replace").replace("\r\n", "\n")


def mpop(srv: ServerProcess, kdc, tmp: Path, user: str, extra: str = ""):
    """mpop with `auth gssapi` to localhost (its ticket is for pop/localhost), no password."""
    dest = tmp / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    conf = tmp / "mpoprc"
    conf.write_text(
        textwrap.dedent(f"""\
            defaults
            timeout {TIMEOUT}
            account test
            host localhost
            port {srv.port}
            user {user}
            tls off
            auth gssapi
            delivery maildir {dest}
            keep on
            uidls_file {tmp / "mpop-uidls"}
            """)
        + extra
    )
    conf.chmod(0o600)
    return run(["mpop", "--debug", "-C", str(conf), "test"], kdc, user, tmp)


def clientLines(debugOutput: str) -> list[str]:
    """What a client's debug output says it sent (mpop: "--> ", curl: "> ")."""
    return re.findall(r"^(?:-->|>) (.+)$", debugOutput, re.M)


@pytest.mark.skipif(not have("mpop") and not os.environ.get("CI"), reason="no mpop")
def test_mpop_logs_in_with_a_ticket(gssServer, kdc, tmp_path):
    """
    CAPA lists GSSAPI; mpop (GNU SASL) runs the whole RFC 4752 exchange and
    retrieves the message byte-exact. The ticket it sent is in no log line.
    """
    proc = mpop(gssServer, kdc, tmp_path, "alice")
    text = output(proc)
    assert proc.returncode == 0, text
    assert re.search(r"^<-- SASL .*\bGSSAPI\b", text, re.M), text
    assert "--> AUTH GSSAPI" in text, text
    dest = tmp_path / "Maildir"
    delivered = [
        split_received(p.read_bytes(), b"mpop")
        for sub in ("new", "cur")
        for p in (dest / sub).iterdir()
    ]
    assert delivered == [local(MESSAGE)]
    tokens = [line for line in clientLines(text) if len(line) > 40]
    assert tokens, text  # the AP-REQ and the wrapped choice
    for token in tokens:
        assert token not in gssServer.log
        assert base64.b64decode(token)[:16].hex() not in gssServer.log


@pytest.mark.skipif(not have("mpop") and not os.environ.get("CI"), reason="no mpop")
def test_mpop_user_unknown_to_the_auth_source_is_refused(gssServer, kdc, tmp_path):
    """carol holds a valid ticket of the realm, but no passwd-file knows her."""
    proc = mpop(gssServer, kdc, tmp_path, "carol")
    text = output(proc)
    assert proc.returncode != 0, text
    assert "-ERR [AUTH]" in text, text


@pytest.mark.skipif(not have("curl") and not os.environ.get("CI"), reason="no curl")
def test_curl_logs_in_with_a_ticket(gssServer, kdc, tmp_path):
    """
    curl's own RFC 4752 client (libcurl with GSS-API): RETR 1 over AUTH=GSSAPI.
    curl picks GSSAPI only for a user name with a realm (user@REALM); it sends
    no authorization id, so the ticket's principal is who logs in.
    """
    features = subprocess.run(["curl", "-V"], capture_output=True, text=True).stdout
    if "GSS-API" not in features and "Kerberos" not in features:
        pytest.skip("this curl is built without GSS-API")
    url = f"pop3://localhost:{gssServer.port}/1"
    cmd = ["curl", "-sS", "-v", "--max-time", str(TIMEOUT), "--noproxy", "*"]
    cmd += ["--login-options", "AUTH=GSSAPI", "-u", "alice@KRBTEST.COM:", url]
    proc = run(cmd, kdc, "alice", tmp_path)
    text = output(proc)
    assert proc.returncode == 0, text
    assert "> AUTH GSSAPI" in text, text
    assert proc.stdout == wire(MESSAGE)


@pytest.mark.skipif(not have("curl") and not os.environ.get("CI"), reason="no curl")
def test_curl_differing_authzid_is_refused_unless_master(gssServer, kdc, tmp_path):
    """curl --sasl-authzid: alice may not act as master; master may act as alice."""
    url = f"pop3://localhost:{gssServer.port}/1"
    cmd = ["curl", "-sS", "-v", "--max-time", str(TIMEOUT), "--noproxy", "*"]
    cmd += ["--login-options", "AUTH=GSSAPI"]
    alice = [*cmd, "-u", "alice@KRBTEST.COM:", "--sasl-authzid", "master", url]
    proc = run(alice, kdc, "alice", tmp_path)
    assert proc.returncode != 0
    assert "-ERR [AUTH]" in output(proc), output(proc)
    master = [*cmd, "-u", "master@KRBTEST.COM:", "--sasl-authzid", "alice", url]
    proc = run(master, kdc, "master", tmp_path)
    assert proc.returncode == 0, output(proc)
    assert proc.stdout == wire(MESSAGE)
