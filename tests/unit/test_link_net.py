"""Which host addresses ghostlink advertises as its WireGuard endpoints."""

from __future__ import annotations

from ghostlink.net import usable_endpoints


def test_filters_loopback_linklocal_overlay_and_own_interface() -> None:
    addrs = [
        ("lo", "127.0.0.1"),
        ("lo", "::1"),
        ("eth0", "192.0.2.10"),
        ("eth0", "fe80::1"),
        ("eth0", "2001:db8::10"),
        ("eth1", "169.254.3.3"),
        ("tailscale0", "100.100.1.1"),
        ("x", "fd7a:115c:a1e0::5"),
        ("ghost0", "10.9.9.9"),
        ("eth2", "198.51.100.7"),
        ("eth2", "198.51.100.7"),
    ]
    assert usable_endpoints(addrs, 41641, "ghost0") == [
        "192.0.2.10:41641",
        "198.51.100.7:41641",
        "[2001:db8::10]:41641",
    ]


def test_empty_and_garbage() -> None:
    assert usable_endpoints([("eth0", "not-an-ip")], 1, "ghost0") == []
