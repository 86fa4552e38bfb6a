"""STUN discovery, ICE-style connectivity checks and netcheck on WireGuard's own UDP port (issue 3).

It owns what ghostlink says and answers in STUN on the port it shares with WireGuard
(:mod:`ghostlink.sharedsock`): Binding requests to STUN servers (the server-reflexive candidate, RFC 8489
§3), connectivity checks to peers' candidates and answers to the peers' checks (ICE's, RFC 8445 §7.2.2 and
§7.3, reduced to what a WireGuard mesh needs), and ``netcheck``: one STUN round to every relay region
with the NAT's mapping behaviour read from the answers (RFC 4787 §4.1).

Wire format (aioice's codec, :mod:`aioice.stun`; the magic cookie is checked here, as in
ghostgate.turn_core, because aioice does not): a check is a Binding request with
``USERNAME = "<receiver's WireGuard public key, base64>:<sender's key>"`` (ICE's ``rfrag:lfrag`` order,
RFC 8445 §7.2.2) and a FINGERPRINT (RFC 8489 §14.7, to tell it from other traffic on a shared port). Its
answer is a Binding success response with XOR-MAPPED-ADDRESS = the request's source, sent from WireGuard's
port to that source. A request whose USERNAME does not start with our key is not for us: ignored and counted.
A check succeeds when a success response with the request's transaction id arrives *from the address the
request went to* (RFC 8445 §7.2.5.2.1: non-symmetric answers fail the check).

Known gap: checks carry no MESSAGE-INTEGRITY (ICE's short-term credential). Keys are public, so an
on-path attacker who sees a request (its 96-bit random transaction id) could answer it and make a
candidate look alive; the worst outcome is WireGuard pointed at a path that does not deliver, which the
keep-alive checks notice (the tunnel itself stays WireGuard-authenticated). Deriving a per-pair
HMAC key from the X25519 static keys would close it; this class only holds the public key.

Shape: :class:`StunCore` is sans-IO (bytes, source address and ``now`` in; what to send and what
completed out), so it is unit-tested as transcripts. :class:`SharedPort` is the asyncio edge: one
:class:`ghostlink.sharedsock.SharedSocket`, futures per pending request, every wait bounded, pending
transactions dropped on timeout. Nothing a peer sends raises: malformed datagrams are counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aioice import stun

from ghostlink.sharedsock import Datagram, SharedSocket, is_stun

log = logging.getLogger(__name__)

Addr = tuple[str, int]
ATTEMPTS = 3  # requests per stun()/check() call, spread over its timeout (a lost datagram is not a failure)
MAX_PENDING = 4096  # transactions in flight; beyond it new requests fail at once (bounded memory)
SOFTWARE = "ghostlink"

ENDPOINT_INDEPENDENT = "endpoint-independent"
VARIES = "varies-by-destination"
UNKNOWN = "unknown"


# ---- pure parts --------------------------------------------------------------------------------


def check_username(to_key: str, from_key: str) -> str:
    """USERNAME of a check from ``from_key`` to ``to_key`` (RFC 8445 §7.2.2 order: receiver first)."""
    return f"{to_key}:{from_key}"


def parse_username(username: str, local_key: str) -> str | None:
    """The sender's key if ``username`` is a check addressed to ``local_key``, else None."""
    to_key, sep, from_key = username.partition(":")
    if not sep or not local_key or to_key != local_key or not from_key or ":" in from_key:
        return None
    return from_key


def well_formed(data: bytes) -> bool:
    """RFC 8489 §5/§14: the header's length is the body's, a multiple of 4, and the attributes (each padded
    to 4 bytes) tile the body exactly. aioice reads a truncated last attribute without complaint."""
    if len(data) < stun.HEADER_LENGTH:
        return False
    length = struct.unpack_from("!H", data, 2)[0]
    if length % 4 or len(data) != stun.HEADER_LENGTH + length:
        return False
    pos = stun.HEADER_LENGTH
    while pos < len(data):
        if pos + 4 > len(data):
            return False
        attr_len = struct.unpack_from("!H", data, pos + 2)[0]
        pos += 4 + attr_len + (-attr_len % 4)
    return pos == len(data)


def format_addr(addr: Addr) -> str:
    return f"{addr[0]}:{addr[1]}"


def classify_mapping(observations: Sequence[tuple[Addr, Addr]]) -> str:
    """(server address, mapped address) pairs from one local port -> the NAT's mapping behaviour.

    RFC 4787 §4.1: two servers that saw different mapped addresses prove the mapping varies by
    destination (whatever their addresses). The same mapped address from two servers at *different IPs*
    shows endpoint-independent mapping; from one IP (another port) it would not rule out address-dependent
    mapping, so that is ``unknown``, as is a single answer.
    """
    mapped = {m for _, m in observations}
    if len(mapped) > 1:
        return VARIES
    if len({s[0] for s, _ in observations}) > 1:
        return ENDPOINT_INDEPENDENT
    return UNKNOWN


@dataclass(frozen=True)
class RelayReport:
    """One STUN server's answer in a netcheck: latency_ms -1.0 and mapped "" when it did not answer."""

    region: int
    name: str
    address: str
    latency_ms: float
    mapped: str


@dataclass(frozen=True)
class NetcheckResult:
    udp: bool
    public_endpoint: str
    mapping: str
    relays: tuple[RelayReport, ...]


def netcheck_result(
    servers: Sequence[tuple[int, str, Addr]], answers: Sequence[tuple[Addr, Addr, float] | None]
) -> NetcheckResult:
    """Fold per-server answers ((server addr as resolved, mapped, rtt s) or None) into the report.

    The public endpoint is the first answering server's view (servers in the caller's order).
    """
    relays: list[RelayReport] = []
    observations: list[tuple[Addr, Addr]] = []
    for (region, name, addr), ans in zip(servers, answers, strict=True):
        if ans is None:
            relays.append(RelayReport(region, name, format_addr(addr), -1.0, ""))
            continue
        resolved, mapped, rtt = ans
        observations.append((resolved, mapped))
        ms = round(rtt * 1000.0, 3)
        relays.append(RelayReport(region, name, format_addr(addr), ms, format_addr(mapped)))
    public = format_addr(observations[0][1]) if observations else ""
    mapping = classify_mapping(observations) if observations else UNKNOWN
    return NetcheckResult(bool(observations), public, mapping, tuple(relays))


@dataclass(frozen=True)
class Completed:
    """A response matched a pending request: ``mapped`` is None for an error or an address-less answer."""

    txid: bytes
    ok: bool
    mapped: Addr | None
    rtt: float


@dataclass(frozen=True)
class Answer:
    """A peer's check addressed to us: send ``data`` to ``dst`` (its source); sent by ``from_key``."""

    data: bytes
    dst: Addr
    from_key: str


Event = Completed | Answer


@dataclass
class _Pending:
    dst: Addr
    sent: float


class StunCore:
    """Requests in flight and the answers to peers' checks; no sockets, no clock (``now`` is passed in)."""

    def __init__(self, local_key: str) -> None:
        self.local_key = local_key
        self.counters: Counter[str] = Counter()
        self._pending: dict[bytes, _Pending] = {}

    @property
    def pending(self) -> int:
        return len(self._pending)

    def request(self, dst: Addr, now: float, username: str | None = None) -> tuple[bytes, bytes] | None:
        """A Binding request to ``dst`` -> (transaction id, bytes); None when too many are in flight."""
        if len(self._pending) >= MAX_PENDING:
            self.counters["pending_full"] += 1
            return None
        attrs: dict[str, object] = {"SOFTWARE": SOFTWARE}
        if username is not None:
            attrs["USERNAME"] = username
        txid = os.urandom(12)  # RFC 8489 §5: 96 random bits, so an off-path answer cannot match
        msg = stun.Message(stun.Method.BINDING, stun.Class.REQUEST, txid, attrs)
        msg.add_fingerprint()
        self._pending[txid] = _Pending(dst, now)
        self.counters["requests"] += 1
        return txid, bytes(msg)

    def forget(self, txid: bytes) -> None:
        """The caller stopped waiting (timeout, cancel): a late answer is then unmatched."""
        self._pending.pop(txid, None)

    def receive(self, data: bytes, src: Addr, now: float) -> Event | None:
        """A STUN datagram that arrived on WireGuard's port from ``src``."""
        if not is_stun(data) or not well_formed(data):
            self.counters["malformed"] += 1
            return None
        try:
            msg = stun.parse_message(data)
        except (ValueError, struct.error, IndexError, KeyError, TypeError, UnicodeDecodeError):
            self.counters["malformed"] += 1  # aioice's parse failures (bad lengths, method, fingerprint)
            return None
        if msg.message_method != stun.Method.BINDING:
            self.counters["ignored_method"] += 1
            return None
        if msg.message_class == stun.Class.REQUEST:
            return self._request(msg, src)
        if msg.message_class in (stun.Class.RESPONSE, stun.Class.ERROR):
            return self._response(msg, src, now)
        self.counters["ignored_indication"] += 1  # a Binding indication is a keepalive (§6.3.2)
        return None

    def _request(self, msg: stun.Message, src: Addr) -> Answer | None:
        username = msg.attributes.get("USERNAME")
        from_key = parse_username(username, self.local_key) if isinstance(username, str) else None
        if from_key is None:
            self.counters["ignored_requests"] += 1
            return None
        resp = stun.Message(
            stun.Method.BINDING,
            stun.Class.RESPONSE,
            msg.transaction_id,
            {"XOR-MAPPED-ADDRESS": src, "SOFTWARE": SOFTWARE},
        )
        resp.add_fingerprint()
        self.counters["checks_answered"] += 1
        return Answer(bytes(resp), src, from_key)

    def _response(self, msg: stun.Message, src: Addr, now: float) -> Completed | None:
        p = self._pending.get(msg.transaction_id)
        if p is None:
            self.counters["unmatched_responses"] += 1  # late (after a timeout), duplicate or forged
            return None
        if p.dst != src:
            self.counters["wrong_source"] += 1  # RFC 8445 §7.2.5.2.1: the answer must come from dst
            return None
        del self._pending[msg.transaction_id]
        rtt = max(0.0, now - p.sent)
        if msg.message_class == stun.Class.ERROR:
            self.counters["error_responses"] += 1
            return Completed(msg.transaction_id, False, None, rtt)
        mapped = msg.attributes.get("XOR-MAPPED-ADDRESS") or msg.attributes.get("MAPPED-ADDRESS")
        if not (isinstance(mapped, tuple) and len(mapped) == 2):
            self.counters["responses_without_address"] += 1
            mapped = None
        self.counters["responses"] += 1
        return Completed(msg.transaction_id, True, mapped, rtt)


# ---- the asyncio edge --------------------------------------------------------------------------


def _ipv4_literal(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 4
    except ValueError:
        return False


class SharedPort:
    """STUN on WireGuard's UDP ``port``. ``on_check(src, from_key)`` hears each peer check we answered."""

    def __init__(self, port: int, local_key: str) -> None:
        self._loop = asyncio.get_running_loop()
        self.core = StunCore(local_key)
        self.on_check: Callable[[Addr, str], None] | None = None
        self._waiters: dict[bytes, asyncio.Future[Completed]] = {}
        self._sock = SharedSocket.open(port, self._on_datagram)

    @classmethod
    def open(cls, port: int, local_key: str) -> SharedPort:
        """Open the raw socket on ``port``: OSError when raw sockets are not permitted (no CAP_NET_RAW)."""
        return cls(port, local_key)

    @property
    def port(self) -> int:
        return self._sock.port

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

    async def _transact(self, dst: Addr, budget: float, username: str | None) -> Completed | None:
        """Up to ATTEMPTS requests (a fresh transaction id each, so the RTT is exact) within ``budget`` s."""
        if not self._sock.is_open or not _ipv4_literal(dst[0]):
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

    async def _resolve(self, server: Addr, budget: float) -> Addr | None:
        host, port = server
        if _ipv4_literal(host):
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

    async def _stun_resolved(self, server: Addr, budget: float) -> tuple[Addr, Addr, float] | None:
        t0 = self._loop.time()
        dst = await self._resolve(server, budget)
        if dst is None:
            return None
        res = await self._transact(dst, max(0.0, budget - (self._loop.time() - t0)), None)
        if res is None or not res.ok or res.mapped is None:
            return None
        return dst, res.mapped, res.rtt

    # ``timeout`` is part of these methods' contract (not a cancel scope): the attempts are spread over it.
    async def stun(self, server: Addr, timeout: float = 1.0) -> tuple[Addr, float] | None:  # noqa: ASYNC109
        """A Binding request from WireGuard's port -> (XOR-MAPPED-ADDRESS, rtt in seconds), or None."""
        ans = await self._stun_resolved(server, timeout)
        return None if ans is None else (ans[1], ans[2])

    async def check(self, dst: Addr, peer_key: str, timeout: float = 1.0) -> float | None:  # noqa: ASYNC109
        """A connectivity check to ``dst`` for peer ``peer_key``: the RTT in seconds, or None."""
        res = await self._transact(dst, timeout, check_username(peer_key, self.local_key))
        if res is None or not res.ok:
            return None
        return res.rtt

    async def netcheck(
        self,
        servers: Sequence[tuple[int, str, Addr]],
        timeout: float = 1.0,  # noqa: ASYNC109
    ) -> NetcheckResult:
        """STUN every (region id, name, address) at once; the NAT's behaviour and each latency."""
        answers = await asyncio.gather(*(self._stun_resolved(addr, timeout) for _, _, addr in servers))
        return netcheck_result(servers, answers)
