"""The host's links, addresses and routes, through iproute2's ``ip`` command.

Why not netlink from Python (pyroute2): its package imports ~160 modules at first use (unittest and
multiprocessing among them: ~9 MiB of a node's resident memory and ~140 ms on this machine), and that
first use is on the path between ``ghostlink join`` and the node's first packet, for the handful of
operations below. ``ip`` ships with every Linux distribution's base system (Debian: ``iproute2``,
priority important) and one call costs ~2 ms. Reads use its JSON output (``-j``, ip(8)); a plan's writes
go in one ``ip -batch -``. pyroute2 stays where only netlink will do: configuring kernel WireGuard
(:mod:`ghostlink.wg.kernel`), loaded only by a node that uses it.

Writes are made idempotent before they are sent, not by reading error messages: adds are
``replace`` (adding what exists is no change), and a removal is sent only for what the read before it
found, so re-applying a plan after a crash or a wireguard-go restart converges.

Every call is blocking (``subprocess.run``, bounded by ``TIMEOUT``): callers on the event loop run it in
a worker thread. A refusal raises :class:`IpError` (an ``OSError``) with ip's first line of stderr.
``netns`` runs the command in that named namespace (``ip -n``); production leaves it ``None``, since
ghostlink runs inside the namespace it configures.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

IP = "ip"
TIMEOUT = 10.0  # seconds for one ip command: a host whose netlink does not answer fails, not hangs
MISSING = "iproute2's ip command not found; install iproute2"


class IpError(OSError):
    """ip refused a command (the message names it and carries ip's first line of stderr)."""


@dataclass(frozen=True)
class Route:
    dst: str  # a network with its prefix length, as ipaddress prints it
    metric: int


def _argv(netns: str | None, args: Sequence[str]) -> list[str]:
    binary = shutil.which(IP) or shutil.which(IP, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if binary is None:
        raise IpError(MISSING)
    return [binary, *(("-n", netns) if netns else ()), *args]


def run(args: Sequence[str], netns: str | None = None, *, stdin: str | None = None) -> str:
    """``ip <args>``; its stdout. IpError when ip exits non-zero or does not finish in TIMEOUT."""
    argv = _argv(netns, args)
    try:
        res = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise IpError(f"ip {' '.join(args)}: no answer in {TIMEOUT:.0f} s") from None
    if res.returncode != 0:
        first = res.stderr.strip().splitlines()[:1]
        raise IpError(f"ip {' '.join(args)}: {first[0] if first else f'exit {res.returncode}'}")
    return res.stdout


def _json(args: Sequence[str], netns: str | None) -> list[dict[str, Any]]:
    text = run(["-j", *args], netns).strip()
    doc = json.loads(text) if text else []
    if not isinstance(doc, list):
        raise IpError(f"ip -j {' '.join(args)}: not a JSON list")
    return [d for d in doc if isinstance(d, dict)]


def link_exists(ifname: str, netns: str | None = None) -> bool:
    return link_kind(ifname, netns) is not None


def link_kind(ifname: str, netns: str | None = None) -> str | None:
    """The link's kind (``wireguard``, ``veth``…; "" for a plain device), None when there is no such link."""
    for d in _json(["-d", "link", "show"], netns):
        if d.get("ifname") == ifname:
            info = d.get("linkinfo")
            return str(info.get("info_kind", "")) if isinstance(info, dict) else ""
    return None


def set_up(ifname: str, mtu: int, netns: str | None = None) -> None:
    run(["link", "set", "dev", ifname, "mtu", str(mtu), "up"], netns)


def add_link(ifname: str, kind: str, netns: str | None = None) -> None:
    run(["link", "add", "dev", ifname, "type", kind], netns)


def delete_link(ifname: str, netns: str | None = None) -> None:
    run(["link", "del", "dev", ifname], netns)


def _address_infos(ifname: str | None, netns: str | None) -> Iterator[tuple[str, dict[str, Any]]]:
    """(interface, ``addr_info`` entry) for every address on the host, or on ``ifname``."""
    for link in _json(["addr", "show", *(("dev", ifname) if ifname else ())], netns):
        for a in link.get("addr_info", ()):
            if isinstance(a, dict) and a.get("local"):
                yield str(link.get("ifname", "")), a


def addresses(ifname: str | None = None, netns: str | None = None) -> list[tuple[str, str]]:
    """(interface, address) for every address on the host (or on ``ifname``), without prefix lengths."""
    return [(name, str(a["local"])) for name, a in _address_infos(ifname, netns)]


def _interfaces(ifname: str, netns: str | None) -> set[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
    return {
        ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}")
        for _, a in _address_infos(ifname, netns)
        if "prefixlen" in a
    }


def _network(dst: str, family: int) -> str:
    if dst == "default":
        return "0.0.0.0/0" if family == 4 else "::/0"
    return str(ipaddress.ip_network(dst, strict=False))


def routes(ifname: str, netns: str | None = None) -> set[Route]:
    """The main table's routes through ``ifname`` (both families)."""
    out = set()
    for family in (4, 6):
        for r in _json([f"-{family}", "route", "show", "dev", ifname], netns):
            if "dst" in r:
                out.add(Route(_network(str(r["dst"]), family), int(r.get("metric", 0))))
    return out


def sync_batch(
    ifname: str,
    *,
    addresses_remove: Iterable[str] = (),
    addresses_add: Iterable[str] = (),
    routes_remove: Iterable[str] = (),
    routes_add: Iterable[str] = (),
    metric: int,
) -> list[str]:
    """The ``ip -batch`` lines for one change of ``ifname`` (pure: the caller filtered the removals)."""
    # Removing a link's last IPv4 address makes the kernel flush every IPv4 route through the link
    # (fib_disable_ip): so a new address is added before the old one goes (a node given another address
    # keeps its routes), and the routes to remove go first (a batch stops at its first refused line).
    lines = [f"route del {r} dev {ifname} metric {metric}" for r in routes_remove]
    lines += [f"address replace {a} dev {ifname}" for a in addresses_add]
    lines += [f"address del {a} dev {ifname}" for a in addresses_remove]
    lines += [f"route replace {r} dev {ifname} metric {metric}" for r in routes_add]
    return lines


def apply(
    ifname: str,
    *,
    addresses_remove: Iterable[str],
    addresses_add: Iterable[str],
    routes_remove: Iterable[str],
    routes_add: Iterable[str],
    metric: int,
    netns: str | None = None,
) -> None:
    """Remove and add addresses and routes (``metric``) on ``ifname`` in one batch; idempotent."""
    addr_rm = [str(ipaddress.ip_interface(a)) for a in addresses_remove]
    route_rm = [str(ipaddress.ip_network(r, strict=False)) for r in routes_remove]
    if addr_rm:
        present = {str(i) for i in _interfaces(ifname, netns)}
        addr_rm = [a for a in addr_rm if a in present]
    if route_rm:
        have = {r.dst for r in routes(ifname, netns) if r.metric == metric}
        route_rm = [r for r in route_rm if r in have]
    lines = sync_batch(
        ifname,
        addresses_remove=addr_rm,
        addresses_add=[str(ipaddress.ip_interface(a)) for a in addresses_add],
        routes_remove=route_rm,
        routes_add=[str(ipaddress.ip_network(r, strict=False)) for r in routes_add],
        metric=metric,
    )
    if lines:
        run(["-batch", "-"], netns, stdin="\n".join(lines) + "\n")
