"""Benchmark: how often and how fast an easy-NAT node and a hard-NAT node go direct by birthday probing.

Each run builds a fresh NAT lab (lab/natmesh.py: ghostmesh, two ghostgate regions, two easy nodes and one
hard node, each behind its own router, so every run starts with empty conntrack tables on the routers),
joins the three nodes at once and clocks:

* the birthday pair easy1 <-> hard1 (ghostlink/traversal/birthday_core.py) until both sides show
  "direct", or ``--within`` seconds (the bound of all its rounds): a run that ends relayed counts as a miss;
  the clock starts when the three ``ghostlink join`` are started (connecting is part of the time);
* the reference, in the same lab and the same seconds: easy1 <-> easy2, which the ordinary checks open.

Reported: the share of runs that went direct, the median time to direct of the birthday pair, the median of
the reference and their ratio (the machine is shared, so the ratio is the figure to compare), the rounds
the hard node needed (from its log), and the expected share per round (``hit_probability``).
Run as root: ``.venv/bin/python -m bench.birthday [--runs N] [--within S]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ghostlink.traversal.birthday_core import Birthday, hit_probability
from lab import Lab, netns_unavailable
from lab.natmesh import NatMesh, NatNode

REPO = Path(__file__).resolve().parent.parent


def _both_direct(nm: NatMesh, a: NatNode, b: NatNode) -> bool:
    return nm.path_of(a, b)[0] == "direct" and nm.path_of(b, a)[0] == "direct"


def one_run(i: int, within: float) -> tuple[float | None, float | None, int, int]:
    """(birthday seconds or None, reference seconds or None, rounds the hard node ran, hits it saw)."""
    with (
        tempfile.TemporaryDirectory() as tmp,
        Lab("bday", REPO / "test-artifacts" / f"bench-birthday-{i}") as lab,
    ):
        nm = NatMesh.build(lab, Path(tmp), per_kind={"easy": 2, "hard": 1})
        nm.start()
        t0 = time.monotonic()  # both pairs are clocked from the joins' start
        nm.join_all("--log-level", "info")
        e1, e2 = nm.of_kind("easy")
        (h1,) = nm.of_kind("hard")
        bday: float | None = None
        ref: float | None = None
        for _ in range(int(within / 0.2) + 1):  # reads only, bounded
            now = time.monotonic()
            if bday is None and _both_direct(nm, e1, h1):
                bday = now - t0
            if ref is None and _both_direct(nm, e1, e2):
                ref = now - t0
            if (bday is not None and ref is not None) or now - t0 > within:
                break
            time.sleep(0.2)
        proc = h1.node.proc
        text = proc.log_text() if proc is not None else ""
        peer = nm.key_of(e1)[:8]  # the hard node probes toward both easy nodes: count easy1's
        rounds = text.count(f"peer {peer}…: birthday round")
        hits = text.count(f"peer {peer}…: birthday probe hit")
        lab.assert_no_tracebacks()
    return bday, ref, rounds, hits


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--within", type=float, default=55.0, help="seconds a run waits for direct")
    args = ap.parse_args()
    if why := netns_unavailable():
        print(f"bench: {why}", file=sys.stderr)
        return 1
    bd = Birthday()
    per_round = hit_probability(bd.sockets, bd.probes)
    times: list[float] = []
    refs: list[float] = []
    rounds: list[int] = []
    for i in range(args.runs):
        bday, ref, n_rounds, hits = one_run(i, args.within)
        print(
            f"run {i + 1:2d}: birthday {'relay' if bday is None else f'{bday:5.2f}s'}, "
            f"easy-easy {'relay' if ref is None else f'{ref:5.2f}s'}, rounds {n_rounds}, hits {hits}",
            flush=True,
        )
        if bday is not None:
            times.append(bday)
            rounds.append(n_rounds)
        if ref is not None:
            refs.append(ref)
    share = 100.0 * len(times) / args.runs
    med = statistics.median(times) if times else float("nan")
    med_ref = statistics.median(refs) if refs else float("nan")
    lo, hi = min(times, default=float("nan")), max(times, default=float("nan"))
    print(f"K={bd.sockets} sockets, M={bd.probes} probes at {bd.rate:g}/s: P(hit) per round {per_round:.1%}")
    print(f"direct: {len(times)}/{args.runs} runs ({share:.0f} %); rounds needed: {sorted(rounds)}")
    print(f"time to direct (s, from the joins' start): median {med:.2f}, min/max {lo:.2f}/{hi:.2f}")
    print(f"reference easy<->easy (same labs): median {med_ref:.2f} s; ratio {med / med_ref:.2f}")
    return 0 if times else 1


if __name__ == "__main__":
    sys.exit(main())
