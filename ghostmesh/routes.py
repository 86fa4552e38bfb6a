"""Subnet routes and exit nodes: validation, the route table and primary election. PURE (no I/O).

A route is a ``(node, prefix)`` pair (:class:`~ghostmesh.store.base.RouteRec`): *advertised* by the node
itself (``ghostlink --advertise-routes``, sent whole in every ``StatusReport``) and/or by an admin on its
behalf (``ghostctl route add``), and *approved* by an admin or by an auto-approver of the policy
(``[auto_approvers]``, :meth:`ghostcore.policy.model.Policy.auto_approves`). Only an advertised AND
approved route is served.

Primary election (Tailscale's "subnet router failover"): for each prefix, among the nodes serving it that
are online, exactly one is primary, and only the primary carries the prefix in its ``allowed_ips`` (a
WireGuard allowed-ip names one peer, so two routers cannot both carry it). The election is stable: the
current primary keeps the prefix while it is online and serving; when it goes offline (or stops serving)
the serving online node with the lowest id takes over. Every call returns the ids of the nodes whose set
of primary routes changed, so a failover costs two ``NodeChanged`` records, never a recompute of the world.

Exit nodes: the prefixes ``0.0.0.0/0`` and ``::/0``. They have no primary (every client chooses its own
exit node); a node serving either one is an exit node.

:func:`validate_prefix` refuses garbage (strictly, :mod:`ghostcore.addr`: no zone ID, whitespace or control
character), prefixes with host bits set and prefixes overlapping the overlay ranges (the mesh's own
addresses must never be routed to a subnet router).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence

from ghostcore import addr
from ghostcore.errors import InvalidArgument
from ghostmesh.store.base import RouteRec

IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network
EXIT_PREFIXES = ("0.0.0.0/0", "::/0")
MAX_ROUTES = 64  # per node and report: a bound on what one node may make the server store


def is_exit(prefix: str) -> bool:
    return prefix in EXIT_PREFIXES


def validate_prefix(text: str, overlay: Sequence[IPNet]) -> str:
    """``text`` as a canonical prefix; ``InvalidArgument`` (one line) when it cannot be a route.

    Parsed as a person writes it (:func:`ghostcore.addr.normalize_prefix`: ``2001:DB8:1:0::/64`` is
    fine), and as strictly: whitespace, control characters and zone IDs are refused, never stripped.
    """
    loose = addr.normalize_prefix(text, "route", host_bits=True)  # garbage, zone IDs...: AddressError
    try:
        addr.normalize_prefix(text, "route")  # it parsed above, so only host bits can fail here
    except addr.AddressError:
        raise InvalidArgument(
            f"invalid route {text[:60]!r}: host bits are set; did you mean {loose}?"
        ) from None
    net = ipaddress.ip_network(loose)
    if net.prefixlen == 0:
        return loose  # an exit node: "everything" necessarily contains the overlay, that is fine
    for o in overlay:
        if o.version == net.version and net.overlaps(o):
            raise InvalidArgument(
                f"route {net} overlaps the overlay range {o}; a subnet route must lie outside the mesh's "
                "own addresses"
            )
    return loose


class RouteTable:
    """All route rows in memory, indexed by node and by prefix, with each prefix's primary."""

    def __init__(self, recs: Iterable[RouteRec] = ()) -> None:
        self._recs: dict[tuple[int, str], RouteRec] = {}
        self._by_node: dict[int, set[str]] = {}
        self._by_prefix: dict[str, set[int]] = {}
        self._primary: dict[str, int] = {}  # prefix -> node id
        self._primaries_of: dict[int, set[str]] = {}  # node id -> prefixes it is primary for
        for r in recs:
            self._put(r)

    # -- rows ------------------------------------------------------------------------------------------

    def get(self, node_id: int, prefix: str) -> RouteRec | None:
        return self._recs.get((node_id, prefix))

    def of_node(self, node_id: int) -> list[RouteRec]:
        return [self._recs[(node_id, p)] for p in sorted(self._by_node.get(node_id, ()))]

    def all(self) -> list[RouteRec]:
        return [self._recs[k] for k in sorted(self._recs)]

    def _put(self, r: RouteRec) -> None:
        self._recs[(r.node_id, r.prefix)] = r
        self._by_node.setdefault(r.node_id, set()).add(r.prefix)
        self._by_prefix.setdefault(r.prefix, set()).add(r.node_id)

    def _drop(self, node_id: int, prefix: str) -> None:
        self._recs.pop((node_id, prefix), None)
        prefixes = self._by_node.get(node_id)
        if prefixes is not None:
            prefixes.discard(prefix)
            if not prefixes:
                del self._by_node[node_id]
        nodes = self._by_prefix.get(prefix)
        if nodes is not None:
            nodes.discard(node_id)
            if not nodes:
                del self._by_prefix[prefix]

    def put(self, r: RouteRec) -> None:
        """Insert or replace a row (call :meth:`elect` for its prefix afterwards)."""
        self._put(r)

    def drop(self, node_id: int, prefix: str) -> None:
        self._drop(node_id, prefix)

    # -- serving, primaries, exit nodes ----------------------------------------------------------------

    def serving(self, prefix: str) -> list[int]:
        """Nodes with ``prefix`` advertised and approved."""
        out = []
        for nid in self._by_prefix.get(prefix, ()):
            r = self._recs[(nid, prefix)]
            if r.advertised and r.approved:
                out.append(nid)
        return sorted(out)

    def primary(self, prefix: str) -> int | None:
        return self._primary.get(prefix)

    def primary_routes(self, node_id: int) -> tuple[str, ...]:
        return tuple(sorted(self._primaries_of.get(node_id, ())))

    def approved_routes(self, node_id: int) -> tuple[str, ...]:
        """The subnet routes (not exit routes) the node advertises with approval, primary or not."""
        out = []
        for p in sorted(self._by_node.get(node_id, ())):
            r = self._recs[(node_id, p)]
            if r.advertised and r.approved and not is_exit(p):
                out.append(p)
        return tuple(out)

    def is_exit_node(self, node_id: int) -> bool:
        for p in EXIT_PREFIXES:
            r = self._recs.get((node_id, p))
            if r is not None and r.advertised and r.approved:
                return True
        return False

    def prefixes_of(self, node_id: int) -> set[str]:
        return set(self._by_node.get(node_id, ()))

    def elect(self, prefixes: Iterable[str], online: Callable[[int], bool]) -> set[int]:
        """Re-elect the primary of each prefix; returns the nodes whose primary routes changed."""
        changed: set[int] = set()
        for prefix in prefixes:
            if is_exit(prefix):
                continue
            current = self._primary.get(prefix)
            candidates = [n for n in self.serving(prefix) if online(n)]
            if current in candidates:
                continue  # stable: a primary keeps its prefix while it is online and serving
            new = candidates[0] if candidates else None  # deterministic: the lowest node id
            if current is not None:
                self._primaries_of[current].discard(prefix)
                if not self._primaries_of[current]:
                    del self._primaries_of[current]
                del self._primary[prefix]
                changed.add(current)
            if new is not None:
                self._primary[prefix] = new
                self._primaries_of.setdefault(new, set()).add(prefix)
                changed.add(new)
        return changed

    def forget_node(self, node_id: int, online: Callable[[int], bool]) -> set[int]:
        """Drop every row of a deleted node and re-elect its prefixes; returns the nodes that changed."""
        prefixes = self.prefixes_of(node_id)
        for p in prefixes:
            self._drop(node_id, p)
        changed = self.elect(prefixes, online)
        changed.discard(node_id)
        return changed
