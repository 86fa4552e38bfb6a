"""ghostlink.iproute's pure parts: the batch lines a change becomes, and the reading of ``ip -j`` output
(the JSON is what iproute2 6.x prints; ``run`` is replaced, so no ip runs here)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest

from ghostlink import iproute, net
from ghostlink.iproute import Route


def test_a_change_removes_routes_first_and_adds_an_address_before_removing_one() -> None:
    lines = iproute.sync_batch(
        "wg0",
        addresses_remove=["100.64.0.9/32"],
        addresses_add=["100.64.0.2/32", "fd7a:115c:a1e0::2/128"],
        routes_remove=["10.9.0.0/24"],
        routes_add=["10.1.0.0/24", "::/0"],
        metric=2000,
    )
    assert lines == [
        "route del 10.9.0.0/24 dev wg0 metric 2000",
        "address replace 100.64.0.2/32 dev wg0",
        "address replace fd7a:115c:a1e0::2/128 dev wg0",
        "address del 100.64.0.9/32 dev wg0",
        "route replace 10.1.0.0/24 dev wg0 metric 2000",
        "route replace ::/0 dev wg0 metric 2000",
    ]


def test_resolver_addresses_are_never_a_source() -> None:
    assert net.service_address_lines("wg0", ["100.100.100.100", "fd7a:115c:a1e0::53"]) == [
        "address replace 100.100.100.100/32 dev wg0 scope host",
        "address replace fd7a:115c:a1e0::53/128 dev wg0 nodad preferred_lft 0 valid_lft forever",
    ]


class FakeIp:
    """``iproute.run`` answering from canned JSON per command, recording every call."""

    def __init__(self, answers: dict[str, object]) -> None:
        self.answers = answers
        self.calls: list[tuple[list[str], str | None]] = []

    def __call__(self, args: Sequence[str], netns: str | None = None, *, stdin: str | None = None) -> str:
        self.calls.append((list(args), stdin))
        return json.dumps(self.answers.get(" ".join(args), []))


ADDRS = [
    {
        "ifname": "wg0",
        "addr_info": [
            {"family": "inet", "local": "100.64.0.2", "prefixlen": 32},
            {"family": "inet6", "local": "fd7a:115c:a1e0::2", "prefixlen": 128},
        ],
    }
]
ROUTES4 = [
    {"dst": "10.1.0.0/24", "dev": "wg0", "scope": "link", "metric": 2000},
    {"dst": "100.64.0.3", "dev": "wg0", "scope": "link", "metric": 2000},
    {"dst": "default", "dev": "wg0", "metric": 2000},
    {"dst": "10.7.0.0/16", "dev": "wg0", "scope": "link"},  # someone else's (metric 0)
]
ROUTES6 = [{"dst": "fd7a:115c:a1e0::2", "dev": "wg0", "protocol": "kernel", "metric": 256}]


def test_routes_are_read_as_networks_of_both_families(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeIp({"-j -4 route show dev wg0": ROUTES4, "-j -6 route show dev wg0": ROUTES6})
    monkeypatch.setattr(iproute, "run", fake)
    assert iproute.routes("wg0") == {
        Route("10.1.0.0/24", 2000),
        Route("100.64.0.3/32", 2000),
        Route("0.0.0.0/0", 2000),
        Route("10.7.0.0/16", 0),
        Route("fd7a:115c:a1e0::2/128", 256),
    }


def test_only_what_is_there_is_removed_so_a_replayed_plan_converges(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeIp(
        {
            "-j addr show dev wg0": ADDRS,
            "-j -4 route show dev wg0": ROUTES4,
            "-j -6 route show dev wg0": ROUTES6,
        }
    )
    monkeypatch.setattr(iproute, "run", fake)
    iproute.apply(
        "wg0",
        addresses_remove=["100.64.0.2/32", "100.64.0.99/32"],  # the second one is gone already
        addresses_add=[],
        routes_remove=["100.64.0.3/32", "10.7.0.0/16", "10.8.0.0/24"],  # not ours (metric 0), gone
        routes_add=[],
        metric=2000,
    )
    batch = [stdin for args, stdin in fake.calls if args == ["-batch", "-"]]
    assert batch == ["route del 100.64.0.3/32 dev wg0 metric 2000\naddress del 100.64.0.2/32 dev wg0\n"]


def test_nothing_to_do_runs_no_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeIp({"-j addr show dev wg0": ADDRS})
    monkeypatch.setattr(iproute, "run", fake)
    iproute.apply(
        "wg0", addresses_remove=["100.64.0.99/32"], addresses_add=[], routes_remove=[], routes_add=[],
        metric=2000,
    )  # fmt: skip
    assert [args for args, _ in fake.calls] == [["-j", "addr", "show", "dev", "wg0"]]


def test_host_addresses_and_link_kinds_are_read_from_json(monkeypatch: pytest.MonkeyPatch) -> None:
    links = [
        {"ifname": "lo"},
        {"ifname": "wg0", "linkinfo": {"info_kind": "wireguard"}},
        {"ifname": "eth0", "linkinfo": {"info_kind": "veth"}},
    ]
    lo = {"ifname": "lo", "addr_info": [{"local": "127.0.0.1", "prefixlen": 8}]}
    fake = FakeIp({"-j -d link show": links, "-j addr show": [lo, *ADDRS]})
    monkeypatch.setattr(iproute, "run", fake)
    assert iproute.link_kind("wg0") == "wireguard"
    assert iproute.link_kind("lo") == ""
    assert iproute.link_kind("gone0") is None
    assert iproute.link_exists("eth0")
    assert not iproute.link_exists("gone0")
    assert iproute.addresses() == [
        ("lo", "127.0.0.1"),
        ("wg0", "100.64.0.2"),
        ("wg0", "fd7a:115c:a1e0::2"),
    ]
