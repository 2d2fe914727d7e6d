"""
A cluster: two popserv nodes (separate twistd processes) on one PostgreSQL
(tests/pg.py), behind a real HAProxy in TCP mode with send-proxy-v2 (round
robin over both), each node also taking deliveries over LMTP on a Unix
socket. Everything POP3 goes through HAProxy; each node names itself in its
greeting (its hostname in the APOP timestamp), so a test knows which node a
session landed on. Clients bind to their own loopback addresses (127.0.0.x),
which the nodes see through the PROXY header.

The tests run in order on one cluster: nodes are killed and restarted, and
PostgreSQL is restarted last.
"""

from __future__ import annotations

import hashlib
import re
import smtplib
import time

import pytest
from balancer import HOST, HAProxy, requireHAProxy
from test_e2e_haproxy import Client
from test_pgsql import initialized, makeStore
from test_store_contract import deliver, listing

from popserv.errors import MaildropInUse
from support import ServerProcess

USERS = {"alice": "{PLAIN}wonderland", "bob": "{PLAIN}builder", "carol": "{PLAIN}singer"}
PASSWORDS = {user: secret.removeprefix("{PLAIN}") for user, secret in USERS.items()}
NODES = ("node-a", "node-b")


class Node:
    """One popserv node: a twistd process on a pgsql: store, a PROXY listener and LMTP."""

    def __init__(self, root, name: str, uri: str) -> None:
        self.root = root / name
        self.name = name
        self.uri = uri
        self.lmtpSocket = str(self.root / "lmtp.sock")
        self.server: ServerProcess | None = None
        self.port = 0
        self.earlierLogs: list[str] = []  # of the processes killed before this one

    def start(self) -> Node:
        if self.server is not None:
            self.earlierLogs.append(self.server.log)
        server = ServerProcess(
            self.root,
            USERS,
            listen=f"haproxy:tcp:{self.port}:interface={HOST}",
            penalty=15,
            extra=f'lmtp = ["unix:{self.lmtpSocket}"]\n',
        )
        server.config.write_text(
            server.config.read_text()
            .replace(
                'mail_location = "maildir:mail/%d/%n/Maildir"',
                f'mail_location = "pgsql:{self.uri}"\npgsql_timeout = 2',
            )
            .replace('hostname = "test.invalid"', f'hostname = "{self.name}.invalid"')
        )
        self.server = server.start()
        self.port = server.port  # a restart listens where HAProxy sends
        return self

    def kill(self) -> None:
        self.server.kill()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    @property
    def log(self) -> str:
        return "".join(self.earlierLogs) + self.server.log


class Cluster:
    def __init__(self, nodes: dict[str, Node], proxy: HAProxy, store) -> None:
        self.nodes = nodes
        self.proxy = proxy
        self.store = store  # the test's own view of the database

    def connect(self, source: str, node: str | None = None) -> tuple[Client, str]:
        """A connection through HAProxy (to C{node}, if given: HAProxy's round robin
        brings it within a few tries); the client and the node it reached."""
        for _ in range(6):
            client = Client(self.proxy.ports["pop3"], source)
            assert client.greeting.startswith(b"+OK"), client.greeting
            reached = re.search(rb"@([\w-]+)\.invalid>", client.greeting).group(1).decode()
            if node is None or reached == node:
                return client, reached
            client.close()
        raise AssertionError(f"HAProxy never sent a connection to {node}")

    def failures(self, address: str) -> int:
        """The failed logins from C{address} the nodes share."""
        row = self.store.database.run(
            lambda conn: conn.execute(
                "SELECT count FROM auth_failures WHERE address = %s", (address,)
            ).fetchone()
        )
        return 0 if row is None else row[0]

    def login(self, user: str, source: str, node: str | None = None) -> tuple[Client, str]:
        client, reached = self.connect(source, node)
        assert client.ask(f"USER {user}".encode()).startswith(b"+OK")
        reply = client.ask(f"PASS {PASSWORDS[user]}".encode())
        assert reply.startswith(b"+OK"), (reached, reply)
        return client, reached

    def relogin(self, user: str, source: str, within: float) -> tuple[Client, str]:
        """A login as soon as the maildrop is free again, within C{within} seconds."""
        deadline = time.monotonic() + within
        while True:
            client, reached = self.connect(source)
            assert client.ask(f"USER {user}".encode()).startswith(b"+OK")
            reply = client.ask(f"PASS {PASSWORDS[user]}".encode())
            if reply.startswith(b"+OK"):
                return client, reached
            client.close()
            assert time.monotonic() < deadline, reply
            time.sleep(0.1)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, postgresql):
    requireHAProxy()
    uri = initialized(postgresql.newDatabase())
    root = tmp_path_factory.mktemp("cluster")
    store = makeStore(uri)
    nodes = {}
    proxy = None
    try:
        for name in NODES:
            nodes[name] = Node(root, name, uri).start()
        proxy = HAProxy(root / "haproxy", {"pop3": [n.port for n in nodes.values()]}).start()
        yield Cluster(nodes, proxy, store)
    finally:
        if proxy is not None:
            proxy.stop()
        for node in nodes.values():
            node.stop()
        store.close()
    for node in nodes.values():
        assert "Traceback" not in node.log and "Unhandled" not in node.log, node.log


def uidls(client: Client) -> list[bytes]:
    assert client.ask(b"UIDL").startswith(b"+OK")
    lines = []
    while (line := client.readline()) != b".":
        lines.append(line)
    return lines


def quit(client: Client) -> None:
    assert client.ask(b"QUIT").startswith(b"+OK")
    client.close()


def test_lmtp_delivery_is_listed_alike_on_both_nodes(cluster):
    lmtp = smtplib.LMTP(cluster.nodes["node-a"].lmtpSocket)
    try:
        for n in (1, 2):
            refused = lmtp.sendmail("sender@example.org", ["alice"], f"Subject: {n}\n\nhi\n")
            assert refused == {}
    finally:
        lmtp.quit()
    seen = {}
    for node in NODES:
        client, reached = cluster.login("alice", "127.0.0.2", node)
        assert client.ask(b"STAT").startswith(b"+OK 2 ")
        seen[reached] = uidls(client)
        quit(client)
        # The maildrop is free once the node has released it after QUIT.
        cluster.nodes[node].server.waitForLog("session end: user=alice")
    assert seen["node-a"] == seen["node-b"] and len(seen["node-a"]) == 2


def test_second_login_on_either_node_is_in_use(cluster):
    holder, node = cluster.login("alice", "127.0.0.3")
    other = "node-b" if node == "node-a" else "node-a"
    for target in (other, node):
        client, _ = cluster.connect("127.0.0.3", target)
        assert client.ask(b"USER alice").startswith(b"+OK")
        assert client.ask(b"PASS wonderland").startswith(b"-ERR [IN-USE]")
        client.close()
    quit(holder)


def test_failures_on_one_node_delay_the_next_failure_on_the_other(cluster):
    def fail(node: str) -> float:
        client, _ = cluster.connect("127.0.0.4", node)
        assert client.ask(b"USER bob").startswith(b"+OK")
        started = time.monotonic()
        assert client.ask(b"PASS wrong").startswith(b"-ERR [AUTH]")
        client.close()
        return time.monotonic() - started

    assert 0.9 <= fail("node-a") < 1.9  # the address's first failure: a second
    assert fail("node-b") >= 1.9  # its second, counted on the other node: two
    assert cluster.failures("127.0.0.4") == 2
    client, _ = cluster.login("bob", "127.0.0.4", "node-a")  # node-a saw it fail: clears
    quit(client)
    # ... in the background, off the login's path: wait for it.
    deadline = time.monotonic() + 5
    while cluster.failures("127.0.0.4"):
        assert time.monotonic() < deadline, cluster.nodes["node-a"].log
        time.sleep(0.05)
    assert fail("node-b") < 1.9  # a first failure again


def test_node_killed_mid_retr_loses_nothing(cluster):
    body = b"Subject: big\r\n\r\n" + (b"0123456789abcdef" * 4 + b"\r\n") * 256 * 1024  # 16 MiB
    uid = deliver(cluster.store, [body], user="carol")
    client, node = cluster.login("carol", "127.0.0.5")
    assert client.ask(b"RETR 1").startswith(b"+OK")
    assert len(client.stream.read(64 * 1024)) == 64 * 1024  # a slow reader
    # The client reads no more: the socket buffers between it and the node
    # (a few MiB while nobody reads) fill, and the node waits mid-message.
    time.sleep(0.2)
    cluster.nodes[node].kill()
    client.close()
    started = time.monotonic()
    again, other = cluster.relogin("carol", "127.0.0.5", within=5)
    assert other != node
    assert time.monotonic() - started < 5
    assert uidls(again) == [f"1 {uid}".encode()]
    assert again.ask(b"RETR 1").startswith(b"+OK")
    digest = hashlib.sha256()
    while (line := again.stream.readline()) != b".\r\n":
        digest.update(line)
    assert digest.hexdigest() == hashlib.sha256(body).hexdigest()
    quit(again)
    cluster.nodes[node].start()  # back, on the port HAProxy knows


def listedOnceFree(store, user: str, within: float = 10):
    """
    The listing once the maildrop's lock is free: a node killed in UPDATE
    holds it until its database session ends, which PostgreSQL sees only
    when the statement that session was running is done.
    """
    deadline = time.monotonic() + within
    while True:
        try:
            return listing(store, user)
        except MaildropInUse:
            assert time.monotonic() < deadline, "the killed node's lock was never released"
            time.sleep(0.1)


def test_node_killed_before_and_during_update(cluster):
    uids = [
        deliver(cluster.store, [f"Subject: {n}\n\nm\n".encode()], user="carol") for n in range(40)
    ]
    everything = set(uids) | {i.uid for i in listing(cluster.store, "carol")}

    # Killed with deletions marked but no QUIT: nothing is deleted.
    client, node = cluster.login("carol", "127.0.0.6")
    count = int(client.ask(b"STAT").split()[1])
    for n in range(1, count + 1):
        assert client.ask(f"DELE {n}".encode()).startswith(b"+OK")
    cluster.nodes[node].kill()
    client.close()
    assert {i.uid for i in listing(cluster.store, "carol")} == everything
    cluster.nodes[node].start()

    # Killed as it applies QUIT's deletions: all of the marked go or none, no other.
    client, node = cluster.relogin("carol", "127.0.0.6", within=5)
    marked = set()
    for line in uidls(client)[1::2]:  # every other message
        number, uid = line.decode().split()
        assert client.ask(f"DELE {number}".encode()).startswith(b"+OK")
        marked.add(uid)
    client.sock.sendall(b"QUIT\r\n")
    cluster.nodes[node].kill()
    client.close()
    left = {i.uid for i in listedOnceFree(cluster.store, "carol")}
    assert left in (everything, everything - marked)
    again, _ = cluster.relogin("carol", "127.0.0.6", within=5)
    assert {line.split()[1].decode() for line in uidls(again)} == left
    quit(again)
    cluster.nodes[node].start()


def test_database_restart_gives_sys_temp_then_recovery(cluster, postgresql):
    postgresql.stop()
    try:
        for node in NODES:
            client, _ = cluster.connect("127.0.0.7", node)
            assert client.ask(b"USER alice").startswith(b"+OK")
            assert client.ask(b"PASS wonderland").startswith(b"-ERR [SYS/TEMP]")
            client.close()
    finally:
        postgresql.start()
    for node in NODES:
        deadline = time.monotonic() + 10
        while True:
            client, _ = cluster.connect("127.0.0.7", node)
            assert client.ask(b"USER alice").startswith(b"+OK")
            reply = client.ask(b"PASS wonderland")
            if reply.startswith(b"+OK"):
                break
            client.close()
            assert time.monotonic() < deadline, reply
            time.sleep(0.2)
        assert client.ask(b"STAT").startswith(b"+OK 2 ")
        quit(client)
        cluster.nodes[node].server.waitForLog("session end: user=alice ip=127.0.0.7")
