"""The layers hold: import-linter checks the contract in .importlinter."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from support import REPO


def test_import_contracts_are_kept():
    """Storage never imports the wire, sasl builds on auth, contracts import nothing..."""
    script = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    out = subprocess.run(
        [script, "--config", str(REPO / ".importlinter"), "--no-cache"],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout
