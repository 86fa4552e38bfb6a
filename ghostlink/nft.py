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

The policy compiler on ghostmesh is the judge of who may reach what; this module only renders its
``FilterRule``s. A rule without protocols accepts any protocol when it covers every port, and TCP, UDP
and ICMP on its ports otherwise (ports do not exist for ICMP; Tailscale also lets a rule's ICMP through).

Replacing: the whole table is rewritten in ONE ``nft -f -`` transaction ("add table; delete table; add
table {...}"), which nftables applies atomically (nftables wiki, "Atomic rule replacement"), so there is
never a moment without rules. :func:`render` is pure and unit tested; :class:`NftFirewall` is the
subprocess edge.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from collections.abc import Iterable, Sequence

from ghostlink.engine import FilterSpec

log = logging.getLogger(__name__)

_FULL = (0, 65535)
ROUTED_MARK = "0x00470000"  # "forwarded from the mesh": masquerade it on the way out


def table_name(ifname: str) -> str:
    return "ghostlink_" + re.sub(r"[^A-Za-z0-9_]", "_", ifname)


def _collapse(prefixes: Iterable[str], version: int) -> list[str]:
    nets = [ipaddress.ip_network(p, strict=False) for p in prefixes]
    nets = [n for n in nets if n.version == version]
    # overlapping elements are an error in an nft interval set: merge them first
    return [str(n) for n in ipaddress.collapse_addresses(nets)]  # type: ignore[type-var]


def _match(field: str, items: Sequence[str]) -> str:
    if any(i.endswith("/0") for i in items):
        return ""  # the whole family: no match needed
    if len(items) == 1:
        return f"{field} {items[0]} "
    return f"{field} {{ {', '.join(items)} }} "


def _ports(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


def rule_lines(rules: Sequence[FilterSpec]) -> list[str]:
    """The accept statements for ``rules`` (no chain boilerplate)."""
    out: list[str] = []
    for r in rules:
        for version, fam, icmp in ((4, "ip", "icmp"), (6, "ip6", "ipv6-icmp")):
            src = _collapse(r.src, version)
            if not src:
                continue
            dsts = [
                (p, lo, hi) for p, lo, hi in r.dst if ipaddress.ip_network(p, strict=False).version == version
            ]
            for prefix, lo, hi in dsts:
                head = f"{_match(fam + ' saddr', src)}{_match(fam + ' daddr', [prefix])}"
                protos = r.protocols
                if not protos and (lo, hi) == _FULL:
                    out.append(f"{head}accept")
                    continue
                for proto in protos or ("tcp", "udp", "icmp"):
                    if proto == "icmp":
                        out.append(f"{head}meta l4proto {icmp} accept")
                    elif proto in ("tcp", "udp"):
                        out.append(f"{head}{proto} dport {_ports(lo, hi)} accept")
    # equal lines (e.g. the same grant from two rules) would only slow the chain down
    return list(dict.fromkeys(out))


def render(ifname: str, rules: Sequence[FilterSpec], masquerade: bool = False) -> str:
    """The ``nft -f`` script replacing the interface's table with one enforcing ``rules``.

    ``masquerade``: this node routes for the mesh; NAT what it forwards from the WireGuard interface.
    """
    name = table_name(ifname)
    body = [
        "ct state established,related accept",
        "ct state invalid drop",
    ]
    body += rule_lines(rules)
    body.append("drop")
    chains = []
    for hook in ("input", "forward"):
        head = [f"iifname != {_quote(ifname)} accept"]
        if hook == "forward" and masquerade:
            head.append(f"meta mark set meta mark or {ROUTED_MARK}")
        lines = "\n".join(f"\t\t{line}" for line in head + body)
        chains.append(
            f"\tchain {hook} {{\n\t\ttype filter hook {hook} priority filter; policy accept;\n{lines}\n\t}}"
        )
    if masquerade:
        chains.append(
            "\tchain postrouting {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
            f"\t\tmeta mark and {ROUTED_MARK} == {ROUTED_MARK} oifname != {_quote(ifname)} masquerade\n\t}}"
        )
    return (
        f"add table inet {name}\ndelete table inet {name}\ntable inet {name} {{\n"
        + "\n".join(chains)
        + "\n}\n"
    )


def render_delete(ifname: str) -> str:
    name = table_name(ifname)
    return f"add table inet {name}\ndelete table inet {name}\n"


def _quote(ifname: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,15}", ifname):
        raise ValueError(f"interface name {ifname!r} cannot be used in an nft rule")
    return f'"{ifname}"'


class NftFirewall:
    """Applies a filter to one interface's table by running ``nft -f -`` (the I/O edge)."""

    def __init__(self, ifname: str, nft: str = "nft") -> None:
        self.ifname = ifname
        self.nft = nft
        self.applied: tuple[FilterSpec, ...] | None = None
        self.masquerade = False

    async def _run(self, script: str) -> None:
        proc = await asyncio.create_subprocess_exec(
            self.nft,
            "-f",
            "-",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await proc.communicate(script.encode("utf-8"))
        if proc.returncode != 0:
            first = err.decode("utf-8", "replace").strip().splitlines()[:1]
            raise OSError(
                f"nft refused the filter of {self.ifname}: {first[0] if first else proc.returncode}"
            )

    async def apply(self, rules: tuple[FilterSpec, ...], masquerade: bool = False) -> None:
        """Replace the table with one enforcing ``rules``; a no-op when they are what is applied."""
        if rules == self.applied and masquerade == self.masquerade:
            return
        await self._run(render(self.ifname, rules, masquerade))
        self.applied = rules
        self.masquerade = masquerade
        log.info("packet filter on %s: %d rules%s", self.ifname, len(rules), ", masquerading" * masquerade)

    async def close(self) -> None:
        """Remove the table (on shutdown)."""
        try:
            await self._run(render_delete(self.ifname))
        except OSError as exc:
            log.warning("removing the nft table of %s failed: %s", self.ifname, exc)
        self.applied = None
