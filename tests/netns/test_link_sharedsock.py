"""ghostlink's shared WireGuard port against real wireguard-go and real NAT routers (direct paths).

One world per module::

      public 192.0.2.0/24 ("inet" router .254): STUN servers s1 .10 and s2 .11 (UDP 3478),
      │                                         public hosts p1 .30, p2 .31 (a hand-made wg_pair)
      ├── nat-e1 .21 (easy) ── 198.51.100.0/26    a  .10
      ├── nat-e2 .22 (easy) ── 198.51.100.64/26   b  .74
      └── nat-h1 .23 (hard) ── 198.51.100.128/26  h  .138

a, b and h each run wireguard-go listening on ``WG_PORT``; an agent process (``_AGENT``: the real
:class:`ghostlink.traversal.stunport.SharedPort`, run inside the host's namespace) opens the raw socket on
port. The STUN servers are a dozen lines on aioice's codec (``_STUN_SERVER``), independent of ghostgate.

What is proven:

* (a) STUN from WireGuard's port: behind an easy NAT both servers see the router's public IP and the
  WireGuard port itself (endpoint-independent); behind a hard NAT they see two different ports
  (netcheck: varies-by-destination).
* (b) a and b, each behind its own easy NAT, check each other at the public endpoints STUN found: the
  checks succeed both ways once both have probed (hole punching), each side learns the other's check
  source, and a WireGuard tunnel configured with exactly those endpoints then pings: the checks ran on
  WireGuard's own 5-tuple, through the same NAT mappings WireGuard then uses.
* (c) wireguard-go handshakes and carries traffic while the raw socket is open, and none of its packets
  reach Python (the BPF filter drops them in the kernel); the socket follows a port change (reopen).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from ghostlink.traversal.stunport import SharedPort
from lab import WG_RUN_DIR, Host, Lab, LabError, Proc, lab_for, netns_unavailable

pytestmark = pytest.mark.netns

WG_PORT = 51820
S1 = ("192.0.2.10", 3478)
S2 = ("192.0.2.11", 3478)
SERVERS = [[1, "s1", *S1], [2, "s2", *S2]]

_STUN_SERVER = """
import socket, sys, time
from aioice import stun
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(0.5)
end = time.monotonic() + float(sys.argv[2])
print("ready", flush=True)
while time.monotonic() < end:
    try:
        data, src = s.recvfrom(2048)
        msg = stun.parse_message(data)
    except (TimeoutError, ValueError):
        continue
    if msg.message_method == stun.Method.BINDING and msg.message_class == stun.Class.REQUEST:
        resp = stun.Message(stun.Method.BINDING, stun.Class.RESPONSE, msg.transaction_id,
                            {"XOR-MAPPED-ADDRESS": src})
        resp.add_fingerprint()
        s.sendto(bytes(resp), src)
"""

# The agent: SharedPort on WireGuard's port inside one namespace. Steps (all bounded): netcheck; if a plan
# file is named, wait for it and check the peer until 5 checks succeeded (at most 15 tries); hold the
# socket open until the done file appears; optionally reopen on another port and STUN again; print results.
_AGENT = """
import asyncio, json, os, sys, time
from dataclasses import asdict
from ghostlink.traversal.stunport import SharedPort

async def wait_file(path, seconds):
    end = time.monotonic() + seconds
    while not os.path.exists(path) and time.monotonic() < end:
        await asyncio.sleep(0.02)
    return os.path.exists(path)

async def main():
    cfg = json.loads(sys.argv[1])
    port = SharedPort.open(cfg["port"], cfg["key"])
    seen = []
    port.on_check = lambda src, key: seen.append([src[0], src[1], key])
    servers = [(i, n, (h, p)) for i, n, h, p in cfg["servers"]]
    nc = await port.netcheck(servers, timeout=1.0)
    print("NETCHECK " + json.dumps(asdict(nc)), flush=True)
    out = {"rtts": [], "attempts": 0}
    if cfg.get("plan") and await wait_file(cfg["plan"], 30):
        with open(cfg["plan"]) as f:
            plan = json.load(f)
        t0 = time.monotonic()
        for _ in range(15):
            out["attempts"] += 1
            rtt = await port.check(tuple(plan["dst"]), plan["peer_key"], timeout=1.0)
            if rtt is not None:
                out.setdefault("first_ok_s", time.monotonic() - t0)
                out["rtts"].append(rtt)
                if len(out["rtts"]) >= 5:
                    break
        print("CHECKED " + json.dumps(out), flush=True)
    await wait_file(cfg["done"], 60)
    out["seen"] = seen
    out["counters"] = port.counters
    if cfg.get("reopen"):
        port.reopen(cfg["reopen"])
        r = await port.stun(servers[0][2], timeout=1.0)
        out["after_reopen"] = [r[0][0], r[0][1]] if r else None
    port.close()
    print("RESULT " + json.dumps(out), flush=True)

asyncio.run(main())
"""


@dataclass
class Wg:
    host: Host
    ifname: str
    priv: str
    pub: str
    addr: str


@dataclass
class World:
    lab: Lab
    hosts: dict[str, Host]
    wan: dict[str, str]
    wgs: dict[str, Wg]

    def wg(self, name: str, addr: str) -> Wg:
        """The host's wireguard-go on WG_PORT (one per host: the tests share it)."""
        if name not in self.wgs:
            self.wgs[name] = _wireguard(self.lab, self.hosts[name], addr)
        return self.wgs[name]


def _stun_server(host: Host, port: int) -> Proc:
    proc = host.spawn([sys.executable, "-c", _STUN_SERVER, str(port), "600"], f"stun-{port}")
    host.lab.wait_for(lambda: "ready" in proc.log_text(), timeout=15, interval=0.05, what="STUN server")
    return proc


def _keypair(host: Host) -> tuple[str, str]:
    priv = host.exec(["wg", "genkey"]).stdout.strip()
    pub = host.exec(["wg", "pubkey"], input=priv + "\n").stdout.strip()
    return priv, pub


def _wireguard(lab: Lab, host: Host, addr: str) -> Wg:
    """wireguard-go on ``host`` listening on WG_PORT with a fresh key and overlay ``addr``; no peers yet."""
    ifname = lab.wg_ifname(host.name)
    env = {"WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
    proc = host.spawn(["wireguard-go", "-f", ifname], f"wireguard-go-{ifname}", env=env)
    sock = WG_RUN_DIR / f"{ifname}.sock"
    lab.wait_for(lambda: sock.exists() or not proc.alive(), timeout=10, interval=0.05, what=f"{sock}")
    if not proc.alive():
        raise LabError(f"wireguard-go for {ifname} exited; see {proc.log_path}")
    priv, pub = _keypair(host)
    host.exec(
        ["wg", "set", ifname, "private-key", "/dev/stdin", "listen-port", str(WG_PORT)], input=priv + "\n"
    )
    host.exec(["ip", "addr", "add", f"{addr}/32", "dev", ifname])
    host.exec(["ip", "link", "set", ifname, "up"])
    return Wg(host, ifname, priv, pub, addr)


def _agent(host: Host, tag: str, cfg: dict[str, Any]) -> Proc:
    return host.spawn([sys.executable, "-c", _AGENT, json.dumps(cfg)], f"agent-{tag}")


def _line(lab: Lab, proc: Proc, mark: str, timeout: float) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        for line in proc.log_text().splitlines():
            if line.startswith(mark + " "):
                out: dict[str, Any] = json.loads(line[len(mark) + 1 :])
                return out
        if not proc.alive():
            raise AssertionError(f"agent exited without {mark}: {proc.log_text()[-2000:]}")
        return None

    found = lab.wait_for(find, timeout=timeout, interval=0.05, what=f"{mark} from {proc.log_path.name}")
    assert found is not None
    return found


def _measured(lab: Lab, name: str, value: object) -> None:
    path = lab.artifacts_dir / "measured.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = value
    path.write_text(json.dumps(data, indent=2))
    print(f"measured {name}: {json.dumps(value)}")


@pytest.fixture(scope="module")
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    lab = lab_for(request, name="sharedsock")
    with lab:
        inet = lab.router("inet")
        pub = lab.segment("pub", "192.0.2.0/24", inet, "192.0.2.254")
        hosts: dict[str, Host] = {}
        for name, ip in (("s1", S1[0]), ("s2", S2[0]), ("p1", "192.0.2.30"), ("p2", "192.0.2.31")):
            hosts[name] = lab.host(name)
            lab.attach(hosts[name], pub, ip)
        wan: dict[str, str] = {}
        for name, kind, wan_ip, lan, router_ip, ip in (
            ("a", "easy", "192.0.2.21", "198.51.100.0/26", "198.51.100.1", "198.51.100.10"),
            ("b", "easy", "192.0.2.22", "198.51.100.64/26", "198.51.100.65", "198.51.100.74"),
            ("h", "hard", "192.0.2.23", "198.51.100.128/26", "198.51.100.129", "198.51.100.138"),
        ):
            _, seg = lab.nat_router(f"nat-{name}", kind, pub, wan_ip, lan_cidr=lan, lan_router_ip=router_ip)
            hosts[name] = lab.host(name)
            lab.attach(hosts[name], seg, ip)
            wan[name] = wan_ip
        _stun_server(hosts["s1"], S1[1])
        _stun_server(hosts["s2"], S2[1])
        yield World(lab, hosts, wan, {})
        lab.assert_no_tracebacks()
    assert lab.leftovers() == []


def test_stun_from_wireguards_port_sees_each_nats_mapping(world: World) -> None:
    lab = world.lab
    wgs = {n: world.wg(n, addr) for n, addr in (("a", "100.64.1.1"), ("h", "100.64.1.3"))}
    done = lab.artifacts_dir / "a-done"
    procs = {
        n: _agent(
            world.hosts[n],
            f"{n}-stun",
            {"port": WG_PORT, "key": w.pub, "servers": SERVERS, "done": str(done)},
        )
        for n, w in wgs.items()
    }
    easy = _line(lab, procs["a"], "NETCHECK", 20)
    hard = _line(lab, procs["h"], "NETCHECK", 20)
    done.touch()
    # Easy NAT: the router's address and WireGuard's own port, the same for both servers.
    assert easy["udp"] is True
    assert easy["public_endpoint"] == f"{world.wan['a']}:{WG_PORT}"
    assert easy["mapping"] == "endpoint-independent"
    assert [r["mapped"] for r in easy["relays"]] == [f"{world.wan['a']}:{WG_PORT}"] * 2
    assert all(r["latency_ms"] > 0 for r in easy["relays"])
    # Hard NAT: the same public address, a different port per destination.
    mapped = [r["mapped"] for r in hard["relays"]]
    assert all(m.startswith(world.wan["h"] + ":") for m in mapped)
    assert len(set(mapped)) == 2, mapped
    assert hard["mapping"] == "varies-by-destination"
    _measured(lab, "stun_latency_ms_easy", [r["latency_ms"] for r in easy["relays"]])
    _measured(lab, "hard_nat_mapped", mapped)
    for p in procs.values():
        res = _line(lab, p, "RESULT", 20)
        assert res["counters"].get("malformed", 0) == 0
    for w in wgs.values():
        assert w.host.exec(["wg", "show", w.ifname, "listen-port"]).stdout.strip() == str(WG_PORT)


def test_checks_punch_through_two_easy_nats_and_wireguard_uses_the_checked_path(world: World) -> None:
    lab = world.lab
    a_host, b_host = world.hosts["a"], world.hosts["b"]
    a = world.wg("a", "100.64.1.1")
    b = world.wg("b", "100.64.1.2")
    for me, other in ((a, b), (b, a)):
        me.host.exec(["wg", "set", me.ifname, "peer", other.pub, "allowed-ips", f"{other.addr}/32"])
        me.host.exec(["ip", "route", "replace", f"{other.addr}/32", "dev", me.ifname])
    plans = {n: lab.artifacts_dir / f"plan-{n}.json" for n in ("a", "b")}
    done = lab.artifacts_dir / "ab-done"
    procs = {
        n: _agent(
            w.host,
            f"{n}-check",
            {"port": WG_PORT, "key": w.pub, "servers": SERVERS, "plan": str(plans[n]), "done": str(done)},
        )
        for n, w in (("a", a), ("b", b))
    }
    seen = {n: _line(lab, p, "NETCHECK", 20)["public_endpoint"] for n, p in procs.items()}
    assert seen == {"a": f"{world.wan['a']}:{WG_PORT}", "b": f"{world.wan['b']}:{WG_PORT}"}
    # The candidates exchange (ghostmesh's job in the product): each side gets the other's srflx endpoint.
    for n, peer_name, key in (("a", "b", b.pub), ("b", "a", a.pub)):
        ip, port = seen[peer_name].rsplit(":", 1)
        tmp = plans[n].with_suffix(".tmp")
        tmp.write_text(json.dumps({"dst": [ip, int(port)], "peer_key": key}))
        os.replace(tmp, plans[n])  # both appear at (almost) once: both sides probe together
    checked = {n: _line(lab, p, "CHECKED", 40) for n, p in procs.items()}
    for n, c in checked.items():
        assert len(c["rtts"]) == 5, f"{n}: checks failed: {c}"
    # Hand-configure WireGuard with exactly the checked endpoints, while the raw sockets are still open.
    a.host.exec(["wg", "set", a.ifname, "peer", b.pub, "endpoint", seen["b"]])
    b.host.exec(["wg", "set", b.ifname, "peer", a.pub, "endpoint", seen["a"]])
    assert lab.wait_for(
        lambda: a_host.ping(b.addr, count=1, timeout=1.0), timeout=15, what="ping a->b over wg"
    )
    assert b_host.ping(a.addr, count=3, timeout=2.0)
    hs = a_host.wg_latest_handshakes(a.ifname)
    assert hs.get(b.pub, 0) > 0
    endpoint = a_host.exec(["wg", "show", a.ifname, "endpoints"]).stdout.split()
    assert endpoint == [b.pub, seen["b"]]  # no roaming: b's packets arrived from the checked endpoint
    done.touch()
    results = {n: _line(lab, p, "RESULT", 20) for n, p in procs.items()}
    # Each side learned the other's check from the other's public endpoint (the peer-reflexive source).
    assert {(ip, port, key) for ip, port, key in results["a"]["seen"]} == {(world.wan["b"], WG_PORT, b.pub)}
    assert {(ip, port, key) for ip, port, key in results["b"]["seen"]} == {(world.wan["a"], WG_PORT, a.pub)}
    for r in results.values():
        c = r["counters"]
        assert c.get("malformed", 0) == 0
        assert c.get("filtered", 0) == 0
        assert c.get("handler_errors", 0) == 0
    _measured(
        lab,
        "check_rtt_ms_easy_easy",
        {n: [round(x * 1000, 3) for x in c["rtts"]] for n, c in checked.items()},
    )
    _measured(lab, "check_attempts_to_5_successes", {n: c["attempts"] for n, c in checked.items()})
    _measured(
        lab, "seconds_to_first_successful_check", {n: round(c["first_ok_s"], 4) for n, c in checked.items()}
    )


def test_wireguard_keeps_its_packets_while_the_raw_socket_is_open(world: World) -> None:
    lab = world.lab
    p1, p2 = world.hosts["p1"], world.hosts["p2"]
    pair = lab.wg_pair(p1, p2, listen_port=WG_PORT)
    done = lab.artifacts_dir / "c-done"
    agent = _agent(
        p1,
        "hold",
        {
            "port": WG_PORT,
            "key": pair.a.public_key,
            "servers": SERVERS[:1],
            "done": str(done),
            "reopen": WG_PORT + 1,
        },
    )
    nc = _line(lab, agent, "NETCHECK", 20)
    assert nc["public_endpoint"] == f"{p1.addr}:{WG_PORT}"  # a public host sees itself
    assert p1.wg_latest_handshakes(pair.a.ifname).get(pair.b.public_key, 0) == 0
    # WireGuard's first handshake and 20 pings happen with the raw socket open on its port.
    assert lab.wait_for(lambda: p1.ping(pair.b.addr, count=1, timeout=1.0), timeout=10, what="first wg ping")
    assert p1.ping(pair.b.addr, count=20, timeout=2.0)
    assert p2.ping(pair.a.addr, count=5, timeout=2.0)
    assert p1.wg_latest_handshakes(pair.a.ifname)[pair.b.public_key] > 0
    transfer = p1.exec(["wg", "show", pair.a.ifname, "transfer"]).stdout.split()
    assert int(transfer[1]) > 20 * 100  # rx bytes: real traffic went through the tunnel
    assert int(transfer[2]) > 20 * 100  # tx bytes
    done.touch()
    res = _line(lab, agent, "RESULT", 20)
    c = res["counters"]
    # Only STUN reached Python: the single answer of the netcheck; WireGuard's packets stayed in the kernel.
    assert c["received"] == c["responses"] == 1
    assert c.get("filtered", 0) == 0
    # Port change: the same SharedPort, reopened on the new port, STUNs from it.
    assert res["after_reopen"] == [p1.addr, WG_PORT + 1]


# ---- the asyncio edge in this process, on loopback (raw sockets need root, like the rest of the module) ----


@pytest.fixture
def loopback_ports() -> Iterator[tuple[int, int]]:
    """Two UDP ports on 127.0.0.1 held by plain sockets (stand-ins for WireGuard's)."""
    why = netns_unavailable()
    if why is not None:
        pytest.skip(why)
    socks = []
    for _ in range(2):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    try:
        yield socks[0].getsockname()[1], socks[1].getsockname()[1]
    finally:
        for s in socks:
            s.close()


async def test_sharedport_edge_cases_on_loopback(loopback_ports: tuple[int, int]) -> None:
    pa, pb = loopback_ports
    a = SharedPort.open(pa, "KEY-A")
    b = SharedPort.open(pb, "KEY-B")
    try:
        heard: list[tuple[tuple[str, int], str]] = []
        b.on_check = lambda src, key: heard.append((src, key))
        rtt = await a.check(("127.0.0.1", pb), "KEY-B", timeout=1.0)
        assert rtt is not None
        assert 0 < rtt < 0.5
        assert heard == [(("127.0.0.1", pa), "KEY-A")]
        # A check for another key is not answered: None after the timeout, nothing left pending.
        t0 = asyncio.get_running_loop().time()
        assert await a.check(("127.0.0.1", pb), "KEY-C", timeout=0.3) is None
        assert 0.25 < asyncio.get_running_loop().time() - t0 < 1.0
        assert a.core.pending == 0
        assert b.counters["ignored_requests"] == 3  # one per attempt
        # Key rotation: b answers checks to its new key only.
        b.local_key = "KEY-B2"
        assert await a.check(("127.0.0.1", pb), "KEY-B", timeout=0.2) is None
        assert await a.check(("127.0.0.1", pb), "KEY-B2", timeout=1.0) is not None

        # A callback that raises is counted; the check is still answered.
        def broken(src: tuple[str, int], key: str) -> None:
            raise RuntimeError("a bug in the path logic")

        b.on_check = broken
        assert await a.check(("127.0.0.1", pb), "KEY-B2", timeout=1.0) is not None
        assert b.counters["callback_errors"] == 1
        # Malformed STUN-looking datagrams to the port are counted, never raised.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as junk:
            bad = (
                struct.pack("!HHI12s", 0x0001, 8, 0x2112A442, b"j" * 12) + b"\x00\x06\x00\xff\x00\x00\x00\x00"
            )
            # Stopped by the kernel filter (they would count as malformed here): no cookie; a WireGuard
            # data message whose receiver index happens to equal the cookie.
            junk.sendto(b"\x00\x01\x00\x00" + b"no cookie here!!", ("127.0.0.1", pb))
            junk.sendto(b"\x04\x00\x00\x00" + (0x2112A442).to_bytes(4, "big") + bytes(40), ("127.0.0.1", pb))
            junk.sendto(bad, ("127.0.0.1", pb))
        for _ in range(100):
            if b.counters.get("malformed", 0):
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert b.counters["malformed"] == 1
        assert b.counters.get("filtered", 0) == 0
        # IPv6 goes out of the port's AF_INET6 raw socket and is answered on b's twin, the same way.
        assert await a.check(("::1", pb), "KEY-B2", timeout=1.0) is not None
        assert a.counters.get("unsendable", 0) == 0
        # close() ends a pending call with None (no wait for its timeout).
        pending = asyncio.create_task(a.check(("127.0.0.1", pb), "nobody", timeout=5.0))
        await asyncio.sleep(0.05)
        t0 = asyncio.get_running_loop().time()
        a.close()
        assert await asyncio.wait_for(pending, 1.0) is None
        assert asyncio.get_running_loop().time() - t0 < 0.5
        assert await a.check(("127.0.0.1", pb), "KEY-B2", timeout=0.2) is None  # closed: unsendable
        assert a.counters["unsendable"] == 1
        # reopen(): the same object works again (here on b's port, checking b's new key from b's port).
        a.reopen(pa)
        assert await a.check(("127.0.0.1", pb), "KEY-B2", timeout=1.0) is not None
    finally:
        a.close()
        b.close()


_OPEN_WITHOUT_CAP = """
import asyncio
from ghostlink.traversal.stunport import SharedPort

async def main():
    for port in (51820, 0):
        try:
            SharedPort.open(port, "k")
        except OSError as exc:
            print("OSError", exc.errno)

asyncio.run(main())
"""


def test_open_raises_oserror_without_cap_net_raw_or_with_a_bad_port() -> None:
    why = netns_unavailable()
    if why is not None:
        pytest.skip(why)
    if shutil.which("setpriv") is None:
        pytest.skip("needs util-linux setpriv to drop CAP_NET_RAW")
    argv = [
        "setpriv",
        "--inh-caps=-net_raw",
        "--bounding-set=-net_raw",
        sys.executable,
        "-c",
        _OPEN_WITHOUT_CAP,
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout.split("\n")
    assert out[:2] == [f"OSError {errno.EPERM}", f"OSError {errno.EINVAL}"]
