"""The nftables renderer of ghostlink (pure): table layout, rule lines, set collapsing, atomic replace."""

from __future__ import annotations

import pytest

from ghostcore.errors import InvalidArgument
from ghostcore.pb.ghostmesh.v1 import coordination_pb2 as pb
from ghostlink.engine import FilterSpec, NetMap
from ghostlink.nft import NftFirewall, render, render_delete, rule_lines, table_name

V4 = "100.64.0.4/32"
V6 = "fd7a:115c:a1e0::4/128"


def test_table_name_is_sanitized() -> None:
    assert table_name("wg-test.0") == "ghostlink_wg_test_0"


def test_rule_lines_per_proto_and_family() -> None:
    rules = (
        FilterSpec(("100.64.0.1/32", "fd7a:115c:a1e0::1/128"), ((V4, 22, 22), (V6, 22, 22)), ("tcp",)),
        FilterSpec(("100.64.0.3/32",), ((V4, 5000, 6000), (V6, 5000, 6000)), ("udp",)),
        FilterSpec(("0.0.0.0/0", "::/0"), ((V4, 0, 0), (V6, 0, 0)), ("icmp",)),
    )
    assert rule_lines(rules) == [
        "ip saddr 100.64.0.1/32 ip daddr 100.64.0.4/32 tcp dport 22 accept",
        "ip6 saddr fd7a:115c:a1e0::1/128 ip6 daddr fd7a:115c:a1e0::4/128 tcp dport 22 accept",
        "ip saddr 100.64.0.3/32 ip daddr 100.64.0.4/32 udp dport 5000-6000 accept",  # v4 only
        "ip daddr 100.64.0.4/32 meta l4proto icmp accept",  # icmp is IPv4's protocol 1 only
    ]


def test_no_proto_is_tailscales_default_set_not_every_protocol() -> None:
    everything = FilterSpec(("0.0.0.0/0", "::/0"), (("0.0.0.0/0", 0, 65535), ("::/0", 0, 65535)), ())
    # both families are whole (no address match), so the IPv6 lines equal the IPv4 ones but for ICMPv6
    assert rule_lines((everything,)) == [
        "meta l4proto tcp accept",
        "meta l4proto udp accept",
        "meta l4proto icmp accept",
        "meta l4proto ipv6-icmp accept",
    ]
    ported = FilterSpec(("10.0.0.0/8", "10.1.0.0/16", "100.64.0.2/32"), ((V4, 80, 80),), ())
    assert rule_lines((ported,)) == [
        "ip saddr { 10.0.0.0/8, 100.64.0.2/32 } ip daddr 100.64.0.4/32 tcp dport 80 accept",
        "ip saddr { 10.0.0.0/8, 100.64.0.2/32 } ip daddr 100.64.0.4/32 udp dport 80 accept",
        "ip saddr { 10.0.0.0/8, 100.64.0.2/32 } ip daddr 100.64.0.4/32 meta l4proto icmp accept",
    ]


def test_protocols_are_enforced_as_written() -> None:
    src = ("100.64.0.1/32", "fd7a:115c:a1e0::1/128")
    rules = (
        FilterSpec(src, ((V4, 0, 65535), (V6, 0, 65535)), ("gre", "esp", "99")),
        FilterSpec(src, ((V4, 2905, 2905),), ("sctp", "gre")),  # gre has no ports: not on a port subset
        FilterSpec(src, ((V6, 0, 0),), ("ipv6-icmp", "icmp")),  # icmp (v4) cannot match a v6 address
    )
    assert rule_lines(rules) == [
        "ip saddr 100.64.0.1/32 ip daddr 100.64.0.4/32 meta l4proto 47 accept",
        "ip saddr 100.64.0.1/32 ip daddr 100.64.0.4/32 meta l4proto 50 accept",
        "ip saddr 100.64.0.1/32 ip daddr 100.64.0.4/32 meta l4proto 99 accept",
        "ip6 saddr fd7a:115c:a1e0::1/128 ip6 daddr fd7a:115c:a1e0::4/128 meta l4proto 47 accept",
        "ip6 saddr fd7a:115c:a1e0::1/128 ip6 daddr fd7a:115c:a1e0::4/128 meta l4proto 50 accept",
        "ip6 saddr fd7a:115c:a1e0::1/128 ip6 daddr fd7a:115c:a1e0::4/128 meta l4proto 99 accept",
        "ip saddr 100.64.0.1/32 ip daddr 100.64.0.4/32 sctp dport 2905 accept",
        "ip6 saddr fd7a:115c:a1e0::1/128 ip6 daddr fd7a:115c:a1e0::4/128 meta l4proto ipv6-icmp accept",
    ]
    with pytest.raises(InvalidArgument, match="not a protocol"):
        rule_lines((FilterSpec(src, ((V4, 0, 65535),), ("tcp; flush ruleset",)),))


def test_render_is_one_atomic_replacement() -> None:
    text = render("wg0", ())
    lines = text.splitlines()
    assert lines[:3] == [
        "add table inet ghostlink_wg0",
        "delete table inet ghostlink_wg0",
        "table inet ghostlink_wg0 {",
    ]
    for hook in ("input", "forward"):
        assert f"type filter hook {hook} priority filter; policy accept;" in text
    body = [line.strip() for line in lines if line.startswith("\t\t")]
    # per chain: only the wg interface is judged, stateful, then drop (no rules: nothing may come in)
    assert body[1:5] == [
        'iifname != "wg0" accept',
        "ct state established,related accept",
        "ct state invalid drop",
        "drop",
    ]
    assert render_delete("wg0") == "add table inet ghostlink_wg0\ndelete table inet ghostlink_wg0\n"
    with pytest.raises(ValueError, match="cannot be used"):
        render('wg"; flush ruleset', ())


def test_netmap_keeps_last_filter() -> None:
    nm = NetMap()
    me = pb.Node(id=1, name="a")
    full = pb.MapUpdate(serial=1, full=True, self=me)
    full.filter.rules.add(src=["100.64.0.2/32"], dst=[pb.DstRange(prefix=V4, first_port=22, last_port=22)])
    nm.apply(full)
    assert nm.filter == (FilterSpec(("100.64.0.2/32",), ((V4, 22, 22),), ()),)
    nm.apply(pb.MapUpdate(serial=2))  # a delta without a filter keeps it
    assert nm.filter is not None
    emptied = pb.MapUpdate(serial=3)
    emptied.filter.SetInParent()  # an empty filter: nothing may come in
    nm.apply(emptied)
    now_applied: object = nm.filter  # (mypy narrowed the attribute above)
    assert now_applied == ()


class CountingFirewall(NftFirewall):
    def __init__(self) -> None:
        super().__init__("wg0")
        self.scripts: list[str] = []

    async def _run(self, script: str) -> None:
        self.scripts.append(script)


async def test_unchanged_filter_costs_no_nft_call() -> None:
    fw = CountingFirewall()
    rules = (FilterSpec(("100.64.0.2/32",), ((V4, 22, 22),), ("tcp",)),)
    await fw.apply(rules)
    await fw.apply(tuple(rules))  # equal: nothing to do
    assert len(fw.scripts) == 1
    await fw.apply(())
    assert len(fw.scripts) == 2
    assert "tcp dport 22" not in fw.scripts[1]
    await fw.close()
    assert fw.scripts[-1] == render_delete("wg0")
