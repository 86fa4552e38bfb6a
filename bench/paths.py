"""Benchmark: throughput and join latency of each path class, each as a ratio to a reference from this run.

The NAT lab of lab/natmesh.py (ghostmesh, ghostgate regions, every node behind its own NAT router):

* direct path through two easy NATs: iperf3 TCP over the mesh ÷ a hand-configured wireguard-go tunnel
  (the lab's ``wg_pair``, endpoints set to the routers' public addresses) between the same two namespaces,
  running beside the mesh on its own port and addresses (target >= 0.95: no Python on the direct path);
* QUIC relay ÷ direct: the same two nodes with their direct path cut (nftables in one router), so
  ghostlink relays through a ghostgate region;
* TURN ÷ direct: a second lab whose only region is a ghostgate advertised as TURN-only (quic_port = 0,
  tcp_port = 0), the same cut, and its own direct measurement as the reference (add ``--coturn`` for a
  coturn region too);
* join -> first answered ping: a new easy node pinged by an easy node (a pair that ends direct; also the
  time until ``ghostctl peers`` says "direct") vs a new hard node pinged by a hard node (relayed only).
  Clocked by ``ping -D`` timestamps from the moment ``ghostlink join`` is started.

Throughput figures are medians of ``--repeat`` rounds in which every figure of a lab is measured in turn
(the machine has 2 cores, other work on it skews one-off numbers).
Run as root: ``.venv/bin/python -m bench.paths [--seconds S] [--repeat R] [--rounds N] [--coturn]``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from lab import Host, Lab, WgPair, netns_unavailable
from lab.natmesh import NatMesh, NatNode
from lab.regions import RegionSpec, coturn_available, coturn_region

REPO = Path(__file__).resolve().parent.parent
IPERF_PORT = 5201
_TS_RE = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from", re.MULTILINE)


def iperf(lab: Lab, client: Host, server: Host, dst: str, seconds: float) -> float:
    """TCP throughput client -> server at ``dst`` (Mbit/s, what the receiver got)."""
    srv = server.spawn(["iperf3", "-s", "-1", "-B", dst, "-p", str(IPERF_PORT), "--forceflush"], "iperf3-s")
    lab.wait_for(lambda: "listening" in srv.log_text(), timeout=10, interval=0.05, what="iperf3 server")
    try:
        cp = client.exec(
            ["iperf3", "-c", dst, "-p", str(IPERF_PORT), "-t", f"{seconds:g}", "-J"],
            check=False,
            timeout=seconds + 30,
        )
    finally:
        srv.stop()
    doc = json.loads(cp.stdout or "{}")
    if "error" in doc or cp.returncode != 0:
        raise RuntimeError(f"iperf3 {client.name} -> {dst}: {doc.get('error', cp.stderr.strip())}")
    return float(doc["end"]["sum_received"]["bits_per_second"]) / 1e6


def reference_tunnel(lab: Lab, a: NatNode, b: NatNode) -> WgPair:
    """The lab's hand-made tunnel, pointed at each router's public address (the LAN ones are unroutable)."""
    pair = lab.wg_pair(a.host, b.host, listen_port=51820)
    for end, peer, peer_pub in ((pair.a, pair.b, b.public_ip), (pair.b, pair.a, a.public_ip)):
        end.host.exec(
            ["wg", "set", end.ifname, "peer", peer.public_key,
             "endpoint", f"{peer_pub}:51820", "persistent-keepalive", "1"]
        )  # fmt: skip
    lab.wait_for(
        lambda: pair.a.host.ping(pair.b.addr, timeout=1), timeout=30, interval=0.2, what="reference tunnel up"
    )
    return pair


def join_to_ping(nm: NatMesh, anchor: NatNode, new: NatNode) -> tuple[float, float | None]:
    """(seconds from `ghostlink join` to the anchor's first answered ping, to a "direct" path or None)."""
    t0 = time.time()
    nm.join(new, "--log-level", "info", wait=False)
    v4: str | None = nm.lab.wait_for(lambda: _v4(nm, new), timeout=30, interval=0.02, what=f"{new.name} up")
    assert v4 is not None
    ping = anchor.host.spawn(["ping", "-4", "-n", "-D", "-i", "0.02", "-W", "1", "-w", "30", v4], "ping-join")
    try:
        first = nm.lab.wait_for(
            lambda: _TS_RE.search(ping.log_text()), timeout=30, interval=0.02, what="ping"
        )
    finally:
        ping.stop()
    assert first is not None  # wait_for returns only a truthy value
    to_ping = float(first.group(1)) - t0
    try:
        nm.wait_path(anchor, new, {"direct"}, timeout=20)
    except AssertionError:
        return to_ping, None
    return to_ping, time.time() - t0


def _v4(nm: NatMesh, n: NatNode) -> str | None:
    try:
        st = n.node.status(nm.mesh)
    except AssertionError:
        return None
    if not st.get("connected"):
        return None
    return next((a for a in st["addresses"] if ":" not in a), None)


def through_cut(nm: NatMesh, a: NatNode, b: NatNode, cls: str, seconds: float) -> tuple[float, str]:
    """Throughput a -> b with the direct path cut, once both sides report path class ``cls``."""
    with nm.direct_cut(a, b):
        relay = ""
        for x, y in ((a, b), (b, a)):
            _, relay = nm.wait_path(x, y, {cls}, timeout=15)
        mbps = iperf(nm.lab, a.host, b.host, nm.v4(b), seconds)
    for x, y in ((a, b), (b, a)):
        nm.wait_path(x, y, {"direct"}, timeout=20)
    return mbps, relay


def direct(nm: NatMesh, a: NatNode, b: NatNode, seconds: float) -> float:
    for x, y in ((a, b), (b, a)):
        nm.wait_path(x, y, {"direct"}, timeout=20)
    return iperf(nm.lab, a.host, b.host, nm.v4(b), seconds)


def _mtu(host: Host, ifname: str) -> int:
    m = re.search(r"\bmtu (\d+)", host.exec(["ip", "link", "show", ifname]).stdout)
    if m is None:
        raise RuntimeError(f"no MTU for {ifname} on {host.name}")
    return int(m.group(1))


def series(repeat: int, *fns: Callable[[], float]) -> tuple[list[list[float]], str]:
    """Run ``fns`` in turn, ``repeat`` rounds (interleaved, so a busy moment hits every figure alike).

    Returns each function's results and the first failure ("" if none); a failure stops the rounds.
    """
    out: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            try:
                out[i].append(fn())
            except (AssertionError, RuntimeError) as exc:
                return out, f"{fn.__name__}: {str(exc).splitlines()[0]}"
    return out, ""


def _r(xs: list[float]) -> list[float]:
    return [round(x, 2) for x in xs]


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> int:  # noqa: PLR0915 - one linear script
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="iperf3 duration per measurement")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved throughput rounds (medians)")
    ap.add_argument("--rounds", type=int, default=3, help="joins timed per path class")
    ap.add_argument("--coturn", action="store_true", help="also a TURN path through coturn")
    args = ap.parse_args()
    if why := netns_unavailable():
        print(f"bench: {why}", file=sys.stderr)
        return 1
    rows: list[tuple[str, str, str, str]] = []
    notes: list[str] = []
    secs = args.seconds
    with tempfile.TemporaryDirectory() as tmp, Lab("paths", REPO / "test-artifacts" / "bench-paths") as lab:
        nm = NatMesh.build(lab, Path(tmp) / "quic", per_kind={"easy": 2, "hard": 1})
        e1, e2 = nm.of_kind("easy")
        (h1,) = nm.of_kind("hard")
        # The reference tunnel's overlay addresses become 100.64.0.201/.202, clear of the mesh's own
        # (allocated from 100.64.0.1 up), so both tunnels run side by side and are measured in turns.
        lab._pair_seq = 100
        pair = reference_tunnel(lab, e1, e2)
        nm.start()
        for n in (e1, h1):
            nm.join(n, "--log-level", "info")
        # The same MTU on both tunnels (ghostlink's default leaves room for relay headers): the ratio
        # then compares who moves the packets, not packet sizes.
        mtu = _mtu(e1.host, e1.node.ifname)
        for end in (pair.a, pair.b):
            end.host.exec(["ip", "link", "set", end.ifname, "mtu", str(mtu)])
        joins_direct: list[float] = []
        to_direct: list[float] = []
        joins_relay: list[float] = []
        for r in range(args.rounds):
            new_e = e2 if r == 0 else nm.add_host("easy")
            ping_s, direct_s = join_to_ping(nm, e1, new_e)
            joins_direct.append(ping_s)
            if direct_s is not None:
                to_direct.append(direct_s)
            ping_s, _ = join_to_ping(nm, h1, nm.add_host("hard"))
            joins_relay.append(ping_s)
        relay_names: set[str] = set()

        def wg_reference() -> float:
            return iperf(lab, e1.host, e2.host, pair.b.addr, secs)

        def mesh_direct() -> float:
            return direct(nm, e1, e2, secs)

        def mesh_relay() -> float:
            mbps, relay = through_cut(nm, e1, e2, "relay", secs)
            relay_names.add(relay)
            return mbps

        (ref, d, rel), failed = series(args.repeat, wg_reference, mesh_direct, mesh_relay)
        notes.append(f"lab 1 Mbit/s: hand-made wg {_r(ref)}, direct {_r(d)}, relay {_r(rel)} {failed}")
        rows.append(
            ("direct, easy<->easy (Mbit/s)", f"{_med(d):.0f}", f"{_med(ref):.0f} hand-made wg, mtu {mtu}",
             f"{_med(d) / _med(ref):.3f}")
        )  # fmt: skip
        via = "/".join(sorted(relay_names)) or "-"
        rows.append(
            ("QUIC relay (Mbit/s)", f"{_med(rel):.0f}" if rel else "FAILED",
             f"{_med(d):.0f} direct (via {via})", f"{_med(rel) / _med(d):.3f}")
        )  # fmt: skip
        jd, jr = _med(joins_direct), _med(joins_relay)
        rows.append(("join -> first ping, easy pair (s)", f"{jd:.2f}", "", ""))
        rows.append(("join -> direct path, easy pair (s)", f"{_med(to_direct):.2f}", "", ""))
        rows.append(
            ("join -> first ping, hard pair (s)", f"{jr:.2f}", f"{jd:.2f} easy pair", f"{jr / jd:.2f}")
        )
        notes.append(
            f"join -> ping, easy (s): {_r(joins_direct)}; -> direct: {_r(to_direct)}; hard: {_r(joins_relay)}"
        )
        lab.assert_no_tracebacks()
    turn_regions = [("ghostgate TURN", RegionSpec(1, "turn", "192.0.2.2", quic_port=0, tcp_port=0))]
    if args.coturn and coturn_available():
        turn_regions.append(("coturn TURN", coturn_region()))
    for label, spec in turn_regions:
        with (
            tempfile.TemporaryDirectory() as tmp,
            Lab("pathsturn", REPO / "test-artifacts" / f"bench-paths-{spec.name}") as lab,
        ):
            tm = NatMesh.build(lab, Path(tmp), per_kind={"easy": 2}, regions=(spec,))
            tm.start()
            tm.join_all("--log-level", "info")
            t1, t2 = tm.of_kind("easy")

            def turn_direct(tm: NatMesh = tm, t1: NatNode = t1, t2: NatNode = t2) -> float:
                return direct(tm, t1, t2, secs)

            def turn_relayed(tm: NatMesh = tm, t1: NatNode = t1, t2: NatNode = t2) -> float:
                return through_cut(tm, t1, t2, "turn", secs)[0]

            (d2, turn), failed = series(args.repeat, turn_direct, turn_relayed)
            notes.append(f"{label} lab Mbit/s: direct {_r(d2)}, turn {_r(turn)} {failed}")
            rows.append(
                (f"{label} (Mbit/s)", f"{_med(turn):.0f}" if turn else "FAILED",
                 f"{_med(d2):.0f} direct (same lab)", f"{_med(turn) / _med(d2):.3f}")
            )  # fmt: skip
            lab.assert_no_tracebacks()
    print(f"\n{'metric':36} {'ghost*':>8} {'reference':>30} {'ratio':>7}")
    for name, val, refv, ratio in rows:
        print(f"{name:36} {val:>8} {refv:>30} {ratio:>7}")
    print(
        f"(iperf3 TCP {secs:g} s per figure, medians of {args.repeat} interleaved rounds; "
        f"{args.rounds} joins per class)"
    )
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
