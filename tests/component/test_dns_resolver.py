"""The node resolver's server on loopback (ghostlink.dns_server): real UDP and TCP queries with dnspython,
forwarding to a dnspython responder, truncation, the in-flight cap and upstream timeouts; and the host's
resolv.conf replaced and put back (ghostlink.dns_host) in a temporary directory, after a clean stop and
after a crash."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest

from ghostcore.pb.ghostmesh.v1 import coordination_pb2 as pb
from ghostlink import magicdns
from ghostlink.dns_core import Zone, build_zone
from ghostlink.dns_host import ResolvConfHost, restore_leftover
from ghostlink.dns_server import DnsServer
from ghostlink.engine import NetMap
from ghostlink.hostjournal import HostJournal, Origin, read_journal

LO = "127.0.0.1"


class Upstream(asyncio.DatagramProtocol):
    """A minimal authoritative responder: every A question gets 192.0.2.1; ``silent``: never answers."""

    def __init__(self, silent: bool = False) -> None:
        self.silent = silent
        self.seen: list[str] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        q = dns.message.from_wire(data)
        self.seen.append(q.question[0].name.to_text())
        if self.silent or self.transport is None:
            return
        r = dns.message.make_response(q)
        r.answer.append(dns.rrset.from_text(q.question[0].name, 30, "IN", "A", "192.0.2.1"))
        self.transport.sendto(r.to_wire(), addr)


@contextlib.asynccontextmanager
async def upstream(silent: bool = False) -> AsyncIterator[tuple[Upstream, int]]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(lambda: Upstream(silent), local_addr=(LO, 0))
    try:
        yield proto, transport.get_extra_info("sockname")[1]
    finally:
        transport.close()


def netmap(split_port: int, ns_port: int, extra: int = 0) -> NetMap:
    cfg = pb.DnsConfig(
        magic_dns=True,
        base_domain="mesh.example",
        nameservers=[f"{LO}:{ns_port}"],
        split=[pb.SplitDns(domain="corp.example", servers=[f"{LO}:{split_port}"])],
        extra_records=[
            pb.DnsRecord(name="big.mesh.example", type="A", value=f"100.64.1.{i}")
            for i in range(1, extra + 1)
        ],
    )
    nm = NetMap()
    me = pb.Node(id=1, name="alpha", node_key="k1", addresses=["100.64.0.1", "fd7a:115c:a1e0::1"])
    peer = pb.Node(id=2, name="beta", node_key="k2", addresses=["100.64.0.2", "fd7a:115c:a1e0::2"])
    nm.apply(pb.MapUpdate(serial=1, full=True, self=me, peers_upserted=[peer], dns=cfg))
    return nm


@contextlib.asynccontextmanager
async def resolver(nm: NetMap, **kw: float) -> AsyncIterator[tuple[DnsServer, int]]:
    server = DnsServer(build_zone(nm), **kw)  # type: ignore[arg-type]
    await server.start([(LO, 0)])
    try:
        yield server, server.listen[0][1]
    finally:
        await server.close()


def values(r: dns.message.Message) -> list[str]:
    return [rd.to_text() for rrset in r.answer for rd in rrset]


async def test_answers_node_names_over_udp_and_tcp() -> None:
    async with upstream() as (_, port), resolver(netmap(port, port)) as (server, rport):
        r = await dns.asyncquery.udp(dns.message.make_query("beta.mesh.example", "A"), LO, 2, rport)
        assert values(r) == ["100.64.0.2"]
        assert r.flags & dns.flags.AA
        r = await dns.asyncquery.tcp(dns.message.make_query("alpha.mesh.example", "AAAA"), LO, 2, rport)
        assert values(r) == ["fd7a:115c:a1e0::1"]
        r = await dns.asyncquery.udp(dns.message.make_query("nobody.mesh.example", "A"), LO, 2, rport)
        assert r.rcode() == dns.rcode.NXDOMAIN
        assert server.queries == 3
        assert server.forwarded == 0


async def test_split_domain_and_other_names_are_forwarded() -> None:
    async with (
        upstream() as (split, sport),
        upstream() as (general, gport),
        resolver(netmap(sport, gport)) as (server, rport),
    ):
        q = dns.message.make_query("intranet.corp.example", "A")
        r = await dns.asyncquery.udp(q, LO, 3, rport)
        assert values(r) == ["192.0.2.1"]
        assert r.id == q.id
        r = await dns.asyncquery.tcp(dns.message.make_query("www.example.org", "A"), LO, 3, rport)
        assert values(r) == ["192.0.2.1"]
        assert split.seen == ["intranet.corp.example."]
        assert general.seen == ["www.example.org."]
        assert server.forwarded == 2


async def test_large_answers_are_truncated_over_udp_and_whole_over_tcp() -> None:
    async with upstream() as (_, port), resolver(netmap(port, port, extra=60)) as (_, rport):
        r = await dns.asyncquery.udp(dns.message.make_query("big.mesh.example", "A"), LO, 2, rport)
        assert r.flags & dns.flags.TC
        assert not r.answer
        r = await dns.asyncquery.udp(
            dns.message.make_query("big.mesh.example", "A", use_edns=0, payload=4096), LO, 2, rport
        )
        assert len(values(r)) == 60  # EDNS: the asker takes up to 4096 bytes
        r = await dns.asyncquery.tcp(dns.message.make_query("big.mesh.example", "A"), LO, 2, rport)
        assert len(values(r)) == 60


async def test_forwarded_queries_are_capped_and_time_out() -> None:
    async with (
        upstream(silent=True) as (silent, port),
        resolver(netmap(port, port), max_inflight=2, timeout=0.5) as (server, rport),
    ):
        loop = asyncio.get_running_loop()
        start = loop.time()
        queries = [dns.message.make_query(f"q{i}.example.org", "A") for i in range(3)]
        results = await asyncio.gather(*(dns.asyncquery.udp(q, LO, 3, rport) for q in queries))
        assert [dns.rcode.to_text(r.rcode()) for r in results] == ["SERVFAIL"] * 3
        assert server.dropped == 1  # the third found two in flight: refused at once
        assert len(silent.seen) == 2
        assert loop.time() - start < 2.5  # the timed-out ones ended after about the timeout


async def test_garbage_and_responses_are_dropped() -> None:
    async with upstream() as (_, port), resolver(netmap(port, port)) as (server, rport):
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, remote_addr=(LO, rport))
        try:
            transport.sendto(b"\x00\x01garbage")
            resp = dns.message.make_response(dns.message.make_query("beta.mesh.example", "A"))
            transport.sendto(resp.to_wire())
        finally:
            transport.close()
        r = await dns.asyncquery.udp(dns.message.make_query("beta.mesh.example", "A"), LO, 2, rport)
        assert values(r) == ["100.64.0.2"]
        assert server.dropped == 2


def _journal(tmp_path: Path) -> HostJournal:
    return HostJournal(tmp_path / "host.json", "ghost0", Origin("boot", "net:[1]"))


async def test_resolv_conf_replaced_and_put_back(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    file = etc / "resolv.conf"
    original = "nameserver 198.51.100.53\nsearch lan\n"
    file.write_text(original)
    state = tmp_path / "state"
    state.mkdir()
    host = ResolvConfHost(_journal(state), state, file)
    zone = build_zone(netmap(53, 53))
    await host.apply(zone)
    text = file.read_text()
    assert text.startswith("# Written by ghostlink")
    assert "nameserver 100.100.100.100" in text
    assert "search mesh.example\n" in text
    assert host.previous_upstreams() == (("198.51.100.53", 53),)
    prev = read_journal(state / "host.json")
    assert prev is not None
    assert prev.resolv_conf is not None
    assert prev.resolv_conf.file == str(file)
    assert (state / "resolv.conf.backup").stat().st_mode & 0o777 == 0o600
    await host.restore()
    assert file.read_text() == original
    assert not (state / "host.json").exists()
    assert not (state / "resolv.conf.backup").exists()


async def test_crashed_runs_resolv_conf_is_restored_from_the_journal(tmp_path: Path) -> None:
    file = tmp_path / "resolv.conf"
    file.write_text("nameserver 198.51.100.53\n")
    host = ResolvConfHost(_journal(tmp_path), tmp_path, file)
    await host.apply(build_zone(netmap(53, 53)))  # ... then the process dies: no restore()
    prev = read_journal(tmp_path / "host.json")
    assert prev is not None
    assert prev.resolv_conf is not None
    restore_leftover(prev.resolv_conf)
    assert file.read_text() == "nameserver 198.51.100.53\n"
    assert not (tmp_path / "resolv.conf.backup").exists()


async def test_someone_elses_file_is_kept_and_symlinks_come_back(tmp_path: Path) -> None:
    file = tmp_path / "resolv.conf"
    file.write_text("nameserver 198.51.100.53\n")
    host = ResolvConfHost(_journal(tmp_path), tmp_path, file)
    await host.apply(build_zone(netmap(53, 53)))
    file.write_text("nameserver 203.0.113.53\n")  # a DHCP client rewrote it meanwhile
    await host.restore()
    assert file.read_text() == "nameserver 203.0.113.53\n"
    target = tmp_path / "stub-resolv.conf"
    target.write_text("nameserver 127.0.0.53\n")
    file.unlink()
    file.symlink_to(target)
    host = ResolvConfHost(_journal(tmp_path), tmp_path, file)
    await host.apply(build_zone(netmap(53, 53)))
    assert not file.is_symlink()
    assert target.read_text() == "nameserver 127.0.0.53\n"
    backup = json.loads((tmp_path / "resolv.conf.backup").read_text())
    assert backup == {"version": 1, "link": str(target)}
    await host.restore()
    assert file.is_symlink()
    assert file.readlink() == target


@pytest.mark.parametrize("bad", [b"{}", b"not json", b'{"version": 1, "link": "x", "text": "y"}'])
async def test_unreadable_backup_is_refused(tmp_path: Path, bad: bytes) -> None:
    file = tmp_path / "resolv.conf"
    file.write_text("nameserver 198.51.100.53\n")
    host = ResolvConfHost(_journal(tmp_path), tmp_path, file)
    await host.apply(build_zone(netmap(53, 53)))
    (tmp_path / "resolv.conf.backup").write_bytes(bad)
    prev = read_journal(tmp_path / "host.json")
    assert prev is not None
    assert prev.resolv_conf is not None
    with pytest.raises(Exception, match=r"not a resolv\.conf backup"):
        restore_leftover(prev.resolv_conf)
    assert file.read_text().startswith("# Written by ghostlink")  # left as it is, for a person to look at


class FakeHost:
    """The host's resolver settings as MagicDns drives them (ghostlink.dns_host.HostDns)."""

    mode = "resolv.conf"

    def __init__(self) -> None:
        self.applied: list[tuple[str, ...]] = []
        self.restored = 0

    def detail(self) -> str:
        return "fake"

    def previous_upstreams(self) -> tuple[tuple[str, int], ...]:
        return (("198.51.100.53", 53),)

    async def apply(self, zone: Zone) -> None:
        self.applied.append(zone.search_domains)

    async def restore(self) -> None:
        self.restored += 1


async def test_magicdns_points_the_host_only_while_serving_and_the_map_has_dns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(magicdns, "add_service_addresses", lambda ifname, addrs: None)  # no interface here
    host = FakeHost()
    m = magicdns.MagicDns("ghosttest0", host, listen=((LO, 0),))
    await m.update(netmap(53, 53))  # not started: not serving, so the host is left alone
    assert host.applied == []
    await m.start()
    try:
        await m.update(netmap(53, 53))
        assert host.applied == [("mesh.example",)]
        st = m.status()
        assert (st.configured, st.names, st.host_mode, st.upstreams_source) == (True, 2, "resolv.conf", "map")
        bare = NetMap()
        bare.apply(pb.MapUpdate(serial=1, full=True, self=pb.Node(id=1, name="alpha", node_key="k1")))
        await m.update(bare)  # DNS settings gone from the map: the host is put back
        assert host.restored == 1
        assert m.status().upstreams == ("198.51.100.53:53",)  # the host's own, for whoever still asks
    finally:
        await m.close()
    assert host.restored == 2  # close puts it back too (a no-op for a host already restored)
