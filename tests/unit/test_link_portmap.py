"""ghostlink.traversal.portmap_wire and portmap_core: PCP (RFC 6887) and NAT-PMP (RFC 6886) layouts,
and the mapping state machine as transcripts with hand-stepped time."""

from __future__ import annotations

import itertools
import struct

import pytest

from ghostlink.traversal import portmap_wire as wire
from ghostlink.traversal.portmap_core import (
    NATPMP,
    PCP,
    UPNP,
    PortMapCore,
    Send,
    UpnpMap,
    UpnpUnmap,
    reachable_external,
)
from ghostlink.traversal.portmap_wire import pcp_map_request

NONCE = bytes(range(12))
CLIENT = "198.51.100.10"


# --- wire: RFC layouts --------------------------------------------------------------------------------


def test_natpmp_requests_follow_rfc6886_section_3() -> None:
    assert wire.natpmp_external_request() == b"\x00\x00"  # §3.2
    req = wire.natpmp_map_request(41641, 41641, 7200)  # §3.3: UDP is opcode 1
    assert len(req) == 12
    assert struct.unpack("!BBHHHI", req) == (0, 1, 0, 41641, 41641, 7200)
    assert wire.natpmp_map_request(41641, 0, 0)[4:] == struct.pack("!HHI", 41641, 0, 0)  # §3.4 delete
    with pytest.raises(ValueError, match="port"):
        wire.natpmp_map_request(0, 1, 1)


def test_natpmp_responses_parse() -> None:
    ext = struct.pack("!BBHI", 0, 128, 0, 77) + bytes([192, 0, 2, 21])
    assert wire.parse_natpmp(ext) == wire.NatPmpResponse(0, 0, 77, external_ip="192.0.2.21")
    mapped = struct.pack("!BBHIHHI", 0, 129, 0, 78, 41641, 50000, 3600)
    assert wire.parse_natpmp(mapped) == wire.NatPmpResponse(
        1, 0, 78, internal_port=41641, external_port=50000, lifetime=3600
    )
    refused = struct.pack("!BBHI", 0, 129, 2, 78) + bytes(8)
    r = wire.parse_natpmp(refused)
    assert r is not None
    assert (r.opcode, r.result) == (1, 2)
    assert wire.parse_natpmp(b"\x00\x01") is None  # a request, not a response
    assert wire.parse_natpmp(mapped[:10]) is None  # truncated success
    assert wire.parse_natpmp(b"\x02" + mapped[1:]) is None  # another version


def test_pcp_map_request_follows_rfc6887_sections_7_1_and_11_1() -> None:
    req = pcp_map_request(CLIENT, NONCE, 41641, external_port=41641, lifetime=7200)
    assert len(req) == 60
    assert req[0] == 2  # version
    assert req[1] == 1  # R=0, opcode MAP
    assert req[2:4] == b"\x00\x00"
    assert struct.unpack_from("!I", req, 4)[0] == 7200
    assert req[8:24] == b"\x00" * 10 + b"\xff\xff" + bytes([198, 51, 100, 10])  # IPv4-mapped client
    assert req[24:36] == NONCE
    assert req[36] == 17  # UDP
    assert req[37:40] == b"\x00\x00\x00"
    assert struct.unpack_from("!HH", req, 40) == (41641, 41641)
    assert req[44:60] == b"\x00" * 10 + b"\xff\xff" + b"\x00" * 4  # ::ffff:0.0.0.0, no preference
    with pytest.raises(ValueError, match="nonce"):
        pcp_map_request(CLIENT, b"short", 41641, lifetime=1)


def pcp_response(
    result: int = 0,
    lifetime: int = 3600,
    epoch: int = 100,
    *,
    nonce: bytes = NONCE,
    internal: int = 41641,
    external: int = 50000,
    ip: str = "192.0.2.21",
) -> bytes:
    header = struct.pack("!BBBBII", 2, 0x81, 0, result, lifetime, epoch) + b"\x00" * 12
    return header + nonce + struct.pack("!B3xHH", 17, internal, external) + wire.ip16(ip)


def test_pcp_response_parses() -> None:
    r = wire.parse_pcp(pcp_response())
    assert r == wire.PcpResponse(1, 0, 3600, 100, NONCE, 17, 41641, 50000, "192.0.2.21")
    assert wire.parse_pcp(pcp_response()[:23]) is None
    assert wire.parse_pcp(pcp_map_request(CLIENT, NONCE, 1, lifetime=1)) is None  # R bit clear: a request
    short = wire.parse_pcp(pcp_response(result=2)[:24])
    assert short is not None
    assert short.result == 2


def test_ip16_roundtrip() -> None:
    assert wire.from_ip16(wire.ip16("192.0.2.1")) == "192.0.2.1"
    assert wire.from_ip16(wire.ip16("2001:db8::1")) == "2001:db8::1"


# --- core: transcripts --------------------------------------------------------------------------------


def sends(actions: list[Send | UpnpMap | UpnpUnmap]) -> list[bytes]:
    return [a.data for a in actions if isinstance(a, Send)]


def test_pcp_mapping_granted_renewed_at_half_life_and_deleted() -> None:
    core = PortMapCore(41641, CLIENT, nonce=NONCE)
    first = sends(core.poll(0.0))
    assert len(first) == 1
    assert wire.parse_pcp(first[0]) is None  # it is a request
    assert first[0][24:36] == NONCE
    assert core.receive(pcp_response(lifetime=120), now=0.01) is True
    assert core.mapping == ("192.0.2.21", 50000)
    assert core.protocol == PCP
    assert core.poll(1.0) == []
    assert core.next_timer() == pytest.approx(60.01)
    renewal = sends(core.poll(60.01))
    assert len(renewal) == 1
    assert renewal[0][24:36] == NONCE  # same nonce (RFC 6887 §11.2)
    assert struct.unpack_from("!H", renewal[0], 42)[0] == 50000  # asks for what it has
    assert core.receive(pcp_response(lifetime=120, epoch=160), now=60.02) is False  # same mapping
    (delete,) = sends(core.close())
    assert struct.unpack_from("!I", delete, 4)[0] == 0
    assert delete[24:36] == NONCE
    assert core.poll(1000.0) == []


def test_answers_that_are_not_ours_are_ignored() -> None:
    core = PortMapCore(41641, CLIENT, nonce=NONCE)
    core.poll(0.0)
    assert core.receive(pcp_response(nonce=b"x" * 12), 0.01) is False
    assert core.receive(pcp_response(internal=1234), 0.01) is False
    assert core.receive(b"garbage", 0.01) is False
    assert core.mapping is None


def test_refusals_walk_pcp_then_natpmp_then_upnp_then_back_off() -> None:
    core = PortMapCore(41641, CLIENT, nonce=NONCE)
    core.poll(0.0)
    core.receive(pcp_response(result=2), 0.01)  # NOT_AUTHORIZED: next protocol at once
    pmp = sends(core.poll(0.01))
    assert pmp == [wire.natpmp_external_request(), wire.natpmp_map_request(41641, 41641, 7200)]
    core.receive(struct.pack("!BBHI", 0, 129, 2, 5) + bytes(8), 0.02)  # refused
    (upnp,) = core.poll(0.02)
    assert upnp == UpnpMap(41641, 7200)
    core.upnp_result(None, 0, 3.0, "AddPortMapping refused: 606")
    assert core.mapping is None
    assert "pcp: NOT_AUTHORIZED" in core.status
    assert "upnp: AddPortMapping refused" in core.status
    assert core.next_timer() == pytest.approx(603.0)  # quiet for retry_after
    assert core.poll(300.0) == []


def test_silent_gateway_costs_a_few_datagrams_per_round_and_rounds_back_off() -> None:
    core = PortMapCore(41641, CLIENT, protocols=(PCP, NATPMP))
    sent, t, rounds = 0, 0.0, []
    for _ in range(20000):
        sent += len(sends(core.poll(t)))
        nxt = core.next_timer()
        assert nxt is not None
        if nxt > t + 100:
            rounds.append((t, sent))
        t = max(t + 0.01, nxt)
        if t > 3 * 3600:
            break
    assert rounds[0][1] == 3 + 3 * 2  # PCP 3 requests, NAT-PMP 3 x (address + map)
    starts = sorted({round(r[0]) for r in rounds})
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps[:3] == pytest.approx([600, 1200, 2400], abs=5)  # doubling up to an hour
    assert sent <= 9 * (len(starts) + 1)


def test_natpmp_mapping_needs_the_external_address_too() -> None:
    core = PortMapCore(41641, CLIENT, protocols=(NATPMP,))
    core.poll(0.0)
    mapped = struct.pack("!BBHIHHI", 0, 129, 0, 10, 41641, 41641, 7200)
    assert core.receive(mapped, 0.01) is False
    ext = struct.pack("!BBHI", 0, 128, 0, 10) + bytes([192, 0, 2, 30])
    assert core.receive(ext, 0.02) is True
    assert core.mapping == ("192.0.2.30", 41641)
    assert sends(core.close()) == [wire.natpmp_map_request(41641, 0, 0)]


def test_pcp_unsupported_version_from_a_natpmp_server_moves_on_at_once() -> None:
    core = PortMapCore(41641, CLIENT)
    core.poll(0.0)
    core.receive(struct.pack("!BBHI", 0, 129, 1, 0), 0.01)  # RFC 6887 §9
    assert wire.natpmp_external_request() in sends(core.poll(0.01))


def test_unanswered_renewal_retries_until_expiry_then_starts_over() -> None:
    core = PortMapCore(41641, CLIENT, nonce=NONCE, protocols=(PCP,))
    core.poll(0.0)
    core.receive(pcp_response(lifetime=100), 0.0)
    assert sends(core.poll(50.0))
    core.poll(50.25)
    core.poll(50.75)
    core.poll(51.75)  # silent: retry in 30 s, the mapping is still offered
    assert core.mapping is not None
    assert core.next_timer() == pytest.approx(81.75)
    restart = core.poll(100.0)  # expired: dropped, and discovery starts over at once
    assert core.mapping is None
    assert core.status == "mapping expired"
    assert len(sends(restart)) == 1


def test_server_epoch_going_back_means_it_lost_our_mapping() -> None:
    core = PortMapCore(41641, CLIENT, nonce=NONCE)
    core.poll(0.0)
    core.receive(pcp_response(lifetime=1000, epoch=5000), 0.0)
    core.poll(500.0)
    assert core.receive(pcp_response(lifetime=1000, epoch=3, external=50001), 500.1) is True
    assert core.mapping == ("192.0.2.21", 50001)


def test_upnp_mapping_and_its_deletion() -> None:
    core = PortMapCore(41641, CLIENT, protocols=(UPNP,))
    (req,) = core.poll(0.0)
    assert req == UpnpMap(41641, 7200)
    assert core.upnp_result(("192.0.2.40", 41641), 0, 1.0) is True  # permanent lease
    assert core.next_timer() == pytest.approx(1801.0)
    assert core.close() == [UpnpUnmap(41641)]


def test_private_or_carrier_grade_external_addresses_are_not_offered() -> None:
    assert reachable_external("192.0.2.21")
    assert not reachable_external("100.64.3.4")  # our gateway is behind a carrier NAT
    assert not reachable_external("192.168.1.1")
    core = PortMapCore(41641, CLIENT, nonce=NONCE)
    core.poll(0.0)
    core.receive(pcp_response(ip="100.64.0.7"), 0.0)
    assert core.mapping is None


# --- wire: SSDP search (UPnP Device Architecture 1.1 §1.3) ----------------------------------------------

IGD = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"


def test_ssdp_search_is_uda_m_search() -> None:
    assert wire.ssdp_search(IGD, 2) == (
        b'M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nMAN: "ssdp:discover"\r\nMX: 2\r\n'
        b"ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n\r\n"
    )
    for mx in (0, 6):
        with pytest.raises(ValueError, match="MX"):
            wire.ssdp_search(IGD, mx)
    with pytest.raises(ValueError, match="one non-empty line"):
        wire.ssdp_search("a\r\nMAN: x", 2)


def _answer(*headers: str, status: str = "HTTP/1.1 200 OK") -> bytes:
    return ("\r\n".join((status, *headers)) + "\r\n\r\n").encode()


# miniupnpd's answer (its headers, in its order)
MINIUPNPD = _answer(
    "CACHE-CONTROL: max-age=120",
    f"ST: {IGD}",
    f"USN: uuid:73616d61-6a6b-7a74-650a-0d24d4a5d636::{IGD}",
    "EXT:",
    "SERVER: Debian/12 UPnP/1.1 MiniUPnPd/2.3.1",
    "LOCATION: http://198.51.100.1:5000/rootDesc.xml",
    'OPT: "http://schemas.upnp.org/upnp/1/0/"; ns=01',
)


def test_an_ssdp_answer_gives_its_location() -> None:
    assert wire.parse_ssdp_location(MINIUPNPD, IGD) == "http://198.51.100.1:5000/rootDesc.xml"
    lower = _answer(f"st: {IGD}", "location:http://198.51.100.1/d.xml", status="http/1.1 200 ok")
    assert wire.parse_ssdp_location(lower, IGD) == "http://198.51.100.1/d.xml"


@pytest.mark.parametrize(
    "data",
    [
        _answer(f"ST: {IGD}", "LOCATION: http://198.51.100.1:5000/d.xml", status="HTTP/1.1 404 Not Found"),
        _answer("ST: upnp:rootdevice", "LOCATION: http://198.51.100.1:5000/d.xml"),  # another target
        _answer(f"ST: {IGD}"),  # no location
        _answer(f"ST: {IGD}", "LOCATION: https://198.51.100.1/d.xml"),  # not http
        _answer(f"ST: {IGD}", "LOCATION: http://198.51.100.1:99999/d.xml"),  # port out of range
        _answer(f"ST: {IGD}", "LOCATION: http:///d.xml"),  # no host
        _answer(f"ST: {IGD}", "a line without a colon", "LOCATION: http://198.51.100.1/d.xml"),
        _answer(f"ST: {IGD}", "LOCATION: http://198.51.100.1/d.xml")[:-4],  # no end of headers
        _answer(f"ST: {IGD}", "LOCATION: http://198.51.100.1/d.xml", "X-PAD: " + "x" * 2048),  # too big
        _answer(f"ST: {IGD}", "LOCATION: http://198.51.100.1/\u00e9.xml"),  # not ASCII
        b"M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\n\r\n",  # another node's search
        b"",
    ],
)
def test_anything_else_is_no_answer(data: bytes) -> None:
    assert wire.parse_ssdp_location(data, IGD) is None
