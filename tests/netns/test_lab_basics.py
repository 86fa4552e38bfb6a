"""Tests of the lab package itself: routing across segments, a hand-made WireGuard pair, cleanup."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from lab import WG_RUN_DIR, Host, Lab, LabError, Proc, WaitTimeout, lab_for, netns_unavailable

pytestmark = pytest.mark.netns


def _two_segments(lab: Lab) -> tuple[Host, Host]:
    r = lab.router("r1")
    s1 = lab.segment(
        "lan1", "198.51.100.0/24", r, "198.51.100.1", cidr6="2001:db8:1::/64", router_ip6="2001:db8:1::1"
    )
    s2 = lab.segment(
        "lan2", "203.0.113.0/24", r, "203.0.113.1", cidr6="2001:db8:2::/64", router_ip6="2001:db8:2::1"
    )
    a = lab.host("a")
    b = lab.host("b")
    lab.attach(a, s1, "198.51.100.10", "2001:db8:1::10")
    lab.attach(b, s2, "203.0.113.20", "2001:db8:2::20")
    return a, b


def _ns_list() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_two_segments_route_v4_and_v6(request: pytest.FixtureRequest) -> None:
    with lab_for(request) as lab:
        r = lab.router("r1")
        s1 = lab.segment(
            "lan1", "198.51.100.0/24", r, "198.51.100.1", cidr6="2001:db8:1::/64", router_ip6="2001:db8:1::1"
        )
        s2 = lab.segment(
            "lan2", "203.0.113.0/24", r, "203.0.113.1", cidr6="2001:db8:2::/64", router_ip6="2001:db8:2::1"
        )
        a, b = lab.host("a"), lab.host("b")
        ifa = lab.attach(a, s1, "198.51.100.10", "2001:db8:1::10")
        lab.attach(b, s2, "203.0.113.20", "2001:db8:2::20")
        assert len(ifa) <= 15
        assert lab.run_id in ifa
        assert all(lab.run_id in ns for ns in lab.namespaces)
        assert a.addr == "198.51.100.10"
        assert b.addr6 == "2001:db8:2::20"
        assert lab.wait_for(lambda: a.ping(b.addr), timeout=5, interval=0.2, what="a -> b over IPv4")
        assert lab.wait_for(lambda: b.ping(a.addr6), timeout=5, interval=0.2, what="b -> a over IPv6")
        # Routed, not NATed: b sees a's own address as the source.
        route = b.exec(["ip", "route", "get", a.addr]).stdout
        assert "via 203.0.113.1" in route


def test_forbidden_addresses_are_refused(request: pytest.FixtureRequest) -> None:
    with lab_for(request) as lab:
        r = lab.router("r1")
        with pytest.raises(LabError, match="outside"):
            lab.segment("bad", "10.0.0.0/24", r, "10.0.0.1")
        s = lab.segment("lan", "192.0.2.0/24", r, "192.0.2.1")
        h = lab.host("h")
        with pytest.raises(LabError, match="not in segment"):
            lab.attach(h, s, "198.51.100.5")
        with pytest.raises(LabError, match="outside"):
            h.ping("8.8.8.8")


def test_wait_for_is_bounded(request: pytest.FixtureRequest) -> None:
    with lab_for(request) as lab:
        calls: list[int] = []

        def never() -> bool:
            calls.append(1)
            return False

        with pytest.raises(WaitTimeout, match="the impossible"):
            lab.wait_for(never, timeout=0.3, interval=0.05, what="the impossible")
        assert 2 <= len(calls) <= 10


def test_wg_pair_pings_over_overlay_and_cleans_up(request: pytest.FixtureRequest) -> None:
    lab = lab_for(request)
    with lab:
        a, b = _two_segments(lab)
        pair = lab.wg_pair(a, b)
        assert pair.a.addr.startswith("100.64.")
        assert pair.b.addr6.startswith("fd7a:115c:a1e0:")
        assert all(len(i) <= 15 and lab.run_id in i for i in lab.wg_ifnames)
        assert lab.wait_for(lambda: pair.a.host.ping(pair.b.addr), timeout=10, interval=0.2, what="wg v4")
        assert lab.wait_for(lambda: pair.b.host.ping(pair.a.addr6), timeout=10, interval=0.2, what="wg v6")
        assert pair.a.host.wg_peers(pair.a.ifname) == {pair.b.public_key}
        assert pair.a.host.wg_latest_handshakes(pair.a.ifname)[pair.b.public_key] > 0
        stream = pair.a.host.ping_stream(pair.b.addr, interval=0.02)
        lab.wait_for(lambda: "icmp_seq=10 " in stream.proc.log_text(), timeout=5, what="10 pings")
        stats = stream.stop()
        assert stats.transmitted >= 10
        assert stats.lost <= 1
        pids = [p.pid for p in lab.procs]
        namespaces = list(lab.namespaces)
        sockets = [WG_RUN_DIR / f"{i}.sock" for i in lab.wg_ifnames]
        assert all(s.exists() for s in sockets)
        lab.assert_no_tracebacks()
    assert lab.leftovers() == []
    assert not (_ns_list() & set(namespaces))
    assert not any(os.path.exists(f"/proc/{p}") for p in pids)
    assert not any(s.exists() for s in sockets)


def test_killed_wireguard_go_leaves_no_socket(request: pytest.FixtureRequest) -> None:
    lab = lab_for(request)
    with lab:
        a, b = _two_segments(lab)
        pair = lab.wg_pair(a, b)
        pair.a.proc.kill()  # SIGKILL: wireguard-go cannot remove its own socket
        sock = WG_RUN_DIR / f"{pair.a.ifname}.sock"
        assert sock.exists()
    assert lab.leftovers() == []
    assert not sock.exists()


def test_a_process_its_stop_left_behind_is_killed_with_its_namespace_and_reaped(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A kill that waits on the kernel longer than stop() waits leaves a zombie nobody reaps; its Popen then
    # warns when garbage-collected, failing whichever later test runs at that moment.
    monkeypatch.setattr(Proc, "stop", lambda self, grace=5.0: None)
    lab = lab_for(request)
    with lab:
        a, _ = _two_segments(lab)
        proc = a.spawn(["sleep", "60"], "sleeper")
        assert proc.alive()
    assert lab.leftovers() == []
    assert proc.popen.returncode == -9
    assert not os.path.exists(f"/proc/{proc.pid}")


def test_failing_block_keeps_logs_and_cleans_up(request: pytest.FixtureRequest) -> None:
    lab = lab_for(request)
    procs: list[Proc] = []

    def failing_block() -> None:
        with lab:
            proc = lab.host("h").spawn(["sh", "-c", "echo hello-from-netns; sleep 60"], "sleeper")
            procs.append(proc)
            lab.wait_for(lambda: "hello-from-netns" in proc.log_text(), timeout=5, what="sleeper output")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        failing_block()
    (proc,) = procs
    assert proc.log_path.is_file()
    assert proc.log_path.is_relative_to(lab.artifacts_dir)
    assert "hello-from-netns" in proc.log_path.read_text()
    assert lab.leftovers() == []
    assert not Path("/proc", str(proc.pid)).exists()


def test_assert_no_tracebacks_names_the_log(request: pytest.FixtureRequest) -> None:
    with lab_for(request) as lab:
        h = lab.host("h")
        code = "raise SystemExit(__import__('sys').stderr.write('Traceback (most recent call last):\\n'))"
        proc = h.spawn(["python3", "-c", code], "crasher")
        lab.wait_for(lambda: not proc.alive(), timeout=10, what="crasher to exit")
        with pytest.raises(AssertionError, match="crasher"):
            lab.assert_no_tracebacks()


def test_lab_for_fails_instead_of_skipping_when_required(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lab import netns  # noqa: PLC0415

    if netns_unavailable() is not None and os.environ.get("GHOST_REQUIRE_NETNS") != "1":
        pytest.skip(str(netns_unavailable()))
    monkeypatch.setattr(netns, "netns_unavailable", lambda: "netns tests need root")
    monkeypatch.setenv("GHOST_REQUIRE_NETNS", "1")
    with pytest.raises(pytest.fail.Exception, match="GHOST_REQUIRE_NETNS=1 but netns tests need root"):
        netns.lab_for(request)
    monkeypatch.setenv("GHOST_REQUIRE_NETNS", "0")
    with pytest.raises(pytest.skip.Exception, match="need root"):
        netns.lab_for(request)
