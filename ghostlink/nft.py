"""Enforcing the node's inbound packet filter with nftables: one table per WireGuard interface.

The table ``inet ghostlink_<ifname>`` (nftables wiki, "Nftables families": ``inet`` covers IPv4 and
IPv6) holds two base chains, hooked on ``input`` and on ``forward`` (for subnet routing later), both
with ``policy accept`` so they only ever judge packets that came in on the WireGuard interface::

    iifname != "<wg if>" accept                   other interfaces are none of our business
    ct state established,related accept           stateful: replies to flows this node started
    ct state invalid drop
    ip saddr { <sources> } ip daddr <own> tcp dport 22 accept   one line per rule/range/protocol
    ...
    drop

On a subnet router or exit node (``masquerade=True``, see :mod:`ghostlink.forwarding`) the forward chain
also marks what comes in from the WireGuard interface, and a ``nat`` chain hooked on ``postrouting``
masquerades marked packets leaving through any other interface, so hosts behind the router need no
route back to the overlay. A mark is needed because ``iifname`` is not known in postrouting (netfilter
passes no input device there); ``ROUTED_MARK`` is one bit, OR-ed in so other marks survive. The filter
rules decide first: a packet the node's filter does not accept is dropped before it is ever marked.

On a device gateway (``devices``: the host prefixes of the stock WireGuard peers behind this node) the
forward chain also accepts what its devices send into the mesh (``oifname "<wg if>" ip saddr { <devices> }
ip daddr != { <devices> } accept``): WireGuard's cryptokey routing has already checked that such a packet
came from that device's key, and the node receiving it enforces its own filter on it, as it would for any
node's packet. What goes to another device, to a subnet behind this node or to the internet through it, and
what the mesh sends to a device, is judged by this node's filter rules, where the policy compiler puts the
devices' rules. A gateway that is no router forwards nothing out of the mesh (``oifname != "<wg if>"
drop``) and masquerades nothing. On every forward chain, a packet from another interface into the mesh
whose source is this node's overlay address or a device's is dropped: a host on the LAN must not borrow
their rights at the peers, which accept those sources from this node's tunnel.

The policy compiler on ghostmesh is the judge of who may reach what; this module only renders its
``FilterRule``s, protocol by protocol as written (:mod:`ghostcore.ipproto`): TCP, UDP and SCTP
on the rule's ports, ICMP (IPv4) and ICMPv6 (IPv6) whatever the ports (they have none), any other
protocol (GRE, ESP, a number) only when the rule covers every port. A rule without protocols admits
Tailscale's default set, TCP, UDP, ICMP and ICMPv6: never GRE, SCTP or anything else.

Replacing: the whole table is rewritten in ONE ``nft -f -`` transaction ("add table; delete table; add
table {...}"), which nftables applies atomically (nftables wiki, "Atomic rule replacement"), so there is
never a moment without rules. :func:`render` is pure and unit tested; :class:`NftFirewall` is the
subprocess edge.

The table is journaled (:mod:`ghostlink.hostjournal`) before it is first created and forgotten once it is
deleted; :func:`delete_table` removes the one a crashed run left, by its journaled name.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from collections.abc import Iterable, Sequence

from ghostcore import addr
from ghostcore import ipproto as protocols
from ghostcore.errors import InvalidArgument
from ghostlink.engine import FilterSpec
from ghostlink.hostjournal import HostJournal

log = logging.getLogger(__name__)

_FULL = (0, 65535)
ROUTED_MARK = "0x00470000"  # "forwarded from the mesh": masquerade it on the way out


def table_name(ifname: str) -> str:
    return "ghostlink_" + re.sub(r"[^A-Za-z0-9_]", "_", ifname)


def _collapse(prefixes: Iterable[str], version: int) -> list[str]:
    """The ``version`` prefixes merged (overlapping elements are an error in an nft interval set).

    Each is parsed strictly (``ghostcore.addr.parse_prefix``): only canonical prefixes reach a script, so
    no map value can add a token, a statement or a line to it. InvalidArgument otherwise.
    """
    nets = [addr.parse_prefix(p, "filter prefix") for p in prefixes]
    if version == 4:
        merged = ipaddress.collapse_addresses(n for n in nets if isinstance(n, ipaddress.IPv4Network))
        return [str(n) for n in merged]
    return [
        str(n) for n in ipaddress.collapse_addresses(n for n in nets if isinstance(n, ipaddress.IPv6Network))
    ]


def _match(field: str, items: Sequence[str]) -> str:
    if any(i.endswith("/0") for i in items):
        return ""  # the whole family: no match needed
    if len(items) == 1:
        return f"{field} {items[0]} "
    return f"{field} {{ {', '.join(items)} }} "


def _ports(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _proto_line(head: str, proto: str, version: int, lo: int, hi: int) -> str | None:
    """One accept statement for ``proto`` (canonical, :mod:`ghostcore.ipproto`), or None when
    the protocol cannot match here: ICMP is IPv4's and ICMPv6 is IPv6's, and a protocol without ports
    matches only a rule covering every port (as Tailscale's filter does)."""
    if proto in protocols.WITH_PORTS:
        if (lo, hi) == _FULL:
            return f"{head}meta l4proto {proto} accept"
        return f"{head}{proto} dport {_ports(lo, hi)} accept"
    if proto in protocols.PORTLESS_ICMP:
        if (proto == "icmp") != (version == 4):
            return None
        return f"{head}meta l4proto {proto} accept"  # whatever the ports: ICMP has none
    if (lo, hi) != _FULL:
        return None
    return f"{head}meta l4proto {protocols.number(proto)} accept"  # by number: nft knows few names


def rule_lines(rules: Sequence[FilterSpec]) -> list[str]:
    """The accept statements for ``rules`` (no chain boilerplate). A rule without protocols admits
    Tailscale's default set (TCP, UDP, ICMP, ICMPv6), never every protocol."""
    out: list[str] = []
    for r in rules:
        protos = protocols.effective(r.protocols)
        for proto in protos:
            if not protocols.is_canonical(proto):
                raise InvalidArgument(f"filter protocol {proto[:20]!r} is not a protocol name or number")
        for version, fam in ((4, "ip"), (6, "ip6")):
            src = _collapse(r.src, version)
            if not src:
                continue
            dsts = [(p, lo, hi) for p, lo, hi in r.dst if addr.parse_prefix(p).version == version]
            for prefix, lo, hi in dsts:
                if not 0 <= lo <= hi <= 65535:
                    raise InvalidArgument(f"filter port range {lo}-{hi} is not within 0..65535")
                head = f"{_match(fam + ' saddr', src)}{_match(fam + ' daddr', [prefix])}"
                for proto in protos:
                    line = _proto_line(head, proto, version, lo, hi)
                    if line is not None:
                        out.append(line)
    # equal lines (e.g. the same grant from two rules) would only slow the chain down
    return list(dict.fromkeys(out))


def _families(prefixes: Sequence[str]) -> list[tuple[str, list[str]]]:
    """(``ip`` / ``ip6``, the prefixes of that family merged) for each family that has any."""
    out = []
    for version, fam in ((4, "ip"), (6, "ip6")):
        merged = _collapse(prefixes, version)
        if merged:
            out.append((fam, merged))
    return out


def render(
    ifname: str,
    rules: Sequence[FilterSpec],
    *,
    masquerade: bool = False,
    devices: Sequence[str] = (),
    own: Sequence[str] = (),
) -> str:
    """The ``nft -f`` script replacing the interface's table with one enforcing ``rules``.

    ``masquerade``: this node routes for the mesh (subnet router, exit node); NAT what it forwards from the
    WireGuard interface to others. ``devices``: host prefixes of the devices behind this node, whose
    packets into the mesh it forwards; a gateway that is no router forwards between mesh and devices only.
    ``own``: this node's overlay host prefixes; with ``devices``, the addresses a host on another interface
    must never send into the mesh as (peers would credit such a packet with this node's or a device's rights).
    """
    name = table_name(ifname)
    wg = _quote(ifname)
    body = [
        "ct state established,related accept",
        "ct state invalid drop",
    ]
    body += rule_lines(rules)
    body.append("drop")
    chains = []
    for hook in ("input", "forward"):
        head = []
        tail = body
        if hook == "forward":
            # spoofed from another interface (a LAN host): dropped before "not from the mesh: accept"
            head += [
                f"iifname != {wg} oifname {wg} {_match(fam + ' saddr', p)}drop"
                for fam, p in _families([*own, *devices])
            ]
        head.append(f"iifname != {wg} accept")
        if hook == "forward" and masquerade:
            head.append(f"meta mark set meta mark or {ROUTED_MARK}")
        if hook == "forward" and devices:
            if not masquerade:
                head.append(f"oifname != {wg} drop")  # a gateway of devices only: within the mesh
            # a device's packet into the mesh: the node it is for judges it; not to another device, whose
            # rules this node's filter holds (after the conntrack lines, before the filter's)
            into_mesh = [
                f"oifname {wg} {_match(fam + ' saddr', p)}{_match(fam + ' daddr !=', p)}accept"
                for fam, p in _families(devices)
            ]
            tail = body[:2] + into_mesh + body[2:]
        lines = "\n".join(f"\t\t{line}" for line in head + tail)
        chains.append(
            f"\tchain {hook} {{\n\t\ttype filter hook {hook} priority filter; policy accept;\n{lines}\n\t}}"
        )
    if masquerade:
        chains.append(
            "\tchain postrouting {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
            f"\t\tmeta mark and {ROUTED_MARK} == {ROUTED_MARK} oifname != {wg} masquerade\n\t}}"
        )
    return (
        f"add table inet {name}\ndelete table inet {name}\ntable inet {name} {{\n"
        + "\n".join(chains)
        + "\n}\n"
    )


def render_delete(ifname: str) -> str:
    return _delete_script(table_name(ifname))


def _delete_script(table: str) -> str:
    # "add" first: deleting a table that is not there would fail the transaction
    return f"add table inet {table}\ndelete table inet {table}\n"


def _quote(ifname: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,15}", ifname):
        raise ValueError(f"interface name {ifname!r} cannot be used in an nft rule")
    return f'"{ifname}"'


async def run_script(nft: str, script: str, what: str) -> None:
    """``nft -f -`` with ``script`` (one atomic transaction); OSError with nft's first line on refusal."""
    proc = await asyncio.create_subprocess_exec(
        nft,
        "-f",
        "-",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate(script.encode("utf-8"))
    if proc.returncode != 0:
        first = err.decode("utf-8", "replace").strip().splitlines()[:1]
        raise OSError(f"nft refused {what}: {first[0] if first else proc.returncode}")


async def delete_table(table: str, nft: str = "nft") -> None:
    """Delete ``table inet <table>`` (a crashed run's, by its journaled name); gone already is fine."""
    await run_script(nft, _delete_script(table), f"deleting table inet {table}")


class NftFirewall:
    """Applies a filter to one interface's table by running ``nft -f -`` (the I/O edge)."""

    def __init__(self, ifname: str, nft: str = "nft", journal: HostJournal | None = None) -> None:
        self.ifname = ifname
        self.nft = nft
        self.applied: tuple[FilterSpec, ...] | None = None
        self.masquerade = False
        self.devices: tuple[str, ...] = ()
        self.own: tuple[str, ...] = ()
        self._journal = journal  # None: nothing journaled (tests that run the firewall alone)

    async def _run(self, script: str) -> None:
        await run_script(self.nft, script, f"the filter of {self.ifname}")

    async def apply(
        self,
        rules: tuple[FilterSpec, ...],
        *,
        masquerade: bool = False,
        devices: tuple[str, ...] = (),
        own: tuple[str, ...] = (),
    ) -> None:
        """Replace the table with one enforcing ``rules`` (see :func:`render` for the rest); a no-op when
        all of it is what is applied."""
        wanted = (rules, masquerade, devices, own)
        if wanted == (self.applied, self.masquerade, self.devices, self.own):
            return
        if self.applied is None and self._journal is not None:  # the table is about to be created
            await asyncio.to_thread(self._journal.record_nft_table, table_name(self.ifname))
        await self._run(render(self.ifname, rules, masquerade=masquerade, devices=devices, own=own))
        self.applied = rules
        self.masquerade = masquerade
        self.devices = devices
        self.own = own
        log.info("packet filter on %s: %d rules%s", self.ifname, len(rules), ", masquerading" * masquerade)

    async def close(self) -> None:
        """Remove the table (on shutdown); it stays journaled if that failed, for the next start."""
        try:
            await self._run(render_delete(self.ifname))
        except OSError as exc:
            log.warning("removing the nft table of %s failed: %s", self.ifname, exc)
            return
        self.applied = None
        if self._journal is not None:
            await asyncio.to_thread(self._journal.record_nft_table, "")
