"""The sans-IO ghost relay server (DERP-like): bytes and ``now`` in, actions out.

Speaks :mod:`ghostcore.relaywire` (read its docstring for the frames and the auth). The hub
(:mod:`ghostgate.relay_hub`, fed by the QUIC and TLS edges) gives every transport connection an opaque integer
id and calls :meth:`RelayCore.open`, :meth:`RelayCore.stream` (bytes of the control stream: QUIC stream 0 or
the TLS byte stream), :meth:`RelayCore.datagram` (a QUIC DATAGRAM frame), :meth:`RelayCore.lost` (the
transport went away) and :meth:`RelayCore.timer` at :meth:`RelayCore.next_timer`. Each returns :class:`Send`
(a stream frame to write), :class:`Deliver` (a packet for a connection; the edge picks the form: a QUIC
DATAGRAM when it fits, else a RECV stream frame) and :class:`Close` actions.

Per connection: await HELLO -> CHALLENGE sent -> authenticated. The challenge is 32 fresh random bytes per
connection, so a recorded AUTH fails the proof on any other connection (replay) and ``expiry`` bounds a
token's life. One route per node key: a newer authenticated connection for a key replaces the older one,
which gets ERROR and is closed (a node that reconnected after a network change wins over its dead past).

Robustness against bad input: nothing a client sends raises out of these methods. Anything before AUTH_OK
other than the handshake, bad frames, unknown types, oversize lengths, bad or expired proofs, and handshakes
that take longer than ``handshake_timeout`` end in ERROR + :class:`Close`, counted in ``counters``; a closed
connection is forgotten at once (no state outlives it). SEND to a key with no connection answers PEER_GONE, at
most once per destination per ``peer_gone_interval`` and ``peer_gone_burst`` per interval in total, so a flood
is not echoed 1:1.

Revocation (with ``[control]``: a :class:`ghostgate.nodeset.NodeSet` ghostmesh keeps current): an AUTH whose
credentials verify is still refused when its node key is not in the set ("relay AUTH: node not current",
``not_current``), and :meth:`RelayCore.revoke` closes the connections of keys that just left it (a node
deleted or expired, the old key of a rotation; ``revoked``). Without a set, credentials alone decide.
"""

from __future__ import annotations

import base64
import heapq
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from ghostcore import relaywire as rw
from ghostgate.nodeset import NodeSet, Revoked

HANDSHAKE_TIMEOUT = 10.0
PEER_GONE_INTERVAL = 1.0
PEER_GONE_BURST = 16
# A RECV stream frame carries the 32-byte source key in front of the packet, within MAX_PAYLOAD.
MAX_PACKET = rw.MAX_PAYLOAD - rw.KEY_LEN
PING_LEN = 8
NOT_CURRENT = "relay AUTH: node not current (deleted, expired or its key replaced at ghostmesh)"
REVOKED = "relay: node not current (deleted, expired or its key replaced at ghostmesh)"


@dataclass(frozen=True)
class Send:
    """Write ``data`` (one or more stream frames) on connection ``conn``'s control stream."""

    conn: int
    data: bytes


@dataclass(frozen=True)
class Deliver:
    """Hand ``packet`` from node key ``src`` to connection ``conn`` (a RECV, in the form the edge picks)."""

    conn: int
    src: bytes
    packet: bytes


@dataclass(frozen=True)
class Close:
    """Close connection ``conn`` (after writing what was sent before); the core has already forgotten it."""

    conn: int
    reason: str


Action = Send | Deliver | Close


class State(Enum):
    AWAIT_HELLO = "await_hello"
    CHALLENGED = "challenged"
    AUTHENTICATED = "authenticated"


@dataclass
class Conn:
    id: int
    deadline: float
    state: State = State.AWAIT_HELLO
    reader: rw.FrameReader = field(default_factory=rw.FrameReader)
    challenge: bytes = b""
    key: bytes | None = None
    # PEER_GONE rate limiting: last answer per destination, and the answers in the current window.
    gone_sent: dict[bytes, float] = field(default_factory=dict)
    gone_window: float = 0.0
    gone_count: int = 0


def key_id(key: bytes) -> str:
    """A node's public key as ghostmesh spells it (base64): fine for logs and ERROR reasons."""
    return base64.b64encode(key).decode()


class RelayCore:
    """The relay's routing table and per-connection state machines; see the module docstring."""

    def __init__(
        self,
        secret: bytes,
        *,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        peer_gone_interval: float = PEER_GONE_INTERVAL,
        peer_gone_burst: int = PEER_GONE_BURST,
        random: Callable[[int], bytes] = os.urandom,
        roster: NodeSet | None = None,
    ) -> None:
        self._secret = secret
        self.roster = roster  # None: no [control], credentials alone decide
        self._static = rw.relay_static_key(secret)  # the key proofs of AUTH are made for (relaywire)
        self.handshake_timeout = handshake_timeout
        self.peer_gone_interval = peer_gone_interval
        self.peer_gone_burst = peer_gone_burst
        self._random = random
        self.conns: dict[int, Conn] = {}
        self.routes: dict[bytes, int] = {}
        self.counters: Counter[str] = Counter()
        self._deadlines: list[tuple[float, int]] = []  # heap; stale entries skipped lazily

    def __repr__(self) -> str:  # the secret stays out of reprs
        return f"RelayCore(conns={len(self.conns)}, routes={len(self.routes)})"

    # ----- driving the core

    def open(self, conn: int, now: float) -> list[Action]:
        """A new transport connection; the client speaks first (HELLO)."""
        if conn in self.conns:
            raise ValueError(f"relay core: connection id {conn} is already open")
        deadline = now + self.handshake_timeout
        self.conns[conn] = Conn(conn, deadline)
        heapq.heappush(self._deadlines, (deadline, conn))
        self.counters["connections"] += 1
        return []

    def stream(self, conn: int, data: bytes, now: float) -> list[Action]:
        """Bytes read from ``conn``'s control stream."""
        c = self.conns.get(conn)
        if c is None:
            return []  # already closed by us; the edge may still hold bytes that were in flight
        try:
            frames = c.reader.feed(data)
        except rw.RelayProtocolError as exc:
            return self._fail(c, str(exc), "malformed")
        out: list[Action] = []
        for frame in frames:
            out += self._frame(c, frame, now)
            if conn not in self.conns:
                break
        return out

    def datagram(self, conn: int, data: bytes, now: float) -> list[Action]:
        """One QUIC DATAGRAM frame from ``conn``: a SEND (RFC 9221 frames carry no length field)."""
        c = self.conns.get(conn)
        if c is None:
            return []
        if c.state is not State.AUTHENTICATED:
            return self._fail(c, "relay: datagram before AUTH_OK", "unauthenticated")
        try:
            ftype, dst, packet = rw.decode_datagram(data)
        except rw.RelayProtocolError as exc:
            return self._fail(c, str(exc), "malformed")
        if ftype != rw.SEND:
            return self._fail(c, "relay: a client sends SEND datagrams, not RECV", "unexpected")
        return self._forward(c, dst, packet, now)

    def lost(self, conn: int) -> list[Action]:
        """The transport of ``conn`` went away (peer closed, idle timeout, reset)."""
        c = self.conns.get(conn)
        if c is not None:
            self._drop(c)
            self.counters["lost"] += 1
        return []

    def reject(self, conn: int, reason: str, counter: str = "malformed") -> list[Action]:
        """ERROR + Close for a violation only the edge can see (e.g. data on a QUIC stream other than 0)."""
        c = self.conns.get(conn)
        return [] if c is None else self._fail(c, reason, counter)

    def revoke(self, revoked: Revoked) -> list[Action]:
        """Close the authenticated connections of keys that left the roster (``revoked.everything``: check
        every connection, after the first set a gate ever got)."""
        roster = self.roster
        if roster is None or not revoked:
            return []
        keys = self.routes if revoked.everything else revoked.keys
        out: list[Action] = []
        for key in [k for k in keys if k in self.routes and not roster.allows_key(k)]:
            out += self._fail(self.conns[self.routes[key]], REVOKED, "revoked")
        return out

    def timer(self, now: float) -> list[Action]:
        """Close connections whose handshake did not finish in ``handshake_timeout``."""
        out: list[Action] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, conn = heapq.heappop(self._deadlines)
            c = self.conns.get(conn)
            if c is not None and c.state is not State.AUTHENTICATED and c.deadline == deadline:
                out += self._fail(c, "relay: handshake timed out", "handshake_timeout")
        return out

    def next_timer(self) -> float | None:
        while self._deadlines:
            deadline, conn = self._deadlines[0]
            c = self.conns.get(conn)
            if c is not None and c.state is not State.AUTHENTICATED and c.deadline == deadline:
                return deadline
            heapq.heappop(self._deadlines)
        return None

    # ----- internals

    def _frame(self, c: Conn, frame: rw.Frame, now: float) -> list[Action]:
        if c.state is State.AWAIT_HELLO:
            if frame.type != rw.HELLO:
                return self._fail(c, "relay: expected HELLO", "unauthenticated")
            if frame.payload != rw.MAGIC:
                return self._fail(c, "relay: HELLO with a wrong magic (not ghostrelay-v1)", "malformed")
            c.challenge = self._random(rw.CHALLENGE_LEN)
            c.state = State.CHALLENGED
            return [Send(c.id, rw.encode(rw.CHALLENGE, c.challenge))]
        if c.state is State.CHALLENGED:
            if frame.type != rw.AUTH:
                return self._fail(c, "relay: expected AUTH", "unauthenticated")
            return self._auth(c, frame.payload, now)
        if frame.type == rw.SEND:
            if len(frame.payload) < rw.KEY_LEN:
                return self._fail(c, "relay frame: SEND shorter than a node key", "malformed")
            dst, packet = rw.split_keyed(frame.payload)
            return self._forward(c, dst, packet, now)
        if frame.type == rw.PING:
            if len(frame.payload) != PING_LEN:
                reason = f"relay frame: PING of {len(frame.payload)} bytes, expected 8"
                return self._fail(c, reason, "malformed")
            self.counters["ping"] += 1
            return [Send(c.id, rw.encode(rw.PONG, frame.payload))]
        if frame.type == rw.PONG:
            self.counters["pong"] += 1  # PING/PONG go both ways; we never ping, so nothing to match
            return []
        reason = f"relay: frame type 0x{frame.type:02x} not allowed from a client here"
        return self._fail(c, reason, "unexpected")

    def _auth(self, c: Conn, payload: bytes, now: float) -> list[Action]:
        try:
            _, expiry, _, _ = rw.decode_auth(payload)
        except rw.RelayProtocolError as exc:
            return self._fail(c, str(exc), "malformed")
        if expiry < now:
            reason = "relay AUTH: credentials expired (ask ghostmesh for a new map)"
            return self._fail(c, reason, "auth_expired")
        try:
            key = rw.verify_auth(self._secret, self._static, payload, c.challenge, now)
        except rw.RelayProtocolError as exc:
            return self._fail(c, str(exc), "auth_failed")
        if self.roster is not None and not self.roster.allows_key(key):
            return self._fail(c, NOT_CURRENT, "not_current")
        out: list[Action] = []
        old = self.routes.get(key)
        if old is not None and old != c.id and old in self.conns:
            reason = "relay: replaced by a newer connection for this node key"
            out += self._fail(self.conns[old], reason, "replaced")
        c.state, c.key, c.challenge = State.AUTHENTICATED, key, b""
        self.routes[key] = c.id
        self.counters["authenticated"] += 1
        out.append(Send(c.id, rw.encode(rw.AUTH_OK)))
        return out

    def _forward(self, c: Conn, dst: bytes, packet: bytes, now: float) -> list[Action]:
        src = c.key or b""  # only authenticated connections (key set) get here
        if len(packet) > MAX_PACKET:
            return self._fail(c, f"relay: packet of {len(packet)} bytes exceeds {MAX_PACKET}", "oversize")
        target = self.routes.get(dst)
        if target is not None:
            self.counters["forwarded"] += 1
            self.counters["forwarded_bytes"] += len(packet)
            return [Deliver(target, src, packet)]
        self.counters["unknown_dest"] += 1
        if now - c.gone_window >= self.peer_gone_interval:
            c.gone_window, c.gone_count = now, 0
            # forget answers older than the interval, so the per-destination memory stays bounded
            c.gone_sent = {k: t for k, t in c.gone_sent.items() if now - t < self.peer_gone_interval}
        last = c.gone_sent.get(dst)
        recent = last is not None and now - last < self.peer_gone_interval
        if c.gone_count >= self.peer_gone_burst or recent:
            self.counters["peer_gone_suppressed"] += 1
            return []
        c.gone_sent[dst] = now
        c.gone_count += 1
        self.counters["peer_gone"] += 1
        return [Send(c.id, rw.encode(rw.PEER_GONE, dst))]

    def _fail(self, c: Conn, reason: str, counter: str) -> list[Action]:
        self.counters[counter] += 1
        self._drop(c)
        data = rw.encode(rw.ERROR, reason.encode()[: rw.MAX_PAYLOAD])
        return [Send(c.id, data), Close(c.id, reason)]

    def _drop(self, c: Conn) -> None:
        self.conns.pop(c.id, None)
        if c.key is not None and self.routes.get(c.key) == c.id:
            del self.routes[c.key]
