"""Using an exit node: this host's default route through the WireGuard interface, by policy routing.

``ghostlink --exit-node NAME`` (config ``node.exit_node``) puts 0.0.0.0/0 and ::/0 on that peer's
allowed IPs (:func:`ghostlink.engine.desired_state`); this module steers the traffic there WITHOUT
cutting the node off from ghostmesh or from its peers' endpoints. The approach is Tailscale's on Linux:
the main table stays untouched and three kinds of ``ip rule`` (both families) do the work::

    5210  to <ghostmesh address> lookup main        the control connection keeps the underlay path
    5210  to <each peer endpoint> lookup main       WireGuard's own UDP packets keep it too
    5230  lookup main suppress_prefixlength 0       every specific route (LANs, mesh routes) still wins
    5270  lookup 7277                               the rest: default dev <wg> in table 7277

Rule 5230 consults the main table but ignores its default route (prefix length 0), so only what used
to leave through the default gateway moves into the tunnel. Peer endpoints are refreshed from each map
(an endpoint WireGuard learns by roaming and the map does not list yet is not covered until the map
catches up). Everything added is removed when the exit node goes away, is un-chosen, or ghostlink stops.
Commands run through the ``ip`` tool (iproute2), as :mod:`ghostlink.nft` runs ``nft``; :func:`commands`
is pure and unit tested.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Iterable

log = logging.getLogger(__name__)

TABLE = "7277"
PRIO_BYPASS = "5210"
PRIO_SUPPRESS = "5230"
PRIO_TABLE = "5270"


def _fam(addr: str) -> str:
    return "-6" if ipaddress.ip_address(addr).version == 6 else "-4"


def _host(addr: str) -> str:
    ip = ipaddress.ip_address(addr)
    return f"{ip}/{ip.max_prefixlen}"


def bypass_rule(op: str, addr: str) -> list[str]:
    return [_fam(addr), "rule", op, "to", _host(addr), "lookup", "main", "priority", PRIO_BYPASS]


def commands(ifname: str, op: str, bypass: Iterable[str]) -> list[list[str]]:
    """``ip`` argument lists turning exit routing on (``op="add"``) or off (``"del"``), in order."""
    bypass_cmds = [bypass_rule(op, a) for a in sorted(bypass)]
    core: list[list[str]] = []
    for fam in ("-4", "-6"):
        core += [
            [fam, "route", "replace" if op == "add" else "del", "default", "dev", ifname, "table", TABLE],
            [fam, "rule", op, "lookup", "main", "suppress_prefixlength", "0", "priority", PRIO_SUPPRESS],
            [fam, "rule", op, "lookup", TABLE, "priority", PRIO_TABLE],
        ]
    # on: the ways out first, then the default; off: the default first, then the ways out
    return bypass_cmds + core if op == "add" else core + bypass_cmds


class ExitRouting:
    """Policy routing for the chosen exit node on one interface (the I/O edge)."""

    def __init__(self, ifname: str, always_bypass: Iterable[str] = (), ip: str = "ip") -> None:
        self.ifname = ifname
        self.always = frozenset(str(ipaddress.ip_address(a)) for a in always_bypass)
        self.ip = ip
        self.active = False
        self.bypass: frozenset[str] = frozenset()

    async def _run(self, args: list[str], *, check: bool = True) -> None:
        proc = await asyncio.create_subprocess_exec(
            self.ip, *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        _, err = await proc.communicate()
        if proc.returncode != 0 and check:
            first = err.decode("utf-8", "replace").strip().splitlines()[:1]
            raise OSError(f"ip {' '.join(args)}: {first[0] if first else proc.returncode}")

    async def apply(self, active: bool, endpoints: frozenset[str]) -> None:
        """Exit routing on while ``active``, bypassing ghostmesh and ``endpoints``; idempotent."""
        want = self.always | endpoints
        if active and not self.active:
            for args in commands(self.ifname, "add", want):
                await self._run(args)
            self.active, self.bypass = True, want
            log.info(
                "exit node in use: default route through %s (%d addresses bypass)", self.ifname, len(want)
            )
        elif active:
            for a in sorted(want - self.bypass):
                await self._run(bypass_rule("add", a))
            for a in sorted(self.bypass - want):
                await self._run(bypass_rule("del", a), check=False)
            self.bypass = want
        elif self.active:
            await self._off()

    async def _off(self) -> None:
        for args in commands(self.ifname, "del", self.bypass):
            await self._run(args, check=False)  # already gone (e.g. the interface died) is fine
        self.active, self.bypass = False, frozenset()
        log.info("exit node no longer in use: default route restored")

    async def close(self) -> None:
        if self.active:
            await self._off()
