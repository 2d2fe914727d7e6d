"""
Postfix delivering through popserv's LMTP listener, as the documentation
says to set it up: a private Postfix instance (`postfix -c DIR`, every
service unchrooted) takes mail over SMTP on 127.0.0.1 and hands it to
popserv with `virtual_transport = lmtp:unix:...`; POP3 fetches it.
"""

from __future__ import annotations

import os
import poplib
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from support import ServerProcess, have

POSTFIX = "/usr/sbin/postfix"


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def masterCf(port: int) -> str:
    """Debian's services, none chrooted, smtpd on 127.0.0.1:PORT only."""
    lines = []
    for line in Path("/etc/postfix/master.cf").read_text().splitlines():
        fields = line.split()
        if line[:1] not in ("", "#", " ", "\t") and len(fields) >= 8:
            if fields[0] == "smtp" and fields[1] == "inet":
                fields[0] = f"127.0.0.1:{port}"
            fields[4] = "n"
            line = " ".join(fields)
        lines.append(line)
    return "\n".join(lines) + "\n"


def mainCf(directory: Path, lmtpSocket: str) -> str:
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
mydestination =
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
virtual_mailbox_domains = example.org
virtual_transport = lmtp:unix:{lmtpSocket}
"""


@pytest.fixture(scope="module")
def postfix():
    if not (os.path.exists(POSTFIX) and have("postconf")):
        if os.environ.get("CI"):
            pytest.fail("postfix is not installed (.ci/run installs it)")
        pytest.skip("postfix is not installed")
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("a private Postfix instance needs root (CI runs as root)")
        pytest.skip("a private Postfix instance needs root")
    # Postfix's daemons run as the user postfix: the socket's directories
    # must let it through, which pytest's own temporary directory does not.
    root = Path(tempfile.mkdtemp(prefix="popserv-postfix-"))
    root.chmod(0o755)
    config, mail, sock = root / "postfix", root / "popserv", root / "lmtp.sock"
    config.mkdir()
    mail.mkdir()
    (config / "queue").mkdir()  # root's; Postfix makes what is inside
    (config / "data").mkdir()
    shutil.chown(config / "data", "postfix")
    port = freePort()
    (config / "main.cf").write_text(mainCf(config, str(sock)))
    (config / "master.cf").write_text(masterCf(port))
    srv = ServerProcess(
        mail,
        {"alice@example.org": "{PLAIN}wonderland"},
        extra=f'lmtp = ["unix:{sock}:mode=666"]\nplaintext_auth = "always"\n',
    )
    srv.postfixLog = config / "maillog"
    srv.smtpPort = port
    try:
        srv.start()
        srv.waitForLog("LMTPFactory starting on")
        started = subprocess.run(
            [POSTFIX, "-c", str(config), "start"], capture_output=True, text=True, timeout=60
        )
        log = srv.postfixLog.read_text() if srv.postfixLog.exists() else "(see syslog)"
        assert started.returncode == 0, f"postfix: {started.stdout}{started.stderr}{log}"
        deadline = time.time() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline, "postfix's smtpd did not listen"
                time.sleep(0.1)
        yield srv
    finally:
        stopPostfix(config)
        srv.stop()
        shutil.rmtree(root, ignore_errors=True)


def stopPostfix(config: Path) -> None:
    """`postfix stop`, then wait for its master process (by its pid) to be gone."""
    try:
        pid = int((config / "queue" / "pid" / "master.pid").read_text())
    except (OSError, ValueError):
        return
    subprocess.run([POSTFIX, "-c", str(config), "stop"], capture_output=True, timeout=60)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


def waitFor(condition, what: str, log: Path, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            text = log.read_text() if log.exists() else "(no maillog)"
            raise AssertionError(f"{what} within {timeout} s; Postfix said:\n{text}")
        time.sleep(0.1)


def test_postfix_delivers_over_lmtp(postfix):
    message = (
        b"From: s@example.net\r\nTo: alice@example.org\r\nSubject: via postfix\r\n"
        b"Message-ID: <e2e@example.net>\r\n\r\n.a dotted line\r\n8-bit \xc3\xa9\r\n"
    )
    with smtplib.SMTP("127.0.0.1", postfix.smtpPort, timeout=20) as smtp:
        refused = smtp.sendmail(
            "s@example.net", ["alice@example.org", "nobody@example.org"], message
        )
    assert refused == {}  # Postfix takes both; popserv refuses one over LMTP
    new = postfix.maildir("alice@example.org") / "new"
    waitFor(lambda: new.is_dir() and os.listdir(new), "no delivery", postfix.postfixLog)
    waitFor(
        lambda: "status=bounced" in postfix.postfixLog.read_text(),
        "the unknown recipient was not bounced",
        postfix.postfixLog,
    )
    log = postfix.postfixLog.read_text()
    assert re.search(r"to=<nobody@example\.org>.*dsn=5\.1\.1, status=bounced", log), log
    assert re.search(r"to=<alice@example\.org>.*relay=.*status=sent", log), log

    pop = poplib.POP3("127.0.0.1", postfix.port, timeout=10)
    pop.user("alice@example.org")
    pop.pass_("wonderland")
    lines = pop.retr(1)[1]
    pop.quit()
    stored = b"".join(line + b"\r\n" for line in lines)
    # Postfix adds its trace headers in front; the message itself is intact.
    assert stored.startswith(b"Received: "), stored
    assert stored.endswith(b"\r\n\r\n.a dotted line\r\n8-bit \xc3\xa9\r\n"), stored
    assert b"Message-ID: <e2e@example.net>\r\n" in stored
