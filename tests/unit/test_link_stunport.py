"""ghostlink's shared WireGuard port, the pure parts: the BPF filter, UDP/IP headers, the STUN core, netcheck.

No sockets: the filter runs in a tiny classic-BPF interpreter over packets built here, and the STUN core is
driven as transcripts with hand-stepped time (aioice's codec decodes what it sends).
"""

from __future__ import annotations

import socket
import struct

import pytest
from aioice import stun
from hypothesis import given, settings
from hypothesis import strategies as st

from ghostlink.traversal import sharedsock as ss
from ghostlink.traversal.stun_core import (
    ENDPOINT_INDEPENDENT,
    MAX_PENDING,
    UNKNOWN,
    VARIES,
    Answer,
    Completed,
    NetcheckResult,
    RelayReport,
    StunCore,
    check_username,
    classify_mapping,
    is_stun,
    netcheck_result,
    parse_username,
)

WG_PORT = 51820
ME = "bWVrZXkAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
PEER = "cGVlcmtleQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
PEER_ADDR = ("198.51.100.7", 40001)
SERVER = ("192.0.2.10", 3478)


def ipv4(payload: bytes, *, sport: int = 40000, dport: int = WG_PORT, proto: int = 17, **kw: int) -> bytes:
    """An IPv4 packet carrying a UDP datagram (``options`` extra header words, ``frag`` field)."""
    options = kw.get("options", 0)
    ihl = 5 + options
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    total = 4 * ihl + len(udp)
    hdr = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | ihl,
        0,
        total,
        1,
        kw.get("frag", 0),
        64,
        proto,
        0,
        socket.inet_aton("198.51.100.7"),
        socket.inet_aton("192.0.2.21"),
    )
    return hdr + b"\x01\x01\x01\x01" * options + udp


def binding(
    username: str | None = None, cls: stun.Class = stun.Class.REQUEST, txid: bytes = b"t" * 12
) -> bytes:
    attrs: dict[str, object] = {} if username is None else {"USERNAME": username}
    msg = stun.Message(stun.Method.BINDING, cls, txid, attrs)
    msg.add_fingerprint()
    return bytes(msg)


# ---- the BPF filter ----------------------------------------------------------------------------


def test_bpf_program_names_the_port_and_the_cookie_and_packs_to_sock_filter() -> None:
    prog = ss.bpf_program(WG_PORT)
    assert len(prog) == 19
    assert prog[6] == (ss.BPF_JMP | ss.BPF_JEQ | ss.BPF_K, 0, 11, WG_PORT)
    assert prog[10][3] == 0x2112A442
    assert prog[-2] == (ss.BPF_RET | ss.BPF_K, 0, 0, 0xFFFF)  # accept
    assert prog[-1] == (ss.BPF_RET | ss.BPF_K, 0, 0, 0)  # reject
    for i, (code, jt, jf, _) in enumerate(prog):  # every jump lands inside the program
        if code & 0x07 == ss.BPF_JMP:
            assert i + 1 + max(jt, jf) < len(prog)
    packed = ss.pack_filter(prog)
    assert len(packed) == 8 * len(prog)
    assert struct.unpack_from("=HBBI", packed, 6 * 8) == prog[6]
    with pytest.raises(ValueError, match="not a UDP port"):
        ss.bpf_program(0)


def test_bpf_filter_accepts_stun_to_wireguards_port_only() -> None:
    prog = ss.bpf_program(WG_PORT)
    assert ss.run_filter(prog, ipv4(binding())) == 0xFFFF
    assert ss.run_filter(prog, ipv4(binding(), options=2)) == 0xFFFF  # IHL > 5: X follows the header length
    wg_handshake = b"\x01\x00\x00\x00" + bytes(144)  # WireGuard type 1: no cookie at offset 4
    assert ss.run_filter(prog, ipv4(wg_handshake)) == 0
    unlucky = b"\x04\x00\x00\x00" + (0x2112A442).to_bytes(4, "big") + bytes(40)  # receiver index == cookie
    assert is_stun(unlucky)  # passes the cookie test...
    assert ss.run_filter(prog, ipv4(unlucky)) == 0  # ...but not the length test
    assert ss.run_filter(prog, ipv4(binding() + b"\x00" * 4)) == 0  # trailing bytes after the message
    assert ss.run_filter(prog, ipv4(binding(), dport=WG_PORT + 1)) == 0
    assert ss.run_filter(prog, ipv4(binding(), proto=6)) == 0
    assert ss.run_filter(prog, ipv4(binding(), frag=0x0010)) == 0  # a later fragment
    channel_data = b"\x40\x00\x00\x10" + binding()[4:]  # TURN ChannelData: top bits 01, cookie-like bytes
    assert ss.run_filter(prog, ipv4(channel_data)) == 0
    assert ss.run_filter(prog, ipv4(binding())[:30]) == 0  # truncated: the load fails, as in the kernel


# ---- headers ---------------------------------------------------------------------------------


def _ones_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


@given(payload=st.binary(max_size=300), sport=st.integers(1, 65535), dport=st.integers(1, 65535))
def test_udp_checksum_verifies_over_the_pseudo_header(payload: bytes, sport: int, dport: int) -> None:
    seg = ss.build_udp(sport, dport, payload, "192.0.2.1", "198.51.100.2")
    assert struct.unpack_from("!HHH", seg) == (sport, dport, 8 + len(payload))
    assert seg[8:] == payload
    assert struct.unpack_from("!H", seg, 6)[0] != 0
    pseudo = (
        socket.inet_aton("192.0.2.1")
        + socket.inet_aton("198.51.100.2")
        + struct.pack("!BBH", 0, 17, len(seg))
    )
    assert _ones_sum(pseudo + seg) == 0xFFFF  # RFC 768: a receiver's sum over everything is all ones


def test_udp_without_a_source_has_no_checksum() -> None:
    seg = ss.build_udp(WG_PORT, 3478, b"x", None, "192.0.2.10")
    assert seg == struct.pack("!HHHH", WG_PORT, 3478, 9, 0) + b"x"
    with pytest.raises(ValueError, match="does not fit"):
        ss.build_udp(1, 2, bytes(65535), None, "192.0.2.10")


def test_parse_ipv4_udp_roundtrip_and_rejects() -> None:
    dg = ss.parse_ipv4_udp(ipv4(b"hello", sport=1234, options=1))
    assert dg == ss.Datagram(("198.51.100.7", 1234), ("192.0.2.21", WG_PORT), b"hello")
    good = ipv4(b"hello")
    assert ss.parse_ipv4_udp(good + b"trailer") == ss.Datagram(
        ("198.51.100.7", 40000), ("192.0.2.21", WG_PORT), b"hello"
    )  # bytes past the IP total length are ignored
    assert ss.parse_ipv4_udp(b"\x60" + good[1:]) is None  # IPv6 version nibble
    assert ss.parse_ipv4_udp(good[:27]) is None
    assert ss.parse_ipv4_udp(ipv4(b"hello", proto=6)) is None
    assert ss.parse_ipv4_udp(ipv4(b"hello", frag=0x0001)) is None
    bad_len = good[:24] + struct.pack("!H", 200) + good[26:]  # UDP length beyond the packet
    assert ss.parse_ipv4_udp(bad_len) is None
    assert ss.parse_ipv4_udp(b"\x45" + good[1:2] + struct.pack("!H", 999) + good[4:]) is None


def test_is_stun_follows_rfc8489_section5() -> None:
    assert is_stun(binding())
    assert not is_stun(binding()[:19])
    assert not is_stun(b"\xc0" + binding()[1:])
    assert not is_stun(binding()[:4] + b"\x00\x00\x00\x00" + binding()[8:])


@settings(max_examples=300)
@given(packet=st.binary(max_size=120))
def test_parse_ipv4_udp_and_the_filter_never_raise(packet: bytes) -> None:
    dg = ss.parse_ipv4_udp(packet)
    verdict = ss.run_filter(ss.bpf_program(WG_PORT), packet)
    assert verdict in (0, 0xFFFF)
    if dg is not None:
        assert len(dg.payload) <= len(packet) - 28


# ---- USERNAME ---------------------------------------------------------------------------------


def test_username_is_receiver_then_sender() -> None:
    assert check_username(PEER, ME) == f"{PEER}:{ME}"
    assert parse_username(f"{ME}:{PEER}", ME) == PEER
    assert parse_username(f"{PEER}:{ME}", ME) is None  # addressed to the peer, not to us
    assert parse_username(ME, ME) is None
    assert parse_username(f"{ME}:", ME) is None
    assert parse_username(f"{ME}:a:b", ME) is None
    assert parse_username(":x", "") is None


# ---- the STUN core ----------------------------------------------------------------------------


def test_stun_request_then_response_from_the_server_completes_with_mapped_and_rtt() -> None:
    core = StunCore(ME)
    req = core.request(SERVER, now=10.0)
    assert req is not None
    txid, data = req
    msg = stun.parse_message(data)
    assert (msg.message_method, msg.message_class, msg.transaction_id) == (
        stun.Method.BINDING,
        stun.Class.REQUEST,
        txid,
    )
    assert "USERNAME" not in msg.attributes
    assert "FINGERPRINT" in msg.attributes
    resp = stun.Message(
        stun.Method.BINDING, stun.Class.RESPONSE, txid, {"XOR-MAPPED-ADDRESS": ("192.0.2.21", 51820)}
    )
    ev = core.receive(bytes(resp), SERVER, now=10.025)
    assert isinstance(ev, Completed)
    assert (ev.txid, ev.ok, ev.mapped) == (txid, True, ("192.0.2.21", 51820))
    assert ev.rtt == pytest.approx(0.025)
    assert core.pending == 0
    assert core.receive(bytes(resp), SERVER, now=10.03) is None  # a duplicate is unmatched
    assert core.counters["unmatched_responses"] == 1


def test_response_must_come_from_where_the_request_went() -> None:
    core = StunCore(ME)
    req = core.request(PEER_ADDR, now=0.0, username=check_username(PEER, ME))
    assert req is not None
    txid, data = req
    assert stun.parse_message(data).attributes["USERNAME"] == f"{PEER}:{ME}"
    resp = binding(cls=stun.Class.RESPONSE, txid=txid)
    assert core.receive(resp, ("198.51.100.7", 40002), now=0.1) is None
    assert core.counters["wrong_source"] == 1
    ev = core.receive(resp, PEER_ADDR, now=0.2)
    assert isinstance(ev, Completed)
    assert ev.ok
    assert ev.mapped is None  # an answer without an address still proves the path
    assert core.counters["responses_without_address"] == 1


def test_forgotten_transactions_and_error_responses() -> None:
    core = StunCore(ME)
    req = core.request(SERVER, now=0.0)
    assert req is not None
    core.forget(req[0])
    assert core.receive(binding(cls=stun.Class.RESPONSE, txid=req[0]), SERVER, now=5.0) is None
    req2 = core.request(SERVER, now=0.0)
    assert req2 is not None
    err = stun.Message(stun.Method.BINDING, stun.Class.ERROR, req2[0], {"ERROR-CODE": (400, "Bad Request")})
    ev = core.receive(bytes(err), SERVER, now=0.5)
    assert isinstance(ev, Completed)
    assert not ev.ok
    assert core.counters["error_responses"] == 1


def test_pending_transactions_are_bounded() -> None:
    core = StunCore(ME)
    for _ in range(MAX_PENDING):
        assert core.request(SERVER, now=0.0) is not None
    assert core.request(SERVER, now=0.0) is None
    assert core.counters["pending_full"] == 1


def test_a_check_for_us_is_answered_with_its_source_and_names_the_sender() -> None:
    core = StunCore(ME)
    ev = core.receive(binding(check_username(ME, PEER), txid=b"q" * 12), PEER_ADDR, now=1.0)
    assert isinstance(ev, Answer)
    assert (ev.dst, ev.from_key) == (PEER_ADDR, PEER)
    resp = stun.parse_message(ev.data)
    assert (resp.message_class, resp.transaction_id) == (stun.Class.RESPONSE, b"q" * 12)
    assert resp.attributes["XOR-MAPPED-ADDRESS"] == PEER_ADDR
    assert core.counters["checks_answered"] == 1


def test_checks_for_others_and_plain_binding_requests_are_ignored_and_counted() -> None:
    core = StunCore(ME)
    assert core.receive(binding(check_username(PEER, ME)), PEER_ADDR, now=0.0) is None
    assert core.receive(binding(), PEER_ADDR, now=0.0) is None  # we are not a STUN server
    assert core.receive(binding(cls=stun.Class.INDICATION), PEER_ADDR, now=0.0) is None
    assert core.counters["ignored_requests"] == 2
    assert core.counters["ignored_indication"] == 1


def test_key_rotation_changes_which_checks_are_ours() -> None:
    core = StunCore(ME)
    core.local_key = PEER
    assert core.receive(binding(check_username(ME, "x")), PEER_ADDR, now=0.0) is None
    assert isinstance(core.receive(binding(check_username(PEER, "x")), PEER_ADDR, now=0.0), Answer)


def test_malformed_datagrams_are_counted_never_raised() -> None:
    core = StunCore(ME)
    good = binding(check_username(ME, PEER))
    bad = [
        b"",
        b"garbage",
        good[:-1],  # length mismatch
        good[:-4] + b"\x00\x00\x00\x00",  # wrong FINGERPRINT
        b"\x00\x7f" + good[2:],  # unknown method
        good[:4] + b"\x00\x00\x00\x00" + good[8:],  # no magic cookie
        struct.pack("!HHI12s", 1, 8, 0x2112A442, b"t" * 12)
        + b"\x00\x06\x00\xff\x00\x00\x00\x00",  # attr overrun
        struct.pack("!HHI12s", 1, 2, 0x2112A442, b"t" * 12) + b"\x00\x06",  # body not a multiple of 4
    ]
    for data in bad:
        assert core.receive(data, PEER_ADDR, now=0.0) is None
    assert core.counters["malformed"] == len(bad)  # aioice rejects an unknown method too
    assert core.counters["ignored_method"] == 0
    assert core.counters["checks_answered"] == 0


@settings(max_examples=500)
@given(data=st.binary(max_size=200), tail=st.binary(max_size=60))
def test_stun_core_never_raises_on_any_bytes(data: bytes, tail: bytes) -> None:
    core = StunCore(ME)
    core.receive(data, PEER_ADDR, now=0.0)
    # Mostly-valid headers reach aioice's attribute parsing, where the interesting failures are.
    header = struct.pack("!HHI12s", 0x0001, len(tail), 0x2112A442, b"t" * 12)
    core.receive(header + tail, PEER_ADDR, now=0.0)
    assert sum(core.counters.values()) >= 2


# ---- netcheck ---------------------------------------------------------------------------------

S1 = ("192.0.2.10", 3478)
S2 = ("192.0.2.11", 3478)
S1B = ("192.0.2.10", 3479)


def test_mapping_classification() -> None:
    same = ("192.0.2.21", 51820)
    other = ("192.0.2.21", 40312)
    assert classify_mapping([(S1, same), (S2, same)]) == ENDPOINT_INDEPENDENT
    assert classify_mapping([(S1, same), (S2, other)]) == VARIES
    assert classify_mapping([(S1, same), (S1B, other)]) == VARIES  # any difference proves it
    assert classify_mapping([(S1, same), (S1B, same)]) == UNKNOWN  # one server IP: not conclusive
    assert classify_mapping([(S1, same)]) == UNKNOWN
    assert classify_mapping([]) == UNKNOWN


def test_netcheck_result_reports_each_relay_and_the_first_answer() -> None:
    servers = [(1, "fra", S1), (2, "ams", S2), (3, "nyc", ("192.0.2.12", 3478))]
    answers = [
        None,
        (S2, ("192.0.2.21", 51820), 0.0123),
        (("192.0.2.12", 3478), ("192.0.2.21", 51820), 0.002),
    ]
    r = netcheck_result(servers, answers)
    assert r == NetcheckResult(
        udp=True,
        public_endpoint="192.0.2.21:51820",
        mapping=ENDPOINT_INDEPENDENT,
        relays=(
            RelayReport(1, "fra", "192.0.2.10:3478", -1.0, ""),
            RelayReport(2, "ams", "192.0.2.11:3478", 12.3, "192.0.2.21:51820"),
            RelayReport(3, "nyc", "192.0.2.12:3478", 2.0, "192.0.2.21:51820"),
        ),
    )
    none = netcheck_result(servers[:1], [None])
    assert (none.udp, none.public_endpoint, none.mapping) == (False, "", UNKNOWN)
    assert netcheck_result([], []) == NetcheckResult(False, "", UNKNOWN, ())


def udp6(payload: bytes, *, sport: int = 40000, dport: int = WG_PORT) -> bytes:
    """A UDP segment as a raw IPv6 socket hands it over (no IP header)."""
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def test_bpf_program6_reads_udp_offsets_and_accepts_stun_to_our_port_only() -> None:
    prog = ss.bpf_program6(WG_PORT)
    assert ss.run_filter(prog, udp6(binding())) == 0xFFFF
    assert ss.run_filter(prog, udp6(binding(), dport=WG_PORT + 1)) == 0
    assert ss.run_filter(prog, udp6(b"\x01\x00\x00\x00" + b"\x00" * 144)) == 0  # a WireGuard handshake
    assert ss.run_filter(prog, udp6(binding() + b"\x00" * 4)) == 0  # length mismatch
    assert ss.run_filter(prog, udp6(binding())[:12]) == 0  # truncated
    assert len(ss.pack_filter(prog)) == 8 * len(prog)


def test_parse_udp_for_ipv6_raw_sockets() -> None:
    dg = ss.parse_udp(udp6(b"hello", sport=1234) + b"pad", "2001:db8::5")
    assert dg == ss.Datagram(("2001:db8::5", 1234), ("::", WG_PORT), b"hello")
    assert ss.parse_udp(b"\x00" * 7, "2001:db8::5") is None
    bad = struct.pack("!HHHH", 1, 2, 100, 0) + b"x"
    assert ss.parse_udp(bad, "2001:db8::5") is None


def test_udp_checksum_over_ipv6_pseudo_header_verifies() -> None:
    seg = ss.build_udp(WG_PORT, 3478, b"stun!", "2001:db8::1", "2001:db8::2")
    src, dst = (
        socket.inet_pton(socket.AF_INET6, "2001:db8::1"),
        socket.inet_pton(socket.AF_INET6, "2001:db8::2"),
    )
    data = src + dst + struct.pack("!I3xB", len(seg), 17) + seg + b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    assert total == 0xFFFF
