"""
Limits: the defaults that bound one session (timers, bad commands, where a
password may travel in the clear), and the abuse limits that span
connections: connection caps in total and per client address, and the
failed-login penalty (a delay that doubles with every failure from an
address, up to a cap, as Dovecot's anvil does).

Delays never block the reactor: the failing connection's answer is simply
sent later, and every other connection is served meanwhile. An address that
failed recently also has its next logins wait their turn before any password
is checked (L{AuthPenalty.admit}), so a guesser gains nothing by hanging up
rather than waiting for the late answer, nor by opening connections in
parallel.

The penalty's counts live in the process, or, given a shared place (a
L{popserv.interfaces.IFailedLogins}, such as the PostgreSQL store), in that
place, so an attacker who spreads guesses over N nodes gains nothing.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

__all__ = [
    "TrustedNetworks",
    "AuthPenalty",
    "ConnectionLimits",
    "DEFAULT_TIMEOUT",
    "DEFAULT_LOGIN_TIMEOUT",
    "DEFAULT_MAX_BAD_COMMANDS",
    "DEFAULT_TRUSTED_NETWORKS",
]

_log = Logger()

#: RFC 1939 section 3: an autologout timer "MUST be of at least 10 minutes".
DEFAULT_TIMEOUT = 600

#: Idle seconds allowed before a login: plenty for a person typing, short
#: enough that idle unauthenticated connections do not pile up.
DEFAULT_LOGIN_TIMEOUT = 120

#: Unknown commands and bad arguments tolerated before the connection is
#: closed: enough for any confused client, few enough to stop a garbage flood.
DEFAULT_MAX_BAD_COMMANDS = 20

#: Where a password may cross the wire unencrypted by default: this host.
DEFAULT_TRUSTED_NETWORKS = ("127.0.0.0/8", "::1/128")


@dataclass
class ConnectionLimits:
    """
    @ivar total: connections open at once, server-wide (0: no limit).
    @ivar perAddress: connections open at once from one client address.
    """

    total: int = 1000
    perAddress: int = 50
    _byAddress: dict[str, int] = field(default_factory=dict, repr=False)
    _open: int = 0

    def admit(self, address: str) -> bool:
        """Count a new connection in, or say no (nothing is counted then)."""
        if self.total and self._open >= self.total:
            return False
        if self.perAddress and self._byAddress.get(address, 0) >= self.perAddress:
            return False
        self._open += 1
        self._byAddress[address] = self._byAddress.get(address, 0) + 1
        return True

    def release(self, address: str) -> None:
        self._open -= 1
        left = self._byAddress.get(address, 1) - 1
        if left:
            self._byAddress[address] = left
        else:
            self._byAddress.pop(address, None)


class AuthPenalty:
    """
    Failed logins per client address: the n-th recent failure is answered
    after C{min(cap, base * 2 ** (n - 1))} seconds, and the address's next
    logins are checked one such delay apart (L{admit}). A success from the
    address clears it; so does C{forget} seconds without failures. At most
    L{ADDRESSES} addresses are remembered, the least recently failed
    forgotten first.

    With C{shared} (an L{popserv.interfaces.IFailedLogins}) the count is the
    shared one: each failure costs one statement there, and L{failed} gives
    its delay as a Deferred (an unreachable place falls back on this
    process's count). A success costs nothing unless this process saw a
    failure from the address: only then is the shared count cleared. A
    success on a node that never saw the address fail leaves the count to
    expire after C{forget} seconds; that errs on the strict side (a user who
    fails again soon waits longer), never on the attacker's.
    """

    def __init__(
        self,
        clock: IReactorTime,
        base: float = 1.0,
        cap: float = 15.0,
        forget: float = 3600,
        shared: Any = None,
    ) -> None:
        self.clock = clock
        self.base = base
        self.cap = cap
        self.forget = forget
        self.shared = shared
        #: By address: recent failures, the last one's time, and when the
        #: next login from there may be checked.
        self._failures: OrderedDict[str, tuple[int, float, float]] = OrderedDict()

    #: Addresses remembered at most (each about 200 bytes).
    ADDRESSES = 100_000

    def admit(self, address: str) -> float:
        """
        Seconds a login from C{address} waits before its credentials are
        checked: none unless the address failed recently. Such logins are
        checked one delay apart: one that follows a failure's late answer
        waits no more, one that hung up on it and came back waits for that
        answer's time, and parallel ones queue, none longer than C{cap} (a
        user behind the guesser's NAT waits no longer than its answers do).
        """
        entry = self._failures.get(address)
        if entry is None:
            return 0.0
        count, last, turn = entry
        now = self.clock.seconds()
        if now - last > self.forget:
            return 0.0
        start = min(max(now, turn), now + self.cap)
        self._failures[address] = (count, last, start + self.delay(count))
        return start - now

    def failed(self, address: str) -> float | Deferred[float]:
        """Record a failure; the delay to answer it with (a Deferred if shared)."""
        if self.cap <= 0:
            return 0.0
        now = self.clock.seconds()
        count, last, turn = self._failures.pop(address, (0, now, now))
        if now - last > self.forget:
            count = 0
        count += 1
        self._failures[address] = (count, now, max(turn, now + self.delay(count)))
        if len(self._failures) > self.ADDRESSES:
            self._failures.popitem(last=False)  # the least recently failed
        if self.shared is None:
            return self.delay(count)
        d = maybeDeferred(self.shared.recordFailure, address, now, self.forget)
        d.addErrback(self._unshared, count)
        return d.addCallback(self.delay)

    def _unshared(self, failure: Any, count: int) -> int:
        _log.warn(
            "failed logins cannot be counted across nodes now ({error}): "
            "this process's count is used",
            error=failure.getErrorMessage() or failure.type.__name__,
        )
        return count

    def delay(self, count: int) -> float:
        """The delay of the C{count}-th recent failure."""
        return min(self.cap, self.base * 2 ** min(max(count, 1) - 1, 62))

    def succeeded(self, address: str) -> None:
        if self._failures.pop(address, None) is not None and self.shared is not None:
            d = maybeDeferred(self.shared.clearFailures, address)
            d.addErrback(
                lambda f: _log.warn(
                    "cannot clear the failed logins of {address}: {error}",
                    address=address,
                    error=f.getErrorMessage(),
                )
            )


class TrustedNetworks:
    """
    Networks a peer may be trusted from (to send a password in the clear, a
    PROXY header...): C{networks(peer)} says whether the peer's address is in
    one. A Unix-socket peer is trusted (it never crossed a network); verdicts
    are kept by address, as parsing one costs more than a lookup.
    """

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks = tuple(ipaddress.ip_network(n, strict=False) for n in networks)
        self._verdicts: dict[str, bool] = {}

    def __call__(self, peer: object) -> bool:
        if isinstance(peer, UNIXAddress):
            return True
        if not isinstance(peer, (IPv4Address, IPv6Address)):
            return False
        verdict = self._verdicts.get(peer.host)
        if verdict is None:
            if len(self._verdicts) >= 4096:
                self._verdicts.clear()
            verdict = self._verdicts[peer.host] = self._trusted(peer.host)
        return verdict

    def _trusted(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)
