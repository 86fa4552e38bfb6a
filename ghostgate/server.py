"""The asyncio UDP edge of ghostgate: sockets in, :class:`ghostgate.turn_core.GateCore` in the middle.

Non-blocking sockets read with ``loop.add_reader`` and drained in batches (up to ``_BATCH`` datagrams per
wake-up), sends straight through ``sendto``: no per-datagram futures, so the same code is fast on uvloop
(see ../shared/platform-notes.md: ~5x the stock loop). A failed send (ENETUNREACH to an unroutable peer,
a full buffer) is counted in ``counters["send_errors"]`` and never touches the allocation: coturn tears the
allocation down there, we do not. The core's clock is ``time.time()`` because REST usernames expire in unix
time.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections import Counter

from ghostcore.aio import CoreTimer
from ghostcore.config import parse_hostport
from ghostcore.errors import Unavailable
from ghostgate.config import MAX_LIFETIME, GateConfig, relay_host
from ghostgate.turn_core import Action, Addr, CoreConfig, GateCore, Release, Transmit

log = logging.getLogger(__name__)

_BATCH = 64
_MAX_DATAGRAM = 65535


def core_config(cfg: GateConfig, secret: bytes | None) -> CoreConfig:
    return CoreConfig(
        secret=secret,
        realm=cfg.turn.realm,
        max_allocations=cfg.turn.max_allocations,
        max_allocations_per_user=cfg.turn.max_allocations_per_user,
        default_lifetime=cfg.turn.default_lifetime,
        max_lifetime=MAX_LIFETIME,
        denied_peers=tuple(ipaddress.ip_network(n, strict=False) for n in cfg.turn.denied_peers),
    )


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


class GateServer:
    """A running ghostgate: the listen socket, the relay sockets, the core and its timer."""

    def __init__(
        self, config: CoreConfig, sock: socket.socket, relay_host: str, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.core = GateCore(config, self.bind_relay)
        self.sock = sock
        self.relay_host = relay_host
        self.loop = loop
        self.counters: Counter[str] = Counter()
        self.relays: dict[Addr, socket.socket] = {}
        self._timer = CoreTimer(loop, time.time, self._on_timer)
        self.loop.add_reader(self.sock.fileno(), self._on_listen)

    @property
    def address(self) -> Addr:
        host, port = self.sock.getsockname()[:2]
        return host, port

    def bind_relay(self) -> Addr | None:
        """The core's ``bind_relay``: a fresh UDP socket on the relay address, or None if none is free."""
        try:
            s = socket.socket(_family(self.relay_host), socket.SOCK_DGRAM)
        except OSError:
            return None
        try:
            s.setblocking(False)
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
        for _ in range(_BATCH):
            try:
                data, src = self.sock.recvfrom(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.counters["recv_errors"] += 1  # e.g. an ICMP error queued on the socket
                continue
            self._apply(self.core.handle_client(data, (src[0], src[1]), time.time()))
        self._schedule()

    def _on_relay(self, relay: Addr, s: socket.socket) -> None:
        for _ in range(_BATCH):
            try:
                data, src = s.recvfrom(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.counters["recv_errors"] += 1
                continue
            self._apply(self.core.handle_peer(data, relay, (src[0], src[1]), time.time()))
            if relay not in self.relays:
                break  # the allocation went away while we were draining
        self._schedule()

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Transmit):
                out = self.sock if action.relay is None else self.relays.get(action.relay)
                if out is None:
                    continue
                try:
                    out.sendto(action.data, action.dest)
                except OSError as exc:
                    self.counters["send_errors"] += 1
                    log.debug("send to %s failed: %s", action.dest, exc.strerror)
            elif isinstance(action, Release):
                s = self.relays.pop(action.relay, None)
                if s is not None:
                    self.loop.remove_reader(s.fileno())
                    s.close()

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


async def start_server(cfg: GateConfig, secret: bytes | None) -> GateServer:
    """Bind ``relay.listen`` (UDP) and serve STUN (and TURN when ``secret`` is set) until ``close()``."""
    host, port = parse_hostport(cfg.relay.listen, "relay.listen", ip_only=True)
    relay_ip = relay_host(cfg, secret)  # refuse a bad relay address before binding anything
    sock = socket.socket(_family(host), socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise Unavailable(f"relay.listen: cannot bind UDP {cfg.relay.listen}: {exc.strerror}") from None
    return GateServer(core_config(cfg, secret), sock, relay_ip, asyncio.get_running_loop())
