"""ghostgate's Prometheus metrics and readiness, read at scrape time from the counters the TURN core, the
TURN edge and the relay hub already keep (nothing is counted twice, nothing is added to a hot path beyond
the byte counts beside the packet counts those cores keep).

Every label set is bounded: counter names and refusal reasons are fixed in the code (``error_<code>`` is
bounded by the STUN error codes the core sends), transports are ``quic`` and ``tcp``. No node key, user
name or address ever becomes a label.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from ghostcore.metrics_http import FuncCollector, MetricsServer, start_metrics
from ghostgate.config import GateConfig
from ghostgate.quic import RelayQuicProtocol
from ghostgate.relay import RelayServer
from ghostgate.stream import RelayTlsProtocol
from ghostgate.turn_edge import TurnEdge

# TURN core counters shown as their own families; the rest are events and refusals by reason.
_TURN_PACKETS = {"relayed_to_peer": "to_peer", "relayed_to_client": "to_client"}
_TURN_BYTES = {"relayed_to_peer_bytes": "to_peer", "relayed_to_client_bytes": "to_client"}
# TURN requests refused: the reason label is the counter's name (each a fixed string of turn_core).
_TURN_REFUSALS = (
    "auth_failed", "stale_nonce", "not_current", "quota_refused", "denied_peer", "allocation_mismatch",
    "turn_disabled", "relay_bind_failed",
)  # fmt: skip
# Relay refusals: a connection not admitted (relay_hub.Admission) or dropped by the core.
_RELAY_SPECIAL = {"forwarded", "forwarded_bytes", "connections", "authenticated"}


def collect(turn: TurnEdge, relay: RelayServer | None) -> Iterable[Metric]:
    """The metric families of one running ghostgate."""
    core = turn.core
    allocations = GaugeMetricFamily("ghostgate_turn_allocations", "TURN allocations in force")
    allocations.add_metric([], len(core.allocations))
    yield allocations
    packets = CounterMetricFamily(
        "ghostgate_turn_packets", "Packets relayed through TURN allocations", labels=["direction"]
    )
    octets = CounterMetricFamily(
        "ghostgate_turn_bytes", "Payload bytes relayed through TURN allocations", labels=["direction"]
    )
    for key, direction in _TURN_PACKETS.items():
        packets.add_metric([direction], core.counters[key])
    for key, direction in _TURN_BYTES.items():
        octets.add_metric([direction], core.counters[key])
    yield packets
    yield octets
    refused = CounterMetricFamily("ghostgate_turn_refusals", "TURN requests refused", labels=["reason"])
    for reason in _TURN_REFUSALS:
        refused.add_metric([reason], core.counters[reason])
    yield refused
    shown = {*_TURN_PACKETS, *_TURN_BYTES, *_TURN_REFUSALS}
    events = CounterMetricFamily("ghostgate_turn_events", "Other STUN/TURN server events", labels=["event"])
    for key, value in sorted({**core.counters, **turn.counters}.items()):
        if key not in shown:
            events.add_metric([key], value)
    yield events
    if relay is None:
        return
    hub = relay.hub
    sessions = GaugeMetricFamily(
        "ghostgate_relay_sessions", "Open node-relay connections by transport", labels=["transport"]
    )
    quic = sum(1 for e in hub.live.values() if isinstance(e, RelayQuicProtocol))
    tcp = sum(1 for e in hub.live.values() if isinstance(e, RelayTlsProtocol))
    sessions.add_metric(["quic"], quic)
    sessions.add_metric(["tcp"], tcp)
    yield sessions
    stats = hub.stats()
    for name, key, doc in (
        ("ghostgate_relay_packets", "forwarded", "WireGuard packets forwarded between relay clients"),
        (
            "ghostgate_relay_bytes",
            "forwarded_bytes",
            "Bytes of the packets forwarded",
        ),
        ("ghostgate_relay_connections", "connections", "Relay connections accepted by the core"),
        ("ghostgate_relay_authenticated", "authenticated", "Relay connections that proved a node key"),
    ):
        family = CounterMetricFamily(name, doc)
        family.add_metric([], stats.get(key, 0))
        yield family
    other = CounterMetricFamily(
        "ghostgate_relay_events", "Relay refusals, drops and other events, by name", labels=["event"]
    )
    for key, value in sorted(stats.items()):
        if key not in _RELAY_SPECIAL:
            other.add_metric([key], value)
    yield other


def registry(turn: TurnEdge, relay: RelayServer | None) -> CollectorRegistry:
    """A registry of its own (never the process-wide default) reading this gate at each scrape."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(FuncCollector(lambda: collect(turn, relay)))
    return reg


def ready(turn: TurnEdge, relay: RelayServer | None, relay_wanted: bool) -> str:
    """ "" when the listeners are up, else why not (for ``/readyz``)."""
    if turn.sock.fileno() < 0:
        return "STUN/TURN socket closed"
    if relay_wanted and relay is None:
        return "relay listeners not started"
    if relay is not None and relay.hub.closed:
        return "relay stopping"
    return ""


async def serve(cfg: GateConfig, turn: TurnEdge, relay: RelayServer | None) -> MetricsServer | None:
    """``[metrics]``: the listener for this gate, or None when ``metrics.listen`` is empty. The relay is
    wanted when the gate has a secret (TURN's), which is when the app starts it."""
    if not cfg.metrics.listen:
        return None
    wanted = relay is not None
    return await start_metrics(cfg.metrics.listen, registry(turn, relay), lambda: ready(turn, relay, wanted))
