"""
The documentation builds without a warning, its generated settings reference
covers every setting, and its example plugin serves a session.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest

from support import REPO

sphinx = pytest.importorskip("sphinx", reason="sphinx is not installed (pip install '.[docs]')")
pytest.importorskip("pydoctor", reason="pydoctor is not installed (pip install '.[docs]')")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """sphinx-build -W over docs/ (pydoctor runs inside it, its warnings fatal too)."""
    out = tmp_path_factory.mktemp("docs")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            "-d",
            str(out / "doctrees"),
            str(REPO / "docs"),
            str(out / "html"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out / "html"


def test_docs_build_without_warnings(built):
    assert (built / "index.html").exists()
    assert (built / "api" / "index.html").exists()
    assert (built / "api" / "objects.inv").exists()


def test_settings_reference_lists_every_setting(built):
    from popserv.config import SETTINGS

    page = (built / "reference" / "settings.html").read_text()
    for declared in SETTINGS:
        assert f'id="confval-{declared.name}"' in page, declared.name
        assert f"--{declared.option}" in page, declared.option


def test_pages_link_into_the_api_reference(built):
    page = (built / "plugins" / "store.html").read_text()
    assert 'href="../api/popserv.interfaces.IMailStore.html"' in page
    target = built / "api" / "popserv.interfaces.IMailStore.html"
    assert target.exists()


def test_left_out_commands_are_unknown():
    """The guide says RPOP and LAST are left out on purpose."""
    from popserv.testing import connect, memoryServer

    factory, _ = memoryServer({"alice": "secret"})
    client = connect(factory)
    client.send(b"RPOP alice\r\nUSER alice\r\nPASS secret\r\nLAST\r\n")
    lines = client.lines()
    assert lines[0] == b"-ERR Unknown command"
    assert lines[-1] == b"-ERR Unknown command"


def test_example_plugin_serves_a_session(tmp_path):
    """The store and auth source of docs/plugins/index.rst, found on sys.path."""
    examples = tmp_path / "examples"
    shutil.copytree(REPO / "docs" / "examples", examples)
    (tmp_path / "mail.json").write_text(
        json.dumps({"alice": {"welcome-1": "Subject: hello\n\nHi Alice!\n"}})
    )
    script = textwrap.dedent(
        """
        import sys
        from twisted.cred.portal import Portal
        from popserv.auth.realm import MailboxRealm
        from twisted.internet.task import Clock
        from popserv.config import Config
        from popserv.limits import AuthPenalty
        from popserv.protocol import POP3Factory
        from popserv.registry import SourceContext, StoreContext, authSourceKind, storeKind
        from popserv.testing import connect
        from popserv.threads import synchronously

        config = Config(
            mail_location="jsonfile:mail.json",
            passdb=("static:alice=secret",),
            plugin_options={"static_ignore_case": True},
            base_dir=sys.argv[1],
        ).validated()
        storeKindName, storeArgs = config.store
        store = storeKind(storeKindName).makeStore(
            storeArgs, StoreContext(config.base_dir, synchronously)
        )
        (spec,) = config.authSources
        plugin = authSourceKind(spec.kind)
        checker = plugin.makeSource(
            spec.args,
            SourceContext(
                config.base_dir, synchronously, options=config.pluginOptions(plugin, spec.options)
            ),
        )
        clock = Clock()
        portal = Portal(MailboxRealm(store), [checker])
        client = connect(POP3Factory(portal, clock=clock, penalty=AuthPenalty(clock, cap=0)))
        client.send(b"USER bob\\r\\nPASS secret\\r\\nUSER ALICE\\r\\nPASS secret\\r\\n")
        client.send(b"STAT\\r\\nUIDL\\r\\nRETR 1\\r\\nQUIT\\r\\n")
        sys.stdout.buffer.write(client.output())
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        env={"PYTHONPATH": f"{examples}:{REPO}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.decode().split("\r\n")
    assert lines[1].startswith("-ERR [AUTH]"), lines  # bob is nobody's user
    assert lines[3].startswith("+OK"), lines  # ALICE: the ignore_case option
    assert lines[4].startswith("+OK 1 "), lines
    assert "1 welcome-1" in lines
    assert "Subject: hello" in lines and "Hi Alice!" in lines
