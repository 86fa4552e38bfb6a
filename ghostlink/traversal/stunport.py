"""STUN on WireGuard's own UDP port, the asyncio edge: :class:`SharedPort` drives the pure
:class:`ghostlink.traversal.stun_core.StunCore` over one :class:`ghostlink.traversal.sharedsock.SharedSocket`.

It owns the futures of the requests in flight (every wait bounded, a transaction forgotten on timeout), the
name resolution of STUN servers, and the calls NAT traversal makes: ``stun`` (our public endpoint as one
server sees it), ``check`` (a connectivity check to one of a peer's candidates), ``netcheck`` (every region
at once) and the ``on_check`` callback for each peer check answered. Protocol and socket errors are counted,
never raised to the caller: a call that gets no usable answer returns None.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Sequence

from ghostcore.addr import HostPort
from ghostlink.traversal.sharedsock import Datagram, SharedSocket
from ghostlink.traversal.stun_core import (
    Answer,
    Completed,
    NetcheckResult,
    StunCore,
    check_username,
    netcheck_result,
)

log = logging.getLogger(__name__)

ATTEMPTS = 3  # requests per stun()/check() call, spread over its timeout (a lost datagram is not a failure)


def _ip_version(host: str) -> int:
    """4 or 6 for an IP literal, 0 for anything else (a name)."""
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return 0


class SharedPort:
    """STUN on WireGuard's UDP ``port``. ``on_check(src, from_key)`` hears each peer check we answered."""

    def __init__(
        self, port: int, local_key: str, on_check: Callable[[HostPort, str], None] | None = None
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self.core = StunCore(local_key)
        self.on_check = on_check
        self._waiters: dict[bytes, asyncio.Future[Completed]] = {}
        self._sock = SharedSocket.open(port, self._on_datagram)

    @classmethod
    def open(
        cls, port: int, local_key: str, on_check: Callable[[HostPort, str], None] | None = None
    ) -> SharedPort:
        """Open the raw socket on ``port``: OSError when raw sockets are not permitted (no CAP_NET_RAW)."""
        return cls(port, local_key, on_check)

    @property
    def port(self) -> int:
        return self._sock.port

    @property
    def families(self) -> frozenset[int]:
        """The IP versions checks can be sent in (the raw sockets that opened)."""
        return self._sock.families

    @property
    def local_key(self) -> str:
        return self.core.local_key

    @local_key.setter
    def local_key(self, key: str) -> None:
        self.core.local_key = key  # key rotation: checks to the new key are answered from now on

    @property
    def counters(self) -> dict[str, int]:
        """Protocol and socket counters, merged (names do not overlap)."""
        return {**self.core.counters, **self._sock.counters}

    def send_raw(self, payload: bytes, dst: HostPort) -> bool:
        """Send ``payload`` (a birthday probe) from WireGuard's port to ``dst``; False if not sent."""
        return self._sock.sendto(payload, dst)

    def reopen(self, port: int) -> None:
        """WireGuard now listens on ``port``: requests in flight fail, everything else is kept."""
        self._fail_all()
        self._sock.reopen(port)

    def close(self) -> None:
        """Close the socket; pending stun()/check() calls return None (idempotent)."""
        self._fail_all()
        self._sock.close()

    def _fail_all(self) -> None:
        for txid, fut in list(self._waiters.items()):
            self.core.forget(txid)
            if not fut.done():
                fut.set_result(Completed(txid, False, None, 0.0))  # the waiting call returns None
        self._waiters.clear()

    def _on_datagram(self, dg: Datagram) -> None:
        ev = self.core.receive(dg.payload, dg.src, time.perf_counter())
        if isinstance(ev, Answer):
            self._sock.sendto(ev.data, ev.dst)
            if self.on_check is not None:
                try:
                    self.on_check(ev.dst, ev.from_key)
                except Exception:  # the path logic's bug must not stop us answering checks
                    self.core.counters["callback_errors"] += 1
                    log.exception("on_check callback failed")
        elif isinstance(ev, Completed):
            fut = self._waiters.pop(ev.txid, None)
            if fut is not None and not fut.done():
                fut.set_result(ev)

    async def _transact(self, dst: HostPort, budget: float, username: str | None) -> Completed | None:
        """Up to ATTEMPTS requests (a fresh transaction id each, so the RTT is exact) within ``budget`` s."""
        if not self._sock.is_open or _ip_version(dst[0]) not in self._sock.families:
            self.core.counters["unsendable"] += 1
            return None
        done: asyncio.Future[Completed] = self._loop.create_future()
        txids: list[bytes] = []
        deadline = self._loop.time() + budget
        try:
            for i in range(ATTEMPTS):
                req = self.core.request(dst, time.perf_counter(), username)
                if req is None:
                    break
                txid, data = req
                txids.append(txid)
                self._waiters[txid] = done
                self._sock.sendto(data, dst)
                until = deadline if i == ATTEMPTS - 1 else self._loop.time() + budget / ATTEMPTS
                left = min(until, deadline) - self._loop.time()
                if left <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(asyncio.shield(done), left)
            if not txids:
                return None
            left = deadline - self._loop.time()
            if left > 0:
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(asyncio.shield(done), left)
            self.core.counters["timeouts"] += 1
            return None
        finally:
            for txid in txids:
                self.core.forget(txid)
                self._waiters.pop(txid, None)
            if not done.done():
                done.cancel()

    async def _resolve(self, server: HostPort, budget: float) -> HostPort | None:
        host, port = server
        if _ip_version(host):
            return (host, port)
        try:
            infos = await asyncio.wait_for(
                self._loop.getaddrinfo(host, port, family=socket.AF_INET, type=socket.SOCK_DGRAM), budget
            )
        except (OSError, TimeoutError) as exc:
            self.core.counters["resolve_errors"] += 1
            log.debug("cannot resolve STUN server %s: %s", host, exc)
            return None
        for *_, sockaddr in infos:
            return (str(sockaddr[0]), int(sockaddr[1]))
        return None

    async def _stun_resolved(
        self, server: HostPort, budget: float
    ) -> tuple[HostPort, HostPort, float] | None:
        t0 = self._loop.time()
        dst = await self._resolve(server, budget)
        if dst is None:
            return None
        res = await self._transact(dst, max(0.0, budget - (self._loop.time() - t0)), None)
        if res is None or not res.ok or res.mapped is None:
            return None
        return dst, res.mapped, res.rtt

    # ``timeout`` is part of these methods' contract (not a cancel scope): the attempts are spread over it.
    async def stun(self, server: HostPort, timeout: float = 1.0) -> tuple[HostPort, float] | None:  # noqa: ASYNC109
        """A Binding request from WireGuard's port -> (XOR-MAPPED-ADDRESS, rtt in seconds), or None."""
        ans = await self._stun_resolved(server, timeout)
        return None if ans is None else (ans[1], ans[2])

    async def check(self, dst: HostPort, peer_key: str, timeout: float = 1.0) -> float | None:  # noqa: ASYNC109
        """A connectivity check to ``dst`` for peer ``peer_key``: the RTT in seconds, or None."""
        res = await self._transact(dst, timeout, check_username(peer_key, self.local_key))
        if res is None or not res.ok:
            return None
        return res.rtt

    async def netcheck(
        self,
        servers: Sequence[tuple[int, str, HostPort]],
        timeout: float = 1.0,  # noqa: ASYNC109
    ) -> NetcheckResult:
        """STUN every (region id, name, address) at once; the NAT's behaviour and each latency."""
        answers = await asyncio.gather(*(self._stun_resolved(addr, timeout) for _, _, addr in servers))
        return netcheck_result(servers, answers)
