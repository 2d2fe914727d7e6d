"""
A cache of successful slow-hash verifications.

A POP3 client polling every minute would otherwise cost an argon2 or bcrypt
check (tens of milliseconds of CPU) per poll. The cache remembers, for a
limited time, that a password matched a stored hash. Its key is the user, the
stored hash itself and an HMAC of the password under a key that lives only in
this process: a changed password (a new hash in the passwd-file) or a removed
user never hits an old entry, and the password is never kept.

Trade-off: for up to C{ttl} seconds after a password is changed by other
means than the passwd-file (there are none here) an old password would still
be accepted; and a process memory dump holds HMACs an attacker would have to
brute-force with the key. Set the TTL to 0 to check every login.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict

from twisted.internet.interfaces import IReactorTime

__all__ = ["VerificationCache"]


class VerificationCache:
    def __init__(self, clock: IReactorTime, ttl: float = 600, size: int = 10_000) -> None:
        self.clock = clock
        self.ttl = ttl
        self.size = size
        self._key = secrets.token_bytes(32)
        self._entries: OrderedDict[bytes, float] = OrderedDict()

    def _digest(self, user: str, stored: str, password: bytes) -> bytes:
        mac = hmac.new(self._key, password, hashlib.sha256).digest()
        return hashlib.sha256(
            user.encode("utf-8", "surrogateescape")
            + b"\0"
            + stored.encode("utf-8", "surrogateescape")
            + b"\0"
            + mac
        ).digest()

    def known(self, user: str, stored: str, password: bytes) -> bool:
        """Did this password match this stored hash within the last C{ttl} seconds?"""
        if self.ttl <= 0:
            return False
        key = self._digest(user, stored, password)
        expires = self._entries.get(key)
        if expires is None:
            return False
        if expires < self.clock.seconds():
            del self._entries[key]
            return False
        return True

    def remember(self, user: str, stored: str, password: bytes) -> None:
        if self.ttl <= 0:
            return
        key = self._digest(user, stored, password)
        self._entries[key] = self.clock.seconds() + self.ttl
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
