"""
TEST FIXTURE: a private Dovecot POP3 server (Debian's dovecot-pop3d) in a
temporary directory, for the proxy's end-to-end tests.

Dovecot refuses to read mail as root, so when the tests run as root the whole
instance (master included) runs as the C{dovecot} user (else C{nobody}) and
its directory is handed to that user; otherwise as the current user. It
takes users from a passwd-file, and master users (for the proxy's master-user
login) from a second, C{master = yes}, passdb. STLS with the given certificate.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

BINARY = "/usr/sbin/dovecot"


def available() -> bool:
    return os.path.exists(BINARY) and os.path.exists("/usr/lib/dovecot/pop3")


def _freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DovecotServer:
    def __init__(
        self,
        root: Path,
        users: dict[str, str],
        masters: dict[str, str] | None = None,
        cert: Path | None = None,
        key: Path | None = None,
    ) -> None:
        self.root = root
        self.port = _freePort()
        root.mkdir(parents=True, exist_ok=True)
        if os.getuid() == 0:
            name = "dovecot" if _exists("dovecot") else "nobody"
            entry = pwd.getpwnam(name)
            self.uid, self.gid, self.user = entry.pw_uid, entry.pw_gid, name
        else:
            entry = pwd.getpwuid(os.getuid())
            self.uid, self.gid, self.user = os.getuid(), os.getgid(), entry.pw_name
        group = _groupName(self.gid)
        (root / "passwd").write_text("".join(f"{u}:{{PLAIN}}{p}\n" for u, p in users.items()))
        (root / "masters").write_text(
            "".join(f"{u}:{{PLAIN}}{p}\n" for u, p in (masters or {}).items())
        )
        ssl = "ssl = no\n"
        if cert is not None and key is not None:
            shutil.copy(cert, root / "cert.pem")
            shutil.copy(key, root / "key.pem")
            ssl = f"ssl = yes\nssl_cert = <{root}/cert.pem\nssl_key = <{root}/key.pem\n"
        self.mail = root / "mail"
        self.mail.mkdir(exist_ok=True)
        self.log = root / "dovecot.log"
        self.config = root / "dovecot.conf"
        self.config.write_text(
            f"base_dir = {root}/run\n"
            f"state_dir = {root}/state\n"
            f"log_path = {self.log}\n"
            f"info_log_path = {self.log}\n"
            "protocols = pop3\n"
            "listen = 127.0.0.1\n" + ssl + "disable_plaintext_auth = no\n"
            "auth_mechanisms = plain login\n"
            "login_trusted_networks = 127.0.0.0/8\n"
            f"first_valid_uid = {self.uid}\nfirst_valid_gid = {self.gid}\n"
            f"default_internal_user = {self.user}\n"
            f"default_internal_group = {group}\n"
            f"default_login_user = {self.user}\n"
            f"mail_location = maildir:{self.mail}/%u/Maildir\n"
            "passdb {\n  driver = passwd-file\n  master = yes\n"
            f"  args = scheme=PLAIN {root}/masters\n}}\n"
            "passdb {\n  driver = passwd-file\n"
            f"  args = scheme=PLAIN username_format=%u {root}/passwd\n}}\n"
            "userdb {\n  driver = static\n"
            f"  args = uid={self.uid} gid={self.gid} home={self.mail}/%u\n}}\n"
            "service pop3-login {\n  inet_listener pop3 {\n    address = 127.0.0.1\n"
            f"    port = {self.port}\n  }}\n  inet_listener pop3s {{\n    port = 0\n  }}\n"
            "  chroot =\n}\n"
            "service anvil {\n  chroot =\n}\n"
        )
        for sub in ("run", "state"):
            (root / sub).mkdir(exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    def maildir(self, user: str) -> Path:
        return self.mail / user / "Maildir"

    def start(self, timeout: float = 20) -> DovecotServer:
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in [dirpath, *(os.path.join(dirpath, f) for f in dirnames + filenames)]:
                os.chown(name, self.uid, self.gid)
        os.chmod(self.root, 0o755)
        self.proc = subprocess.Popen(
            [BINARY, "-F", "-c", str(self.config)],
            user=self.uid,
            group=self.gid,
            stdout=open(self.root / "stderr.log", "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 1) as s:
                    if s.recv(100).startswith(b"+OK"):
                        return self
            except OSError:
                time.sleep(0.1)
            if self.proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError("dovecot did not start:\n" + self.logText())

    def logText(self) -> str:
        text = ""
        for path in (self.root / "stderr.log", self.log):
            if path.exists():
                text += path.read_text(errors="replace")
        return text

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # (the directory is the caller's to remove)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


def _groupName(gid: int) -> str:
    import grp

    return grp.getgrgid(gid).gr_name
