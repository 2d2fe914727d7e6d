"""
A chain of auth sources (PassdbChain) follows Dovecot's passdb defaults:
real passwd-files over temporary files, and a small source that is down.
"""

from __future__ import annotations

import base64
import errno
import hashlib

import pytest
import scramp
from passlib.hash import argon2
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from zope.interface import implementer
from zope.interface.verify import verifyObject

from popserv.auth import PassdbChain, chainSources
from popserv.auth.credentials import Impersonation, UsernamePassword
from popserv.auth.passwdfile import PasswdFileChecker
from popserv.auth.scramkeys import ISecretSource, stableSalt
from popserv.errors import AccountDisabled, TemporaryFailure, UnknownUser
from popserv.policy import IUserSettingsSource
from popserv.sasl import Challenge, SASLContext, ScramSHA256
from popserv.testing import connect, memoryServer
from popserv.threads import synchronously

AUTH_FAILED = b"-ERR [AUTH] Authentication failed"
SYS_TEMP = b"-ERR [SYS/TEMP] Temporary server failure, try again later"
CHEAP_ARGON2 = argon2.using(memory_cost=1024, rounds=1, parallelism=1)


def result(d):
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]


@pytest.fixture
def passwd(tmp_path):
    """passwd("a", "alice:{PLAIN}pw", ...): a checker over a new file."""

    def make(name, *lines, **kwargs):
        path = tmp_path / name
        path.write_text("".join(line + "\n" for line in lines))
        return PasswdFileChecker(path, runInThread=synchronously, **kwargs)

    return make


@implementer(ICredentialsChecker, ISecretSource)
class DownSource:
    """A source whose back end is unreachable: every question fails with C{error}."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, error=None):
        self.error = error or TemporaryFailure("directory unreachable")
        self.asked = 0

    def requestAvatarId(self, credentials):
        self.asked += 1
        return fail(self.error)

    def secretKinds(self):
        return frozenset({"plaintext"})

    def scramKeys(self, user, mechanism):
        return fail(self.error)


@implementer(ICredentialsChecker)
class SilentSource:
    """A source that never answers (a hung connection to its server)."""

    credentialInterfaces = (IUsernamePassword,)

    def requestAvatarId(self, credentials):
        return Deferred()


def login(checker, user="alice", password="pw"):
    """USER/PASS through a real protocol; the reply line to PASS."""
    factory, store = memoryServer({}, checker=checker)
    client = connect(factory)
    client.send(f"USER {user}\r\nPASS {password}\r\n".encode())
    return client.lines()[-1]


def verdict(checker, user="alice", password="pw"):
    return result(checker.requestAvatarId(UsernamePassword(user, password.encode())))


# -- the outcome ------------------------------------------------------------------


def test_an_unknown_user_goes_on_to_the_next_source(passwd):
    chain = PassdbChain([passwd("a", "bob:{PLAIN}b"), passwd("b", "alice:{PLAIN}pw")])
    assert verdict(chain) == "alice"
    assert login(chain).startswith(b"+OK Logged in")


def test_a_wrong_password_goes_on_and_a_later_source_may_accept(passwd):
    chain = PassdbChain([passwd("a", "alice:{PLAIN}old"), passwd("b", "alice:{PLAIN}pw")])
    assert login(chain).startswith(b"+OK Logged in")


def test_a_wrong_password_fails_with_auth_when_no_later_source_accepts(passwd):
    chain = PassdbChain([passwd("a", "alice:{PLAIN}old"), passwd("b", "bob:{PLAIN}pw")])
    failure = verdict(chain)
    assert failure.type is UnauthorizedLogin
    assert login(chain) == AUTH_FAILED


def test_a_user_no_source_knows_fails_like_a_wrong_password(passwd):
    """On the wire the same [AUTH] line; the chain's own failure says UnknownUser."""
    chain = PassdbChain([passwd("a", "bob:{PLAIN}b"), passwd("b", "carol:{PLAIN}c")])
    assert verdict(chain).type is UnknownUser
    assert login(chain) == AUTH_FAILED


def test_a_source_that_is_down_is_passed_over_when_another_accepts(passwd):
    down = DownSource()
    chain = PassdbChain([down, passwd("b", "alice:{PLAIN}pw")])
    assert login(chain).startswith(b"+OK Logged in")
    assert down.asked == 1


def test_a_source_that_is_down_fails_the_login_with_sys_temp(passwd):
    """Not [AUTH]: the source that was down might have accepted the password."""
    chain = PassdbChain([DownSource(), passwd("b", "bob:{PLAIN}b")])
    assert verdict(chain).type is TemporaryFailure
    assert login(chain) == SYS_TEMP


def test_a_wrong_password_and_a_source_down_give_sys_temp_in_either_order(passwd):
    for sources in (
        [passwd("a", "alice:{PLAIN}old"), DownSource()],
        [DownSource(), passwd("b", "alice:{PLAIN}old")],
    ):
        assert login(PassdbChain(sources)) == SYS_TEMP


def test_a_wrong_password_beside_a_source_down_is_still_penalized(passwd):
    """An outage must not switch the failed-login penalty off for wrong passwords."""
    from twisted.internet.task import Clock

    from popserv.limits import AuthPenalty

    clock = Clock()
    for sources, penalized in (
        ([passwd("a", "alice:{PLAIN}old"), DownSource()], True),
        ([DownSource(), passwd("b", "bob:{PLAIN}b")], False),  # nobody said no
    ):
        factory, _ = memoryServer(
            {}, checker=PassdbChain(sources), clock=clock, penalty=AuthPenalty(clock)
        )
        client = connect(factory)
        client.send(b"USER alice\r\nPASS pw\r\n")
        assert (client.lines()[-1] != SYS_TEMP) is penalized  # the answer waits 1 s
        clock.advance(1)
        assert client.lines()[-1:] == ([SYS_TEMP] if penalized else [])


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.EACCES, "Permission denied"),  # alone it would read [SYS/PERM]
        OSError(errno.ECONNREFUSED, "Connection refused"),
        RuntimeError("a bug in a third-party source"),
    ],
)
def test_any_unexpected_error_counts_as_down(passwd, error):
    chain = PassdbChain([DownSource(error), passwd("b", "bob:{PLAIN}b")])
    assert login(chain) == SYS_TEMP
    chain = PassdbChain([DownSource(error), passwd("b", "alice:{PLAIN}pw")])
    assert login(chain).startswith(b"+OK Logged in")


def test_every_source_that_is_down_is_logged_even_when_another_accepts(passwd):
    """The client reads a generic text; the log says which source failed and why."""
    first, second = DownSource(), DownSource(RuntimeError("boom"))
    chain = PassdbChain([first, second, passwd("c", "alice:{PLAIN}pw")])
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert verdict(chain) == "alice"
    finally:
        globalLogPublisher.removeObserver(events.append)
    logged = [e for e in events if e.get("source") in (first, second)]
    assert [e["source"] for e in logged] == [first, second]
    assert logged[0]["error"] == "directory unreachable"
    assert logged[1]["log_failure"].check(RuntimeError)


def test_a_source_that_does_not_answer_in_time_counts_as_down(passwd):
    clock = Clock()
    chain = PassdbChain([SilentSource(), passwd("b", "alice:{PLAIN}pw")], clock, timeout=5)
    d = chain.requestAvatarId(UsernamePassword("alice", b"pw"))
    assert not d.called
    clock.advance(5)
    assert result(d) == "alice"
    chain = PassdbChain([SilentSource(), passwd("b", "bob:{PLAIN}b")], clock, timeout=5)
    d = chain.requestAvatarId(UsernamePassword("alice", b"pw"))
    clock.advance(5)
    assert result(d).type is TemporaryFailure
    assert not clock.getDelayedCalls()  # the sources that answered left no timer behind


def test_nologin_from_the_source_that_knows_the_user_stops_the_chain(passwd):
    """As Dovecot's nologin does for a matched user: later sources are not asked."""
    later = DownSource()
    chain = PassdbChain(
        [
            passwd("a", "alice:{PLAIN}pw::::::nologin"),
            later,
            passwd("c", "alice:{PLAIN}pw"),
        ]
    )
    assert verdict(chain).type is AccountDisabled
    assert login(chain) == b"-ERR [SYS/PERM] Account is disabled"
    assert later.asked == 0


def test_nologin_in_a_later_source_does_not_matter_once_one_accepted(passwd):
    chain = PassdbChain(
        [passwd("a", "alice:{PLAIN}pw"), passwd("b", "alice:{PLAIN}pw::::::nologin")]
    )
    assert verdict(chain) == "alice"


def test_a_source_is_asked_only_for_credentials_it_can_check(passwd):
    """APOP goes past a source that checks passwords only, to one that can."""
    down = DownSource()
    chain = PassdbChain([down, passwd("b", "alice:{PLAIN}pw")])
    factory, _ = memoryServer({}, checker=chain)
    assert factory.apop  # offered: one source can check it
    client = connect(factory)
    challenge = client.greeting.split()[-1]
    digest = hashlib.md5(challenge + b"pw").hexdigest()
    client.send(f"APOP alice {digest}\r\n".encode())
    assert client.lines()[-1].startswith(b"+OK Logged in")
    assert down.asked == 0


def test_master_users_keep_working_across_the_chain(passwd):
    """A master user logs in as a user of its own file, wherever it is in the chain."""
    master = passwd("m", "admin:{PLAIN}secret", "alice:{PLAIN}pw", masterUsers={"admin"})
    chain = PassdbChain([passwd("a", "bob:{PLAIN}b"), master])
    creds = Impersonation("alice", UsernamePassword("admin", b"secret"))
    assert result(chain.requestAvatarId(creds)) == "alice"
    wrong = Impersonation("alice", UsernamePassword("admin", b"nope"))
    assert result(chain.requestAvatarId(wrong)).check(UnauthorizedLogin)
    factory, _ = memoryServer({}, checker=chain)
    client = connect(factory)
    client.send(b"AUTH PLAIN " + base64.b64encode(b"alice\0admin\0secret") + b"\r\n")
    assert client.lines()[-1].startswith(b"+OK Logged in")


# -- secrets and settings ---------------------------------------------------------


def test_the_chain_provides_what_the_server_expects_of_a_source(passwd):
    chain = PassdbChain([passwd("a", "alice:{PLAIN}pw"), DownSource()])
    for interface in (ICredentialsChecker, ISecretSource, IUserSettingsSource):
        assert verifyObject(interface, chain)


def test_secret_kinds_are_the_union_of_the_sources(passwd):
    keys = scramp.ScramMechanism("SCRAM-SHA-1").make_auth_info("pw", 4096, b"s" * 16)
    b64 = [base64.b64encode(k).decode() for k in keys[:3]]
    scram = f"carol:{{SCRAM-SHA-1}}4096,{b64[0]},{b64[1]},{b64[2]}"
    chain = PassdbChain([passwd("a", "alice:{PLAIN}pw"), passwd("b", scram)])
    assert chain.secretKinds() == {"plaintext", "SCRAM-SHA-1"}
    assert chain.users == {"alice", "carol"}


def test_scram_keys_come_from_the_first_source_that_has_them(passwd):
    key = b"k" * 32
    chain = PassdbChain(
        [
            passwd("a", "bob:{PLAIN}b", "dora:{ARGON2ID}" + CHEAP_ARGON2.hash("d")),
            passwd("b", "alice:{PLAIN}pw", "dora:{PLAIN}d", saltKey=key),
        ]
    )
    keys = result(chain.scramKeys("alice", "SCRAM-SHA-256"))
    assert keys.salt == stableSalt(key, "SCRAM-SHA-256", "alice")
    # dora's argon2 hash in a yields no keys; b's plaintext password does.
    assert result(chain.scramKeys("dora", "SCRAM-SHA-256")) is not None
    assert result(chain.scramKeys("nobody", "SCRAM-SHA-256")) is None
    context = SASLContext(chain, "pop.example")
    client = scramp.ScramClient(["SCRAM-SHA-256"], "alice", "pw")
    exchange = ScramSHA256(key).exchange(context)
    first = result(exchange.step(client.get_client_first().encode()))
    assert isinstance(first, Challenge)
    client.set_server_first(first.data.decode())
    final = exchange.step(client.get_client_final().encode())
    client.set_server_final(final.data.decode())
    outcome = exchange.step(b"")
    assert result(chain.requestAvatarId(outcome.credentials)) == "alice"


def test_scram_keys_when_a_source_is_down(passwd):
    """Keys from a later source still count; none anywhere is a temporary failure."""
    chain = PassdbChain([DownSource(), passwd("b", "alice:{PLAIN}pw")])
    assert result(chain.scramKeys("alice", "SCRAM-SHA-256")) is not None
    assert result(chain.scramKeys("bob", "SCRAM-SHA-256")).check(TemporaryFailure)


def test_settings_come_from_the_source_that_accepted_the_user(passwd):
    chain = PassdbChain(
        [
            passwd("a", "alice:{PLAIN}old::::::login_delay=60"),
            passwd("b", "alice:{PLAIN}pw::::::expire=3"),
        ]
    )
    assert chain.overriddenSettings() == {"loginDelay", "expire"}
    assert verdict(chain) == "alice"
    assert chain.settingsFor("alice") == {"expire": 3}
    assert chain.settingsFor("nobody") == {}
    factory, _ = memoryServer({}, checker=chain)
    client = connect(factory)
    client.send(b"USER alice\r\nPASS pw\r\nCAPA\r\n")
    lines = client.lines()
    assert b"EXPIRE 3" in lines and b"LOGIN-DELAY 0" in lines


def test_a_single_source_is_not_wrapped(passwd):
    """The login path of a lone source stays as short as it was."""
    only = passwd("a", "alice:{PLAIN}pw")
    assert chainSources([only]) is only
    both = chainSources([only, DownSource()])
    assert isinstance(both, PassdbChain) and both.sources[0] is only
    with pytest.raises(ValueError):
        PassdbChain([])
