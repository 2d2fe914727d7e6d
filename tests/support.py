"""
Test support: a real popserv process (the twistd plugin) on 127.0.0.1 over a
Maildir tree in a temporary directory, and Maildir helpers.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_counter = 0


def deliver(maildir: Path, message: bytes, sub: str = "new", name: str | None = None) -> Path:
    """Deliver a message the Maildir way: write in tmp/, rename into new/ (or cur/)."""
    global _counter
    for d in ("tmp", "new", "cur"):
        (maildir / d).mkdir(parents=True, exist_ok=True)
    if name is None:
        _counter += 1
        name = f"{int(time.time())}.M{_counter}P{os.getpid()}.testhost"
    tmp = maildir / "tmp" / name
    tmp.write_bytes(message)
    final = maildir / sub / name
    os.rename(tmp, final)
    return final


def age_directories(maildir: Path, seconds: float = 60) -> None:
    """Directory mtimes as of a while ago: a listing made now can be trusted (cached)."""
    past = time.time() - seconds
    for sub in ("cur", "new"):
        os.utime(maildir / sub, (past, past))


def twistdCommand() -> list[str]:
    script = Path(sys.executable).parent / "twistd"
    if script.exists():
        return [sys.executable, str(script)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def startTwistd(
    args: list[str],
    cwd: Path,
    env: dict[str, str] | None = None,
    logToStdout: bool = True,
    **popen: object,
) -> subprocess.Popen[str]:
    """`twistd -n ARGS` with this checkout's popserv, its log on the pipe it returns."""
    options = ["-n", "--pidfile="] + (["--logfile=-"] if logToStdout else [])
    return subprocess.Popen(
        [*twistdCommand(), *options, *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


class ServerProcess:
    """popserv started with `twistd -n popserv --config FILE`, listening on a free port."""

    def __init__(
        self,
        root: Path,
        users: dict[str, str],
        extra: str = "",
        listen: str = "tcp:0:interface=127.0.0.1",
        listenTLS: str | None = None,
        grace: int = 2,
        penalty: int = 0,
    ) -> None:
        self.root = root
        self.mailRoot = root / "mail"
        self.mailRoot.mkdir(parents=True, exist_ok=True)
        passwd = root / "passwd"
        passwd.write_text("".join(f"{u}:{p}\n" for u, p in users.items()))
        self.config = root / "popserv.conf"
        self.config.write_text(
            f'listen = ["{listen}"]\n'
            + (f'listen_tls = ["{listenTLS}"]\n' if listenTLS else "")
            + 'passwd = "passwd"\n'
            'mail_location = "maildir:mail/%d/%n/Maildir"\n'
            'hostname = "test.invalid"\n'
            f"shutdown_grace = {grace}\n"
            # failed logins answered at once unless a test is about the penalty
            f"auth_penalty = {penalty}\n" + extra
        )
        self.listenTLS = listenTLS
        self.proc: subprocess.Popen[str] | None = None
        self.port: int | None = None
        self.tlsPort: int | None = None
        self.output: list[str] = []

    def maildir(self, user: str) -> Path:
        local, _, domain = user.rpartition("@") if "@" in user else (user, "", "")
        return (
            self.mailRoot / domain / local / "Maildir"
            if domain
            else self.mailRoot / local / "Maildir"
        )

    def start(self, timeout: float = 30) -> ServerProcess:
        self.proc = startTwistd(
            ["popserv", "--config", str(self.config)], self.root, start_new_session=True
        )
        ready = threading.Event()

        def reader() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.output.append(line)
                m = re.search(r"POP3Factory (\(TLS\) )?(?:\(PROXY\) )?starting on (\d+)", line)
                if m:
                    if m.group(1):
                        self.tlsPort = int(m.group(2))
                    else:
                        self.port = int(m.group(2))
                    if self.port is not None and (self.tlsPort or not self.listenTLS):
                        ready.set()
            ready.set()

        threading.Thread(target=reader, daemon=True).start()
        if not ready.wait(timeout) or self.port is None:
            self.stop()
            raise RuntimeError("popserv did not start:\n" + "".join(self.output))
        return self

    @property
    def log(self) -> str:
        return "".join(self.output)

    def waitForLog(self, text: str, timeout: float = 10) -> str:
        """The log once it contains C{text} (log lines trail the events they report)."""
        deadline = time.time() + timeout
        while text not in self.log:
            if time.time() > deadline:
                raise AssertionError(f"{text!r} not logged:\n{self.log}")
            time.sleep(0.02)
        return self.log

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, as in a crash."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


def have(program: str) -> bool:
    return shutil.which(program) is not None


def makeTestPKI(directory: Path, clientNames: tuple[str, ...] = ("alice",)) -> dict[str, Path]:
    """
    TEST FIXTURE ONLY: a throw-away CA, a server certificate for localhost and
    127.0.0.1 signed by it, and client certificates (CN = each name, e-mail
    NAME@example.org). Returns the paths: ca, cert, key, and client-NAME /
    client-NAME-key for each client.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def issue(subject, key, issuer, issuerKey, extensions):
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
        )
        for ext, critical in extensions:
            builder = builder.add_extension(ext, critical)
        return builder.sign(issuerKey, hashes.SHA256())

    def write(path: Path, data: bytes) -> Path:
        path.write_bytes(data)
        return path

    def pem(cert) -> bytes:
        return cert.public_bytes(serialization.Encoding.PEM)

    def keyPEM(key) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    caKey = ec.generate_private_key(ec.SECP256R1())
    ca = issue(
        name("popserv test CA"),
        caKey,
        name("popserv test CA"),
        caKey,
        [
            (x509.BasicConstraints(ca=True, path_length=None), True),
            (
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                True,
            ),
        ],
    )
    paths = {"ca": write(directory / "ca.pem", pem(ca))}
    serverKey = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    server = issue(
        name("localhost"),
        serverKey,
        ca.subject,
        caKey,
        [
            (san, False),
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        ],
    )
    paths["cert"] = write(directory / "cert.pem", pem(server))
    paths["key"] = write(directory / "key.pem", keyPEM(serverKey))
    for client in clientNames:
        clientKey = ec.generate_private_key(ec.SECP256R1())
        cert = issue(
            name(client),
            clientKey,
            ca.subject,
            caKey,
            [
                (x509.SubjectAlternativeName([x509.RFC822Name(f"{client}@example.org")]), False),
                (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False),
            ],
        )
        paths[f"client-{client}"] = write(directory / f"client-{client}.pem", pem(cert))
        paths[f"client-{client}-key"] = write(
            directory / f"client-{client}-key.pem", keyPEM(clientKey)
        )
    return paths
