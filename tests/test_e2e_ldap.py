"""
End to end: C{twistd popserv} with a passwd-file chained before
C{--passdb ldap:URL} on a real slapd (tests/slapd.py) reached with StartTLS
verified against the test CA, bound as a search DN whose password is in a
file. poplib and mpop log in; LMTP asks the directory about recipients;
the directory goes away and comes back; check-config reports it; and no
password reaches the log.
"""

from __future__ import annotations

import os
import poplib
import smtplib
import subprocess
import sys
import textwrap

import pytest
from slapd import PEOPLE, READER_DN, READER_PASSWORD, USERS
from test_e2e_pgsql import eventually

from support import REPO, ServerProcess, deliver, have

FILTER = "(%7C(uid=%u)(mail=%u))"
ATTRS = "mail=user,employeeNumber=login_delay,employeeType=nologin"


def ldapConfig(slapd, root, bindPassword=READER_PASSWORD) -> str:
    (root / "bindpw").write_text(bindPassword + "\n")
    return (
        f'passdb = ["ldap:{slapd.url}/{PEOPLE}?{ATTRS}?sub?{FILTER}?!StartTLS"]\n'
        f'ldap_bind_dn = "{READER_DN}"\n'
        'ldap_bind_password_file = "bindpw"\n'
        f'ldap_ca = "{slapd.ca}"\n'
    )


@pytest.fixture
def ldapserver(tmp_path, slapd):
    """zoe in the passwd-file, everyone else in the directory; an LMTP listener."""
    sock = tmp_path / "lmtp.sock"
    server = ServerProcess(
        tmp_path,
        {"zoe": "{PLAIN}zoe-file", "carol": "{PLAIN}carol-in-the-file"},
        extra=ldapConfig(slapd, tmp_path) + f'lmtp = ["unix:{sock}"]\n',
    )
    server.lmtpSocket = str(sock)
    server.start()
    server.waitForLog("LMTPFactory starting on")
    yield server
    server.stop()
    assert "Traceback" not in server.log, server.log
    # No password, the users' or the bind DN's, in any log line.
    secrets = [READER_PASSWORD, "wrong-Password-77"]
    secrets += [p for p, _, _ in USERS.values() if p]
    for secret in secrets:
        assert secret not in server.log, secret


def login(server, user="alice", password="wonderland"):
    pop = poplib.POP3("127.0.0.1", server.port, timeout=10)
    pop.user(user)
    pop.pass_(password)
    return pop


def refusal(server, user, password):
    with pytest.raises(poplib.error_proto) as refused:
        login(server, user, password)
    return refused.value.args[0]


def test_logins_through_the_chain(ldapserver):
    deliver(ldapserver.maildir("alice@example.org"), b"Subject: one\r\n\r\nbody\r\n")
    pop = login(ldapserver)  # bound as uid=alice; canonical name from mail
    assert pop.stat()[0] == 1
    assert b"Subject: one" in b"\r\n".join(pop.retr(1)[1])
    pop.quit()
    login(ldapserver, "alice@example.org").quit()  # the filter's other half
    login(ldapserver, "zoe", "zoe-file").quit()  # the passwd-file, asked first
    # carol's password in the file is not the one given: the directory's is.
    login(ldapserver, "carol", "c4rol-argon").quit()
    assert refusal(ldapserver, "alice", "wrong-Password-77").startswith(b"-ERR [AUTH]")
    assert refusal(ldapserver, "nobody", "wrong-Password-77").startswith(b"-ERR [AUTH]")
    assert refusal(ldapserver, "*", "wonderland").startswith(b"-ERR [AUTH]")
    assert refusal(ldapserver, "erin", "erin-pw").startswith(b"-ERR [SYS/PERM]")
    pop = login(ldapserver, "bob", "builder")
    assert pop.capa().get("LOGIN-DELAY") == ["45"]  # from employeeNumber
    pop.quit()


def test_lmtp_asks_the_directory_about_recipients(ldapserver):
    client = smtplib.LMTP(ldapserver.lmtpSocket)
    client.ehlo("mta.test")
    client.mail("sender@example.org")
    code, text = client.rcpt("nobody@example.org")
    assert code == 550 and text.startswith(b"5.1.1")
    assert client.rcpt("dave@example.org")[0] == 250
    client.data(b"Subject: hi\r\n\r\nhello\r\n")
    client.quit()
    pop = eventually(lambda: login(ldapserver, "dave", "d4ve-crypt"))
    assert pop.stat()[0] == 1
    pop.quit()


@pytest.mark.skipif(not have("mpop") and not os.environ.get("CI"), reason="mpop is not installed")
def test_mpop_logs_in(ldapserver, tmp_path):
    deliver(ldapserver.maildir("bob@example.org"), b"Subject: for mpop\r\n\r\nhello\r\n")
    out = tmp_path / "out"
    for sub in ("tmp", "new", "cur"):
        (out / sub).mkdir(parents=True)
    conf = tmp_path / "mpoprc"
    conf.write_text(
        textwrap.dedent(f"""\
            account bob
            host 127.0.0.1
            port {ldapserver.port}
            user bob
            password builder
            tls off
            auth user
            delivery maildir {out}
            keep on
            uidls_file {tmp_path / "uidls"}
            timeout 30
            """)
    )
    conf.chmod(0o600)
    proc = subprocess.run(
        ["mpop", "-C", str(conf), "bob"],
        capture_output=True,
        timeout=60,
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = list((out / "new").iterdir())
    assert len(got) == 1 and b"Subject: for mpop" in got[0].read_bytes()


def test_directory_down_then_back(ldapserver, slapd):
    login(ldapserver).quit()
    slapd.stop()
    try:
        assert refusal(ldapserver, "alice", "wonderland").startswith(b"-ERR [SYS/TEMP]")
        # The passwd-file's users are unaffected.
        login(ldapserver, "zoe", "zoe-file").quit()
        client = smtplib.LMTP(ldapserver.lmtpSocket)
        client.ehlo("mta.test")
        client.mail("sender@example.org")
        assert client.rcpt("alice@example.org")[0] == 451
        client.quit()
    finally:
        slapd.start()
    eventually(lambda: login(ldapserver), timeout=15).quit()  # no restart of popserv


def checkConfig(config):
    return subprocess.run(
        [sys.executable, "-m", "popserv", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )


def test_check_config_reports_the_directory(tmp_path, slapd):
    server = ServerProcess(tmp_path, {"zoe": "{PLAIN}z"}, extra=ldapConfig(slapd, tmp_path))
    proc = checkConfig(server.config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "reachable" in proc.stdout
    ldapConfig(slapd, tmp_path, bindPassword="wrong-Password-77")
    proc = checkConfig(server.config)
    assert proc.returncode != 0
    assert "invalidCredentials" in proc.stdout
    assert "wrong-Password-77" not in proc.stdout + proc.stderr


def test_proxy_routing_from_directory_attributes(tmp_path, slapd):
    """
    The proxy mode routed by directory attributes (issue 16: routing "in the
    passwd-file, SQL or LDAP"): erin's entry says proxy=y with her own host
    and port, so she is relayed there; alice's says nothing, and she is
    served here.
    """
    import ldap3
    from slapd import ADMIN_DN, ADMIN_PASSWORD

    message = b"Subject: on the backend\r\n\r\nbody\r\n"
    backend = ServerProcess(tmp_path / "backend", {"erin@example.org": "{PLAIN}erin-pw"})
    deliver(backend.maildir("erin@example.org"), message)
    backend.start()
    with ldap3.Connection(
        ldap3.Server("127.0.0.1", slapd.port), ADMIN_DN, ADMIN_PASSWORD, auto_bind=True
    ) as admin:
        changes = {
            "roomNumber": [(ldap3.MODIFY_REPLACE, ["127.0.0.1"])],
            "carLicense": [(ldap3.MODIFY_REPLACE, [str(backend.port)])],
            "title": [(ldap3.MODIFY_REPLACE, ["y"])],
        }
        assert admin.modify(f"uid=erin,{PEOPLE}", changes), admin.result
    front = tmp_path / "front"
    front.mkdir()
    routing = "mail=user,title=proxy,roomNumber=host,carLicense=port"
    proxy = ServerProcess(front, {}, extra=ldapConfig(slapd, front).replace(ATTRS, routing))
    proxy.start()
    try:
        client = poplib.POP3("127.0.0.1", proxy.port, timeout=30)
        client.user("erin")
        client.pass_(USERS["erin"][0])
        assert client.stat() == (1, len(message))
        assert b"\r\n".join(client.retr(1)[1]) + b"\r\n" == message
        client.quit()
        proxy.waitForLog(f"backend=127.0.0.1:{backend.port}")
        client = poplib.POP3("127.0.0.1", proxy.port, timeout=30)
        client.user("alice")
        client.pass_(USERS["alice"][0])
        assert client.stat() == (0, 0)  # her own, local maildrop
        client.quit()
    finally:
        proxy.stop()
        backend.stop()
