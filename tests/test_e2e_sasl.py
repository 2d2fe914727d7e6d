"""
End to end over 127.0.0.1 for the extension mechanism: RFC 2449 CAPA (with LOGIN-DELAY and
EXPIRE), RFC 5034 SASL AUTH and RFC 6856 UTF8/LANG, driven by real clients (mpop, curl) and
by Python's poplib (its high-level calls and, for what it has no call for, its raw
`_shortcmd`/`_longcmd`).

Every test runs its own popserv process (twistd plugin, Maildir, passwd-file) in a tmp dir,
built by the `spawn` fixture; none may leave a traceback in the server log. The clients are
pinned to one mechanism each (mpop `auth X`, curl `--login-options AUTH=X`) and their debug
output is checked for the AUTH line, so a silent fallback to USER/PASS or APOP fails the test.
As in test_e2e_clients: curl prints the message in its wire form (CRLF, unstuffed), mpop
delivers it with LF line endings and a Received: header of its own on top.
"""

from __future__ import annotations

import base64
import os
import poplib
import re
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import scramp
from passlib.hash import argon2, sha512_crypt

from clients import split_received, wire
from popserv._version import __version__
from support import ServerProcess, deliver, have

TIMEOUT = 30
DEMO_USERS = {"alice": "{PLAIN}wonderland", "bob@example.org": "{PLAIN}builder"}
IMPLEMENTATION = f"IMPLEMENTATION popserv {__version__}"
ALL_SASL = "SASL SCRAM-SHA-256 SCRAM-SHA-1 CRAM-MD5 PLAIN LOGIN"

# Dots to unstuff and an 8-bit body: the same bytes must come out of every client.
MESSAGE = (
    b"From: sasl@example.org\nTo: alice@test.invalid\nSubject: sasl\nMIME-Version: 1.0\n"
    b"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
    b".leading dot\n..two dots\n.\nGr\xc3\xbc\xc3\x9fe, \xe2\x82\xac 5\nend\n"
)
SECOND = b"From: two@example.org\r\nSubject: second\r\n\r\n.line\r\nlast\r\n"
# RFC 6532 header fields in raw UTF-8 (only for a client that said UTF8).
UTF8_HEADERS = (
    "From: Jürgen <jürgen@bücher.example>\nTo: jürgen@test.invalid\n"
    "Subject: Grüße aus Köln ✉\n\nHallo Jürgen,\n.Punkt\n"
).encode()


def local(message: bytes) -> bytes:
    """The message as mpop delivers it: the wire form with LF line endings."""
    return wire(message).replace(b"\r\n", b"\n")


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode("ascii")


def scram_secret(password: str, mechanism: str = "SCRAM-SHA-256") -> str:
    """A passwd-file field holding only SCRAM keys, in Dovecot's format (no password)."""
    salt, stored, server, iterations = scramp.ScramMechanism(mechanism).make_auth_info(
        password, 4096
    )
    return f"{{{mechanism}}}{iterations},{b64(salt)},{b64(stored)},{b64(server)}"


@pytest.fixture
def spawn(tmp_path):
    """
    `spawn(users, extra)` starts a popserv in its own directory under tmp_path (users: the
    passwd-file lines after "user:", written as UTF-8; extra: TOML settings). All are
    stopped at the end, and none may have logged a traceback.
    """
    servers: list[ServerProcess] = []

    def start(users: dict[str, str] | None = None, extra: str = "") -> ServerProcess:
        users = DEMO_USERS if users is None else users
        srv = ServerProcess(tmp_path / f"server{len(servers)}", users, extra)
        (srv.root / "passwd").write_bytes(
            "".join(f"{u}:{p}\n" for u, p in users.items()).encode("utf-8")
        )
        srv.deliver = lambda user, msg, **kw: deliver(srv.maildir(user), msg, **kw)
        servers.append(srv)
        return srv.start()

    yield start
    for srv in servers:
        srv.stop()
    for srv in servers:
        assert "Traceback" not in srv.log and "Unhandled" not in srv.log, srv.log


def on_server(srv: ServerProcess, user: str) -> dict[str, bytes]:
    """The user's messages in the server's Maildir (new/ and cur/), by base name."""
    md = srv.maildir(user)
    return {
        p.name.split(":")[0]: p.read_bytes()
        for sub in ("new", "cur")
        if (md / sub).is_dir()
        for p in (md / sub).iterdir()
    }


# -- running the clients ----------------------------------------------------------------------


def run(cmd: list[str], home: Path) -> subprocess.CompletedProcess[bytes]:
    """Run a client with HOME in the test's tmp dir (no ~/.netrc, no ~/.mpoprc)."""
    env = dict(os.environ, HOME=str(home), LC_ALL="C")
    for proxy in ("all_proxy", "ALL_PROXY", "pop3_proxy", "POP3_PROXY"):
        env.pop(proxy, None)
    return subprocess.run(cmd, capture_output=True, timeout=TIMEOUT + 10, env=env, cwd=home)


def output(proc: subprocess.CompletedProcess[bytes]) -> str:
    """stdout and stderr as text, CRLF made LF (mpop and curl echo the CRLF they read)."""
    return (proc.stdout + proc.stderr).decode("utf-8", "replace").replace("\r\n", "\n")


def mpop(srv: ServerProcess, tmp: Path, *, user: str, password: str, auth: str):
    """
    One mpop run (keep on, `--debug` shows the dialogue) with a config file of mode 0600
    (mpop refuses a readable one that holds a password): `tls off` (else mpop tries STLS),
    the given `auth` method (mpop then uses that mechanism or fails, never another), delivery
    to the Maildir tmp/Maildir and the UIDL file in tmp.
    """
    dest = tmp / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    conf = tmp / "mpoprc"
    conf.write_text(
        textwrap.dedent(f"""\
            defaults
            timeout {TIMEOUT}
            account test
            host 127.0.0.1
            port {srv.port}
            user {user}
            password {password}
            tls off
            auth {auth}
            delivery maildir {dest}
            keep on
            uidls_file {tmp / "mpop-uidls"}
            """)
    )
    conf.chmod(0o600)
    return run(["mpop", "--debug", "-C", str(conf), "test"], tmp)


def mpop_delivered(tmp: Path) -> list[bytes]:
    """The messages mpop put into tmp/Maildir, Received: header removed."""
    dest = tmp / "Maildir"
    return sorted(
        split_received(p.read_bytes(), b"mpop")
        for sub in ("new", "cur")
        for p in (dest / sub).iterdir()
    )


def curl(srv: ServerProcess, path: str, *args: str, user: str, password: str, tmp: Path):
    """curl -v on pop3://user:password@127.0.0.1:port/path (path "": LIST, "N": RETR N)."""
    url = f"pop3://{user}:{password}@127.0.0.1:{srv.port}/{path}"
    cmd = ["curl", "-sS", "-v", "--max-time", str(TIMEOUT), "--noproxy", "*"]
    return run([*cmd, *args, url], tmp)


# -- poplib ------------------------------------------------------------------------------------


def connect(srv: ServerProcess) -> poplib.POP3:
    return poplib.POP3("127.0.0.1", srv.port, timeout=10)


def capa_lines(pop: poplib.POP3) -> list[str]:
    """The CAPA response lines in order (poplib's capa() gives an unordered dict)."""
    resp, lines, _ = pop._longcmd("CAPA")
    assert resp.startswith(b"+OK"), resp
    return [line.decode("utf-8") for line in lines]


def refused(pop: poplib.POP3, command: str) -> str:
    """Send a command that must fail; its -ERR line."""
    with pytest.raises(poplib.error_proto) as info:
        pop._shortcmd(command)
    response = info.value.args[0]
    assert response.startswith(b"-ERR"), response
    return response.decode("utf-8")


def login_when_unlocked(srv: ServerProcess, user: str, password: str) -> poplib.POP3:
    """USER/PASS, retried while the maildrop is still locked by a session that just ended."""
    deadline = time.monotonic() + 10
    while True:
        pop = connect(srv)
        pop.user(user)
        try:
            pop.pass_(password)
            return pop
        except poplib.error_proto as e:
            pop.close()
            if not e.args[0].startswith(b"-ERR [IN-USE]") or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def retrieve(pop: poplib.POP3, number: int) -> bytes:
    """RETR through poplib, reassembled into the wire form; checked against LIST's size."""
    _, lines, octets = pop.retr(number)
    data = b"\r\n".join(lines) + b"\r\n"
    size = int(pop.list(number).split()[2])
    assert len(data) == octets == size
    return data


# -- mpop: SASL mechanisms ------------------------------------------------------------------


@pytest.mark.skipif(not have("mpop"), reason="mpop is not installed")
@pytest.mark.parametrize("auth", ["scram-sha-256", "scram-sha-1", "cram-md5", "plain", "login"])
def test_mpop_sasl_mechanism_retrieves_byte_exact(spawn, tmp_path, auth):
    """
    mpop pinned to one SASL mechanism (a {PLAIN} account, so CAPA offers them all) sends
    `AUTH <MECHANISM>`, never USER/PASS or APOP, logs in, and delivers the message byte for
    byte (LF endings, unstuffed, 8-bit intact) apart from its Received: header. For SCRAM
    the server's final message (v=, the server signature) is sent as a last challenge and
    mpop (GNU SASL) verifies it before answering with an empty line. keep on: the server
    still has the message.
    """
    srv = spawn()
    srv.deliver("alice", MESSAGE, name="1700000001.M1P1.sasl")
    proc = mpop(srv, tmp_path, user="alice", password="wonderland", auth=auth)
    log = output(proc)
    assert proc.returncode == 0, log
    assert f"<-- {ALL_SASL}\n" in log, log
    assert f"--> AUTH {auth.upper()}\n" in log, log
    assert "--> USER" not in log and "--> APOP" not in log and "--> PASS" not in log, log
    assert "<-- +OK Logged in, 1 message" in log, log
    if auth.startswith("scram"):
        final = log.split("<-- + ")[-1].split("\n", 1)[0]
        assert base64.b64decode(final).startswith(b"v="), log
    assert mpop_delivered(tmp_path) == [local(MESSAGE)]
    srv.waitForLog(f"session end: user=alice ip=127.0.0.1 tls=no mechanism={auth.upper()} ")
    assert on_server(srv, "alice") == {"1700000001.M1P1.sasl": MESSAGE}


@pytest.mark.skipif(not have("mpop"), reason="mpop is not installed")
def test_mpop_scram_with_stored_keys_only(spawn, tmp_path):
    """
    An account whose passwd-file entry holds only {SCRAM-SHA-256} keys (Dovecot's format, no
    password): CAPA offers `SASL SCRAM-SHA-256 PLAIN LOGIN` (no SCRAM-SHA-1, no CRAM-MD5:
    nothing could check them); mpop with `auth scram-sha-256` logs in and gets the message
    byte-exact. A wrong password and an unknown user both go through the whole exchange
    (the server invents a salt for unknown users) and end in `-ERR [AUTH]` (mpop exit 77);
    `auth plain` works with the keys too (the server checks the password against them);
    `auth cram-md5`, which CAPA does not offer, is refused by mpop without trying.
    """
    srv = spawn({"carol": scram_secret("s3cr3t pass")})
    srv.deliver("carol", MESSAGE, name="1700000001.M1P1.scram")

    good = mpop(srv, tmp_path, user="carol", password="s3cr3t pass", auth="scram-sha-256")
    log = output(good)
    assert good.returncode == 0, log
    assert "<-- SASL SCRAM-SHA-256 PLAIN LOGIN\n" in log, log
    assert "--> AUTH SCRAM-SHA-256\n" in log and "<-- +OK Logged in" in log, log
    assert mpop_delivered(tmp_path) == [local(MESSAGE)]

    for user, password in (("carol", "wrong"), ("nobody", "s3cr3t pass")):
        bad = mpop(srv, tmp_path, user=user, password=password, auth="scram-sha-256")
        log = output(bad)
        assert bad.returncode == 77, log  # EX_NOPERM
        assert "--> AUTH SCRAM-SHA-256\n" in log, log
        server_first = base64.b64decode(log.split("<-- + ")[-1].split("\n", 1)[0])
        assert re.match(rb"r=[^,]+,s=[^,]+,i=4096$", server_first), log
        assert "<-- -ERR [AUTH] Authentication failed" in log, log
        assert "authentication failed (method SCRAM-SHA-256)" in log, log

    plain = mpop(srv, tmp_path, user="carol", password="s3cr3t pass", auth="plain")
    assert plain.returncode == 0, output(plain)
    assert "--> AUTH PLAIN\n" in output(plain) and "<-- +OK Logged in" in output(plain)

    cram = mpop(srv, tmp_path, user="carol", password="s3cr3t pass", auth="cram-md5")
    assert cram.returncode != 0, output(cram)
    assert "--> AUTH" not in output(cram), output(cram)

    assert mpop_delivered(tmp_path) == [local(MESSAGE)]  # nothing fetched twice
    assert on_server(srv, "carol") == {"1700000001.M1P1.scram": MESSAGE}


# -- curl: SASL mechanisms --------------------------------------------------------------------


@pytest.mark.skipif(not have("curl"), reason="curl is not installed")
@pytest.mark.parametrize(
    ("mechanism", "options", "auth_line"),
    [
        ("PLAIN", [], "> AUTH PLAIN\n"),
        ("PLAIN", ["--sasl-ir"], "> AUTH PLAIN " + b64("\0alice\0wonderland") + "\n"),
        ("LOGIN", [], "> AUTH LOGIN\n"),
        ("CRAM-MD5", [], "> AUTH CRAM-MD5\n"),
    ],
    ids=["PLAIN", "PLAIN-initial-response", "LOGIN", "CRAM-MD5"],
)
def test_curl_sasl_list_retr_wrong_password(spawn, tmp_path, mechanism, options, auth_line):
    """
    curl with `--login-options AUTH=<MECHANISM>` (with `--sasl-ir`: PLAIN with an initial
    response on the AUTH line): `-v` shows that exact AUTH line and no USER/APOP; LIST gives
    the CRLF wire sizes and RETR prints each message exactly as sent. A wrong password with
    the same mechanism ends in `-ERR [AUTH]` and curl exit 67 (CURLE_LOGIN_DENIED), no output.
    """
    srv = spawn()
    messages = {"1700000001.M1P1.curl": MESSAGE, "1700000002.M2P1.curl": SECOND}
    for name, message in messages.items():
        srv.deliver("alice", message, name=name)
    login = ["--login-options", f"AUTH={mechanism}", *options]

    listing = curl(srv, "", *login, user="alice", password="wonderland", tmp=tmp_path)
    log = output(listing)
    assert listing.returncode == 0, log
    assert auth_line in log, log
    assert "> USER" not in log and "> APOP" not in log, log
    assert listing.stdout == b"1 %d\r\n2 %d\r\n" % tuple(len(wire(m)) for m in messages.values())

    for number, message in enumerate(messages.values(), 1):
        retr = curl(srv, str(number), *login, user="alice", password="wonderland", tmp=tmp_path)
        assert retr.returncode == 0, output(retr)
        assert auth_line in output(retr)
        assert f"> RETR {number}" in output(retr)
        assert retr.stdout == wire(message)

    bad = curl(srv, "", *login, user="alice", password="wrong", tmp=tmp_path)
    assert bad.returncode == 67, output(bad)
    assert bad.stdout == b""
    assert "< -ERR [AUTH] Authentication failed" in output(bad), output(bad)
    assert on_server(srv, "alice") == messages


# -- poplib: CAPA, UTF8, LANG -------------------------------------------------------------------


def test_poplib_capa_before_and_after_login(spawn):
    """
    RFC 2449 CAPA through poplib. Before login: TOP UIDL RESP-CODES PIPELINING USER, all SASL
    mechanisms, AUTH-RESP-CODE, `EXPIRE NEVER USER` (one account has its own expire=5),
    `UTF8 USER`, LANG, IMPLEMENTATION; no LOGIN-DELAY (none is enforced). After login the
    same list (the IANA registry announces all of them in both states) except that EXPIRE
    is the user's own value, without USER.
    """
    srv = spawn({"alice": "{PLAIN}wonderland::::::expire=5", "bob": "{PLAIN}builder"})
    before = [
        "TOP", "UIDL", "RESP-CODES", "PIPELINING", "USER", ALL_SASL, "AUTH-RESP-CODE",
        "EXPIRE NEVER USER", "UTF8 USER", "LANG", IMPLEMENTATION,
    ]  # fmt: skip
    pop = connect(srv)
    caps = pop.capa()
    assert caps["SASL"] == ["SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5", "PLAIN", "LOGIN"]
    assert caps["EXPIRE"] == ["NEVER", "USER"] and caps["UTF8"] == ["USER"]
    assert "LOGIN-DELAY" not in caps and "STLS" not in caps
    assert capa_lines(pop) == before

    for user, password, expire in (("alice", "wonderland", "5"), ("bob", "builder", "NEVER")):
        pop = connect(srv)
        assert capa_lines(pop) == before
        pop.user(user)
        assert pop.pass_(password).startswith(b"+OK Logged in")
        caps = pop.capa()
        assert caps["EXPIRE"] == [expire]
        assert capa_lines(pop) == [
            "TOP", "UIDL", "RESP-CODES", "PIPELINING", "USER", ALL_SASL, "AUTH-RESP-CODE",
            f"EXPIRE {expire}", "UTF8 USER", "LANG", IMPLEMENTATION,
        ]  # fmt: skip
        assert pop.quit().startswith(b"+OK")


def test_poplib_utf8_user_and_8bit_headers(spawn):
    """
    RFC 6856 through poplib: `pop.utf8()` gets `+OK UTF-8 mode enabled`; then USER/PASS with
    a UTF-8 user name and password ("jürgen"/"grüß") logs in, and a message with raw UTF-8
    header fields comes back byte-exact (LIST size = RETR octets). A wrong UTF-8 password is
    `-ERR [AUTH]`; after UTF8, AUTH PLAIN with the UTF-8 name and password works too.
    """
    user, password = "jürgen", "grüß"
    srv = spawn({user: "{PLAIN}" + password})
    srv.deliver(user, UTF8_HEADERS, name="1700000001.M1P1.utf8")

    pop = connect(srv)
    assert pop.utf8() == b"+OK UTF-8 mode enabled"
    assert pop.user(user).startswith(b"+OK")
    with pytest.raises(poplib.error_proto, match=r"^b'-ERR \[AUTH\] Authentication failed'$"):
        pop.pass_("grüss")
    pop.user(user)
    assert pop.pass_(password).startswith(b"+OK Logged in, 1 message")
    assert retrieve(pop, 1) == wire(UTF8_HEADERS)
    assert pop.uidl(1).split()[2] == b"1700000001.M1P1.utf8"
    pop.quit()

    pop = connect(srv)
    pop.utf8()
    response = pop._shortcmd("AUTH PLAIN " + b64(f"\0{user}\0{password}"))
    assert response.startswith(b"+OK Logged in, 1 message"), response
    assert retrieve(pop, 1) == wire(UTF8_HEADERS)
    pop.quit()
    assert on_server(srv, user) == {"1700000001.M1P1.utf8": UTF8_HEADERS}


RU_UNKNOWN_COMMAND = "-ERR Неизвестная команда"
RU_AUTH_FAILED = "-ERR [AUTH] Ошибка аутентификации"
RU_LANG_CHANGED = "Язык изменён"


def test_poplib_lang_list_switch_and_codes_unchanged(spawn):
    """
    RFC 6856 LANG with raw poplib commands: `LANG` lists en and ru; `LANG ru` answers
    `+OK ru <Russian>`; from then on texts are Russian UTF-8 (an unknown command, a failed
    login, the login greeting with Russian plurals) while everything a client parses stays
    as it was: `[AUTH]`, STAT's numbers, LIST lines, RETR's `+OK <n> octets` and the message.
    `LANG *` returns to the server default; an unknown tag is refused (in Russian).
    """
    srv = spawn()
    srv.deliver("alice", MESSAGE, name="1700000001.M1P1.lang")
    srv.deliver("alice", SECOND, name="1700000002.M2P1.lang")
    pop = connect(srv)
    resp, lines, _ = pop._longcmd("LANG")
    assert resp == b"+OK Language listing follows"
    assert lines == [b"en English", "ru Русский".encode()]
    assert refused(pop, "XYZZY") == "-ERR Unknown command"

    assert pop._shortcmd("LANG ru").decode() == f"+OK ru {RU_LANG_CHANGED}"
    assert refused(pop, "XYZZY") == RU_UNKNOWN_COMMAND
    pop.user("alice")
    assert refused(pop, "PASS wrong") == RU_AUTH_FAILED
    pop.user("alice")
    size = len(wire(MESSAGE)) + len(wire(SECOND))
    welcome = pop.pass_("wonderland").decode()
    # "2 messages": the Russian "few" plural form; "N octets": depends on N.
    assert welcome.startswith("+OK Вход выполнен: 2 сообщения ("), welcome
    assert pop.stat() == (2, size)
    resp, listing, _ = pop.list()
    assert listing == [b"1 %d" % len(wire(MESSAGE)), b"2 %d" % len(wire(SECOND))]
    resp, lines, _ = pop._longcmd("RETR 1")
    assert resp == b"+OK %d octets" % len(wire(MESSAGE))
    assert b"\r\n".join(lines) + b"\r\n" == wire(MESSAGE)
    assert retrieve(pop, 2) == wire(SECOND)
    assert refused(pop, "RETR 9") == "-ERR Нет такого сообщения"
    assert refused(pop, "LANG tlh") == "-ERR Неизвестный язык"
    assert pop._shortcmd("LANG *") == b"+OK en Language changed"
    assert refused(pop, "XYZZY") == "-ERR Unknown command"
    pop.quit()


def test_poplib_lang_server_default_russian(spawn):
    """
    `language = "ru"`: the greeting and CAPA texts are Russian from the start (capability
    names are not translated), `LANG en` switches to English and `LANG *` back to the server
    default, Russian.
    """
    srv = spawn(extra='language = "ru"\n')
    pop = connect(srv)
    assert pop.getwelcome().decode().startswith(f"+OK popserv {__version__} готов. <")
    resp, lines, _ = pop._longcmd("CAPA")
    assert resp.decode() == "+OK Список возможностей"
    assert b"UTF8 USER" in lines and b"LANG" in lines
    assert refused(pop, "XYZZY") == RU_UNKNOWN_COMMAND
    assert pop._shortcmd("LANG en") == b"+OK en Language changed"
    assert refused(pop, "XYZZY") == "-ERR Unknown command"
    assert pop._shortcmd("LANG *").decode() == f"+OK ru {RU_LANG_CHANGED}"
    assert refused(pop, "XYZZY") == RU_UNKNOWN_COMMAND
    pop.quit()


# -- mechanism selection ------------------------------------------------------------------------


def test_sasl_mechanisms_setting_limits_offer_and_use(spawn):
    """
    `sasl_mechanisms = ["PLAIN"]`: CAPA says `SASL PLAIN` only, `AUTH` alone lists only
    PLAIN, and `AUTH CRAM-MD5`, `AUTH LOGIN`, `AUTH SCRAM-SHA-256` are refused as
    unsupported without a challenge; on the same connection AUTH PLAIN then logs in.
    """
    srv = spawn(extra='sasl_mechanisms = ["PLAIN"]\n')
    pop = connect(srv)
    assert pop.capa()["SASL"] == ["PLAIN"]
    assert "SASL PLAIN" in capa_lines(pop)
    resp, lines, _ = pop._longcmd("AUTH")
    assert resp.startswith(b"+OK") and lines == [b"PLAIN"]
    for mechanism in ("CRAM-MD5", "LOGIN", "SCRAM-SHA-256"):
        assert refused(pop, f"AUTH {mechanism}") == "-ERR Unsupported authentication mechanism"
    assert pop._shortcmd("AUTH PLAIN " + b64("\0alice\0wonderland")).startswith(b"+OK Logged in")
    pop.quit()


def test_hashed_secrets_only_offer_plain_and_login(spawn):
    """
    A passwd-file holding only argon2 and SHA512-CRYPT hashes: CAPA offers `SASL PLAIN LOGIN`
    and nothing that would need the password or SCRAM keys (CRAM-MD5, SCRAM), which AUTH
    refuses as unsupported. Both offered mechanisms work: AUTH PLAIN with an initial
    response (base64 of NUL user NUL password), AUTH PLAIN with an empty challenge, AUTH
    LOGIN with its two prompts; the message comes back byte-exact; a wrong password is
    `-ERR [AUTH]`.
    """
    users = {
        "dave": "{ARGON2ID}"
        + argon2.using(memory_cost=1024, rounds=1, parallelism=1).hash("hashed pw"),
        "erin": "{SHA512-CRYPT}" + sha512_crypt.using(rounds=1000).hash("crypted"),
    }
    srv = spawn(users)
    srv.deliver("dave", MESSAGE, name="1700000001.M1P1.argon")
    srv.deliver("erin", SECOND, name="1700000002.M2P1.crypt")

    pop = connect(srv)
    caps = capa_lines(pop)
    assert "SASL PLAIN LOGIN" in caps, caps
    assert not any("CRAM-MD5" in c or "SCRAM" in c for c in caps), caps
    for mechanism in ("CRAM-MD5", "SCRAM-SHA-256", "SCRAM-SHA-1"):
        assert refused(pop, f"AUTH {mechanism}") == "-ERR Unsupported authentication mechanism"
    assert refused(pop, "AUTH PLAIN " + b64("\0dave\0wrong")) == (
        "-ERR [AUTH] Authentication failed"
    )
    response = pop._shortcmd("AUTH PLAIN " + b64("\0dave\0hashed pw"))
    assert response.startswith(b"+OK Logged in, 1 message"), response
    assert retrieve(pop, 1) == wire(MESSAGE)
    pop.quit()

    pop = connect(srv)
    assert pop._shortcmd("AUTH PLAIN") == b"+ "
    assert pop._shortcmd(b64("\0erin\0crypted")).startswith(b"+OK Logged in, 1 message")
    assert retrieve(pop, 1) == wire(SECOND)
    pop.quit()

    pop = connect(srv)
    assert pop._shortcmd("AUTH LOGIN") == b"+ " + b64("Username:").encode()
    assert pop._shortcmd(b64("erin")) == b"+ " + b64("Password:").encode()
    assert pop._shortcmd(b64("crypted")).startswith(b"+OK Logged in")
    pop.quit()
    assert on_server(srv, "dave") == {"1700000001.M1P1.argon": MESSAGE}


# -- LOGIN-DELAY and EXPIRE -----------------------------------------------------------------------


def test_login_delay_over_the_wire(spawn):
    """
    `login_delay = 60`: CAPA says `LOGIN-DELAY 60` before and after login. A first login
    works; right after its QUIT a second login of the same user is `-ERR [LOGIN-DELAY]`
    with the seconds left, through USER/PASS and through AUTH PLAIN alike; a wrong password
    still reads `-ERR [AUTH]` (the delay reveals nothing); another user is not delayed.
    """
    srv = spawn(extra="login_delay = 60\n")
    pop = connect(srv)
    assert "LOGIN-DELAY 60" in capa_lines(pop)
    pop.user("alice")
    assert pop.pass_("wonderland").startswith(b"+OK Logged in")
    assert "LOGIN-DELAY 60" in capa_lines(pop)
    assert pop.quit().startswith(b"+OK")

    pop = connect(srv)
    pop.user("alice")
    delayed = refused(pop, "PASS wonderland")
    m = re.fullmatch(r"-ERR \[LOGIN-DELAY\] Logged in too recently, wait (\d+) seconds", delayed)
    assert m and 50 <= int(m.group(1)) <= 60, delayed
    assert refused(pop, "AUTH PLAIN " + b64("\0alice\0wonderland")).startswith(
        "-ERR [LOGIN-DELAY] "
    )
    pop.user("alice")
    assert refused(pop, "PASS wrong") == "-ERR [AUTH] Authentication failed"
    pop.user("bob@example.org")
    assert pop.pass_("builder").startswith(b"+OK Logged in")
    pop.quit()
    assert srv.waitForLog("session end: user=bob@example.org").count("user=alice ") == 1


def test_expire_zero_removes_retrieved_at_quit(spawn):
    """
    `expire = 0` (RFC 2449 EXPIRE 0): CAPA says `EXPIRE 0`. RETR 1 then QUIT removes message
    1's file from the Maildir without any DELE; message 2, only looked at with TOP, stays.
    A session that RETRs but ends without QUIT removes nothing.
    """
    srv = spawn(extra="expire = 0\n")
    srv.deliver("alice", MESSAGE, name="1700000001.M1P1.expire")
    srv.deliver("alice", SECOND, name="1700000002.M2P1.expire")
    pop = connect(srv)
    assert "EXPIRE 0" in capa_lines(pop)
    pop.user("alice")
    pop.pass_("wonderland")
    assert "EXPIRE 0" in capa_lines(pop)
    assert retrieve(pop, 1) == wire(MESSAGE)
    pop.top(2, 0)
    assert pop.quit().endswith(b"(1 message left)")
    assert on_server(srv, "alice") == {"1700000002.M2P1.expire": SECOND}

    pop = connect(srv)
    pop.user("alice")
    pop.pass_("wonderland")
    assert retrieve(pop, 1) == wire(SECOND)
    pop.close()  # no QUIT: no UPDATE state
    # Once the server has seen the connection go (the maildrop lock is released), log in
    # again: still one message.
    pop = login_when_unlocked(srv, "alice", "wonderland")
    assert pop.stat() == (1, len(wire(SECOND)))
    pop.quit()
    assert on_server(srv, "alice") == {"1700000002.M2P1.expire": SECOND}
