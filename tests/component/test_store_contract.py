"""The Store contract on every backend (SQLite and PostgreSQL, :mod:`tests.component._store_fixtures`):
uniqueness as Conflict, auth-key consumption in the node's transaction, joined transactions committing
together or not at all, refused writes, the lock log, users' OIDC bindings, routes, API keys, kv."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ghostcore.errors import AuthError, Conflict, NotFound, Unavailable
from ghostmesh.store.base import ApiKeyRec, RouteRec, UserRec
from ghostmesh.store.sql import SqlStore
from tests.component._store_fixtures import Backend, auth_key_rec, backend, node_rec, store

__all__ = ["backend", "store"]  # fixtures


@pytest.fixture(autouse=True)
def _default_user(store: SqlStore) -> None:
    store.create_user("default", 1.0)  # the owner of node_rec() and auth_key_rec()


def test_uniqueness_is_enforced(store: SqlStore) -> None:
    store.insert_node(node_rec())
    with pytest.raises(Conflict, match="name is already taken"):
        store.insert_node(node_rec(key="k2", v4="100.64.0.2", v6="fd7a:115c:a1e0::2"))
    with pytest.raises(Conflict, match="node_key"):
        store.insert_node(node_rec(name="b", v4="100.64.0.2", v6="fd7a:115c:a1e0::2"))
    with pytest.raises(Conflict, match="ipv4"):
        store.insert_node(node_rec(name="b", key="k2", v6="fd7a:115c:a1e0::2"))
    assert len(store.list_nodes()) == 1


def test_single_use_key_consumed_once_and_failure_writes_nothing(store: SqlStore) -> None:
    store.insert_auth_key(auth_key_rec())
    store.insert_node(node_rec(), consume_auth_key="aaaaaaaaaaaa")
    assert store.get_auth_key("aaaaaaaaaaaa").used_count == 1  # type: ignore[union-attr]
    with pytest.raises(AuthError, match="spent"):
        store.insert_node(
            node_rec(name="b", key="k2", v4="100.64.0.2", v6="fd7a:115c:a1e0::2"),
            consume_auth_key="aaaaaaaaaaaa",
        )
    assert [n.name for n in store.list_nodes()] == ["a"]
    assert store.get_auth_key("aaaaaaaaaaaa").used_count == 1  # type: ignore[union-attr]


def test_conflict_rolls_back_key_consumption(store: SqlStore) -> None:
    store.insert_auth_key(auth_key_rec(reusable=True))
    store.insert_node(node_rec())
    with pytest.raises(Conflict):
        store.insert_node(
            node_rec(key="k2", v4="100.64.0.2", v6="fd7a:115c:a1e0::2"), consume_auth_key="aaaaaaaaaaaa"
        )
    assert store.get_auth_key("aaaaaaaaaaaa").used_count == 0  # type: ignore[union-attr]


def test_revoked_key_cannot_be_consumed(store: SqlStore) -> None:
    store.insert_auth_key(auth_key_rec(reusable=True))
    rec = store.revoke_auth_key("aaaaaaaaaaaa")
    assert rec is not None
    assert rec.revoked
    with pytest.raises(AuthError):
        store.insert_node(node_rec(), consume_auth_key="aaaaaaaaaaaa")
    assert store.list_nodes() == []


def test_delete_user_with_nodes_conflicts_and_cascades_keys(store: SqlStore) -> None:
    store.insert_auth_key(auth_key_rec())
    n = store.insert_node(node_rec())
    with pytest.raises(Conflict, match="still owns nodes"):
        store.delete_user("default")
    store.delete_node(n.id)
    store.delete_user("default")
    assert store.list_auth_keys() == []
    with pytest.raises(NotFound):
        store.delete_user("default")


def test_update_and_delete_node(store: SqlStore) -> None:
    n = store.insert_node(node_rec())
    store.update_node(replace(n, name="renamed", endpoints=("[::1]:5",)))
    assert store.list_nodes()[0].name == "renamed"
    assert store.list_nodes()[0].endpoints == ("[::1]:5",)
    store.delete_node(n.id)
    with pytest.raises(NotFound):
        store.delete_node(n.id)
    with pytest.raises(NotFound):
        store.update_node(n)


def test_transaction_commits_its_mutations_together_or_none(store: SqlStore) -> None:
    def refused() -> None:
        with store.transaction():
            store.insert_node(node_rec())
            store.set_kv("k", b"v")
            store.insert_node(
                node_rec(key="k2", v4="100.64.0.2", v6="fd7a:115c:a1e0::2")
            )  # the name is taken

    with pytest.raises(Conflict):
        refused()
    assert store.list_nodes() == []
    assert store.get_kv("k") is None
    with store.transaction(), store.transaction():  # nested: one transaction
        store.insert_node(node_rec())
        store.set_kv("k", b"v")
    assert [n.name for n in store.list_nodes()] == ["a"]
    assert store.get_kv("k") == b"v"


def test_refused_writes_stay_refused(store: SqlStore) -> None:
    store.refuse_writes("a change was lost")
    with pytest.raises(Unavailable, match=r"writes refused \(a change was lost\)"):
        store.set_kv("k", b"v")
    assert store.get_kv("k") is None


def test_lock_log_appends_in_order_only(store: SqlStore) -> None:
    assert store.list_lock() == []
    store.append_lock(1, b"first")
    store.append_lock(2, b"second")
    for seq in (2, 4):  # a stale or a skipping writer
        with pytest.raises(Conflict, match="the log holds 2 updates"):
            store.append_lock(seq, b"other")
    assert store.list_lock() == [b"first", b"second"]


def test_signatures_and_pending_since_round_trip(store: SqlStore) -> None:
    node = store.insert_node(
        replace(
            node_rec(),
            pending_key="k2",
            pending_since=12.5,
            key_signature=b"\x00sig",
            pending_signature=b"\x01p",
        )
    )
    (back,) = store.list_nodes()
    assert back == node
    assert (back.pending_since, back.key_signature, back.pending_signature) == (12.5, b"\x00sig", b"\x01p")


def test_a_device_keeps_its_gateway_and_the_derived_fields_are_never_stored(store: SqlStore) -> None:
    gateway = store.insert_node(node_rec())
    device = store.insert_node(
        replace(node_rec(name="phone", key="k2", v4="100.64.0.2", v6="fd7a:115c:a1e0::2"), via=gateway.id)
    )
    store.update_node(replace(gateway, device_prefixes=("100.64.0.2/32",), primary_routes=("10.0.0.0/8",)))
    by_name = {n.name: n for n in store.list_nodes()}
    assert by_name["phone"].via == gateway.id
    assert by_name["phone"] == device
    assert by_name[gateway.name].via == 0
    assert by_name[gateway.name].device_prefixes == ()  # derived by the state, never written
    assert by_name[gateway.name].primary_routes == ()


def test_oidc_bindings_are_unique_per_issuer_and_subject(store: SqlStore) -> None:
    alice = store.put_oidc_user("alice", "", "s1", ["eng", "eng", "ops"], 2.0)
    assert (alice.oidc_subject, alice.groups, alice.oidc_issuer) == ("s1", ("eng", "ops"), "")
    assert store.adopt_oidc_issuer("https://a.example") == 1
    assert store.user_by_oidc_identity("https://a.example", "s1") == replace(
        alice, oidc_issuer="https://a.example"
    )
    store.put_oidc_user("bob", "https://b.example", "s1", [], 2.0)  # the same sub at another issuer
    with pytest.raises(Conflict, match="belongs to another user"):
        store.put_oidc_user("carol", "https://a.example", "s1", [], 3.0)
    assert store.get_user("carol") is None  # the refused call created nothing either
    store.create_user("carol", 3.0)
    with pytest.raises(Conflict, match="bound to another user already; 'carol' was not bound"):
        store.set_oidc_identity("carol", "https://b.example", "s1")
    assert store.set_oidc_identity("alice", "", None) == UserRec(alice.id, "alice", 2.0, None, (), "")
    with pytest.raises(NotFound):
        store.set_oidc_identity("nobody", "", None)
    with pytest.raises(Conflict, match="exists already"):
        store.create_user("carol", 4.0)
    assert [u.name for u in store.list_users()] == ["default", "alice", "bob", "carol"]


def test_routes_upsert_delete_and_cascade(store: SqlStore) -> None:
    n = store.insert_node(node_rec())
    store.put_routes([RouteRec(n.id, "10.0.0.0/8", by_node=True), RouteRec(n.id, "0.0.0.0/0", by_admin=True)])
    store.put_routes(
        [RouteRec(n.id, "10.0.0.0/8", by_node=True, approved=True)], delete=[(n.id, "0.0.0.0/0")]
    )
    assert store.list_routes() == [RouteRec(n.id, "10.0.0.0/8", by_node=True, approved=True)]
    with pytest.raises(Conflict, match="route"):
        store.put_routes([RouteRec(n.id + 99, "10.1.0.0/16")])  # no such node
    store.delete_node(n.id)
    assert store.list_routes() == []


def test_api_keys_and_kv(store: SqlStore) -> None:
    rec = ApiKeyRec("k" * 12, b"\x00\xffhash", created=1.5, expires=0.0)
    store.insert_api_key(rec)
    store.touch_api_key(rec.id, 7.25)
    assert store.list_api_keys() == [replace(rec, last_used=7.25)]
    assert store.revoke_api_key(rec.id) == replace(rec, last_used=7.25, revoked=True)
    assert store.get_api_key("nope") is None
    store.set_kv("acl_policy", b"one")
    store.set_kv("acl_policy", b"\x00two")  # replaced, not a second row
    assert store.get_kv("acl_policy") == b"\x00two"
    store.delete_secret("acl_policy")
    assert store.get_kv("acl_policy") is None


def test_auth_keys_round_trip_and_list_by_user(store: SqlStore) -> None:
    store.create_user("other", 1.0)
    mine = replace(auth_key_rec(), tags=("tag:a", "tag:b"), ephemeral=True)
    theirs = replace(auth_key_rec("bbbbbbbbbbbb", reusable=True), user="other", created=2.0)
    store.insert_auth_key(mine)
    store.insert_auth_key(theirs)
    with pytest.raises(Conflict, match="cannot store"):
        store.insert_auth_key(mine)
    assert store.list_auth_keys() == [mine, theirs]
    assert store.list_auth_keys("other") == [theirs]
    assert store.get_auth_key(mine.id) == mine


def test_reopen_keeps_data_and_migrates_once(backend: Backend) -> None:
    s = backend.open()  # a second store on the database the store fixture opened
    n = s.insert_node(node_rec())
    version = s.schema_version()  # type: ignore[attr-defined]
    s.close()
    s = backend.open()
    assert s.schema_version() == version  # type: ignore[attr-defined]
    assert s.list_nodes() == [n]
    s.close()
