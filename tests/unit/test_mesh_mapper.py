"""The mapper driven by hand: full maps, deltas, coalescing, serials, expiry, and O(change) work."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ghostcore.pb.ghostmesh.v1 import coordination_pb2 as pb
from ghostcore.policy import ALLOW_ALL
from ghostmesh.changes import LockChanged, NodeAdded, NodeChanged, NodeRemoved
from ghostmesh.mapper import Mapper, filter_to_pb, node_to_pb
from ghostmesh.store.base import NodeRec

NOW = 1000.0


def rec(i: int, *, expires: float = 0.0, name: str = "") -> NodeRec:
    return NodeRec(
        id=i,
        name=name or f"n{i}",
        user="default",
        node_key=f"key{i}",
        ipv4=f"100.64.{i // 250}.{i % 250 + 1}",
        ipv6=f"fd7a:115c:a1e0::{i:x}",
        ephemeral=False,
        tags=(),
        created=0.0,
        expires=expires,
        last_seen=0.0,
        endpoints=(),
        hostname="h",
        auth_key_id=None,
    )


def mapper_with(n: int) -> Mapper:
    m = Mapper(keepalive_seconds=25)
    m.load((NodeAdded(rec(i), False) for i in range(1, n + 1)), NOW)
    return m


def test_full_map_on_open() -> None:
    m = mapper_with(3)
    full = m.open_stream(10, 1)
    assert full.serial == 1
    assert full.full
    assert full.self.id == 1
    assert full.keepalive_seconds == 25
    assert sorted(p.id for p in full.peers_upserted) == [2, 3]
    assert list(full.self.allowed_ips) == ["100.64.0.2/32", "fd7a:115c:a1e0::1/128"]
    assert m.flush(10) is None


def test_unknown_or_expired_node_cannot_open() -> None:
    m = Mapper(25)
    m.load([NodeAdded(rec(1, expires=NOW - 1), False), NodeAdded(rec(2), False)], NOW)
    with pytest.raises(KeyError):
        m.open_stream(1, 1)
    assert [p.id for p in m.open_stream(2, 2).peers_upserted] == []


def test_added_node_reaches_other_streams_with_serials() -> None:
    m = mapper_with(2)
    m.open_stream(1, 1)
    m.open_stream(2, 2)
    touched = m.apply(NodeAdded(rec(3), False), NOW)
    assert sorted(touched) == [1, 2]
    u1 = m.flush(1)
    assert u1 is not None
    assert (u1.serial, u1.full, [p.id for p in u1.peers_upserted]) == (2, False, [3])
    assert not u1.HasField("self")
    assert m.flush(1) is None
    m.apply(NodeChanged(rec(3, name="renamed"), True), NOW)
    u1b = m.flush(1)
    assert u1b is not None
    assert u1b.serial == 3
    assert u1b.peers_upserted[0].name == "renamed"
    assert u1b.peers_upserted[0].online


def test_self_change_sets_self() -> None:
    m = mapper_with(2)
    m.open_stream(1, 1)
    m.apply(NodeChanged(rec(1, name="me"), True), NOW)
    u = m.flush(1)
    assert u is not None
    assert u.self.name == "me"
    assert list(u.peers_upserted) == []


def test_burst_coalesces_latest_wins() -> None:
    m = mapper_with(2)
    m.open_stream(1, 1)
    for i in range(5):
        m.apply(NodeChanged(rec(2, name=f"v{i}"), False), NOW)
    u = m.flush(1)
    assert u is not None
    assert [p.name for p in u.peers_upserted] == ["v4"]
    assert u.serial == 2


def test_add_then_remove_cancels_out() -> None:
    m = mapper_with(1)
    m.open_stream(1, 1)
    m.apply(NodeAdded(rec(2), False), NOW)
    m.apply(NodeChanged(rec(2, name="x"), True), NOW)
    m.apply(NodeRemoved(2, "deleted"), NOW)
    assert m.flush(1) is None


def test_change_then_remove_is_a_removal() -> None:
    m = mapper_with(3)
    m.open_stream(1, 1)
    m.apply(NodeChanged(rec(2, name="x"), True), NOW)
    m.apply(NodeRemoved(2, "deleted"), NOW)
    m.apply(NodeRemoved(3, "expired"), NOW)
    u = m.flush(1)
    assert u is not None
    assert list(u.peers_upserted) == []
    assert list(u.peers_removed) == [2, 3]


def test_remove_then_renew_is_an_upsert() -> None:
    m = mapper_with(2)
    m.open_stream(1, 1)
    m.apply(NodeRemoved(2, "expired"), NOW)
    m.apply(NodeChanged(rec(2, expires=NOW + 100), False), NOW)
    u = m.flush(1)
    assert u is not None
    assert [p.id for p in u.peers_upserted] == [2]
    assert list(u.peers_removed) == []


def test_expired_record_counts_as_removal_and_never_a_peer() -> None:
    m = mapper_with(2)
    m.open_stream(1, 1)
    m.apply(NodeChanged(rec(2, expires=NOW - 1), True), NOW)
    u = m.flush(1)
    assert u is not None
    assert list(u.peers_removed) == [2]
    m.open_stream(3, 1)
    full = m.open_stream(4, 1)
    assert [p.id for p in full.peers_upserted] == []
    assert m.apply(NodeRemoved(2, "expired"), NOW) == []  # already gone: nobody is told twice


def test_own_removal_ends_stream() -> None:
    m = mapper_with(2)
    m.open_stream(1, 1)
    m.open_stream(2, 2)
    touched = m.apply(NodeRemoved(1, "deleted"), NOW)
    assert sorted(touched) == [1, 2]
    s = m.session(1)
    assert s is not None
    assert s.ended == "deleted"
    s2 = m.session(2)
    assert s2 is not None
    assert s2.ended is None


def test_close_stream() -> None:
    m = mapper_with(2)
    m.open_stream(1, 1)
    m.close_stream(1)
    assert m.flush(1) is None
    assert m.streams_of(1) == set()


def test_replace_streams_ends_the_nodes_older_streams_only() -> None:
    m = mapper_with(2)
    m.open_stream(1, 1)
    m.open_stream(2, 1)
    m.open_stream(3, 2)
    assert m.replace_streams(1) == [1, 2]
    assert [m.session(sid).ended for sid in (1, 2, 3)] == ["replaced", "replaced", None]  # type: ignore[union-attr]
    assert m.replace_streams(9) == []


def test_signals_field_is_gone_from_the_wire() -> None:
    assert "signals" not in pb.MapUpdate.DESCRIPTOR.fields_by_name
    assert not hasattr(pb, "SignalRequest")


def test_one_change_is_o_n_at_2000_nodes() -> None:
    n = 2000
    m = mapper_with(n)
    for i in range(1, n + 1):
        m.open_stream_bytes(i, i)
    base_builds, base_writes = m.stats.pb_builds, m.stats.delta_writes
    touched = m.apply(NodeChanged(replace(rec(7), name="seven"), True), NOW)
    assert len(touched) == n  # n-1 peers plus its own stream (self changed)
    assert m.stats.pb_builds - base_builds == 1  # one protobuf message, shared by every recipient
    assert m.stats.delta_writes - base_writes == n - 1  # O(N), not O(N^2)
    u = m.flush(1)
    assert u is not None
    assert [p.name for p in u.peers_upserted] == ["seven"]
    # a burst of 50 changes is 50 builds and 50*(N-1) writes, and each stream flushes one update
    base_builds, base_writes = m.stats.pb_builds, m.stats.delta_writes
    for i in range(n + 1, n + 51):
        m.apply(NodeAdded(rec(i), False), NOW)
    assert m.stats.pb_builds - base_builds == 50
    assert m.stats.delta_writes - base_writes == 50 * n
    u = m.flush(2)
    assert u is not None
    assert sorted(p.id for p in u.peers_upserted) == [7, *range(n + 1, n + 51)]  # 7 from before, unflushed
    assert m.flush(2) is None


def test_wire_bytes_equal_message_encoding() -> None:
    m = Mapper(25)
    big = replace(rec(2), endpoints=tuple(f"192.0.2.{i}:41641" for i in range(1, 17)), tags=("tag:a",) * 5)
    m.load([NodeAdded(rec(1), True), NodeAdded(big, False), NodeAdded(rec(3), False)], NOW)
    data = m.open_stream_bytes(1, 1)
    parsed = pb.MapUpdate.FromString(data)
    expected = pb.MapUpdate(
        serial=1,
        full=True,
        keepalive_seconds=25,
        self=node_to_pb(rec(1), True),
        peers_upserted=[node_to_pb(big, False), node_to_pb(rec(3), False)],
        filter=filter_to_pb(ALLOW_ALL),  # no policy: the filter accepts everything
    )
    assert parsed == expected
    assert len(node_to_pb(big, False).SerializeToString()) > 300  # a two-byte length varint is exercised
    m.apply(NodeChanged(big, True), NOW)
    delta = m.flush_bytes(1)
    assert delta is not None
    assert pb.MapUpdate.FromString(delta).peers_upserted[0] == node_to_pb(big, True)


# -- node-key signing ------------------------------------------------------------------------------------


def test_node_carries_its_key_signature() -> None:
    signed = replace(rec(2), key_signature=b"\x01chain")
    m = mapper_with(2)
    m.open_stream(10, 1)
    m.apply(NodeChanged(signed, True), NOW)
    (peer,) = m.flush(10).peers_upserted  # type: ignore[union-attr]
    assert peer.key_signature == b"\x01chain"
    assert node_to_pb(rec(3), False).key_signature == b""


def test_lock_log_reaches_every_stream_once_and_rides_in_full_maps() -> None:
    m = mapper_with(3)
    assert not m.open_stream(10, 1).HasField("lock")  # no log: no lock in the map
    m.open_stream(11, 2)
    log = (b"update-1", b"update-2")
    touched = m.apply(LockChanged(log), NOW)
    assert sorted(touched) == [10, 11]
    for sid in (10, 11):
        delta = m.flush(sid)
        assert delta is not None
        assert list(delta.lock.updates) == list(log)
        assert list(delta.peers_upserted) == []
        assert m.flush(sid) is None  # sent once
    full = m.open_stream(12, 3)
    assert list(full.lock.updates) == list(log)
    m.apply(NodeChanged(rec(2), True), NOW)
    assert not m.flush(12).HasField("lock")  # type: ignore[union-attr]  # unchanged log: not re-sent
