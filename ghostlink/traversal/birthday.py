"""Birthday probing, the I/O edge: probe sockets, the spray, and the route that hands a hit to WireGuard.

The decisions are :mod:`ghostlink.traversal.birthday_core`'s (read its docstring for the why and the
numbers); this module carries out its actions for one node:

* ``OpenProbes``/``CloseProbes`` (the hard side): up to K non-blocking UDP sockets on ephemeral ports,
  one probe sent from each to every target, read through ``loop.add_reader``; a datagram that is a
  genuine probe from the peer (its tag checks out) and comes from a target is a hit;
* ``Spray`` (the easy side): probes sent from WireGuard's own port through the shared raw socket
  (:meth:`ghostlink.traversal.stunport.SharedPort.send_raw`), so the easy side's router maps them
  exactly as it maps WireGuard's packets;
* ``UseRoute``/``DropRoute`` (the hard side, after a hit): WireGuard cannot send one peer's packets from
  another port (wireguard-go binds one UDP port for all peers), so nftables does it: the table
  ``inet ghostlink_bd_<ifname>`` (:func:`render`) source-NATs packets from WireGuard's port to the easy
  side's endpoint to the probe socket's port L (``masquerade to :L``; the socket is closed first). The
  hard side's router keys its mapping on the inner 5-tuple (our address:L -> the easy side), which is
  the probe socket's, so it reuses the public port P the probe hit and the packets reach the easy side,
  whose router lets them in (it sprayed to P). The answers come back to L and the same conntrack
  entry turns them back into packets to WireGuard's port (WireGuard and our raw socket see them).

Why a conntrack zone per route: this host's conntrack already has entries for the probe socket's flow
(our address:L -> the easy side) and for the connectivity checks we sent from WireGuard's port to the
easy side before the hit (unNATed); a new rule never applies to an existing entry, and the SNAT to L
would clash with the probe socket's entry. Setting ``ct zone`` on exactly these packets (raw priority,
before conntrack, both directions) starts them in a fresh table of flows where neither exists: no
entry to delete, no conntrack tool or netlink code needed. The zone number is L itself: an entry an
earlier route (or a crashed run's) left in a zone, kept alive by our own checks, would otherwise go on
translating to that route's old port; in zone L any entry left over translates to L, the port wanted.

Everything in the table is rewritten in one ``nft -f -`` transaction (atomic), the table is journaled
(:mod:`ghostlink.hostjournal`) before it is created and deleted when the last route goes and on close;
a crashed run's table is removed by :mod:`ghostlink.leftovers`. IPv4 only: IPv6 paths need no NAT
traversal of this kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any

from ghostcore.addr import HostPort, format_endpoint
from ghostcore.errors import InvalidArgument
from ghostcore.keys import PublicKey
from ghostlink import nft
from ghostlink.hostjournal import HostJournal
from ghostlink.nodekey import NodeKey
from ghostlink.traversal import birthday_core as core
from ghostlink.traversal.birthday_core import Birthday

log = logging.getLogger(__name__)

DEFAULT_TABLE = "ghostlink_bd"
MAX_FLUSH = 8


def table_for(ifname: str) -> str:
    return nft.table_name(ifname).replace("ghostlink_", "ghostlink_bd_", 1)


def render(table: str, wg_port: int, routes: Sequence[core.UseRoute]) -> str:
    """The whole route table (or its deletion when there is no route), as one ``nft -f -`` script."""
    script = f"add table inet {table}\ndelete table inet {table}\n"
    if not routes:
        return script
    zone_out, zone_in, snat = [], [], []
    for r in routes:
        ip, port = r.remote
        if ":" in ip:
            raise ValueError(f"route to {ip}: IPv4 only")
        match = f"ip daddr {ip} udp sport {wg_port} udp dport {port}"
        zone_out.append(f"        {match} ct zone set {r.local_port}")
        back = f"ip saddr {ip} udp sport {port} udp dport {r.local_port}"
        zone_in.append(f"        {back} ct zone set {r.local_port}")
        snat.append(f"        ct zone {r.local_port} {match} masquerade to :{r.local_port}")
    chains = [
        ("zone_out", "type filter hook output priority raw", zone_out),
        ("zone_in", "type filter hook prerouting priority raw", zone_in),
        ("route_out", "type nat hook postrouting priority srcnat", snat),
    ]
    body = "".join(
        f"    chain {name} {{\n        {hook}; policy accept;\n" + "\n".join(lines) + "\n    }\n"
        for name, hook, lines in chains
    )
    return script + f"add table inet {table} {{\n{body}}}\n"


class BirthdayProber:
    """Birthday probing for one node. ``send(payload, dst)`` sends from WireGuard's port;
    ``on_route(key, remote)`` is told when WireGuard's packets to ``remote`` now take a routed port."""

    def __init__(
        self,
        *,
        wg_port: int,
        keys: NodeKey,
        send: Callable[[bytes, HostPort], bool],
        on_route: Callable[[str, HostPort], None],
        table: str = DEFAULT_TABLE,
        journal: HostJournal | None = None,
        nft_binary: str = "nft",
        birthday: Birthday | None = None,
    ) -> None:
        self.core = birthday or Birthday()
        self._wg_port = wg_port
        self._keys = keys
        self._send = send
        self._on_route = on_route
        self._table = table
        self._journal = journal
        self._nft = nft_binary
        self._loop = asyncio.get_running_loop()
        self._socks: dict[str, list[socket.socket]] = {}
        self._probe_keys: dict[str, bytes] = {}
        self._lock = asyncio.Lock()
        self._table_up = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.counters: dict[str, int] = {"sprayed": 0, "probes_sent": 0, "hits": 0, "bad_probes": 0}

    def _probe_key(self, key: str) -> bytes | None:
        cached = self._probe_keys.get(key)
        if cached is None:
            try:
                secret = self._keys.private.exchange(PublicKey.from_base64(key))
            except InvalidArgument:
                return None  # a low-order or malformed key: no shared secret, no probing
            cached = self._probe_keys[key] = core.probe_key(secret)
        return cached

    def set_mapping(self, mapping: str) -> None:
        """Our NAT's mapping behaviour, from the latest netcheck."""
        self.core.mapping = mapping

    def set_peer(self, key: str, candidates: Iterable[HostPort], now: float) -> None:
        self.core.set_peer(key, candidates, now)

    def remove_peer(self, key: str) -> None:
        self._probe_keys.pop(key, None)
        self.run(self.core.remove_peer(key))

    def step(self, direct: Mapping[str, bool], now: float) -> float | None:
        """Fold in which peers are direct, act on what is due; when to step again (None: no plan)."""
        for key, is_direct in direct.items():
            self.run(self.core.set_direct(key, is_direct, now))
        self.run(self.core.poll(now))
        return self.core.next_due(now)

    def rekey(self) -> None:
        """The node key changed: the shared secrets are derived afresh."""
        self._probe_keys.clear()

    def run(self, actions: Iterable[core.Action]) -> None:
        for act in actions:
            if isinstance(act, core.OpenProbes):
                self._open(act)
            elif isinstance(act, core.CloseProbes):
                self._close_probes(act.key)
            elif isinstance(act, core.Spray):
                self._spray(act)
            else:  # UseRoute / DropRoute: the table follows the core's routes
                if isinstance(act, core.UseRoute):
                    log.info(
                        "peer %s…: birthday probe hit, WireGuard to %s leaves from port %d",
                        act.key[:8],
                        format_endpoint(*act.remote),
                        act.local_port,
                    )
                else:
                    log.info("peer %s…: birthday route dropped", act.key[:8])
                self._spawn(self._sync_table(act))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _spray(self, act: core.Spray) -> None:
        pkey = self._probe_key(act.key)
        if pkey is None:
            return
        payload = core.probe(pkey, self._keys.public.raw)
        for dst in act.dsts:
            if self._send(payload, dst):
                self.counters["sprayed"] += 1

    def _open(self, act: core.OpenProbes) -> None:
        pkey = self._probe_key(act.key)
        if pkey is None:
            return
        self._close_probes(act.key)
        socks: list[socket.socket] = []
        self._socks[act.key] = socks
        payload = core.probe(pkey, self._keys.public.raw)
        for _ in range(act.count):
            try:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            except OSError as exc:  # out of descriptors: probe with what is open
                log.debug("birthday probe socket: %s", exc)
                break
            try:
                sock.setblocking(False)
                sock.bind(("0.0.0.0", 0))
                self._loop.add_reader(sock.fileno(), self._readable, act.key, sock)
            except OSError:
                sock.close()
                break
            socks.append(sock)
            for dst in act.targets:
                with contextlib.suppress(OSError):  # UDP: a lost probe is a smaller birthday
                    sock.sendto(payload, dst)
                    self.counters["probes_sent"] += 1
        log.info(
            "peer %s…: birthday round, %d probe sockets toward %s",
            act.key[:8],
            len(socks),
            ", ".join(format_endpoint(*t) for t in act.targets),
        )

    def _readable(self, key: str, sock: socket.socket) -> None:
        for _ in range(8):  # bounded per wake-up
            if sock not in self._socks.get(key, ()):
                return
            try:
                data, src = sock.recvfrom(256)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            pkey = self._probe_key(key)
            raw = PublicKey.from_base64(key).raw
            if pkey is None or core.verify(data, {raw: pkey}) is None:
                self.counters["bad_probes"] += 1
                continue
            self.counters["hits"] += 1
            port = sock.getsockname()[1]
            self.run(self.core.hit(key, port, (src[0], src[1]), self._loop.time()))
            return

    def _close_probes(self, key: str) -> None:
        for sock in self._socks.pop(key, []):
            with contextlib.suppress(ValueError, RuntimeError):
                self._loop.remove_reader(sock.fileno())
            sock.close()

    async def _sync_table(self, act: core.UseRoute | core.DropRoute) -> None:
        async with self._lock:
            routes = self.core.routes()
            if not routes and not self._table_up:
                return
            try:
                if routes and not self._table_up and self._journal is not None:
                    await asyncio.to_thread(self._journal.record_route_table, self._table)
                await nft.run_script(self._nft, render(self._table, self._wg_port, routes), "birthday routes")
            except OSError as exc:
                log.warning("birthday routes not applied: %s", exc)
                return
            self._table_up = bool(routes)
            if not routes and self._journal is not None:
                await asyncio.to_thread(self._journal.record_route_table, "")
        if isinstance(act, core.UseRoute) and act in routes:
            self._on_route(act.key, act.remote)

    async def flush(self) -> None:
        """Wait until the table writes started so far are done."""
        for _ in range(MAX_FLUSH):  # a write can start another (a hit during a write): bounded
            if not self._tasks:
                return
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        """Close the probe sockets and remove the table (after the writes in progress: none is lost)."""
        for key in list(self._socks):
            self._close_probes(key)
        await self.flush()
        if self._table_up:
            try:
                await nft.run_script(self._nft, render(self._table, self._wg_port, []), "birthday routes")
            except OSError as exc:
                log.warning("removing the birthday routes failed: %s", exc)
                return
            self._table_up = False
            if self._journal is not None:
                await asyncio.to_thread(self._journal.record_route_table, "")
