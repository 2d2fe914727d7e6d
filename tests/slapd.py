"""
A real OpenLDAP C{slapd} for the tests, from Debian's C{slapd} package,
started once per test session in a temporary directory with a generated
C{slapd.conf} (C{-f}) and a database loaded with C{slapadd}. It listens on
127.0.0.1 (C{ldap://} with StartTLS, and C{ldaps://}, with a certificate of
a throw-away CA) and on an C{ldapi://} socket, and is stopped by its pid.

The users' passwords are hashed by OpenLDAP's own C{slappasswd} ({SSHA},
{SSHA512} via its pw-sha2 module, {ARGON2} via its argon2 module) and by
popserv ({CRYPT} as SHA512-crypt), so that both the directory (binding as
the user) and popserv (reading userPassword) check each scheme.

Without the binaries the tests that need them skip, unless C{CI} is set:
then they fail. tests/conftest.py makes the C{slapd} fixture available. (Not C{ldap.py}: on
the tests' path that name would hide python-ldap's C{ldap} module.)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from support import makeTestPKI

__all__ = ["Slapd", "slapd", "SUFFIX", "PEOPLE", "READER_DN", "READER_PASSWORD", "USERS"]

SLAPD = "/usr/sbin/slapd"
SLAPADD = "/usr/sbin/slapadd"
MODULES = "/usr/lib/ldap"
SCHEMA = "/etc/ldap/schema"
SUFFIX = "dc=example,dc=org"
PEOPLE = f"ou=people,{SUFFIX}"
READER_DN = f"cn=reader,{SUFFIX}"
READER_PASSWORD = "r3ader-Secret-9"
#: The directory's manager, for tests that change entries.
ADMIN_DN = f"cn=admin,{SUFFIX}"
ADMIN_PASSWORD = "adm1n-Secret-4"

#: uid -> (password, the scheme it is stored with, extra attributes).
USERS: dict[str, tuple[str | None, str | None, dict[str, str]]] = {
    "alice": ("wonderland", "{SSHA}", {"mail": "alice@example.org"}),
    "bob": (
        "builder",
        "{SSHA512}",
        {"mail": "bob@example.org", "employeeNumber": "45", "departmentNumber": "7"},
    ),
    "carol": ("c4rol-argon", "{ARGON2}", {"mail": "carol@example.org"}),
    "dave": ("d4ve-crypt", "{CRYPT}", {"mail": "dave@example.org"}),
    "erin": ("erin-pw", "{SSHA}", {"mail": "erin@example.org", "employeeType": "TRUE"}),
    "frank": (None, None, {"mail": "frank@example.org"}),
    "grace": ("gr(a)ce*pw", "{SSHA}", {"mail": "grace@example.org"}),
    # a plaintext-equivalent secret: APOP, CRAM-MD5 and SCRAM in the lookup mode
    "henry": ("h3nry-clear", "{CLEARTEXT}", {"mail": "henry@example.org"}),
}


def _freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _slappasswd(password: str, scheme: str) -> str:
    module = {"{SSHA512}": ["-o", "module-load=pw-sha2"], "{ARGON2}": ["-o", "module-load=argon2"]}
    return subprocess.run(
        [
            "/usr/sbin/slappasswd",
            "-o",
            f"module-path={MODULES}",
            *module.get(scheme, []),
            "-h",
            scheme,
            "-s",
            password,
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def _hash(password: str, scheme: str) -> str:
    if scheme == "{CLEARTEXT}":
        return scheme + password
    if scheme == "{CRYPT}":
        from popserv.auth.schemes import hashPassword

        return "{CRYPT}" + hashPassword("SHA512-CRYPT", password).removeprefix("{SHA512-CRYPT}")
    return _slappasswd(password, scheme)


class Slapd:
    """
    One slapd in a temporary directory, stopped and started at will.

    @ivar url: C{ldap://127.0.0.1:PORT} (StartTLS available).
    @ivar ldapsURL: C{ldaps://127.0.0.1:PORT}.
    @ivar ldapiURL: C{ldapi://} with the socket's path, percent-encoded.
    @ivar ca: the CA certificate that verifies the server's.
    """

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="popserv-ldap-"))
        self.pki = makeTestPKI(self.root / "pki", clientNames=())
        self.ca = self.pki["ca"]
        self.port = _freePort()
        self.tlsPort = _freePort()
        self.socket = self.root / "ldapi"
        self.url = f"ldap://127.0.0.1:{self.port}"
        self.ldapsURL = f"ldaps://127.0.0.1:{self.tlsPort}"
        self.ldapiURL = "ldapi://" + quote(str(self.socket), safe="")
        self.conf = self.root / "slapd.conf"
        self.pidFile = self.root / "slapd.pid"
        self.logFile = self.root / "slapd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def initialize(self) -> None:
        data = self.root / "data"
        data.mkdir()
        self.conf.write_text(
            "\n".join(
                [
                    *(f"include {SCHEMA}/{s}.schema" for s in ("core", "cosine", "inetorgperson")),
                    f"modulepath {MODULES}",
                    "moduleload back_mdb",
                    "moduleload pw-sha2",
                    "moduleload argon2",
                    f"pidfile {self.pidFile}",
                    f"TLSCACertificateFile {self.pki['ca']}",
                    f"TLSCertificateFile {self.pki['cert']}",
                    f"TLSCertificateKeyFile {self.pki['key']}",
                    "database mdb",
                    f'suffix "{SUFFIX}"',
                    f'rootdn "{ADMIN_DN}"',
                    f"rootpw {ADMIN_PASSWORD}",
                    f"directory {data}",
                    "maxsize 16777216",
                    # userPassword: only the reader reads it; anyone may bind with it.
                    "access to attrs=userPassword",
                    f'    by dn.exact="{READER_DN}" read',
                    "    by anonymous auth",
                    "    by * none",
                    "access to * by * read",
                    "",
                ]
            )
        )
        entries = [
            f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\n"
            "o: Example\n",
            f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n",
            f"dn: {READER_DN}\nobjectClass: organizationalRole\nobjectClass: "
            f"simpleSecurityObject\ncn: reader\n"
            f"userPassword: {_slappasswd(READER_PASSWORD, '{SSHA}')}\n",
        ]
        for uid, (password, scheme, extra) in USERS.items():
            lines = [
                f"dn: uid={uid},{PEOPLE}",
                "objectClass: inetOrgPerson",
                f"uid: {uid}",
                f"cn: {uid}",
                f"sn: {uid}",
                *(f"{k}: {v}" for k, v in extra.items()),
            ]
            if password is not None and scheme is not None:
                lines.append(f"userPassword: {_hash(password, scheme)}")
            entries.append("\n".join(lines) + "\n")
        ldif = self.root / "data.ldif"
        ldif.write_text("\n".join(entries))
        subprocess.run(
            [SLAPADD, "-f", str(self.conf), "-l", str(ldif)], check=True, capture_output=True
        )
        self.start()

    def start(self, timeout: float = 30) -> None:
        """Start slapd and wait until it answers on its TCP port."""
        log = open(self.logFile, "ab")
        # -d 0 keeps slapd in the foreground: its pid is the process's.
        self.proc = subprocess.Popen(
            [
                SLAPD,
                "-f",
                str(self.conf),
                "-h",
                f"{self.url}/ {self.ldapsURL}/ {self.ldapiURL}",
                "-d",
                "0",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "slapd did not start:\n" + self.logFile.read_text()
                    ) from None
                time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM to slapd's pid; wait until it is gone."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def slapd() -> Iterator[Slapd]:
    """A running slapd (see the module docstring); skipped without slapd, unless CI is set."""
    if not (os.path.exists(SLAPD) and os.path.exists(SLAPADD)):
        if os.environ.get("CI"):
            pytest.fail("slapd is not installed (Debian: slapd ldap-utils)")
        pytest.skip("slapd is not installed (Debian: slapd ldap-utils)")
    server = Slapd()
    try:
        server.initialize()
        yield server
    finally:
        server.cleanup()
