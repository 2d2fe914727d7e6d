"""SCRAM keys, salts and the salt key kept in the mail root (popserv.auth.scramkeys)."""

from __future__ import annotations

import base64
import os

import scramp
from twisted.logger import globalLogPublisher

from popserv.auth.schemes import hashPassword, parseStoredPassword
from popserv.auth.scramkeys import (
    ITERATIONS,
    PROCESS_SALT_KEY,
    SCRAM_KEY_FILE,
    deriveScramKeys,
    fakeScramKeys,
    formatScramSecret,
    parseScramSecret,
    saltKeyForRoot,
    stableSalt,
)
from popserv.sasl import ScramSHA1, ScramSHA256Plus
from popserv.testing import PlaintextChecker


def result(d):
    out = []
    d.addBoth(out.append)
    return out[0]


def test_derived_keys_are_scramps():
    """The one derivation agrees with scramp's own (RFC 5802 section 3, SASLprep included)."""
    salt = b"0123456789abcdef"
    for mechanism in ("SCRAM-SHA-1", "SCRAM-SHA-256"):
        keys = deriveScramKeys(mechanism, "p\u00e4ss\u00a0word", salt)
        expected = scramp.ScramMechanism(mechanism).make_auth_info(
            "p\u00e4ss\u00a0word", ITERATIONS, salt
        )
        assert (keys.salt, keys.storedKey, keys.serverKey, keys.iterations) == expected


def test_stored_secrets_round_trip_and_verify():
    """hashPassword writes what parseScramSecret reads, with a new random salt each time."""
    field = hashPassword("SCRAM-SHA-256", "wonderland")
    scheme, secret = parseStoredPassword(field)
    keys = parseScramSecret(secret)
    assert formatScramSecret(keys) == secret
    assert keys.iterations == ITERATIONS and len(keys.salt) == 32
    assert scheme.verify(b"wonderland", secret) and not scheme.verify(b"nope", secret)
    other = parseScramSecret(parseStoredPassword(hashPassword("SCRAM-SHA-256", "wonderland"))[1])
    assert other.salt != keys.salt


def test_made_up_keys_are_the_mechanisms_and_stable_per_salt_key():
    key = b"k" * 32
    fake = fakeScramKeys(key, "SCRAM-SHA-256", "ghost")
    assert ScramSHA256Plus(key).fakeKeys("ghost") == fake
    assert fake.salt == stableSalt(key, "SCRAM-SHA-256", "ghost")
    assert fakeScramKeys(b"j" * 32, "SCRAM-SHA-256", "ghost") != fake
    assert ScramSHA1().fakeKeys("ghost") == fakeScramKeys(PROCESS_SALT_KEY, "SCRAM-SHA-1", "ghost")
    assert len(ScramSHA1().fakeKeys("ghost").storedKey) == 20  # a SHA-1 sized key


def test_the_testing_checker_derives_keys_as_the_passwd_file_does():
    """Stable salts from its salt key: the same user gets the same salt twice."""
    key = b"k" * 32
    checker = PlaintextChecker({"alice": "wonderland"}, saltKey=key)
    keys = result(checker.scramKeys("alice", "SCRAM-SHA-256"))
    assert keys == deriveScramKeys(
        "SCRAM-SHA-256", "wonderland", stableSalt(key, "SCRAM-SHA-256", "alice")
    )
    assert result(checker.scramKeys("nobody", "SCRAM-SHA-256")) is None


def test_the_salt_key_of_a_mail_root_is_made_once_and_shared(tmp_path):
    root = tmp_path / "mail"
    key = saltKeyForRoot(root)
    assert (root / SCRAM_KEY_FILE).read_bytes() == key != PROCESS_SALT_KEY
    assert saltKeyForRoot(str(root)) == key  # the next worker, or a restart


def test_a_mail_root_without_a_usable_key_falls_back_to_the_process_key(tmp_path):
    """With a warning that says what it costs."""
    (tmp_path / "mail").mkdir()
    (tmp_path / "mail" / SCRAM_KEY_FILE).write_bytes(base64.b64encode(b"short"))
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert saltKeyForRoot(tmp_path / "mail") is PROCESS_SALT_KEY
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert any("tell unknown users from real ones" in e["log_format"] for e in events)
    assert os.listdir(tmp_path / "mail") == [SCRAM_KEY_FILE]  # not replaced
