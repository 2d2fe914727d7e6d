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


def twistdCommand() -> list[str]:
    script = Path(sys.executable).parent / "twistd"
    if script.exists():
        return [sys.executable, str(script)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class ServerProcess:
    """popserv started with `twistd -n popserv --config FILE`, listening on a free port."""

    def __init__(self, root: Path, users: dict[str, str], extra: str = "",
                 listen: str = "tcp:0:interface=127.0.0.1") -> None:
        self.root = root
        self.mailRoot = root / "mail"
        self.mailRoot.mkdir(parents=True, exist_ok=True)
        passwd = root / "passwd"
        passwd.write_text("".join(f"{u}:{p}\n" for u, p in users.items()))
        self.config = root / "popserv.conf"
        self.config.write_text(
            f'listen = ["{listen}"]\n'
            'passwd = "passwd"\n'
            'mail_location = "maildir:mail/%d/%n/Maildir"\n'
            'hostname = "test.invalid"\n' + extra
        )
        self.proc: subprocess.Popen[str] | None = None
        self.port: int | None = None
        self.output: list[str] = []

    def maildir(self, user: str) -> Path:
        local, _, domain = user.rpartition("@") if "@" in user else (user, "", "")
        return self.mailRoot / domain / local / "Maildir" if domain else \
            self.mailRoot / local / "Maildir"

    def start(self, timeout: float = 30) -> ServerProcess:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            [*twistdCommand(), "-n", "--pidfile=", "--logfile=-", "popserv",
             "--config", str(self.config)],
            cwd=self.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True,
        )
        ready = threading.Event()

        def reader() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.output.append(line)
                m = re.search(r"POP3Factory starting on (\d+)", line)
                if m and self.port is None:
                    self.port = int(m.group(1))
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
