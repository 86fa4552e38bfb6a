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

The table and the priorities are journaled (:mod:`ghostlink.hostjournal`) before the first rule is added
and forgotten once the rules are removed. After a crash, :func:`remove_leftovers` deletes what is left:
the rules of exactly those shapes at those priorities (:func:`leftover_deletes`, pure), whatever
endpoints the bypass rules named, and the routes of the table. Adding a rule that exists is an error
(EEXIST), so they must be gone before the next run adds its own.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ghostlink.hostjournal import ExitRoutingRecord, HostJournal

log = logging.getLogger(__name__)

TABLE = "7277"
PRIO_BYPASS = "5210"
PRIO_SUPPRESS = "5230"
PRIO_TABLE = "5270"
RECORD = ExitRoutingRecord(int(TABLE), int(PRIO_BYPASS), int(PRIO_SUPPRESS), int(PRIO_TABLE))


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


def leftover_deletes(fam: str, rules: Sequence[Mapping[str, Any]], rec: ExitRoutingRecord) -> list[list[str]]:
    """``ip`` argument lists deleting, of ``rules`` (``ip -j <fam> rule show``), exactly those exit
    routing adds: at ``rec.bypass`` ``to <host> lookup main``, at ``rec.suppress`` ``lookup main
    suppress_prefixlength 0``, at ``rec.lookup`` ``lookup <rec.table>``. A rule with anything more (a
    source, a mark, an interface...) or at another priority is not ours and stays."""
    out: list[list[str]] = []
    for r in rules:
        prio, table = r.get("priority"), str(r.get("table", ""))
        more = set(r) - {"priority", "src", "table"}
        if r.get("src", "all") != "all":
            continue
        selector: list[str] = []
        if prio == rec.bypass and table == "main" and more <= {"dst", "dstlen"} and "dst" in r:
            dst = ipaddress.ip_address(str(r["dst"]))
            if int(r.get("dstlen", dst.max_prefixlen)) == dst.max_prefixlen:
                selector = ["to", _host(str(dst)), "lookup", "main"]
        elif prio == rec.suppress and table == "main" and more == {"suppress_prefixlen"}:
            if r["suppress_prefixlen"] == 0:
                selector = ["lookup", "main", "suppress_prefixlength", "0"]
        elif prio == rec.lookup and table == str(rec.table) and not more:
            selector = ["lookup", table]
        if selector:
            out.append([fam, "rule", "del", *selector, "priority", str(prio)])
    return out


async def _ip(ip: str, args: list[str], *, check: bool = True) -> str:
    proc = await asyncio.create_subprocess_exec(
        ip, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0 and check:
        first = err.decode("utf-8", "replace").strip().splitlines()[:1]
        raise OSError(f"ip {' '.join(args)}: {first[0] if first else proc.returncode}")
    return out.decode("utf-8", "replace")


async def remove_leftovers(rec: ExitRoutingRecord, ip: str = "ip") -> None:
    """Delete the exit routing a crashed run left (its rules and its table's routes); OSError if ``ip``
    fails."""
    for fam in ("-4", "-6"):
        try:
            rules = json.loads(await _ip(ip, ["-j", fam, "rule", "show"]) or "[]")
        except ValueError:
            raise OSError(f"ip -j {fam} rule show: not JSON; is iproute2 too old?") from None
        for args in leftover_deletes(fam, rules, rec):
            await _ip(ip, args)
        # the table's routes ("default dev <wg>") went with the interface; an empty table is "not found"
        await _ip(ip, [fam, "route", "flush", "table", str(rec.table)], check=False)


class ExitRouting:
    """Policy routing for the chosen exit node on one interface (the I/O edge)."""

    def __init__(
        self,
        ifname: str,
        always_bypass: Iterable[str] = (),
        ip: str = "ip",
        journal: HostJournal | None = None,
    ) -> None:
        self.ifname = ifname
        self.always = frozenset(str(ipaddress.ip_address(a)) for a in always_bypass)
        self.ip = ip
        self.active = False
        self.bypass: frozenset[str] = frozenset()
        self._journal = journal  # None: nothing journaled (tests that run it alone)

    async def _run(self, args: list[str], *, check: bool = True) -> None:
        await _ip(self.ip, args, check=check)

    async def apply(self, active: bool, endpoints: frozenset[str]) -> None:
        """Exit routing on while ``active``, bypassing ghostmesh and ``endpoints``; idempotent."""
        want = self.always | endpoints
        if active and not self.active:
            if self._journal is not None:  # before the first rule: a crash from here on is undone
                await asyncio.to_thread(self._journal.record_exit_routing, RECORD)
            self.active, self.bypass = True, want
            try:
                for args in commands(self.ifname, "add", want):
                    await self._run(args)
            except OSError:
                await self._off()  # what of it was added goes again; the next map tries anew
                raise
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
        if self._journal is not None:
            await asyncio.to_thread(self._journal.record_exit_routing, None)
        log.info("exit node no longer in use: default route restored")

    async def close(self) -> None:
        if self.active:
            await self._off()
