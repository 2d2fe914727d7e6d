"""
Stores and auth sources are plugins: a third-party package on sys.path adds
a C{kind:} without touching popserv, and a real server serves from it.
"""

from __future__ import annotations

import os
import poplib
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from twisted.plugin import IPlugin
from zope.interface.verify import verifyObject

from popserv.registry import (
    IAuthSourceKind,
    IStoreKind,
    UnknownKind,
    authSourceKind,
    splitSpec,
    storeKind,
    storeKinds,
)
from support import REPO, startTwistd

#: A third party's plugin module: a store serving one message per file of a
#: directory, and an auth source of user=password pairs with an option.
THIRD_PARTY = textwrap.dedent(
    """
    import os

    from twisted.cred.checkers import ICredentialsChecker
    from twisted.cred.credentials import IUsernamePassword
    from twisted.cred.error import UnauthorizedLogin
    from twisted.internet.defer import fail, succeed
    from twisted.plugin import IPlugin
    from zope.interface import implementer

    from popserv.errors import UnknownUser
    from popserv.interfaces import IMailbox, IMailStore, MessageInfo
    from popserv.registry import IAuthSourceKind, IStoreKind
    from popserv.settings import BOOL, Setting


    class Reader:  # (from before transferForm: without it, the message as it is)
        def __init__(self, data):
            self.data = data

        def read(self, size):
            chunk, self.data = self.data[:size], self.data[size:]
            return chunk

        def close(self):
            pass


    @implementer(IMailbox)
    class Mailbox:
        def __init__(self, directory):
            self.directory = directory

        def listMessages(self):
            names = sorted(os.listdir(self.directory))
            infos = []
            for name in names:
                with open(os.path.join(self.directory, name), "rb") as f:
                    data = f.read().replace(b"\\r\\n", b"\\n").replace(b"\\n", b"\\r\\n")
                infos.append(MessageInfo("tiny-" + name, len(data), data))
            return infos

        def openMessage(self, info):
            return Reader(info.key)

        def removeMessages(self, infos):
            for info in infos:
                os.unlink(os.path.join(self.directory, info.uid[5:]))
            return []

        def close(self):
            pass


    @implementer(IMailStore)
    class Store:
        description = "tiny"

        def __init__(self, directory):
            self.directory = directory

        def openMailbox(self, user):
            return Mailbox(os.path.join(self.directory, user))


    @implementer(IPlugin, IStoreKind)
    class TinyStore:
        name = "tiny"
        description = "a directory per user, a file per message"
        options = ()

        def check(self, args, baseDir):
            if not args:
                raise ValueError("tiny: needs a directory")

        def makeStore(self, args, context):
            return Store(os.path.join(context.baseDir, args))


    @implementer(ICredentialsChecker)
    class Checker:
        credentialInterfaces = (IUsernamePassword,)

        def __init__(self, users, uppercase):
            self.users = users
            self.uppercase = uppercase

        def requestAvatarId(self, credentials):
            password = self.users.get(credentials.username)
            if password is None:
                return fail(UnknownUser())
            given = credentials.password.decode()
            if self.uppercase:
                given = given.upper()
            if given != password:
                return fail(UnauthorizedLogin())
            return succeed(credentials.username)


    @implementer(IPlugin, IAuthSourceKind)
    class TinyAuth:
        name = "tinyauth"
        description = "user=password pairs, comma-separated"
        options = (Setting("uppercase", BOOL, False, "Compare passwords upper-cased."),)

        def check(self, args, baseDir):
            if "=" not in args:
                raise ValueError("tinyauth: user=password,...")

        def makeSource(self, args, context):
            users = dict(pair.split("=", 1) for pair in args.split(","))
            return Checker(users, context.options["uppercase"])


    tinyStore = TinyStore()
    tinyAuth = TinyAuth()
    """
)


@pytest.fixture(scope="module")
def thirdParty(tmp_path_factory) -> Path:
    """A sys.path entry holding popserv/plugins/tiny.py and nothing else of popserv."""
    site = tmp_path_factory.mktemp("site")
    plugins = site / "popserv" / "plugins"
    plugins.mkdir(parents=True)
    (plugins / "tiny.py").write_text(THIRD_PARTY)
    return site


def pythonPath(site: Path) -> str:
    return os.pathsep.join([str(REPO), str(site)])


def test_builtin_kinds_are_plugins():
    """maildir:, memory: and passwd-file: are popserv's own plugins, found like any other."""
    for name in ("maildir", "memory"):
        plugin = storeKind(name)
        assert verifyObject(IStoreKind, plugin) and verifyObject(IPlugin, plugin)
    plugin = authSourceKind("passwd-file")
    assert verifyObject(IAuthSourceKind, plugin)
    with pytest.raises(UnknownKind, match=r"unknown mail storage kind 'nope' \(installed: "):
        storeKind("nope")
    assert "maildir" in storeKinds()


def test_arguments_reach_their_plugin_untouched():
    """A URI after the kind is the plugin's to parse, never made into a path."""
    uri = "postgresql:///popserv?host=/run/postgresql"
    assert splitSpec(f"pgsql:{uri}", "maildir") == ("pgsql", uri)
    assert splitSpec("/var/mail/%u", "maildir") == ("maildir", "/var/mail/%u")
    assert splitSpec("maildir:~/Maildir", "maildir") == ("maildir", "~/Maildir")


def test_finding_a_store_imports_no_implementation():
    """Looking a kind up loads the plugin modules only, not the backends or cred."""
    code = (
        "import sys; from popserv.registry import storeKind, authSourceKind;"
        "storeKind('maildir'); authSourceKind('passwd-file');"
        "print(sorted(m for m in sys.modules if m.startswith('popserv')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "popserv.backends" not in out and "popserv.auth" not in out, out


def test_third_party_plugins_appear_in_help(thirdParty):
    """A third party's kinds and options are in twistd's help, derived like popserv's own."""
    proc = subprocess.run(
        [sys.executable, "-m", "twisted", "popserv", "--help"],
        env=dict(os.environ, PYTHONPATH=pythonPath(thirdParty)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "--tinyauth-uppercase" in proc.stdout, proc.stdout + proc.stderr
    stores = r"one of\s+maildir,\s+mbox,\s+memory,\s+pgsql,\s+tiny"
    assert re.search(stores, proc.stdout), proc.stdout
    kinds = r"KIND\s+one\s+of\s+ldap,\s+passwd-file,\s+pgsql,\s+tinyauth"
    assert re.search(kinds, proc.stdout), proc.stdout


def serve(site: Path, root: Path, *args: str) -> tuple[subprocess.Popen[str], int, list[str]]:
    proc = startTwistd(
        ["popserv", "--listen", "tcp:0:interface=127.0.0.1", *args],
        root,
        env={"PYTHONPATH": pythonPath(site)},
    )
    lines: list[str] = []
    found = threading.Event()
    port: list[int] = []

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"POP3Factory starting on (\d+)", line)
            if m:
                port.append(int(m.group(1)))
                found.set()
        found.set()

    threading.Thread(target=reader, daemon=True).start()
    if not found.wait(30) or not port:
        proc.terminate()
        proc.wait(10)
        raise AssertionError("popserv did not start:\n" + "".join(lines))
    return proc, port[0], lines


def stop(proc: subprocess.Popen[str], lines: list[str]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    print("".join(lines))  # shown if the test failed


def test_third_party_store_and_auth_source_serve_a_session(thirdParty, tmp_path):
    """
    A store and an auth source from a directory on sys.path serve a real POP3
    session, with the source's option given in a [[passdb]] table.
    """
    (tmp_path / "drops" / "alice").mkdir(parents=True)
    (tmp_path / "drops" / "alice" / "1").write_bytes(b"Subject: tiny\n\nfrom a plugin\n")
    (tmp_path / "popserv.conf").write_text(
        'mail_location = "tiny:drops"\n'
        "[[passdb]]\n"
        'kind = "tinyauth"\n'
        'args = "alice=SECRET"\n'
        "uppercase = true\n"
    )
    proc, port, lines = serve(thirdParty, tmp_path, "--config", "popserv.conf")
    try:
        pop = poplib.POP3("127.0.0.1", port, timeout=10)
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            pop.user("bob")
            pop.pass_("secret")
        pop.user("alice")
        pop.pass_("secret")  # upper-cased by the source's option
        assert pop.stat() == (1, 32)
        assert pop.uidl(1).split()[-1] == b"tiny-1"
        assert pop.retr(1)[1] == [b"Subject: tiny", b"", b"from a plugin"]
        pop.dele(1)
        pop.quit()
        assert not (tmp_path / "drops" / "alice" / "1").exists()
    finally:
        stop(proc, lines)


def test_third_party_option_from_the_command_line(thirdParty, tmp_path):
    """On the command line, a kind's option is --KIND-OPTION and configures the one source."""
    (tmp_path / "drops" / "carol").mkdir(parents=True)
    proc, port, lines = serve(
        thirdParty,
        tmp_path,
        "--mail-location",
        "tiny:drops",
        "--passdb",
        "tinyauth:carol=PW",
        "--tinyauth-uppercase",
    )
    try:
        pop = poplib.POP3("127.0.0.1", port, timeout=10)
        pop.user("carol")
        pop.pass_("pw")
        assert pop.stat() == (0, 0)
        pop.quit()
    finally:
        stop(proc, lines)


def test_two_plugins_of_one_name_are_refused(tmp_path):
    """A third party's kind named like another is an error naming both, not a coin toss."""
    plugins = tmp_path / "popserv" / "plugins"
    plugins.mkdir(parents=True)
    (plugins / "clash.py").write_text(
        "from twisted.plugin import IPlugin\n"
        "from zope.interface import implementer\n"
        "from popserv.registry import IStoreKind\n"
        "@implementer(IPlugin, IStoreKind)\n"
        "class Other:\n"
        "    name = 'maildir'\n"
        "    description = options = ''\n"
        "other = Other()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", "from popserv.registry import storeKind; storeKind('maildir')"],
        env=dict(os.environ, PYTHONPATH=pythonPath(tmp_path)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "two plugins are called 'maildir'" in out.stderr, out.stderr
    assert "clash.Other" in out.stderr and "MaildirKind" in out.stderr
