"""ghostcore.joinkey: the key string an admin hands out, with its pin and lock credential."""

from __future__ import annotations

import hashlib

import pytest

from ghostcore import lock
from ghostcore.errors import InvalidArgument
from ghostcore.joinkey import JoinKey, format_pin, parse_join_key, parse_pin

DIGEST = hashlib.sha256(b"spki").digest()
KEY = "gmauth_0123abcd_" + "x" * 43


def _credential() -> lock.Credential:
    admin, cred_key = lock.SigningKey.generate(), lock.SigningKey.generate()
    return lock.Credential(cred_key, bytes(32), lock.sign_credential(admin, cred_key.public()))


def test_pin_round_trip() -> None:
    text = format_pin(DIGEST)
    assert text.startswith("sha256:")
    assert len(text) == 7 + 43
    assert parse_pin(text) == DIGEST


@pytest.mark.parametrize(
    "bad", ["", "sha256:", "sha1:" + "A" * 43, format_pin(DIGEST)[:-1], format_pin(DIGEST) + "A"]
)
def test_bad_pins(bad: str) -> None:
    with pytest.raises(InvalidArgument, match="--pin"):
        parse_pin(bad, "--pin")


def test_join_key_forms() -> None:
    assert parse_join_key(KEY) == JoinKey(KEY)
    assert parse_join_key(f"{KEY}.{format_pin(DIGEST)}") == JoinKey(KEY, DIGEST)
    cred = _credential()
    full = JoinKey(KEY, DIGEST, cred).text()
    parsed = parse_join_key(full)
    assert (parsed.key, parsed.pin) == (KEY, DIGEST)
    assert parsed.credential is not None
    assert parsed.credential.chain == cred.chain
    assert KEY not in repr(parsed)
    assert parse_join_key(f"{KEY}.lock:{cred.text()}").pin is None


@pytest.mark.parametrize(
    "suffix", [".", ".junk", f".{format_pin(DIGEST)}.{format_pin(DIGEST)}", ".lock:AAAA", ".sha256:AAAA"]
)
def test_bad_join_keys(suffix: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_join_key(KEY + suffix, "--auth")


def test_credential_before_pin_is_refused() -> None:
    cred = _credential()
    with pytest.raises(InvalidArgument, match="unexpected part"):
        parse_join_key(f"{KEY}.lock:{cred.text()}.{format_pin(DIGEST)}")
