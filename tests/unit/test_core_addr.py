"""ghostcore.addr: the strict (wire) and normalising (human) address parsers."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ghostcore.addr import (
    AddressError,
    format_endpoint,
    grpc_peer,
    grpc_peer_of,
    host_prefix,
    is_hostname,
    normalize_ip,
    normalize_prefix,
    parse_endpoint,
    parse_ip,
    parse_prefix,
    split_hostport,
    url_host,
)
from ghostcore.errors import InvalidArgument

DANGEROUS = [
    "fe80::1%x\nremove=true",  # a zone ID carrying a UAPI line
    "fe80::1%eth0",
    "100.64.0.1\n",
    " 100.64.0.1",
    "100.64.0.1\x00",
    "\uff11\uff10\uff10.64.0.1",  # fullwidth digits
    "::ffff:1.2.3.4",  # embedded IPv4: no stable canonical form
    "::ffff:102:304",  # the same, IPv4-mapped, written in hex
    "",
]


@pytest.mark.parametrize("text", ["100.64.0.1", "fd7a:115c:a1e0::1", "::1", "2001:db8::"])
def test_parse_ip_accepts_canonical(text: str) -> None:
    assert str(parse_ip(text)) == text


@pytest.mark.parametrize("text", [*DANGEROUS, "FD7A:115C:A1E0::1", "fd7a:115c:a1e0:0:0:0:0:1", "1.2.3", "x"])
def test_parse_ip_refuses(text: str) -> None:
    with pytest.raises(AddressError):
        parse_ip(text)


def test_address_error_is_invalid_argument_and_quotes_safely() -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_ip("fe80::1%x\nremove=true", "peer address")
    message = str(info.value)
    assert "\n" not in message  # repr-quoted: a log line stays one line
    assert message.startswith("invalid peer address ")


def test_normalize_ip_repairs_case_and_zero_runs_only() -> None:
    assert normalize_ip("FD7A:115C:A1E0:0:0:0:0:1") == "fd7a:115c:a1e0::1"
    for text in DANGEROUS:
        with pytest.raises(AddressError):
            normalize_ip(text)


@pytest.mark.parametrize(
    "text", ["10.1.1.0/24", "0.0.0.0/0", "::/0", "fd7a:115c:a1e0::1/128", "100.64.0.1/32"]
)
def test_parse_prefix_accepts_canonical(text: str) -> None:
    assert str(parse_prefix(text)) == text


@pytest.mark.parametrize(
    "text",
    ["10.1.1.7/24", "10.1.1.0/024", "10.1.1.0/33", "10.1.1.0", "10.1.1.0/", "10.1.1.0/ 24",
     "fe80::%x/64", "FD7A::/48", "10.1.1.0/24\n", "10.1.1.0/+24"],
)  # fmt: skip
def test_parse_prefix_refuses(text: str) -> None:
    with pytest.raises(AddressError):
        parse_prefix(text)


def test_prefix_host_bits_message_names_the_network() -> None:
    with pytest.raises(AddressError, match=r"10\.1\.1\.0/24"):
        parse_prefix("10.1.1.7/24")
    assert normalize_prefix("10.1.1.7/24", host_bits=True) == "10.1.1.0/24"
    assert normalize_prefix("FD7A:115C:A1E0::/48") == "fd7a:115c:a1e0::/48"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("198.51.100.7:41641", ("198.51.100.7", 41641)), ("[2001:db8::1]:1", ("2001:db8::1", 1))],
)
def test_parse_endpoint(text: str, expected: tuple[str, int]) -> None:
    assert parse_endpoint(text) == expected
    assert format_endpoint(*expected) == text


@pytest.mark.parametrize(
    "text",
    ["[fe80::1%x\nremove=true]:41641", "[fe80::1%eth0]:41641", "198.51.100.7:0", "198.51.100.7:65536",
     "198.51.100.7:041641", "198.51.100.7", "2001:db8::1:80", "[198.51.100.7]:80", "0.0.0.0:80",
     "[::]:80", "224.0.0.1:80", "[2001:DB8::1]:80", "198.51.100.7:80\n", "[2001:db8::1:80", "x:80"],
)  # fmt: skip
def test_parse_endpoint_refuses(text: str) -> None:
    with pytest.raises(AddressError):
        parse_endpoint(text)


def test_host_prefix() -> None:
    assert host_prefix(ipaddress.ip_address("100.64.0.1")) == "100.64.0.1/32"
    assert host_prefix(ipaddress.ip_address("fd7a:115c:a1e0::1")) == "fd7a:115c:a1e0::1/128"


@pytest.mark.parametrize(
    ("text", "ip_only", "expected"),
    [
        ("0.0.0.0:7777", False, ("0.0.0.0", 7777)),
        ("[::]:0", True, ("::", 0)),
        ("[FD7A::1]:7", False, ("fd7a::1", 7)),
        ("Mesh.Example.com:443", False, ("mesh.example.com", 443)),
    ],
)
def test_split_hostport(text: str, ip_only: bool, expected: tuple[str, int]) -> None:
    assert split_hostport(text, ip_only=ip_only) == expected


@pytest.mark.parametrize(
    "text",
    ["host:80 ", "ho st:80", "-host:80", "host-:80", "1.2.3:80", "[fe80::1%eth0]:80", "a..b:80",
     "[1.2.3.4]:80", "::1:80", "host:99999", "host:", ":80", "h\u00e9te:80", f"{'a' * 64}:80"],
)  # fmt: skip
def test_split_hostport_refuses(text: str) -> None:
    with pytest.raises(AddressError):
        split_hostport(text)


@pytest.mark.parametrize(
    ("host", "port", "text"),
    [
        ("192.0.2.1", 7777, "192.0.2.1:7777"),
        ("2001:db8::1", 7777, "[2001:db8::1]:7777"),
        ("[2001:db8::1]", 7777, "[2001:db8::1]:7777"),  # already bracketed: not twice
        ("mesh.example.com", 443, "mesh.example.com:443"),  # a host name as it is
    ],
)
def test_format_endpoint_brackets_ipv6_only(host: str, port: int, text: str) -> None:
    assert format_endpoint(host, port) == text
    assert url_host(host) == text.rpartition(":")[0]


@pytest.mark.parametrize("text", ["203.0.113.1:7777", "[2001:db8::1]:1", "mesh.example.com:443"])
def test_format_endpoint_inverts_split_hostport(text: str) -> None:
    assert format_endpoint(*split_hostport(text)) == text


@pytest.mark.parametrize(
    ("peer", "parsed"),
    [
        ("ipv4:192.0.2.1:5000", ("ipv4", "192.0.2.1")),
        ("ipv6:[2001:db8::1]:5000", ("ipv6", "2001:db8::1")),
        ("ipv6:%5B2001:db8::1%5D:5000", ("ipv6", "2001:db8::1")),  # percent-escaped by older gRPC
        ("ipv6:[fe80::1%eth0]:1", ("ipv6", "fe80::1%eth0")),  # kept: the caller decides
        ("unix:/run/ghostmesh/admin.sock", ("unix", "/run/ghostmesh/admin.sock")),
        ("vsock:3:1", ("vsock", "3:1")),
    ],
)
def test_grpc_peer(peer: str, parsed: tuple[str, str]) -> None:
    assert grpc_peer(peer) == parsed


@pytest.mark.parametrize(("host", "port"), [("192.0.2.1", 5000), ("2001:db8::1", 443)])
def test_grpc_peer_of_round_trips(host: str, port: int) -> None:
    peer = grpc_peer_of(host, port)
    assert peer == ("ipv6:[2001:db8::1]:443" if ":" in host else "ipv4:192.0.2.1:5000")
    assert grpc_peer(peer) == ("ipv6" if ":" in host else "ipv4", host)


def test_hostnames() -> None:
    assert is_hostname("ghostmesh")
    assert is_hostname("a-1.example")
    assert not is_hostname("123")
    assert not is_hostname("a." * 127 + "b")


@given(st.text(max_size=60))
def test_whatever_parses_is_canonical_and_safe(text: str) -> None:
    """Anything the wire parsers accept round-trips exactly and can carry no UAPI/nft syntax."""
    for parse in (parse_ip, parse_prefix, parse_endpoint):
        try:
            parsed = parse(text)
        except AddressError:
            continue
        assert text.isascii()
        assert text.isprintable()
        assert not any(c in text for c in " \t\n\r%=;{}\"'")
        shown = format_endpoint(*parsed) if isinstance(parsed, tuple) else str(parsed)
        assert shown == text


@given(st.ip_addresses(), st.integers(1, 65535))
def test_endpoint_round_trip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> None:
    text = format_endpoint(str(ip), port)
    mapped = isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None
    if ip.is_unspecified or ip.is_multicast or (ip.version == 6 and "." in str(ip)) or mapped:
        with pytest.raises(AddressError):
            parse_endpoint(text)
    else:
        assert parse_endpoint(text) == (str(ip), port)
