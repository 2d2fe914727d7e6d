"""Configuration, twistd options, the embedding API, the tac file and packaging."""

from __future__ import annotations

import gc
import os
import poplib
import re
import shutil
import ssl
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, loadApplication
from twisted.python import usage

import popserv
from popserv.auth.scramkeys import SCRAM_KEY_FILE, _readKey, loadKeyFile
from popserv.config import ConfigError, loadConfig
from popserv.sasl import ScramSHA256
from popserv.tap import Options
from popserv.tap import makeService as tapMakeService
from support import REPO, startTwistd, twistdCommand


@pytest.fixture
def files(tmp_path):
    (tmp_path / "passwd").write_text("u:{PLAIN}p\n")
    return tmp_path


def parse(*argv):
    options = Options()
    options.parseOptions(list(argv))
    return options


def test_options_contract(files):
    """The option names other tools drive the server with."""
    o = parse(
        "--listen",
        "tcp:110",
        "--listen",
        "tcp:1110:interface=127.0.0.1",
        "--passwd",
        str(files / "passwd"),
        "--mail-location",
        "maildir:/var/mail/%d/%n/Maildir",
    )
    assert o.config.listen == ("tcp:110", "tcp:1110:interface=127.0.0.1")
    assert o.config.location.template == "/var/mail/%d/%n/Maildir"
    assert o.config.timeout == 600


def test_help_documents_every_option():
    text = str(Options())
    for option in (
        "--config",
        "--listen",
        "--passwd",
        "--mail-location",
        "--timeout",
        "--hostname",
        "--max-bad-commands",
        "--no-apop",
        "--no-create-maildirs",
    ):
        assert option in text, option


@pytest.mark.parametrize(
    "argv,message",
    [
        ([], "passwd"),
        (["--passwd", "x"], "mail_location"),
        (
            ["--passwd", "x", "--mail-location", "imap:/x"],
            "unknown mail storage kind .imap. \\(installed: maildir, mbox, memory, pgsql\\)",
        ),
        (["--passwd", "x", "--mail-location", "/m/%q"], "unknown variable"),
        (["--passwd", "x", "--mail-location", "/m/%u", "--timeout", "0"], "timeout"),
        (["--config", "/nonexistent/popserv.conf"], "cannot read"),
    ],
)
def test_bad_options_are_usage_errors(argv, message):
    with pytest.raises(usage.UsageError, match=message):
        parse(*argv)


def test_config_file_with_overrides_and_relative_paths(files):
    conf = files / "popserv.conf"
    conf.write_text(
        'listen = "tcp:1110"\npasswd = "passwd"\nmail_location = "mail/%n"\ntimeout = 900\n'
    )
    o = parse("--config", str(conf), "--timeout", "1200")
    assert o.config.listen == ("tcp:1110",)
    assert o.config.timeout == 1200
    assert o.config.passwdPath == str(files / "passwd")
    assert o.config.location.template == str(files / "mail/%n")


@pytest.mark.parametrize(
    "text,message",
    [
        ("lisen = []\n", "unknown setting 'lisen'"),
        ("timeout = 'soon'\n", "timeout has the wrong type"),
        ("listen = [1]\n", "listen must be a list"),
        ("= broken", "popserv.conf"),
    ],
)
def test_bad_config_files(files, text, message):
    conf = files / "popserv.conf"
    conf.write_text(text)
    with pytest.raises(ConfigError, match=message):
        loadConfig(conf)


def test_the_plugin_freezes_startup_objects_once_running(files, monkeypatch):
    """twistd's service takes its startup objects out of later full collections."""
    scheduled = []
    monkeypatch.setattr(
        "twisted.internet.reactor.callWhenRunning", lambda f, *a: scheduled.append(f)
    )
    options = parse(
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "--passwd",
        str(files / "passwd"),
        "--mail-location",
        str(files / "mail/%n"),
    )
    tapMakeService(options)
    assert len(scheduled) == 1 and gc.get_freeze_count() == 0
    try:
        scheduled[0]()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_make_service_builds_one_listener_per_endpoint(files):
    service = popserv.makeService(
        listen=["tcp:0:interface=127.0.0.1", "unix:/tmp/x.sock"],
        passwd=str(files / "passwd"),
        mail_location=str(files / "mail/%n"),
    )
    assert IService.providedBy(service)
    children = list(service)
    assert len(children) == 2
    assert all(isinstance(c, StreamServerEndpointService) for c in children)
    assert isinstance(service.factory, popserv.POP3Factory)


def test_key_file_is_made_once_private_and_then_kept(tmp_path, monkeypatch):
    path = str(tmp_path / "key")
    key = loadKeyFile(path)
    assert len(key) == 32 and loadKeyFile(path) == key
    assert os.stat(path).st_mode & 0o777 == 0o600
    # Another process won the race between our read and our link: its key counts.
    other = tmp_path / "other"
    real = _readKey
    calls = []

    def losing(p):
        calls.append(p)
        if len(calls) == 1:
            other.write_bytes(b"w" * 32)
            raise FileNotFoundError(p)
        return real(p)

    monkeypatch.setattr("popserv.auth.scramkeys._readKey", losing)
    assert loadKeyFile(str(other)) == b"w" * 32
    assert sorted(os.listdir(tmp_path)) == ["key", "other"]  # no candidate left behind


def test_a_short_key_file_is_refused_not_replaced(tmp_path):
    (tmp_path / "key").write_bytes(b"short")
    with pytest.raises(ValueError):
        loadKeyFile(str(tmp_path / "key"))
    assert (tmp_path / "key").read_bytes() == b"short"


def test_scram_fake_salts_come_from_the_key_in_the_mail_root(files):
    """Every process over this mail root invents the same salt for an unknown user."""
    factory = popserv.makeService(
        listen=["tcp:0:interface=127.0.0.1"],
        passwd=str(files / "passwd"),
        mail_location=str(files / "mail/%n"),
    ).factory
    key = (files / "mail" / SCRAM_KEY_FILE).read_bytes()
    expected = ScramSHA256(key).fakeKeys("ghost")
    assert factory.mechanisms["SCRAM-SHA-256"].fakeKeys("ghost") == expected
    assert ScramSHA256().fakeKeys("ghost") != expected  # not the per-process default


def test_make_service_rejects_bad_endpoint_before_listening(files):
    with pytest.raises(ConfigError, match="bad endpoint"):
        popserv.makeService(
            listen=["nonsense:1"], passwd=str(files / "passwd"), mail_location=str(files / "%n")
        )


def test_twistd_lists_and_documents_the_plugin(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [*twistdCommand(), "popserv", "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    for option in ("--listen", "--passwd", "--mail-location", "--config"):
        assert option in out.stdout


def test_tac_loads_through_the_public_api():
    application = loadApplication(str(REPO / "etc" / "popserv.tac"), "python")
    service = IService(application)
    (top,) = list(service)
    assert top.name == "popserv"


def demo_copy(tmp_path: Path) -> Path:
    """A copy of etc/ listening on a free port, so the demo maildir stays untouched."""
    etc = tmp_path / "etc"
    shutil.copytree(REPO / "etc", etc)
    conf = etc / "popserv.conf"
    text = re.sub(
        r"^listen = .*$", 'listen = ["tcp:0:interface=127.0.0.1"]', conf.read_text(), flags=re.M
    )
    text = re.sub(
        r"^listen_tls = .*$", 'listen_tls = ["tcp:0:interface=127.0.0.1"]', text, flags=re.M
    )
    conf.write_text(text)
    return etc


def run_twistd(tmp_path, *argv):
    """Start twistd; return it with its ports: {"plain": n, "tls": n} (as listening)."""
    proc = startTwistd(list(argv), tmp_path, start_new_session=True)
    lines = []
    ports = {}
    for line in proc.stdout:
        lines.append(line)
        m = re.search(r"POP3Factory (\(TLS\) )?starting on (\d+)", line)
        if m:
            ports["tls" if m.group(1) else "plain"] = int(m.group(2))
        if "Main loop" in line or ("plain" in ports and "tls" in ports):
            return proc, ports
    raise AssertionError("server did not start:\n" + "".join(lines))


@pytest.mark.parametrize("how", ["plugin", "tac"])
def test_demo_configuration_serves_the_demo_maildir(tmp_path, how):
    """The README's demo: user demo/demo, a few messages, via the plugin and the tac."""
    etc = demo_copy(tmp_path)
    if how == "plugin":
        argv = ["popserv", "--config", str(etc / "popserv.conf")]
    else:
        argv = ["-y", str(etc / "popserv.tac")]
    proc, ports = run_twistd(tmp_path, *argv)
    port = ports["plain"]
    try:
        pop = poplib.POP3("127.0.0.1", port, timeout=10)
        pop.user("demo")
        pop.pass_("demo")
        count, _ = pop.stat()
        assert count == 3
        _, lines, _ = pop.retr(1)
        assert b"Subject: Welcome to popserv" in lines
        pop.quit()
        if shutil.which("curl"):
            out = subprocess.run(
                ["curl", "-s", f"pop3://demo:demo@127.0.0.1:{port}/1"],
                capture_output=True,
                timeout=30,
            )
            assert b"Subject: Welcome to popserv" in out.stdout
        # POP3S with the demo's throw-away self-signed certificate
        pop = poplib.POP3_SSL(
            "127.0.0.1", ports["tls"], timeout=10, context=ssl._create_unverified_context()
        )
        pop.user("demo")
        pop.pass_("demo")
        assert pop.stat()[0] == 3
        pop.quit()
    finally:
        proc.terminate()
        proc.wait(15)


def installed_python_check(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_installed_plugin_is_discoverable(tmp_path):
    """getPlugins(IServiceMaker) finds popserv from the installed copy, not the checkout."""
    found = installed_python_check(
        "import popserv, sys\n"
        "from twisted.plugin import getPlugins\n"
        "from twisted.application.service import IServiceMaker\n"
        "print(popserv.__file__)\n"
        "print(sorted({p.tapname for p in getPlugins(IServiceMaker)}))\n",
        tmp_path,
    )
    assert found.returncode == 0, found.stderr
    where, names = found.stdout.splitlines()
    if Path(where).resolve().is_relative_to(REPO / "popserv"):
        pytest.skip("popserv is not installed (an editable install points at the checkout)")
    assert "'popserv'" in names


def test_wheel_contents(tmp_path):
    """The wheel ships the plugin shim but no twisted/__init__.py, dropin.cache or tests."""
    pytest.importorskip("setuptools")
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("popserv-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/popserv_plugins.py" in names
    sources = {p.relative_to(REPO).as_posix() for p in (REPO / "popserv").rglob("*.py")}
    assert sources <= set(names), sources - set(names)  # no subpackage left out
    assert "popserv/py.typed" in names
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert not any("dropin.cache" in n or n.startswith("tests/") for n in names)


def test_importing_popserv_installs_no_reactor(tmp_path):
    """Embedders choose their reactor after importing popserv."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, popserv, popserv.tap, popserv.admin, popserv.testing, popserv.metrics\n"
            "print('twisted.internet.reactor' in sys.modules)",
        ],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.stdout.strip() == "False", out.stderr
