"""TURN REST credentials and stateless nonces: pure maths, no I/O, no clock of its own.

TURN REST convention (draft-uberti-behave-turn-rest-00 §2.2, as coturn's ``use-auth-secret``): the
username is ``"<expiry unix time>:<id>"`` and the password is ``base64(HMAC-SHA1(secret, username))``.
The STUN long-term key is ``MD5(username ":" realm ":" password)`` (RFC 8489 §9.2.2; MD5 is what the
RFC mandates for MESSAGE-INTEGRITY, not our choice). ``rest_username`` / ``rest_password`` come from
:mod:`ghostcore.turnrest` (ghostmesh mints with the same code) and are re-exported here.

Nonces (RFC 8489 §9.2): ``"<issue time hex>-<HMAC-SHA256(nonce key, time)[:16]>"``; the server keeps no
state, and a nonce older than its lifetime is stale (438).
"""

from __future__ import annotations

import hashlib
import hmac

# The username / password maths is shared with ghostmesh (which mints), so it lives in ghostcore.
from ghostcore.turnrest import rest_password, rest_username

__all__ = [
    "long_term_key",
    "make_nonce",
    "nonce_fresh",
    "parse_rest_username",
    "rest_password",
    "rest_username",
]


def parse_rest_username(username: str) -> tuple[int, str] | None:
    """``"1700000000:node1"`` -> (1700000000, "node1"); a bare ``"1700000000"`` has id "". None if bad."""
    expiry_text, _, user_id = username.partition(":")
    if not expiry_text.isdigit() or len(expiry_text) > 12:
        return None
    return int(expiry_text), user_id


def long_term_key(username: str, realm: str, password: str) -> bytes:
    """RFC 8489 §9.2.2 key for MESSAGE-INTEGRITY (SASLprep omitted: our usernames are ASCII)."""
    return hashlib.md5(f"{username}:{realm}:{password}".encode(), usedforsecurity=False).digest()


def make_nonce(nonce_key: bytes, now: float) -> bytes:
    stamp = f"{int(now):x}"
    tag = hmac.new(nonce_key, stamp.encode(), hashlib.sha256).hexdigest()[:16]
    return f"{stamp}-{tag}".encode()


def nonce_fresh(nonce_key: bytes, nonce: bytes, now: float, lifetime: float) -> bool:
    """True when ``nonce`` is one we issued less than ``lifetime`` seconds ago."""
    try:
        stamp, _, tag = nonce.decode("ascii").partition("-")
        issued = int(stamp, 16)
    except (UnicodeDecodeError, ValueError):
        return False
    want = hmac.new(nonce_key, stamp.encode(), hashlib.sha256).hexdigest()[:16]
    return hmac.compare_digest(want, tag) and issued <= now + 1 and now - issued < lifetime
