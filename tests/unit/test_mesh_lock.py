"""ghostmesh's State and node-key signing (ghostcore.lock): the log and node signatures are checked against
the log before anything is stored, survive a restart, and a pending rotation is not overwritten."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from ghostcore import lock
from ghostcore.errors import Conflict, InvalidArgument, NotFound
from ghostcore.keys import PrivateKey, PublicKey
from ghostmesh.changes import LockChanged, NodeAdded, NodeChanged
from ghostmesh.state import PENDING_ROTATION_TTL, ROTATION_SIGNATURE_NEEDED, State, StateConfig
from ghostmesh.store.base import NodeRec
from ghostmesh.store.sqlite import SqliteStore

T0 = 1_700_000_000.0
ADMIN = lock.SigningKey.generate()
MALLORY = lock.SigningKey.generate()


def _open(tmp_path: Path) -> State:
    return State(SqliteStore(tmp_path / "db.sqlite"), StateConfig(), T0)


def _raw(key: str) -> bytes:
    return PublicKey.from_base64(key).raw


def _new_key() -> str:
    return PrivateKey.generate().public_key().base64()


def _locked(tmp_path: Path) -> tuple[State, bytes]:
    st = _open(tmp_path)
    init = lock.make_update(lock.INIT, st.lock_state.head, [ADMIN.public()], ADMIN)
    st.append_lock(init)
    return st, init


def _join(st: State, name: str, signature: bytes = b"", key: str = "") -> NodeRec:
    _, secret = st.create_auth_key(now=T0)
    node, _ = st.register(key or _new_key(), secret, name, T0, signature)
    return node


def test_updates_extend_the_log_and_survive_a_restart(tmp_path: Path) -> None:
    st = _open(tmp_path)
    assert (st.lock_log(), st.lock_state.enabled) == ((), False)
    assert st.lock_record() == LockChanged(())
    init = lock.make_update(lock.INIT, st.lock_state.head, [ADMIN.public()], ADMIN)
    assert st.append_lock(init) == [LockChanged((init,))]
    other = lock.SigningKey.generate()
    add = lock.make_update(lock.ADD_KEY, st.lock_state.head, [other.public()], ADMIN)
    st.append_lock(add)
    assert st.lock_state.trusted == {ADMIN.public(), other.public()}
    remove = lock.make_update(lock.REMOVE_KEY, st.lock_state.head, [ADMIN.public()], other)
    assert st.append_lock(remove) == [LockChanged((init, add, remove))]
    assert st.lock_state.trusted == {other.public()}
    st.store.close()
    again = _open(tmp_path)
    assert again.lock_log() == (init, add, remove)
    assert again.lock_state == lock.verify_log([init, add, remove])


def test_forged_updates_are_refused_and_nothing_is_stored(tmp_path: Path) -> None:
    st, init = _locked(tmp_path)
    head = st.lock_state.head
    tampered = bytearray(lock.make_update(lock.ADD_KEY, head, [MALLORY.public()], ADMIN))
    tampered[40] ^= 1  # a bit of the added key: the signature no longer covers it
    for bad, says in (
        (lock.make_update(lock.ADD_KEY, head, [MALLORY.public()], MALLORY), "not a trusted key"),
        (
            lock.make_update(lock.ADD_KEY, bytes(32), [MALLORY.public()], ADMIN),
            "does not follow the current head",
        ),
        (init, "does not follow the current head"),
        (bytes(tampered), "the signature does not verify"),
        (b"garbage", "malformed lock update"),
    ):
        with pytest.raises(lock.LockError, match=says) as info:
            st.append_lock(bad)
        assert isinstance(info.value, InvalidArgument)
        assert st.lock_log() == (init,)
        assert st.store.list_lock() == [init]
        assert st.lock_state.trusted == {ADMIN.public()}


def test_a_stored_log_that_no_longer_verifies_stops_the_load(tmp_path: Path) -> None:
    st, _ = _locked(tmp_path)
    st.store.close()
    forged = lock.make_update(lock.INIT, bytes(32), [MALLORY.public()], MALLORY)
    db = sqlite3.connect(tmp_path / "db.sqlite")
    with db:
        db.execute("INSERT INTO lock_log (seq, update_bytes) VALUES (2, ?)", (forged,))
    db.close()
    with pytest.raises(lock.LockError, match="lock update"):
        _open(tmp_path)


def test_register_stores_a_signature_only_while_locked_and_only_a_valid_one(tmp_path: Path) -> None:
    st = _open(tmp_path)
    key = _new_key()
    rotation = lock.SigningKey.generate()
    unlocked = _join(st, "early", lock.sign_direct(ADMIN, _raw(key), rotation.public()), key)
    assert unlocked.key_signature == b""  # no lock: a signature means nothing and is not kept
    init = lock.make_update(lock.INIT, st.lock_state.head, [ADMIN.public()], ADMIN)
    st.append_lock(init)
    cred_key = lock.SigningKey.generate()
    cred = lock.Credential(cred_key, st.lock_state.genesis, lock.sign_credential(ADMIN, cred_key.public()))
    key = _new_key()
    signature = lock.join_with_credential(cred, _raw(key), rotation.public())
    _, secret = st.create_auth_key(now=T0)
    node, changes = st.register(key, secret, "joined", T0, signature)
    assert node.key_signature == signature
    assert isinstance(changes[0], NodeAdded)
    assert changes[0].node.key_signature == signature
    assert st.unsigned_nodes(T0) == ["early"]
    # a signature for another key, or from an untrusted root: refused, nothing written
    _, secret = st.create_auth_key(now=T0)
    for bad in (signature, lock.sign_direct(MALLORY, b"\1" * 32, rotation.public())):
        before = (list(st.store.list_nodes()), list(st.store.list_auth_keys()))
        with pytest.raises(lock.LockError):
            st.register(_new_key(), secret, "intruder", T0, bad)
        assert (list(st.store.list_nodes()), list(st.store.list_auth_keys())) == before
    # a known node re-registering with a (new) valid signature gets it stored; peers hear of it
    direct = lock.sign_direct(ADMIN, _raw(unlocked.node_key), rotation.public())
    again, changes = st.register(unlocked.node_key, "", "early", T0 + 1, direct)
    assert again.key_signature == direct
    assert [type(c) for c in changes] == [NodeChanged]
    assert st.unsigned_nodes(T0 + 1) == []


def test_sign_node_checks_and_stores_for_the_key_or_the_pending_key(tmp_path: Path) -> None:
    st = _open(tmp_path)
    node = _join(st, "a")
    rotation = lock.SigningKey.generate()
    direct = lock.sign_direct(ADMIN, _raw(node.node_key), rotation.public())
    with pytest.raises(InvalidArgument, match="node-key signing is off"):
        st.sign_node(node.node_key, direct, T0)
    init = lock.make_update(lock.INIT, st.lock_state.head, [ADMIN.public()], ADMIN)
    st.append_lock(init)
    assert st.unsigned_nodes(T0) == ["a"]
    before = list(st.store.list_nodes())
    for bad, error in (
        (lock.sign_direct(MALLORY, _raw(node.node_key), rotation.public()), "not a trusted signing key"),
        (lock.sign_direct(ADMIN, b"\2" * 32, rotation.public()), "vouches for another WireGuard key"),
        (b"\1junk", "malformed node-key signature"),
    ):
        with pytest.raises(lock.LockError, match=error):
            st.sign_node(node.node_key, bad, T0)
    assert list(st.store.list_nodes()) == before
    unknown = _new_key()
    with pytest.raises(NotFound):
        st.sign_node(unknown, lock.sign_direct(ADMIN, _raw(unknown), rotation.public()), T0)
    signed, verified, changes = st.sign_node(node.node_key, direct, T0)
    assert (signed.key_signature, verified.root) == (direct, ADMIN.public())
    assert [type(c) for c in changes] == [NodeChanged]
    assert st.unsigned_nodes(T0) == []
    assert st.sign_node(node.node_key, direct, T0)[2] == []  # the same signature again: nothing changes
    # a pending key signed by the admin: kept with it, peers see it once the key is proven
    new = _new_key()
    st.begin_rotation(node.id, new, T0, lock.rotate(direct, rotation, _raw(new)))
    by_admin = lock.sign_direct(ADMIN, _raw(new), rotation.public())
    pending, _, changes = st.sign_node(new, by_admin, T0)
    assert (pending.pending_signature, changes) == (by_admin, [])
    promoted = st.promote_pending(new, T0 + 1)
    assert promoted is not None
    assert (promoted[0].key_signature, promoted[0].pending_signature) == (by_admin, b"")


def test_rotation_needs_a_signature_by_the_nodes_rotation_key_while_locked(tmp_path: Path) -> None:
    st, _ = _locked(tmp_path)
    rotation = lock.SigningKey.generate()
    key = _new_key()
    node = _join(st, "a", lock.sign_direct(ADMIN, _raw(key), rotation.public()), key)
    new = _new_key()
    before = list(st.store.list_nodes())
    with pytest.raises(InvalidArgument) as info:
        st.begin_rotation(node.id, new, T0)
    assert str(info.value) == ROTATION_SIGNATURE_NEEDED
    with pytest.raises(InvalidArgument, match="vouches for another WireGuard key"):
        st.begin_rotation(node.id, new, T0, lock.rotate(node.key_signature, rotation, b"\3" * 32))
    assert list(st.store.list_nodes()) == before
    rotated = lock.rotate(node.key_signature, rotation, _raw(new))
    pending = st.begin_rotation(node.id, new, T0, rotated)
    assert (pending.pending_key, pending.pending_signature, pending.key_signature) == (
        new,
        rotated,
        node.key_signature,
    )
    result = st.promote_pending(new, T0 + 1)
    assert result is not None
    promoted, changes = result
    assert (promoted.node_key, promoted.key_signature, promoted.pending_signature) == (new, rotated, b"")
    assert isinstance(changes[0], NodeChanged)
    assert changes[0].node.key_signature == rotated
    assert st.unsigned_nodes(T0 + 1) == []


def test_a_young_pending_rotation_is_not_overwritten(tmp_path: Path) -> None:
    st = _open(tmp_path)
    node = _join(st, "a")
    first, second = _new_key(), _new_key()
    st.begin_rotation(node.id, first, T0)
    with pytest.raises(Conflict, match="has a pending key from 10 s ago"):
        st.begin_rotation(node.id, second, T0 + 10)
    assert st.begin_rotation(node.id, first, T0 + 20).pending_since == T0  # a retry changes nothing
    st.store.close()
    st = _open(tmp_path)  # when it was stored survives a restart
    with pytest.raises(Conflict):
        st.begin_rotation(node.id, second, T0 + PENDING_ROTATION_TTL - 1)
    replaced = st.begin_rotation(node.id, second, T0 + PENDING_ROTATION_TTL)
    assert (replaced.pending_key, replaced.pending_since) == (second, T0 + PENDING_ROTATION_TTL)
    assert st.node_by_pending_key(first) is None
