"""Bad input for the relay wire codec (ghostcore.relaywire): arbitrary bytes only ever raise
RelayProtocolError; valid frames round-trip however the stream is split; auth binds key, expiry and
challenge."""

from __future__ import annotations

import base64
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ghostcore import relaywire as rw
from ghostcore.keys import PrivateKey

_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SECRET = b"wire-secret"
NODE = PrivateKey.generate()
KEY = NODE.public_key().raw
STATIC = rw.relay_static_key(SECRET)


@_SETTINGS
@given(st.lists(st.binary(max_size=300), max_size=20))
def test_frame_reader_arbitrary_bytes_only_protocol_errors(chunks: list[bytes]) -> None:
    reader = rw.FrameReader()
    for chunk in chunks:
        try:
            out = reader.feed(chunk)
        except rw.RelayProtocolError:
            return
        for frame in out:
            assert frame.type in rw.KNOWN
            assert len(frame.payload) <= rw.MAX_PAYLOAD


@_SETTINGS
@given(
    st.lists(st.tuples(st.sampled_from(sorted(rw.KNOWN)), st.binary(max_size=2000)), max_size=10),
    st.lists(st.integers(1, 500), max_size=30),
)
def test_frames_round_trip_however_split(frames: list[tuple[int, bytes]], cuts: list[int]) -> None:
    data = b"".join(rw.encode(t, p) for t, p in frames)
    reader = rw.FrameReader()
    got: list[rw.Frame] = []
    pos = 0
    for cut in cuts:
        got += reader.feed(data[pos : pos + cut])
        pos += cut
    got += reader.feed(data[pos:])
    assert got == [rw.Frame(t, p) for t, p in frames]


@_SETTINGS
@given(st.binary(max_size=200))
def test_decode_datagram_and_auth_arbitrary_bytes(data: bytes) -> None:
    try:
        ftype, key, packet = rw.decode_datagram(data)
    except rw.RelayProtocolError:
        assert len(data) < 33 or data[0] not in (rw.SEND, rw.RECV)
    else:
        assert rw.encode_datagram(ftype, key, packet) == data
    try:
        key, expiry, token_proof, key_proof = rw.decode_auth(data)
    except rw.RelayProtocolError:
        assert len(data) != 104
    else:
        assert (len(key), len(token_proof), len(key_proof)) == (32, 32, 32)
        with pytest.raises(rw.RelayProtocolError):
            rw.verify_auth(SECRET, STATIC, data, b"c" * 32, 0 if expiry else -1)


def test_oversize_frames_refused_both_ways() -> None:
    with pytest.raises(rw.RelayProtocolError):
        rw.encode(rw.SEND, b"\0" * (rw.MAX_PAYLOAD + 1))
    with pytest.raises(rw.RelayProtocolError, match="exceeds"):
        rw.FrameReader().feed(b"\x10\x00\x01\x00\x00")


def _auth(node: PrivateKey, expiry: int, challenge: bytes = b"c" * 32, secret: bytes = SECRET) -> bytes:
    token = rw.token_mac(secret, node.public_key().base64(), expiry)
    return rw.encode_auth(node, STATIC.public_key(), expiry, token, challenge)


def test_auth_binds_key_expiry_and_challenge() -> None:
    expiry = 2_000_000_000
    payload = _auth(NODE, expiry)
    assert rw.verify_auth(SECRET, STATIC, payload, b"c" * 32, expiry - 1) == KEY
    with pytest.raises(rw.RelayProtocolError, match="expired"):
        rw.verify_auth(SECRET, STATIC, payload, b"c" * 32, expiry + 1)
    with pytest.raises(rw.RelayProtocolError, match="bad token proof"):
        rw.verify_auth(SECRET, STATIC, payload, b"d" * 32, expiry - 1)  # another challenge: a replay
    with pytest.raises(rw.RelayProtocolError, match="bad token proof"):
        rw.verify_auth(b"other", STATIC, payload, b"c" * 32, expiry - 1)
    token = rw.token_mac(SECRET, NODE.public_key().base64(), expiry)
    later = rw.encode_auth(NODE, STATIC.public_key(), expiry + 100, token, b"c" * 32)  # a stretched expiry
    with pytest.raises(rw.RelayProtocolError, match="bad token proof"):
        rw.verify_auth(SECRET, STATIC, later, b"c" * 32, expiry - 1)


def test_a_leaked_token_is_useless_without_the_nodes_private_key() -> None:
    """Whoever read the victim's token in its map makes a token proof that verifies, but cannot make the key
    proof: that needs X25519 with the victim's private key."""
    expiry = 2_000_000_000
    challenge = b"c" * 32
    leaked = rw.token_mac(SECRET, NODE.public_key().base64(), expiry)
    thief = PrivateKey.generate()
    forged = bytearray(rw.encode_auth(thief, STATIC.public_key(), expiry, leaked, challenge))
    forged[:32] = KEY  # claims the victim's key, with the victim's token
    with pytest.raises(rw.RelayProtocolError, match="bad key proof"):
        rw.verify_auth(SECRET, STATIC, bytes(forged), challenge, expiry - 1)


def test_the_static_and_tls_keys_follow_the_secret() -> None:
    assert rw.relay_static_key(SECRET).public_key() == STATIC.public_key()
    assert rw.relay_static_key(b"another").public_key() != STATIC.public_key()
    assert rw.relay_tls_seed(SECRET) == rw.relay_tls_seed(SECRET) != rw.relay_tls_seed(b"another")
    assert len(rw.relay_tls_seed(SECRET)) == 48


def test_a_low_order_node_key_is_a_protocol_error() -> None:
    """A valid token for the all-zero key (a coordinator bug, or its secret stolen) still gets no relay
    session: X25519 with a low-order point has no shared secret (RFC 7748 section 6.1)."""
    zero, expiry, challenge = bytes(32), 2_000_000_000, b"c" * 32
    token = rw.token_mac(SECRET, base64.b64encode(zero).decode(), expiry)
    payload = zero + struct.pack("!Q", expiry) + rw.auth_proof(token, challenge) + bytes(32)
    with pytest.raises(rw.RelayProtocolError, match="not a usable X25519 key"):
        rw.verify_auth(SECRET, STATIC, payload, challenge, 0)
