"""The WireGuard UAPI codec (wireguard.com/xplatform): incremental set requests, get parsing, errno."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ghostcore.errors import InvalidArgument, ProtocolError
from ghostcore.keys import PrivateKey, PublicKey
from ghostlink.wg import uapi_codec as codec
from ghostlink.wg.uapi_codec import DeviceState, PeerChange, PeerState

K1 = PublicKey(bytes(range(32))).base64()
K2 = PublicKey(bytes(range(1, 33))).base64()


def lines(req: bytes) -> list[str]:
    text = req.decode()
    assert text.endswith("\n\n"), "a request ends with an empty line"
    return text[:-2].split("\n")


def test_new_peer_full_config_without_update_only() -> None:
    req = codec.encode_set(
        [
            PeerChange(
                K1, create=True, endpoint="192.0.2.1:41641", allowed_ips=("100.64.0.2/32",), keepalive=25
            )
        ]
    )
    assert lines(req) == [
        "set=1",
        f"public_key={PublicKey.from_base64(K1).hex()}",
        "endpoint=192.0.2.1:41641",
        "persistent_keepalive_interval=25",
        "replace_allowed_ips=true",
        "allowed_ip=100.64.0.2/32",
    ]


def test_changed_peer_sends_update_only_and_only_changed_fields() -> None:
    req = lines(codec.encode_set([PeerChange(K1, endpoint="[2001:db8::1]:51820")]))
    assert req == [
        "set=1",
        f"public_key={PublicKey.from_base64(K1).hex()}",
        "update_only=true",
        "endpoint=[2001:db8::1]:51820",
    ]
    assert not any(line.startswith(("replace_allowed_ips", "allowed_ip")) for line in req)


def test_removed_peer() -> None:
    assert lines(codec.encode_set([PeerChange(K2, remove=True)]))[1:] == [
        f"public_key={PublicKey.from_base64(K2).hex()}",
        "remove=true",
    ]


def test_device_settings_and_private_key_as_hex() -> None:
    key = PrivateKey.generate()
    req = lines(codec.encode_set(private_key=key, listen_port=41641))
    assert req == ["set=1", f"private_key={key.hex()}", "listen_port=41641"]


def test_never_replace_peers() -> None:
    req = codec.encode_set(
        [PeerChange(K1, create=True, allowed_ips=("10.0.0.0/8",)), PeerChange(K2, remove=True)],
        private_key=PrivateKey.generate(),
        listen_port=1,
    )
    assert b"replace_peers" not in req
    with pytest.raises(ProtocolError, match="replace_peers"):
        codec.parse_set("set=1\nreplace_peers=true\n\n")


@pytest.mark.parametrize(
    "bad", ["192.0.2.1", "192.0.2.1:0", "2001:db8::1:5", "[192.0.2.1]:5", "x:1", "a\nb:1"]
)
def test_bad_endpoint_rejected(bad: str) -> None:
    with pytest.raises(InvalidArgument, match="endpoint"):
        codec.encode_set([PeerChange(K1, endpoint=bad)])


def test_bad_allowed_ip_rejected_no_injection() -> None:
    with pytest.raises(InvalidArgument, match="allowed IP"):
        codec.encode_set([PeerChange(K1, allowed_ips=("10.0.0.0/8\nremove=true",))])


GET_RESPONSE = (
    "private_key=e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a\n"
    "listen_port=12912\n"
    f"public_key={PublicKey.from_base64(K1).hex()}\n"
    "preshared_key=0000000000000000000000000000000000000000000000000000000000000000\n"
    "protocol_version=1\n"
    "endpoint=[abcd:23::33%2]:51820\n"
    "last_handshake_time_sec=1700000000\n"
    "last_handshake_time_nsec=5\n"
    "tx_bytes=38333\n"
    "rx_bytes=2224\n"
    "persistent_keepalive_interval=25\n"
    "allowed_ip=192.168.4.4/32\n"
    "allowed_ip=fd00::/64\n"
    f"public_key={PublicKey.from_base64(K2).hex()}\n"
    "last_handshake_time_sec=0\n"
    "allowed_ip=10.0.0.0/8\n"
    "errno=0\n\n"
)


def test_parse_get_spec_example() -> None:
    dev = codec.parse_get(GET_RESPONSE)
    assert dev.listen_port == 12912
    assert dev.has_private_key
    assert set(dev.peers) == {K1, K2}  # keys converted hex -> base64
    p = dev.peers[K1]
    assert p.endpoint == "[abcd:23::33%2]:51820"
    assert (p.last_handshake_sec, p.rx_bytes, p.tx_bytes, p.keepalive) == (1700000000, 2224, 38333, 25)
    assert p.allowed_ips == ("192.168.4.4/32", "fd00::/64")
    assert dev.peers[K2].endpoint is None
    assert dev.peers[K2].allowed_ips == ("10.0.0.0/8",)
    assert "e84b5a" not in repr(dev), "the private key is not kept"


def test_errno_nonzero_is_clear_error() -> None:
    with pytest.raises(codec.UapiError, match="errno=22") as exc:
        codec.check_errno("errno=22\n\n", "set")
    assert exc.value.errno == 22
    with pytest.raises(ProtocolError, match="no errno"):
        codec.parse_get("listen_port=1\n\n")
    with pytest.raises(ProtocolError, match="malformed"):
        codec.parse_get("listen_port\nerrno=0\n\n")
    with pytest.raises(ProtocolError, match="integer"):
        codec.parse_get("listen_port=x\nerrno=0\n\n")


keys = st.binary(min_size=32, max_size=32).map(lambda b: PublicKey(b).base64())
v4 = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
prefixes = (
    st.tuples(v4, st.integers(0, 32))
    .map(lambda t: f"{t[0]}/{t[1]}")
    .map(lambda p: str(__import__("ipaddress").ip_network(p, strict=False)))
)
# What is sent must be sendable: no unspecified or multicast endpoint (ghostcore.addr.parse_endpoint).
sendable = v4.filter(lambda a: not a.startswith("0.") and not 224 <= int(a.split(".")[0]) <= 239)
endpoints = st.one_of(st.none(), st.tuples(sendable, st.integers(1, 65535)).map(lambda t: f"{t[0]}:{t[1]}"))
changes = st.builds(
    PeerChange,
    public_key=keys,
    remove=st.booleans(),
    create=st.booleans(),
    endpoint=endpoints,
    allowed_ips=st.one_of(st.none(), st.lists(prefixes, max_size=4).map(tuple)),
    keepalive=st.one_of(st.none(), st.integers(0, 65535)),
)


def _normal(c: PeerChange) -> PeerChange:
    # A removal carries nothing else on the wire.
    return PeerChange(c.public_key, remove=True) if c.remove else c


@given(st.lists(changes, max_size=6), st.one_of(st.none(), st.integers(0, 65535)))
def test_parse_set_inverts_encode_set(cs: list[PeerChange], port: int | None) -> None:
    got_port, got = codec.parse_set(codec.encode_set(cs, listen_port=port).decode())
    assert got_port == port
    assert got == [_normal(c) for c in cs]


states = st.builds(
    PeerState,
    public_key=keys,
    endpoint=endpoints,
    last_handshake_sec=st.integers(0, 2**40),
    last_handshake_nsec=st.integers(0, 999_999_999),
    rx_bytes=st.integers(0, 2**63),
    tx_bytes=st.integers(0, 2**63),
    keepalive=st.integers(0, 65535),
    allowed_ips=st.lists(prefixes, max_size=4).map(tuple),
)


@given(st.lists(states, max_size=5, unique_by=lambda p: p.public_key), st.integers(0, 65535))
def test_parse_get_inverts_get_response(peers: list[PeerState], port: int) -> None:
    dev = DeviceState(listen_port=port, peers={p.public_key: p for p in peers})
    assert codec.parse_get(codec.encode_get_response(dev).decode()) == dev


def test_apply_changes_semantics() -> None:
    dev = DeviceState(
        peers={K1: PeerState(K1, endpoint="192.0.2.1:1", rx_bytes=9, allowed_ips=("10.0.0.1/32",))}
    )
    out = codec.apply_changes(
        dev,
        [
            PeerChange(K1, allowed_ips=("10.0.0.2/32",)),  # update keeps endpoint and counters
            PeerChange(K2),  # update_only on an unknown peer: no-op (spec)
        ],
    )
    assert out.peers[K1] == PeerState(K1, endpoint="192.0.2.1:1", rx_bytes=9, allowed_ips=("10.0.0.2/32",))
    assert K2 not in out.peers
    assert codec.apply_changes(out, [PeerChange(K1, remove=True)]).peers == {}
