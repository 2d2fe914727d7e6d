"""
Data safety against a real server process: a dropped connection removes
nothing, mail delivered mid-session survives, the maildrop lock excludes a
second session and does not outlive a killed server.
"""

from __future__ import annotations

import poplib
import socket
import time

import pytest

MSG = b"Subject: keep me\n\nimportant\n"


def login(server, user="alice", password="wonderland"):
    pop = poplib.POP3("127.0.0.1", server.port, timeout=10)
    pop.user(user)
    pop.pass_(password)
    return pop


def names(server, user="alice"):
    box = server.maildir(user)
    return sorted(
        p.name
        for sub in ("new", "cur")
        for p in (box / sub).iterdir()
        if not p.name.startswith(".")
    )


def test_dropped_connection_after_dele_removes_nothing(server):
    """RFC 1939 section 6: no QUIT, no UPDATE."""
    for i in range(3):
        server.deliver("alice", MSG, name=f"{i}.M.h")
    pop = login(server)
    pop.dele(1)
    pop.dele(2)
    pop.sock.shutdown(socket.SHUT_RDWR)  # vanish without QUIT
    pop.sock.close()
    pop = login(server)  # also proves the lock was released
    assert pop.stat()[0] == 3
    pop.quit()
    assert names(server) == ["0.M.h", "1.M.h", "2.M.h"]


def test_mail_delivered_during_a_session_survives(server):
    server.deliver("alice", MSG, name="1.old.h")
    pop = login(server)
    server.deliver("alice", b"Subject: new\n\nlate\n", name="2.new.h")
    assert pop.stat()[0] == 1
    pop.dele(1)
    pop.quit()
    assert names(server) == ["2.new.h"]
    pop = login(server)
    assert [u.split()[1] for u in pop.uidl()[1]] == [b"2.new.h"]
    pop.quit()


def test_concurrent_login_gets_in_use(server):
    first = login(server)
    second = poplib.POP3("127.0.0.1", server.port, timeout=10)
    second.user("alice")
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        second.pass_("wonderland")
    first.quit()
    second.user("alice")
    second.pass_("wonderland")
    second.quit()


def test_killed_server_leaves_no_stale_lock(server):
    """SIGKILL the server while a session holds the lock: the next server lets us in."""
    server.deliver("alice", MSG, name="1.M.h")
    pop = login(server)
    pop.dele(1)
    server.kill()
    server.port = None
    server.output.clear()
    server.start()
    pop = login(server)
    assert pop.stat()[0] == 1  # the DELE of the killed session was not applied
    pop.quit()
    assert names(server) == ["1.M.h"]


def test_wrong_password_over_the_wire_reads_like_unknown_user(server):
    answers = []
    for user, password in (("alice", "nope"), ("nobody", "wonderland")):
        pop = poplib.POP3("127.0.0.1", server.port, timeout=10)
        pop.user(user)
        with pytest.raises(poplib.error_proto) as e:
            pop.pass_(password)
        answers.append(e.value.args[0])
        pop.quit()
    assert answers[0] == answers[1] == b"-ERR [AUTH] Authentication failed"
    assert "nope" not in server.log and "wonderland" not in server.log


def test_a_huge_first_scan_does_not_hold_up_other_logins(tmp_path):
    """
    The first login to a big maildrop with no index reads every file: that runs in a
    thread, so other users' logins are answered while it is still going on.
    """
    import select

    from support import ServerProcess

    srv = ServerProcess(tmp_path, {"big": "{PLAIN}pw", "small": "{PLAIN}pw"})
    new = srv.maildir("big") / "new"
    new.mkdir(parents=True)
    body = b"Subject: x\n\n" + b"line\n" * 20
    for i in range(30000):
        (new / f"{1700000000 + i}.M{i}.h").write_bytes(body)
    srv.start()
    try:
        slow = socket.create_connection(("127.0.0.1", srv.port), timeout=60)
        slow.recv(1000)
        slow.sendall(b"USER big\r\n")
        slow.recv(1000)
        slow.sendall(b"PASS pw\r\n")
        time.sleep(0.02)  # the scan is under way
        started = time.monotonic()
        for _ in range(3):
            pop = poplib.POP3("127.0.0.1", srv.port, timeout=10)
            pop.user("small")
            pop.pass_("pw")
            pop.quit()
        others = time.monotonic() - started
        pending, _, _ = select.select([slow], [], [], 0)
        assert not pending, "the big login finished first: was the scan blocking?"
        data = b""
        while b"Logged in" not in data:
            data += slow.recv(1000)
        scan = time.monotonic() - started
        slow.close()
        assert others < scan and others < 0.5, (others, scan)
        print(f"\n3 logins in {others * 1000:.0f} ms during a {scan * 1000:.0f} ms first scan")
    finally:
        srv.stop()
