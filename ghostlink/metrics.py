"""ghostlink's Prometheus metrics and readiness: the peers by the path their packets take, path switches
(endpoint changes the daemon applied, and those it put back after WireGuard roamed), the peers' round
trips (a gauge histogram per path kind), how old the peers' WireGuard handshakes are, the control
connection (connected, map streams opened, the map's serial) and the home relay's transport.

The peers' view needs WireGuard's counters, which only an await reads, so :class:`LinkMetrics` refreshes one
snapshot per scrape (``refresh``) and the collector reads that snapshot; nothing runs between scrapes.
Labels are bounded: path kinds and relay transports are fixed strings; no peer name or key is a label
(the handshake ages are summed up as the oldest and a count of stale ones).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    Metric,
)

from ghostcore.latency import Buckets
from ghostcore.metrics_http import FuncCollector, MetricsServer, start_metrics
from ghostlink.daemon import Daemon
from ghostlink.status import PeerStatus

PATH_KINDS = ("direct", "relay", "turn", "none")
TRANSPORTS = ("quic", "tcp")
# WireGuard rekeys every 2 minutes while traffic flows (REKEY_AFTER_TIME); a handshake older than
# REJECT_AFTER_TIME (180 s) means the session is gone until traffic starts one again.
STALE_HANDSHAKE = 180.0


class LinkMetrics:
    """The registry of one ghostlink and the peer snapshot it reads."""

    def __init__(self, daemon: Daemon, clock: Callable[[], float] = time.time) -> None:
        self.daemon = daemon
        self.clock = clock
        self.peers: list[PeerStatus] = []
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(FuncCollector(self.collect))

    async def refresh(self) -> None:
        self.peers = await self.daemon.peers() if self.daemon.device_up else []

    def collect(self) -> Iterable[Metric]:
        status = self.daemon.status()
        connected = GaugeMetricFamily("ghostlink_connected", "1 while a map stream from ghostmesh is open")
        connected.add_metric([], 1 if status.connected else 0)
        yield connected
        sessions = CounterMetricFamily(
            "ghostlink_control_sessions",
            "Map streams opened to ghostmesh (each after the first: a reconnect)",
        )
        sessions.add_metric([], status.sessions)
        yield sessions
        for name, count, doc in (
            (
                "ghostlink_path_switches",
                self.daemon.endpoint_switches,
                "Peer endpoints changed in WireGuard",
            ),
            (
                "ghostlink_endpoint_reasserts",
                self.daemon.endpoint_reasserts,
                "Endpoints set again after WireGuard roamed away from the chosen path",
            ),
        ):
            family = CounterMetricFamily(name, doc)
            family.add_metric([], count)
            yield family
        serial = GaugeMetricFamily("ghostlink_map_serial", "Serial of the last map received")
        serial.add_metric([], status.map_serial)
        yield serial
        kinds = dict.fromkeys(PATH_KINDS, 0)
        now = self.clock()
        oldest = 0.0
        stale = 0
        for peer in self.peers:
            kinds[peer.path.kind if peer.path.kind in kinds else "none"] += 1
            if peer.latest_handshake_unix <= 0:
                stale += 1
                continue
            age = max(0.0, now - peer.latest_handshake_unix)
            oldest = max(oldest, age)
            stale += age > STALE_HANDSHAKE
        yield _rtt_family(self.peers)
        peers = GaugeMetricFamily("ghostlink_peers", "Installed peers by the path they take", labels=["path"])
        for kind, count in kinds.items():
            peers.add_metric([kind], count)
        yield peers
        age_family = GaugeMetricFamily(
            "ghostlink_peer_handshake_age_max_seconds", "Age of the oldest WireGuard handshake among peers"
        )
        age_family.add_metric([], oldest)
        yield age_family
        stale_family = GaugeMetricFamily(
            "ghostlink_peers_handshake_stale",
            f"Peers with no handshake or one older than {STALE_HANDSHAKE:g}s",
        )
        stale_family.add_metric([], stale)
        yield stale_family
        relay = self.daemon.relay_status()
        home = GaugeMetricFamily(
            "ghostlink_relay_home_connected",
            "1 for the transport the home relay is reached over",
            labels=["transport"],
        )
        for transport in TRANSPORTS:
            home.add_metric([transport], 1 if relay.home_transport == transport else 0)
        yield home
        region = GaugeMetricFamily("ghostlink_relay_home_region", "The home relay region's id (0: none)")
        region.add_metric([], relay.home_region)
        yield region


RTT_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


def _rtt_family(peers: list[PeerStatus]) -> Metric:
    """The peers' current round trips as a gauge histogram per path kind: a direct path's last check,
    a relayed one's round trip to its relay (what this node can measure); unknown ones are left out."""
    family = GaugeHistogramMetricFamily(
        "ghostlink_peer_rtt_seconds",
        "Peers' current round trips: a direct path's last check, a relayed path's to its relay",
        labels=["path"],
    )
    by_kind = {kind: Buckets(RTT_BOUNDS) for kind in PATH_KINDS if kind != "none"}
    for peer in peers:
        buckets = by_kind.get(peer.path.kind)
        if buckets is not None and peer.path.latency_ms >= 0:
            buckets.observe(peer.path.latency_ms / 1000.0)
    for kind, buckets in by_kind.items():
        family.add_metric([kind], buckets.cumulative(), gsum_value=buckets.total)
    return family


def ready(daemon: Daemon) -> str:
    """ "" once WireGuard is up and a map stream is open, else why not (for ``/readyz``)."""
    if not daemon.device_up:
        return "WireGuard device not up"
    if not daemon.status().connected:
        return "not connected to ghostmesh"
    return ""


async def serve(listen: str, daemon: Daemon) -> MetricsServer | None:
    """``metrics.listen`` (``--metrics-listen``): the listener, or None when it is empty."""
    if not listen:
        return None
    view = LinkMetrics(daemon)
    return await start_metrics(listen, view.registry, lambda: ready(daemon), refresh=view.refresh)
