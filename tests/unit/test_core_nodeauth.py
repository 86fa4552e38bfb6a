"""ghostcore.nodeauth: proofs bound to the method, the body and a single-use nonce."""

from __future__ import annotations

import pytest

from ghostcore import nodeauth
from ghostcore.errors import AuthError, InvalidArgument, Unavailable
from ghostcore.keys import PrivateKey, PublicKey

SERVER = PrivateKey.generate()
NODE = PrivateKey.generate()
METHOD = "/ghostmesh.v1.Coordination/ReportStatus"
NOW = 1_700_000_000_000


def _proof(
    body: bytes = b"body", method: str = METHOD, now: int = NOW, nonce: str | None = None
) -> nodeauth.Proof:
    md = nodeauth.sign_request(NODE, SERVER.public_key(), method, body, now_ms=now, nonce=nonce)
    return nodeauth.read_proof(dict(md))


def test_proof_verifies_for_its_method_and_body() -> None:
    proof = _proof()
    assert nodeauth.check_proof(SERVER, proof, METHOD, b"body", NOW) == NODE.public_key()


def test_rewritten_body_or_method_fails() -> None:
    proof = _proof()
    with pytest.raises(AuthError, match="proof of possession"):
        nodeauth.check_proof(SERVER, proof, METHOD, b"bodY", NOW)
    with pytest.raises(AuthError):
        nodeauth.check_proof(SERVER, proof, "/ghostmesh.v1.Coordination/RotateKey", b"body", NOW)


def test_another_server_key_cannot_verify() -> None:
    with pytest.raises(AuthError):
        nodeauth.check_proof(PrivateKey.generate(), _proof(), METHOD, b"body", NOW)


def test_stale_proof_fails() -> None:
    with pytest.raises(AuthError, match="stale"):
        nodeauth.check_proof(SERVER, _proof(), METHOD, b"body", NOW + nodeauth.MAX_SKEW_MS + 1)


def test_replay_guard_admits_a_nonce_once_and_forgets_after_the_window() -> None:
    guard = nodeauth.ReplayGuard()
    proof = _proof()
    guard.admit(proof, NOW)
    with pytest.raises(AuthError, match="replay"):
        guard.admit(proof, NOW + 1)
    assert guard.refused == 1
    guard.admit(_proof(), NOW)  # a new nonce is fine
    assert len(guard) == 2
    guard.admit(_proof(now=NOW + 3 * nodeauth.MAX_SKEW_MS), NOW + 3 * nodeauth.MAX_SKEW_MS)
    assert len(guard) == 1  # the two old ones expired


def test_replay_guard_is_bounded_and_refuses_instead_of_forgetting() -> None:
    guard = nodeauth.ReplayGuard(capacity=2)
    guard.admit(_proof(), NOW)
    guard.admit(_proof(), NOW)
    with pytest.raises(Unavailable):
        guard.admit(_proof(), NOW)


def test_same_nonce_from_two_keys_is_two_entries() -> None:
    guard = nodeauth.ReplayGuard()
    nonce = nodeauth.new_nonce()
    guard.admit(_proof(nonce=nonce), NOW)
    other = PrivateKey.generate()
    md = nodeauth.sign_request(other, SERVER.public_key(), METHOD, b"", now_ms=NOW, nonce=nonce)
    guard.admit(nodeauth.read_proof(dict(md)), NOW)


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        (nodeauth.MD_NONCE, "", AuthError),
        (nodeauth.MD_NONCE, "short", InvalidArgument),
        (nodeauth.MD_TS, "-5", InvalidArgument),
        (nodeauth.MD_TS, "1e9", InvalidArgument),
        (nodeauth.MD_PROOF, "not base64!", InvalidArgument),
        (nodeauth.MD_PROOF, "AAAA", InvalidArgument),
        (nodeauth.MD_NODE_KEY, "x", InvalidArgument),
    ],
)
def test_malformed_metadata(field: str, value: str, error: type[Exception]) -> None:
    md = dict(nodeauth.sign_request(NODE, SERVER.public_key(), METHOD, b"", now_ms=NOW))
    md[field] = value
    with pytest.raises(error):
        nodeauth.read_proof(md)


def test_rotation_proof_binds_the_old_key() -> None:
    new = PrivateKey.generate()
    mac = nodeauth.rotation_proof(new, SERVER.public_key(), NODE.public_key(), NOW)
    nodeauth.check_rotation_proof(SERVER, new.public_key(), NODE.public_key(), ts_ms=NOW, mac=mac, now_ms=NOW)
    victim = PrivateKey.generate().public_key()
    with pytest.raises(AuthError):
        nodeauth.check_rotation_proof(SERVER, new.public_key(), victim, ts_ms=NOW, mac=mac, now_ms=NOW)
    with pytest.raises(AuthError, match="stale"):
        nodeauth.check_rotation_proof(
            SERVER, new.public_key(), NODE.public_key(), ts_ms=NOW, mac=mac, now_ms=NOW + 10**6
        )


@pytest.mark.parametrize("raw", [bytes(32), bytes([1]) + bytes(31)])  # low-order points (RFC 7748 6.1)
def test_a_low_order_node_key_is_refused_not_a_crash(raw: bytes) -> None:
    md = dict(nodeauth.sign_request(NODE, SERVER.public_key(), METHOD, b"", now_ms=NOW))
    md[nodeauth.MD_NODE_KEY] = PublicKey(raw).base64()
    with pytest.raises(InvalidArgument, match="low-order"):
        nodeauth.check_proof(SERVER, nodeauth.read_proof(md), METHOD, b"", NOW)
