"""Port mapping of WireGuard's port on the node's gateway, the pure state machine.

What ghostlink asks its gateway for, and when: a UDP mapping of WireGuard's port, tried with PCP
(RFC 6887) first, then NAT-PMP (RFC 6886), then UPnP IGD (the edge runs that one: SSDP and SOAP are not
datagrams this core can shape); the mapping renewed before it expires, deleted on exit; the public
endpoint it gives (``external``) offered to peers as a candidate. A mapped endpoint accepts packets from
anyone (the router forwards it like a public host's port), so a peer behind a symmetric NAT, whose
source port nobody can predict, still reaches us, and we learn its real source from its check: that is
what turns hard <-> hard into a direct path when one side has a mapping.

Timing, and why:

* each protocol gets ``ATTEMPTS`` requests at 0, 0.25 and 0.75 s (RFC 6886 §3.1 starts at 250 ms and
  doubles; we stop after three, ~1.75 s, instead of nine over 64 s: a gateway that is silent that long
  does not speak the protocol, and the next one is worth trying sooner); an answer that refuses
  (not authorized, unsupported version or opcode, ...) moves to the next protocol at once;
* when every protocol failed, nothing is sent for ``retry_after`` (10 min, doubling to 1 h): a router
  with mapping off costs a handful of packets per hour, never a storm;
* a granted mapping is renewed at half its lifetime (RFC 6886 §3.3; RFC 6887 §11.2.1 says between 1/2
  and 5/8), with the same attempts; a renewal that gets no answer is retried every ``RENEW_RETRY`` until
  the mapping expires, then it is dropped and discovery starts over from PCP;
* the server's epoch (RFC 6886 §3.6, RFC 6887 §8.5) going back means it lost its mappings (a reboot):
  the mapping is requested again at once.

A PCP mapping keeps its nonce across renewals and its deletion (RFC 6887 §11.2); a response whose nonce,
protocol or internal port differ is not ours. No sockets, no clock: the caller passes ``now``, sends the
:class:`Send` actions to the gateway's port 5351, performs :class:`UpnpMap` / :class:`UpnpUnmap` and feeds
back :meth:`PortMapCore.upnp_result`.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field

from ghostcore.addr import HostPort
from ghostlink.traversal import portmap_wire as wire

PCP, NATPMP, UPNP = "pcp", "nat-pmp", "upnp"
PROTOCOLS = (PCP, NATPMP, UPNP)
ATTEMPT_AT = (0.0, 0.25, 0.75)  # offsets of a protocol's requests
ATTEMPT_WINDOW = 1.75  # after the last request, when the protocol counts as silent
UPNP_WINDOW = 10.0  # SSDP search + description + SOAP: the edge answers within this or it failed
RENEW_RETRY = 30.0
LIFETIME = 7200  # requested (s); the server may grant less
RETRY_AFTER = 600.0
RETRY_MAX = 3600.0

# Addresses a mapping may hand out that no peer can reach: our gateway is itself behind a NAT (a home
# router behind a carrier's): its "external" address is private or carrier-grade shared space.
_NOT_PUBLIC = tuple(
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "127.0.0.0/8", "0.0.0.0/8")
)


def reachable_external(ip: str) -> bool:
    """Whether a mapping's external address is worth offering to peers (not private, not CGNAT space)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if addr.version != 4:
        return False
    return not (addr.is_multicast or any(addr in n for n in _NOT_PUBLIC))


@dataclass(frozen=True)
class Send:
    """A datagram for the gateway's port 5351."""

    data: bytes


@dataclass(frozen=True)
class UpnpMap:
    """The edge maps ``internal_port`` to ``external_port`` (a suggestion) for ``lifetime`` s via UPnP IGD."""

    external_port: int
    lifetime: int


@dataclass(frozen=True)
class UpnpUnmap:
    external_port: int


Action = Send | UpnpMap | UpnpUnmap


@dataclass
class _Try:
    proto: str
    started: float
    sent: int = 0
    renewal: bool = False


@dataclass
class _Mapping:
    proto: str
    external: HostPort
    lifetime: int
    granted_at: float
    renew_at: float
    epoch: tuple[int, float] | None = None  # (server epoch, our time) at the last answer


@dataclass
class PortMapCore:
    """Mapping state for WireGuard's ``internal_port`` on one gateway."""

    internal_port: int
    client_ip: str  # our address toward the gateway (PCP requires it in the request, §8.1)
    protocols: tuple[str, ...] = PROTOCOLS
    lifetime: int = LIFETIME
    retry_after: float = RETRY_AFTER
    nonce: bytes = field(default_factory=lambda: os.urandom(wire.NONCE_SIZE))
    status: str = "starting"  # for logs: "pcp 192.0.2.5:41641 for 7200 s", "no mapping (pcp: ...)"
    _try: _Try | None = field(default=None, init=False)
    _mapping: _Mapping | None = field(default=None, init=False)
    _idle_until: float = field(default=0.0, init=False)
    _backoff: float = field(default=0.0, init=False)
    _natpmp_ip: str = field(default="", init=False)  # NAT-PMP's external address answer
    # (external port, lifetime, epoch) of a NAT-PMP mapping awaiting the external address answer
    _natpmp_map: tuple[int, int, int] | None = field(default=None, init=False)
    _upnp_pending: bool = field(default=False, init=False)
    _closed: bool = field(default=False, init=False)
    _refused: list[str] = field(default_factory=list, init=False)

    @property
    def mapping(self) -> HostPort | None:
        """The mapped public endpoint to offer peers, or None."""
        m = self._mapping
        return m.external if m is not None and reachable_external(m.external[0]) else None

    @property
    def protocol(self) -> str:
        return self._mapping.proto if self._mapping is not None else ""

    # --- driving ---------------------------------------------------------------------------------

    def poll(self, now: float) -> list[Action]:
        """What to send now; also where expiries and give-ups happen (call it at :meth:`next_timer`)."""
        if self._closed:
            return []
        out: list[Action] = []
        m = self._mapping
        if m is not None and now >= m.granted_at + m.lifetime:
            self._mapping = None  # expired without a renewal: start over
            self._try = None
            self.status = "mapping expired"
        if self._try is None:
            if self._mapping is not None:
                if now >= self._renew_at(self._mapping):
                    self._try = _Try(self._mapping.proto, now, renewal=True)
            elif now >= self._idle_until:
                self._refused.clear()
                self._try = _Try(self.protocols[0], now) if self.protocols else None
        t = self._try
        if t is None:
            return out
        if t.proto == UPNP:
            if t.sent == 0:
                t.sent = 1
                self._upnp_pending = True
                ext = self._mapping.external[1] if self._mapping is not None else self.internal_port
                out.append(UpnpMap(ext, self.lifetime))
            elif now >= t.started + UPNP_WINDOW:
                self._upnp_pending = False
                self._give_up(t, now, "no answer")
            return out
        while t.sent < len(ATTEMPT_AT) and now >= t.started + ATTEMPT_AT[t.sent]:
            t.sent += 1
            out.extend(Send(d) for d in self._requests(t.proto, self.lifetime))
        if t.sent == len(ATTEMPT_AT) and now >= t.started + ATTEMPT_WINDOW:
            self._give_up(t, now, "no answer")
        return out

    def next_timer(self) -> float | None:
        if self._closed:
            return None
        t = self._try
        if t is not None:
            if t.proto == UPNP:
                return t.started + UPNP_WINDOW
            if t.sent < len(ATTEMPT_AT):
                return t.started + ATTEMPT_AT[t.sent]
            return t.started + ATTEMPT_WINDOW
        if self._mapping is not None:
            return min(self._renew_at(self._mapping), self._mapping.granted_at + self._mapping.lifetime)
        return self._idle_until

    def receive(self, data: bytes, now: float) -> bool:
        """A datagram from the gateway's port 5351. True when :attr:`mapping` changed."""
        if self._closed or self._try is None or self._try.proto == UPNP:
            return False
        before = self.mapping
        t = self._try
        pcp = wire.parse_pcp(data)
        if pcp is not None:
            self._on_pcp(t, pcp, now)
        else:
            pmp = wire.parse_natpmp(data)
            if pmp is not None:
                self._on_natpmp(t, pmp, now)
        return self.mapping != before

    def upnp_result(self, external: HostPort | None, lifetime: int, now: float, why: str = "") -> bool:
        """The edge's UPnP outcome (``external`` None: it failed, ``why`` says how)."""
        t = self._try
        if self._closed or t is None or t.proto != UPNP or not self._upnp_pending:
            return False
        self._upnp_pending = False
        before = self.mapping
        if external is None:
            self._give_up(t, now, why or "failed")
        else:
            # A permanent lease (0, the only kind some IGDv1 routers grant) is re-added every half hour.
            self._granted(UPNP, external, lifetime or 3600, now, None)
        return self.mapping != before

    def close(self) -> list[Action]:
        """Delete the mapping (RFC 6886 §3.4, RFC 6887 §15, UPnP DeletePortMapping); nothing more is sent."""
        if self._closed:
            return []
        self._closed = True
        m, self._mapping, self._try = self._mapping, None, None
        if m is None:
            return []
        if m.proto == UPNP:
            return [UpnpUnmap(m.external[1])]
        if m.proto == PCP:
            return [Send(wire.pcp_map_request(self.client_ip, self.nonce, self.internal_port, lifetime=0))]
        return [Send(wire.natpmp_map_request(self.internal_port, 0, 0))]

    # --- internals -------------------------------------------------------------------------------

    def _renew_at(self, m: _Mapping) -> float:
        return m.renew_at

    def _requests(self, proto: str, lifetime: int) -> list[bytes]:
        if proto == PCP:
            ext_port, ext_ip = self.internal_port, wire.ANY_V4
            if self._mapping is not None:  # a renewal asks for what it has (§11.2)
                ext_port, ext_ip = self._mapping.external[1], self._mapping.external[0]
            req = wire.pcp_map_request(
                self.client_ip,
                self.nonce,
                self.internal_port,
                external_port=ext_port,
                external_ip=ext_ip,
                lifetime=lifetime,
            )
            return [req]
        ext_port = self._mapping.external[1] if self._mapping is not None else self.internal_port
        return [
            wire.natpmp_external_request(),
            wire.natpmp_map_request(self.internal_port, ext_port, lifetime),
        ]

    def _give_up(self, t: _Try, now: float, why: str) -> None:
        """This protocol failed: the next one, or (all failed) quiet for a while."""
        self._try = None
        if t.renewal and self._mapping is not None:
            self._mapping.renew_at = now + RENEW_RETRY  # unanswered: again soon, until it expires
            return
        self._refused.append(f"{t.proto}: {why}")
        rest = self.protocols[self.protocols.index(t.proto) + 1 :] if t.proto in self.protocols else ()
        if rest:
            self._try = _Try(rest[0], now)
            return
        self._backoff = min(RETRY_MAX, self._backoff * 2 if self._backoff else self.retry_after)
        self._idle_until = now + self._backoff
        self.status = "no mapping (" + "; ".join(self._refused) + ")"

    def _granted(self, proto: str, external: HostPort, lifetime: int, now: float, epoch: int | None) -> None:
        self._try = None
        self._backoff = 0.0
        self._mapping = _Mapping(
            proto, external, lifetime, now, now + lifetime / 2, (epoch, now) if epoch is not None else None
        )
        self.status = f"{proto} {external[0]}:{external[1]} for {lifetime} s"

    def _epoch_ok(self, epoch: int, now: float) -> bool:
        """RFC 6886 §3.6 / RFC 6887 §8.5: False when the server's epoch shows it lost its state."""
        m = self._mapping
        if m is None or m.epoch is None:
            return True
        last, at = m.epoch
        return epoch + 2 >= last + (now - at) * 7 / 8

    def _on_pcp(self, t: _Try, r: wire.PcpResponse, now: float) -> None:
        if t.proto != PCP or r.opcode != wire.PCP_OP_MAP:
            return
        if r.result != 0:
            if r.nonce and r.nonce != self.nonce:
                return  # another client's (or a forged) answer
            self._give_up(t, now, wire.PCP_RESULTS.get(r.result, f"result {r.result}"))
            return
        if r.nonce != self.nonce or r.protocol != wire.UDP or r.internal_port != self.internal_port:
            return
        if not self._epoch_ok(r.epoch, now):
            self._mapping = None  # the server rebooted: ask again now
        if r.lifetime == 0:
            return
        self._granted(PCP, (r.external_ip, r.external_port), r.lifetime, now, r.epoch)

    def _on_natpmp(self, t: _Try, r: wire.NatPmpResponse, now: float) -> None:
        if t.proto == PCP and r.result == 1:
            # RFC 6887 §9: a NAT-PMP-only server answers PCP with "unsupported version".
            self._give_up(t, now, "unsupported version (NAT-PMP only)")
            return
        if t.proto != NATPMP:
            return
        if r.result != 0:
            if r.opcode == wire.NATPMP_OP_MAP_UDP or r.result in (1, 5):
                self._give_up(t, now, wire.NATPMP_RESULTS.get(r.result, f"result {r.result}"))
            return
        if r.opcode == wire.NATPMP_OP_EXTERNAL:
            self._natpmp_ip = r.external_ip
        elif r.opcode == wire.NATPMP_OP_MAP_UDP and r.internal_port == self.internal_port and r.lifetime:
            if not self._epoch_ok(r.epoch, now):
                self._mapping = None
            self._natpmp_map = (r.external_port, r.lifetime, r.epoch)
        if self._natpmp_ip and self._natpmp_map is not None:
            port, lifetime, epoch = self._natpmp_map
            self._natpmp_map = None
            self._granted(NATPMP, (self._natpmp_ip, port), lifetime, now, epoch)
