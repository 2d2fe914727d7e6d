"""
The API reference: pydoctor over C{popserv}, built with the Sphinx pages.

When Sphinx starts, pydoctor writes the API reference to C{api/} in the
output directory and its intersphinx inventory beside it, so the pages'
C{:py:class:} references link into it; every pydoctor warning becomes a
Sphinx warning (fatal under C{sphinx-build -W}).

Twisted's names are linked to docs.twisted.org through an inventory made
here from the installed Twisted's sources (no network needed): every public
module, class, function and method, with the URL pydoctor gives it there.

Run alone, C{python docs/_ext/popserv_apidocs.py OUTDIR} builds only the API
reference.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

TWISTED_API = "https://docs.twisted.org/en/stable/api/"

#: The repository: the code pydoctor reads.
REPO = Path(__file__).resolve().parents[2]

#: A pydoctor warning line: PATH:LINE: text.
_WARNING = re.compile(r"^(?P<where>\S+?:\d+): (?P<text>.*)$")


_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)
_DEFINITIONS = (ast.ClassDef, *_FUNCTIONS)


def _twistedObjects() -> list[tuple[str, str, str]]:
    """(name, role, URL relative to L{TWISTED_API}) for the installed Twisted's public API."""
    import twisted

    root = Path(twisted.__file__).parent
    found = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(
            d for d in subdirectories if d != "test" and not d.startswith("_")
        )
        for file in sorted(files):
            if not file.endswith(".py") or (file.startswith("_") and file != "__init__.py"):
                continue
            path = Path(directory, file)
            parts = path.relative_to(root.parent).with_suffix("").parts
            module = ".".join(parts[:-1] if file == "__init__.py" else parts)
            found.append((module, "py:module", f"{module}.html"))
            try:
                tree = ast.parse(path.read_bytes())
            except SyntaxError:
                continue
            for node in tree.body:
                if not isinstance(node, _DEFINITIONS) or node.name.startswith("_"):
                    continue
                name = f"{module}.{node.name}"
                if isinstance(node, ast.ClassDef):
                    found.append((name, "py:class", f"{name}.html"))
                    for member in node.body:
                        if isinstance(member, _FUNCTIONS) and not member.name.startswith("_"):
                            found.append(
                                (
                                    f"{name}.{member.name}",
                                    "py:method",
                                    f"{name}.html#{member.name}",
                                )
                            )
                else:
                    found.append((name, "py:function", f"{module}.html#{node.name}"))
    return found


def writeTwistedInventory(path: Path) -> Path:
    """Write an intersphinx inventory (version 2) of Twisted's API to C{path}."""
    import twisted

    lines = "".join(f"{name} {role} 1 {uri} -\n" for name, role, uri in _twistedObjects())
    header = (
        "# Sphinx inventory version 2\n# Project: Twisted\n"
        f"# Version: {twisted.__version__}\n"
        "# The remainder of this file is compressed using zlib.\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header.encode() + zlib.compress(lines.encode()))
    return path


def pydoctorCommand(output: Path, twistedInventory: Path) -> list[str]:
    """The pydoctor command line that builds the API reference into C{output}."""
    return [
        sys.executable,
        "-m",
        "pydoctor",
        "--quiet",
        "--warnings-as-errors",
        "--docformat=epytext",
        "--project-name=popserv",
        f"--project-base-dir={REPO}",
        f"--intersphinx-file={twistedInventory}::{TWISTED_API}",
        f"--html-output={output}",
        str(REPO / "popserv"),
    ]


def buildAPI(output: Path, scratch: Path) -> tuple[int, list[str]]:
    """Run pydoctor; return its exit code and its warnings, one a line."""
    inventory = writeTwistedInventory(scratch / "twisted-objects.inv")
    result = subprocess.run(
        pydoctorCommand(output, inventory),
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    lines = (result.stdout + result.stderr).splitlines()
    return result.returncode, [line for line in lines if line.strip()]


def reportWarnings(code: int, lines: list[str], expected: list[str], log) -> None:
    """
    Pass pydoctor's warnings on as Sphinx warnings, except those matching a
    pattern of C{expected} (logged as information). pydoctor's closing
    summary lines repeat its warnings; they count only if it failed without any.
    """
    warnings = [line for line in lines if _WARNING.match(line)]
    for line in warnings:
        match = _WARNING.match(line)
        assert match is not None
        if any(pattern in line for pattern in expected):
            log.info("pydoctor (expected, see pydoctor_expected_warnings): %s", line)
        else:
            log.warning("pydoctor: %s", match["text"], location=match["where"])
    if code and not warnings:
        log.warning("pydoctor failed (exit code %d): %s", code, " / ".join(lines))


def _onConfigInited(app, config) -> None:
    from sphinx.util import logging

    log = logging.getLogger(__name__)
    output = Path(app.outdir) / "api"
    scratch = Path(app.doctreedir) / "popserv-apidocs"
    code, lines = buildAPI(output, scratch)
    reportWarnings(code, lines, list(config.pydoctor_expected_warnings), log)
    if not (output / "objects.inv").exists():
        log.warning("pydoctor wrote no API reference (exit code %d)", code)
        return
    config.intersphinx_mapping = {
        **(config.intersphinx_mapping or {}),
        "popserv-api": ("api/", str(output / "objects.inv")),
        "twisted": (TWISTED_API, str(scratch / "twisted-objects.inv")),
    }


def setup(app):
    app.add_config_value("pydoctor_expected_warnings", [], "env", [list])
    # Before intersphinx validates its mapping (priority 800).
    app.connect("config-inited", _onConfigInited, priority=400)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/_build/html/api")
    code, lines = buildAPI(target, target.parent / ".popserv-apidocs")
    print("\n".join(lines))
    sys.exit(code)
