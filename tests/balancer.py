"""
Test support: a real HAProxy (Debian's) in TCP mode in front of popserv,
sending the PROXY v2 header, from a configuration in a temporary directory.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

HOST = "127.0.0.1"


def requireHAProxy() -> str:
    """The haproxy binary; skip without it, unless on CI (CI set), where that fails."""
    found = shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)),
        None,
    )
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("haproxy is not installed (the Debian package haproxy; .ci/run adds it)")
        pytest.skip("haproxy is not installed")
    return found


def freePort() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class HAProxy:
    """
    C{haproxy -db -f DIR/haproxy.cfg}: one frontend on a free port of
    127.0.0.1 per backend given, each forwarding with C{send-proxy-v2} to its
    port, or round robin to its list of ports (a connection refused by one
    is sent to the next).
    """

    def __init__(self, directory: Path, backends: dict[str, int | list[int]]) -> None:
        self.binary = requireHAProxy()
        directory.mkdir(parents=True, exist_ok=True)
        self.config = directory / "haproxy.cfg"
        self.ports = {name: freePort() for name in backends}
        sections = [
            "global\n    maxconn 200\n",
            "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n"
            "    timeout server 60s\n",
        ]
        for name, backend in backends.items():
            ports = backend if isinstance(backend, list) else [backend]
            sections.append(
                f"listen {name}\n    bind {HOST}:{self.ports[name]}\n"
                "    balance roundrobin\n    option redispatch 1\n    retries 3\n"
                + "".join(
                    f"    server s{n} {HOST}:{port} send-proxy-v2\n"
                    for n, port in enumerate(ports, 1)
                )
            )
        self.config.write_text("\n".join(sections))
        self.proc: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 10) -> HAProxy:
        check = subprocess.run(
            [self.binary, "-c", "-f", str(self.config)], capture_output=True, text=True
        )
        assert check.returncode == 0, check.stdout + check.stderr
        self.proc = subprocess.Popen(
            [self.binary, "-db", "-f", str(self.config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + timeout
        for port in self.ports.values():
            while True:
                try:
                    socket.create_connection((HOST, port), timeout=1).close()
                    break
                except OSError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(f"haproxy did not start:\n{self.output()}") from None
                    time.sleep(0.05)
        return self

    def output(self) -> str:
        if self.proc is None or self.proc.stdout is None or self.proc.poll() is None:
            return ""
        return self.proc.stdout.read()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
