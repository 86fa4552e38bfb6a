"""ghostcore.lock: the signed log of trusted keys and node-key signature chains, as an attacker tries them."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ghostcore import lock
from ghostcore.lock import (
    ADD_KEY,
    DISABLE,
    INIT,
    REMOVE_KEY,
    ZERO,
    Credential,
    LockError,
    SigningKey,
    Verifier,
    apply_update,
    extends,
    make_update,
    verify_log,
    verify_signature,
)

NODE = bytes(range(32))
NODE2 = bytes(range(1, 33))


def _log(*signers: SigningKey) -> tuple[list[bytes], SigningKey]:
    admin = SigningKey.generate()
    log = [make_update(INIT, bytes(32), [admin.public(), *(s.public() for s in signers)], admin)]
    return log, admin


def test_init_add_remove_disable() -> None:
    log, admin = _log()
    state = verify_log(log)
    assert state.enabled
    assert state.trusted == {admin.public()}
    assert state.genesis == state.head
    second = SigningKey.generate()
    log.append(make_update(ADD_KEY, state.head, [second.public()], admin))
    state = verify_log(log)
    assert state.trusted == {admin.public(), second.public()}
    log.append(make_update(REMOVE_KEY, state.head, [admin.public()], second))  # the new key removes the old
    state = verify_log(log)
    assert state.trusted == {second.public()}
    with pytest.raises(LockError, match="last trusted key"):
        apply_update(state, make_update(REMOVE_KEY, state.head, [second.public()], second))
    log.append(make_update(DISABLE, state.head, [], second))
    state = verify_log(log)
    assert not state.enabled
    assert state.trusted == frozenset()
    with pytest.raises(LockError, match="lock is off"):
        apply_update(state, make_update(ADD_KEY, state.head, [admin.public()], second))
    third = SigningKey.generate()  # on again: a new trusted set, a new genesis
    log.append(make_update(INIT, state.head, [third.public()], third))
    again = verify_log(log)
    assert again.enabled
    assert again.trusted == {third.public()}
    assert again.genesis == again.head != verify_log(log[:1]).genesis
    assert [d[0] for d in lock.describe(log)] == ["init", "add-key", "remove-key", "disable", "init"]


def test_untrusted_signer_cannot_change_the_set() -> None:
    log, _ = _log()
    state = verify_log(log)
    mallory = SigningKey.generate()
    with pytest.raises(LockError, match="not a trusted key"):
        apply_update(state, make_update(ADD_KEY, state.head, [mallory.public()], mallory))


def test_init_must_be_signed_by_its_own_key_and_come_first() -> None:
    a, b = SigningKey.generate(), SigningKey.generate()
    with pytest.raises(LockError, match="own keys"):
        verify_log([make_update(INIT, bytes(32), [a.public()], b)])
    log, admin = _log()
    state = verify_log(log)
    with pytest.raises(LockError, match="on already"):
        apply_update(state, make_update(INIT, state.head, [admin.public()], admin))
    with pytest.raises(LockError, match="only init"):
        verify_log([make_update(ADD_KEY, bytes(32), [a.public()], a)])


def test_update_must_follow_the_head() -> None:
    log, admin = _log()
    state = verify_log(log)
    stale = make_update(ADD_KEY, bytes(32), [SigningKey.generate().public()], admin)
    with pytest.raises(LockError, match="does not follow"):
        apply_update(state, stale)


def test_tampered_update_is_refused() -> None:
    log, admin = _log()
    state = verify_log(log)
    good = bytearray(make_update(ADD_KEY, state.head, [SigningKey.generate().public()], admin))
    good[40] ^= 1  # flip a bit of the added key
    with pytest.raises(LockError, match="does not verify"):
        apply_update(state, bytes(good))


def test_extends_refuses_fork_and_rollback() -> None:
    log, admin = _log()
    head = verify_log(log).head
    a = [*log, make_update(ADD_KEY, head, [SigningKey.generate().public()], admin)]
    b = [*log, make_update(ADD_KEY, head, [SigningKey.generate().public()], admin)]
    assert extends(log, a)
    assert not extends(a, log)  # rollback
    assert not extends(a, b)  # fork


def test_direct_signature_and_rotations() -> None:
    log, admin = _log()
    trusted = verify_log(log).trusted
    rot = SigningKey.generate()
    sig = lock.sign_direct(admin, NODE, rot.public())
    v = verify_signature(sig, NODE, trusted)
    assert (v.root, v.rotation_key, v.seq) == (admin.public(), rot.public(), 0)
    with pytest.raises(LockError, match="another WireGuard key"):
        verify_signature(sig, NODE2, trusted)
    r1 = lock.rotate(sig, rot, NODE2)
    assert verify_signature(r1, NODE2, trusted).seq == 1
    r2 = lock.rotate(r1, rot, NODE)
    assert len(lock.decode_chain(r2)) == 2  # replaced, not grown
    assert verify_signature(r2, NODE, trusted).seq == 2
    with pytest.raises(LockError, match="rotation key"):
        lock.rotate(r2, SigningKey.generate(), NODE2)


def test_credential_join_then_rotation() -> None:
    log, admin = _log()
    state = verify_log(log)
    cred_key = SigningKey.generate()
    cred = Credential(cred_key, state.genesis, lock.sign_credential(admin, cred_key.public()))
    parsed = Credential.from_text(cred.text())
    assert parsed.genesis == state.genesis
    assert "secret" not in repr(parsed)
    rot = SigningKey.generate()
    sig = lock.join_with_credential(parsed, NODE, rot.public())
    assert verify_signature(sig, NODE, state.trusted).rotation_key == rot.public()
    rotated = lock.rotate(sig, rot, NODE2)
    assert len(lock.decode_chain(rotated)) == 3
    assert len(lock.decode_chain(lock.rotate(rotated, rot, NODE))) == 3


def test_credential_alone_vouches_for_no_node() -> None:
    log, admin = _log()
    trusted = verify_log(log).trusted
    cred = lock.sign_credential(admin, SigningKey.generate().public())
    with pytest.raises(LockError, match="credential"):
        verify_signature(cred, ZERO, trusted)


def test_signature_from_removed_or_foreign_key_fails() -> None:
    log, _ = _log()
    trusted = verify_log(log).trusted
    mallory = SigningKey.generate()
    with pytest.raises(LockError, match="not a trusted"):
        verify_signature(lock.sign_direct(mallory, NODE, mallory.public()), NODE, trusted)


def test_link_signed_by_wrong_key_fails() -> None:
    log, admin = _log()
    trusted = verify_log(log).trusted
    rot, mallory = SigningKey.generate(), SigningKey.generate()
    first = lock.decode_chain(lock.sign_direct(admin, NODE, rot.public()))[0]
    forged = lock.encode_chain([first, lock.make_link(mallory, NODE2, mallory.public(), 1)])
    with pytest.raises(LockError, match="link 2"):
        verify_signature(forged, NODE2, trusted)


def test_verifier_memo_and_reasons() -> None:
    log, admin = _log()
    v = Verifier(verify_log(log).trusted)
    sig = lock.sign_direct(admin, NODE, SigningKey.generate().public())
    assert isinstance(v.check(sig, NODE), lock.Verified)
    assert v.check(b"", NODE) == "unsigned"
    assert "another WireGuard key" in str(v.check(sig, NODE2))


def test_requests_and_keys_round_trip() -> None:
    rot = SigningKey.generate()
    text = lock.format_request(NODE, rot.public())
    assert lock.parse_request(text) == (NODE, rot.public())
    assert lock.parse_key(lock.format_key(rot.public())) == rot.public()
    assert SigningKey.from_text(rot.text()).public() == rot.public()
    for bad in ("nodekey:", "nodekey:abc", text + "A", "lockkey:" + "A" * 43):
        with pytest.raises(LockError):
            lock.parse_request(bad)


@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_raise_anything_but_lock_error(data: bytes) -> None:
    for parse in (lock.decode_update, lock.decode_chain):
        with contextlib.suppress(LockError):
            parse(data)
    with contextlib.suppress(LockError):
        verify_signature(data, NODE, frozenset({NODE}))
