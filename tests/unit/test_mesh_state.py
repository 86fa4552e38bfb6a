"""The registry facade: registration rules, key handling, allocation, names, expiry, ephemeral nodes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from ghostcore.errors import AuthError, Conflict, InvalidArgument, NotFound, Unavailable
from ghostcore.keys import PrivateKey
from ghostmesh.changes import NodeAdded, NodeChanged, NodeRemoved
from ghostmesh.state import (
    State,
    StateConfig,
    sanitize_name,
    split_key,
    validate_endpoint,
)
from ghostmesh.store.sqlite import SqliteStore

T0 = 1_700_000_000.0
CFG = StateConfig(key_expiry=1000.0, ephemeral_grace=30.0, authkey_expiration=3600.0)


def _key() -> str:
    return PrivateKey.generate().public_key().base64()


def _open(path: Path, cfg: StateConfig = CFG, now: float = T0) -> State:
    return State(SqliteStore(path / "db.sqlite"), cfg, now)


@pytest.fixture
def st(tmp_path: Path) -> State:
    return _open(tmp_path)


def _rows(st: State, table: str) -> int:
    sql = f"SELECT COUNT(*) FROM {table}"  # noqa: S608 - table names come from the tests themselves
    return int(st.store._db.execute(sql).fetchone()[0])  # type: ignore[attr-defined]


def test_auth_key_shape_and_only_hash_stored(st: State, tmp_path: Path) -> None:
    rec, whole = st.create_auth_key(reusable=True, tags=["tag:web"], now=T0)
    parts = split_key(whole, "gmauth_")
    assert parts is not None
    key_id, secret = parts
    assert key_id == rec.id
    assert len(key_id) == 12
    assert len(secret) == 43
    assert rec.hash == hashlib.sha256(secret.encode()).digest()
    assert rec.user == "default"  # created when missing
    assert [u.name for u in st.list_users()] == ["default"]
    assert rec.expires == T0 + 3600
    st.store.close()
    raw = b"".join(f.read_bytes() for f in tmp_path.glob("db.sqlite*"))
    assert rec.hash in raw  # the hash is there, so the scan looks at the right bytes
    assert secret.encode() not in raw
    assert whole.encode() not in raw
    assert secret not in repr(rec)


def test_api_key_verify_and_expire(st: State) -> None:
    rec, whole = st.create_api_key(0, T0)
    assert whole.startswith(f"gmapi_{rec.id}_")
    assert st.verify_api_key(whole, T0 + 1).id == rec.id
    with pytest.raises(AuthError, match="not valid"):
        st.verify_api_key(whole[:-1] + ("A" if whole[-1] != "A" else "B"), T0)
    with pytest.raises(AuthError, match="malformed"):
        st.verify_api_key("nope", T0)
    st.expire_api_key(rec.id)
    with pytest.raises(AuthError, match="revoked"):
        st.verify_api_key(whole, T0)
    rec2, whole2 = st.create_api_key(10, T0)
    with pytest.raises(AuthError, match="expired"):
        st.verify_api_key(whole2, T0 + 11)
    assert {k.id for k in st.list_api_keys()} == {rec.id, rec2.id}


def test_register_new_node(st: State) -> None:
    _, ak = st.create_auth_key(tags=["tag:a"], now=T0)
    key = _key()
    node, changes = st.register(key, ak, "Laptop.example.com", T0)
    assert changes == [NodeAdded(node, False)]
    assert node.name == "laptop"
    assert node.ipv4 == "100.64.0.1"
    assert node.ipv6 == "fd7a:115c:a1e0::1"
    assert node.tags == ("tag:a",)
    assert node.expires == T0 + 1000
    assert st.node_by_key(key) == node


def test_register_known_key_is_idempotent_without_auth_key(st: State) -> None:
    _, ak = st.create_auth_key(now=T0)
    key = _key()
    node, _ = st.register(key, ak, "a", T0)
    again, changes = st.register(key, "", "other-name", T0 + 5)
    assert again == node
    assert changes == []
    # a spent single-use key with a known node key is fine too: it is not even looked at
    again2, _ = st.register(key, ak, "a", T0 + 6)
    assert again2 == node


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("malformed", "malformed"),
        ("wrong", "not valid"),
        ("expired", "has expired"),
        ("revoked", "was revoked"),
        ("spent", "single-use and is spent"),
        ("missing", "not registered; pass an auth key"),
    ],
)
def test_register_refusals_write_nothing(st: State, case: str, message: str) -> None:
    rec, ak = st.create_auth_key(expiration=100, now=T0)
    now = T0
    if case == "spent":
        st.register(_key(), ak, "first", T0)
    nodes_before = _rows(st, "nodes")
    keys_before = [(k.id, k.used_count) for k in st.list_auth_keys()]
    text = {
        "malformed": "gmauth_short",
        "wrong": ak[:-3] + "xyz",
        "expired": ak,
        "revoked": ak,
        "spent": ak,
        "missing": "",
    }[case]
    if case == "expired":
        now = T0 + 101
    if case == "revoked":
        st.expire_auth_key(rec.id)
    with pytest.raises(AuthError, match=message) as info:
        st.register(_key(), text, "host", now)
    secret = ak.split("_", 2)[2]
    assert secret not in str(info.value)
    assert _rows(st, "nodes") == nodes_before
    if case != "revoked":
        assert [(k.id, k.used_count) for k in st.list_auth_keys()] == keys_before
    assert len(st.list_nodes()) == nodes_before


def test_invalid_wireguard_key_refused(st: State) -> None:
    _, ak = st.create_auth_key(now=T0)
    with pytest.raises(InvalidArgument, match="invalid public key"):
        st.register("not-a-key", ak, "h", T0)
    assert _rows(st, "nodes") == 0


def test_expired_node_needs_auth_key_and_renews(st: State) -> None:
    _, ak = st.create_auth_key(reusable=True, now=T0)
    key = _key()
    node, _ = st.register(key, ak, "a", T0)
    later = T0 + 1001
    with pytest.raises(AuthError, match="has expired; register again"):
        st.register(key, "", "a", later)
    renewed, changes = st.register(key, ak, "a", later)
    assert renewed.id == node.id
    assert renewed.ipv4 == node.ipv4
    assert renewed.expires == later + 1000
    assert changes == [NodeChanged(renewed, False)]


def test_names_unique_and_sanitized(st: State) -> None:
    _, ak = st.create_auth_key(reusable=True, now=T0)
    names = [st.register(_key(), ak, h, T0)[0].name for h in ("web", "web", "WEB", "--", "1234", "a_b c")]
    assert names == ["web", "web-1", "web-2", "node", "node-1234", "a-b-c"]
    assert sanitize_name("x" * 100) == "x" * 63


def test_allocation_stable_across_reopen(tmp_path: Path) -> None:
    st = _open(tmp_path)
    _, ak = st.create_auth_key(reusable=True, now=T0)
    keys = [_key() for _ in range(5)]
    first = {k: st.register(k, ak, "n", T0)[0] for k in keys}
    st.delete_node(first[keys[1]].name)
    st.store.close()
    st2 = _open(tmp_path)
    for k in (keys[0], *keys[2:]):
        node, changes = st2.register(k, "", "n", T0 + 1)
        assert changes == []
        assert (node.ipv4, node.ipv6, node.name) == (first[k].ipv4, first[k].ipv6, first[k].name)
    new, _ = st2.register(_key(), ak, "n", T0 + 1)
    taken = {n.ipv4 for n in first.values()} - {first[keys[1]].ipv4}
    assert new.ipv4 not in taken
    assert new.ipv6 not in {n.ipv6 for n in first.values()} - {first[keys[1]].ipv6}
    assert len({n.ipv4 for n in st2.list_nodes()}) == len(st2.list_nodes())


def test_rename_expire_delete(st: State) -> None:
    _, ak = st.create_auth_key(reusable=True, now=T0)
    a, _ = st.register(_key(), ak, "a", T0)
    st.register(_key(), ak, "b", T0)
    with pytest.raises(Conflict):
        st.rename("a", "b")
    with pytest.raises(InvalidArgument):
        st.rename("a", "Bad_Name")
    with pytest.raises(InvalidArgument):
        st.rename("a", "123")
    with pytest.raises(NotFound):
        st.rename("zzz", "c")
    renamed, changes = st.rename(str(a.id), "c")
    assert renamed.name == "c"
    assert changes == [NodeChanged(renamed, False)]
    expired, changes = st.expire_node("c", T0 + 5)
    assert expired.expires == T0 + 5
    assert changes == [NodeRemoved(a.id, "expired")]
    assert st.expire_node("c", T0 + 6)[1] == []
    assert st.delete_node("c") == [NodeRemoved(a.id, "deleted")]
    with pytest.raises(NotFound):
        st.delete_node("c")


def test_delete_user_with_nodes_conflicts(st: State) -> None:
    _, ak = st.create_auth_key(user="alice", now=T0)
    st.register(_key(), ak, "a", T0)
    with pytest.raises(Conflict, match="still owns 1 node"):
        st.delete_user("alice")
    st.delete_node("a")
    st.delete_user("alice")
    with pytest.raises(NotFound):
        st.delete_user("alice")
    with pytest.raises(InvalidArgument):
        st.create_user("Bad Name", T0)


@pytest.mark.parametrize("name", ["alice@example.com", "bob+ops@corp.example", "carol"])
def test_user_names_may_be_email_addresses_as_in_tailscale_policies(st: State, name: str) -> None:
    assert st.create_user(name, T0).name == name
    _, ak = st.create_auth_key(user=name, now=T0)
    node, _ = st.register(_key(), ak, "n-" + name.split("@", maxsplit=1)[0].replace("+", "-"), T0)
    assert node.user == name


@pytest.mark.parametrize(
    "name", ["Alice@example.com", "@example.com", "a@", "a@b@c", "a b@example.com", "a@-x"]
)
def test_malformed_user_names_are_refused_in_one_line(st: State, name: str) -> None:
    with pytest.raises(InvalidArgument, match=r"^invalid user name .*@domain"):
        st.create_user(name, T0)


def test_online_tracking_and_ephemeral_reaping(st: State) -> None:
    _, ak = st.create_auth_key(ephemeral=True, now=T0)
    node, _ = st.register(_key(), ak, "eph", T0)
    assert node.ephemeral
    assert st.connect(node.id, T0 + 1) == [NodeChanged(st.node(node.id), True)]  # type: ignore[arg-type]
    assert st.connect(node.id, T0 + 1) == []  # second stream: no news
    assert st.disconnect(node.id, T0 + 2) == []
    changes = st.disconnect(node.id, T0 + 3)
    assert len(changes) == 1
    assert isinstance(changes[0], NodeChanged)
    assert not changes[0].online
    assert st.next_deadline() == T0 + 33
    assert st.tick(T0 + 20) == []
    # reconnect within the grace cancels the deletion
    st.connect(node.id, T0 + 25)
    assert st.tick(T0 + 40) == []
    assert st.node(node.id) is not None
    st.disconnect(node.id, T0 + 50)
    assert st.tick(T0 + 79) == []
    assert st.tick(T0 + 80) == [NodeRemoved(node.id, "deleted")]
    assert st.node(node.id) is None
    assert _rows(st, "nodes") == 0


def test_key_expiry_tick(st: State) -> None:
    _, ak = st.create_auth_key(reusable=True, now=T0)
    a, _ = st.register(_key(), ak, "a", T0)
    b, _ = st.register(_key(), ak, "b", T0 + 10)
    assert st.next_deadline() == T0 + 1000
    assert st.tick(T0 + 999) == []
    assert st.tick(T0 + 1000) == [NodeRemoved(a.id, "expired")]
    assert st.tick(T0 + 1005) == []
    assert st.next_deadline() == T0 + 1010
    st.expire_node("b", T0 + 1006)
    assert st.tick(T0 + 1010) == []  # expired by hand already: no second removal
    assert st.node(b.id) is not None


def test_report_status_endpoints(st: State) -> None:
    _, ak = st.create_auth_key(now=T0)
    a, _ = st.register(_key(), ak, "a", T0)
    changes = st.report_status(a.id, ["192.0.2.1:41641", "[2001:db8::1]:41641", "192.0.2.1:41641"], T0)
    assert len(changes) == 1
    assert st.node(a.id).endpoints == ("192.0.2.1:41641", "[2001:db8::1]:41641")  # type: ignore[union-attr]
    assert st.report_status(a.id, ["192.0.2.1:41641", "[2001:db8::1]:41641"], T0 + 1) == []
    with pytest.raises(InvalidArgument, match="at most 16"):
        st.report_status(a.id, [f"192.0.2.1:{p}" for p in range(1, 18)], T0)
    for bad in ("1.2.3.4", "1.2.3.4:0", "host:80", "2001:db8::1:80", "[1.2.3.4]:5"):
        with pytest.raises(InvalidArgument):
            validate_endpoint(bad)


def test_ephemeral_nodes_get_fresh_grace_after_restart(tmp_path: Path) -> None:
    st = _open(tmp_path)
    _, ak = st.create_auth_key(ephemeral=True, now=T0)
    node, _ = st.register(_key(), ak, "eph", T0)
    st.connect(node.id, T0)
    st.store.close()
    st2 = _open(tmp_path, now=T0 + 500)
    assert st2.next_deadline() == T0 + 530
    assert st2.tick(T0 + 530) == [NodeRemoved(node.id, "deleted")]


def test_auth_key_listing_and_expire_by_whole_key(st: State) -> None:
    rec, whole = st.create_auth_key(user="bob", now=T0)
    st.create_auth_key(now=T0)
    assert [k.id for k in st.list_auth_keys("bob")] == [rec.id]
    assert len(st.list_auth_keys()) == 2
    assert st.expire_auth_key(whole).revoked
    with pytest.raises(NotFound):
        st.expire_auth_key("000000000000")
    with pytest.raises(InvalidArgument):
        st.expire_auth_key("zz")
    with pytest.raises(InvalidArgument):
        st.create_auth_key(tags=["bad tag"], now=T0)


@pytest.mark.parametrize(
    "text",
    [
        "[fe80::1%x\nremove=true]:41641",  # a zone ID carrying a newline (a second UAPI line at the peer)
        "[fe80::1%eth0]:41641",
        "[2001:DB8::1]:41641",  # not canonical: what a node reports is never repaired
        "[2001:db8:0::1]:41641",
        "192.0.2.1:41641\n",
        "192.0.2.1 :41641",
        "[::]:41641",
        "224.0.0.1:41641",
    ],
)
def test_non_canonical_endpoints_are_refused_and_change_nothing(st: State, text: str) -> None:
    _, ak = st.create_auth_key(now=T0)
    a, _ = st.register(_key(), ak, "a", T0)
    st.report_status(a.id, ["192.0.2.1:41641"], T0)
    before = st.node(a.id)
    with pytest.raises(InvalidArgument) as info:
        st.report_status(a.id, ["192.0.2.2:41641", text], T0 + 1)
    assert str(info.value).startswith("invalid endpoint ")
    assert "\n" not in str(info.value)
    assert st.node(a.id) == before
    assert list(st.store.list_nodes()) == [before]
    assert validate_endpoint("[2001:db8::1]:41641") == "[2001:db8::1]:41641"


def test_the_node_resolver_addresses_are_never_handed_out(tmp_path: Path) -> None:
    # a /29 around 100.100.100.100 and a /125 around fd7a:115c:a1e0::53: 6 and 6 usable host addresses
    cfg = StateConfig(ipv4_prefix="100.100.100.96/29", ipv6_prefix="fd7a:115c:a1e0::50/125")
    st = _open(tmp_path, cfg)
    _, ak = st.create_auth_key(reusable=True, now=T0)
    nodes = [st.register(_key(), ak, f"n{i}", T0)[0] for i in range(5)]
    assert "100.100.100.100" not in {n.ipv4 for n in nodes}
    assert "fd7a:115c:a1e0::53" not in {n.ipv6 for n in nodes}
    with pytest.raises(Unavailable):  # the 6th would have to be a resolver address
        st.register(_key(), ak, "n5", T0)


def test_presence_grace_hides_a_reconnect_and_delays_offline(tmp_path: Path) -> None:
    st = _open(tmp_path, StateConfig(key_expiry=1000.0, ephemeral_grace=30.0, presence_grace=15.0))
    _, ak = st.create_auth_key(reusable=True, now=T0)
    node, _ = st.register(_key(), ak, "a", T0)
    assert [c.online for c in st.connect(node.id, T0 + 1)] == [True]  # type: ignore[attr-defined]
    assert st.disconnect(node.id, T0 + 2) == []  # still online to its peers for the grace
    assert st.is_online(node.id)
    assert st.next_deadline() == T0 + 17
    assert st.connect(node.id, T0 + 10) == []  # back in time: no change to anyone, no deadline left
    assert st.is_online(node.id)
    assert st.next_deadline() == T0 + 1000  # only the key expiry
    assert st.tick(T0 + 17) == []
    assert st.disconnect(node.id, T0 + 20) == []
    assert st.tick(T0 + 34) == []
    (offline,) = st.tick(T0 + 35)
    assert isinstance(offline, NodeChanged)
    assert not offline.online
    assert offline.node.last_seen == T0 + 20  # when its stream ended, not when the grace ran out
    assert not st.is_online(node.id)
    assert [c.online for c in st.connect(node.id, T0 + 40)] == [True]  # type: ignore[attr-defined]


def test_presence_grace_then_ephemeral_grace_counts_from_the_disconnect(tmp_path: Path) -> None:
    st = _open(tmp_path, StateConfig(key_expiry=1000.0, ephemeral_grace=10.0, presence_grace=15.0))
    _, ak = st.create_auth_key(ephemeral=True, now=T0)
    node, _ = st.register(_key(), ak, "eph", T0)
    st.connect(node.id, T0)
    st.disconnect(node.id, T0 + 5)
    changes = st.tick(T0 + 20)  # presence grace over; the ephemeral grace (from T0 + 5) too
    assert [type(c) for c in changes] == [NodeChanged, NodeRemoved]
    assert st.node(node.id) is None


def test_a_router_goes_offline_at_once_despite_the_presence_grace(tmp_path: Path) -> None:
    st = _open(tmp_path, StateConfig(key_expiry=0.0, presence_grace=15.0))
    _, ak = st.create_auth_key(reusable=True, now=T0)
    r1, _ = st.register(_key(), ak, "r1", T0)
    r2, _ = st.register(_key(), ak, "r2", T0)
    for r in (r1, r2):
        st.connect(r.id, T0)
        st.advertise_routes(r.id, ["10.2.0.0/16"], False)
        st.approve_route(r.name, "10.2.0.0/16")
    assert st.resolve("r1").primary_routes == ("10.2.0.0/16",)
    changes = st.disconnect(r1.id, T0 + 1)  # failover must not wait for the grace
    assert not st.is_online(r1.id)
    assert st.resolve("r2").primary_routes == ("10.2.0.0/16",)
    assert {c.node.id for c in changes if isinstance(c, NodeChanged)} == {r1.id, r2.id}
