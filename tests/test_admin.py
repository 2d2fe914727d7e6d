"""The administrator's command, end to end (subprocesses, like an admin runs it)."""

from __future__ import annotations

import os
import poplib
import stat
import subprocess
import sys

import pytest

from popserv.auth.schemes import HASHING_SCHEMES, parseStoredPassword
from support import REPO, ServerProcess, makeTestPKI


def popserv(*args, stdin: bytes = b"", cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "popserv", *args],
        input=stdin,
        capture_output=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )


@pytest.fixture
def config(tmp_path):
    (tmp_path / "passwd").write_text("# users\nalice:{PLAIN}wonderland\n\n# end\n")
    os.chmod(tmp_path / "passwd", 0o640)
    conf = tmp_path / "popserv.conf"
    conf.write_text(
        'listen = ["tcp:0:interface=127.0.0.1"]\npasswd = "passwd"\n'
        'mail_location = "maildir:mail/%d/%n/Maildir"\n'
    )
    return conf


@pytest.mark.parametrize("scheme", list(HASHING_SCHEMES))
def test_pw_hashes_in_every_scheme(scheme):
    out = popserv("pw", "--scheme", scheme, "--password-stdin", stdin=b"s3cret pw\n")
    assert out.returncode == 0, out.stderr
    field = out.stdout.decode().strip()
    parsed, secret = parseStoredPassword(field)
    assert field.startswith("{" + scheme + "}")
    assert parsed.verify(b"s3cret pw", secret) and not parsed.verify(b"other", secret)


def test_pw_refuses_unknown_scheme_and_empty_password():
    assert popserv("pw", "--scheme", "ROT13", "--password-stdin", stdin=b"x\n").returncode == 64
    assert popserv("pw", "--password-stdin", stdin=b"\n").returncode == 64


def test_user_add_list_del_keep_comments_mode_and_group(config, tmp_path):
    passwd = tmp_path / "passwd"
    # A group other than the editor's own, as a server reading it as its
    # group has (root: any; anyone else: a supplementary group, if any).
    others = [g for g in os.getgroups() if g != os.getegid()]
    group = 65534 if os.geteuid() == 0 else (others[0] if others else None)
    if group is not None:
        os.chown(passwd, -1, group)
    out = popserv(
        "user",
        "add",
        "bob@example.org",
        "--config",
        str(config),
        "--scheme",
        "SHA512-CRYPT",
        "--password-stdin",
        stdin=b"builder\n",
    )
    assert out.returncode == 0, out.stderr
    text = passwd.read_text()
    assert text.startswith("# users\nalice:{PLAIN}wonderland\n\n# end\nbob@example.org:{SHA512")
    assert stat.S_IMODE(os.stat(passwd).st_mode) == 0o640
    listing = popserv("user", "list", "--passwd", str(passwd)).stdout.decode()
    assert listing == "alice\tPLAIN\nbob@example.org\tSHA512-CRYPT\n"
    again = popserv(
        "user", "add", "bob@example.org", "--passwd", str(passwd), "--password-stdin", stdin=b"x\n"
    )
    assert again.returncode == 1 and b"already exists" in again.stderr
    assert popserv("user", "del", "alice", "--passwd", str(passwd)).returncode == 0
    assert "alice" not in passwd.read_text() and "# end" in passwd.read_text()
    assert stat.S_IMODE(os.stat(passwd).st_mode) == 0o640
    assert group is None or os.stat(passwd).st_gid == group
    assert popserv("user", "del", "nobody", "--passwd", str(passwd)).returncode == 67
    assert (
        popserv(
            "user", "add", "bad:name", "--passwd", str(passwd), "--password-stdin", stdin=b"x\n"
        ).returncode
        == 64
    )
    assert not list(tmp_path.glob(".passwd.*"))  # no temporary files left behind


def test_deliver_then_fetch_with_poplib(config, tmp_path):
    """A message delivered with `popserv deliver` is served byte-exact, with its W= size."""
    message = b"From: a@example.org\nSubject: delivered\n\n.dot\n" + b"line\n" * 600_000 + b"end"
    out = popserv("deliver", "alice", "--config", str(config), "-v", stdin=message)
    assert out.returncode == 0, out.stderr
    path = out.stdout.decode().strip()
    name = os.path.basename(path)
    assert path.startswith(str(tmp_path / "mail" / "alice" / "Maildir" / "new"))
    crlf = len(message) + message.count(b"\n") + 2  # CRLF line ends, and a final CRLF
    assert f",S={len(message)},W={crlf}" in name
    assert os.listdir(tmp_path / "mail" / "alice" / "Maildir" / "tmp") == []
    server = ServerProcess(tmp_path / "srv", {"alice": "{PLAIN}wonderland"})
    server.mailRoot.rmdir()
    os.symlink(tmp_path / "mail", server.mailRoot)
    server.start()
    try:
        pop = poplib.POP3("127.0.0.1", server.port, timeout=10)
        pop.user("alice")
        pop.pass_("wonderland")
        (size,) = [int(x) for x in pop.list(1).split()[2:]]
        _, lines, _ = pop.retr(1)
        assert b"\r\n".join(lines) + b"\r\n" == message.replace(b"\n", b"\r\n") + b"\r\n"
        assert size == crlf
        pop.quit()
    finally:
        server.stop()


def test_deliver_to_unknown_user_is_ex_nouser(config):
    out = popserv("deliver", "nobody", "--config", str(config), stdin=b"x\n")
    assert out.returncode == 67 and b"no user nobody" in out.stderr


def test_uidl_prints_what_the_server_serves(config, tmp_path):
    for i in range(3):
        popserv("deliver", "alice", "--config", str(config), stdin=b"m%d\n" % i)
    out = popserv("uidl", "alice", "--config", str(config), "--sizes")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.decode().splitlines()
    assert [line.split()[0] for line in lines] == ["1", "2", "3"]
    names = sorted(os.listdir(tmp_path / "mail" / "alice" / "Maildir" / "new"))
    assert sorted(line.split()[1] for line in lines) == sorted(n.split(",")[0] for n in names)
    assert all(line.split()[2] == "4" for line in lines)


def test_check_config_good_and_broken(config, tmp_path):
    good = popserv("check-config", "--config", str(config))
    assert good.returncode == 0 and good.stdout == b"configuration OK\n"
    pki = makeTestPKI(tmp_path / "pki", ())
    (tmp_path / "passwd").write_text("alice:{PLAIN}x\nbroken line\nbob:{NOPE}y\n")
    config.write_text(
        'listen = ["nonsense:1"]\npasswd = "passwd"\nmail_location = "mail/%n"\n'
        f'create_maildirs = false\ntls_cert = "{pki["cert"]}"\ntls_key = "{pki["ca"]}"\n'
    )
    bad = popserv("check-config", "--config", str(config))
    assert bad.returncode == 1
    lines = bad.stdout.decode().splitlines()
    assert any(line.startswith("listen: bad endpoint 'nonsense:1'") for line in lines)
    assert any(line.endswith(":2: no user:password; line ignored") for line in lines)
    assert any("user bob: NOPE" in line for line in lines)
    assert any(line.startswith("user alice:") and "does not exist" in line for line in lines)
    assert any(line.startswith("tls: ") for line in lines)
    assert len(lines) == 5


def test_a_port_out_of_range_is_refused_with_one_line(config, tmp_path):
    """Not a configuration OK, then a traceback from twistd and from serve."""
    text = config.read_text()
    for endpoint in ("tcp:99999", "haproxy:tcp:port=70000:interface=127.0.0.1"):
        config.write_text(text.replace("tcp:0:interface=127.0.0.1", endpoint))
        bad = popserv("check-config", "--config", str(config))
        assert bad.returncode == 1 and b"is not 0-65535" in bad.stdout, bad.stdout
    served = popserv("serve", "--config", str(config), "--workers", "1")
    assert served.returncode != 0 and b"is not 0-65535" in served.stderr
    assert b"Traceback" not in served.stderr


def test_check_config_missing_file():
    out = popserv("check-config", "--config", "/nonexistent.conf")
    assert out.returncode == 64 and b"cannot read" in out.stderr


def test_selfsigned_writes_a_private_key_only_the_owner_reads(tmp_path):
    out = popserv("selfsigned", str(tmp_path / "tls"), "localhost", "mail.example.org")
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE(os.stat(tmp_path / "tls" / "key.pem").st_mode) == 0o600
    from popserv.tls import ServerTLS

    ServerTLS(str(tmp_path / "tls" / "cert.pem"), str(tmp_path / "tls" / "key.pem"))


def test_help_lists_every_subcommand():
    out = popserv("--help").stdout.decode()
    for command in ("pw", "user", "deliver", "check-config", "uidl", "selfsigned"):
        assert command in out


@pytest.mark.parametrize(
    "argv",
    [
        ["user", "add", "--passwd", "{passwd}", "carol", "--password-stdin"],
        ["user", "add", "carol", "--passwd", "{passwd}", "--password-stdin"],
        ["--passwd", "{passwd}", "user", "add", "--password-stdin", "carol"],
        ["user", "--passwd", "{passwd}", "add", "carol", "--password-stdin"],
    ],
)
def test_options_before_or_after_command_names(argv, tmp_path):
    """Options may stand before or after a command's (and an action's) name."""
    passwd = tmp_path / "passwd"
    passwd.write_text("alice:{PLAIN}x\n")
    out = popserv(*(a.format(passwd=passwd) for a in argv), stdin=b"pw\n")
    assert out.returncode == 0, out.stderr
    listed = popserv("user", "list", "--passwd", str(passwd))
    assert b"carol\tARGON2ID" in listed.stdout, listed


def test_serve_help_lists_every_setting():
    """popserv serve takes every setting twistd popserv takes, from the same declarations."""
    from popserv.config import SETTINGS

    out = popserv("serve", "--help")
    assert out.returncode == 0, out.stderr
    for declared in SETTINGS:
        assert f"--{declared.option}" in out.stdout.decode(), declared.name


def test_deliver_loads_no_tls_metrics_or_hash_library(config, tmp_path):
    """An MTA runs `popserv deliver` once per message: it loads only what delivery needs."""
    with open(config, "a") as f:  # settings whose checks need TLS and SASL
        f.write('tls_cert_user = "email"\nsasl_mechanisms = ["PLAIN"]\n')
    code = (
        "import atexit, runpy, sys\n"
        "atexit.register(lambda: print(' '.join(sys.modules), file=sys.stderr))\n"
        f"sys.argv = ['popserv', 'deliver', '--config', {str(config)!r}, 'alice']\n"
        "runpy.run_module('popserv', run_name='__main__')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=b"Subject: x\n\nhi\n",
        capture_output=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    loaded = set(out.stderr.decode().split())
    assert "popserv.backends.maildir.delivery" in loaded  # it did deliver, through the store
    heavy = {"OpenSSL", "cryptography", "prometheus_client", "passlib", "scramp", "argon2"}
    heavy |= {"bcrypt", "popserv.tls", "popserv.metrics", "popserv.protocol", "popserv.sasl"}
    assert not heavy & loaded, heavy & loaded
    assert len(list((tmp_path / "mail" / "alice" / "Maildir" / "new").iterdir())) == 1


def test_check_config_builds_every_source_and_the_store(tmp_path):
    """check-config builds the configured store and each --passdb source through its plugin."""
    (tmp_path / "passwd").write_text("alice:{PLAIN}x\n")
    conf = tmp_path / "popserv.conf"
    conf.write_text(
        'passwd = "passwd"\nmail_location = "memory:"\n'
        '[[passdb]]\nkind = "passwd-file"\nargs = "missing"\n'
    )
    out = popserv("check-config", "--config", str(conf))
    assert out.returncode == 1
    assert "passdb passwd-file:missing: cannot read" in out.stdout.decode(), out
    conf.write_text(
        'passwd = "passwd"\nmail_location = "memory:"\npassdb = ["passwd-file:passwd"]\n'
    )
    out = popserv("check-config", "--config", str(conf))
    assert out.returncode == 0 and out.stdout == b"configuration OK\n", out


def test_deliver_through_any_store_and_passdb(tmp_path):
    """
    deliver goes through the store's contract, whether its calls answer with
    Deferreds (maildir) or at once (memory), and refuses a user no auth
    source knows, also when they come from --passdb.
    """
    (tmp_path / "passwd").write_text("alice:{PLAIN}x\n")
    conf = tmp_path / "popserv.conf"
    conf.write_text('mail_location = "memory:"\npassdb = ["passwd-file:passwd"]\n')
    out = popserv("deliver", "alice", "-v", "--config", str(conf), stdin=b"Subject: x\n\nhi\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(b"mem"), out.stdout  # the memory store's UIDL
    out = popserv("deliver", "bob", "--config", str(conf), stdin=b"Subject: x\n\nhi\n")
    assert out.returncode == 67 and b"no user bob" in out.stderr, out
