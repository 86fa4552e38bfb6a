"""The audit log's store methods and ghostmesh.audit.Auditor, on a SQLite file in a tmp dir."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from ghostcore import auditchain as ac
from ghostcore.auditchain import GENESIS, AuditRecord
from ghostcore.errors import Conflict, Unavailable
from ghostmesh import audit
from ghostmesh.changes import NodeChanged, NodeRemoved
from ghostmesh.store.base import NodeRec
from ghostmesh.store.sqlite import SqliteStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "db.sqlite")
    yield s
    s.close()


def test_key_generated_once_and_kept(store: SqliteStore) -> None:
    k1 = audit.load_audit_key(store)
    k2 = audit.load_audit_key(store)
    assert ac.raw_public_key(k1) == ac.raw_public_key(k2)
    assert store.get_kv(audit.AUDIT_KEY_KV) is not None


def test_record_appends_a_verifiable_chain(store: SqliteStore) -> None:
    key = audit.load_audit_key(store)
    auditor = audit.Auditor(store, key, clock=lambda: 1234.5678)
    first = auditor.record("admin@unix", audit.USER_CREATE, "alice", {"id": 1}, "unix:")
    auditor.record("apikey:0123456789ab", audit.NODE_DELETE, "n1", None, "ipv4:127.0.0.1:5")
    assert (first.seq, first.ts_ms, first.prev_hash, first.detail) == (1, 1234567, GENESIS, '{"id":1}')
    entries = store.list_audit()
    assert [e.seq for e in entries] == [1, 2]
    assert entries[0] == first
    assert ac.verify(entries, auditor.public_key).ok
    assert repr(auditor) == "Auditor(seq=2)"


def test_auditor_resumes_after_reopen(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "db.sqlite")
    auditor = audit.Auditor(s, audit.load_audit_key(s))
    auditor.record("system", audit.NODE_EXPIRE, "a")
    s.close()
    s = SqliteStore(tmp_path / "db.sqlite")
    try:
        auditor = audit.Auditor(s, audit.load_audit_key(s))
        assert auditor.record("system", audit.NODE_EXPIRE, "b").seq == 2
        assert ac.verify(s.list_audit(), auditor.public_key).ok
    finally:
        s.close()


def test_list_after_and_limit_and_last(store: SqliteStore) -> None:
    auditor = audit.Auditor(store, audit.load_audit_key(store))
    assert store.last_audit() is None
    for i in range(5):
        auditor.record("system", audit.NODE_DELETE, f"n{i}")
    assert [e.seq for e in store.list_audit(after_seq=2)] == [3, 4, 5]
    assert [e.seq for e in store.list_audit(after_seq=1, limit=2)] == [2, 3]
    last = store.last_audit()
    assert last is not None
    assert last.seq == 5


def test_append_checks_seq_and_link_in_the_transaction(store: SqliteStore) -> None:
    key = audit.load_audit_key(store)
    one = ac.seal(AuditRecord(1, 0, "a", "b", "c", "{}", "", GENESIS), key)
    store.append_audit(one)
    with pytest.raises(Conflict, match="audit entry 3: the log ends at seq 1"):
        store.append_audit(dataclasses.replace(one, seq=3, prev_hash=one.hash))
    with pytest.raises(Conflict, match="audit entry 2"):
        store.append_audit(dataclasses.replace(one, seq=2, prev_hash=GENESIS))
    assert [e.seq for e in store.list_audit()] == [1]


def test_a_second_writer_makes_record_fail_loudly_then_recover(store: SqliteStore) -> None:
    key = audit.load_audit_key(store)
    a, b = audit.Auditor(store, key), audit.Auditor(store, key)
    a.record("system", audit.NODE_DELETE, "x")
    with pytest.raises(Unavailable, match=r"node.delete y was applied but could not be recorded"):
        b.record("system", audit.NODE_DELETE, "y")
    assert b.record("system", audit.NODE_DELETE, "y").seq == 2  # it reloaded the chain's end
    assert ac.verify(store.list_audit(), a.public_key).ok


def test_timer_changes_are_recorded_as_system(store: SqliteStore) -> None:
    auditor = audit.Auditor(store, audit.load_audit_key(store))
    changes = [NodeRemoved(3, "expired"), NodeRemoved(4, "deleted"), NodeRemoved(5, "deleted")]
    node = NodeRec(6, "n", "u", "k", "100.64.0.6", "fd7a::6", False, (), 0, 0, 0, (), "h", None)
    auditor.record_timer_changes([*changes, NodeChanged(node, True)], {3: "web", 4: "eph"})
    got = [(e.actor, e.action, e.target) for e in store.list_audit()]
    assert got == [
        ("system", "node.expire", "web"),
        ("system", "node.delete", "eph"),
        ("system", "node.delete", "#5"),
    ]
