"""ghostgate's sans-IO STUN/TURN core as transcripts with hand-stepped time (RFC 8489, RFC 8656)."""

from __future__ import annotations

import struct

from aioice import stun

from ghostgate import creds
from ghostgate.turn_core import Release, Transmit
from tests.unit._gate_fixtures import CLIENT, PEER, SECRET, T0, Client, make_core, rest_creds


def test_rest_credentials_match_an_independent_computation() -> None:
    # Known vector computed by hand: base64(HMAC-SHA1(b"s3cret", b"1800086400:node1")).
    username, password = rest_creds(T0 + 86400)
    assert username == "1800086400:node1"
    assert creds.rest_password(SECRET, username) == password
    assert creds.parse_rest_username(username) == (1800086400, "node1")
    assert creds.parse_rest_username("node1") is None
    assert creds.parse_rest_username("12:") == (12, "")


def test_nonce_is_fresh_then_stale_and_unforgeable() -> None:
    key = b"k" * 32
    nonce = creds.make_nonce(key, T0)
    assert creds.nonce_fresh(key, nonce, T0 + 10, 600)
    assert not creds.nonce_fresh(key, nonce, T0 + 601, 600)
    assert not creds.nonce_fresh(b"x" * 32, nonce, T0, 600)
    assert not creds.nonce_fresh(key, b"\xff\xfe", T0, 600)


def test_stun_binding_answers_xor_mapped_address() -> None:
    core, _ = make_core(secret=None)
    req = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    (out,) = core.handle_client(bytes(req), CLIENT, T0)
    assert isinstance(out, Transmit)
    assert out.dest == CLIENT
    assert out.relay is None
    resp = stun.parse_message(out.data)  # FINGERPRINT is checked by the parser
    assert resp.message_class == stun.Class.RESPONSE
    assert resp.transaction_id == req.transaction_id
    assert resp.attributes["XOR-MAPPED-ADDRESS"] == CLIENT
    assert "FINGERPRINT" in resp.attributes
    assert core.counters["stun_binding"] == 1


def test_turn_off_without_secret() -> None:
    core, bound = make_core(secret=None)
    req = stun.Message(stun.Method.ALLOCATE, stun.Class.REQUEST, attributes={"REQUESTED-TRANSPORT": 17 << 24})
    (out,) = core.handle_client(bytes(req), CLIENT, T0)
    assert isinstance(out, Transmit)
    assert stun.parse_message(out.data).error_code == 400
    assert bound == []
    assert not core.allocations


def test_allocate_challenge_then_success() -> None:
    core, bound = make_core()
    c = Client(core)
    c.login(T0)
    assert core.counters["auth_challenge"] == 1
    resp = c.allocate(T0)
    assert resp.message_class == stun.Class.RESPONSE
    assert resp.check_message_integrity(c.key)
    assert resp.attributes["XOR-RELAYED-ADDRESS"] == bound[0]
    assert resp.attributes["XOR-MAPPED-ADDRESS"] == CLIENT
    assert resp.attributes["LIFETIME"] == 600
    assert list(core.allocations) == [CLIENT]
    assert core.next_timer() == T0 + 600


def test_wrong_password_expired_user_and_wrong_transport_are_refused() -> None:
    core, bound = make_core()
    bad = Client(core)
    bad.login(T0)
    bad.key = b"\x00" * 16
    assert bad.allocate(T0).error_code == 401
    expired = Client(core, expiry=T0 - 1)
    assert expired.allocate(T0).error_code == 401
    assert core.counters["auth_failed"] == 2
    good = Client(core)
    resp = good.allocate(T0, **{"REQUESTED-TRANSPORT": 6 << 24})
    assert resp.error_code == 442
    assert resp.check_message_integrity(good.key)  # refusals after auth are signed
    assert bound == []
    assert not core.allocations


def test_stale_nonce_gets_438_with_a_fresh_one() -> None:
    core, _ = make_core()
    c = Client(core)
    c.login(T0)
    resp = c.request(stun.Method.ALLOCATE, T0 + 3600, {"REQUESTED-TRANSPORT": 17 << 24})
    assert resp.error_code == 438
    assert resp.attributes["NONCE"] != c.nonce
    c.nonce = resp.attributes["NONCE"]
    assert c.allocate(T0 + 3600).message_class == stun.Class.RESPONSE


def test_allocate_retransmission_and_mismatch() -> None:
    core, bound = make_core()
    c = Client(core)
    c.allocate(T0)
    # The same transaction again (a lost response): the same answer, no new relay (RFC 8656 §7.2).
    msg = stun.Message(stun.Method.ALLOCATE, stun.Class.REQUEST, attributes={"REQUESTED-TRANSPORT": 17 << 24})
    msg.attributes.update({"USERNAME": c.username, "REALM": "ghostmesh", "NONCE": c.nonce})
    msg.add_message_integrity(c.key)
    first = core.handle_client(bytes(msg), CLIENT, T0)
    again = core.handle_client(bytes(msg), CLIENT, T0 + 1)
    assert first == again
    assert stun.parse_message(first[0].data).error_code == 437  # type: ignore[union-attr]
    assert core.counters["allocation_mismatch"] == 2
    assert len(bound) == 1
    assert len(core.allocations) == 1
    # Refresh without an allocation: 437 too.
    other = Client(core, addr=("198.51.100.8", 1))
    other.login(T0)
    assert other.request(stun.Method.REFRESH, T0, {"LIFETIME": 600}).error_code == 437


def test_allocate_retransmission_returns_the_cached_response() -> None:
    core, bound = make_core()
    c = Client(core)
    c.login(T0)
    msg = stun.Message(stun.Method.ALLOCATE, stun.Class.REQUEST, attributes={"REQUESTED-TRANSPORT": 17 << 24})
    msg.attributes.update({"USERNAME": c.username, "REALM": "ghostmesh", "NONCE": c.nonce})
    msg.add_message_integrity(c.key)
    (first,) = core.handle_client(bytes(msg), CLIENT, T0)
    (again,) = core.handle_client(bytes(msg), CLIENT, T0 + 1)
    assert first == again
    assert len(bound) == 1


def test_refresh_extends_and_zero_deletes() -> None:
    core, bound = make_core()
    c = Client(core)
    c.allocate(T0)
    resp = c.request(stun.Method.REFRESH, T0 + 500, {"LIFETIME": 99999})
    assert resp.attributes["LIFETIME"] == 3600  # capped at the maximum (RFC 8656 §6.2)
    assert core.handle_timer(T0 + 700) == []  # the old expiry passed: still alive
    assert CLIENT in core.allocations
    c.login(T0 + 800)  # the first nonce went stale after 600 s
    msg = stun.Message(stun.Method.REFRESH, stun.Class.REQUEST, attributes={"LIFETIME": 0})
    msg.attributes.update({"USERNAME": c.username, "REALM": "ghostmesh", "NONCE": c.nonce})
    msg.add_message_integrity(c.key)
    out = core.handle_client(bytes(msg), CLIENT, T0 + 800)
    assert Release(bound[0]) in out
    assert stun.parse_message(out[0].data).attributes["LIFETIME"] == 0  # type: ignore[union-attr]
    assert not core.allocations


def test_allocation_expires_by_timer() -> None:
    core, bound = make_core()
    c = Client(core)
    c.allocate(T0)
    assert core.handle_timer(T0 + 599) == []
    assert core.handle_timer(T0 + 600) == [Release(bound[0])]
    assert not core.allocations
    assert core.counters["allocations_expired"] == 1
    assert core.next_timer() is None


def test_permission_send_data_and_permission_expiry() -> None:
    core, bound = make_core()
    c = Client(core)
    c.allocate(T0)
    relay = bound[0]
    send = stun.Message(
        stun.Method.SEND, stun.Class.INDICATION, attributes={"XOR-PEER-ADDRESS": PEER, "DATA": b"hi"}
    )
    assert core.handle_client(bytes(send), CLIENT, T0) == []  # no permission yet
    assert core.handle_peer(b"in", relay, PEER, T0) == []
    assert c.request(stun.Method.CREATE_PERMISSION, T0, {"XOR-PEER-ADDRESS": PEER}).message_class == (
        stun.Class.RESPONSE
    )
    assert core.handle_client(bytes(send), CLIENT, T0 + 1) == [Transmit(b"hi", PEER, relay)]
    (data,) = core.handle_peer(b"in", relay, (PEER[0], 9999), T0 + 1)  # permission is per IP, any port
    assert isinstance(data, Transmit)
    assert data.dest == CLIENT
    assert data.relay is None
    ind = stun.parse_message(data.data)
    assert ind.message_method == stun.Method.DATA
    assert ind.message_class == stun.Class.INDICATION
    assert ind.attributes["DATA"] == b"in"
    assert ind.attributes["XOR-PEER-ADDRESS"] == (PEER[0], 9999)
    core.handle_timer(T0 + 300)
    assert core.handle_peer(b"late", relay, PEER, T0 + 300) == []  # 300 s permission lifetime (RFC 8656 §9)
    assert core.counters["relayed_to_peer"] == 1
    assert core.counters["relayed_to_client"] == 1


def test_channel_bind_and_channel_data_both_ways() -> None:
    core, bound = make_core()
    c = Client(core)
    c.allocate(T0)
    relay = bound[0]
    for bad in (0x3FFF, 0x8000):
        resp = c.request(stun.Method.CHANNEL_BIND, T0, {"CHANNEL-NUMBER": bad, "XOR-PEER-ADDRESS": PEER})
        assert resp.error_code == 400
    ok = c.request(stun.Method.CHANNEL_BIND, T0, {"CHANNEL-NUMBER": 0x4001, "XOR-PEER-ADDRESS": PEER})
    assert ok.message_class == stun.Class.RESPONSE
    # The same peer on another channel, or another peer on this channel: 400 (RFC 8656 §12.2).
    assert (
        c.request(
            stun.Method.CHANNEL_BIND, T0, {"CHANNEL-NUMBER": 0x4002, "XOR-PEER-ADDRESS": PEER}
        ).error_code
        == 400
    )
    other = ("203.0.113.10", 1)
    assert (
        c.request(
            stun.Method.CHANNEL_BIND, T0, {"CHANNEL-NUMBER": 0x4001, "XOR-PEER-ADDRESS": other}
        ).error_code
        == 400
    )
    # Client -> peer, with and without UDP padding (RFC 8656 §12.5).
    assert core.handle_client(b"\x40\x01\x00\x03abc", CLIENT, T0) == [Transmit(b"abc", PEER, relay)]
    assert core.handle_client(b"\x40\x01\x00\x03abc\x00", CLIENT, T0) == [Transmit(b"abc", PEER, relay)]
    assert core.handle_client(b"\x40\x01\x00\x09abc", CLIENT, T0) == []  # shorter than its length
    assert core.handle_client(b"\x40\x05\x00\x01a", CLIENT, T0) == []  # unbound channel
    # Peer -> client as ChannelData.
    assert core.handle_peer(b"xyz", relay, PEER, T0) == [Transmit(b"\x40\x01\x00\x03xyz", CLIENT)]
    assert core.counters["malformed"] == 1
    assert core.counters["channel_unbound"] == 1


def test_denied_peer_is_403_and_the_allocation_stays() -> None:
    core, bound = make_core()
    c = Client(core)
    c.allocate(T0)
    for peer in (("127.0.0.1", 80), ("0.0.0.0", 1)):
        resp = c.request(stun.Method.CREATE_PERMISSION, T0, {"XOR-PEER-ADDRESS": peer})
        assert resp.error_code == 403
        assert resp.check_message_integrity(c.key)
    resp = c.request(
        stun.Method.CHANNEL_BIND, T0, {"CHANNEL-NUMBER": 0x4000, "XOR-PEER-ADDRESS": ("127.0.0.2", 1)}
    )
    assert resp.error_code == 403
    # An IPv6 peer for an IPv4 relay: the family mismatch (443) is answered before the deny list.
    assert c.request(stun.Method.CREATE_PERMISSION, T0, {"XOR-PEER-ADDRESS": ("::1", 1)}).error_code == 443
    assert core.counters["denied_peer"] == 3
    assert list(core.allocations) == [CLIENT]
    assert len(bound) == 1
    ok = c.request(stun.Method.CREATE_PERMISSION, T0, {"XOR-PEER-ADDRESS": PEER})
    assert ok.message_class == stun.Class.RESPONSE


def test_quotas_global_and_per_user() -> None:
    core, bound = make_core(max_allocations=3, max_allocations_per_user=2)
    a1 = Client(core, addr=("198.51.100.1", 1), user="alice")
    a2 = Client(core, addr=("198.51.100.1", 2), user="alice")
    a3 = Client(core, addr=("198.51.100.1", 3), user="alice")
    assert a1.allocate(T0).message_class == stun.Class.RESPONSE
    assert a2.allocate(T0).message_class == stun.Class.RESPONSE
    assert a3.allocate(T0).error_code == 486
    b1 = Client(core, addr=("198.51.100.2", 1), user="bob")
    b2 = Client(core, addr=("198.51.100.2", 2), user="bob")
    assert b1.allocate(T0).message_class == stun.Class.RESPONSE
    assert b2.allocate(T0).error_code == 486  # global quota of 3
    assert len(core.allocations) == 3 == len(bound)
    assert core.counters["quota_refused"] == 2
    a1.request(stun.Method.REFRESH, T0, {"LIFETIME": 0})
    assert a3.allocate(T0).message_class == stun.Class.RESPONSE  # the quota frees up


def test_refresh_with_another_users_credentials_is_441() -> None:
    core, _ = make_core()
    c = Client(core, user="alice")
    c.allocate(T0)
    mallory = Client(core, user="mallory")
    mallory.login(T0)
    assert mallory.request(stun.Method.REFRESH, T0, {"LIFETIME": 0}).error_code == 441
    assert CLIENT in core.allocations


def test_relay_bind_failure_is_508_and_leaks_nothing() -> None:
    core, _ = make_core()
    core._bind_relay = lambda: None
    c = Client(core)
    assert c.allocate(T0).error_code == 508
    assert not core.allocations


def test_non_stun_and_broken_stun_are_counted() -> None:
    core, _ = make_core()
    good = bytes(stun.Message(stun.Method.BINDING, stun.Class.REQUEST))
    no_cookie = good[:4] + b"\x00\x00\x00\x00" + good[8:]
    bad_len = good[:2] + struct.pack("!H", 8) + good[4:]
    for junk in (b"", b"\x00", b"\xff" * 30, no_cookie, bad_len, b"\x40\x00"):
        assert core.handle_client(junk, CLIENT, T0) == []
    assert core.counters["malformed"] == 6
