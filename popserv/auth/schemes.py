"""
Password schemes of a Dovecot-compatible passwd-file: C{{SCHEME}secret}.

Hashing is done by maintained libraries (libpass, which drives argon2-cffi and
bcrypt), never here. A scheme says whether checking it is slow enough to move
off the reactor thread, and whether it yields a plaintext-equivalent secret
(which APOP and, later, CRAM-MD5 need).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from popserv.auth.scramkeys import deriveScramKeys, formatScramSecret, parseScramSecret

__all__ = [
    "Scheme",
    "SCHEMES",
    "parseStoredPassword",
    "parseScramSecret",
    "hashPassword",
    "HASHING_SCHEMES",
    "UnknownScheme",
]


class UnknownScheme(ValueError):
    """The passwd-file names a scheme popserv does not support."""


@dataclass(frozen=True)
class Scheme:
    """
    @ivar verify: C{verify(password, secret)}: is C{password} right?
    @ivar slow: verification costs enough CPU to belong in a thread.
    @ivar plaintext: the secret is the password itself (APOP can use it).
    @ivar scram: the SCRAM mechanism whose stored keys the secret is, if any.
    """

    name: str
    verify: Callable[[bytes, str], bool]
    slow: bool = True
    plaintext: bool = False
    scram: str | None = None


def _plain(password: bytes, secret: str) -> bool:
    return hmac.compare_digest(password, secret.encode("utf-8"))


def _handler(name: str) -> Any:
    """libpass's handler C{name}, imported at first use: a command that never
    checks a hash (C{popserv deliver}) loads no hashing library."""
    from passlib import hash as hashes

    return getattr(hashes, name)


def _libpass(name: str, maxBytes: int | None = None) -> Callable[[bytes, str], bool]:
    def verify(password: bytes, secret: str) -> bool:
        if maxBytes is not None:
            # crypt(3) and Dovecot look at the first 72 bytes only.
            password = password[:maxBytes]
        try:
            return bool(_handler(name).verify(password, secret))
        except (ValueError, TypeError):
            return False  # a malformed hash never matches

    return verify


def _scram(hashName: str) -> Callable[[bytes, str], bool]:
    def verify(password: bytes, secret: str) -> bool:
        # RFC 5802 section 3: StoredKey = H(HMAC(SaltedPassword, "Client Key")).
        keys = parseScramSecret(secret)
        salted = hashlib.pbkdf2_hmac(hashName, password, keys.salt, keys.iterations)
        clientKey = hmac.new(salted, b"Client Key", hashName).digest()
        return hmac.compare_digest(hashlib.new(hashName, clientKey).digest(), keys.storedKey)

    return verify


def _saltedDigest(hashName: str) -> Callable[[bytes, str], bool]:
    """RFC 2307 style C{{SSHA}}: base64 of C{H(password + salt) + salt} (OpenLDAP's
    slappasswd); without salt (C{{SHA}}) when the decoded value is the digest alone."""
    size = hashlib.new(hashName).digest_size

    def verify(password: bytes, secret: str) -> bool:
        try:
            raw = base64.b64decode(secret.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        if len(raw) < size:
            return False
        digest, salt = raw[:size], raw[size:]
        return hmac.compare_digest(hashlib.new(hashName, password + salt).digest(), digest)

    return verify


def _crypt(password: bytes, secret: str) -> bool:
    """C{{CRYPT}}: a crypt(3) string, checked by the scheme its C{$id$} names
    (traditional DES crypt for 13 characters without one)."""
    for prefix, name in _CRYPT_PREFIXES.items():
        if secret.startswith(prefix):
            return SCHEMES[name].verify(password, secret)
    if len(secret) == 13 and not secret.startswith("$"):
        return _libpass("des_crypt")(password, secret)
    return False


_argon2 = _libpass("argon2")
_bcrypt = _libpass("bcrypt", maxBytes=72)
_sha512 = _libpass("sha512_crypt")
_sha256 = _libpass("sha256_crypt")
_md5crypt = _libpass("md5_crypt")

#: Scheme names as Dovecot spells them.
SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in [
        Scheme("PLAIN", _plain, slow=False, plaintext=True),
        Scheme("CLEARTEXT", _plain, slow=False, plaintext=True),
        Scheme("ARGON2ID", _argon2),
        Scheme("ARGON2I", _argon2),
        Scheme("BLF-CRYPT", _bcrypt),
        Scheme("SHA512-CRYPT", _sha512),
        Scheme("SHA256-CRYPT", _sha256),
        Scheme("MD5-CRYPT", _md5crypt),
        Scheme("SCRAM-SHA-1", _scram("sha1"), scram="SCRAM-SHA-1"),
        Scheme("SCRAM-SHA-256", _scram("sha256"), scram="SCRAM-SHA-256"),
        # The LDAP userPassword schemes (RFC 2307, OpenLDAP's slappasswd and
        # its argon2 module), which a passwd-file may hold as well.
        Scheme("SHA", _saltedDigest("sha1"), slow=False),
        Scheme("SSHA", _saltedDigest("sha1"), slow=False),
        Scheme("SSHA256", _saltedDigest("sha256"), slow=False),
        Scheme("SSHA512", _saltedDigest("sha512"), slow=False),
        Scheme("CRYPT", _crypt),
        Scheme("ARGON2", _argon2),
    ]
}

# A bare crypt string (Dovecot's default scheme CRYPT) by its "$id$" prefix.
_CRYPT_PREFIXES = {
    "$argon2id$": "ARGON2ID",
    "$argon2i$": "ARGON2I",
    "$2y$": "BLF-CRYPT",
    "$2b$": "BLF-CRYPT",
    "$2a$": "BLF-CRYPT",
    "$6$": "SHA512-CRYPT",
    "$5$": "SHA256-CRYPT",
    "$1$": "MD5-CRYPT",
}


def parseStoredPassword(field: str) -> tuple[Scheme, str]:
    """
    Split a stored password field into its scheme and secret.

    C{{PLAIN}demo} is PLAIN; a field without C{{...}} is taken as a crypt
    string and recognised by its prefix. Raises L{UnknownScheme}.
    """
    if field.startswith("{"):
        name, sep, secret = field[1:].partition("}")
        if not sep:
            raise UnknownScheme("unterminated {SCHEME}")
        scheme = SCHEMES.get(name.upper())
        if scheme is None:
            raise UnknownScheme(name)
        if scheme.scram:
            parseScramSecret(secret)  # refuse a malformed line when the file is read
        return scheme, secret
    for prefix, name in _CRYPT_PREFIXES.items():
        if field.startswith(prefix):
            return SCHEMES[name], field
    raise UnknownScheme("no {SCHEME} and not a recognised crypt string")


def _scramField(mechanism: str, password: str) -> str:
    return formatScramSecret(deriveScramKeys(mechanism, password))


#: Schemes L{hashPassword} can produce, the recommended one first. Costs are
#: chosen for a server that checks a password at every poll: argon2id with
#: RFC 9106's second recommended parameters (64 MiB, t=3), bcrypt cost 10 and
#: 100,000 SHA-crypt rounds each take tens of milliseconds here, not seconds.
HASHING_SCHEMES: dict[str, Callable[[str], str]] = {
    "ARGON2ID": lambda pw: _handler("argon2").using(type="ID").hash(pw),
    "BLF-CRYPT": lambda pw: _handler("bcrypt").using(ident="2y", rounds=10).hash(pw),
    "SHA512-CRYPT": lambda pw: _handler("sha512_crypt").using(rounds=100_000).hash(pw),
    "SHA256-CRYPT": lambda pw: _handler("sha256_crypt").using(rounds=100_000).hash(pw),
    "SCRAM-SHA-256": lambda pw: _scramField("SCRAM-SHA-256", pw),
    "SCRAM-SHA-1": lambda pw: _scramField("SCRAM-SHA-1", pw),
    "PLAIN": lambda pw: pw,
}


def hashPassword(scheme: str, password: str) -> str:
    """The passwd-file field C{{SCHEME}...} for C{password}; UnknownScheme if unsupported."""
    make = HASHING_SCHEMES.get(scheme.upper())
    if make is None:
        raise UnknownScheme(scheme)
    if ":" in password and scheme.upper() == "PLAIN":
        raise ValueError("a {PLAIN} password cannot contain ':' in a passwd-file")
    return "{" + scheme.upper() + "}" + make(password)
