"""
End to end over 127.0.0.1 with TLS: STLS (RFC 2595) and implicit TLS on a POP3S port
(RFC 8314), driven by real clients (openssl s_client, curl, fetchmail, mpop), Python's
poplib and ssl, and raw sockets where a client would hide what is being tested.

Every test runs its own popserv process (twistd plugin, Maildir, passwd-file) in a tmp dir
with a throw-away PKI from `makeTestPKI` (a CA, a server certificate for localhost and
127.0.0.1, client certificates); the clients verify the server certificate against that CA
and nothing else. Unless a test says otherwise, the server trusts no local network
(`trusted_networks` is TEST-NET-1), so a password in the clear (USER/PASS, PLAIN, LOGIN) is
refused before TLS: a client that logs in that way proves it really switched to TLS. No test
may leave a traceback in the server log.

As in test_e2e_clients: the server sends messages with CRLF, byte-stuffed; curl prints the
wire form (CRLF, unstuffed), fetchmail and mpop deliver it with LF line endings and a
Received: header of their own on top, which the comparisons split off.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import poplib
import re
import shutil
import signal
import socket
import ssl
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import scramp

from clients import local, output, split_received, wire
from support import ServerProcess, deliver, have, makeTestPKI

TIMEOUT = 30
USER, PASSWORD = "alice", "wonderland"
USERS = {USER: "{PLAIN}wonderland"}
HOST = "127.0.0.1"
# TEST-NET-1: no connection in these tests comes from there, so nothing local is trusted.
UNTRUSTED = ["192.0.2.0/24"]
PLAIN_IR = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
PLAINTEXT_REFUSED = (
    "-ERR [AUTH] Plaintext authentication is not allowed on this connection; use STLS first"
)

# Dots to unstuff and 8-bit text; one stored with LF, one with CRLF.
FIRST = (
    b"From: tls@example.org\nTo: alice@test.invalid\nSubject: over TLS\nMIME-Version: 1.0\n"
    b"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
    b".leading dot\n..two dots\n.\nGr\xc3\xbc\xc3\x9fe, \xe2\x82\xac 5\nend\n"
)
SECOND = b"From: two@example.org\r\nSubject: second\r\n\r\n.line\r\nlast\r\n"
MESSAGES = {"1700000001.M1P1.tls": FIRST, "1700000002.M2P1.tls": SECOND}


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


# -- servers ---------------------------------------------------------------------------------


@pytest.fixture
def pki(tmp_path):
    """CA, server certificate (localhost, 127.0.0.1) and key, client certificate for alice."""
    return makeTestPKI(tmp_path / "pki")


@pytest.fixture
def spawn(tmp_path, pki):
    """
    start(extra, users, trusted) -> a running popserv with the test PKI's certificate, an
    STLS port (srv.port) and a POP3S port (srv.tlsPort), and MESSAGES in alice's Maildir.
    """
    servers: list[ServerProcess] = []

    def start(
        extra: str = "", users: dict[str, str] | None = None, trusted: list[str] = UNTRUSTED
    ) -> ServerProcess:
        networks = ", ".join(f'"{n}"' for n in trusted)
        srv = ServerProcess(
            tmp_path / f"srv{len(servers)}",
            users or USERS,
            extra=f'tls_cert = "{pki["cert"]}"\ntls_key = "{pki["key"]}"\n'
            f"trusted_networks = [{networks}]\n" + extra,
            listenTLS=f"tcp:0:interface={HOST}",
        )
        servers.append(srv)
        srv.start()
        for name, message in MESSAGES.items():
            deliver(srv.maildir(USER), message, name=name)
        return srv

    yield start
    for srv in servers:
        srv.stop()
    for srv in servers:
        assert "Traceback" not in srv.log and "Unhandled" not in srv.log, srv.log


def self_signed(directory: Path, cn: str) -> dict[str, Path]:
    """
    A self-signed certificate for `cn` (client and server use) and its key, from no CA the
    server or the clients know. (A second makeTestPKI CA would not do: all of them are
    named "popserv test CA", so verification picks it by name and fails on the signature
    instead of "unknown issuer".)
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    usage = [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
        .add_extension(x509.ExtendedKeyUsage(usage), False)
        .sign(key, hashes.SHA256())
    )
    paths = {"cert": directory / "cert.pem", "key": directory / "key.pem"}
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A client context that trusts only the test CA (and checks the host name)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


# -- a raw POP3 connection -------------------------------------------------------------------


class Conn:
    """A POP3 connection over a raw socket, TLS when asked: lines in, lines out."""

    def __init__(self, sock: socket.socket) -> None:
        sock.settimeout(TIMEOUT)
        self.sock: socket.socket = sock
        self.buf = b""
        self.sent: list[str] = []
        self.greeting = self.readline()

    @classmethod
    def connect(cls, port: int, source: str | None = None) -> Conn:
        sock = socket.create_connection(
            (HOST, port), TIMEOUT, source_address=(source, 0) if source else None
        )
        return cls(sock)

    @classmethod
    def implicit(cls, port: int, ctx: ssl.SSLContext) -> Conn:
        sock = socket.create_connection((HOST, port), TIMEOUT)
        return cls(ctx.wrap_socket(sock, server_hostname="localhost"))

    def rawline(self) -> bytes:
        while b"\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(f"connection closed; pending {self.buf!r}")
            self.buf += data
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def readline(self) -> str:
        return self.rawline().decode("utf-8")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, line: str) -> str:
        self.sent.append(line)
        self.send(line.encode("utf-8") + b"\r\n")
        return self.readline()

    def body(self) -> bytes:
        """The rest of a multi-line reply, unstuffed, in wire form (CRLF lines)."""
        lines = []
        while (line := self.rawline()) != b".":
            lines.append(line[1:] if line.startswith(b".") else line)
        return b"".join(line + b"\r\n" for line in lines)

    def capa(self) -> list[str]:
        status = self.cmd("CAPA")
        assert status == "+OK Capability list follows", status
        return self.body().decode().splitlines()

    def retr(self, number: int) -> bytes:
        status = self.cmd(f"RETR {number}")
        assert status.startswith("+OK"), status
        return self.body()

    def starttls(self, ctx: ssl.SSLContext, hostname: str = "localhost") -> None:
        assert self.cmd("STLS") == "+OK Begin TLS negotiation"
        assert self.buf == b"", self.buf  # nothing in the clear after the +OK
        self.sock = ctx.wrap_socket(self.sock, server_hostname=hostname)

    def close(self) -> None:
        self.sock.close()


def sasl_list(capa: list[str]) -> list[str]:
    sasl = [line for line in capa if line.startswith("SASL ")]
    return sasl[0].split()[1:] if sasl else []


def scram_login(conn: Conn, client: scramp.ScramClient) -> str:
    """Run AUTH <client's mechanism> (initial response); the last reply line."""
    reply = conn.cmd(f"AUTH {client.mechanism_name} {b64(client.get_client_first())}")
    if not reply.startswith("+ "):
        return reply
    client.set_server_first(base64.b64decode(reply[2:]).decode())
    reply = conn.cmd(b64(client.get_client_final()))
    if not reply.startswith("+ "):
        return reply
    client.set_server_final(base64.b64decode(reply[2:]).decode())  # checks the server
    return conn.cmd("")


def cram_md5_login(conn: Conn, user: str = USER, password: str = PASSWORD) -> str:
    reply = conn.cmd("AUTH CRAM-MD5")
    assert reply.startswith("+ "), reply
    challenge = base64.b64decode(reply[2:])
    digest = hmac.new(password.encode(), challenge, hashlib.md5).hexdigest()
    return conn.cmd(b64(f"{user} {digest}"))


def apop_login(conn: Conn, user: str = USER, password: str = PASSWORD) -> str:
    stamp = re.search(r"<[^>]*>", conn.greeting)
    assert stamp, conn.greeting
    digest = hashlib.md5((stamp.group(0) + password).encode()).hexdigest()
    return conn.cmd(f"APOP {user} {digest}")


# -- running clients -------------------------------------------------------------------------


def run(
    cmd: list[str], home: Path, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run a client with HOME in the test's tmp dir (no ~/.netrc, ~/.fetchids etc.)."""
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HOME=str(home), FETCHMAILHOME=str(home), LC_ALL="C")
    for proxy in ("all_proxy", "ALL_PROXY", "pop3_proxy", "POP3_PROXY", "pop3s_proxy"):
        env.pop(proxy, None)
    return subprocess.run(
        cmd,
        input=stdin if stdin is not None else b"",
        capture_output=True,
        timeout=TIMEOUT,
        env=env,
        cwd=home,
    )


def pop_responses(data: bytes, multiline: list[bool]) -> list[tuple[bytes, bytes | None]]:
    """
    Split a recorded server stream into replies: (status line, body or None) for each
    expected reply (multi-line where `multiline` says so, if +OK); the body unstuffed, in
    wire form. Nothing may be left over.
    """
    replies: list[tuple[bytes, bytes | None]] = []
    pos = 0
    for multi in multiline:
        end = data.index(b"\r\n", pos)
        status, pos = data[pos:end], end + 2
        body = None
        if multi and status.startswith(b"+OK"):
            end = data.index(b"\r\n.\r\n", pos - 2)
            body = re.sub(rb"(^|\r\n)\.", rb"\1", data[pos : end + 2]) if end >= pos else b""
            pos = end + 5
        replies.append((status, body))
    assert data[pos:] == b"", data[pos:]
    return replies


# -- 1. openssl s_client ---------------------------------------------------------------------


def s_client(port: int, ca: Path, *args: str, stdin: bytes, home: Path):
    """openssl s_client to 127.0.0.1 verifying the server as localhost against `ca`."""
    cmd = [
        "openssl", "s_client", "-connect", f"{HOST}:{port}", "-servername", "localhost",
        "-CAfile", str(ca), "-verify_return_error", "-verify_hostname", "localhost",
        "-ign_eof", "-nocommands", *args,
    ]  # fmt: skip
    return run(cmd, home, stdin)


SESSION = b"USER alice\r\nPASS wonderland\r\nRETR 1\r\nRETR 2\r\nQUIT\r\n"


@pytest.mark.skipif(not have("openssl"), reason="openssl is not installed")
@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_openssl_s_client_login_and_retr(spawn, pki, tmp_path, mode):
    """
    openssl s_client (`-starttls pop3` on the STLS port, plain s_client on the POP3S port),
    with the test CA only and the host name checked: the verification succeeds ("Verify
    return code: 0 (ok)", "Verified peername: localhost"), CAPA over TLS has no STLS but has
    USER and SCRAM-SHA-256-PLUS; a pipelined USER/PASS/RETR 1/RETR 2/QUIT (USER is refused
    in the clear here, so this proves TLS) returns both messages byte for byte. The same
    connection with an unrelated trust anchor fails verification and never gets to POP3.
    """
    srv = spawn()
    starttls = mode == "starttls"
    port, extra = (srv.port, ["-starttls", "pop3"]) if starttls else (srv.tlsPort, [])

    info = s_client(port, pki["ca"], *extra, stdin=b"CAPA\r\nQUIT\r\n", home=tmp_path)
    text = output(info)
    assert info.returncode == 0, text
    assert "Verify return code: 0 (ok)" in text, text
    assert "Verified peername: localhost" in text, text
    assert re.search(r"New, TLSv1\.[23], Cipher is", text), text
    capa = info.stdout.split(b"+OK Capability list follows\r\n", 1)[1].split(b"\r\n.\r\n")[0]
    caps = capa.decode().split("\r\n")
    assert "STLS" not in caps and "USER" in caps, caps
    assert {"SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS", "PLAIN"} <= set(sasl_list(caps)), caps

    data = s_client(port, pki["ca"], *extra, "-quiet", stdin=SESSION, home=tmp_path)
    assert data.returncode == 0, output(data)
    replies = pop_responses(
        data.stdout, ([] if starttls else [False]) + [False, False, True, True, False]
    )
    if not starttls:
        assert replies.pop(0)[0].startswith(b"+OK popserv")  # the greeting
    statuses = [status.decode() for status, _ in replies]
    assert statuses[0] == "+OK Send your password", statuses
    assert statuses[1].startswith("+OK Logged in, 2 messages"), statuses
    assert replies[2][1] == wire(FIRST) and replies[3][1] == wire(SECOND)
    assert statuses[4].startswith("+OK popserv") and "signing off" in statuses[4]

    other = self_signed(tmp_path / "other", "localhost")
    bad = s_client(port, other["cert"], *extra, stdin=SESSION, home=tmp_path)
    assert bad.returncode != 0, output(bad)
    assert "unable to get local issuer certificate" in output(bad), output(bad)
    assert b"Logged in" not in bad.stdout


@pytest.mark.skipif(not have("openssl"), reason="openssl is not installed")
@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_openssl_tls_1_1_refused_1_2_accepted(spawn, pki, tmp_path, mode):
    """
    The minimum is TLS 1.2: s_client offering only TLS 1.1 (security level 0, so this
    OpenSSL may offer it at all) gets a protocol_version alert from the server and no POP3
    session; offering only TLS 1.2 works. Skipped if this OpenSSL cannot offer TLS 1.1.
    """
    srv = spawn()
    port, extra = (srv.port, ["-starttls", "pop3"]) if mode == "starttls" else (srv.tlsPort, [])
    old = s_client(
        port, pki["ca"], *extra, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0",
        stdin=b"CAPA\r\nQUIT\r\n", home=tmp_path,
    )  # fmt: skip
    text = output(old)
    if "no protocols available" in text or "unknown option" in text.lower():
        pytest.skip(f"this openssl cannot offer TLS 1.1: {text[-300:]}")
    assert old.returncode != 0, text
    assert "alert protocol version" in text, text
    assert b"Capability list follows" not in old.stdout

    new = s_client(port, pki["ca"], *extra, "-tls1_2", stdin=b"CAPA\r\nQUIT\r\n", home=tmp_path)
    assert new.returncode == 0, output(new)
    assert "New, TLSv1.2, Cipher is" in output(new), output(new)
    assert "Verify return code: 0 (ok)" in output(new)
    assert b"+OK Capability list follows" in new.stdout


# -- 2. curl ---------------------------------------------------------------------------------


def curl(url: str, ca: Path, *args: str, home: Path):
    cmd = ["curl", "-sS", "-v", "--max-time", "20", "--noproxy", "*", "--cacert", str(ca)]
    return run([*cmd, *args, url], home)


@pytest.mark.skipif(not have("curl"), reason="curl is not installed")
@pytest.mark.parametrize(
    "mode,login",
    [
        ("starttls", None),
        ("starttls", "AUTH=PLAIN"),
        ("implicit", None),
        ("implicit", "AUTH=LOGIN"),
    ],
)
def test_curl_retr_over_tls(spawn, pki, tmp_path, mode, login):
    """
    curl `--ssl-reqd pop3://` (STLS) and `pop3s://` with `--cacert` (the test CA only):
    certificate verified (for 127.0.0.1 from the IP SAN, for localhost from the DNS SAN),
    each message printed exactly in wire form. With its own choice curl takes CRAM-MD5;
    pinned to PLAIN or LOGIN it must get them, which are only offered over TLS here. curl
    with the system's CAs instead fails verification (exit 60) before logging in.
    """
    srv = spawn()
    args = ["--login-options", login] if login else []
    auth = f"> AUTH {login.split('=')[1]}" if login else "> AUTH CRAM-MD5"
    for host in (HOST, "localhost"):
        if mode == "starttls":
            base = f"pop3://{USER}:{PASSWORD}@{host}:{srv.port}"
            extra = ["--ssl-reqd", *args, "--resolve", f"localhost:{srv.port}:{HOST}"]
        else:
            base = f"pop3s://{USER}:{PASSWORD}@{host}:{srv.tlsPort}"
            extra = [*args, "--resolve", f"localhost:{srv.tlsPort}:{HOST}"]
        for number, message in enumerate(MESSAGES.values(), 1):
            proc = curl(f"{base}/{number}", pki["ca"], *extra, home=tmp_path)
            log = proc.stderr.decode()
            assert proc.returncode == 0, output(proc)
            assert "SSL certificate verify ok" in log, log
            assert re.search(r"SSL connection using TLSv1\.[23]", log), log
            assert ("> STLS" in log) == (mode == "starttls"), log
            assert auth in log, log
            assert proc.stdout == wire(message)

    # The system's CAs only (no --cacert): the test CA is not among them.
    untrusted = run(
        ["curl", "-sS", "-v", "--max-time", "20", "--noproxy", "*", *extra, f"{base}/1"], tmp_path
    )
    assert untrusted.returncode == 60, output(untrusted)
    assert untrusted.stdout == b"" and "> USER" not in output(untrusted)
    assert "> AUTH" not in output(untrusted)


# -- 3. fetchmail ----------------------------------------------------------------------------


def fetchmail(srv: ServerProcess, ca: Path, tmp: Path, *options: str, port: int):
    """
    One fetchmail run, --keep, USER/PASS (`--auth password`), certificate checked against
    the test CA. `--sslcommonname localhost` is needed: fetchmail matches the host name it
    polls (127.0.0.1) only against DNS names and the CN, not against IP-address SANs.
    """
    tmp.mkdir(parents=True, exist_ok=True)
    rc = tmp / "fetchmailrc"
    rc.write_text(f'poll {HOST} user "{USER}" password "{PASSWORD}"\n')
    rc.chmod(0o600)
    out = tmp / "out"
    out.mkdir(exist_ok=True)
    assert "'" not in str(out)
    mda = f"sh -c 'cat > \"$(mktemp {out}/msg.XXXXXX)\"'"
    cmd = [
        "fetchmail", "-f", str(rc), "--nosyslog", "--verbose",
        "--pidfile", str(tmp / "fetchmail.pid"), "-i", str(tmp / "fetchids"),
        "--protocol", "pop3", "--service", str(port), "--user", USER,
        "--auth", "password", "--norewrite", "--timeout", "20", "--keep", "--mda", mda,
        "--sslcertck", "--sslcertfile", str(ca), "--sslcommonname", "localhost",
        *options, HOST,
    ]  # fmt: skip
    return run(cmd, tmp)


@pytest.mark.skipif(not have("fetchmail"), reason="fetchmail is not installed")
@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_fetchmail_over_tls(spawn, pki, tmp_path, mode):
    """
    fetchmail with certificate checking, STLS (`--sslproto tls1.2+` on the STLS port) or
    implicit TLS (`--ssl` on the POP3S port): the verbose log shows the TLS session
    (protocol, "upgrade to TLS succeeded" for STLS), USER/PASS after it (refused in the
    clear here), and the messages arrive identical to the stored ones apart from
    fetchmail's Received: header (LF line endings). With an unrelated trust anchor it fails
    (exit 2) without sending the password.
    """
    srv = spawn()
    if mode == "starttls":
        options, port = ["--sslproto", "tls1.2+"], srv.port
    else:
        options, port = ["--ssl"], srv.tlsPort
    proc = fetchmail(srv, pki["ca"], tmp_path / "ok", *options, port=port)
    log = output(proc)
    assert proc.returncode == 0, log
    assert re.search(r"SSL/TLS: using protocol TLSv1\.[23]", log), log
    if mode == "starttls":
        assert "POP3> STLS" in log and "upgrade to TLS succeeded" in log, log
        assert log.index("upgrade to TLS succeeded") < log.index("POP3> USER alice"), log
    else:
        assert "POP3> STLS" not in log, log
    assert "POP3> USER alice" in log and "POP3> RETR 2" in log, log
    got = [split_received(p.read_bytes(), b"fetchmail") for p in (tmp_path / "ok/out").iterdir()]
    assert sorted(got) == sorted(local(m) for m in MESSAGES.values())

    other = self_signed(tmp_path / "other", "localhost")
    bad = fetchmail(srv, other["cert"], tmp_path / "bad", *options, port=port)
    assert bad.returncode == 2, output(bad)
    assert "unable to get local issuer certificate" in output(bad), output(bad)
    assert "POP3> PASS" not in output(bad) and not list((tmp_path / "bad/out").iterdir())


# -- 4. mpop ---------------------------------------------------------------------------------


def mpop(srv: ServerProcess, ca: Path, tmp: Path, *, auth: str, starttls: bool):
    """One mpop run (--debug), TLS with the test CA, to a Maildir in tmp, keep on."""
    tmp.mkdir(parents=True, exist_ok=True)
    dest = tmp / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    conf = tmp / "mpoprc"
    conf.write_text(
        textwrap.dedent(f"""\
            account alice
            host {HOST}
            port {srv.port if starttls else srv.tlsPort}
            timeout 20
            user {USER}
            password {PASSWORD}
            tls on
            tls_starttls {"on" if starttls else "off"}
            tls_trust_file {ca}
            auth {auth}
            delivery maildir {dest}
            keep on
            uidls_file {tmp / "mpop-uidls"}
            """)
    )
    conf.chmod(0o600)
    return run(["mpop", "--debug", "-C", str(conf), "alice"], tmp)


def mpop_delivered(tmp: Path) -> list[bytes]:
    md = tmp / "Maildir"
    files = [p for sub in ("new", "cur") for p in (md / sub).iterdir()]
    return sorted(split_received(p.read_bytes(), b"mpop") for p in files)


def mpop_methods() -> list[str]:
    version = subprocess.run(["mpop", "--version"], capture_output=True, timeout=TIMEOUT)
    text = version.stdout.decode()
    m = re.search(r"Supported authentication methods:\s*\n([^\n]*)", text)
    return m.group(1).split() if m else []


@pytest.mark.skipif(not have("mpop"), reason="mpop is not installed")
@pytest.mark.parametrize(
    "starttls,auth",
    [(True, "scram-sha-256"), (True, "user"), (False, "scram-sha-256"), (False, "plain")],
)
def test_mpop_over_tls(spawn, pki, tmp_path, starttls, auth):
    """
    mpop with `tls on` and `tls_trust_file` (the test CA; GnuTLS checks 127.0.0.1 against
    the IP SAN), STLS (`tls_starttls on`) or implicit TLS on the POP3S port: it re-reads
    CAPA after STLS, authenticates with the pinned method (USER and PLAIN only exist over
    TLS here; mpop's SCRAM sends the "n" flag, no channel binding) and retrieves every
    message byte for byte.
    """
    if auth not in mpop_methods():
        pytest.skip(f"this mpop does not support auth {auth}")
    srv = spawn()
    proc = mpop(srv, pki["ca"], tmp_path, auth=auth, starttls=starttls)
    log = output(proc)
    assert proc.returncode == 0, log
    assert "TLS session parameters:" in log and "CN=localhost" in log, log
    assert ("--> STLS" in log) == starttls, log
    expected = "--> USER alice" if auth == "user" else f"--> AUTH {auth.upper()}"
    assert expected in log, log
    if starttls:
        assert log.index("TLS session parameters:") < log.index(expected), log
    assert mpop_delivered(tmp_path) == sorted(local(m) for m in MESSAGES.values())


@pytest.mark.skipif(not have("mpop"), reason="mpop is not installed")
def test_mpop_scram_plus(spawn, pki, tmp_path):
    """
    mpop with `auth scram-sha-256-plus` over STLS (channel binding): must log in and fetch
    everything. Skipped when `mpop --version` does not list such a method (mpop 1.4.18
    with GNU SASL lists only scram-sha-1 and scram-sha-256).
    """
    methods = mpop_methods()
    if "scram-sha-256-plus" not in methods:
        pytest.skip(f"mpop offers no scram-sha-256-plus (supported: {' '.join(methods)})")
    srv = spawn()
    proc = mpop(srv, pki["ca"], tmp_path, auth="scram-sha-256-plus", starttls=True)
    log = output(proc)
    assert proc.returncode == 0, log
    assert "--> AUTH SCRAM-SHA-256-PLUS" in log, log
    assert mpop_delivered(tmp_path) == sorted(local(m) for m in MESSAGES.values())


# -- 5. poplib -------------------------------------------------------------------------------


def poplib_retr(pop: poplib.POP3, number: int) -> bytes:
    status, lines, _ = pop.retr(number)
    assert status.startswith(b"+OK"), status
    return b"".join(line + b"\r\n" for line in lines)


def test_poplib_stls_capa_and_retr(spawn, pki):
    """
    poplib: before STLS, CAPA offers STLS but no USER and no PLAIN/LOGIN/-PLUS (nothing
    local is trusted); `stls()` with a context that trusts only the test CA and checks the
    host name (127.0.0.1, IP SAN); after it CAPA has no STLS but USER, PLAIN, LOGIN and
    SCRAM-SHA-256-PLUS/SCRAM-SHA-1-PLUS; USER/PASS works and RETR is byte-exact. STLS again
    is refused by the server. A context for another host name fails the handshake.
    """
    srv = spawn()
    ctx = context(pki["ca"])
    pop = poplib.POP3(HOST, srv.port, timeout=TIMEOUT)
    try:
        before = pop.capa()
        assert "STLS" in before and "USER" not in before, before
        assert {"SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5"} <= set(before["SASL"]), before
        assert not {"PLAIN", "LOGIN", "SCRAM-SHA-256-PLUS"} & set(before["SASL"]), before
        with pytest.raises(poplib.error_proto, match="Plaintext authentication"):
            pop.user(USER)
        assert pop.stls(ctx).startswith(b"+OK Begin TLS negotiation")
        assert pop.sock.version() in ("TLSv1.2", "TLSv1.3")
        after = pop.capa()
        assert "STLS" not in after and "USER" in after, after
        assert after["SASL"][:2] == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS"], after
        assert {"PLAIN", "LOGIN", "SCRAM-SHA-256"} <= set(after["SASL"]), after
        with pytest.raises(poplib.error_proto, match="TLS is already active"):
            pop._shortcmd("STLS")
        pop.user(USER)
        assert pop.pass_(PASSWORD).startswith(b"+OK Logged in, 2 messages")
        assert [poplib_retr(pop, n) for n in (1, 2)] == [wire(m) for m in MESSAGES.values()]
        assert pop.quit().startswith(b"+OK")
    finally:
        pop.close()

    conn = Conn.connect(srv.port)
    try:
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
            conn.starttls(ctx, hostname="mail.example.org")
    finally:
        conn.close()


def test_poplib_pop3_ssl(spawn, pki):
    """
    poplib.POP3_SSL on the POP3S port with a context that trusts only the test CA: CAPA has
    no STLS but the -PLUS mechanisms and USER; STLS is refused ("TLS is already active");
    USER/PASS and byte-exact RETR. Without the test CA the handshake fails.
    """
    srv = spawn()
    pop = poplib.POP3_SSL(HOST, srv.tlsPort, context=context(pki["ca"]), timeout=TIMEOUT)
    try:
        assert pop.getwelcome().startswith(b"+OK popserv")
        caps = pop.capa()
        assert "STLS" not in caps and "USER" in caps, caps
        assert {"SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS", "PLAIN"} <= set(caps["SASL"]), caps
        with pytest.raises(poplib.error_proto, match="-ERR TLS is already active"):
            pop._shortcmd("STLS")
        pop.user(USER)
        assert pop.pass_(PASSWORD).startswith(b"+OK Logged in, 2 messages")
        assert [poplib_retr(pop, n) for n in (1, 2)] == [wire(m) for m in MESSAGES.values()]
        assert pop.quit().startswith(b"+OK")
    finally:
        pop.close()

    with pytest.raises(ssl.SSLCertVerificationError):
        poplib.POP3_SSL(
            HOST, srv.tlsPort, context=ssl.create_default_context(), timeout=TIMEOUT
        ).close()


# -- 6. STARTTLS command injection -----------------------------------------------------------


def test_stls_pipelined_command_is_discarded(spawn, pki):
    """
    CVE-2011-0411 class: "STLS\\r\\nCAPA\\r\\n" in one segment. The server answers STLS
    only; the TLS handshake right after its +OK succeeds (a plaintext CAPA reply would
    break it); the first reply over TLS is the one to our NOOP, not a CAPA reply (the
    injected command was neither answered in the clear nor executed under TLS), and the
    server logs that it discarded 6 bytes. Over TLS, STLS is refused.
    """
    srv = spawn()
    conn = Conn.connect(srv.port)
    try:
        conn.send(b"STLS\r\nCAPA\r\n")
        assert conn.readline() == "+OK Begin TLS negotiation"
        time.sleep(0.2)  # give a (wrong) plaintext CAPA reply the time to arrive
        conn.sock = context(pki["ca"]).wrap_socket(conn.sock, server_hostname="localhost")
        assert conn.buf == b""
        assert conn.cmd("NOOP") == "-ERR NOOP is not valid in this state"
        assert conn.cmd("STLS") == "-ERR TLS is already active"
        assert "SCRAM-SHA-256-PLUS" in sasl_list(conn.capa())
        assert conn.cmd(f"AUTH PLAIN {PLAIN_IR}").startswith("+OK Logged in")
        assert conn.cmd("QUIT").startswith("+OK")
    finally:
        conn.close()
    assert "discarded 6 bytes sent in the clear after STLS" in srv.log, srv.log

    # Implicit TLS: no STLS either.
    conn = Conn.implicit(srv.tlsPort, context(pki["ca"]))
    try:
        assert conn.greeting.startswith("+OK popserv")
        assert conn.cmd("STLS") == "-ERR TLS is already active"
        assert "STLS" not in conn.capa()
    finally:
        conn.close()


def test_stls_forgets_the_plaintext_user(spawn, pki):
    """
    RFC 2595 section 4: what the client said before STLS does not carry over. From a trusted
    address USER is accepted in the clear, but after STLS the PASS that would complete it is
    refused; USER/PASS over TLS then works.
    """
    srv = spawn(trusted=["127.0.0.1/32"])
    conn = Conn.connect(srv.port)
    try:
        assert conn.cmd(f"USER {USER}") == "+OK Send your password"
        conn.starttls(context(pki["ca"]))
        assert conn.cmd(f"PASS {PASSWORD}").startswith("-ERR"), "USER survived STLS"
        assert conn.cmd(f"USER {USER}") == "+OK Send your password"
        assert conn.cmd(f"PASS {PASSWORD}").startswith("+OK Logged in")
        assert conn.cmd("QUIT").startswith("+OK")
    finally:
        conn.close()


# -- 7. plaintext policy ---------------------------------------------------------------------


def test_plaintext_policy_untrusted_source(spawn, pki):
    """
    `trusted_networks = ["127.0.0.1/32"]`; from 127.0.0.2 without TLS: CAPA has STLS but
    no USER, and SASL without PLAIN/LOGIN; USER, AUTH PLAIN (with and without initial
    response) and AUTH LOGIN are refused with [AUTH] and the STLS hint; APOP, CRAM-MD5 and
    SCRAM-SHA-256 (flag "y": the client could bind, but no -PLUS is offered without TLS)
    still log in. After STLS on a 127.0.0.2 connection USER/PASS works. From 127.0.0.1
    (trusted) CAPA lists USER and PLAIN and USER/PASS works in the clear.
    """
    srv = spawn(trusted=["127.0.0.1/32"])
    source = "127.0.0.2"
    conn = Conn.connect(srv.port, source)
    try:
        assert conn.sock.getsockname()[0] == source
        caps = conn.capa()
        assert "STLS" in caps and "USER" not in caps, caps
        assert {"SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5"} <= set(sasl_list(caps)), caps
        assert not {"PLAIN", "LOGIN", "SCRAM-SHA-256-PLUS"} & set(sasl_list(caps)), caps
        assert conn.cmd(f"USER {USER}") == PLAINTEXT_REFUSED
        assert conn.cmd(f"PASS {PASSWORD}").startswith("-ERR")
        assert conn.cmd(f"AUTH PLAIN {PLAIN_IR}") == PLAINTEXT_REFUSED
        assert conn.cmd("AUTH PLAIN") == PLAINTEXT_REFUSED
        assert conn.cmd("AUTH LOGIN") == PLAINTEXT_REFUSED
        assert conn.cmd("AUTH SCRAM-SHA-256-PLUS").startswith("-ERR")  # no TLS, no binding
        assert conn.cmd("NOOP") == "-ERR NOOP is not valid in this state"  # still in sync
    finally:
        conn.close()

    conn = Conn.connect(srv.port, source)
    try:
        assert apop_login(conn).startswith("+OK Logged in, 2 messages")
        assert conn.retr(1) == wire(FIRST)
    finally:
        conn.close()
    conn = Conn.connect(srv.port, source)
    try:
        assert cram_md5_login(conn).startswith("+OK Logged in, 2 messages")
    finally:
        conn.close()
    conn = Conn.connect(srv.port, source)
    try:
        client = scramp.ScramClient(
            ["SCRAM-SHA-256"], USER, PASSWORD, channel_binding=("tls-server-end-point", b"x")
        )
        assert scram_login(conn, client).startswith("+OK Logged in, 2 messages")
    finally:
        conn.close()

    conn = Conn.connect(srv.port, source)
    try:
        conn.starttls(context(pki["ca"]))
        caps = conn.capa()
        assert "USER" in caps and "PLAIN" in sasl_list(caps), caps
        assert conn.cmd(f"USER {USER}") == "+OK Send your password"
        assert conn.cmd(f"PASS {PASSWORD}").startswith("+OK Logged in, 2 messages")
        assert conn.retr(2) == wire(SECOND)
        assert conn.cmd("QUIT").startswith("+OK")
    finally:
        conn.close()

    conn = Conn.connect(srv.port)
    try:
        caps = conn.capa()
        assert "USER" in caps and {"PLAIN", "LOGIN"} <= set(sasl_list(caps)), caps
        assert conn.cmd(f"USER {USER}") == "+OK Send your password"
        assert conn.cmd(f"PASS {PASSWORD}").startswith("+OK Logged in, 2 messages")
    finally:
        conn.close()


# -- 8. SCRAM-PLUS -------------------------------------------------------------------------


def end_point_binding(conn: Conn) -> bytes:
    """RFC 5929 tls-server-end-point: SHA-256 of the server certificate (ECDSA-SHA256)."""
    der = conn.sock.getpeercert(binary_form=True)
    return hashlib.sha256(der).digest()


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS"])
@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_scram_plus_channel_binding(spawn, pki, mechanism, mode):
    """
    SCRAM-…-PLUS with scramp's client and tls-server-end-point data from the certificate
    the server presented (our SHA-256 of its DER = what scramp computes itself): login, the
    server's final message verifies, RETR is byte-exact. A wrong binding value fails with
    -ERR [AUTH]; so does plain SCRAM with flag "y" (the client claims the server offers no
    -PLUS: a downgrade the server must detect, RFC 5802 section 6), while plain SCRAM with
    "n" still works over TLS.
    """
    srv = spawn()
    ctx = context(pki["ca"])

    def connect() -> Conn:
        if mode == "implicit":
            return Conn.implicit(srv.tlsPort, ctx)
        conn = Conn.connect(srv.port)
        conn.starttls(ctx)
        return conn

    conn = connect()
    try:
        data = end_point_binding(conn)
        assert data == scramp.core.CBindData.from_der(conn.sock.getpeercert(True)).data
        assert mechanism in sasl_list(conn.capa())
        client = scramp.ScramClient(
            [mechanism], USER, PASSWORD, channel_binding=("tls-server-end-point", data)
        )
        assert scram_login(conn, client).startswith("+OK Logged in, 2 messages")
        auth = conn.sent[-3].split()
        assert auth[:2] == ["AUTH", mechanism], conn.sent
        assert base64.b64decode(auth[2]).startswith(b"p=tls-server-end-point,,n=alice,r=")
        assert conn.retr(1) == wire(FIRST)
        assert conn.cmd("QUIT").startswith("+OK")
    finally:
        conn.close()

    base = mechanism.removesuffix("-PLUS")
    cases = [
        ([mechanism], ("tls-server-end-point", bytes(32)), "-ERR [AUTH]"),
        ([mechanism], ("tls-server-end-point", data[:-1] + bytes([data[-1] ^ 1])), "-ERR [AUTH]"),
        ([base], ("tls-server-end-point", data), "-ERR [AUTH] Authentication failed"),  # flag "y"
        ([base], None, "+OK Logged in"),  # flag "n"
    ]
    for mechanisms, binding, expected in cases:
        conn = connect()
        try:
            client = scramp.ScramClient(mechanisms, USER, PASSWORD, channel_binding=binding)
            reply = scram_login(conn, client)
            assert reply.startswith(expected), (mechanisms, binding, reply)
            if expected.startswith("-ERR"):
                assert conn.cmd("STAT") == "-ERR STAT is not valid in this state"
        finally:
            conn.close()


# -- 9. SASL EXTERNAL ----------------------------------------------------------------------


def test_sasl_external_client_certificate(spawn, pki, tmp_path):
    """
    With `tls_client_ca`: a client certificate (CN alice) signed by that CA makes CAPA list
    EXTERNAL, on the POP3S port and after STLS; `AUTH EXTERNAL =` logs in as alice, as does
    an authzid naming alice; another authzid fails. Without a client certificate EXTERNAL is
    not offered and AUTH EXTERNAL fails. curl `--cert` with AUTH=EXTERNAL logs in too. A
    certificate from an unknown CA never enables EXTERNAL, but a password still works.
    """
    srv = spawn(f'tls_client_ca = "{pki["ca"]}"\n')
    with_cert = context(pki["ca"], pki["client-alice"], pki["client-alice-key"])

    pop = poplib.POP3_SSL(HOST, srv.tlsPort, context=with_cert, timeout=TIMEOUT)
    try:
        assert "EXTERNAL" in pop.capa()["SASL"]
        assert pop._shortcmd("AUTH EXTERNAL =").startswith(b"+OK Logged in, 2 messages")
        assert poplib_retr(pop, 1) == wire(FIRST)
        pop.quit()
    finally:
        pop.close()

    pop = poplib.POP3(HOST, srv.port, timeout=TIMEOUT)
    try:
        assert "EXTERNAL" not in pop.capa().get("SASL", [])
        pop.stls(with_cert)
        assert "EXTERNAL" in pop.capa()["SASL"]
        with pytest.raises(poplib.error_proto, match="-ERR"):
            pop._shortcmd(f"AUTH EXTERNAL {b64('bob')}")
        reply = pop._shortcmd(f"AUTH EXTERNAL {b64(USER)}")
        assert reply.startswith(b"+OK Logged in, 2 messages")
        pop.quit()
    finally:
        pop.close()

    pop = poplib.POP3_SSL(HOST, srv.tlsPort, context=context(pki["ca"]), timeout=TIMEOUT)
    try:
        assert "EXTERNAL" not in pop.capa()["SASL"]
        with pytest.raises(poplib.error_proto, match="-ERR"):
            pop._shortcmd("AUTH EXTERNAL =")
        with pytest.raises(poplib.error_proto, match="not valid in this state"):
            pop.stat()
    finally:
        pop.close()

    if have("curl"):
        proc = curl(
            f"pop3s://{USER}@{HOST}:{srv.tlsPort}/2", pki["ca"], "--cert",
            str(pki["client-alice"]), "--key", str(pki["client-alice-key"]),
            "--login-options", "AUTH=EXTERNAL", home=tmp_path,
        )  # fmt: skip
        assert proc.returncode == 0, output(proc)
        assert "> AUTH EXTERNAL" in proc.stderr.decode(), output(proc)
        assert proc.stdout == wire(SECOND)

    # A certificate from an unknown CA does not break the connection (the client
    # may still use a password) but never names a user: no EXTERNAL.
    stranger = self_signed(tmp_path / "stranger", USER)
    foreign = context(pki["ca"], stranger["cert"], stranger["key"])
    pop = poplib.POP3_SSL(HOST, srv.tlsPort, context=foreign, timeout=TIMEOUT)
    try:
        assert "EXTERNAL" not in pop.capa()["SASL"]
        with pytest.raises(poplib.error_proto, match="-ERR"):
            pop._shortcmd("AUTH EXTERNAL =")
        pop.user(USER)
        pop.pass_(PASSWORD)
        assert pop.stat()[0] == 2
        pop.quit()
    finally:
        pop.close()


def test_sasl_external_email_identity(spawn, pki):
    """
    `tls_cert_user = "email"`: the client certificate's SAN e-mail alice@example.org is the
    user; `AUTH EXTERNAL =` logs in as that passwd user (its own Maildir, one message), not
    as alice (the CN), and an authzid "alice" is refused.
    """
    user = "alice@example.org"
    srv = spawn(
        f'tls_client_ca = "{pki["ca"]}"\ntls_cert_user = "email"\n',
        users={USER: "{PLAIN}wonderland", user: "{PLAIN}other"},
    )
    deliver(srv.maildir(user), SECOND, name="1700000009.M9P1.tls")
    ctx = context(pki["ca"], pki["client-alice"], pki["client-alice-key"])
    pop = poplib.POP3_SSL(HOST, srv.tlsPort, context=ctx, timeout=TIMEOUT)
    try:
        assert "EXTERNAL" in pop.capa()["SASL"]
        with pytest.raises(poplib.error_proto, match="-ERR"):
            pop._shortcmd(f"AUTH EXTERNAL {b64(USER)}")  # the CN is not the identity now
        reply = pop._shortcmd("AUTH EXTERNAL =")
        assert reply.startswith(b"+OK Logged in, 1 message"), reply
        assert pop.uidl()[1] == [b"1 1700000009.M9P1.tls"]
        assert poplib_retr(pop, 1) == wire(SECOND)
        pop.quit()
    finally:
        pop.close()
    srv.waitForLog("session end: user=alice@example.org ip=127.0.0.1 tls=yes mechanism=EXTERNAL")


# -- 10. certificate reload ------------------------------------------------------------------


def presented(port: int, ctx: ssl.SSLContext, starttls: bool = False) -> bytes:
    """The DER certificate the server presents to a new connection."""
    conn = Conn.connect(port) if starttls else Conn.implicit(port, ctx)
    try:
        if starttls:
            conn.starttls(ctx)
        der = conn.sock.getpeercert(binary_form=True)
        conn.cmd("QUIT")
        return der
    finally:
        conn.close()


def test_sighup_reloads_certificate_keeps_sessions(spawn, pki, tmp_path):
    """
    SIGHUP re-reads certificate and key: after the files are replaced by ones from a new
    CA, new connections (POP3S and STLS) get the new certificate, while a session opened
    (and logged in) before keeps working: STAT, RETR byte-exact, QUIT. A broken key file
    on the next SIGHUP is logged and the (new) certificate stays in use.
    """
    srv = spawn()
    # Only the old CA in the session's context: it can only be the old certificate.
    old_session = Conn.implicit(srv.tlsPort, context(pki["ca"]))
    try:
        assert old_session.cmd(f"USER {USER}") == "+OK Send your password"
        assert old_session.cmd(f"PASS {PASSWORD}").startswith("+OK Logged in")
        old = old_session.sock.getpeercert(binary_form=True)

        new_pki = makeTestPKI(tmp_path / "new-pki")
        # Both CAs have the same name, so no one context can verify both certificates:
        # poll without verification, then verify what was presented.
        anything = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        anything.check_hostname = False
        anything.verify_mode = ssl.CERT_NONE
        shutil.copyfile(new_pki["cert"], pki["cert"])
        shutil.copyfile(new_pki["key"], pki["key"])
        assert presented(srv.tlsPort, anything) == old  # nothing happens without SIGHUP
        os.kill(srv.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while (now := presented(srv.tlsPort, anything)) == old:
            assert time.monotonic() < deadline, "no new certificate after SIGHUP:\n" + srv.log
            time.sleep(0.05)
        assert now == ssl.PEM_cert_to_DER_cert(new_pki["cert"].read_text())
        assert presented(srv.tlsPort, context(new_pki["ca"])) == now
        assert presented(srv.port, context(new_pki["ca"]), starttls=True) == now
        with pytest.raises(ssl.SSLCertVerificationError):
            presented(srv.tlsPort, context(pki["ca"]))  # the old CA no longer fits

        pki["key"].write_text("not a key\n")
        os.kill(srv.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "TLS reload failed, keeping the old certificate" not in srv.log:
            assert time.monotonic() < deadline, srv.log
            time.sleep(0.05)
        assert presented(srv.tlsPort, anything) == now

        assert old_session.sock.getpeercert(binary_form=True) == old
        assert old_session.cmd("STAT") == f"+OK 2 {sum(len(wire(m)) for m in MESSAGES.values())}"
        assert old_session.retr(1) == wire(FIRST)
        assert old_session.retr(2) == wire(SECOND)
        assert old_session.cmd("QUIT").startswith("+OK")
    finally:
        old_session.close()
