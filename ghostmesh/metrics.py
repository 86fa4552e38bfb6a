"""ghostmesh's Prometheus metrics and readiness, read at scrape time from what the server already holds:
the registry (nodes by state), the hub (open map streams, policy compiles, change -> fan-out latency
buckets), the config reloads by result, the mapper's work counters
(maps and deltas sent, their bytes), the limits' refusal counters, the call guard's calls by method and the
audit log's last sequence number.

Scraping costs one pass over the nodes in memory and one indexed read of the audit log; the hot paths
only bump integers they had (or, for maps sent, one per message written). Labels are bounded: node states,
refusal kinds and gRPC method names are fixed in the code; no node name, key or address is ever a label.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from ghostcore.metrics_http import FuncCollector
from ghostmesh.api.guard import CallGuard
from ghostmesh.hub import Hub
from ghostmesh.reload import ConfigReloader
from ghostmesh.store.base import Store

NODE_STATES = ("online", "offline", "expired")


def collect(
    hub: Hub, store: Store, guard: CallGuard | None, reloader: ConfigReloader | None = None
) -> Iterable[Metric]:
    """The metric families of one running ghostmesh."""
    now = hub.now()
    state = hub.state
    counts = dict.fromkeys(NODE_STATES, 0)
    for node in state.list_nodes():
        if node.expired(now):
            counts["expired"] += 1
        else:
            counts["online" if state.is_online(node.id) else "offline"] += 1
    nodes = GaugeMetricFamily("ghostmesh_nodes", "Registered nodes by state", labels=["state"])
    for name, value in counts.items():
        nodes.add_metric([name], value)
    yield nodes
    streams = GaugeMetricFamily("ghostmesh_map_streams", "Open map (Sync) streams")
    streams.add_metric([], hub.stream_count)
    yield streams
    stats = hub.mapper.stats
    for name, value, doc in (
        ("ghostmesh_map_full_sent", stats.full_maps_sent, "Full maps sent to nodes"),
        ("ghostmesh_map_full_sent_bytes", stats.full_map_bytes, "Bytes of the full maps sent"),
        ("ghostmesh_map_deltas_sent", stats.deltas_sent, "Map deltas sent to nodes"),
        ("ghostmesh_map_deltas_sent_bytes", stats.delta_bytes, "Bytes of the map deltas sent"),
        ("ghostmesh_policy_compiles", hub.policy_compiles, "Policies put in force and compiled"),
    ):
        family = CounterMetricFamily(name, doc)
        family.add_metric([], value)
        yield family
    compile_time = GaugeMetricFamily(
        "ghostmesh_policy_compile_seconds", "How long the policy in force took to compile into the mapper"
    )
    compile_time.add_metric([], hub.policy_compile_seconds)
    yield compile_time
    fanout = HistogramMetricFamily(
        "ghostmesh_fanout_latency_seconds",
        "From a change waking a map stream to the delta written to it (the batch delay included)",
    )
    fanout.add_metric([], hub.fanout_latency.cumulative(), sum_value=hub.fanout_latency.total)
    yield fanout
    refusals = CounterMetricFamily(
        "ghostmesh_refusals", "Requests refused or folded by a limit, by kind", labels=["kind"]
    )
    for field in dataclasses.fields(hub.limits.refusals):
        refusals.add_metric([field.name], getattr(hub.limits.refusals, field.name))
    yield refusals
    if guard is not None:
        calls = CounterMetricFamily("ghostmesh_rpc_calls", "gRPC calls by method", labels=["method"])
        failures = CounterMetricFamily(
            "ghostmesh_rpc_failures", "gRPC calls ended by an error, by method", labels=["method"]
        )
        for method, value in sorted(guard.calls.items()):
            calls.add_metric([method], value)
        for method, value in sorted(guard.failures.items()):
            failures.add_metric([method], value)
        yield calls
        yield failures
    if reloader is not None:
        reloads = CounterMetricFamily(
            "ghostmesh_config_reloads",
            "Config file reloads (SIGHUP) by result: applied, unchanged, refused",
            labels=["result"],
        )
        for result, value in reloader.counts.items():
            reloads.add_metric([result], value)
        yield reloads
    last = store.last_audit()
    audit = CounterMetricFamily("ghostmesh_audit_entries", "Audit log entries written (the last sequence)")
    audit.add_metric([], last.seq if last is not None else 0)
    yield audit


def registry(
    hub: Hub, store: Store, guard: CallGuard | None, reloader: ConfigReloader | None = None
) -> CollectorRegistry:
    """A registry of its own (never the process-wide default) reading this server at each scrape."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(FuncCollector(lambda: collect(hub, store, guard, reloader)))
    return reg


def ready(hub: Hub) -> str:
    """ "" while the database is open and changes commit, else why not (for ``/readyz``)."""
    if hub.broken.is_set():
        return f"database: {hub.broken_reason}"
    if hub.stopping:
        return "stopping"
    if not hub.started:
        return "starting"
    return ""
