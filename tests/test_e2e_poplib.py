"""End to end over 127.0.0.1 with Python's poplib against the twistd plugin."""

import hashlib
import poplib

import pytest

MSG1 = b"From: a@example.org\nSubject: one\n\n.dotted line\nbody\n"
MSG2 = b"From: b@example.org\r\nSubject: two\r\n\r\nline1\r\nline2\r\nline3\r\n"


def connect(server):
    return poplib.POP3("127.0.0.1", server.port, timeout=10)


def test_user_pass_list_uidl_retr_top(server):
    """RFC 1939: LIST sizes equal the octets RETR delivers; TOP cuts the body."""
    server.deliver("alice", MSG1, name="1000.A.host")
    server.deliver("alice", MSG2, name="1001.B.host,S=60")
    pop = connect(server)
    pop.user("alice")
    pop.pass_("wonderland")
    count, total = pop.stat()
    assert count == 2
    _, listing, _ = pop.list()
    sizes = dict(line.split() for line in listing)
    _, uidls, _ = pop.uidl()
    assert [u.split()[1] for u in uidls] == [b"1000.A.host", b"1001.B.host"]
    for n, original in ((1, MSG1), (2, MSG2)):
        _, lines, octets = pop.retr(n)
        received = b"\r\n".join(lines) + b"\r\n"
        assert received == original.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        assert len(received) == int(sizes[str(n).encode()])
    assert total == sum(int(s) for s in sizes.values())
    _, top, _ = pop.top(2, 1)
    assert top == [b"From: b@example.org", b"Subject: two", b"", b"line1"]
    pop.quit()


def test_apop(server):
    """RFC 1939 section 7: APOP with the greeting's timestamp."""
    pop = connect(server)
    assert b"<" in pop.getwelcome()
    pop.apop("alice", "wonderland")
    assert pop.stat() == (0, 0)
    pop.quit()


def test_apop_wrong_secret_fails(server):
    pop = connect(server)
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        pop.apop("alice", "wrong")
    pop.quit()


def test_dele_quit_removes_and_virtual_user(server):
    """DELE + QUIT removes exactly the marked message (bob@example.org: %d/%n)."""
    server.deliver("bob@example.org", MSG1, name="1.X.h")
    server.deliver("bob@example.org", MSG2, name="2.Y.h")
    pop = connect(server)
    pop.user("bob@example.org")
    pop.pass_("builder")
    pop.dele(1)
    pop.quit()
    files = sorted(p.name for p in (server.maildir("bob@example.org") / "new").iterdir())
    assert files == ["2.Y.h"]


def test_retr_large_message_byte_exact(server):
    """A message larger than the read chunk arrives intact (streamed, stuffed)."""
    body = b"".join(
        (b"." if i % 23 == 0 else b"")
        + hashlib.sha256(str(i).encode()).hexdigest().encode()
        + b"\n"
        for i in range(60000)
    )
    message = b"Subject: big\n\n" + body
    server.deliver("alice", message)
    pop = connect(server)
    pop.user("alice")
    pop.pass_("wonderland")
    (size,) = [int(x) for x in pop.list(1).split()[2:]]
    _, lines, _ = pop.retr(1)
    received = b"\r\n".join(lines) + b"\r\n"
    assert received == message.replace(b"\n", b"\r\n")
    assert size == len(received)
    pop.quit()
