"""The audit log's store methods and ghostmesh.audit.Auditor, on SQLite and PostgreSQL
(:mod:`tests.component._store_fixtures`): sealing in the caller's transaction, two writers, pruning by
retention, the entries the server writes itself."""

from __future__ import annotations

import dataclasses
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ghostcore import auditchain as ac
from ghostcore.auditchain import GENESIS, AuditRecord
from ghostcore.errors import Conflict
from ghostmesh import audit
from ghostmesh.changes import NodeChanged, NodeRemoved
from ghostmesh.limits import Coalesced
from ghostmesh.store.base import NodeRec
from ghostmesh.store.sql import SqlStore
from tests.component._store_fixtures import Backend, backend, store

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


__all__ = ["backend", "store"]  # fixtures


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_record_appends_a_verifiable_chain(store: SqlStore) -> None:
    auditor = audit.Auditor(store, KEY, clock=lambda: 1234.5678)
    first = auditor.record("admin@unix", audit.USER_CREATE, "alice", {"id": 1}, "unix:")
    auditor.record("apikey:0123456789ab", audit.NODE_DELETE, "n1", None, "ipv4:127.0.0.1:5")
    assert (first.seq, first.ts_ms, first.prev_hash, first.detail) == (1, 1234567, GENESIS, '{"id":1}')
    entries = store.list_audit()
    assert [e.seq for e in entries] == [1, 2]
    assert entries[0] == first
    assert ac.verify(entries, auditor.public_key).ok
    assert KEY.private_bytes_raw().hex() not in repr(auditor)


def test_record_joins_the_callers_transaction(store: SqlStore) -> None:
    auditor = audit.Auditor(store, KEY)

    def change() -> None:
        with store.transaction():
            store.create_user("alice", 1.0)
            auditor.record("admin@unix", audit.USER_CREATE, "alice")
            store.create_user("alice", 1.0)  # refused after the row was sealed: both roll back

    with pytest.raises(Conflict):
        change()
    assert store.list_users() == []
    assert store.list_audit() == []


def test_auditor_resumes_after_reopen(backend: Backend) -> None:
    s = backend.open()
    audit.Auditor(s, KEY).record("system", audit.NODE_EXPIRE, "a")
    s.close()
    s = backend.open()
    try:
        auditor = audit.Auditor(s, KEY)
        assert auditor.record("system", audit.NODE_EXPIRE, "b").seq == 2
        assert ac.verify(s.list_audit(), auditor.public_key).ok
    finally:
        s.close()


def test_list_after_and_limit_and_last(store: SqlStore) -> None:
    auditor = audit.Auditor(store, KEY)
    assert store.last_audit() is None
    for i in range(5):
        auditor.record("system", audit.NODE_DELETE, f"n{i}")
    assert [e.seq for e in store.list_audit(after_seq=2)] == [3, 4, 5]
    assert [e.seq for e in store.list_audit(after_seq=1, limit=2)] == [2, 3]
    last = store.last_audit()
    assert last is not None
    assert last.seq == 5


def test_append_checks_seq_and_link_in_the_transaction(store: SqlStore) -> None:
    one = ac.seal(AuditRecord(1, 0, "a", "b", "c", "{}", "", GENESIS), KEY)
    store.append_audit(one)
    with pytest.raises(Conflict, match="audit entry 3: the log ends at seq 1"):
        store.append_audit(dataclasses.replace(one, seq=3, prev_hash=one.hash))
    with pytest.raises(Conflict, match="audit entry 2"):
        store.append_audit(dataclasses.replace(one, seq=2, prev_hash=GENESIS))
    assert [e.seq for e in store.list_audit()] == [1]


def test_two_writers_continue_one_chain(store: SqlStore) -> None:
    a, b = audit.Auditor(store, KEY), audit.Auditor(store, KEY)
    a.record("system", audit.NODE_DELETE, "x")
    assert b.record("system", audit.NODE_DELETE, "y").seq == 2  # sealed after the store's last entry
    assert a.record("system", audit.NODE_DELETE, "z").seq == 3
    assert ac.verify(store.list_audit(), a.public_key).ok


def test_timer_entries_are_system(store: SqlStore) -> None:
    changes = [NodeRemoved(3, "expired"), NodeRemoved(4, "deleted"), NodeRemoved(5, "deleted")]
    node = NodeRec(6, "n", "u", "k", "100.64.0.6", "fd7a::6", False, (), 0, 0, 0, (), "h", None)
    got = audit.timer_entries([*changes, NodeChanged(node, True)], {3: "web", 4: "eph"})
    assert [(e.actor, e.action, e.target) for e in got] == [
        ("system", "node.expire", "web"),
        ("system", "node.delete", "eph"),
        ("system", "node.delete", "#5"),
    ]


def test_coalesced_entries_say_what_was_folded() -> None:
    routes = audit.coalesced_entry(Coalesced("routes", "7", 100.0, {"route.advertise": 40}), "web")
    assert (routes.actor, routes.action, routes.target) == ("node:web", "audit.coalesced", "web")
    assert routes.detail == {"dropped": {"route.advertise": 40}, "since_ms": 100_000, "window_s": 60}
    assert audit.coalesced_entry(Coalesced("routes", "7", 100.0, {})).target == "#7"  # node gone
    auth = audit.coalesced_entry(Coalesced("auth", "198.51.100.7", 5.0, {"Sync": 20, "Register": 3}, 4))
    assert (auth.actor, auth.action, auth.target, auth.remote) == (
        "system",
        "auth.failed",
        "198.51.100.7",
        "198.51.100.7",
    )
    assert auth.detail["failures"] == 23
    assert auth.detail["refused"] == 4


def test_prune_writes_the_cut_then_removes_only_old_entries(store: SqlStore) -> None:
    clock = Clock(1000.0)
    auditor = audit.Auditor(store, KEY, clock)
    for i in range(3):
        auditor.record("system", audit.NODE_DELETE, f"old{i}")
    clock.now = 5000.0
    auditor.record("system", audit.NODE_DELETE, "young")
    cut = store.list_audit()[2]
    clock.now = 5000.0 + 3600.0
    assert auditor.prune(retention=7200.0) == 3
    kept = store.list_audit()
    assert [(e.seq, e.target) for e in kept] == [(4, "young"), (5, "audit")]
    prune = kept[-1]
    assert (prune.actor, prune.action) == ("system", "audit.prune")
    assert json.loads(prune.detail) == {"retention_s": 7200, "through_seq": 3, "through_hash": cut.hash.hex()}
    verdict = ac.verify(kept, auditor.public_key)
    assert verdict.ok, verdict.problem
    assert verdict.first_seq == 4
    assert auditor.prune(retention=7200.0) == 0  # nothing that old any more: no entry written
    assert [e.seq for e in store.list_audit()] == [4, 5]
    assert auditor.record("system", audit.NODE_DELETE, "after").seq == 6


def test_prune_of_a_log_entirely_old_keeps_the_prune_entry(store: SqlStore) -> None:
    clock = Clock(1000.0)
    auditor = audit.Auditor(store, KEY, clock)
    auditor.record("system", audit.NODE_DELETE, "a")
    clock.now = 1000.0 + 86400.0
    assert auditor.prune(retention=3600.0) == 1
    kept = store.list_audit()
    assert [e.action for e in kept] == ["audit.prune"]
    assert ac.verify(kept, auditor.public_key).ok
