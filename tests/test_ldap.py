"""
The C{ldap:} auth source against a real OpenLDAP slapd (tests/slapd.py):
both modes (bind as the user, userPassword lookup) over plain LDAP,
StartTLS, LDAPS and ldapi, the schemes OpenLDAP's own tools hash, the
attribute map, filter escaping, a directory that goes away, and the URL
parser on its own. The directory calls run synchronously here; the
end-to-end tests (test_e2e_ldap.py) run them in the server's threads.
"""

from __future__ import annotations

import pytest
from slapd import PEOPLE, READER_DN, READER_PASSWORD, USERS
from twisted.cred.error import UnauthorizedLogin
from twisted.python.failure import Failure

from popserv.auth.chain import chainSources
from popserv.auth.credentials import (
    APOPCredentials,
    Impersonation,
    UsernamePassword,
    VerifiedCredentials,
)
from popserv.auth.ldap import LdapPassdb
from popserv.auth.ldapurl import escapeFilterValue, parseLdapURL
from popserv.auth.passwdfile import PasswdFileChecker
from popserv.errors import AccountDisabled, TemporaryFailure, UnknownUser
from popserv.registry import SourceContext, authSourceKind
from popserv.threads import synchronously

ATTRS = "mail=user,employeeNumber=login_delay,departmentNumber=expire,employeeType=nologin"


def outcome(d):
    """What a Deferred that has fired holds: its result, or its Failure's exception."""
    results = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0].value if isinstance(results[0], Failure) else results[0]


def source(slapd, base=None, attrs=ATTRS, authBind=True, bind=False, ext="", **kw):
    url = parseLdapURL(f"{base or slapd.url}/{PEOPLE}?{attrs}?sub?(uid=%u)?{ext}")
    if bind:
        kw.update(bindDN=READER_DN, bindPassword=READER_PASSWORD)
    return LdapPassdb(url, authBind=authBind, runInThread=synchronously, timeout=3, **kw)


def login(checker, user, password):
    return outcome(checker.requestAvatarId(UsernamePassword(user, password.encode())))


# -- the URL ---------------------------------------------------------------------------------


def test_url_parts_and_defaults():
    url = parseLdapURL("ldap://ldap.example.org/ou=people,dc=example,dc=org")
    assert (url.host, url.port, url.scope, url.filter) == (
        "ldap.example.org",
        389,
        "SUBTREE",
        "(uid=%u)",
    )
    url = parseLdapURL("ldaps://[::1]/dc=x?userPassword,mail=user?one?(%7C(uid=%u)(mail=%u))")
    assert (url.host, url.port, url.scope) == ("::1", 636, "LEVEL")
    assert url.attributes == {"userPassword": "password", "mail": "user"}
    assert url.filter == "(|(uid=%u)(mail=%u))"
    assert parseLdapURL("ldap://h/dc=x????!StartTLS").startTLS
    assert parseLdapURL("ldap://h/dc=x????1.3.6.1.4.1.1466.20037").startTLS
    assert parseLdapURL("ldapi://%2Frun%2Fldapi/dc=x").host == "/run/ldapi"


@pytest.mark.parametrize(
    "url, problem",
    [
        ("http://h/dc=x", "expected ldap"),
        ("ldap://h", "search base"),
        ("ldap://h/dc=x??sub?(uid=bob)", "must contain %u"),
        ("ldap://h/dc=x??sub?(uid=%u", "parentheses"),
        ("ldap://h/dc=x??deep", "scope"),
        ("ldap://h/dc=x????!x-bogus", "critical extension"),
        ("ldap://h/dc=x?mail=home", "not one of"),
        ("ldap://h/dc=x?mail=user,uid=user", "two attributes"),
        ("ldaps://h/dc=x????StartTLS", "StartTLS is for ldap://"),
    ],
)
def test_bad_urls_are_refused_with_a_reason(url, problem):
    with pytest.raises(ValueError, match=problem):
        parseLdapURL(url)


def test_filter_values_are_escaped_as_rfc_4515_asks():
    assert escapeFilterValue("a*b(c)d\\e\x00") == r"a\2ab\28c\29d\5ce\00"
    url = parseLdapURL("ldap://h/dc=x??sub?(&(uid=%n)(o=%d))")
    assert url.filterFor("*)(uid=*@ex)") == r"(&(uid=\2a\29\28uid=\2a)(o=ex\29))"


# -- binding as the user --------------------------------------------------------------------


def test_bind_as_the_user_after_an_anonymous_search(slapd):
    checker = source(slapd)
    assert login(checker, "alice", "wonderland") == "alice@example.org"
    assert isinstance(login(checker, "alice", "wrong"), UnauthorizedLogin)
    # An empty password would be an unauthenticated bind, which LDAP accepts.
    assert isinstance(login(checker, "alice", ""), UnauthorizedLogin)
    assert isinstance(login(checker, "nobody", "wonderland"), UnknownUser)
    # The filter is escaped: '*' matches no one rather than everyone.
    assert isinstance(login(checker, "*", "wonderland"), UnknownUser)
    assert login(checker, "grace", "gr(a)ce*pw") == "grace@example.org"
    # Every scheme the directory itself checks (its argon2 and pw-sha2 modules).
    for uid in ("bob", "carol", "dave"):
        assert login(checker, uid, USERS[uid][0]) == f"{uid}@example.org"
    # APOP needs the password on the server: not in this mode.
    assert APOPCredentials not in [type(c) for c in checker.credentialInterfaces]


def test_settings_and_nologin_from_attributes(slapd):
    checker = source(slapd)
    assert checker.overriddenSettings() == {"loginDelay", "expire"}
    assert login(checker, "bob", "builder") == "bob@example.org"
    assert checker.settingsFor("bob@example.org") == {"loginDelay": 45, "expire": 7}
    assert checker.settingsFor("alice@example.org") == {}
    assert isinstance(login(checker, "erin", "erin-pw"), AccountDisabled)
    assert isinstance(login(checker, "erin", "wrong"), UnauthorizedLogin)


def test_proxy_routing_fields_from_attributes(slapd):
    """The proxy mode's routing fields (Dovecot's names) map from attributes too."""
    attrs = "mail=user,employeeNumber=port,departmentNumber=proxy_timeout,employeeType=proxy"
    checker = source(slapd, attrs=attrs)
    assert login(checker, "bob", "builder") == "bob@example.org"
    assert checker.settingsFor("bob@example.org") == {"proxyPort": 45, "proxyTimeout": 7}
    assert login(checker, "erin", "erin-pw") == "erin@example.org"
    assert checker.settingsFor("erin@example.org") == {"proxy": True}


def test_a_user_looked_up_without_a_password(slapd):
    """GSSAPI, OAuth and EXTERNAL users: they must exist, for their name and settings."""
    checker = source(slapd)
    verified = VerifiedCredentials("frank", "EXTERNAL")
    assert outcome(checker.requestAvatarId(verified)) == "frank@example.org"
    nobody = VerifiedCredentials("nobody", "EXTERNAL")
    assert isinstance(outcome(checker.requestAvatarId(nobody)), UnknownUser)
    assert outcome(checker.knowsUser("frank")) is True
    assert outcome(checker.knowsUser("nobody")) is False


def test_master_user_acts_as_another(slapd):
    checker = source(slapd, masterUsers=frozenset({"alice"}))
    acting = Impersonation("bob", UsernamePassword("alice", b"wonderland"))
    assert outcome(checker.requestAvatarId(acting)) == "bob@example.org"
    acting = Impersonation("alice", UsernamePassword("bob", b"builder"))
    assert isinstance(outcome(checker.requestAvatarId(acting)), UnauthorizedLogin)


# -- reading userPassword -------------------------------------------------------------------


def test_password_lookup_checks_every_ldap_scheme(slapd):
    checker = source(slapd, attrs="userPassword,mail=user", authBind=False, bind=True)
    for uid, (password, scheme, _) in USERS.items():
        if password is None:
            continue
        assert login(checker, uid, password) == f"{uid}@example.org", scheme
        assert isinstance(login(checker, uid, password + "x"), UnauthorizedLogin), scheme
    assert isinstance(login(checker, "frank", ""), UnauthorizedLogin)  # no userPassword
    assert isinstance(login(checker, "nobody", "x"), UnknownUser)


def test_password_lookup_anonymously_reads_no_password(slapd):
    """The ACL hides userPassword from anonymous searches: nobody gets in."""
    checker = source(slapd, attrs="userPassword,mail=user", authBind=False)
    assert isinstance(login(checker, "alice", "wonderland"), UnauthorizedLogin)


# -- transport and failures -----------------------------------------------------------------


@pytest.mark.parametrize("how", ["starttls", "ldaps", "ldapi"])
def test_tls_verified_against_the_ca_and_ldapi(slapd, how):
    base = {"starttls": slapd.url, "ldaps": slapd.ldapsURL, "ldapi": slapd.ldapiURL}[how]
    ext = "!StartTLS" if how == "starttls" else ""
    checker = source(slapd, base=base, ext=ext, caFile=str(slapd.ca))
    assert login(checker, "alice", "wonderland") == "alice@example.org"
    if how != "ldapi":
        # Without the test CA (the system's CAs only) the certificate is refused.
        untrusted = source(slapd, base=base, ext=ext)
        assert isinstance(login(untrusted, "alice", "wonderland"), TemporaryFailure)


def test_a_wrong_bind_dn_password_is_a_temporary_failure(slapd):
    checker = source(slapd, bindDN=READER_DN, bindPassword="not-it")
    failed = login(checker, "alice", "wonderland")
    assert isinstance(failed, TemporaryFailure)
    assert "not-it" not in str(failed)
    assert "invalidCredentials" in str(failed)


def test_directory_down_then_back(slapd):
    checker = source(slapd, bind=True)
    assert login(checker, "alice", "wonderland") == "alice@example.org"
    assert "reachable" in checker.status()
    slapd.stop()
    try:
        # The pooled connections are dead, and no new one can be made.
        assert isinstance(login(checker, "alice", "wonderland"), TemporaryFailure)
        assert isinstance(outcome(checker.knowsUser("alice")), TemporaryFailure)
        with pytest.raises(TemporaryFailure, match="cannot connect"):
            checker.status()
    finally:
        slapd.start()
    assert login(checker, "alice", "wonderland") == "alice@example.org"


def test_chained_behind_a_passwd_file(slapd, tmp_path):
    passwd = tmp_path / "passwd"
    passwd.write_text("carol:{PLAIN}from-the-file\nzoe:{PLAIN}zoe\n")
    chain = chainSources(
        [PasswdFileChecker(str(passwd), runInThread=synchronously), source(slapd)]
    )
    assert login(chain, "zoe", "zoe") == "zoe"
    assert login(chain, "carol", "from-the-file") == "carol"
    # A wrong password in the file goes on to the directory, where it is right.
    assert login(chain, "carol", "c4rol-argon") == "carol@example.org"
    assert login(chain, "alice", "wonderland") == "alice@example.org"
    assert isinstance(login(chain, "alice", "nope"), UnauthorizedLogin)


def test_plugin_options(slapd, tmp_path):
    kind = authSourceKind("ldap")
    assert {o.name for o in kind.options} == {"auth_bind", "bind_dn", "bind_password_file", "ca"}
    (tmp_path / "bindpw").write_text(READER_PASSWORD + "\n")
    options = {
        "auth_bind": False,
        "bind_dn": READER_DN,
        "bind_password_file": "bindpw",
        "ca": str(slapd.ca),
    }
    context = SourceContext(str(tmp_path), synchronously, options=options)
    checker = kind.makeSource(f"{slapd.url}/{PEOPLE}?mail=user???StartTLS", context)
    # Without the runInThread override the source has its own threads; use them
    # synchronously here through status(), which blocks.
    assert "reachable" in checker.status()
    assert checker.url.attributes == {"userPassword": "password", "mail": "user"}
    checker.close()
    with pytest.raises(ValueError, match="needs ldap_bind_password_file"):
        kind.makeSource(
            f"{slapd.url}/{PEOPLE}",
            SourceContext(str(tmp_path), synchronously, options={"bind_dn": READER_DN}),
        )


def test_a_directory_that_never_answers_times_out(slapd):
    """A peer that accepts the connection and then says nothing: [SYS/TEMP] in about a second."""
    import socket
    import time

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        port = silent.getsockname()[1]
        url = parseLdapURL(f"ldap://127.0.0.1:{port}/{PEOPLE}")
        checker = LdapPassdb(url, runInThread=synchronously, timeout=1)
        started = time.monotonic()
        assert isinstance(login(checker, "alice", "wonderland"), TemporaryFailure)
        assert time.monotonic() - started < 5
    finally:
        silent.close()
