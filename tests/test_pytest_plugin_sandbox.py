"""popserv sandbox: a throw-away server over .eml files or an mbox, originals untouched."""

from __future__ import annotations

import mailbox
import os
import poplib
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from support import REPO


def sandbox(source: Path, *args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "popserv", "sandbox", str(source), "--port", "0", *args],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "Ctrl-C" in line or "cannot" in line:
            break
    return proc, "".join(lines)


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)
    assert proc.wait(15) == 0


def test_sandbox_over_eml_files(tmp_path):
    source = tmp_path / "samples"
    source.mkdir()
    (source / "a.eml").write_bytes(b"Subject: one\n\nfirst\n")
    (source / "b.eml").write_bytes(b"Subject: two\r\n\r\nsecond\r\n")
    (source / "notes.txt").write_text("not mail")
    proc, out = sandbox(source, "--password", "pw")
    try:
        port = int(re.search(r"127\.0\.0\.1, port (\d+)", out).group(1))
        work = re.search(r"served from a copy in (\S+) ", out).group(1)
        assert "2 message(s)" in out and "Thunderbird" in out and "fetchmail -f" in out
        assert f"curl -u sandbox:pw pop3://127.0.0.1:{port}/" in out
        pop = poplib.POP3("127.0.0.1", port, timeout=10)
        pop.user("sandbox")
        pop.pass_("pw")
        assert pop.retr(2)[1] == [b"Subject: two", b"", b"second"]
        pop.dele(1)
        pop.dele(2)
        pop.quit()
        if shutil.which("curl"):
            listing = subprocess.run(
                ["curl", "-s", "-u", "sandbox:pw", f"pop3://127.0.0.1:{port}/"],
                capture_output=True,
                timeout=30,
            )
            assert listing.returncode == 0 and listing.stdout.strip() == b""  # all deleted
        elif os.environ.get("CI"):
            pytest.fail("curl is not installed")
    finally:
        stop(proc)
    assert sorted(p.name for p in source.iterdir()) == ["a.eml", "b.eml", "notes.txt"]
    assert not os.path.exists(work)


def test_sandbox_over_an_mbox_with_tls(tmp_path):
    path = tmp_path / "box.mbox"
    box = mailbox.mbox(path)
    for n in range(3):
        box.add(f"From: x@example.org\nSubject: m{n}\n\nbody {n}\n".encode())
    box.close()
    proc, out = sandbox(path, "--tls", "--tls-port", "0", "--password", "pw")
    try:
        assert "3 message(s)" in out
        tlsPort = int(re.search(r"implicit TLS \(SSL/TLS\) on port (\d+)", out).group(1))
        cafile = re.search(r"CA file\s+(\S+)", out).group(1)
        import ssl

        context = ssl.create_default_context(cafile=cafile)
        pop = poplib.POP3_SSL("localhost", tlsPort, context=context, timeout=10)
        pop.user("sandbox")
        pop.pass_("pw")
        assert pop.stat()[0] == 3
        assert b"Subject: m2" in pop.retr(3)[1]
        pop.quit()
    finally:
        stop(proc)


def test_sandbox_missing_source(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "popserv", "sandbox", str(tmp_path / "nothing")],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0 and "no such directory or mbox file" in out.stderr


def test_sandbox_over_one_eml_file(tmp_path):
    path = tmp_path / "one.eml"
    path.write_bytes(b"Subject: alone\r\n\r\nbody\r\n")
    proc, out = sandbox(path, "--password", "pw")
    try:
        assert "1 message(s)" in out
        port = int(re.search(r"127\.0\.0\.1, port (\d+)", out).group(1))
        pop = poplib.POP3("127.0.0.1", port, timeout=10)
        pop.user("sandbox")
        pop.pass_("pw")
        assert pop.retr(1)[1] == [b"Subject: alone", b"", b"body"]
        pop.quit()
    finally:
        stop(proc)
    assert path.read_bytes() == b"Subject: alone\r\n\r\nbody\r\n"


def test_sandbox_refuses_a_file_that_is_no_mbox(tmp_path):
    """Not served as an empty mailbox: an error, and a failing exit status."""
    path = tmp_path / "notes.txt"
    path.write_bytes(b"Subject: not an mbox\r\n\r\nbody\r\n")
    proc, out = sandbox(path)
    assert proc.wait(15) == 1
    assert "cannot read" in out and "no 'From ' line first" in out, out
    assert "Ctrl-C" not in out


def test_sandbox_removes_its_copy_on_sigterm_and_sighup(tmp_path):
    source = tmp_path / "samples"
    source.mkdir()
    (source / "a.eml").write_bytes(b"Subject: one\r\n\r\nfirst\r\n")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        proc, out = sandbox(source)
        work = re.search(r"served from a copy in (\S+) ", out).group(1)
        assert os.path.isdir(work)
        proc.send_signal(sig)
        assert proc.wait(15) == 0, sig
        assert not os.path.exists(work), sig
    assert [p.name for p in source.iterdir()] == ["a.eml"]
