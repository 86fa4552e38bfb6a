"""Transcripts of the sans-IO relay core (ghostgate.relay_core) with a hand-stepped clock, and a fuzz of the
core fed arbitrary bytes: it never raises, counts what it refuses, closes, and keeps no state for a closed
connection."""

from __future__ import annotations

import base64
import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ghostcore import relaywire as rw
from ghostcore.keys import PrivateKey
from ghostgate.relay_core import (
    MAX_PACKET,
    PEER_GONE_BURST,
    Action,
    Close,
    Deliver,
    RelayCore,
    Send,
)

SECRET = b"unit-relay-secret"
T0 = 1_800_000_000.0
PRIVATE = [PrivateKey.generate() for _ in range(3)]
A_KEY, B_KEY, C_KEY = (k.public_key().raw for k in PRIVATE)
_BY_KEY = {k.public_key().raw: k for k in PRIVATE}
STATIC = rw.relay_static_key(SECRET).public_key()


def auth(key: bytes, expiry: int, tok: bytes, challenge: bytes) -> bytes:
    """The AUTH payload the holder of ``key``'s private half makes (relaywire: token and key proofs)."""
    return rw.encode_auth(_BY_KEY[key], STATIC, expiry, tok, challenge)


def make_core(**kw: object) -> RelayCore:
    counter = itertools.count()
    # deterministic, distinct challenges: 32 bytes from a counter
    return RelayCore(SECRET, random=lambda n: next(counter).to_bytes(n, "big"), **kw)  # type: ignore[arg-type]


def frames(actions: list[Action], conn: int) -> list[rw.Frame]:
    reader = rw.FrameReader()
    return reader.feed(b"".join(a.data for a in actions if isinstance(a, Send) and a.conn == conn))


def closed(actions: list[Action]) -> set[int]:
    return {a.conn for a in actions if isinstance(a, Close)}


def token(key: bytes, expiry: int) -> bytes:
    return rw.token_mac(SECRET, base64.b64encode(key).decode(), expiry)


def hello(core: RelayCore, conn: int, now: float = T0) -> bytes:
    core.open(conn, now)
    out = core.stream(conn, rw.encode(rw.HELLO, rw.MAGIC), now)
    (challenge,) = frames(out, conn)
    assert challenge.type == rw.CHALLENGE
    return challenge.payload


def login(core: RelayCore, conn: int, key: bytes, now: float = T0, ttl: int = 3600) -> list[Action]:
    challenge = hello(core, conn, now)
    expiry = int(now) + ttl
    return core.stream(conn, rw.encode(rw.AUTH, auth(key, expiry, token(key, expiry), challenge)), now)


def test_auth_ok_then_forward_and_ping() -> None:
    core = make_core()
    assert frames(login(core, 1, A_KEY), 1) == [rw.Frame(rw.AUTH_OK, b"")]
    assert frames(login(core, 2, B_KEY), 2) == [rw.Frame(rw.AUTH_OK, b"")]
    assert core.routes == {A_KEY: 1, B_KEY: 2}
    assert core.stream(1, rw.encode(rw.SEND, B_KEY + b"pkt"), T0) == [Deliver(2, A_KEY, b"pkt")]
    assert core.datagram(2, rw.encode_datagram(rw.SEND, A_KEY, b"back"), T0) == [Deliver(1, B_KEY, b"back")]
    assert frames(core.stream(1, rw.encode(rw.PING, b"8bytes!!"), T0), 1) == [rw.Frame(rw.PONG, b"8bytes!!")]
    assert core.counters["forwarded"] == 2
    assert core.counters["ping"] == 1
    assert core.next_timer() is None  # no handshake pending


def test_frames_split_across_reads() -> None:
    core = make_core()
    login(core, 1, A_KEY)
    login(core, 2, B_KEY)
    data = rw.encode(rw.SEND, B_KEY + b"one") + rw.encode(rw.SEND, B_KEY + b"two")
    out: list[Action] = []
    for i in range(len(data)):
        out += core.stream(1, data[i : i + 1], T0)
    assert out == [Deliver(2, A_KEY, b"one"), Deliver(2, A_KEY, b"two")]


def test_bad_proof_refused_and_counted() -> None:
    core = make_core()
    challenge = hello(core, 1)
    out = core.stream(1, rw.encode(rw.AUTH, auth(A_KEY, int(T0) + 60, b"wrong", challenge)), T0)
    (err,) = frames(out, 1)
    assert err.type == rw.ERROR
    assert b"bad token proof" in err.payload
    assert closed(out) == {1}
    assert core.counters["auth_failed"] == 1
    assert not core.conns
    assert not core.routes


def test_expired_credentials_refused() -> None:
    core = make_core()
    out = login(core, 1, A_KEY, ttl=-1)
    (err,) = frames(out, 1)
    assert err.type == rw.ERROR
    assert b"expired" in err.payload
    assert closed(out) == {1}
    assert core.counters["auth_expired"] == 1
    # a token valid when minted, presented after its expiry, is refused too
    expiry = int(T0) + 10
    challenge = hello(core, 2, T0 + 11)
    out = core.stream(2, rw.encode(rw.AUTH, auth(A_KEY, expiry, token(A_KEY, expiry), challenge)), T0 + 11)
    assert closed(out) == {2}
    assert core.counters["auth_expired"] == 2
    assert not core.conns


def test_replayed_auth_on_a_second_connection_refused() -> None:
    core = make_core()
    challenge = hello(core, 1)
    expiry = int(T0) + 3600
    recorded = rw.encode(rw.AUTH, auth(A_KEY, expiry, token(A_KEY, expiry), challenge))
    assert frames(core.stream(1, recorded, T0), 1) == [rw.Frame(rw.AUTH_OK, b"")]
    second = hello(core, 2)
    assert second != challenge  # fresh per connection
    out = core.stream(2, recorded, T0 + 1)
    assert frames(out, 2)[0].type == rw.ERROR
    assert closed(out) == {2}
    assert core.counters["auth_failed"] == 1
    assert core.routes == {A_KEY: 1}  # the honest connection is untouched


def test_unknown_destination_peer_gone_rate_limited() -> None:
    core = make_core()
    login(core, 1, A_KEY)
    out = core.stream(1, rw.encode(rw.SEND, C_KEY + b"x") * 5, T0)
    assert frames(out, 1) == [rw.Frame(rw.PEER_GONE, C_KEY)]  # once per destination per interval
    assert core.counters["unknown_dest"] == 5
    assert core.counters["peer_gone_suppressed"] == 4
    out = core.datagram(1, rw.encode_datagram(rw.SEND, C_KEY, b"x"), T0 + 1.5)
    assert frames(out, 1) == [rw.Frame(rw.PEER_GONE, C_KEY)]  # the next interval answers again
    # many distinct unknown keys: at most PEER_GONE_BURST answers per interval
    flood = b"".join(rw.encode(rw.SEND, bytes([i]) * 32) for i in range(100))
    out = core.stream(1, flood, T0 + 3)
    assert len(frames(out, 1)) == PEER_GONE_BURST
    assert not closed(out)


def test_newer_connection_takes_over_the_key() -> None:
    core = make_core()
    login(core, 1, A_KEY)
    login(core, 3, B_KEY)
    out = login(core, 2, A_KEY, now=T0 + 5)
    old = frames(out, 1)
    assert old[0].type == rw.ERROR
    assert b"replaced" in old[0].payload
    assert closed(out) == {1}
    assert frames(out, 2) == [rw.Frame(rw.AUTH_OK, b"")]
    assert core.routes[A_KEY] == 2
    assert core.stream(3, rw.encode(rw.SEND, A_KEY + b"p"), T0 + 5) == [Deliver(2, B_KEY, b"p")]
    assert core.counters["replaced"] == 1
    assert core.stream(1, rw.encode(rw.PING, b"12345678"), T0 + 5) == []  # bytes still in flight: ignored
    core.lost(1)  # the old transport goes away later: must not drop the new route
    assert core.routes[A_KEY] == 2


def test_handshake_timeout_closes_idle_connections() -> None:
    core = make_core(handshake_timeout=10.0)
    core.open(1, T0)
    hello(core, 2, T0 + 2)
    login(core, 3, A_KEY, T0 + 3)
    assert core.next_timer() == T0 + 10
    assert core.timer(T0 + 9.9) == []
    out = core.timer(T0 + 10)
    assert closed(out) == {1}
    assert frames(out, 1)[0].payload == b"relay: handshake timed out"
    assert core.next_timer() == T0 + 12
    assert closed(core.timer(T0 + 20)) == {2}
    assert core.next_timer() is None
    assert set(core.conns) == {3}  # the authenticated one stays
    assert core.counters["handshake_timeout"] == 2


def test_refusals_before_auth_ok() -> None:
    core = make_core()
    cases = [
        (rw.encode(rw.SEND, B_KEY + b"x"), "unauthenticated"),
        (rw.encode(rw.PING, b"12345678"), "unauthenticated"),
        (rw.encode(rw.HELLO, b"wrong magic"), "malformed"),
        (b"\x7f\x00\x00\x00\x00", "malformed"),  # unknown type
        (b"\x10\x00\x01\x00\x00", "malformed"),  # length 65536 > MAX_PAYLOAD
    ]
    for conn, (data, counter) in enumerate(cases, start=1):
        core.open(conn, T0)
        out = core.stream(conn, data, T0)
        assert closed(out) == {conn}, data
        assert frames(out, conn)[0].type == rw.ERROR
        assert core.counters[counter] >= 1
    core.open(99, T0)
    assert closed(core.datagram(99, rw.encode_datagram(rw.SEND, B_KEY, b"x"), T0)) == {99}
    # after HELLO, anything but AUTH
    hello(core, 100)
    assert closed(core.stream(100, rw.encode(rw.SEND, B_KEY), T0)) == {100}
    assert core.counters["unauthenticated"] == 4
    assert not core.conns


def test_refusals_after_auth_ok() -> None:
    core = make_core()
    bad = [
        rw.encode(rw.SEND, b"short"),
        rw.encode(rw.PING, b"7bytes!"),
        rw.encode(rw.HELLO, rw.MAGIC),
        rw.encode(rw.RECV, B_KEY),
        rw.encode(rw.AUTH, b""),
    ]
    extra = [PrivateKey.generate() for _ in bad]
    _BY_KEY.update({k.public_key().raw: k for k in extra})
    for conn, (data, node) in enumerate(zip(bad, extra, strict=True), start=1):
        login(core, conn, node.public_key().raw)
        assert closed(core.stream(conn, data, T0)) == {conn}, data
    login(core, 10, A_KEY)
    assert closed(core.datagram(10, rw.encode_datagram(rw.RECV, B_KEY, b"x"), T0)) == {10}
    login(core, 11, A_KEY)
    assert closed(core.datagram(11, b"\x10short", T0)) == {11}
    login(core, 12, A_KEY)
    assert closed(core.datagram(12, rw.encode_datagram(rw.SEND, A_KEY, b"\0" * (MAX_PACKET + 1)), T0)) == {12}
    assert core.counters["oversize"] == 1
    assert not core.conns
    assert not core.routes


def test_a_leaked_token_does_not_evict_the_node() -> None:
    """The token in a node's map is not enough to take its key over on the relay: the AUTH must also prove
    the node's private key (relaywire), so the real node keeps its route."""
    core = make_core()
    login(core, 1, A_KEY)
    challenge = hello(core, 2)
    expiry = int(T0) + 3600
    stolen = bytearray(rw.encode_auth(PrivateKey.generate(), STATIC, expiry, token(A_KEY, expiry), challenge))
    stolen[:32] = A_KEY
    (err,) = frames(out := core.stream(2, rw.encode(rw.AUTH, bytes(stolen)), T0), 2)
    assert b"bad key proof" in err.payload
    assert closed(out) == {2}
    assert core.routes == {A_KEY: 1}
    assert core.counters["auth_failed"] == 1


def test_repr_keeps_the_secret_out() -> None:
    assert "unit-relay-secret" not in repr(make_core())


_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _valid_stream(core: RelayCore, conn: int) -> bytes:
    challenge = hello(core, conn)
    expiry = int(T0) + 3600
    return rw.encode(rw.AUTH, auth(B_KEY, expiry, token(B_KEY, expiry), challenge))


@_SETTINGS
@given(
    st.lists(
        st.tuples(st.sampled_from(["stream", "datagram", "timer", "lost"]), st.binary(max_size=120)),
        max_size=30,
    ),
    st.booleans(),
)
def test_core_fed_arbitrary_bytes_never_raises_and_forgets_closed(
    script: list[tuple[str, bytes]], authenticate_first: bool
) -> None:
    core = make_core()
    login(core, 1, A_KEY)  # a bystander that must survive everything
    prefix = _valid_stream(core, 2) if authenticate_first else b""
    if not authenticate_first:
        core.open(2, T0)
    now = T0
    closes = 0
    for i, (kind, data) in enumerate(script):
        now += 0.5
        if kind == "stream":
            out = core.stream(2, (prefix if i == 0 else b"") + data, now)
        elif kind == "datagram":
            out = core.datagram(2, data, now)
        elif kind == "timer":
            out = core.timer(now)
        else:
            out = core.lost(2)
        assert all(a.conn in (1, 2) for a in out)
        if 2 in closed(out):
            closes += 1
            assert 2 not in core.conns
            assert core.routes.get(B_KEY) != 2
            # a closing ERROR always precedes the Close
            assert frames(out, 2)[-1].type == rw.ERROR
    assert closes <= 1
    refused = sum(core.counters[k] for k in ("malformed", "unauthenticated", "unexpected", "oversize"))
    refused += sum(core.counters[k] for k in ("auth_failed", "auth_expired", "handshake_timeout"))
    assert refused == closes
    # nothing leaks: after the handshake deadline, connection 2 is gone unless it authenticated
    core.timer(now + 100)
    assert set(core.conns) <= {1, 2}
    assert core.routes[A_KEY] == 1
    if 2 in core.conns:
        assert core.routes.get(B_KEY) == 2
    assert set(core.routes.values()) <= set(core.conns)


_PAYLOADS = st.one_of(
    st.binary(max_size=80),
    st.sampled_from([A_KEY, B_KEY, C_KEY]).flatmap(lambda k: st.binary(max_size=40).map(lambda p: k + p)),
    st.just(b"12345678"),
)


@_SETTINGS
@given(
    st.lists(st.tuples(st.sampled_from([*sorted(rw.KNOWN), 0x7F]), _PAYLOADS, st.booleans()), max_size=25),
)
def test_core_fed_wellformed_frames_of_any_kind_after_auth(script: list[tuple[int, bytes, bool]]) -> None:
    core = make_core()
    login(core, 1, A_KEY)
    login(core, 2, B_KEY)
    now = T0
    for ftype, payload, as_datagram in script:
        now += 0.1
        data = (
            bytes((ftype,)) + payload
            if as_datagram
            else rw.encode(ftype, payload)
            if ftype != 0x7F
            else b"\x7f"
        )
        out = core.datagram(2, data, now) if as_datagram else core.stream(2, data, now)
        for a in out:
            if isinstance(a, Deliver):
                # only ever from the authenticated key, to a routed connection (itself included)
                assert a.src == B_KEY
                assert a.conn in core.routes.values()
        if 2 not in core.conns:
            assert core.routes == {A_KEY: 1}
            break
    assert core.routes[A_KEY] == 1
    assert set(core.routes.values()) <= set(core.conns)
