"""
Helpers for testing code that embeds popserv, without sockets::

    from popserv.testing import memoryServer, connect
    factory, store = memoryServer({"alice": "secret"})
    store.maildrop("alice").deliver(b"Subject: hi\\r\\n\\r\\nhello\\r\\n")
    client = connect(factory)
    client.send(b"USER alice\\r\\nPASS secret\\r\\nSTAT\\r\\n")
    assert client.lines()[-1] == b"+OK 1 29"
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from popserv.auth.credentials import IVerifiedCredentials
from popserv.auth.realm import MailboxRealm
from popserv.auth.scramkeys import (
    PROCESS_SALT_KEY,
    ISecretSource,
    ScramKeys,
    deriveScramKeys,
    stableSalt,
)
from popserv.backends.memory import MemoryStore
from popserv.errors import UnknownUser
from popserv.interfaces import IMailStore
from popserv.limits import AuthPenalty
from popserv.policy import IUserSettingsSource, SessionPolicy
from popserv.protocol import POP3Factory, POP3Protocol

__all__ = ["PlaintextChecker", "memoryServer", "connect", "TestClient"]


@implementer(ICredentialsChecker, ISecretSource)
class PlaintextChecker:
    """
    An in-memory {user: password} checker for every mechanism popserv offers
    (USER/PASS, APOP, SASL PLAIN, LOGIN, CRAM-MD5, SCRAM). For tests and
    demos: the passwords are held in the clear. Its SCRAM keys are derived
    as the passwd-file's are, their salts from C{saltKey}.
    """

    credentialInterfaces = (IUsernamePassword, IUsernameHashedPassword, IVerifiedCredentials)

    def __init__(self, users: Mapping[str, str], saltKey: bytes = PROCESS_SALT_KEY) -> None:
        self.users = dict(users)
        self.saltKey = saltKey

    def requestAvatarId(self, credentials: Any) -> Deferred[str]:
        password = self.users.get(credentials.username)
        if password is None:
            return fail(UnknownUser())
        if IVerifiedCredentials.providedBy(credentials) or credentials.checkPassword(
            password.encode("utf-8")
        ):
            return succeed(credentials.username)
        return fail(UnauthorizedLogin())

    def secretKinds(self) -> frozenset[str]:
        return frozenset({"plaintext"})

    def scramKeys(self, user: str, mechanism: str) -> Deferred[ScramKeys | None]:
        password = self.users.get(user)
        if password is None:
            return succeed(None)
        salt = stableSalt(self.saltKey, mechanism, user)
        return succeed(deriveScramKeys(mechanism, password, salt))


def memoryServer(
    users: Mapping[str, str],
    store: IMailStore | None = None,
    policy: SessionPolicy | None = None,
    checker: ICredentialsChecker | None = None,
    **factoryArgs: Any,
) -> tuple[POP3Factory, Any]:
    """
    A factory over a memory store (or C{store}), its clock a L{Clock}. A
    C{policy} is shared by realm and factory.

    @param checker: an auth source of your own instead of a
        L{PlaintextChecker} over C{users}; unless a C{policy} is given, its
        per-user settings apply if it is an L{IUserSettingsSource}.
    """
    if store is None:
        store = MemoryStore()
    clock = factoryArgs.setdefault("clock", Clock())
    # Failed logins answered at once (a production factory delays them):
    # pass penalty=AuthPenalty(clock) to test the penalty itself.
    factoryArgs.setdefault("penalty", AuthPenalty(clock, cap=0))
    if checker is None:
        checker = PlaintextChecker(users)
    if policy is None:
        source = checker if IUserSettingsSource.providedBy(checker) else None
        policy = SessionPolicy(clock, source=source)
    portal = Portal(MailboxRealm(store, policy), [checker])
    factoryArgs.setdefault("hostname", "pop.example")
    return POP3Factory(portal, policy=policy, **factoryArgs), store


class TestClient:
    """A protocol on a StringTransport: send bytes, read what came back."""

    def __init__(self, protocol: POP3Protocol, transport: StringTransport) -> None:
        self.protocol = protocol
        self.transport = transport
        self._read = 0

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def output(self) -> bytes:
        """Everything written since the last call."""
        value = self.transport.value()
        out, self._read = value[self._read :], len(value)
        return out

    def lines(self) -> list[bytes]:
        """L{output} split into lines without their CRLF."""
        return self.output().split(b"\r\n")[:-1]

    def disconnect(self) -> None:
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        self.transport.loseConnection()
        self.protocol.connectionLost(Failure(ConnectionDone()))


def connect(
    factory: POP3Factory, peer: str = "127.0.0.1", transport: StringTransport | None = None
) -> TestClient:
    """
    Connect a new protocol to an in-memory transport (C{transport}, if the
    test needs one of its own, e.g. with C{startTLS}); the greeting is consumed.
    """
    protocol = factory.buildProtocol(IPv4Address("TCP", peer, 40000))
    if transport is None:
        transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 40000))
    protocol.makeConnection(transport)
    client = TestClient(protocol, transport)
    client.greeting = client.output()  # type: ignore[attr-defined]
    return client
