"""Node authentication proofs: how a node proves, on every RPC, that it holds its WireGuard private key and
that the request the server reads is the one it sent, once.

A node sends four metadata entries (see ``proto/ghostmesh/v1/coordination.proto``)::

    x-ghost-node-key  base64 node public key
    x-ghost-ts        unix time in milliseconds
    x-ghost-nonce     16 random bytes, unpadded base64url: never used twice
    x-ghost-proof     base64 HMAC-SHA256(K, "ghost-proof-v2\\n<method>\\n<ts>\\n<nonce>\\n<node-key>\\n<h>")

where ``h`` is the hex SHA-256 of the request body,
``K = HKDF-SHA256(X25519(node_private, server_public), info=INFO)``, and the body the exact bytes of the
serialized request message. The server computes the same ``K`` from its own private key and the claimed
node key (X25519 is symmetric: RFC 7748 section 6.1), so a proof verifies only if the sender holds the
private key of the key it claims. What the MAC binds, and why:

* the method: a proof for one RPC is useless on another;
* the body's hash: nobody on the path (nor a proxy that terminates TLS) can change what the request says,
  e.g. swap the new key inside a ``RotateKey``;
* the timestamp: the server keeps nonces only for ``MAX_SKEW_MS`` either side of its clock, and refuses
  proofs outside that window;
* the nonce: :class:`ReplayGuard` refuses a nonce seen before from that key, so a recorded request cannot be
  played again within the window.

The proof is symmetric: the server could compute it too. That is acceptable because the server is the one
that checks it; what the server must not be able to forge (which keys peers install) is signed with keys it
never holds (:mod:`ghostcore.lock`).

A ``RotateKey`` request also carries a proof by the NEW key (:func:`rotation_proof`) over the old key and a
timestamp: the new key's holder agrees to replace that node key and no other.

This module is pure: callers pass ``now_ms`` (and, for tests, the nonce) and get bytes / exceptions back.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import hmac
import secrets
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ghostcore.errors import AuthError, InvalidArgument, Unavailable
from ghostcore.keys import PrivateKey, PublicKey

MD_NODE_KEY = "x-ghost-node-key"
MD_TS = "x-ghost-ts"
MD_NONCE = "x-ghost-nonce"
MD_PROOF = "x-ghost-proof"
INFO = b"ghostmesh-node-proof-v2"
VERSION_TAG = "ghost-proof-v2"
ROTATION_TAG = "ghost-rotate-v2"
MAX_SKEW_MS = 60_000
NONCE_BYTES = 16
_NONCE_TEXT = 22  # unpadded base64url of 16 bytes
MAC_LEN = 32


def _proof_key(own: PrivateKey, other: PublicKey) -> bytes:
    shared = own.exchange(other)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=INFO).derive(shared)


def _mac(key: bytes, method: str, proof: Proof, body: bytes) -> bytes:
    digest = hashlib.sha256(body).hexdigest()
    fields = (VERSION_TAG, method, str(proof.ts_ms), proof.nonce, proof.node_key.base64(), digest)
    msg = "\n".join(fields).encode()
    return hmac.new(key, msg, hashlib.sha256).digest()


def new_nonce() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(NONCE_BYTES)).rstrip(b"=").decode("ascii")


def sign_request(
    node: PrivateKey, server: PublicKey, method: str, body: bytes, *, now_ms: int, nonce: str | None = None
) -> tuple[tuple[str, str], ...]:
    """Metadata a node attaches to a call of ``method`` (the full gRPC path) whose request is ``body``."""
    unsigned = Proof(node.public_key(), now_ms, nonce or new_nonce(), b"")
    mac = _mac(_proof_key(node, server), method, unsigned, body)
    return (
        (MD_NODE_KEY, unsigned.node_key.base64()),
        (MD_TS, str(now_ms)),
        (MD_NONCE, unsigned.nonce),
        (MD_PROOF, base64.b64encode(mac).decode("ascii")),
    )


@dataclass(frozen=True, slots=True)
class Proof:
    node_key: PublicKey
    ts_ms: int
    nonce: str
    mac: bytes


def read_proof(md: dict[str, str]) -> Proof:
    """Extract a proof from call metadata; AuthError / InvalidArgument with a one-line reason if malformed."""
    key_text, ts_text = md.get(MD_NODE_KEY), md.get(MD_TS)
    nonce, proof_text = md.get(MD_NONCE), md.get(MD_PROOF)
    if not key_text or not ts_text or not nonce or not proof_text:
        raise AuthError(
            "missing node credentials (x-ghost-node-key, x-ghost-ts, x-ghost-nonce, x-ghost-proof); "
            "upgrade ghostlink"
        )
    node_key = PublicKey.from_base64(key_text)
    malformed = InvalidArgument(
        "malformed node credentials: x-ghost-ts must be an integer, x-ghost-proof base64, "
        "x-ghost-nonce base64url"
    )
    if not ts_text.isdigit() or len(ts_text) > 16:
        raise malformed
    try:
        mac = base64.b64decode(proof_text, validate=True)
        raw_nonce = base64.urlsafe_b64decode(nonce + "==")
    except (ValueError, binascii.Error):
        raise malformed from None
    if len(mac) != MAC_LEN or len(nonce) != _NONCE_TEXT or len(raw_nonce) != NONCE_BYTES:
        raise InvalidArgument("malformed node credentials: wrong proof or nonce length")
    return Proof(node_key, int(ts_text), nonce, mac)


def check_proof(server: PrivateKey, proof: Proof, method: str, body: bytes, now_ms: int) -> PublicKey:
    """Check a proof's time and MAC (not yet its nonce: :class:`ReplayGuard`); the proven key or AuthError."""
    if abs(now_ms - proof.ts_ms) > MAX_SKEW_MS:
        raise AuthError(
            "node credentials are stale: the node's clock is off by more than 60 s, or this is a replay"
        )
    expected = _mac(_proof_key(server, proof.node_key), method, proof, body)
    if not hmac.compare_digest(expected, proof.mac):
        raise AuthError(f"node key {proof.node_key.short()}… failed its proof of possession")
    return proof.node_key


class ReplayGuard:
    """Nonces seen within the skew window, so each signed request is accepted once.

    An entry lives until its proof's timestamp leaves the window (``ts + MAX_SKEW_MS``); after that the
    timestamp check refuses the proof anyway. Memory is bounded: with ``capacity`` live entries a new
    request is refused as Unavailable (retry later) rather than forgetting a nonce early, which would
    re-open the replay it guards against.
    """

    def __init__(self, capacity: int = 262_144) -> None:
        self.capacity = capacity
        self._seen: set[tuple[bytes, str]] = set()
        self._expiry: list[tuple[int, bytes, str]] = []
        self.refused = 0

    def __len__(self) -> int:
        return len(self._seen)

    def admit(self, proof: Proof, now_ms: int) -> None:
        """Remember ``proof``'s nonce, or AuthError if it was used before (call after :func:`check_proof`)."""
        while self._expiry and self._expiry[0][0] < now_ms - MAX_SKEW_MS:
            _, key, nonce = heapq.heappop(self._expiry)
            self._seen.discard((key, nonce))
        entry = (proof.node_key.raw, proof.nonce)
        if entry in self._seen:
            self.refused += 1
            raise AuthError("this request was already used once (a replay); each request needs a new nonce")
        if len(self._seen) >= self.capacity:
            self.refused += 1
            raise Unavailable("too many signed requests in the last two minutes; retry shortly")
        self._seen.add(entry)
        heapq.heappush(self._expiry, (proof.ts_ms, *entry))


def _rotation_mac(key: bytes, new_key: PublicKey, old_key: PublicKey, ts_ms: int) -> bytes:
    msg = f"{ROTATION_TAG}\n{new_key.base64()}\n{old_key.base64()}\n{ts_ms}".encode()
    return hmac.new(key, msg, hashlib.sha256).digest()


def rotation_proof(new: PrivateKey, server: PublicKey, old_key: PublicKey, ts_ms: int) -> bytes:
    """The new key's consent to replace ``old_key`` (``RotateKeyRequest.new_key_proof``)."""
    return _rotation_mac(_proof_key(new, server), new.public_key(), old_key, ts_ms)


def check_rotation_proof(
    server: PrivateKey, new_key: PublicKey, old_key: PublicKey, *, ts_ms: int, mac: bytes, now_ms: int
) -> None:
    if abs(now_ms - ts_ms) > MAX_SKEW_MS:
        raise AuthError("the new key's proof is stale: the node's clock is off by more than 60 s")
    expected = _rotation_mac(_proof_key(server, new_key), new_key, old_key, ts_ms)
    if not hmac.compare_digest(expected, mac):
        raise AuthError(f"the new key {new_key.short()}… failed its proof of possession")
