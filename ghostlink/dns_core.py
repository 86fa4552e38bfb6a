"""The node resolver's core, PURE: the map -> the names this node answers, and for each query either the
answer or the upstreams to forward it to. dnspython does the wire format (messages, names, rdata); this
module opens no socket and reads no clock (:mod:`ghostlink.dns_server` is its asyncio edge). The zone is
plain data: dnspython is imported by the functions that answer a query, so a node that is never asked
never loads it.

What is answered (:func:`resolve`), in order:

1. anything but one question of class IN with opcode QUERY: FORMERR / NOTIMP / REFUSED (RFC 1035 section
   4.1.1 rcodes);
2. ``extra_records`` (admin-set A / AAAA / CNAME) by exact name, wherever the name is; a CNAME whose
   target this node knows is followed once, in the same answer (RFC 1034 section 3.6.2);
3. with MagicDNS, ``<node>.<base_domain>``: the node's overlay addresses of the asked family, from the
   admitted map (this node and the peers it may see: a peer the policy hides is not in the map, so not in
   DNS). A node name without an address of the asked type, or any other type, is NODATA (NOERROR, no
   answer); every other name in the base domain is NXDOMAIN, authoritatively. A bare ``<node>`` (one
   label, as a stub sends it without its search list) is answered the same way;
4. with MagicDNS, a reverse name (``in-addr.arpa``, RFC 1035 section 3.5; ``ip6.arpa`` in nibble format,
   RFC 3596 section 2.5) of an address of this node or a peer in its map: PTR ``<node>.<base_domain>.``
   (other types NODATA). The reverse name of another overlay address (:data:`OVERLAY`: a peer the
   policy hides, an address nobody has) is NXDOMAIN, authoritatively: the resolver never asks upstream,
   so a hidden peer's name cannot leak. Every other reverse name (and a partial one, a zone rather than
   an address) goes on to the next steps as any name. dnspython's ``dns.reversename`` reads the names;
5. a name in a split domain (the longest matching domain wins): forwarded to that domain's servers;
6. everything else: forwarded to the map's nameservers, or without those to the host's previous
   upstreams (what resolv.conf named before ghostlink replaced it); none at all: REFUSED.

Answers are short-lived (``TTL`` seconds) so a rename or a peer that left is not remembered for long; the
new name resolves as soon as the map delta carrying it is folded in (:func:`build_zone` runs per map).
Node names that are not DNS labels, and map values that do not parse, are left out (``Zone.refused``).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ghostcore.addr import AddressError, HostPort, format_endpoint, parse_ip
from ghostcore.dnsname import DomainError, in_domain, node_label, parse_domain, parse_server
from ghostcore.ipalloc import DEFAULT_IPV4_PREFIX, DEFAULT_IPV6_PREFIX
from ghostlink.engine import NetMap, NodeInfo

if TYPE_CHECKING:
    import dns.message
    import dns.name
    import dns.rcode
    import dns.rrset

TTL = 10  # seconds; short: renames and removals must not linger in caches
_TYPES = {"A": 1, "AAAA": 28, "CNAME": 5}  # the record types' numbers (RFC 1035 section 3.2.2, RFC 3596)
# The overlay ranges ghostlink knows (ghostcore.ipalloc's defaults, as ghostlink.net's): the reverse name of
# an address in them that the map does not give is NXDOMAIN here, never a question for an upstream. A mesh
# numbered elsewhere (network.ipv4_prefix) still gets its nodes' PTRs; unknown addresses are forwarded.
OVERLAY = (ipaddress.ip_network(DEFAULT_IPV4_PREFIX), ipaddress.ip_network(DEFAULT_IPV6_PREFIX))
_REVERSE_ZONES = ("in-addr.arpa", "ip6.arpa")


def _reverse_zones(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> tuple[str, ...]:
    """The reverse zones that cover ``net`` exactly at a label boundary (an octet for IPv4, a nibble
    for IPv6; RFC 1035 section 3.5, RFC 3596 section 2.5): 100.64.0.0/10 is the 64 zones
    ``64.100.in-addr.arpa`` ... ``127.100.in-addr.arpa``."""
    step = 8 if net.version == 4 else 4
    bits = -(-net.prefixlen // step) * step  # rounded up to a whole label
    out = []
    for sub in net.subnets(new_prefix=bits):
        if net.version == 4:
            labels = str(sub.network_address).split(".")[: bits // 8]
            out.append(".".join(reversed(labels)) + ".in-addr.arpa")
        else:
            nibbles = sub.network_address.exploded.replace(":", "")[: bits // 4]
            out.append(".".join(reversed(nibbles)) + ".ip6.arpa")
    return tuple(out)


OVERLAY_REVERSE_ZONES = tuple(z for net in OVERLAY for z in _reverse_zones(net))


@dataclass(frozen=True)
class Zone:
    """Everything the resolver answers from or forwards to, for one map."""

    configured: bool = False  # the map carries DNS settings
    magic_dns: bool = False
    base_domain: str = ""
    names: dict[str, tuple[str, ...]] = field(default_factory=dict)  # node label -> overlay addresses
    reverse: dict[str, str] = field(default_factory=dict)  # overlay address -> "<node>.<base_domain>"
    records: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)  # name -> (type, value)
    split: tuple[tuple[str, tuple[HostPort, ...]], ...] = ()  # longest domain first
    nameservers: tuple[HostPort, ...] = ()  # from the map
    fallback: tuple[HostPort, ...] = ()  # the host's previous upstreams
    search_domains: tuple[str, ...] = ()  # base domain first, then the map's
    refused: tuple[str, ...] = ()  # what of the map's DNS settings was left out, one line each

    @property
    def upstreams(self) -> tuple[HostPort, ...]:
        return self.nameservers or self.fallback

    @property
    def upstreams_source(self) -> str:
        return "map" if self.nameservers else "host" if self.fallback else "none"

    def routing_domains(self) -> tuple[str, ...]:
        """The domains the host should send to this resolver (systemd-resolved's ``~domain``s); with
        MagicDNS the overlay's reverse zones too, so the host's reverse lookups of peers reach it."""
        own = (self.base_domain,) if self.magic_dns and self.base_domain else ()
        domains = (*own, *(d for d, _ in self.split))
        extra = (r for r in self.records if not any(in_domain(r, d) for d in domains))
        return (*domains, *extra, *(OVERLAY_REVERSE_ZONES if own else ()))


@dataclass(frozen=True)
class Answer:
    """Send this response."""

    response: dns.message.Message


@dataclass(frozen=True)
class Forward:
    """Forward the query to these servers, in order, until one answers."""

    servers: tuple[HostPort, ...]
    split_domain: str = ""  # the split domain that matched ("": the general upstreams)


def _servers(texts: tuple[str, ...], where: str, refused: list[str]) -> tuple[HostPort, ...]:
    out = []
    for text in texts:
        try:
            out.append(parse_server(text))
        except AddressError:
            refused.append(f"{where}: {text[:60]!r} is not ip:port")
    return tuple(out)


def _node_names(nodes: list[NodeInfo], refused: list[str]) -> dict[str, tuple[str, ...]]:
    names: dict[str, tuple[str, ...]] = {}
    for n in nodes:  # this node first, then peers by id: who wins a clash is stable
        label = node_label(n.name)
        if label is None:
            refused.append(f"node {n.name[:60]!r}: not a DNS label, not in DNS")
            continue
        if label in names:
            refused.append(f"node {n.name[:60]!r}: its name clashes with another node's, not in DNS")
            continue
        addrs = []
        for a in n.addresses:
            try:
                addrs.append(str(parse_ip(a)))
            except AddressError:
                continue  # admission already refused the record's bad addresses
        names[label] = tuple(addrs)
    return names


def _record(name: str, kind: str, value: str) -> tuple[str, str, str] | str:
    """One extra record made canonical, or why it is refused."""
    try:
        fqdn = parse_domain(name)
        if kind == "CNAME":
            return fqdn, kind, parse_domain(value)
        if kind not in ("A", "AAAA"):
            return f"type {kind[:10]!r} is not A, AAAA or CNAME"
        if parse_ip(value).version != (4 if kind == "A" else 6):
            return f"{value[:60]!r} is not an IPv{4 if kind == 'A' else 6} address"
    except (DomainError, AddressError) as exc:
        return str(exc)
    return fqdn, kind, value


def _records(
    items: tuple[tuple[str, str, str], ...], refused: list[str]
) -> dict[str, tuple[tuple[str, str], ...]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for name, kind, value in items:
        rec = _record(name, kind, value)
        if isinstance(rec, str):
            refused.append(f"extra record {name[:60]!r}: {rec}")
            continue
        out.setdefault(rec[0], []).append((rec[1], rec[2]))
    return {k: tuple(v) for k, v in out.items()}


def build_zone(nm: NetMap, fallback: tuple[HostPort, ...] = ()) -> Zone:
    """What the resolver serves for the (admitted) map ``nm``; ``fallback``: the host's previous
    upstreams, used when the map names no nameservers."""
    d = nm.dns
    if d is None:
        return Zone(fallback=fallback)
    refused: list[str] = []
    base = ""
    if d.base_domain:
        try:
            base = parse_domain(d.base_domain, "base_domain")
        except DomainError as exc:
            refused.append(str(exc))
    names: dict[str, tuple[str, ...]] = {}
    if d.magic_dns and base:
        me = [nm.self_node] if nm.self_node is not None else []
        names = _node_names(me + [nm.peers[k] for k in sorted(nm.peers)], refused)
    reverse: dict[str, str] = {}
    for label, addrs in names.items():  # this node first: its name wins an address clash
        for a in addrs:
            reverse.setdefault(a, f"{label}.{base}")
    split = []
    for domain, servers in d.split:
        try:
            split.append((parse_domain(domain, "split domain"), _servers(servers, domain, refused)))
        except DomainError as exc:
            refused.append(str(exc))
    split.sort(key=lambda item: -len(item[0]))
    search = []
    for s in d.search_domains:
        try:
            search.append(parse_domain(s, "search domain"))
        except DomainError as exc:
            refused.append(str(exc))
    own = (base,) if d.magic_dns and base else ()
    return Zone(
        configured=True,
        magic_dns=d.magic_dns and bool(base),
        base_domain=base,
        names=names,
        reverse=reverse,
        records=_records(d.extra_records, refused),
        split=tuple(split),
        nameservers=_servers(d.nameservers, "nameservers", refused),
        fallback=fallback,
        search_domains=tuple(dict.fromkeys((*own, *search))),
        refused=tuple(refused),
    )


def _reply(query: dns.message.Message, rcode: dns.rcode.Rcode, *, authoritative: bool) -> dns.message.Message:
    import dns.flags  # noqa: PLC0415 - lazy, as every use of dnspython here (the module docstring)
    import dns.message  # noqa: PLC0415

    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    response.flags |= dns.flags.RA
    if authoritative:
        response.flags |= dns.flags.AA
    return response


def _address_rrset(qname: dns.name.Name, rdtype: int, addrs: tuple[str, ...]) -> dns.rrset.RRset | None:
    import dns.rdataclass  # noqa: PLC0415
    import dns.rdatatype  # noqa: PLC0415
    import dns.rrset  # noqa: PLC0415

    version = 4 if rdtype == dns.rdatatype.A else 6
    values = [a for a in addrs if ipaddress.ip_address(a).version == version]
    if not values:
        return None
    return dns.rrset.from_text_list(qname, TTL, dns.rdataclass.IN, dns.rdatatype.RdataType(rdtype), values)


def _node(zone: Zone, name: str) -> tuple[str, ...] | None:
    """The addresses of the node ``name`` names (``<node>.<base>`` or a bare ``<node>``), if any."""
    if not zone.magic_dns:
        return None
    if "." not in name:
        return zone.names.get(name)
    label, _, rest = name.partition(".")
    return zone.names.get(label) if rest == zone.base_domain else None


def _lookup(
    zone: Zone, qname: dns.name.Name, name: str, rdtype: int, *, follow: bool = True
) -> list[dns.rrset.RRset] | None:
    """The answer section for a name this node knows; None if it does not know the name. ``follow``: a
    CNAME's target is looked up too (once: a target's own CNAME is not followed, so loops end)."""
    import dns.name  # noqa: PLC0415
    import dns.rdataclass  # noqa: PLC0415
    import dns.rdatatype  # noqa: PLC0415
    import dns.rrset  # noqa: PLC0415

    records = zone.records.get(name)
    if records is not None:
        out: list[dns.rrset.RRset] = []
        cname = next((v for t, v in records if t == "CNAME"), None)
        if cname is not None:
            target = dns.name.from_text(cname)
            out.append(
                dns.rrset.from_text(qname, TTL, dns.rdataclass.IN, dns.rdatatype.CNAME, target.to_text())
            )
            if follow and rdtype != dns.rdatatype.CNAME:
                out.extend(_lookup(zone, target, cname, rdtype, follow=False) or [])
            return out
        values = [v for t, v in records if _TYPES[t] == rdtype]
        if values:
            out.append(
                dns.rrset.from_text_list(
                    qname, TTL, dns.rdataclass.IN, dns.rdatatype.RdataType(rdtype), values
                )
            )
        return out
    addrs = _node(zone, name)
    if addrs is None:
        return None
    if rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        rrset = _address_rrset(qname, rdtype, addrs)
        return [rrset] if rrset is not None else []
    return []


def _reverse_address(qname: dns.name.Name) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The one address ``qname`` is the reverse name of, or None (not a reverse name, or a partial one:
    a zone of many addresses). dnspython reads both zones' formats."""
    import dns.exception  # noqa: PLC0415
    import dns.reversename  # noqa: PLC0415

    try:
        return ipaddress.ip_address(dns.reversename.to_address(qname))
    except (dns.exception.SyntaxError, ValueError):
        return None


def _reverse(zone: Zone, query: dns.message.Message) -> Answer | None:
    """The answer to a reverse query this node is the authority for (step 4 of the module docstring):
    an address the map gives (PTR, or NODATA for another type) or another overlay address (NXDOMAIN);
    None: the name goes on like any other."""
    import dns.rcode  # noqa: PLC0415
    import dns.rdataclass  # noqa: PLC0415
    import dns.rdatatype  # noqa: PLC0415
    import dns.rrset  # noqa: PLC0415

    q = query.question[0]
    addr = _reverse_address(q.name)
    if addr is None:
        return None
    fqdn = zone.reverse.get(str(addr))
    if fqdn is None:
        if any(addr in net for net in OVERLAY):  # hidden by the policy, or nobody's: not to be asked about
            return Answer(_reply(query, dns.rcode.NXDOMAIN, authoritative=True))
        return None
    response = _reply(query, dns.rcode.NOERROR, authoritative=True)
    if q.rdtype == dns.rdatatype.PTR:
        response.answer.append(
            dns.rrset.from_text(q.name, TTL, dns.rdataclass.IN, dns.rdatatype.PTR, fqdn + ".")
        )
    return Answer(response)


def resolve(zone: Zone, query: dns.message.Message) -> Answer | Forward:
    """The answer to ``query``, or where to forward it (see the module docstring for the order)."""
    import dns.opcode  # noqa: PLC0415
    import dns.rcode  # noqa: PLC0415
    import dns.rdataclass  # noqa: PLC0415

    if query.opcode() != dns.opcode.QUERY:
        return Answer(_reply(query, dns.rcode.NOTIMP, authoritative=False))
    if len(query.question) != 1:
        return Answer(_reply(query, dns.rcode.FORMERR, authoritative=False))
    q = query.question[0]
    if q.rdclass != dns.rdataclass.IN:
        return Answer(_reply(query, dns.rcode.REFUSED, authoritative=False))
    name = q.name.to_text(omit_final_dot=True).lower()
    answer = _lookup(zone, q.name, name, q.rdtype) if zone.configured else None
    if answer is not None:
        response = _reply(query, dns.rcode.NOERROR, authoritative=True)
        response.answer.extend(answer)
        return Answer(response)
    if zone.magic_dns and in_domain(name, zone.base_domain):
        return Answer(_reply(query, dns.rcode.NXDOMAIN, authoritative=True))
    if zone.magic_dns and any(in_domain(name, z) for z in _REVERSE_ZONES):
        reverse = _reverse(zone, query)
        if reverse is not None:
            return reverse
    for domain, servers in zone.split:
        if in_domain(name, domain):
            if not servers:
                return Answer(_reply(query, dns.rcode.SERVFAIL, authoritative=False))
            return Forward(servers, domain)
    if zone.upstreams:
        return Forward(zone.upstreams)
    return Answer(_reply(query, dns.rcode.REFUSED, authoritative=False))


def servfail(query: dns.message.Message) -> dns.message.Message:
    """The reply when a forwarded query got no answer (timeouts, too many in flight)."""
    import dns.rcode  # noqa: PLC0415

    return _reply(query, dns.rcode.SERVFAIL, authoritative=False)


def describe(servers: tuple[HostPort, ...]) -> list[str]:
    return [format_endpoint(h, p) for h, p in servers]
