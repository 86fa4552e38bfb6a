"""The STUN / TURN edge of ghostgate (UDP): sockets in, :class:`ghostgate.turn_core.TurnCore` in the middle.

Non-blocking sockets read with ``loop.add_reader`` and drained in batches (up to ``_BATCH`` datagrams per
wake-up), sends straight through ``sendto``: no per-datagram futures, so the same code is fast on uvloop
(measured on 2 cores: an asyncio UDP forwarder of 1400-byte packets did ~45k packets/s on the stock loop,
~218k on uvloop; ``ghostgate.app`` runs on uvloop when it is installed).

The relayed data itself takes a fast path that never builds a message or an action: datagrams are read
into one preallocated buffer (``recvfrom_into``), a client's ChannelData is looked up in the core's
:attr:`~ghostgate.turn_core.TurnCore.to_peer` routes and its payload sent as a slice of that buffer, and a
peer's datagram is read 4 bytes into the buffer so that the route's channel header
(:attr:`~ghostgate.turn_core.TurnCore.to_client`) is written in front of it in place. A route is used only
before its deadline, checked against the clock read once per batch; anything without a live route goes to
the core as bytes. The routes are the core's: this edge only reads them. What a batch forwards leaves in
UDP GSO trains (:mod:`ghostgate.turn_gso`): one send system call for a run of datagrams to one
destination, flushed at the end of the batch. Every socket gets ``_SOCKET_BUFFER`` bytes of kernel buffer
each way (the kernel caps it at ``net.core.rmem_max`` / ``wmem_max``), so a burst waits in the kernel
instead of being dropped while a batch is being forwarded.

A failed send (ENETUNREACH to an unroutable peer, a full buffer) is counted in
``counters["send_errors"]`` and never touches the allocation: coturn tears the allocation down there, we do
not. The core's clock is ``time.time()`` because REST usernames expire in unix time (injectable for tests).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable

from ghostcore.addr import HostPort
from ghostcore.aio import CoreTimer
from ghostcore.config import parse_hostport
from ghostcore.errors import Unavailable, os_reason
from ghostgate.config import MAX_LIFETIME, GateConfig, relay_host
from ghostgate.nodeset import NodeSet, Revoked
from ghostgate.turn_core import Action, CoreConfig, Release, Transmit, TurnCore
from ghostgate.turn_gso import Trains

log = logging.getLogger(__name__)

_BATCH = 64
_MAX_DATAGRAM = 65535
_HEADER = 4  # ChannelData: channel number and length (RFC 8656 §12.4)
_SOCKET_BUFFER = 4 << 20


def _buffers(s: socket.socket) -> None:
    """Ask for ``_SOCKET_BUFFER`` each way; the kernel may grant less (its limits), which is not an error."""
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            s.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)
        except OSError as exc:
            log.debug("socket buffer size refused: %s", os_reason(exc))


def core_config(cfg: GateConfig, secret: bytes | None) -> CoreConfig:
    return CoreConfig(
        secret=secret,
        realm=cfg.turn.realm,
        max_allocations=cfg.turn.max_allocations,
        max_allocations_per_user=cfg.turn.max_allocations_per_user,
        default_lifetime=cfg.turn.default_lifetime,
        max_lifetime=MAX_LIFETIME,
        denied_peers=tuple(ipaddress.ip_network(n, strict=False) for n in cfg.turn.denied_peers),
        allowed_peers=tuple(ipaddress.ip_network(n, strict=False) for n in cfg.turn.allowed_peers),
    )


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


class TurnEdge:
    """The running STUN / TURN server: the listen socket, the relayed sockets, the core and its timer."""

    def __init__(
        self,
        config: CoreConfig,
        sock: socket.socket,
        relay_host: str,
        loop: asyncio.AbstractEventLoop,
        *,
        roster: NodeSet | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.core = TurnCore(config, self.bind_relay, roster=roster)
        self._clock = clock
        self.sock = sock
        self.relay_host = relay_host
        self.loop = loop
        self.counters: Counter[str] = Counter()
        self.relays: dict[HostPort, socket.socket] = {}
        # One receive buffer for every socket: a datagram is forwarded (or copied for the core) before the
        # next read, and the loop is single-threaded. Room for the largest datagram after a header.
        self._buf = bytearray(_HEADER + _MAX_DATAGRAM)
        self._view = memoryview(self._buf)
        self._trains = Trains(self._send_failed)
        _buffers(sock)
        self._timer = CoreTimer(loop, clock, self._on_timer)
        self.loop.add_reader(self.sock.fileno(), self._on_listen)

    @property
    def address(self) -> HostPort:
        host, port = self.sock.getsockname()[:2]
        return host, port

    def bind_relay(self) -> HostPort | None:
        """The core's ``bind_relay``: a fresh UDP socket on the relay address, or None if none is free."""
        try:
            s = socket.socket(_family(self.relay_host), socket.SOCK_DGRAM)
        except OSError:
            return None
        try:
            s.setblocking(False)
            _buffers(s)
            s.bind((self.relay_host, 0))
        except OSError:
            s.close()
            return None
        host, port = s.getsockname()[:2]
        addr = (host, port)
        self.relays[addr] = s
        self.loop.add_reader(s.fileno(), self._on_relay, addr, s)
        return addr

    def _on_listen(self) -> None:
        core, buf, view, relays = self.core, self._buf, self._view, self.relays
        routes = core.to_peer  # the core's live table: what a request in this batch changes shows at once
        recv = self.sock.recvfrom_into
        trains = self._trains
        now = self._clock()
        packets = octets = 0
        for _ in range(_BATCH):
            try:
                n, src = recv(view, _MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.counters["recv_errors"] += 1  # e.g. an ICMP error queued on the socket
                continue
            client: HostPort = src if len(src) == 2 else (src[0], src[1])  # IPv6: + flowinfo, scope id
            if n >= _HEADER and 0x40 <= buf[0] <= 0x7F:  # ChannelData (RFC 8656 §12.4)
                channels = routes.get(client)
                route = channels.get(buf[0] << 8 | buf[1]) if channels is not None else None
                length = buf[2] << 8 | buf[3]
                # A live route and a length that fits, padding allowed (§12.5); else the core decides.
                if route is not None and now < route[2] and length <= n - _HEADER <= length + 3:
                    trains.add(route, relays[route[0]], route[1], view[_HEADER : _HEADER + length])
                    packets += 1
                    octets += length
                    continue
            trains.flush()  # what was relayed before this datagram leaves before anything it causes
            self._apply(core.handle_client(bytes(view[:n]), client, now))
        trains.flush()
        if packets:
            core.count_relayed(packets, octets, 0, 0)
        self._schedule()

    def _on_relay(self, relay: HostPort, s: socket.socket) -> None:
        core, buf, view = self.core, self._buf, self._view
        # Peer datagrams never change routes, so this relay's routes hold for the whole batch.
        routes = core.to_client.get(relay)
        payload = view[_HEADER:]
        listen, trains = self.sock, self._trains
        recv = s.recvfrom_into
        now = self._clock()
        packets = octets = 0
        for _ in range(_BATCH):
            try:
                n, src = recv(payload, _MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.counters["recv_errors"] += 1
                continue
            peer: HostPort = src if len(src) == 2 else (src[0], src[1])
            route = routes.get(peer) if routes is not None else None
            if route is not None and now < route[2]:
                buf[0:2] = route[1]  # ChannelData header in front of the payload (RFC 8656 §12.4)
                buf[2] = n >> 8
                buf[3] = n & 0xFF
                trains.add(route[0], listen, route[0], view[: _HEADER + n])
                packets += 1
                octets += n
                continue
            trains.flush()
            self._apply(core.handle_peer(bytes(view[_HEADER : _HEADER + n]), relay, peer, now))
            if relay not in self.relays:
                break  # the allocation went away while we were draining
        trains.flush()
        if packets:
            core.count_relayed(0, 0, packets, octets)
        self._schedule()

    def _send_failed(self, dest: HostPort, exc: OSError) -> None:
        self.counters["send_errors"] += 1
        log.debug("send to %s failed: %s", dest, exc.strerror)

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Transmit):
                out = self.sock if action.relay is None else self.relays.get(action.relay)
                if out is None:
                    continue
                try:
                    out.sendto(action.data, action.dest)
                except OSError as exc:
                    self._send_failed(action.dest, exc)
            elif isinstance(action, Release):
                s = self.relays.pop(action.relay, None)
                if s is not None:
                    self.loop.remove_reader(s.fileno())
                    s.close()

    def revoke(self, revoked: Revoked) -> int:
        """Delete the allocations of nodes that left the roster (ghostgate.control); how many."""
        actions = self.core.revoke(revoked)
        self._apply(actions)
        return len(actions)

    def _schedule(self) -> None:
        self._timer.arm(self.core.next_timer())

    def _on_timer(self, now: float) -> None:
        self._apply(self.core.handle_timer(now))
        self._schedule()

    def stats(self) -> dict[str, int]:
        """The core's counters and the edge's, one dict (for tests and logs)."""
        return {**self.core.counters, **self.counters}

    def close(self) -> None:
        self._timer.cancel()
        self._apply([Release(r) for r in list(self.relays)])
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


async def start_turn(
    cfg: GateConfig,
    secret: bytes | None,
    *,
    roster: NodeSet | None = None,
    clock: Callable[[], float] = time.time,
) -> TurnEdge:
    """Bind ``relay.listen`` (UDP) and serve STUN (and TURN when ``secret`` is set) until ``close()``;
    ``roster``: the nodes allowed to allocate (``[control]``), None for credentials alone; ``clock``: unix
    time (tests move it)."""
    host, port = parse_hostport(cfg.relay.listen, "relay.listen", ip_only=True)
    relay_ip = relay_host(cfg, secret)  # refuse a bad relay address before binding anything
    sock = socket.socket(_family(host), socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise Unavailable(f"relay.listen: cannot bind UDP {host} port {port}: {os_reason(exc)}") from None
    loop = asyncio.get_running_loop()
    return TurnEdge(core_config(cfg, secret), sock, relay_ip, loop, roster=roster, clock=clock)
