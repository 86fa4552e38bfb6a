"""ghostmesh's policy against captures of Tailscale's own control plane (``_tailscale_compat``).

Every capture whose policy ``acl import`` can express must agree with Tailscale exactly: whether the
policy is accepted (its own tests run against the capture's nodes), and for every captured node its
peer list and what its packet filter admits. The counts are pinned, so a capture that stops being
expressible (or starts) is noticed, and printed with ``-s``.
"""

from __future__ import annotations

import collections
import copy
from typing import Any

import pytest

from tests.unit import _tailscale_compat as compat

# Captures that cannot be replayed faithfully, with the reason. Tailscale lets an admin choose a node's
# IPv4 address but derives its IPv6 one itself; the capture tool rewrote the IPv6 addresses of this
# topology to match the chosen IPv4 ones (fd7a:115c:a1e0::10 for 100.64.0.16), so the policy's IPv6
# literal named an address the real node never had, and Tailscale's filter for it is empty.
ARTIFACTS = {
    "policytest-allpass-grants-only-tag-src-ipv6-literal-dst": "IPv6 addresses rewritten by the capture tool",
}


@pytest.fixture(scope="module")
def captures() -> list[dict[str, Any]]:
    return compat.load()


def test_every_expressible_capture_agrees_with_tailscale(captures: list[dict[str, Any]]) -> None:
    counts: collections.Counter[str] = collections.Counter()
    features: collections.Counter[str] = collections.Counter()
    disagreements = []
    for cap in captures:
        if cap["capture_error"]:  # Tailscale had not settled every node when it was captured
            counts["incomplete"] += 1
            continue
        if cap["id"] in ARTIFACTS:
            counts["artifact"] += 1
            continue
        r = compat.replay(cap)
        if not r.expressible:
            counts["not expressible"] += 1
            features.update(r.features)
            continue
        counts["expressible"] += 1
        if r.problems:
            disagreements.append(f"{r.id}: {r.problems[0]}")
        else:
            counts["agree"] += 1
    print(f"\ncaptures {len(captures)}: {dict(counts)}; not expressible by feature: {dict(features)}")
    assert disagreements == []
    assert counts == {
        "expressible": 582,
        "agree": 582,
        "not expressible": 278,
        "incomplete": 3,
        "artifact": 1,
    }
    assert features == {
        "ssh": 144,
        "app": 79,
        "nodeAttrs": 51,
        "sshTests": 37,
        "autogroup:danger-all": 3,
        "user:*@example.com": 2,
        "randomizeClientPort": 2,
    }


def _one(captures: list[dict[str, Any]], cid: str) -> dict[str, Any]:
    return copy.deepcopy(next(c for c in captures if c["id"] == cid))


def test_the_replay_notices_a_wrong_filter_or_peer_list(captures: list[dict[str, Any]]) -> None:
    cap = _one(captures, "routes-a3-explicit-subnet-filter-to-router")
    assert compat.replay(cap).problems == []
    rule = cap["captures"]["squirtle"]["filter"][0]
    rule["SrcIPs"] = [s for s in rule["SrcIPs"] if s != "172.16.0.0/24"]  # one source fewer
    cap["captures"]["beedrill"]["peers"].remove("caterpie")
    problems = compat.replay(cap).problems
    assert any(p.startswith("squirtle: filter differs") for p in problems)
    assert "beedrill: peers: ghostmesh adds ['caterpie'], lacks []" in problems


def test_the_replay_notices_a_wrong_verdict(captures: list[dict[str, Any]]) -> None:
    cap = _one(captures, "acl-err08")
    cap["accepted"] = True
    assert compat.replay(cap).problems[0].startswith("validity: tailscale accepted")


def test_ports_and_protocols_count_in_the_comparison(captures: list[dict[str, Any]]) -> None:
    cap = _one(captures, "acl-p04")  # tcp to tag:server:22 from *
    node = next(n for n, c in cap["captures"].items() if c["filter"])
    cap["captures"][node]["filter"][0]["IPProto"] = [17]
    assert any("filter differs" in p for p in compat.replay(cap).problems)
    cap = _one(captures, "acl-p04")
    cap["captures"][node]["filter"][0]["DstPorts"][0]["Ports"]["Last"] = 23
    assert any("filter differs" in p for p in compat.replay(cap).problems)
