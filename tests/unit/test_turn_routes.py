"""The TURN core's forwarding table (routes the edge relays from): always what the allocations' channels,
permissions and lifetimes say, and dead the instant any of them lapses (RFC 8656 §7, §9, §12)."""

from __future__ import annotations

import random

from aioice import stun

from ghostcore.addr import HostPort
from ghostgate.turn_core import Transmit, TurnCore
from tests.unit._gate_fixtures import CLIENT, PEER, T0, Client, make_core


def expected(
    core: TurnCore,
) -> tuple[dict[HostPort, dict[int, object]], dict[HostPort, dict[HostPort, object]]]:
    """The routes derived by hand from the allocations, in force or not yet removed by the timer."""
    to_peer: dict[HostPort, dict[int, object]] = {}
    to_client: dict[HostPort, dict[HostPort, object]] = {}
    for alloc in core.allocations.values():
        for number, (peer, channel_expiry) in alloc.channels.items():
            if peer[0] not in alloc.permissions:
                continue
            deadline = min(channel_expiry, alloc.permissions[peer[0]], alloc.expires)
            to_peer.setdefault(alloc.client, {})[number] = (alloc.relay, peer, deadline)
            to_client.setdefault(alloc.relay, {})[peer] = (alloc.client, number.to_bytes(2, "big"), deadline)
    return to_peer, to_client


def table(core: TurnCore) -> tuple[dict[HostPort, dict[int, object]], dict[HostPort, dict[HostPort, object]]]:
    return (
        {c: dict(r) for c, r in core.to_peer.items()},
        {r: dict(p) for r, p in core.to_client.items()},
    )


def bind(c: Client, now: float, number: int, peer: HostPort) -> stun.Message:
    return c.request(stun.Method.CHANNEL_BIND, now, {"CHANNEL-NUMBER": number, "XOR-PEER-ADDRESS": peer})


def test_channel_bind_installs_both_routes_with_the_earliest_deadline() -> None:
    core, bound = make_core()
    c = Client(core)
    c.allocate(T0)
    assert table(core) == ({}, {})
    assert bind(c, T0 + 10, 0x4001, PEER).message_class == stun.Class.RESPONSE
    # The permission (300 s) lapses before the channel (600 s) and the allocation (600 s from T0).
    assert core.to_peer[CLIENT][0x4001] == (bound[0], PEER, T0 + 10 + 300)
    assert core.to_client[bound[0]][PEER] == (CLIENT, b"\x40\x01", T0 + 10 + 300)
    assert table(core) == expected(core)


def test_a_route_is_dead_at_its_deadline_before_the_timer_removes_it() -> None:
    core, bound = make_core()
    c = Client(core)
    c.allocate(T0)
    bind(c, T0, 0x4000, PEER)
    frame = b"\x40\x00\x00\x02hi"
    assert core.handle_client(frame, CLIENT, T0 + 299.9) == [Transmit(b"hi", PEER, bound[0])]
    # The permission lapsed at T0 + 300; no timer has run yet, and nothing is relayed either way.
    assert core.handle_client(frame, CLIENT, T0 + 300) == []
    assert core.handle_peer(b"in", bound[0], PEER, T0 + 300) == []
    assert core.counters["no_permission"] == 1
    assert core.counters["peer_dropped"] == 1
    assert core.to_peer[CLIENT][0x4000][2] == T0 + 300  # still there, dead
    core.handle_timer(T0 + 300)
    assert table(core) == ({}, {}) == expected(core)


def test_create_permission_revives_a_bound_channel_and_refresh_moves_the_deadline() -> None:
    core, _ = make_core()
    c = Client(core)
    c.allocate(T0)
    bind(c, T0, 0x4000, PEER)
    core.handle_timer(T0 + 300)  # the permission went, the channel (600 s) stays
    assert table(core) == ({}, {})
    c.login(T0 + 310)  # a fresh nonce
    c.request(stun.Method.CREATE_PERMISSION, T0 + 310, {"XOR-PEER-ADDRESS": (PEER[0], 1)})  # any port
    assert core.to_peer[CLIENT][0x4000][2] == T0 + 600  # the channel, and the allocation, end first
    c.request(stun.Method.REFRESH, T0 + 320, {"LIFETIME": 3600})
    assert core.to_peer[CLIENT][0x4000][2] == T0 + 600  # the channel is now the earliest
    assert table(core) == expected(core)


def test_delete_by_refresh_zero_and_by_expiry_remove_the_routes() -> None:
    core, bound = make_core()
    a = Client(core)
    b = Client(core, addr=("198.51.100.8", 40001), user="node2")
    a.allocate(T0)
    b.allocate(T0 + 100)
    bind(a, T0, 0x4000, PEER)
    bind(b, T0 + 100, 0x4000, PEER)
    a.request(stun.Method.REFRESH, T0 + 1, {"LIFETIME": 0})
    assert CLIENT not in core.to_peer
    assert bound[0] not in core.to_client
    assert table(core) == expected(core)
    core.handle_timer(T0 + 700)  # b's allocation (600 s from T0 + 100) expired
    assert table(core) == ({}, {}) == expected(core)


def test_the_table_follows_random_operations() -> None:
    rng = random.Random(8656)
    core, _ = make_core(max_allocations=4)
    clients = [Client(core, addr=("198.51.100.9", 1000 + i), user=f"u{i}") for i in range(4)]
    peers = [("203.0.113.1", 1), ("203.0.113.1", 2), ("203.0.113.2", 1)]
    now = T0
    for _ in range(400):
        now += rng.choice([0.5, 5.0, 60.0, 250.0])
        c = rng.choice(clients)
        c.login(now)  # nonces go stale after 600 s: always a fresh one
        op = rng.randrange(5)
        if op == 0 and c.addr not in core.allocations:
            c.allocate(now)
        elif op == 1:
            bind(c, now, rng.choice([0x4000, 0x4001]), rng.choice(peers))
        elif op == 2:
            c.request(stun.Method.CREATE_PERMISSION, now, {"XOR-PEER-ADDRESS": rng.choice(peers)})
        elif op == 3:
            c.request(stun.Method.REFRESH, now, {"LIFETIME": rng.choice([0, 60, 600])})
        else:
            core.handle_timer(now)
        assert table(core) == expected(core)
        for client, routes in core.to_peer.items():
            for number, (relay, peer, deadline) in routes.items():
                out = core.handle_client(number.to_bytes(2, "big") + b"\x00\x01x", client, now)
                assert out == ([Transmit(b"x", peer, relay)] if deadline > now else [])
    assert core.counters["relayed_to_peer"] > 0


def test_count_relayed_adds_what_the_edge_forwarded() -> None:
    core, _ = make_core()
    core.count_relayed(3, 3600, 2, 2400)
    core.count_relayed(1, 1200, 0, 0)
    assert core.counters["relayed_to_peer"] == 4
    assert core.counters["relayed_to_peer_bytes"] == 4800
    assert core.counters["relayed_to_client"] == 2
    assert core.counters["relayed_to_client_bytes"] == 2400
