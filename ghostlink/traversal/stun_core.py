"""STUN on WireGuard's port, the pure part: connectivity checks, their answers and netcheck, sans-IO.

What ghostlink says and answers in STUN on the port it shares with WireGuard: Binding requests to STUN
servers (the server-reflexive candidate, RFC 8489 §3), connectivity checks to peers' candidates and answers
to the peers' checks (ICE's, RFC 8445 §7.2.2 and §7.3, reduced to what a WireGuard mesh needs), and the
netcheck report: one STUN round to every relay region with the NAT's mapping behaviour read from the answers
(RFC 4787 §4.1). The asyncio edge that sends and receives is :mod:`ghostlink.traversal.stunport`.

Wire format (aioice's codec, :mod:`aioice.stun`, imported by the first message built or parsed, so a node
that never sends STUN does not load aioice; the magic cookie is checked here, as in ghostgate.turn_core,
because aioice does not): a check is a Binding request with
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
HMAC key from the X25519 static keys would close it; this core only holds the public key.

Shape: :class:`StunCore` takes bytes, the source address and ``now`` and returns what to send and what
completed, so it is unit-tested as transcripts. Nothing a peer sends raises: malformed datagrams are counted.
"""

from __future__ import annotations

import os
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ghostcore.addr import HostPort, format_endpoint

if TYPE_CHECKING:
    from aioice import stun

STUN_COOKIE = 0x2112A442  # RFC 8489 §5
HEADER_LENGTH = 20  # RFC 8489 §5
MAX_PENDING = 4096  # transactions in flight; beyond it new requests fail at once (bounded memory)
SOFTWARE = "ghostlink"

ENDPOINT_INDEPENDENT = "endpoint-independent"
VARIES = "varies-by-destination"
UNKNOWN = "unknown"


def is_stun(payload: bytes) -> bool:
    """RFC 8489 §5: at least a header, top two bits zero, the magic cookie at offset 4."""
    return len(payload) >= 20 and not payload[0] & 0xC0 and payload[4:8] == STUN_COOKIE.to_bytes(4, "big")


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
    if len(data) < HEADER_LENGTH:
        return False
    length = struct.unpack_from("!H", data, 2)[0]
    if length % 4 or len(data) != HEADER_LENGTH + length:
        return False
    pos = HEADER_LENGTH
    while pos < len(data):
        if pos + 4 > len(data):
            return False
        attr_len = struct.unpack_from("!H", data, pos + 2)[0]
        pos += 4 + attr_len + (-attr_len % 4)
    return pos == len(data)


def classify_mapping(observations: Sequence[tuple[HostPort, HostPort]]) -> str:
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
    servers: Sequence[tuple[int, str, HostPort]], answers: Sequence[tuple[HostPort, HostPort, float] | None]
) -> NetcheckResult:
    """Fold per-server answers ((server addr as resolved, mapped, rtt s) or None) into the report.

    The public endpoint is the first answering server's view (servers in the caller's order).
    """
    relays: list[RelayReport] = []
    observations: list[tuple[HostPort, HostPort]] = []
    for (region, name, addr), ans in zip(servers, answers, strict=True):
        if ans is None:
            relays.append(RelayReport(region, name, format_endpoint(*addr), -1.0, ""))
            continue
        resolved, mapped, rtt = ans
        observations.append((resolved, mapped))
        ms = round(rtt * 1000.0, 3)
        relays.append(RelayReport(region, name, format_endpoint(*addr), ms, format_endpoint(*mapped)))
    public = format_endpoint(*observations[0][1]) if observations else ""
    mapping = classify_mapping(observations) if observations else UNKNOWN
    return NetcheckResult(bool(observations), public, mapping, tuple(relays))


@dataclass(frozen=True)
class Completed:
    """A response matched a pending request: ``mapped`` is None for an error or an address-less answer."""

    txid: bytes
    ok: bool
    mapped: HostPort | None
    rtt: float


@dataclass(frozen=True)
class Answer:
    """A peer's check addressed to us: send ``data`` to ``dst`` (its source); sent by ``from_key``."""

    data: bytes
    dst: HostPort
    from_key: str


Event = Completed | Answer


@dataclass
class _Pending:
    dst: HostPort
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

    def request(self, dst: HostPort, now: float, username: str | None = None) -> tuple[bytes, bytes] | None:
        """A Binding request to ``dst`` -> (transaction id, bytes); None when too many are in flight."""
        from aioice import stun  # noqa: PLC0415 - lazy (the module docstring)

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

    def receive(self, data: bytes, src: HostPort, now: float) -> Event | None:
        """A STUN datagram that arrived on WireGuard's port from ``src``."""
        from aioice import stun  # noqa: PLC0415 - lazy (the module docstring)

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

    def _request(self, msg: stun.Message, src: HostPort) -> Answer | None:
        from aioice import stun  # noqa: PLC0415 - loaded by receive() already

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

    def _response(self, msg: stun.Message, src: HostPort, now: float) -> Completed | None:
        from aioice import stun  # noqa: PLC0415 - loaded by receive() already

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
