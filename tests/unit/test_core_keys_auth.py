"""ghostcore.keys and ghostcore.nodeauth: encodings, redaction, proof of possession."""

from __future__ import annotations

import base64

import pytest

from ghostcore import nodeauth
from ghostcore.errors import AuthError, InvalidArgument
from ghostcore.keys import PrivateKey, PublicKey

METHOD = "/ghostmesh.v1.Coordination/Sync"


def test_public_key_round_trips_base64_and_hex() -> None:
    pub = PrivateKey.generate().public_key()
    assert PublicKey.from_base64(pub.base64()) == pub
    assert PublicKey.from_hex(pub.hex()) == pub
    assert len(pub.base64()) == 44


@pytest.mark.parametrize(
    "text",
    [
        "",
        "abc",
        "A" * 44,
        base64.b64encode(b"x" * 31).decode(),
        base64.b64encode(b"x" * 33).decode(),
        "!" * 44,
    ],
)
def test_invalid_public_keys_are_refused_with_a_clear_message(text: str) -> None:
    with pytest.raises(InvalidArgument, match="expected 32 bytes in base64"):
        PublicKey.from_base64(text)


def test_private_key_repr_never_contains_the_secret() -> None:
    priv = PrivateKey.generate()
    secret_b64, secret_hex = priv.base64(), priv.hex()
    for text in (repr(priv), str(priv), f"{priv}", f"{priv!r}"):
        assert secret_b64 not in text
        assert secret_hex not in text
        assert "redacted" in text


def test_private_key_base64_round_trip_keeps_public_key() -> None:
    priv = PrivateKey.generate()
    assert PrivateKey.from_base64(priv.base64()).public_key() == priv.public_key()


def _md(node: PrivateKey, server: PublicKey, method: str = METHOD, now_ms: int = 1_000_000) -> dict[str, str]:
    return dict(nodeauth.sign_request(node, server, method, b"", now_ms=now_ms))


def test_a_proof_made_with_the_node_key_verifies_on_the_server() -> None:
    node, server = PrivateKey.generate(), PrivateKey.generate()
    proof = nodeauth.read_proof(_md(node, server.public_key()))
    assert nodeauth.check_proof(server, proof, METHOD, b"", 1_000_500) == node.public_key()


def test_claiming_another_nodes_key_fails_the_proof() -> None:
    victim, attacker, server = PrivateKey.generate(), PrivateKey.generate(), PrivateKey.generate()
    md = _md(attacker, server.public_key())
    md[nodeauth.MD_NODE_KEY] = victim.public_key().base64()
    proof = nodeauth.read_proof(md)
    with pytest.raises(AuthError, match="proof of possession"):
        nodeauth.check_proof(server, proof, METHOD, b"", 1_000_000)


def test_a_proof_for_one_method_does_not_verify_for_another() -> None:
    node, server = PrivateKey.generate(), PrivateKey.generate()
    proof = nodeauth.read_proof(_md(node, server.public_key(), "/ghostmesh.v1.Coordination/ReportStatus"))
    with pytest.raises(AuthError):
        nodeauth.check_proof(server, proof, "/ghostmesh.v1.Coordination/Register", b"", 1_000_000)


def test_a_proof_for_another_server_does_not_verify() -> None:
    node, server, other = PrivateKey.generate(), PrivateKey.generate(), PrivateKey.generate()
    proof = nodeauth.read_proof(_md(node, other.public_key()))
    with pytest.raises(AuthError):
        nodeauth.check_proof(server, proof, METHOD, b"", 1_000_000)


@pytest.mark.parametrize("skew_ms", [60_001, -60_001, 10**9])
def test_stale_or_future_proofs_are_refused(skew_ms: int) -> None:
    node, server = PrivateKey.generate(), PrivateKey.generate()
    proof = nodeauth.read_proof(_md(node, server.public_key()))
    with pytest.raises(AuthError, match="stale"):
        nodeauth.check_proof(server, proof, METHOD, b"", 1_000_000 + skew_ms)


def test_missing_and_malformed_metadata() -> None:
    node, server = PrivateKey.generate(), PrivateKey.generate()
    good = _md(node, server.public_key())
    for key in (nodeauth.MD_NODE_KEY, nodeauth.MD_TS, nodeauth.MD_NONCE, nodeauth.MD_PROOF):
        md = dict(good)
        del md[key]
        with pytest.raises(AuthError, match="missing node credentials"):
            nodeauth.read_proof(md)
    with pytest.raises(InvalidArgument, match="x-ghost-ts"):
        nodeauth.read_proof({**good, nodeauth.MD_TS: "soon"})
    with pytest.raises(InvalidArgument, match="public key"):
        nodeauth.read_proof({**good, nodeauth.MD_NODE_KEY: "not-a-key"})
