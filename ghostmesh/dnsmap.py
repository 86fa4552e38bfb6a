"""The DNS settings every node's map carries (``MapUpdate.dns``), built from ``[dns]``. PURE.

The settings are the same for every node: the mapper sends this one message in each full map. Peer names
are not in it: each node answers ``<peer>.<base_domain>`` from the peers its own map lists, so a peer the
policy hides from a node is not in that node's DNS either, and a rename reaches DNS with the delta that
carries it.

Built at start, and again when a reload (:mod:`ghostmesh.reload`, on SIGHUP) finds ``[dns]`` changed:
:func:`dns_changes` names the keys that differ, for the audit row.
"""

from __future__ import annotations

from dataclasses import fields

from ghostcore.pb.ghostmesh.v1 import coordination_pb2 as pb
from ghostmesh.config import DnsConfig


def dns_map(cfg: DnsConfig) -> pb.DnsConfig | None:
    """``[dns]`` as sent to nodes; None when nothing is set (the map then carries no DNS settings)."""
    if not cfg.enabled:
        return None
    return pb.DnsConfig(
        magic_dns=cfg.magic_dns,
        base_domain=cfg.base_domain,
        nameservers=cfg.nameservers,
        split=[pb.SplitDns(domain=d, servers=s) for d, s in sorted(cfg.split.items())],
        search_domains=cfg.search_domains,
        extra_records=[pb.DnsRecord(name=r.name, type=r.type, value=r.value) for r in cfg.records()],
    )


def dns_changes(old: DnsConfig, new: DnsConfig) -> list[str]:
    """The ``[dns]`` keys whose (canonical) values differ between ``old`` and ``new``, in schema order:
    what an audit row of a reload names (keys, not values)."""

    def value(cfg: DnsConfig, key: str) -> object:
        return cfg.records() if key == "extra_records" else getattr(cfg, key)  # records canonical

    return [f.name for f in fields(DnsConfig) if value(old, f.name) != value(new, f.name)]
