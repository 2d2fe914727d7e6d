"""
The pytest plugin as another project sees it: a wheel of this checkout
installed into a directory of its own, and a separate test project (a
temporary directory with only a conftest.py and tests) run by a pytest
subprocess, its tests beside pytest-asyncio's, pytest-twisted's and plain
ones. The docs' examples (docs/examples/testing) are among its tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from support import REPO

EXAMPLES = REPO / "docs" / "examples" / "testing"

CONFTEST = '''
"""Nothing about the POP3 server here: the installed plugin brings its fixtures."""

import pytest


@pytest.fixture
def mailbox(pop3_server):
    pop3_server.add_user("dave", "pw")
    return pop3_server
'''

TEST_TWISTED = """
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.mail.pop3 import AdvancedPOP3Client


@pytest_twisted.inlineCallbacks
def test_twisted_client(pop3_server):
    pop3_server.add_user("carol", "pw")
    pop3_server.deliver("carol", b"Subject: t\\r\\n\\r\\ntwisted\\r\\n")
    client = AdvancedPOP3Client()
    yield connectProtocol(TCP4ClientEndpoint(reactor, pop3_server.host, pop3_server.port), client)
    yield client.login(b"carol", b"pw")  # APOP: the greeting has a timestamp
    assert (yield client.listSize()) == [23]
    lines = yield client.retrieve(0)
    assert lines[-1] == b"twisted"
    yield client.delete(0)
    yield client.quit()
    assert len(pop3_server.deleted("carol")) == 1
"""

TEST_PLAIN = """
import os
import poplib
import signal
import socket

import popserv


def test_plain():
    assert 1 + 1 == 2


def test_the_installed_popserv():
    assert popserv.__file__.startswith(os.environ["POPSERV_SITE"])


def test_conftest_fixture(mailbox):
    pop = poplib.POP3(mailbox.host, mailbox.port, timeout=10)
    pop.user("dave")
    pop.pass_("pw")
    assert pop.stat() == (0, 0)
    pop.quit()


def test_state_left_behind(pop3_server):
    pop3_server.add_user("frank", "pw")
    pop3_server.deliver("frank", b"Subject: left\\r\\n\\r\\nx\\r\\n")
    pop3_server.fail("USER", "-ERR [SYS/TEMP] injected")
    pop3_server.strictness(bare_lf=False, max_line=1000)
    pop = poplib.POP3(pop3_server.host, pop3_server.port, timeout=10)
    pop.sock.sendall(b"NOOP\\r\\n")  # a connection left open


def test_nothing_left_over(pop3_server):
    assert pop3_server.transcript() == [] and pop3_server.messages("frank") == []
    sock = socket.create_connection((pop3_server.host, pop3_server.port), timeout=10)
    sock.sendall(b"USER frank\\nPASS pw\\n")  # bare LF: production takes it
    reader = sock.makefile("rb")
    lines = [reader.readline() for _ in range(3)]
    assert lines[1].startswith(b"+OK") and lines[2].startswith(b"-ERR"), lines  # no frank
    assert pop3_server.transcript(connection=1)[1] == "C: USER frank"


def test_the_server_killed(pop3_server):
    os.kill(pop3_server.pid, signal.SIGKILL)


def test_the_next_test_has_a_server(pop3_server):
    pop3_server.add_user("gina", "pw")
    pop = poplib.POP3(pop3_server.host, pop3_server.port, timeout=10)
    pop.user("gina")
    pop.pass_("pw")
    pop.quit()


def test_session_server_keeps_state_1(pop3_server_session):
    pop3_server_session.add_user("erin", "pw")
    pop3_server_session.deliver("erin", b"Subject: kept\\r\\n\\r\\nx\\r\\n")


def test_session_server_keeps_state_2(pop3_server_session, pop3_server):
    assert len(pop3_server_session.messages("erin")) == 1
    assert pop3_server.port != pop3_server_session.port  # two servers
    assert pop3_server.messages("erin") == []
"""

TEST_WORKER = """
import os


def test_where(pop3_server, pop3_server_session):
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    record = f"{worker} {pop3_server.pid} {pop3_server.port} {pop3_server_session.port}"
    with open(os.path.join(os.environ["WORKERS_DIR"], f"{worker}-{__name__}"), "w") as f:
        f.write(record)
"""


def _ci() -> bool:
    return bool(os.environ.get("CI"))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """This checkout's wheel installed (without its dependencies) into a directory."""
    pytest.importorskip("setuptools")
    tmp = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "-q"]
    build = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp.glob("popserv-*.whl")
    target = tmp / "site"
    install = subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr
    return target


def _env(site: Path) -> dict[str, str]:
    path = [str(site)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    path = [p for p in path if Path(p).resolve() != REPO]  # only the installed popserv
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path), POPSERV_SITE=str(site))


def test_separate_project(site, tmp_path):
    env = _env(site)
    have = subprocess.run(
        [sys.executable, "-c", "import pytest_asyncio, pytest_twisted"],
        env=env,
        capture_output=True,
        cwd=tmp_path,
    )
    if have.returncode != 0:
        if _ci():
            pytest.fail("pytest-asyncio and pytest-twisted (the test extra) are not installed")
        pytest.skip("pytest-asyncio or pytest-twisted is not installed")
    project = tmp_path / "project"
    project.mkdir()
    (project / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    (project / "test_twisted_client.py").write_text(TEST_TWISTED)
    (project / "test_plain.py").write_text(TEST_PLAIN)
    for example in EXAMPLES.glob("test_*.py"):
        shutil.copy(example, project / example.name)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert " passed" in output and "failed" not in output and "skipped" not in output, output
    assert "18 passed" in output, output  # 6 poplib, 2 asyncio, 1 twisted, 9 plain


def test_separate_project_under_xdist(site, tmp_path):
    """pytest -n 2: each worker its own servers; the order-dependent tests kept in order."""
    env = _env(site)
    have = subprocess.run([sys.executable, "-c", "import xdist"], env=env, cwd=tmp_path)
    if have.returncode != 0:
        if _ci():
            pytest.fail("pytest-xdist (the test extra) is not installed")
        pytest.skip("pytest-xdist is not installed")
    project = tmp_path / "project"
    project.mkdir()
    (project / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    (project / "test_plain.py").write_text(TEST_PLAIN)
    shutil.copy(EXAMPLES / "test_with_poplib.py", project)
    for name in ("a", "b", "c", "d"):
        (project / f"test_worker_{name}.py").write_text(TEST_WORKER)
    workers = tmp_path / "workers"
    workers.mkdir()
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:twisted"]
        + ["-n", "2", "--dist", "loadfile", "-rfEs"],
        cwd=project,
        env=dict(env, WORKERS_DIR=str(workers)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0 and "19 passed" in output, output
    seen: dict[str, set[tuple[str, ...]]] = {}
    for record in workers.iterdir():
        worker, *servers = record.read_text().split()
        seen.setdefault(worker, set()).add(tuple(servers))
    assert set(seen) == {"gw0", "gw1"}, seen  # (four files: both workers get some)
    assert all(len(servers) == 1 for servers in seen.values()), seen  # one pair a worker
    (a,), (b,) = seen.values()
    assert not set(a) & set(b), seen  # no pid, no port shared


def test_plugin_module_imports_no_twisted(site):
    """Loading the plugin into a test process brings in no Twisted (and no reactor)."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, popserv.testserver.plugin\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'twisted'))",
        ],
        env=_env(site),
        capture_output=True,
        text=True,
        cwd=site,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
