"""Revoking relay access, the pure parts: the gate's proof (ghostcore.relaycontrol), ghostmesh's roster of
allowed nodes (ghostmesh.relayroster), the gate's copy of it (ghostgate.nodeset), and what the relay and TURN
cores do with it (an AUTH or request of a node not in the set refused, its connections and allocations
closed), as transcripts with a hand-stepped clock; plus a fuzz: whatever the changes, the gate's copy after
each update equals ghostmesh's roster."""

from __future__ import annotations

import base64
from dataclasses import replace

import pytest
from aioice import stun
from hypothesis import given, settings
from hypothesis import strategies as st

from ghostcore import relaycontrol as rc
from ghostcore.errors import AuthError, ResourceExhausted, Unavailable
from ghostcore.keys import PrivateKey
from ghostcore.pb.ghostmesh.v1 import relaycontrol_pb2 as pb
from ghostgate import relay_core
from ghostgate.nodeset import NodeSet, NodeSetError, Revoked
from ghostgate.turn_core import Release
from ghostmesh import relayroster
from ghostmesh.changes import LockChanged, NodeAdded, NodeChanged, NodeRemoved
from ghostmesh.relayroster import Roster
from ghostmesh.store.base import NodeRec
from tests.unit._gate_fixtures import PEER, Client
from tests.unit._gate_fixtures import make_core as make_turn_core
from tests.unit.test_relay_core import A_KEY, B_KEY, C_KEY, closed, frames, login
from tests.unit.test_relay_core import make_core as make_relay_core

SECRET = b"unit-control-secret"
T0 = 1_800_000_000.0
NONCE = bytes(range(16))
KEYS = [PrivateKey.generate().public_key() for _ in range(6)]
RAW = [k.raw for k in KEYS]


def rec(i: int, key: int, *, expires: float = 0.0, pending: int | None = None) -> NodeRec:
    return NodeRec(
        id=i, name=f"n{i}", user="u", node_key=KEYS[key].base64(), ipv4=f"100.64.0.{i}",
        ipv6=f"fd7a:115c:a1e0::{i:x}", ephemeral=False, tags=(), created=0.0, expires=expires, last_seen=0.0,
        endpoints=(), hostname="h", auth_key_id=None,
        pending_key=None if pending is None else KEYS[pending].base64(),
    )  # fmt: skip


# -- the gate's proof -----------------------------------------------------------------------------------


def test_a_fresh_proof_verifies_once() -> None:
    mac = rc.proof(SECRET, "gate1", int(T0), NONCE)
    rc.verify(SECRET, "gate1", int(T0), NONCE, mac, now=T0 + 59)
    guard = rc.NonceGuard()
    guard.admit(NONCE, int(T0), T0)
    with pytest.raises(rc.Replayed, match="already used once"):
        guard.admit(NONCE, int(T0), T0 + 1)
    # once its timestamp left the window the nonce is forgotten (the clock check refuses it anyway)
    guard.admit(bytes(16), int(T0) + 200, T0 + 200)
    assert len(guard) == 1


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"now": T0 + 61}, rc.StaleRequest),
        ({"now": T0 - 61}, rc.StaleRequest),
        ({"secret": b"another secret"}, rc.BadProof),
        ({"gate": "gate2"}, rc.BadProof),
        ({"nonce": bytes(16)}, rc.BadProof),
        ({"nonce": NONCE[:8]}, rc.BadProof),
        ({"mac": b"short"}, rc.BadProof),
    ],
)
def test_a_proof_that_does_not_fit_is_refused_in_one_line(change: dict[str, object], error: type) -> None:
    args: dict[str, object] = {
        "secret": SECRET,
        "gate": "gate1",
        "unix_time": int(T0),
        "nonce": NONCE,
        "mac": rc.proof(SECRET, "gate1", int(T0), NONCE),
        "now": T0,
    }
    args.update(change)
    now = args.pop("now")
    with pytest.raises(error) as exc:
        rc.verify(**args, now=now)  # type: ignore[arg-type]
    assert isinstance(exc.value, AuthError)
    assert "\n" not in str(exc.value)
    assert SECRET.decode() not in str(exc.value)


def test_the_nonce_memory_is_bounded() -> None:
    guard = rc.NonceGuard(capacity=2)
    guard.admit(b"a" * 16, int(T0), T0)
    guard.admit(b"b" * 16, int(T0), T0)
    with pytest.raises(Unavailable, match="retry shortly"):
        guard.admit(b"c" * 16, int(T0), T0)
    assert len(guard) == 2


@pytest.mark.parametrize("name", ["", "a b", "gate/1", "x" * 65, "ga\nte", "gäte"])
def test_gate_names_are_refused_unless_plain(name: str) -> None:
    with pytest.raises(Exception, match="expected 1 to 64"):
        rc.check_name(name)
    assert rc.check_name("gate-1.eu_west") == "gate-1.eu_west"


# -- ghostmesh's roster -----------------------------------------------------------------------------------


def delta(updates: list[pb.NodeSetUpdate]) -> tuple[dict[int, set[bytes]], list[int]]:
    (update,) = updates
    assert update.complete
    assert not update.reset
    return {n.node_id: set(n.keys) for n in update.nodes}, list(update.removed)


def full(updates: list[pb.NodeSetUpdate]) -> dict[int, set[bytes]]:
    assert updates[0].reset
    assert updates[-1].complete
    assert all(not u.complete for u in updates[:-1])
    assert all(not u.removed for u in updates)
    return {n.node_id: set(n.keys) for u in updates for n in u.nodes}


def roster_of(*nodes: NodeRec, now: float = T0) -> Roster:
    r = Roster()
    r.load([NodeAdded(n, online=False) for n in nodes], now)
    return r


def test_the_full_set_is_every_unexpired_node_with_its_keys() -> None:
    r = roster_of(rec(1, 0), rec(2, 1, expires=T0 - 1), rec(3, 2, expires=T0 + 60, pending=3))
    w, replaced = r.open("g")
    assert replaced is None
    updates = r.flush(w)
    assert [u.serial for u in updates] == [1]
    assert full(updates) == {1: {RAW[0]}, 3: {RAW[2], RAW[3]}}
    assert r.flush(w) == []  # up to date


def test_deleting_expiring_and_rotating_reach_a_watcher_as_one_delta() -> None:
    r = roster_of(rec(1, 0), rec(2, 1), rec(3, 2))
    w, _ = r.open("g")
    r.flush(w)
    woken = r.apply(
        [
            NodeRemoved(1, "deleted"),
            NodeRemoved(2, "expired"),
            NodeChanged(rec(3, 4), online=True),  # key 2 rotated to key 4 (the promotion's record)
            NodeAdded(rec(4, 5), online=False),
        ],
        T0,
    )
    assert woken == [w.id]
    assert delta(r.flush(w)) == ({3: {RAW[4]}, 4: {RAW[5]}}, [1, 2])
    assert w.serial == 2


def test_records_that_change_nothing_wake_nobody() -> None:
    r = roster_of(rec(1, 0))
    w, _ = r.open("g")
    r.flush(w)
    same = replace(rec(1, 0), endpoints=("192.0.2.1:41641",), home_region=1)
    assert r.apply([NodeChanged(same, online=True), LockChanged(())], T0) == []
    assert r.apply([NodeRemoved(9, "deleted")], T0) == []  # never in the set
    assert r.flush(w) == []


def test_an_expired_node_renamed_stays_out_and_a_renewed_one_comes_back() -> None:
    r = roster_of(rec(1, 0))
    w, _ = r.open("g")
    r.flush(w)
    r.apply([NodeRemoved(1, "expired")], T0)
    assert delta(r.flush(w)) == ({}, [1])
    assert r.apply([NodeChanged(rec(1, 0, expires=T0 - 5), online=False)], T0) == []  # a rename
    r.apply([NodeChanged(rec(1, 0, expires=T0 + 3600), online=False)], T0)  # re-registered
    assert delta(r.flush(w)) == ({1: {RAW[0]}}, [])


def test_a_watcher_far_behind_gets_a_full_set_and_full_sets_come_in_parts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(relayroster, "CHUNK", 2)
    r = roster_of(*(rec(i, i) for i in range(1, 6)))
    w, _ = r.open("g")
    updates = r.flush(w)
    assert [(u.serial, u.reset, u.complete, len(u.nodes)) for u in updates] == [
        (1, True, False, 2),
        (2, False, False, 2),
        (3, False, True, 1),
    ]
    r.apply([NodeRemoved(1, "deleted"), NodeRemoved(2, "deleted")], T0)
    assert len(w.pending) == 2
    r.apply([NodeRemoved(3, "deleted")], T0)  # 3 pending ids > CHUNK: a full set instead
    assert w.pending == set()
    assert full(r.flush(w)) == {4: {RAW[4]}, 5: {RAW[5]}}


def test_an_empty_registry_is_one_complete_empty_set() -> None:
    r = Roster()
    w, _ = r.open("g")
    (update,) = r.flush(w)
    assert (update.reset, update.complete, list(update.nodes)) == (True, True, [])


def test_one_watch_per_gate_name_and_a_bounded_number_of_names() -> None:
    r = Roster(max_watchers=2)
    first, _ = r.open("a")
    second, replaced = r.open("a")
    assert replaced == first.id
    assert first.ended == "replaced"
    assert r.apply([NodeAdded(rec(1, 0), online=False)], T0) == [first.id, second.id]
    r.close(first)  # the replaced one going away keeps the newer one
    assert r.watching() == ["a"]
    r.open("b")
    with pytest.raises(ResourceExhausted, match="at most 2"):
        r.open("c")
    r.close(second)
    r.open("c")
    assert r.watching() == ["b", "c"]


# -- the gate's copy ----------------------------------------------------------------------------------


def update(serial: int, **kw: object) -> pb.NodeSetUpdate:
    nodes = kw.pop("nodes", {})
    assert isinstance(nodes, dict)
    return pb.NodeSetUpdate(
        serial=serial, nodes=[pb.AllowedNode(node_id=i, keys=sorted(k)) for i, k in nodes.items()], **kw
    )


def test_before_a_first_set_everything_is_allowed_then_exactly_the_set() -> None:
    s = NodeSet()
    assert s.allows_key(RAW[0])
    assert s.allows_user("7")
    assert s.allows_user("anything")
    got = s.apply(update(1, reset=True, complete=True, nodes={7: {RAW[0]}}))
    assert got == Revoked(everything=True)
    assert s.synced
    assert s.allows_key(RAW[0])
    assert not s.allows_key(RAW[1])
    assert s.allows_user("7")
    assert not s.allows_user("8")
    assert not s.allows_user("")
    assert not s.allows_user("07x")


def test_deltas_say_what_left() -> None:
    s = NodeSet()
    s.apply(update(1, reset=True, complete=True, nodes={1: {RAW[0]}, 2: {RAW[1]}, 3: {RAW[2], RAW[3]}}))
    got = s.apply(update(2, complete=True, nodes={3: {RAW[3]}, 4: {RAW[4]}}, removed=[1]))
    assert got == Revoked(frozenset({RAW[0], RAW[2]}), frozenset({"1"}))
    assert s.allows_key(RAW[3])
    assert s.allows_key(RAW[4])
    assert not s.allows_key(RAW[2])
    # a key moving from one node to another in one update is not revoked, in either order
    assert s.apply(update(3, complete=True, nodes={2: set(), 5: {RAW[1]}})) == Revoked()
    assert s.apply(update(4, complete=True, nodes={6: {RAW[4]}, 4: set()})) == Revoked()
    assert s.allows_key(RAW[1])
    assert s.allows_key(RAW[4])
    assert s.counters["keys_revoked"] == 2


def test_a_full_set_in_parts_is_swapped_in_whole() -> None:
    s = NodeSet()
    s.apply(update(1, reset=True, complete=True, nodes={1: {RAW[0]}, 2: {RAW[1]}}))
    s.begin()  # a new watch (a reconnect)
    assert s.apply(update(1, reset=True, nodes={2: {RAW[1]}})) == Revoked()
    assert s.allows_key(RAW[0])  # the old set holds until the last part
    got = s.apply(update(2, complete=True, nodes={3: {RAW[2]}}))
    assert got == Revoked(frozenset({RAW[0]}), frozenset({"1"}))
    assert len(s) == 2


@pytest.mark.parametrize(
    "bad",
    [
        update(3, complete=True),  # a gap
        update(2, nodes={9: {b"short"}}, complete=True),
        update(2, nodes={9: {RAW[5]}}),  # partial outside a full set
    ],
)
def test_an_update_that_does_not_follow_changes_nothing(bad: pb.NodeSetUpdate) -> None:
    s = NodeSet()
    s.apply(update(1, reset=True, complete=True, nodes={1: {RAW[0]}}))
    with pytest.raises(NodeSetError):
        s.apply(bad)
    assert s.allows_key(RAW[0])
    assert not s.allows_key(RAW[5])
    assert not s.allows_user("9")


def test_a_delta_before_any_full_set_is_refused() -> None:
    s = NodeSet()
    with pytest.raises(NodeSetError, match="before the first full set"):
        s.apply(update(1, complete=True, nodes={1: {RAW[0]}}))
    assert not s.synced


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["add", "rotate", "pend", "delete", "expire"]), st.integers(1, 5), st.booleans()
        ),
        max_size=40,
    )
)
def test_the_gates_copy_follows_the_roster(steps: list[tuple[str, int, bool]]) -> None:
    """Whatever the changes and however they are batched (a flush after a step or not), after each flush the
    gate allows exactly the roster's keys and ids, and what it reports revoked is exactly what left."""
    roster = Roster()
    nodes: dict[int, NodeRec] = {}
    w, _ = roster.open("g")
    gate = NodeSet()
    for u in roster.flush(w):
        gate.apply(u)
    made: list[bytes] = []

    def fresh() -> str:
        made.append(len(made).to_bytes(32, "big"))
        return base64.b64encode(made[-1]).decode()

    def flush() -> None:
        before = {k for k in made if gate.allows_key(k)}
        users_before = {n for n in range(1, 6) if gate.allows_user(str(n))}
        revoked_keys: set[bytes] = set()
        revoked_users: set[str] = set()
        for u in roster.flush(w):
            got = gate.apply(u)
            assert not got.everything
            revoked_keys |= got.keys
            revoked_users |= got.users
        after = {k for k in made if gate.allows_key(k)}
        assert after == {k for ks in roster.entries.values() for k in ks}
        assert {n for n in range(1, 6) if gate.allows_user(str(n))} == set(roster.entries)
        assert revoked_keys == before - after
        assert revoked_users == {str(n) for n in users_before - set(roster.entries)}

    for op, i, then_flush in [*steps, ("flush", 0, True)]:
        node = nodes.get(i)
        change: NodeAdded | NodeChanged | NodeRemoved | None = None
        if op == "add" and node is None:
            nodes[i] = replace(rec(i, 0), node_key=fresh())
            change = NodeAdded(nodes[i], online=False)
        elif op == "rotate" and node is not None:  # the pending key promoted, or a key replaced outright
            nodes[i] = replace(node, node_key=node.pending_key or fresh(), pending_key=None)
            change = NodeChanged(nodes[i], online=True)
        elif op == "pend" and node is not None:
            nodes[i] = replace(node, pending_key=fresh())
            change = NodeChanged(nodes[i], online=True)
        elif op in ("delete", "expire") and node is not None:
            del nodes[i]
            change = NodeRemoved(i, "deleted" if op == "delete" else "expired")
        if change is not None:
            roster.apply([change], T0)
        if then_flush:
            flush()


# -- the relay core with a roster ----------------------------------------------------------------------------


def synced(*nodes: tuple[int, bytes]) -> NodeSet:
    s = NodeSet()
    s.apply(update(1, reset=True, complete=True, nodes={i: {k} for i, k in nodes}))
    return s


def test_relay_auth_of_a_key_not_in_the_set_is_refused_after_its_proof() -> None:
    core = make_relay_core(roster=synced((1, A_KEY)))
    assert frames(login(core, 1, A_KEY), 1) == [relay_core.rw.Frame(relay_core.rw.AUTH_OK, b"")]
    out = login(core, 2, B_KEY)
    assert frames(out, 2) == [relay_core.rw.Frame(relay_core.rw.ERROR, relay_core.NOT_CURRENT.encode())]
    assert relay_core.NOT_CURRENT.startswith("relay AUTH: node not current")
    assert closed(out) == {2}
    assert core.counters["not_current"] == 1
    assert core.routes == {A_KEY: 1}
    assert 2 not in core.conns


def test_an_unsynced_roster_and_no_roster_accept_every_valid_credential() -> None:
    for core in (make_relay_core(roster=NodeSet()), make_relay_core()):
        assert frames(login(core, 1, B_KEY), 1) == [relay_core.rw.Frame(relay_core.rw.AUTH_OK, b"")]
        assert core.revoke(Revoked(everything=True)) == []
        assert core.routes == {B_KEY: 1}


def test_revoking_closes_only_the_keys_that_left() -> None:
    roster = NodeSet()
    core = make_relay_core(roster=roster)
    for conn, key in ((1, A_KEY), (2, B_KEY), (3, C_KEY)):
        login(core, conn, key)
    # the first set: every connection checked, C is not in it
    out = core.revoke(roster.apply(update(1, reset=True, complete=True, nodes={1: {A_KEY}, 2: {B_KEY}})))
    assert closed(out) == {3}
    assert frames(out, 3) == [relay_core.rw.Frame(relay_core.rw.ERROR, relay_core.REVOKED.encode())]
    out = core.revoke(roster.apply(update(2, complete=True, removed=[1])))
    assert closed(out) == {1}
    assert core.routes == {B_KEY: 2}
    assert core.counters["revoked"] == 2
    # A's AUTH is refused from now on; B still forwards
    assert closed(login(core, 4, A_KEY)) == {4}
    assert core.stream(2, relay_core.rw.encode(relay_core.rw.SEND, B_KEY + b"x"), T0)[0].conn == 2


# -- the TURN core with a roster -----------------------------------------------------------------------------


def test_turn_requests_of_a_node_not_in_the_set_get_a_signed_403() -> None:
    roster = synced((1, A_KEY))
    core, bound = make_turn_core()
    core.roster = roster
    good = Client(core, user="1")
    assert good.allocate(T0).message_class == stun.Class.RESPONSE
    other = Client(core, addr=("198.51.100.8", 40000), user="2")
    resp = other.allocate(T0)
    assert resp.error_code == 403
    assert resp.check_message_integrity(other.key)
    assert core.counters["not_current"] == 1
    assert len(bound) == 1


def test_revoking_deletes_the_nodes_allocations_and_refuses_what_follows() -> None:
    roster = synced((1, A_KEY), (2, B_KEY))
    core, bound = make_turn_core()
    core.roster = roster
    gone, kept = Client(core, user="1"), Client(core, addr=("198.51.100.8", 40000), user="2")
    gone.allocate(T0)
    kept.allocate(T0)
    assert gone.request(stun.Method.CREATE_PERMISSION, T0, {"XOR-PEER-ADDRESS": PEER}).error_code is None
    actions = core.revoke(roster.apply(update(2, complete=True, removed=[1])))
    assert actions == [Release(bound[0])]
    assert list(core.allocations) == [kept.addr]
    assert core.counters["allocations_revoked"] == 1
    for method, attrs in (
        (stun.Method.ALLOCATE, {"REQUESTED-TRANSPORT": 17 << 24}),
        (stun.Method.REFRESH, {}),
        (stun.Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": PEER}),
        (stun.Method.CHANNEL_BIND, {"XOR-PEER-ADDRESS": PEER, "CHANNEL-NUMBER": 0x4001}),
    ):
        resp = gone.request(method, T0, attrs)
        assert resp.error_code == 403, method
    # the peer's datagrams to the released relay address find nothing
    assert core.handle_peer(b"late", bound[0], PEER, T0) == []
    assert kept.request(stun.Method.REFRESH, T0).error_code is None
