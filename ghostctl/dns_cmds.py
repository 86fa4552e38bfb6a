"""``ghostctl dns``: the node resolver (MagicDNS and split DNS, :mod:`ghostlink.magicdns`).

``ghostctl dns status``        what the local ghostlink's resolver serves (LocalNode ``DnsStatus``): base
                               domain, how many node names, extra records, split domains and their
                               servers, the upstreams for every other name and where they come from, the
                               search domains, the listen addresses, how the host is pointed at it
                               (resolv.conf or systemd-resolved) and query counters.
``ghostctl dns query NAME``    asks the resolver itself (UDP, then TCP if the answer is truncated), as any
                               program on the node would: ``--type`` A (default), AAAA, CNAME, PTR, ...;
                               with ``--type PTR`` an IP address as NAME is asked as its reverse name
                               (``dig -x``); ``--resolver IP[:PORT]`` (default 100.100.100.100). Exit 0
                               with an answer, 4 for NXDOMAIN or no data, 5 when the resolver does not
                               answer.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

import dns.exception
import dns.flags
import dns.rcode
import dns.rdatatype
import dns.reversename

from ghostcore.addr import AddressError, HostPort, format_endpoint, normalize_ip, parse_endpoint
from ghostcore.dnsname import RESOLVER_V4, normalize_server
from ghostcore.errors import InvalidArgument, NotFound, Unavailable
from ghostcore.pb.ghostmesh.v1 import local_pb2
from ghostctl import output
from ghostctl.context import Context

if TYPE_CHECKING:
    import dns.message

QUERY_TIMEOUT = 3.0  # seconds; the resolver itself gives an upstream 2 s


def _resolver(text: str) -> HostPort:
    try:
        return parse_endpoint(normalize_server(text, "--resolver"))
    except AddressError as exc:
        raise argparse.ArgumentTypeError(exc.for_key("--resolver")) from None


def _rdtype(text: str) -> dns.rdatatype.RdataType:
    try:
        return dns.rdatatype.RdataType.from_text(text.upper())
    except dns.rdatatype.UnknownRdatatype:
        raise argparse.ArgumentTypeError(
            f"--type {text!r}: not a DNS record type (A, AAAA, CNAME, ...)"
        ) from None


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = sub.add_parser("dns", help="the node resolver: MagicDNS names, split DNS, upstreams")
    dsub = p.add_subparsers(dest="dns_cmd", required=True)
    s = dsub.add_parser("status", parents=[common], help="what this node's resolver serves")
    s.set_defaults(func=run_status)
    q = dsub.add_parser("query", parents=[common], help="ask this node's resolver for NAME")
    q.add_argument(
        "name", help="e.g. peer1, peer1.mesh.example, intranet.corp.example; with --type PTR an IP address"
    )
    q.add_argument("--type", dest="rdtype", type=_rdtype, default=dns.rdatatype.A, help="record type (A)")
    q.add_argument(
        "--resolver",
        type=_resolver,
        default=(RESOLVER_V4, 53),
        metavar="IP[:PORT]",
        help=f"the resolver to ask (default {RESOLVER_V4})",
    )
    q.set_defaults(func=run_query)


def status_doc(d: local_pb2.LocalDnsStatus) -> dict[str, Any]:
    return {
        "accept_dns": d.accept_dns,
        "configured": d.configured,
        "magic_dns": d.magic_dns,
        "base_domain": d.base_domain,
        "names": d.names,
        "extra_records": d.extra_records,
        "split": {s.domain: list(s.servers) for s in d.split},
        "upstreams": list(d.upstreams),
        "upstreams_source": d.upstreams_source,
        "search_domains": list(d.search_domains),
        "listen": list(d.listen),
        "host_mode": d.host_mode,
        "host_detail": d.host_detail,
        "queries": d.queries,
        "forwarded": d.forwarded,
        "dropped": d.dropped,
        "refused": list(d.refused),
    }


def render_status(d: local_pb2.LocalDnsStatus) -> str:
    source = {"map": "from the map", "host": "the host's previous resolvers", "none": "none"}
    return output.key_values(
        [
            ("settings", "from the map" if d.configured else "none in the map (host resolver untouched)"),
            ("magic dns", f"on, *.{d.base_domain}" if d.magic_dns else "off"),
            ("names", f"{d.names} nodes, {d.extra_records} extra records"),
            *((f"split {s.domain}", ", ".join(s.servers)) for s in d.split),
            ("upstreams", f"{', '.join(d.upstreams) or '-'} ({source.get(d.upstreams_source, '?')})"),
            ("search domains", " ".join(d.search_domains)),
            ("listening on", ", ".join(d.listen)),
            ("host", f"{d.host_mode}: {d.host_detail}" if d.host_mode else d.host_detail or "not configured"),
            ("queries", f"{d.queries} ({d.forwarded} forwarded, {d.dropped} dropped)"),
            *(("refused", line) for line in d.refused),
        ]
    )


def run_status(ctx: Context, args: argparse.Namespace) -> int:
    stub, where = ctx.local()
    d = ctx.call(stub.DnsStatus, local_pb2.LocalDnsStatusRequest(), where, node=True)
    ctx.emit(status_doc(d), lambda: render_status(d))
    return 0


def query_name(name: str, rdtype: dns.rdatatype.RdataType) -> str:
    """The name to ask: for a PTR query an IP address becomes its reverse name (as ``dig -x`` does);
    anything else as given."""
    if rdtype == dns.rdatatype.PTR:
        try:
            ip = normalize_ip(name)
        except AddressError:
            return name
        return dns.reversename.from_address(ip).to_text()
    return name


def ask(name: str, rdtype: dns.rdatatype.RdataType, resolver: HostPort) -> dns.message.Message:
    # Imported here: dnspython's query module loads its DNS-over-QUIC support (aioquic, trio), a
    # fifth of a second that every other ghostctl command would pay at start.
    import dns.message  # noqa: PLC0415
    import dns.query  # noqa: PLC0415

    """One query to ``resolver``: UDP, then TCP when the answer is truncated (RFC 7766 section 5)."""
    try:
        query = dns.message.make_query(name, rdtype, use_edns=0)
    except (dns.exception.DNSException, ValueError) as exc:
        raise InvalidArgument(f"{name!r} is not a DNS name: {exc}") from None
    host, port = resolver
    where = format_endpoint(host, port)
    try:
        response, _ = dns.query.udp_with_fallback(query, host, timeout=QUERY_TIMEOUT, port=port)
    except dns.exception.Timeout:
        raise Unavailable(f"no answer from the resolver at {where} within {QUERY_TIMEOUT:g} s") from None
    except (dns.exception.DNSException, OSError) as exc:
        raise Unavailable(f"asking the resolver at {where} failed: {exc}") from None
    return response


def answer_doc(name: str, rdtype: dns.rdatatype.RdataType, resolver: HostPort, r: dns.message.Message) -> Any:
    return {
        "name": name,
        "type": rdtype.name,
        "resolver": format_endpoint(*resolver),
        "rcode": dns.rcode.to_text(r.rcode()),
        "authoritative": bool(r.flags & dns.flags.AA),
        "answers": [
            {
                "name": rrset.name.to_text(omit_final_dot=True),
                "type": dns.rdatatype.to_text(rrset.rdtype),
                "ttl": rrset.ttl,
                "value": rd.to_text(),
            }
            for rrset in r.answer
            for rd in rrset
        ],
    }


def render_answer(doc: Any) -> str:
    if not doc["answers"]:
        return f"{doc['name']}: {doc['rcode']}, no {doc['type']} record (asked {doc['resolver']})"
    rows = [(a["name"], a["type"], str(a["ttl"]), a["value"]) for a in doc["answers"]]
    return output.table(("NAME", "TYPE", "TTL", "VALUE"), rows)


def run_query(ctx: Context, args: argparse.Namespace) -> int:
    name = query_name(args.name, args.rdtype)
    response = ask(name, args.rdtype, args.resolver)
    doc = answer_doc(name, args.rdtype, args.resolver, response)
    ctx.emit(doc, lambda: render_answer(doc))
    if doc["answers"]:
        return 0
    if response.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        raise NotFound(f"{name}: {doc['rcode']}, no {doc['type']} record")
    raise Unavailable(f"{name}: the resolver answered {doc['rcode']}")
