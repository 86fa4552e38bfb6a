"""Node authentication proofs: how a node proves it holds its WireGuard private key on every RPC.

A node sends three metadata entries (see ``proto/ghostmesh/v1/coordination.proto``)::

    x-ghost-node-key  base64 node public key
    x-ghost-ts        unix time in milliseconds
    x-ghost-proof     base64 HMAC-SHA256(K, "<method>\\n<ts>\\n<node-key>")

with ``K = HKDF-SHA256(X25519(node_private, server_public), info=INFO)``. The server computes the same
``K`` from its own private key and the claimed node key (X25519 is symmetric: RFC 7748 section 6.1), so a
proof verifies only if the sender holds the private key of the key it claims. Binding the method name
stops a proof for one RPC from being replayed on another; the timestamp bounds replay to ``MAX_SKEW_MS``.

This module is pure: callers pass ``now_ms`` and get bytes / exceptions back.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from dataclasses import dataclass
from hashlib import sha256

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ghostcore.errors import AuthError, InvalidArgument
from ghostcore.keys import PrivateKey, PublicKey

MD_NODE_KEY = "x-ghost-node-key"
MD_TS = "x-ghost-ts"
MD_PROOF = "x-ghost-proof"
INFO = b"ghostmesh-node-proof-v1"
MAX_SKEW_MS = 60_000


def _proof_key(own: PrivateKey, other: PublicKey) -> bytes:
    shared = own.exchange(other)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=INFO).derive(shared)


def _mac(key: bytes, method: str, ts_ms: int, node_key: PublicKey) -> bytes:
    msg = f"{method}\n{ts_ms}\n{node_key.base64()}".encode()
    return hmac.new(key, msg, sha256).digest()


def make_metadata(
    node: PrivateKey, server: PublicKey, method: str, now_ms: int
) -> tuple[tuple[str, str], ...]:
    """Metadata a node attaches to a call of ``method`` (the full gRPC method path)."""
    pub = node.public_key()
    mac = _mac(_proof_key(node, server), method, now_ms, pub)
    return (
        (MD_NODE_KEY, pub.base64()),
        (MD_TS, str(now_ms)),
        (MD_PROOF, base64.b64encode(mac).decode("ascii")),
    )


@dataclass(frozen=True, slots=True)
class NodeProof:
    node_key: PublicKey
    ts_ms: int
    mac: bytes


def parse_metadata(md: dict[str, str]) -> NodeProof:
    """Extract a proof from call metadata; InvalidArgument/AuthError with a one-line reason if malformed."""
    key_text, ts_text, proof_text = md.get(MD_NODE_KEY), md.get(MD_TS), md.get(MD_PROOF)
    if not key_text or not ts_text or not proof_text:
        raise AuthError(
            "missing node credentials (x-ghost-node-key, x-ghost-ts, x-ghost-proof); upgrade ghostlink"
        )
    node_key = PublicKey.from_base64(key_text)
    try:
        ts_ms = int(ts_text)
        mac = base64.b64decode(proof_text, validate=True)
    except (ValueError, binascii.Error):
        raise InvalidArgument(
            "malformed node credentials: x-ghost-ts must be an integer, x-ghost-proof base64"
        ) from None
    return NodeProof(node_key, ts_ms, mac)


def verify(server: PrivateKey, proof: NodeProof, method: str, now_ms: int) -> PublicKey:
    """Check a proof; return the proven node key, or raise AuthError."""
    if abs(now_ms - proof.ts_ms) > MAX_SKEW_MS:
        raise AuthError(
            "node credentials are stale: the node's clock is off by more than 60 s, or this is a replay"
        )
    expected = _mac(_proof_key(server, proof.node_key), method, proof.ts_ms, proof.node_key)
    if not hmac.compare_digest(expected, proof.mac):
        raise AuthError(f"node key {proof.node_key.short()}… failed its proof of possession")
    return proof.node_key
