"""The README's promises: its embedding example runs, and the tree is lint-clean."""

from __future__ import annotations

import poplib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support import REPO


def readme_example() -> str:
    text = (REPO / "README.rst").read_text()
    block = text.split(".. code-block:: python\n\n", 1)[1]
    lines = []
    for line in block.splitlines():
        if line and not line.startswith("    "):
            break
        lines.append(line[4:])
    return "\n".join(lines).strip() + "\n"


def test_readme_embedding_example_serves_mail(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(readme_example())
    proc = subprocess.Popen(
        [sys.executable, str(script), "tcp:0:interface=127.0.0.1"],
        stdout=subprocess.PIPE,
        text=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    try:
        m = re.match(r"listening on (\d+)", proc.stdout.readline())
        assert m, "example did not start"
        pop = poplib.POP3("127.0.0.1", int(m.group(1)), timeout=10)
        pop.user("alice")
        pop.pass_("secret")
        assert pop.retr(1)[1] == [b"Subject: hello", b"", b"Hi Alice!"]
        pop.quit()
    finally:
        proc.terminate()
        proc.wait(10)


def test_readme_gives_the_two_commands():
    text = (REPO / "README.rst").read_text()
    assert "pip install . && twistd -n popserv --config etc/popserv.conf" in text
    test_command = "pip install '.[test]' && pytest"
    assert test_command in text
    assert test_command in (REPO / ".ci" / "run").read_text()


def test_ruff_clean():
    beside = Path(sys.executable).parent / "ruff"
    ruff = str(beside) if beside.exists() else shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed")
    result = subprocess.run(
        [ruff, "check", "--no-cache", "popserv", "twisted", "tests", "etc/popserv.tac"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
