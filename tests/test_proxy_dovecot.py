"""
The proxy in front of a real Dovecot (Debian's dovecot-pop3d, started by the
test), with real clients at the front: fetchmail and mpop (USER/PASS,
forwarded) and curl (SASL PLAIN), in both login modes and with STLS to
Dovecot verified against --proxy-ca. Skipped without Dovecot on a developer
machine; a failure in CI.
"""

from __future__ import annotations

import os
import poplib
import subprocess
import textwrap
from pathlib import Path

import pytest
from dovecot import startDovecot

from tests.support import ServerProcess, have, makeTestPKI

MESSAGE = b"Subject: via dovecot\r\n\r\nfrom the backend\r\n"


@pytest.fixture(scope="module")
def dovecot(tmp_path_factory):
    """The proxy's own Dovecot (tests/dovecot.py): its passwords, master user and STLS."""
    pki = makeTestPKI(tmp_path_factory.mktemp("dovecot") / "pki")
    server = startDovecot(
        {"alice": {}, "bob": {}},
        passwords={"alice": "secret", "bob": "bobpw"},
        masters={"proxymaster": "masterpw"},
        cert=pki["cert"],
        key=pki["key"],
        # No auth penalty for the proxy's address (Dovecot's advice behind a proxy).
        extra="login_trusted_networks = 127.0.0.0/8\n",
    )
    server.pki = pki
    server.deliver("alice", "1.via-dovecot", MESSAGE)
    server.deliver("bob", "1.via-dovecot", MESSAGE)
    yield server
    server.stop()


def _run(cmd: list[str], tmp: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        cmd, cwd=tmp, capture_output=True, timeout=60, env={**os.environ, "HOME": str(tmp)}
    )


@pytest.fixture
def forwarding(tmp_path, dovecot):
    """A proxy forwarding USER/PASS and PLAIN to Dovecot over STLS (verified)."""
    proxy = ServerProcess(
        tmp_path / "proxy",
        {
            "alice": f"{{PLAIN}}secret:::::: proxy=y host=localhost port={dovecot.port} "
            "starttls=y",
        },
        extra=f'proxy_ca = "{dovecot.pki["ca"]}"\n',
    ).start()
    yield proxy
    proxy.stop()


@pytest.mark.skipif(
    not have("fetchmail") and not os.environ.get("CI"), reason="fetchmail is not installed"
)
def test_fetchmail_through_the_proxy_to_dovecot(tmp_path, forwarding, dovecot):
    rc = tmp_path / "fetchmailrc"
    rc.write_text('poll 127.0.0.1 user "alice" password "secret"\n')
    rc.chmod(0o600)
    out = tmp_path / "out"
    out.mkdir()
    mda = f"sh -c 'cat > \"$(mktemp {out}/msg.XXXXXX)\"'"
    proc = _run(
        [
            "fetchmail",
            "-f",
            str(rc),
            "--nosyslog",
            "--verbose",
            "--sslproto",
            "",
            "--pidfile",
            str(tmp_path / "fm.pid"),
            "-i",
            str(tmp_path / "ids"),
            "--protocol",
            "pop3",
            "--service",
            str(forwarding.port),
            "--user",
            "alice",
            "--auth",
            "password",
            "--norewrite",
            "--keep",
            "--timeout",
            "30",
            "--mda",
            mda,
            "127.0.0.1",
        ],  # fmt: skip
        tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [got] = [p.read_bytes() for p in out.iterdir()]
    assert got.endswith(MESSAGE.replace(b"\r\n", b"\n"))  # after fetchmail's Received:
    forwarding.waitForLog("user=alice ip=127.0.0.1 tls=no mechanism=USER")
    assert f"backend=localhost:{dovecot.port}" in forwarding.waitForLog("backend=")
    assert "Login: user=<alice>, method=PLAIN" in dovecot.log()


@pytest.mark.skipif(not have("mpop") and not os.environ.get("CI"), reason="mpop is not installed")
def test_mpop_through_the_proxy_to_dovecot(tmp_path, forwarding):
    conf = tmp_path / "mpoprc"
    conf.write_text(
        textwrap.dedent(f"""\
            defaults
            timeout 30
            account alice
            host 127.0.0.1
            port {forwarding.port}
            user alice
            password secret
            tls off
            auth user
            delivery mbox {tmp_path / "mbox"}
            keep on
            uidls_file {tmp_path / "uidls"}
            """)
    )
    conf.chmod(0o600)
    proc = _run(["mpop", "--debug", "-C", str(conf), "alice"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert b"from the backend" in (tmp_path / "mbox").read_bytes()


@pytest.mark.skipif(not have("curl") and not os.environ.get("CI"), reason="curl is not installed")
def test_curl_sasl_plain_through_the_proxy_to_dovecot(tmp_path, forwarding):
    proc = _run(
        [
            "curl",
            "-sS",
            "--max-time",
            "30",
            "--noproxy",
            "*",
            "--login-options",
            "AUTH=PLAIN",
            f"pop3://alice:secret@127.0.0.1:{forwarding.port}/1",
        ],  # fmt: skip
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == MESSAGE


def test_master_user_mode_to_dovecot(tmp_path, dovecot):
    """APOP at the front (no password to forward); the proxy logs in as Dovecot's master."""
    (tmp_path / "master.pw").write_text("masterpw\n")
    proxy = ServerProcess(
        tmp_path / "proxy",
        {"bob": "{PLAIN}frontpw"},
        extra=(
            f'proxy_backend = ["pop://;AUTH=PLAIN@127.0.0.1:{dovecot.port}"]\n'
            'proxy_master_user = "proxymaster"\n'
            f'proxy_master_password_file = "{tmp_path / "master.pw"}"\n'
        ),
    ).start()
    try:
        client = poplib.POP3("127.0.0.1", proxy.port, timeout=30)
        client.apop("bob", "frontpw")
        assert client.stat() == (1, len(MESSAGE))
        assert b"\r\n".join(client.retr(1)[1]) + b"\r\n" == MESSAGE
        client.quit()
        assert "Login: user=<bob>, method=PLAIN" in dovecot.log()
    finally:
        proxy.stop()


def test_wrong_master_password_is_sys_temp(tmp_path, dovecot):
    (tmp_path / "master.pw").write_text("nope\n")
    proxy = ServerProcess(
        tmp_path / "proxy",
        {"bob": "{PLAIN}frontpw"},
        extra=(
            f'proxy_backend = ["pop://127.0.0.1:{dovecot.port}"]\n'
            'proxy_master_user = "proxymaster"\n'
            f'proxy_master_password_file = "{tmp_path / "master.pw"}"\n'
        ),
    ).start()
    try:
        client = poplib.POP3("127.0.0.1", proxy.port, timeout=30)
        client.user("bob")
        with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
            client.pass_("frontpw")
    finally:
        proxy.stop()


def test_dovecot_checks_the_password_of_a_nopassword_user(tmp_path, dovecot):
    """The front reads only the name (nopassword=y proxy=y); Dovecot checks the password."""
    proxy = ServerProcess(
        tmp_path / "proxy",
        {"alice": f":::::: nopassword=y proxy=y host=127.0.0.1 port={dovecot.port}"},
    ).start()
    try:
        client = poplib.POP3("127.0.0.1", proxy.port, timeout=30)
        client.user("alice")
        with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\]"):
            client.pass_("not-alices")
        client.user("alice")
        client.pass_("secret")
        assert client.stat() == (1, len(MESSAGE))
        client.quit()
    finally:
        proxy.stop()
