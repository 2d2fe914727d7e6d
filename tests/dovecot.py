"""
A real Dovecot POP3 server for the tests (Debian's C{dovecot-pop3d}), started
once per test session from a private configuration in a temporary directory
and stopped by its pid.

Dovecot refuses to access mail as root: run as root (CI), its mail processes
run as C{nobody}, who owns the Maildirs; otherwise everything runs as the
current user. Each user's line in the passwd-file may set Dovecot settings
of its own (C{pop3_uidl_format}, C{pop3_save_uidl}), so one server serves
every format. C{master} is a master user (C{USER*master}). Without the
binary the tests skip, unless C{CI} is set: then they fail.

The session's C{dovecot} fixture serves the UIDL and migration tests; the
proxy's tests start one of their own (other passwords and master user, STLS
with a test certificate) from the same class.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "Dovecot",
    "dovecotBinary",
    "startDovecot",
    "dovecot",
    "PASSWORD",
    "MASTER_PASSWORD",
    "USERS",
]

PASSWORD = "secret"
MASTER_PASSWORD = "master-secret"

#: The users of the C{dovecot} fixture, each with Dovecot settings of its own.
USERS: dict[str, dict[str, str]] = {
    "alice": {},  # the default, %08Xu%08Xv
    "bob": {"pop3_uidl_format": "%v.%u"},
    "carol": {"pop3_uidl_format": "%f"},
    # Saved UIDLs (P fields) win over the format popserv is told.
    "dave": {"pop3_uidl_format": "%v.%u", "pop3_save_uidl": "yes"},
    "erin": {},
    "frank": {},
    "gina": {},
    "hugo": {"pop3_uidl_format": "%v.%u"},
}


def dovecotBinary() -> str | None:
    for candidate in (shutil.which("dovecot"), "/usr/sbin/dovecot"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def _freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Dovecot:
    """
    One Dovecot serving C{root/USER/Maildir} over POP3 on 127.0.0.1:C{port}.

    @ivar users: the users, with extra userdb fields each (C{name=value}).
    @param passwords: a user's own password (else L{PASSWORD}).
    @param masters: the master users and their passwords (else C{master},
        L{MASTER_PASSWORD}).
    @param cert: with C{key}, PEM files for STLS (else no TLS).
    @param extra: more configuration lines.
    """

    def __init__(
        self,
        binary: str,
        users: dict[str, dict[str, str]],
        passwords: dict[str, str] | None = None,
        masters: dict[str, str] | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        extra: str = "",
    ) -> None:
        self.binary = binary
        self.passwords = passwords or {}
        self.masters = {"master": MASTER_PASSWORD} if masters is None else masters
        self.extra = extra
        self.dir = Path(tempfile.mkdtemp(prefix="popserv-dovecot-"))
        self.dir.chmod(0o755)  # nobody walks into the Maildirs below
        self.root = self.dir / "mail"
        self.root.mkdir()
        self.port = _freePort()
        self.users = users
        self.asRoot = os.geteuid() == 0
        entry = pwd.getpwnam("nobody") if self.asRoot else pwd.getpwuid(os.getuid())
        self.uid, self.gid = entry.pw_uid, entry.pw_gid
        self.pid: int | None = None
        self.ssl = "ssl = no\n"
        if cert is not None and key is not None:
            shutil.copy(cert, self.dir / "cert.pem")
            shutil.copy(key, self.dir / "key.pem")
            self.ssl = (
                f"ssl = yes\nssl_cert = <{self.dir}/cert.pem\nssl_key = <{self.dir}/key.pem\n"
            )
        self._write()

    def _write(self) -> None:
        run = self.dir / "run"
        run.mkdir()
        lines = []
        for user, extra in self.users.items():
            fields = " ".join(f"userdb_{k}={v.replace('%', '%%')}" for k, v in extra.items())
            home = self.root / user
            password = self.passwords.get(user, PASSWORD)
            lines.append(f"{user}:{{PLAIN}}{password}:{self.uid}:{self.gid}::{home}::{fields}")
        (self.dir / "passwd").write_text("\n".join(lines) + "\n")
        (self.dir / "masters").write_text(
            "".join(f"{u}:{{PLAIN}}{p}\n" for u, p in self.masters.items())
        )
        if self.asRoot:
            internal = "default_internal_user = dovecot\ndefault_login_user = dovenull\n"
        else:
            name = pwd.getpwuid(os.getuid()).pw_name
            internal = (
                f"default_internal_user = {name}\ndefault_login_user = {name}\n"
                "service pop3-login {\n  chroot =\n}\nservice anvil {\n  chroot =\n}\n"
            )
        (self.dir / "dovecot.conf").write_text(
            f"base_dir = {run}\n"
            f"state_dir = {run}/state\n"
            f"log_path = {self.dir}/dovecot.log\n"
            "protocols = pop3\n"
            "listen = 127.0.0.1\n" + self.ssl + "disable_plaintext_auth = no\n"
            "auth_mechanisms = plain\n"
            "auth_master_user_separator = *\n"
            f"first_valid_uid = {min(self.uid, 500)}\n"
            f"mail_location = maildir:{self.root}/%u/Maildir\n"
            + internal
            + "passdb {\n  driver = passwd-file\n  master = yes\n"
            f"  args = scheme=PLAIN {self.dir}/masters\n}}\n"
            "passdb {\n  driver = passwd-file\n"
            f"  args = scheme=PLAIN username_format=%u {self.dir}/passwd\n}}\n"
            "userdb {\n  driver = passwd-file\n"
            f"  args = username_format=%u {self.dir}/passwd\n}}\n"
            "service pop3-login {\n  inet_listener pop3 {\n    address = 127.0.0.1\n"
            f"    port = {self.port}\n  }}\n  inet_listener pop3s {{\n    port = 0\n  }}\n}}\n"
            + self.extra
        )

    def maildir(self, user: str) -> Path:
        """C{user}'s Maildir (made, owned by the mail uid)."""
        path = self.root / user / "Maildir"
        for sub in ("cur", "new", "tmp"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        for folder, _, _ in os.walk(self.root / user):
            os.chown(folder, self.uid, self.gid)
        return path

    def deliver(self, user: str, name: str, message: bytes) -> Path:
        """A message file in C{user}'s new/, as an MTA would leave it."""
        path = self.maildir(user) / "new" / name
        path.write_bytes(message)
        os.chown(path, self.uid, self.gid)
        return path

    def start(self) -> None:
        self.pid = subprocess.Popen(
            [self.binary, "-F", "-c", str(self.dir / "dovecot.conf")],
            stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "stderr.log", "wb"),
        ).pid
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"dovecot did not start: {self.log()}")

    def log(self) -> str:
        text = ""
        for name in ("dovecot.log", "stderr.log"):
            try:
                text += (self.dir / name).read_text(errors="replace")
            except OSError:
                pass
        return text

    def stop(self) -> None:
        pid, self.pid = self.pid, None
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


def startDovecot(users: dict[str, dict[str, str]], **options: Any) -> Dovecot:
    """
    A running Dovecot (C{options}: L{Dovecot}'s), or a skip (a failure
    under CI) without the binary.
    """
    binary = dovecotBinary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("dovecot is not installed (apt-get install dovecot-pop3d)")
        pytest.skip("dovecot is not installed")
    server = Dovecot(binary, users, **options)
    server.start()
    return server


@pytest.fixture(scope="session")
def dovecot():
    """A running Dovecot with L{USERS} (one per test module that uses it)."""
    server = startDovecot(USERS)
    yield server
    server.stop()
