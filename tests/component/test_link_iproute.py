"""ghostlink.iproute and ghostlink.net against the real ``ip``, on a link (one end of a veth pair) in a
network namespace this test creates (deleted afterwards, with everything in it): a plan applied twice and
a removal of what is gone already converge; a node given another address keeps its routes; the
resolver's addresses carry the flags that keep them from being a source; a refusal is one line naming
the command."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from ghostcore.errors import Unavailable
from ghostlink import iproute, net
from ghostlink.engine import Plan
from tests.component._link_fixtures import netns_ctx

pytestmark = pytest.mark.netns

IF, PEER = "glveth0", "glveth1"


@pytest.fixture
def ns() -> Iterator[str]:
    with netns_ctx() as name:
        # a veth pair: this machine's kernel has no dummy module; the peer end stays down
        subprocess.run(
            ["ip", "-n", name, "link", "add", IF, "type", "veth", "peer", "name", PEER], check=True
        )
        yield name


def _addr_info(ns: str) -> dict[str, dict[str, Any]]:
    out = subprocess.run(["ip", "-n", ns, "-j", "addr", "show", "dev", IF], capture_output=True, check=True)
    return {f"{a['local']}/{a['prefixlen']}": a for a in json.loads(out.stdout)[0]["addr_info"]}


def test_a_plan_applied_twice_and_a_removal_of_what_is_gone_converge(ns: str) -> None:
    iproute.set_up(IF, 1280, ns)
    add = Plan(
        addresses_add=("100.64.0.2/32", "fd7a:115c:a1e0::2/128"),
        routes_add=("10.1.0.0/24", "100.64.0.3/32", "fd7a:115c:a1e0::3/128"),
    )
    for _ in range(2):
        net.apply_sync(IF, add, ns)
    assert set(_addr_info(ns)) >= {"100.64.0.2/32", "fd7a:115c:a1e0::2/128"}
    ours = {r for r in iproute.routes(IF, ns) if r.metric == net.ROUTE_METRIC}
    assert {r.dst for r in ours} == {"10.1.0.0/24", "100.64.0.3/32", "fd7a:115c:a1e0::3/128"}
    # another address for the node (the kernel flushes a link's IPv4 routes with its last IPv4 address)
    readdress = Plan(
        addresses_add=("100.64.0.5/32",),
        addresses_remove=("100.64.0.2/32", "100.64.0.77/32"),  # the second one was never there
        routes_remove=("10.1.0.0/24", "10.99.0.0/16"),  # the second one neither
    )
    for _ in range(2):
        net.apply_sync(IF, readdress, ns)
    assert "100.64.0.2/32" not in _addr_info(ns)
    assert "100.64.0.5/32" in _addr_info(ns)
    assert {r.dst for r in iproute.routes(IF, ns) if r.metric == net.ROUTE_METRIC} == {
        "100.64.0.3/32",
        "fd7a:115c:a1e0::3/128",
    }
    assert iproute.link_kind(IF, ns) == "veth"
    assert (IF, "fd7a:115c:a1e0::2") in iproute.addresses(netns=ns)


def test_resolver_addresses_are_host_scoped_and_deprecated(ns: str) -> None:
    iproute.set_up(IF, 1280, ns)
    for _ in range(2):  # idempotent
        net.add_service_addresses(IF, ["100.100.100.100", "fd7a:115c:a1e0::53"], ns)
    info = _addr_info(ns)
    assert info["100.100.100.100/32"]["scope"] == "host"
    v6 = info["fd7a:115c:a1e0::53/128"]
    assert v6["preferred_life_time"] == 0
    assert v6.get("nodad") is True


def test_a_missing_link_and_a_refusal_are_one_line_errors(ns: str) -> None:
    with pytest.raises(Unavailable, match="interface gone0 does not exist; is WireGuard running"):
        net.apply_sync("gone0", Plan(addresses_add=("100.64.0.2/32",)), ns)
    with pytest.raises(iproute.IpError, match=r"^ip link set dev gone0 mtu 1280 up: .*gone0") as err:
        iproute.set_up("gone0", 1280, ns)
    assert "\n" not in str(err.value)
    assert iproute.link_kind("gone0", ns) is None


def test_without_ip_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(iproute, "IP", "ghost-no-such-ip-binary")
    with pytest.raises(OSError, match="iproute2's ip command not found; install iproute2"):
        iproute.link_exists("wg0")
