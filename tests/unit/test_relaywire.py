"""Bad input for the relay wire codec (ghostcore.relaywire, issue 3 §7): arbitrary bytes only ever raise
RelayProtocolError; valid frames round-trip however the stream is split; auth binds key, expiry and
challenge."""

from __future__ import annotations

import base64

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ghostcore import relaywire as rw

_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SECRET = b"wire-secret"
KEY = b"K" * 32


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
        key, expiry, proof = rw.decode_auth(data)
    except rw.RelayProtocolError:
        assert len(data) != 72
    else:
        assert (len(key), len(proof)) == (32, 32)
        with pytest.raises(rw.RelayProtocolError):
            rw.verify_auth(SECRET, data, b"c" * 32, 0 if expiry else -1)


def test_oversize_frames_refused_both_ways() -> None:
    with pytest.raises(rw.RelayProtocolError):
        rw.encode(rw.SEND, b"\0" * (rw.MAX_PAYLOAD + 1))
    with pytest.raises(rw.RelayProtocolError, match="exceeds"):
        rw.FrameReader().feed(b"\x10\x00\x01\x00\x00")


def test_auth_binds_key_expiry_and_challenge() -> None:
    expiry = 2_000_000_000
    token = rw.token_mac(SECRET, base64.b64encode(KEY).decode(), expiry)
    payload = rw.encode_auth(KEY, expiry, token, b"c" * 32)
    assert rw.verify_auth(SECRET, payload, b"c" * 32, expiry - 1) == KEY
    with pytest.raises(rw.RelayProtocolError, match="expired"):
        rw.verify_auth(SECRET, payload, b"c" * 32, expiry + 1)
    with pytest.raises(rw.RelayProtocolError, match="bad proof"):
        rw.verify_auth(SECRET, payload, b"d" * 32, expiry - 1)  # another challenge: a replay
    with pytest.raises(rw.RelayProtocolError, match="bad proof"):
        rw.verify_auth(b"other", payload, b"c" * 32, expiry - 1)
    later = rw.encode_auth(KEY, expiry + 100, token, b"c" * 32)  # a stretched expiry
    with pytest.raises(rw.RelayProtocolError, match="bad proof"):
        rw.verify_auth(SECRET, later, b"c" * 32, expiry - 1)
