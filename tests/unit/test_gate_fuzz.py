"""Bad input for ghostgate's TURN core (TurnCore): random bytes and mutated valid messages never raise,
never create an unauthenticated allocation, and are counted."""

from __future__ import annotations

from aioice import stun
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ghostgate.turn_core import Release
from tests.unit._gate_fixtures import CLIENT, PEER, T0, Client, make_core

_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_SETTINGS
@given(st.lists(st.binary(max_size=200), max_size=20))
def test_random_bytes_never_raise_or_allocate(datagrams: list[bytes]) -> None:
    core, bound = make_core()
    for d in datagrams:
        core.handle_client(d, CLIENT, T0)
        core.handle_peer(d, ("192.0.2.1", 49152), PEER, T0)
    assert not core.allocations
    assert not bound


def _valid_messages() -> list[bytes]:
    core, _ = make_core()
    c = Client(core)
    c.login(T0)
    out = []
    for method, attrs in (
        (stun.Method.BINDING, {}),
        (stun.Method.ALLOCATE, {"REQUESTED-TRANSPORT": 17 << 24, "LIFETIME": 600}),
        (stun.Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": PEER}),
        (stun.Method.CHANNEL_BIND, {"CHANNEL-NUMBER": 0x4000, "XOR-PEER-ADDRESS": PEER}),
        (stun.Method.REFRESH, {"LIFETIME": 0}),
    ):
        msg = stun.Message(method, stun.Class.REQUEST, attributes=dict(attrs))
        msg.attributes.update({"USERNAME": c.username, "REALM": "ghostmesh", "NONCE": c.nonce})
        msg.add_message_integrity(c.key)
        out.append(bytes(msg))
    send = stun.Message(
        stun.Method.SEND, stun.Class.INDICATION, attributes={"XOR-PEER-ADDRESS": PEER, "DATA": b"x"}
    )
    out += [bytes(send), b"\x40\x00\x00\x02hi"]
    return out


VALID = _valid_messages()


@_SETTINGS
@given(
    st.lists(
        st.tuples(
            st.integers(0, len(VALID) - 1),
            st.lists(st.tuples(st.integers(0, 300), st.integers(0, 255)), max_size=4),
            st.integers(0, 400),
        ),
        max_size=25,
    )
)
def test_mutated_valid_messages_never_raise_and_allocations_stay_bounded(
    script: list[tuple[int, list[tuple[int, int]], int]],
) -> None:
    core, bound = make_core(max_allocations=2, max_allocations_per_user=2)
    actions = []
    for idx, flips, cut in script:
        data = bytearray(VALID[idx])
        for pos, val in flips:
            if pos < len(data):
                data[pos] = val
        data = data[: max(cut, 1)] if cut < len(data) else data
        actions += core.handle_client(bytes(data), CLIENT, T0)
        actions += core.handle_client(bytes(data), ("198.51.100.99", 7), T0)
        actions += core.handle_peer(bytes(data), ("192.0.2.1", 49152), PEER, T0)
        assert len(core.allocations) <= 2
    # Every relay the core asked for is released once its allocation ends: none leaked.
    actions += core.handle_timer(T0 + 4000)
    assert not core.allocations
    assert sorted(a.relay for a in actions if isinstance(a, Release)) == sorted(bound)
