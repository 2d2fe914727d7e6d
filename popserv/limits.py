"""
Limits: the defaults that bound one session (timers, bad commands, where a
password may travel in the clear), and the abuse limits that span
connections: connection caps in total and per client address, and the
failed-login penalty (a delay that doubles with every failure from an
address, up to a cap, as Dovecot's anvil does).

Delays never block the reactor: the failing connection's answer is simply
sent later, and every other connection is served meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.internet.interfaces import IReactorTime

__all__ = [
    "AuthPenalty",
    "ConnectionLimits",
    "DEFAULT_TIMEOUT",
    "DEFAULT_LOGIN_TIMEOUT",
    "DEFAULT_MAX_BAD_COMMANDS",
    "DEFAULT_TRUSTED_NETWORKS",
]

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
    after C{min(cap, base * 2 ** (n - 1))} seconds. A success from the address
    clears it; so does C{forget} seconds without failures.
    """

    def __init__(
        self, clock: IReactorTime, base: float = 1.0, cap: float = 15.0, forget: float = 3600
    ) -> None:
        self.clock = clock
        self.base = base
        self.cap = cap
        self.forget = forget
        self._failures: dict[str, tuple[int, float]] = {}

    def failed(self, address: str) -> float:
        """Record a failure; the delay to answer it with."""
        if self.cap <= 0:
            return 0.0
        now = self.clock.seconds()
        count, last = self._failures.get(address, (0, now))
        if now - last > self.forget:
            count = 0
        count += 1
        self._failures[address] = (count, now)
        if len(self._failures) > 100_000:
            self._failures = {a: v for a, v in self._failures.items() if now - v[1] <= self.forget}
        return min(self.cap, self.base * 2 ** (count - 1))

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)
