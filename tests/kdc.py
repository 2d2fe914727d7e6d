"""
A real MIT Kerberos realm for the tests: a throw-away KDC built with k5test
(Debian's C{krb5kdc} and C{kdb5_util}), started once per test session in a
temporary directory and listening on a free local port.

Its principals: C{pop/localhost} (the service; its key alone in
L{KDC.keytab}), and the users C{alice}, C{master} and C{carol} (carol exists
in the realm only, in no passwd-file of the tests). Each user has a
credential cache of its own with a fresh ticket-granting ticket.

Without the binaries or the Python packages the tests that need the realm
skip, unless C{CI} is set: then they fail.

tests/conftest.py makes the fixture available to every test: C{kdc}, a
L{KDC}.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator

import pytest

__all__ = ["KDC", "kdc", "REALM", "SERVICE"]

REALM = "KRBTEST.COM"
#: What mpop (GNU SASL) asks a ticket for when it connects to "localhost".
SERVICE = "pop/localhost"
USERS = ("alice", "master", "carol")


class KDC:
    """
    A running realm.

    @ivar env: the environment a Kerberos program (client or server) needs to
        use this realm: C{KRB5_CONFIG} and a replay-cache directory; add
        C{KRB5CCNAME=ccache(user)} for a client.
    @ivar keytab: the service's keytab (C{pop/localhost} only).
    @ivar principal: the service principal, with its realm.
    """

    def __init__(self, realm) -> None:
        self.realm = realm
        self.root = realm.tmpdir
        self.keytab = os.path.join(self.root, "pop.keytab")
        self.principal = f"{SERVICE}@{REALM}"
        realm.addprinc(self.principal)
        realm.extract_keytab(self.principal, self.keytab)
        for user in USERS:
            realm.addprinc(f"{user}@{REALM}", realm.password(user))
            realm.kinit(
                f"{user}@{REALM}", realm.password(user), env=self.clientEnv(user, fresh=True)
            )
        self.env = {
            "KRB5_CONFIG": realm.env["KRB5_CONFIG"],
            "KRB5RCACHEDIR": realm.env["KRB5RCACHEDIR"],
            # nothing from the host: the service key is named, never the default keytab
            "KRB5_KTNAME": os.path.join(self.root, "no-default.keytab"),
        }

    def ccache(self, user: str) -> str:
        return os.path.join(self.root, f"ccache-{user}")

    def clientEnv(self, user: str, fresh: bool = False) -> dict[str, str]:
        """The full environment of a client program logging in as C{user}."""
        base = self.realm.env if fresh else {**self.realm.env, **self.env}
        return {**os.environ, **base, "KRB5CCNAME": f"FILE:{self.ccache(user)}"}

    def stop(self) -> None:
        self.realm.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def kdc() -> Iterator[KDC]:
    problem = None
    try:
        import gssapi  # noqa: F401
        import k5test
    except ImportError as e:
        problem = f"python-gssapi or k5test is missing: {e}"
    if problem is None and not os.path.exists("/usr/sbin/krb5kdc"):
        problem = "krb5kdc is not installed (Debian: krb5-kdc krb5-admin-server krb5-user)"
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)
    realm = k5test.K5Realm(
        realm=REALM,
        portbase=_freePort(),
        create_host=False,
        get_creds=False,
        # service names as the client wrote them: no DNS in the tests
        krb5_conf={
            "libdefaults": {"dns_canonicalize_hostname": "false", "rdns": "false"},
        },
    )
    server = KDC(realm)
    try:
        yield server
    finally:
        server.stop()
