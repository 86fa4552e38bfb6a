"""ghostctl ping's node side, pure parts: the ICMP echo codec and how a peer is named."""

from __future__ import annotations

import struct

import pytest

from ghostcore.errors import InvalidArgument, NotFound
from ghostlink.engine import NodeInfo
from ghostlink.pinger import checksum, echo_request, parse_echo_reply
from ghostlink.status import resolve_peer


def test_checksum_of_a_known_echo_request() -> None:
    # type 8, code 0, id 1, seq 1, no payload: 0x0800 + 0x0001 + 0x0001 = 0x0802, complemented
    assert echo_request(4, 1, 1, b"")[2:4] == bytes.fromhex("f7fd")
    assert checksum(echo_request(4, 0xBEEF, 7, b"odd")) == 0, "a packet with its checksum sums to zero"


def test_icmpv6_checksum_is_left_to_the_kernel() -> None:
    assert echo_request(6, 5, 9, b"tok") == struct.pack("!BBHHH", 128, 0, 0, 5, 9) + b"tok"


def _ipv4(icmp: bytes, ihl: int = 5) -> bytes:
    return bytes([0x40 | ihl]) + bytes(ihl * 4 - 1) + icmp


def test_a_reply_is_parsed_behind_any_ipv4_header_length() -> None:
    reply = struct.pack("!BBHHH", 0, 0, 0, 0x1234, 3) + b"token"
    assert parse_echo_reply(4, _ipv4(reply)) == (0x1234, 3, b"token")
    assert parse_echo_reply(4, _ipv4(reply, ihl=6)) == (0x1234, 3, b"token")
    assert parse_echo_reply(6, struct.pack("!BBHHH", 129, 0, 0, 1, 2) + b"x") == (1, 2, b"x")


@pytest.mark.parametrize(
    "packet",
    [
        _ipv4(echo_request(4, 1, 1, b"")),  # our own request (or a peer's), not a reply
        _ipv4(struct.pack("!BBHHH", 3, 1, 0, 0, 0)),  # destination unreachable
        _ipv4(b"\0\0"),  # truncated
        b"\x45" + bytes(10),  # shorter than an IPv4 header
        b"\x60" + bytes(40),  # not IPv4
    ],
)
def test_anything_but_an_echo_reply_is_none(packet: bytes) -> None:
    assert parse_echo_reply(4, packet) is None


def _node(i: int, name: str, key: str, *addresses: str) -> NodeInfo:
    return NodeInfo(i, name, "u", key, addresses, (), (), True, 0, 0)


PEERS = [
    _node(2, "beta", "a2V5Mg==", "100.64.0.2", "fd7a:115c:a1e0::2"),
    _node(3, "gamma", "a2V5Mw==", "fd7a:115c:a1e0::3", "100.64.0.3"),
    _node(4, "v6only", "a2V5NA==", "fd7a:115c:a1e0::4"),
]


@pytest.mark.parametrize(
    ("ref", "name", "address"),
    [
        ("beta", "beta", "100.64.0.2"),
        ("gamma", "gamma", "100.64.0.3"),  # a name pings the IPv4 address, wherever it is listed
        ("v6only", "v6only", "fd7a:115c:a1e0::4"),
        ("a2V5Mw==", "gamma", "100.64.0.3"),  # the node key
        ("fd7a:115c:a1e0::2", "beta", "fd7a:115c:a1e0::2"),  # an address pings that address
        (" 100.64.0.3 ", "gamma", "100.64.0.3"),
    ],
)
def test_a_peer_is_named_by_name_address_or_key(ref: str, name: str, address: str) -> None:
    node, addr = resolve_peer(PEERS, ref)
    assert (node.name, addr) == (name, address)


@pytest.mark.parametrize("ref", ["delta", "100.64.0.9", "Beta", "a2V5OQ=="])
def test_an_unknown_peer_is_not_found_and_says_where_to_look(ref: str) -> None:
    with pytest.raises(NotFound, match="ghostctl peers"):
        resolve_peer(PEERS, ref)


def test_an_empty_peer_is_invalid() -> None:
    with pytest.raises(InvalidArgument, match="no peer given"):
        resolve_peer(PEERS, "  ")
