"""Credentials, password schemes and the passwd-file checker."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
from passlib.hash import argon2, bcrypt, sha256_crypt, sha512_crypt
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred
from zope.interface.verify import verifyObject

from popserv.auth.credentials import APOPCredentials, Impersonation, UsernamePassword
from popserv.auth.passwdfile import PasswdFileChecker, parsePasswdFile
from popserv.auth.realm import MailboxRealm
from popserv.auth.schemes import UnknownScheme, parseStoredPassword
from popserv.backends.memory import MemoryStore
from popserv.errors import AccountDisabled, UnknownUser
from popserv.interfaces import IMailbox
from popserv.pipeline import errorReply
from popserv.threads import synchronously
from support import REPO

# Test fixtures: throw-away hashes of the password "pw", cheap parameters.
HASHES = {
    "plain": "{PLAIN}pw",
    "cleartext": "{CLEARTEXT}pw",
    "argon": "{ARGON2ID}" + argon2.using(memory_cost=1024, rounds=1, parallelism=1).hash("pw"),
    "blf": "{BLF-CRYPT}" + bcrypt.using(ident="2y", rounds=4).hash("pw"),
    "sha512": "{SHA512-CRYPT}" + sha512_crypt.using(rounds=1000).hash("pw"),
    "sha256": "{SHA256-CRYPT}" + sha256_crypt.using(rounds=1000).hash("pw"),
    "bare": sha512_crypt.using(rounds=1000).hash("pw"),
}


def outcome(d):
    out = []
    d.addBoth(out.append)
    assert out
    return out[0]


@pytest.fixture
def passwd(tmp_path):
    path = tmp_path / "passwd"
    path.write_text(
        "# comment\n\n"
        + "".join(f"{u}:{h}:1000:1000::/home/{u}::extra=1\n" for u, h in HASHES.items())
        + "broken:{NOPE}x\nnocolon\n"
    )
    return path


@pytest.fixture
def checker(passwd):
    runs = []

    def run(f, *args):
        runs.append(f)
        return synchronously(f, *args)

    c = PasswdFileChecker(passwd, runInThread=run)
    c.threadRuns = runs
    return c


def test_checker_provides_interface(checker):
    assert verifyObject(ICredentialsChecker, checker)
    assert verifyObject(IRealm, MailboxRealm(MemoryStore()))


@pytest.mark.parametrize("user", sorted(HASHES))
def test_every_scheme_verifies(checker, user):
    assert outcome(checker.requestAvatarId(UsernamePassword(user, b"pw"))) == user
    failure = outcome(checker.requestAvatarId(UsernamePassword(user, b"wrong")))
    assert failure.check(UnauthorizedLogin)


def test_slow_schemes_run_in_the_thread_runner(checker):
    outcome(checker.requestAvatarId(UsernamePassword("plain", b"pw")))
    assert checker.threadRuns == []
    outcome(checker.requestAvatarId(UsernamePassword("argon", b"pw")))
    assert len(checker.threadRuns) == 1


def test_unknown_user_fails_like_a_wrong_password(checker):
    """
    Both are cred failures (the same -ERR [AUTH] on the wire); only a chain
    of sources is told which it was, by the subclass UnknownUser.
    """
    unknown = outcome(checker.requestAvatarId(UsernamePassword("nobody", b"pw")))
    wrong = outcome(checker.requestAvatarId(UsernamePassword("plain", b"x")))
    assert unknown.type is UnknownUser and wrong.type is UnauthorizedLogin
    assert errorReply(unknown) == errorReply(wrong) == b"-ERR [AUTH] Authentication failed\r\n"
    assert "broken" not in checker.users and "nocolon" not in checker.users


def test_apop_only_for_plaintext_secrets(checker):
    """APOP needs the shared secret: only {PLAIN}/{CLEARTEXT} accounts can use it."""
    challenge = b"<1.2@host>"
    digest = hashlib.md5(challenge + b"pw").hexdigest().encode()
    for user in ("plain", "cleartext"):
        assert outcome(checker.requestAvatarId(APOPCredentials(user, challenge, digest))) == user
    for user in ("argon", "blf", "sha512"):
        result = outcome(checker.requestAvatarId(APOPCredentials(user, challenge, digest)))
        assert result.check(UnauthorizedLogin)
    bad = APOPCredentials("plain", challenge, b"0" * 32)
    assert outcome(checker.requestAvatarId(bad)).check(UnauthorizedLogin)


def test_unknown_user_costs_no_thread_where_no_check_would(tmp_path):
    """With no slow hash in the file, a real check is quick: an unknown user's is too."""
    path = tmp_path / "passwd"
    path.write_text("alice:{PLAIN}pw\n")
    runs = []

    def run(f, *args):
        runs.append(f)
        return synchronously(f, *args)

    checker = PasswdFileChecker(path, runInThread=run)
    assert outcome(checker.requestAvatarId(UsernamePassword("mallory", b"pw"))).check(UnknownUser)
    assert runs == []


def test_the_verdict_reads_the_line_the_file_has_once_the_hash_is_checked(tmp_path):
    """A line removed or marked nologin while a slow hash is checked counts at once."""
    path = tmp_path / "passwd"
    path.write_text(f"alice:{HASHES['argon']}\nbob:{HASHES['argon']}\n")
    pending = []

    def later(f, *args):
        d = Deferred()
        pending.append(lambda: d.callback(f(*args)))
        return d

    checker = PasswdFileChecker(path, runInThread=later)
    alice = checker.requestAvatarId(UsernamePassword("alice", b"pw"))
    bob = checker.requestAvatarId(UsernamePassword("bob", b"pw"))
    path.write_text(f"bob:{HASHES['argon']}:::::: nologin\n")
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert checker.users == {"bob"}
    for fire in pending:
        fire()
    assert outcome(alice).check(UnknownUser)
    assert outcome(bob).check(AccountDisabled)


def test_master_users_act_as_users_of_the_file(tmp_path):
    """Master-user logins, as the SQL and LDAP sources have them (the checks are shared)."""
    path = tmp_path / "passwd"
    path.write_text("admin:{PLAIN}secret\nalice:{PLAIN}pw\ncarol:{PLAIN}c:::::: nologin\n")
    checker = PasswdFileChecker(path, runInThread=synchronously, masterUsers=frozenset({"admin"}))
    admin = UsernamePassword("admin", b"secret")
    assert outcome(checker.requestAvatarId(Impersonation("alice", admin))) == "alice"
    wrong = Impersonation("alice", UsernamePassword("admin", b"x"))
    assert outcome(checker.requestAvatarId(wrong)).type is UnauthorizedLogin
    notMaster = Impersonation("admin", UsernamePassword("alice", b"pw"))
    assert outcome(checker.requestAvatarId(notMaster)).type is UnauthorizedLogin
    unknown = Impersonation("nobody", admin)
    assert outcome(checker.requestAvatarId(unknown)).check(UnknownUser)
    assert outcome(checker.requestAvatarId(Impersonation("carol", admin))).check(AccountDisabled)


def test_passwd_file_reloads_when_changed(checker, passwd):
    """Adding a user needs no restart."""
    assert outcome(checker.requestAvatarId(UsernamePassword("new", b"n"))).check(UnauthorizedLogin)
    with open(passwd, "a") as f:
        f.write("new:{PLAIN}n\n")
    st = os.stat(passwd)
    os.utime(passwd, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert outcome(checker.requestAvatarId(UsernamePassword("new", b"n"))) == "new"


def test_a_changed_password_counts_at_once_though_settings_may_lag(checker, passwd):
    """Only offers and settings may use a check up to a second old; logins never do."""
    checker.settingsFor("plain")
    passwd.write_text(passwd.read_text().replace("plain:{PLAIN}pw", "plain:{PLAIN}new"))
    st = os.stat(passwd)
    os.utime(passwd, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert outcome(checker.requestAvatarId(UsernamePassword("plain", b"pw"))).check(
        UnauthorizedLogin
    )
    assert outcome(checker.requestAvatarId(UsernamePassword("plain", b"new"))) == "plain"


def test_unreadable_passwd_file_keeps_the_loaded_users(checker, passwd):
    passwd.unlink()
    assert outcome(checker.requestAvatarId(UsernamePassword("plain", b"pw"))) == "plain"


def test_bcrypt_long_passwords_are_cut_at_72_bytes_like_crypt():
    scheme, secret = parseStoredPassword("{BLF-CRYPT}" + bcrypt.using(rounds=4).hash(b"x" * 72))
    assert scheme.verify(b"x" * 100, secret)


def test_unknown_schemes():
    for field in ("{NOPE}x", "{PLAIN", "justtext"):
        with pytest.raises(UnknownScheme):
            parseStoredPassword(field)
    assert parsePasswdFile("a:{NOPE}x\nb:{PLAIN}y\n").keys() == {"b"}


def test_malformed_hash_never_matches():
    scheme, secret = parseStoredPassword("{ARGON2ID}$argon2id$garbage")
    assert scheme.verify(b"pw", secret) is False


def test_realm_hands_out_mailbox_and_a_logout_that_runs_once():
    store = MemoryStore()
    realm = MailboxRealm(store)
    iface, mailbox, logout = outcome(realm.requestAvatar("alice", None, IMailbox))
    assert iface is IMailbox and verifyObject(IMailbox, mailbox)
    assert store.maildrop("alice").locked
    logout()
    assert not store.maildrop("alice").locked
    store.maildrop("alice").locked = True  # someone else now
    logout()
    assert store.maildrop("alice").locked


def test_credentials_do_not_show_secrets():
    assert "hunter2" not in repr(UsernamePassword("a", b"hunter2"))
    assert "d1g3st" not in repr(APOPCredentials("a", b"<x>", b"d1g3st"))


def test_slow_hash_checks_are_cached_until_the_ttl_or_a_new_hash(tmp_path):
    """A client polling every minute costs one argon2 check per TTL, not one per poll."""
    from twisted.internet.task import Clock

    from popserv.auth.cache import VerificationCache

    path = tmp_path / "passwd"
    path.write_text("slow:" + HASHES["argon"] + "\n")
    runs = []

    def run(f, *args):
        runs.append(f)
        return synchronously(f, *args)

    clock = Clock()
    checker = PasswdFileChecker(path, runInThread=run, cache=VerificationCache(clock, ttl=60))
    for _ in range(5):
        assert outcome(checker.requestAvatarId(UsernamePassword("slow", b"pw"))) == "slow"
    assert len(runs) == 1
    wrong = outcome(checker.requestAvatarId(UsernamePassword("slow", b"nope")))
    assert wrong.check(UnauthorizedLogin) and len(runs) == 2  # failures are never cached
    clock.advance(61)
    outcome(checker.requestAvatarId(UsernamePassword("slow", b"pw")))
    assert len(runs) == 3
    # a new hash in the file (password changed) never matches the old entry
    path.write_text(
        "slow:{ARGON2ID}" + argon2.using(memory_cost=1024, rounds=1).hash("new") + "\n"
    )
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert outcome(checker.requestAvatarId(UsernamePassword("slow", b"pw"))).check(
        UnauthorizedLogin
    )
    assert outcome(checker.requestAvatarId(UsernamePassword("slow", b"new"))) == "slow"


def test_cache_off_checks_every_time(tmp_path):
    from twisted.internet.task import Clock

    from popserv.auth.cache import VerificationCache

    path = tmp_path / "passwd"
    path.write_text("slow:" + HASHES["argon"] + "\n")
    runs = []
    checker = PasswdFileChecker(
        path,
        runInThread=lambda f, *a: runs.append(f) or synchronously(f, *a),
        cache=VerificationCache(Clock(), ttl=0),
    )
    for _ in range(3):
        outcome(checker.requestAvatarId(UsernamePassword("slow", b"pw")))
    assert len(runs) == 3


def test_auth_imports_nothing_of_sasl():
    """
    SASL builds on auth, never the reverse, and the SCRAM library is loaded
    only to derive keys. Checked under an empty popserv package, so that
    whatever popserv/__init__ imports does not hide an import from auth.
    """
    script = """
import importlib.util, sys, types
stub = types.ModuleType("popserv")
stub.__path__ = list(importlib.util.find_spec("popserv").submodule_search_locations)
sys.modules["popserv"] = stub
import popserv.auth, popserv.auth.chain, popserv.auth.passwdfile, popserv.auth.scramkeys
print(" ".join(m for m in sys.modules if m.startswith(("popserv.sasl", "scramp"))))
"""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""
