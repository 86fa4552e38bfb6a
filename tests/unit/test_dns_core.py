"""The node resolver's pure core: the map -> the names a node answers, and per query the answer or the
upstreams (ghostlink.dns_core); the map's DNS settings in the mapper and NetMap; resolv.conf and
resolvectl texts (ghostlink.dns_host's pure parts); the journal entry for a replaced resolv.conf."""

from __future__ import annotations

import json
from dataclasses import replace

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.reversename
import pytest

from ghostcore.pb.ghostmesh.v1 import coordination_pb2 as pb
from ghostctl.dns_cmds import query_name
from ghostlink.dns_core import Answer, Forward, Zone, build_zone, resolve
from ghostlink.dns_host import is_ours, parse_nameservers, render_resolv_conf, resolvectl_commands
from ghostlink.engine import NetMap
from ghostlink.hostjournal import Journal, Origin, ResolvConfRecord, _parse
from ghostmesh.changes import NodeAdded, NodeChanged
from ghostmesh.config import DnsConfig
from ghostmesh.dnsmap import dns_changes, dns_map
from ghostmesh.mapper import Mapper
from tests.unit.test_mesh_mapper import NOW, rec

DNS = pb.DnsConfig(
    magic_dns=True,
    base_domain="mesh.example",
    nameservers=["192.0.2.53:53"],
    split=[
        pb.SplitDns(domain="corp.example", servers=["10.1.0.53:53"]),
        pb.SplitDns(domain="lab.corp.example", servers=["10.2.0.53:5353"]),
    ],
    search_domains=["corp.example"],
    extra_records=[
        pb.DnsRecord(name="db.mesh.example", type="A", value="100.64.9.9"),
        pb.DnsRecord(name="wiki.mesh.example", type="CNAME", value="alpha.mesh.example"),
        pb.DnsRecord(name="loop.example", type="CNAME", value="loop2.example"),
        pb.DnsRecord(name="loop2.example", type="CNAME", value="loop.example"),
    ],
)


RECORD = {"name": "db.mesh.example", "type": "A", "value": "100.64.9.9"}


def node(i: int, name: str) -> pb.Node:
    return pb.Node(id=i, name=name, node_key=f"k{i}", addresses=[f"100.64.0.{i}", f"fd7a:115c:a1e0::{i}"])


def netmap(dns_cfg: pb.DnsConfig | None = DNS, peers: tuple[pb.Node, ...] = ()) -> NetMap:
    nm = NetMap()
    full = pb.MapUpdate(
        serial=1, full=True, self=node(1, "alpha"), peers_upserted=list(peers or (node(2, "Beta"),))
    )
    if dns_cfg is not None:
        full.dns.CopyFrom(dns_cfg)
    nm.apply(full)
    return nm


def ask(zone: Zone, name: str, rdtype: str = "A") -> Answer | Forward:
    return resolve(zone, dns.message.make_query(name, rdtype))


def answers(decision: Answer | Forward) -> list[str]:
    assert isinstance(decision, Answer)
    return [rd.to_text() for rrset in decision.response.answer for rd in rrset]


def rcode(decision: Answer | Forward) -> str:
    assert isinstance(decision, Answer)
    return dns.rcode.to_text(decision.response.rcode())


def test_node_names_answer_from_the_map_self_included() -> None:
    zone = build_zone(netmap())
    assert answers(ask(zone, "alpha.mesh.example")) == ["100.64.0.1"]
    assert answers(ask(zone, "beta.mesh.example", "AAAA")) == ["fd7a:115c:a1e0::2"]
    assert answers(ask(zone, "BETA.Mesh.Example.")) == ["100.64.0.2"]  # names compare case-insensitively
    assert answers(ask(zone, "beta")) == ["100.64.0.2"]  # a bare node name
    d = ask(zone, "beta.mesh.example")
    assert isinstance(d, Answer)
    assert d.response.flags & dns.flags.AA
    assert d.response.answer[0].ttl == 10


def test_unknown_names_in_the_base_domain_are_nxdomain() -> None:
    zone = build_zone(netmap())
    assert rcode(ask(zone, "gamma.mesh.example")) == "NXDOMAIN"
    assert rcode(ask(zone, "x.beta.mesh.example")) == "NXDOMAIN"
    assert rcode(ask(zone, "beta.mesh.example", "MX")) == "NOERROR"  # NODATA: the name exists
    assert answers(ask(zone, "beta.mesh.example", "MX")) == []
    assert rcode(ask(zone, "mesh.example")) == "NXDOMAIN"


def test_peers_absent_from_the_map_do_not_resolve_and_renames_do_at_once() -> None:
    nm = netmap()
    nm.apply(pb.MapUpdate(serial=2, peers_upserted=[node(2, "renamed")]))
    zone = build_zone(nm)
    assert answers(ask(zone, "renamed.mesh.example")) == ["100.64.0.2"]
    assert rcode(ask(zone, "beta.mesh.example")) == "NXDOMAIN"
    nm.apply(pb.MapUpdate(serial=3, peers_removed=[2]))
    assert rcode(ask(build_zone(nm), "renamed.mesh.example")) == "NXDOMAIN"


def reverse(addr: str) -> str:
    return dns.reversename.from_address(addr).to_text()


def test_ptr_names_this_node_and_its_peers() -> None:
    zone = build_zone(netmap())
    assert answers(ask(zone, reverse("100.64.0.1"), "PTR")) == ["alpha.mesh.example."]
    assert answers(ask(zone, reverse("100.64.0.2"), "PTR")) == ["beta.mesh.example."]
    six = reverse("fd7a:115c:a1e0::2")
    assert six.endswith(".ip6.arpa.")
    assert six.count(".") == 34  # 32 nibbles
    assert answers(ask(zone, six, "PTR")) == ["beta.mesh.example."]
    assert answers(ask(zone, six.upper(), "PTR")) == ["beta.mesh.example."]
    d = ask(zone, reverse("100.64.0.2"), "PTR")
    assert isinstance(d, Answer)
    assert d.response.flags & dns.flags.AA
    assert d.response.answer[0].ttl == 10
    assert rcode(ask(zone, reverse("100.64.0.2"), "A")) == "NOERROR"  # NODATA: the name exists
    assert answers(ask(zone, reverse("100.64.0.2"), "A")) == []


def test_ptr_of_an_overlay_address_not_in_the_map_is_nxdomain_never_forwarded() -> None:
    zone = build_zone(netmap())  # peer 3 is hidden from this node (or does not exist)
    for addr in ("100.64.0.3", "fd7a:115c:a1e0::3", "100.127.255.254"):
        assert rcode(ask(zone, reverse(addr), "PTR")) == "NXDOMAIN"


def test_other_reverse_names_are_forwarded() -> None:
    zone = build_zone(netmap())
    upstream = Forward((("192.0.2.53", 53),))
    assert ask(zone, reverse("192.0.2.7"), "PTR") == upstream  # not the overlay
    assert ask(zone, reverse("2001:db8::1"), "PTR") == upstream
    assert ask(zone, "64.100.in-addr.arpa", "PTR") == upstream  # a zone, not one address
    assert ask(zone, "x.2.0.64.100.in-addr.arpa", "PTR") == upstream
    off = pb.DnsConfig()
    off.CopyFrom(DNS)
    off.magic_dns = False
    assert build_zone(netmap(off)).reverse == {}
    assert not any(d.endswith(".arpa") for d in build_zone(netmap(off)).routing_domains())
    assert ask(build_zone(netmap(off)), reverse("100.64.0.2"), "PTR") == upstream  # MagicDNS off: as before


def test_ghostctl_asks_an_address_as_its_reverse_name_for_ptr() -> None:
    ptr, a = dns.rdatatype.PTR, dns.rdatatype.A
    assert query_name("100.64.0.2", ptr) == "2.0.64.100.in-addr.arpa."
    assert query_name("FD7A:115C:A1E0:0::2", ptr) == reverse("fd7a:115c:a1e0::2")
    assert query_name("2.0.64.100.in-addr.arpa", ptr) == "2.0.64.100.in-addr.arpa"  # a name: as given
    assert query_name("100.64.0.2", a) == "100.64.0.2"
    zone = build_zone(netmap())
    assert answers(ask(zone, query_name("100.64.0.2", ptr), "PTR")) == ["beta.mesh.example."]


def test_extra_records_and_cnames() -> None:
    zone = build_zone(netmap())
    assert answers(ask(zone, "db.mesh.example")) == ["100.64.9.9"]
    assert answers(ask(zone, "wiki.mesh.example")) == ["alpha.mesh.example.", "100.64.0.1"]
    assert answers(ask(zone, "wiki.mesh.example", "CNAME")) == ["alpha.mesh.example."]
    assert answers(ask(zone, "loop.example")) == ["loop2.example.", "loop.example."]  # followed once


def test_split_domains_forward_longest_match_first() -> None:
    zone = build_zone(netmap())
    assert ask(zone, "intranet.corp.example") == Forward((("10.1.0.53", 53),), "corp.example")
    assert ask(zone, "corp.example") == Forward((("10.1.0.53", 53),), "corp.example")
    assert ask(zone, "a.lab.corp.example") == Forward((("10.2.0.53", 5353),), "lab.corp.example")
    assert ask(zone, "notcorp.example") == Forward((("192.0.2.53", 53),))


def test_other_names_go_to_the_map_nameservers_else_the_hosts_else_refused() -> None:
    fallback = (("198.51.100.53", 53),)
    assert ask(build_zone(netmap(), fallback), "example.org") == Forward((("192.0.2.53", 53),))
    no_ns = pb.DnsConfig()
    no_ns.CopyFrom(DNS)
    del no_ns.nameservers[:]
    zone = build_zone(netmap(no_ns), fallback)
    assert ask(zone, "example.org") == Forward(fallback)
    assert zone.upstreams_source == "host"
    assert rcode(ask(build_zone(netmap(no_ns)), "example.org")) == "REFUSED"


def test_no_dns_in_the_map_answers_no_names() -> None:
    zone = build_zone(netmap(None), (("198.51.100.53", 53),))
    assert not zone.configured
    assert ask(zone, "beta.mesh.example") == Forward((("198.51.100.53", 53),))


def test_magic_dns_off_answers_no_node_names() -> None:
    cfg = pb.DnsConfig()
    cfg.CopyFrom(DNS)
    cfg.magic_dns = False
    zone = build_zone(netmap(cfg))
    assert zone.names == {}
    assert ask(zone, "beta.mesh.example") == Forward((("192.0.2.53", 53),))
    assert answers(ask(zone, "db.mesh.example")) == ["100.64.9.9"]  # extra records still answer


def test_bad_map_values_are_left_out_and_named() -> None:
    cfg = pb.DnsConfig(
        magic_dns=True,
        base_domain="mesh.example",
        nameservers=["192.0.2.53", "192.0.2.54:53"],  # the first is not canonical ip:port
        split=[pb.SplitDns(domain="Corp.example", servers=["10.1.0.53:53"])],
        extra_records=[
            pb.DnsRecord(name="x.example", type="A", value="fd00::1"),
            pb.DnsRecord(name="y.example", type="TXT", value="hi"),
        ],
    )
    zone = build_zone(netmap(cfg, (node(2, "bad name"), node(3, "ALPHA"), node(4, "ok"))))
    assert zone.nameservers == (("192.0.2.54", 53),)
    assert zone.split == ()
    assert zone.records == {}
    assert sorted(zone.names) == ["alpha", "ok"]
    assert zone.names["alpha"] == ("100.64.0.1", "fd7a:115c:a1e0::1")  # this node wins the clash
    assert len(zone.refused) == 6


def test_malformed_queries() -> None:
    zone = build_zone(netmap())
    q = dns.message.make_query("beta.mesh.example", "A")
    q.set_opcode(dns.opcode.NOTIFY)
    assert rcode(resolve(zone, q)) == "NOTIMP"
    q = dns.message.make_query("beta.mesh.example", "A", rdclass="CH")
    assert rcode(resolve(zone, q)) == "REFUSED"
    q = dns.message.Message()
    assert rcode(resolve(zone, q)) == "FORMERR"


def test_search_and_routing_domains() -> None:
    zone = build_zone(netmap())
    assert zone.search_domains == ("mesh.example", "corp.example")
    text = render_resolv_conf(zone.search_domains, "/var/lib/ghostlink/resolv.conf.backup")
    assert is_ours(text)
    assert "nameserver 100.100.100.100\n" in text
    assert text.endswith("search mesh.example corp.example\n")
    cmds = resolvectl_commands("ghost0", zone, ("100.100.100.100", "fd7a:115c:a1e0::53"))
    assert cmds[0] == ["resolvectl", "dns", "ghost0", "100.100.100.100", "fd7a:115c:a1e0::53"]
    assert cmds[1] == [
        "resolvectl",
        "domain",
        "ghost0",
        "mesh.example",
        "corp.example",
        "~lab.corp.example",
        "~loop.example",
        "~loop2.example",
        *(f"~{i}.100.in-addr.arpa" for i in range(64, 128)),  # 100.64.0.0/10: reverse lookups of peers
        "~0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa",  # fd7a:115c:a1e0::/48
        "~.",
    ]
    assert cmds[2] == ["resolvectl", "default-route", "ghost0", "yes"]


def test_previous_upstreams_skip_our_own_resolver() -> None:
    text = (
        "# x\nsearch a\nnameserver 10.0.0.53\nnameserver 100.100.100.100\nnameserver fe80::1%eth0\n"
        "nameserver FD00::53\nnameserver 10.0.0.53\nnameserver junk\n"
    )
    assert parse_nameservers(text) == (("10.0.0.53", 53), ("fd00::53", 53))


def test_journal_names_only_resolv_conf_and_our_backup() -> None:
    origin = Origin("b", "net:[1]")
    j = Journal(
        origin, "ghost0", resolv_conf=ResolvConfRecord("/etc/resolv.conf", "/var/lib/g/resolv.conf.backup")
    )
    doc = j.to_json()
    assert _parse(json.loads(json.dumps(doc))) == j
    assert "/etc/resolv.conf" in j.summary()
    for bad in (
        {"file": "/etc/passwd", "backup": "/var/lib/g/resolv.conf.backup"},
        {"file": "/etc/resolv.conf", "backup": "/etc/shadow"},
        {"file": "etc/resolv.conf", "backup": "/x/resolv.conf.backup"},
        {"file": "/etc/../etc/resolv.conf", "backup": "/x/resolv.conf.backup"},
    ):
        with pytest.raises(ValueError, match=r"bad (file|backup|resolv_conf)"):
            _parse({**doc, "resolv_conf": bad})


def test_mapper_sends_dns_in_full_maps_only() -> None:
    m = Mapper(25, dns=DNS)
    m.load([NodeAdded(rec(1), False), NodeAdded(rec(2), False)], NOW)
    full = m.open_stream(10, 1)
    assert full.HasField("dns")
    assert full.dns == DNS
    m.apply(NodeChanged(replace(rec(2), name="renamed"), True), NOW)
    delta = m.flush(10)
    assert delta is not None
    assert not delta.HasField("dns")
    assert [p.name for p in delta.peers_upserted] == ["renamed"]
    plain = Mapper(25)
    plain.load([NodeAdded(rec(1), False)], NOW)
    assert not plain.open_stream(1, 1).HasField("dns")


def test_mapper_sends_changed_dns_once_in_every_streams_next_delta() -> None:
    m = Mapper(25, dns=DNS)
    m.load([NodeAdded(rec(i), False) for i in (1, 2, 3)], NOW)
    for sid, nid in ((10, 1), (11, 2), (12, 3), (13, 3)):  # node 3 with a replaced stream still open
        assert m.open_stream(sid, nid).dns == DNS
    new = pb.DnsConfig()
    new.CopyFrom(DNS)
    new.extra_records.append(pb.DnsRecord(name="new.mesh.example", type="A", value="100.64.9.10"))
    assert sorted(m.set_dns(new)) == [10, 11, 12, 13]
    for sid in (10, 11, 12, 13):
        delta = m.flush(sid)
        assert delta is not None
        assert (delta.full, delta.dns, list(delta.peers_upserted)) == (False, new, [])
        assert m.flush(sid) is None  # exactly once
    m.apply(NodeChanged(replace(rec(2), name="renamed"), True), NOW)
    later = m.flush(10)
    assert later is not None
    assert not later.HasField("dns")  # not again with the next change
    assert m.open_stream(14, 2).dns == new  # full maps carry the new settings


def test_mapper_unchanged_dns_marks_no_stream() -> None:
    m = Mapper(25, dns=DNS)
    m.load([NodeAdded(rec(1), False), NodeAdded(rec(2), False)], NOW)
    m.open_stream(10, 1)
    same = pb.DnsConfig()
    same.CopyFrom(DNS)
    assert m.set_dns(same) == []
    assert m.flush(10) is None
    plain = Mapper(25)
    plain.load([NodeAdded(rec(1), False)], NOW)
    plain.open_stream(1, 1)
    assert plain.set_dns(None) == []
    assert plain.flush(1) is None


def test_dns_removed_by_a_delta_and_added_by_one() -> None:
    m = Mapper(25, dns=DNS)
    m.load([NodeAdded(rec(1), False), NodeAdded(rec(2), False)], NOW)
    nm = NetMap()
    nm.apply(m.open_stream(10, 1))
    assert nm.dns is not None
    assert m.set_dns(None) == [10]
    delta = m.flush(10)
    assert delta is not None
    assert delta.HasField("dns")
    assert delta.dns == pb.DnsConfig()  # empty: the settings are gone
    nm.apply(delta)
    assert nm.dns is None
    assert not m.open_stream(11, 2).HasField("dns")
    m.set_dns(DNS)
    back = m.flush(10)
    assert back is not None
    nm.apply(back)
    assert nm.dns is not None
    assert build_zone(nm).names.keys() == {"n1", "n2"}


def test_dns_changes_name_the_keys_that_differ() -> None:
    old = DnsConfig(magic_dns=True, base_domain="mesh.example", extra_records=[RECORD])
    assert dns_changes(old, old) == []
    same = DnsConfig(magic_dns=True, base_domain="Mesh.Example.", extra_records=[{**RECORD, "type": "a"}])
    assert dns_changes(old, same) == []  # compared canonical
    new = DnsConfig(magic_dns=True, base_domain="mesh.example", nameservers=["192.0.2.53"], split={})
    assert dns_changes(old, new) == ["nameservers", "extra_records"]
    assert dns_map(old) != dns_map(new)


def test_netmap_keeps_dns_across_deltas_and_drops_it_with_a_full_map_without() -> None:
    nm = netmap()
    nm.apply(pb.MapUpdate(serial=2, peers_upserted=[node(3, "c")]))
    assert nm.dns is not None
    assert nm.dns.base_domain == "mesh.example"
    nm.begin_stream()
    nm.apply(pb.MapUpdate(serial=1, full=True, self=node(1, "alpha")))
    assert nm.dns is None
