"""Testing a mail fetcher that uses poplib against a real POP3 server."""

import poplib
from email.message import EmailMessage

import pytest


def fetch_all(host, port, user, password, delete=False, **kw):
    """The code under test: fetch every message, optionally deleting it."""
    pop = poplib.POP3(host, port, timeout=kw.get("timeout", 10))
    try:
        pop.user(user)
        pop.pass_(password)
        count, _ = pop.stat()
        messages = [b"\r\n".join(pop.retr(i)[1]) for i in range(1, count + 1)]
        if delete:
            for i in range(1, count + 1):
                pop.dele(i)
        pop.quit()  # UPDATE: the deletions happen now
        return messages
    finally:
        pop.close()


def test_fetch_and_delete(pop3_server):
    pop3_server.add_user("alice", "secret")
    msg = EmailMessage()
    msg["Subject"] = "Invoice 42"
    msg.set_content("Please pay.")
    pop3_server.deliver("alice", msg)
    pop3_server.deliver("alice", b"Subject: second\r\n\r\nhello\r\n")

    fetched = fetch_all(pop3_server.host, pop3_server.port, "alice", "secret", delete=True)

    assert b"Subject: Invoice 42" in fetched[0]
    assert pop3_server.messages("alice") == []
    assert len(pop3_server.deleted("alice")) == 2
    assert "C: PASS ***" in pop3_server.transcript()  # the password never shows


def test_mailbox_locked(pop3_server):
    pop3_server.add_user("alice", "secret")
    pop3_server.fail("PASS", "-ERR [IN-USE] maildrop already locked")
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        fetch_all(pop3_server.host, pop3_server.port, "alice", "secret")


def test_retry_after_a_temporary_failure(pop3_server):
    pop3_server.add_user("alice", "secret")
    pop3_server.deliver("alice", b"Subject: hi\r\n\r\nhi\r\n")
    pop3_server.fail("STAT", "-ERR [SYS/TEMP] try again later", times=1)
    with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
        fetch_all(pop3_server.host, pop3_server.port, "alice", "secret")
    assert len(fetch_all(pop3_server.host, pop3_server.port, "alice", "secret")) == 1


def test_connection_dropped_during_retr(pop3_server):
    pop3_server.add_user("alice", "secret")
    pop3_server.deliver("alice", b"Subject: big\r\n\r\n" + b"x" * 5000 + b"\r\n")
    pop3_server.drop_after("RETR", 100)
    with pytest.raises((poplib.error_proto, OSError)):
        fetch_all(pop3_server.host, pop3_server.port, "alice", "secret", delete=True)
    assert len(pop3_server.messages("alice")) == 1  # nothing deleted without QUIT


def test_server_that_never_answers(pop3_server):
    pop3_server.never_answer()  # not even a greeting
    with pytest.raises(TimeoutError):
        fetch_all(pop3_server.host, pop3_server.port, "alice", "secret", timeout=0.5)


@pytest.mark.pop3_server(tls=True)
def test_implicit_tls_and_stls(pop3_server):
    pop3_server.add_user("alice", "secret")
    context = pop3_server.ssl_context()  # trusts pop3_server.cafile
    pop = poplib.POP3_SSL("localhost", pop3_server.tls_port, context=context, timeout=10)
    pop.user("alice")
    pop.pass_("secret")
    assert pop.stat() == (0, 0)
    pop.quit()
    pop = poplib.POP3(pop3_server.host, pop3_server.port, timeout=10)
    pop.stls(context)
    pop.apop("alice", "secret")
    pop.quit()
