"""
LMTP end to end: a real twistd popserv with --lmtp on a Unix socket and on
tcp:0, Python's smtplib.LMTP delivering, poplib fetching what was delivered.
"""

from __future__ import annotations

import os
import poplib
import re
import smtplib
import socket
import time

import pytest

from support import ServerProcess

USERS = {
    "alice@example.org": "{PLAIN}wonderland",
    "bob@example.org": "{PLAIN}builder",
    "quota@example.org": "{PLAIN}q::::::quota_bytes=1000 quota_messages=2",
    "broken@example.org": "{PLAIN}b",
}

MESSAGE = (
    b"From: s@example.net\r\nSubject: dots\r\n\r\n"
    b".starts with a dot\r\n..two dots\r\n.\r\nnot the end above\r\n"
    b"8-bit: \xc3\xa9t\xc3\xa9\r\n" + b"long " * 400 + b"\r\nlast line\r\n"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmtp")
    sock = root / "lmtp.sock"
    srv = ServerProcess(
        root,
        USERS,
        extra=(
            f'lmtp = ["unix:{sock}", "tcp:0:interface=127.0.0.1"]\n'
            'lmtp_max_size = 100000\nplaintext_auth = "always"\n'
        ),
    )
    broken = srv.maildir("broken@example.org").parent
    broken.parent.mkdir(parents=True)
    broken.write_text("a file where a directory should be: the store cannot deliver")
    srv.start()
    srv.waitForLog("LMTPFactory starting on")
    srv.lmtpSocket = str(sock)
    srv.lmtpPort = int(re.search(r"LMTPFactory starting on (\d+)", srv.log).group(1))
    yield srv
    srv.stop()


def lmtp(server, unix: bool = True) -> smtplib.LMTP:
    if unix:
        client = smtplib.LMTP(server.lmtpSocket)
    else:
        client = smtplib.LMTP("127.0.0.1", server.lmtpPort)
    code, _ = client.ehlo("mta.test")  # LMTP's ehlo is LHLO
    assert code == 250
    return client


def transaction(client: smtplib.LMTP, recipients: list[str], message: bytes, **mail):
    """RCPT replies, then one reply per accepted recipient after DATA."""
    options = [f"{k}={v}" for k, v in mail.items()]
    assert client.mail("sender@example.net", options)[0] == 250
    rcpt = [client.rcpt(r) for r in recipients]
    accepted = [r for r, (code, _) in zip(recipients, rcpt, strict=True) if code == 250]
    if not accepted:
        return rcpt, []
    final = [client.data(message)]
    final += [client.getreply() for _ in accepted[1:]]
    return rcpt, final


def retrieve(server, user: str, password: str) -> list[bytes]:
    pop = poplib.POP3("127.0.0.1", server.port, timeout=10)
    pop.user(user)
    pop.pass_(password)
    messages = []
    for number in range(1, len(pop.list()[1]) + 1):
        lines = pop.retr(number)[1]
        messages.append(b"".join(line + b"\r\n" for line in lines))
    pop.quit()
    return messages


def test_delivery_over_unix_socket_fetched_byte_exact(server):
    client = lmtp(server)
    for extension in ("pipelining", "enhancedstatuscodes", "8bitmime", "size"):
        assert client.has_extn(extension)
    assert client.esmtp_features["size"] == "100000"
    rcpt, final = transaction(
        client,
        ["alice@example.org", "nobody@example.org", "bob@example.org"],
        MESSAGE,
        BODY="8BITMIME",
        SIZE=len(MESSAGE),
    )
    client.quit()
    assert [code for code, _ in rcpt] == [250, 550, 250]
    assert rcpt[1][1].startswith(b"5.1.1")
    assert final == [
        (250, b"2.0.0 <alice@example.org> Saved"),
        (250, b"2.0.0 <bob@example.org> Saved"),
    ]
    assert retrieve(server, "alice@example.org", "wonderland") == [MESSAGE]
    assert retrieve(server, "bob@example.org", "builder") == [MESSAGE]
    maildir = server.maildir("bob@example.org")
    [name] = os.listdir(maildir / "new")
    assert name.endswith(f",S={len(MESSAGE)},W={len(MESSAGE)}")
    assert os.listdir(maildir / "tmp") == []


def test_pipelining_over_tcp(server):
    with socket.create_connection(("127.0.0.1", server.lmtpPort), timeout=10) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"220 ")
        s.sendall(
            b"LHLO mta.test\r\nMAIL FROM:<s@example.net>\r\n"
            b"RCPT TO:<nobody@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
        )
        lines = [f.readline() for _ in range(9)]
        assert lines[4].startswith(b"250 SIZE")
        assert [line[:9] for line in lines[5:]] == [
            b"250 2.1.0",
            b"550 5.1.1",
            b"250 2.1.5",
            b"354 Start",
        ]
        s.sendall(b"Subject: piped\r\n\r\nbody\r\n.\r\nRSET\r\nQUIT\r\n")
        assert f.readline() == b"250 2.0.0 <bob@example.org> Saved\r\n"
        assert f.readline() == b"250 2.0.0 OK\r\n"
        assert f.readline().startswith(b"221 2.0.0")


def test_size_refused(server):
    client = lmtp(server, unix=False)
    code, text = client.mail("s@example.net", ["SIZE=200000"])
    assert (code, text[:5]) == (552, b"5.3.4")
    client.rset()
    rcpt, final = transaction(client, ["bob@example.org"], b"x" * 100001 + b"\r\n")
    assert final == [(552, b"5.3.4 Message size exceeds fixed maximum message size")]
    client.quit()


def test_quotas(server):
    client = lmtp(server)
    rcpt, _ = transaction(client, ["quota@example.org"], b"", SIZE=1001)
    assert rcpt == [(552, b"5.2.2 Message is larger than the mailbox quota")]
    client.rset()
    for _ in range(2):
        rcpt, final = transaction(client, ["quota@example.org"], b"Subject: q\r\n\r\nq\r\n")
        assert final[0][0] == 250, final
    rcpt, _ = transaction(client, ["quota@example.org"], b"")
    assert rcpt == [(452, b"4.2.2 Mailbox full, try again later")]
    client.quit()


def test_store_down_is_temporary(server):
    client = lmtp(server)
    rcpt, final = transaction(
        client, ["broken@example.org", "alice@example.org"], b"Subject: t\r\n\r\nt\r\n"
    )
    client.quit()
    assert [code for code, _ in rcpt] == [250, 250]
    assert final[0] == (451, b"4.3.0 Temporary failure, try again later")
    assert final[1][0] == 250
    deadline = time.time() + 5
    while "LMTP delivery to broken@example.org failed" not in server.log:
        assert time.time() < deadline, server.log
        time.sleep(0.05)


def test_workers_share_the_lmtp_listeners(tmp_path):
    """`popserv serve --workers 2`: both LMTP listeners are bound once and shared."""
    from test_workers import Workers

    sock = tmp_path / "lmtp.sock"
    w = Workers(
        tmp_path,
        {"alice@example.org": "{PLAIN}wonderland"},
        count=2,
        extra=f'lmtp = ["unix:{sock}", "tcp:0:interface=127.0.0.1"]\nplaintext_auth = "always"\n',
    )
    try:
        output = "".join(w.lines)
        port = int(re.search(r"popserv: lmtp on [\d.]+:(\d+)", output).group(1))
        assert f"popserv: lmtp on {sock}" in output
        clients = [smtplib.LMTP(str(sock)) for _ in range(3)]
        clients += [smtplib.LMTP("127.0.0.1", port) for _ in range(3)]
        for n, client in enumerate(clients):
            client.ehlo("mta.test")
            _, final = transaction(client, ["alice@example.org"], b"Subject: %d\r\n\r\n" % n)
            assert final == [(250, b"2.0.0 <alice@example.org> Saved")]
            client.quit()
        w.server.port = w.port
        assert len(retrieve(w.server, "alice@example.org", "wonderland")) == 6
    finally:
        w.stop()
