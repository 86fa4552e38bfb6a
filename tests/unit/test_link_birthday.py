"""ghostlink.traversal.birthday_core (hand-stepped time) and the route table the edge renders from it."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from ghostcore.keys import PrivateKey
from ghostlink import nft
from ghostlink.hostjournal import HostJournal, Origin, read_journal
from ghostlink.nodekey import NodeKey
from ghostlink.traversal import birthday_core as bc
from ghostlink.traversal.birthday import BirthdayProber, render, table_for
from ghostlink.traversal.birthday_core import Birthday

EASY = [("198.51.100.10", 41641), ("192.0.2.20", 41641)]  # host endpoint, then STUN's: same port
HARD = [("198.51.100.138", 41641), ("192.0.2.21", 57980)]  # the NAT remapped WireGuard's port
EASY_PUB = ("192.0.2.20", 41641)


def _bd(mapping: str, **kw: float) -> Birthday:
    b = Birthday(rng=random.Random(7), **kw)  # type: ignore[arg-type]
    b.mapping = mapping
    return b


def test_hit_probability_matches_the_birthday_numbers() -> None:
    # Distinct ports (sampled without replacement): a little above 1 - (1 - K/64512)^M.
    assert bc.hit_probability(256, 1024) == pytest.approx(0.983, abs=0.001)
    assert bc.hit_probability(256, 512) == pytest.approx(0.870, abs=0.001)
    assert bc.hit_probability(256, 256) == pytest.approx(0.639, abs=0.001)
    assert bc.hit_probability(0, 1024) == 0.0
    assert bc.hit_probability(10, 100, ports=100) == 1.0  # every port probed


def test_roles_follow_our_nat_and_the_peers_candidates() -> None:
    assert bc.role_for(bc.ENDPOINT_INDEPENDENT, HARD) == (bc.SPRAY, (HARD[1],))
    assert bc.role_for(bc.VARIES, EASY) == (bc.LISTEN, tuple(EASY))
    assert bc.role_for(bc.VARIES, HARD) is None  # hard <-> hard: no chance, nothing sent
    assert bc.role_for(bc.ENDPOINT_INDEPENDENT, EASY) is None  # easy <-> easy: the checks do it
    assert bc.role_for(bc.VARIES, EASY[:1]) is None  # one address (no STUN yet, or UDP blocked)
    assert bc.role_for("unknown", HARD) is None
    assert bc.role_for("", EASY) is None  # no netcheck yet
    v6 = [("2001:db8::1", 41641), ("2001:db8::2", 9)]
    assert bc.role_for(bc.ENDPOINT_INDEPENDENT, v6) is None  # IPv4 only
    many = [(f"198.51.100.{i}", 41641) for i in range(1, 10)]
    role = bc.role_for(bc.VARIES, many)
    assert role is not None
    assert len(role[1]) == bc.MAX_TARGETS


def test_probes_verify_only_with_the_pairs_key() -> None:
    a, b, c = PrivateKey.generate(), PrivateKey.generate(), PrivateKey.generate()
    k_ab = bc.probe_key(a.exchange(b.public_key()))
    assert bc.probe_key(b.exchange(a.public_key())) == k_ab  # both peers derive it
    k_cb = bc.probe_key(c.exchange(b.public_key()))
    sender = a.public_key().raw
    p = bc.probe(k_ab, sender)
    assert len(p) == bc.PROBE_LEN
    assert bc.probe_sender(p) == sender
    assert bc.verify(p, {sender: k_ab}) == sender
    assert bc.verify(p, {sender: k_cb}) is None  # another pair's key
    assert bc.verify(bc.probe(k_cb, sender), {sender: k_ab}) is None  # forged by someone else
    flipped = p[:-1] + bytes([p[-1] ^ 1])
    assert bc.verify(flipped, {sender: k_ab}) is None
    assert bc.verify(p + b"x", {sender: k_ab}) is None
    assert bc.verify(b"GLbd", {sender: k_ab}) is None
    assert bc.verify(p, {}) is None  # not a peer we listen for
    with pytest.raises(ValueError, match="32-byte"):
        bc.probe(k_ab, b"short")


def test_listener_opens_sockets_after_start_after_and_routes_a_hit() -> None:
    b = _bd(bc.VARIES, start_after=3.0, window=12.0)
    b.set_peer("e", EASY, now=0.0)
    assert b.poll(2.9) == []
    assert b.next_due(2.9) == 3.0
    assert b.poll(3.0) == [bc.OpenProbes("e", tuple(EASY), 256)]
    assert b.listening("e") == tuple(EASY)
    assert b.hit("e", 40000, ("203.0.113.9", 41641), now=4.0) == []  # not from a target: ignored
    assert b.hit("x", 40000, EASY_PUB, now=4.0) == []  # not a peer
    acts = b.hit("e", 40000, EASY_PUB, now=4.0)
    route = bc.UseRoute("e", 40000, EASY_PUB)
    assert acts == [bc.CloseProbes("e"), route]
    assert b.routes() == [route]
    assert b.listening("e") == ()
    assert b.hit("e", 40001, EASY_PUB, now=4.1) == []  # a second hit after the first changes nothing
    assert b.set_direct("e", True, now=4.5) == []
    assert b.poll(100.0) == []  # direct: the route stays, no more rounds
    assert b.set_direct("e", False, now=101.0) == [bc.DropRoute("e")]  # the path died: so did the route
    assert b.routes() == []
    assert b.poll(104.0) == [bc.OpenProbes("e", tuple(EASY), 256)]  # a fresh schedule from the loss


def test_a_route_that_never_goes_direct_is_dropped() -> None:
    b = _bd(bc.VARIES, confirm_within=5.0)
    b.set_peer("e", EASY, now=0.0)
    b.poll(3.0)
    b.hit("e", 40000, EASY_PUB, now=4.0)
    assert b.poll(8.9) == []
    assert b.next_due(8.9) == 9.0
    assert b.poll(9.0) == [bc.DropRoute("e")]


def test_sprayer_paces_its_probes_and_covers_distinct_ports() -> None:
    b = _bd(bc.ENDPOINT_INDEPENDENT, start_after=3.0, spray_delay=2.0, rate=400.0, probes=1024)
    b.set_peer("h", HARD, now=0.0)
    assert b.poll(3.0) == []  # the round starts; the spray waits for the listener's sockets
    assert b.next_due(3.0) == 5.0
    sent: list[tuple[str, int]] = []
    t = 5.0
    for _ in range(1000):  # 10 ms steps; bounded
        for act in b.poll(t):
            assert isinstance(act, bc.Spray)
            assert act.key == "h"
            sent += act.dsts
        if len(sent) >= 1024:
            break
        assert len(sent) <= 1 + (t - 5.0) * 400 + 1e-6  # never faster than the rate
        t = round(t + 0.01, 2)
    assert len(sent) == 1024
    assert t == pytest.approx(5.0 + 1023 / 400, abs=0.011)
    assert {ip for ip, _ in sent} == {"192.0.2.21"}  # the remapped candidate's address only
    ports = [p for _, p in sent]
    assert len(set(ports)) == 1024
    assert min(ports) >= 1024
    assert b.poll(t + 1) == []  # nothing left to spray this round


def test_rounds_are_bounded_and_keep_to_their_slots() -> None:
    b = _bd(bc.VARIES, start_after=3.0, round_period=15.0, window=12.0, max_rounds=3, slack=2.0)
    b.set_peer("e", EASY, now=0.0)
    opened = []
    t = 0.0
    while t < 200.0:
        for act in b.poll(t):
            if isinstance(act, bc.OpenProbes):
                opened.append(t)
        t = round(t + 0.5, 1)
    assert opened == [3.0, 18.0, 33.0]  # three rounds on the shared schedule, then relay for good
    assert b.next_due(200.0) is None


def test_a_slot_missed_by_more_than_the_slack_is_skipped_not_started_late() -> None:
    b = _bd(bc.VARIES, start_after=3.0, round_period=15.0, slack=2.0)
    b.set_peer("e", EASY, now=0.0)
    assert b.poll(5.5) == []  # 2.5 s after slot 0: the peer's spray is over by now
    assert b.next_due(5.5) == 18.0
    assert b.poll(18.5) == [bc.OpenProbes("e", tuple(EASY), 256)]


def test_parallel_rounds_and_sockets_are_bounded() -> None:
    b = _bd(bc.VARIES, sockets=256, max_sockets=512, parallel=4)
    for k in "abc":
        b.set_peer(k, EASY, now=0.0)
    opened = [a for a in b.poll(3.0) if isinstance(a, bc.OpenProbes)]
    assert [a.key for a in opened] == ["a", "b"]  # 2 x 256 sockets: the third waits (and skips its slot)
    s = _bd(bc.ENDPOINT_INDEPENDENT, parallel=2)
    for k in "abc":
        s.set_peer(k, HARD, now=0.0)
    s.poll(3.0)
    assert {a.key for a in s.poll(5.0) if isinstance(a, bc.Spray)} == {"a", "b"}


def test_offline_peer_is_not_probed_and_coming_online_restarts_its_schedule() -> None:
    b = _bd(bc.VARIES)
    b.set_peer("e", [], now=0.0)  # offline: no candidates
    assert b.poll(10.0) == []
    assert b.next_due(10.0) is None
    b.set_peer("e", EASY, now=50.0)
    assert b.poll(52.0) == []
    assert b.poll(53.0) == [bc.OpenProbes("e", tuple(EASY), 256)]
    assert b.remove_peer("e") == [bc.CloseProbes("e")]
    assert b.remove_peer("e") == []


def test_no_rounds_without_a_netcheck_or_once_direct() -> None:
    b = _bd("")
    b.set_peer("e", EASY, now=0.0)
    assert b.poll(3.0) == []
    b.mapping = bc.VARIES
    b.set_direct("e", True, now=3.5)
    assert b.poll(4.0) == []
    assert b.next_due(4.0) is None


def test_render_routes_each_peer_through_its_zone_and_port() -> None:
    routes = [
        bc.UseRoute("e", 40000, ("192.0.2.20", 41641)),
        bc.UseRoute("f", 40001, ("192.0.2.22", 5000)),
    ]
    text = render("ghostlink_bd_gl0", 41641, routes)
    assert text.startswith("add table inet ghostlink_bd_gl0\ndelete table inet ghostlink_bd_gl0\n")
    for line in (
        # the zone is the routed port: a leftover entry in it translates to that same port
        "ip daddr 192.0.2.20 udp sport 41641 udp dport 41641 ct zone set 40000",
        "ip saddr 192.0.2.20 udp sport 41641 udp dport 40000 ct zone set 40000",
        "ct zone 40000 ip daddr 192.0.2.20 udp sport 41641 udp dport 41641 masquerade to :40000",
        "ct zone 40001 ip daddr 192.0.2.22 udp sport 41641 udp dport 5000 masquerade to :40001",
        "type filter hook output priority raw; policy accept;",
        "type filter hook prerouting priority raw; policy accept;",
        "type nat hook postrouting priority srcnat; policy accept;",
    ):
        assert line in text
    assert render("ghostlink_bd_gl0", 41641, []) == (
        "add table inet ghostlink_bd_gl0\ndelete table inet ghostlink_bd_gl0\n"
    )
    with pytest.raises(ValueError, match="IPv4"):
        render("t", 41641, [bc.UseRoute("e", 1, ("2001:db8::1", 1))])
    assert table_for("gl0") == "ghostlink_bd_gl0"
    assert table_for("wg-x.1") == "ghostlink_bd_wg_x_1"


async def test_prober_journals_its_table_before_creating_it_and_forgets_it_once_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "host.json"
    journal = HostJournal(path, "gl0", Origin("boot-1", "net:[1]"))
    seen: list[tuple[str, str]] = []

    async def run_script(binary: str, script: str, what: str) -> None:
        doc = read_journal(path)
        seen.append((script.splitlines()[-1], doc.route_table if doc is not None else ""))

    monkeypatch.setattr(nft, "run_script", run_script)
    routed: list[tuple[str, tuple[str, int]]] = []
    me, peer = PrivateKey.generate(), PrivateKey.generate()
    key = peer.public_key().base64()
    core = Birthday(sockets=0)  # no sockets in a unit test: the listening round holds none
    core.mapping = bc.VARIES
    prober = BirthdayProber(
        wg_port=41641,
        keys=NodeKey(me),
        send=lambda payload, dst: True,
        on_route=lambda k, remote: routed.append((k, remote)),
        table="ghostlink_bd_gl0",
        journal=journal,
        birthday=core,
    )
    prober.set_peer(key, EASY, now=0.0)
    prober.step({key: False}, now=3.0)
    assert core.listening(key) == tuple(EASY)
    prober.run(core.hit(key, 40000, EASY_PUB, now=4.0))
    await prober.flush()  # the table is written by a task
    assert routed == [(key, EASY_PUB)]
    assert seen == [("}", "ghostlink_bd_gl0")], "journaled before nft ran"
    prober.step({key: False}, now=9.0)  # not direct within confirm_within: the route goes
    await prober.flush()
    assert seen[1] == ("delete table inet ghostlink_bd_gl0", "ghostlink_bd_gl0")
    assert not path.exists(), "no route left: nothing journaled"
    await prober.close()
    assert len(seen) == 2, "nothing to delete on close"


def test_listening_rounds_run_back_to_back_so_a_late_spray_still_lands() -> None:
    b = _bd(bc.VARIES)  # defaults: window == round_period
    b.set_peer("e", EASY, now=0.0)
    assert b.poll(3.0) == [bc.OpenProbes("e", tuple(EASY), 256)]
    assert b.listening("e")
    assert b.poll(17.9) == []
    assert b.listening("e"), "still open 14.9 s in: an easy side whose schedule runs late sprays into it"
    assert b.poll(18.0) == [bc.CloseProbes("e"), bc.OpenProbes("e", tuple(EASY), 256)]
    assert b.poll(33.0) == [bc.CloseProbes("e"), bc.OpenProbes("e", tuple(EASY), 256)]
    assert b.poll(48.0) == [bc.CloseProbes("e")]
    assert b.listening("e") == ()
