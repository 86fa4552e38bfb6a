"""Benchmark: packets/s through ghostlink's relay proxy (RelayProxy), per transport and event loop.

ghostgate runs as its own process on 127.0.0.1 (QUIC relay, TLS relay, TURN). In this process two
RelayProxy instances and two fake "WireGuard" UDP sockets: A's fake WireGuard sends ``--size``-byte packets
in bursts of 32 to A's proxy socket for B for ``--seconds``; B's fake WireGuard counts what arrives
(proxy A -> relay -> proxy B -> WireGuard B). Both proxies and the sender share this process's one core, so
the figure is the whole relayed path's, a lower bound for one proxy. Rows: QUIC relay, TLS-over-TCP relay
(QUIC port closed), TURN on ghostgate; on the stock asyncio loop and on uvloop (the daemon's loop when
installed). Run: `.venv/bin/python -m bench.link_relay [--seconds S] [--size N]`. Loopback only; the one
process started here is stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ghostcore import relaywire as rw
from ghostcore import tlscert
from ghostcore.keys import PrivateKey
from ghostlink.engine import RegionInfo
from ghostlink.nodekey import NodeKey
from ghostlink.traversal.proxy import RelayCreds, RelayProxy

SECRET = "bench-secret"  # noqa: S105 - a throw-away secret for one loopback server
PORT = 34797  # TURN/STUN udp and TLS relay tcp; QUIC relay udp PORT + 1
CLOSED = 34799  # nothing listens here (the TLS row's QUIC port)


def _creds(key: bytes) -> RelayCreds:
    expiry = int(time.time()) + 3600
    username = f"{expiry}:bench{key[:3].hex()}"
    password = base64.b64encode(hmac.new(SECRET.encode(), username.encode(), hashlib.sha1).digest()).decode()
    token = rw.token_mac(SECRET.encode(), base64.b64encode(key).decode(), expiry)
    return RelayCreds(
        username, password, expiry, token, rw.relay_static_key(SECRET.encode()).public_key().raw
    )


async def _until(cond: Callable[[], bool], what: str = "setup", limit: float = 10.0) -> None:
    end = time.monotonic() + limit
    while not cond():
        if time.monotonic() > end:
            raise RuntimeError(f"timed out: {what}")
        await asyncio.sleep(0.02)


async def _run(kind: str, seconds: float, size: int, rate: float) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    wgs = []
    for _ in range(2):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.bind(("127.0.0.1", 0))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        wgs.append(s)
    holders = [NodeKey(PrivateKey.generate()) for _ in wgs]
    keys = [h.public.raw for h in holders]
    proxies = [RelayProxy(wg_port=w.getsockname()[1], keys=h) for w, h in zip(wgs, holders, strict=True)]
    ports = {"turn": (0, 0), "quic": (PORT + 1, PORT), "tcp": (CLOSED, PORT)}[kind]
    pin = tlscert.key_pin(tlscert.derived_key(rw.relay_tls_seed(SECRET.encode())))
    region = RegionInfo(1, "bench", "127.0.0.1", PORT, *ports, kind == "turn", pin)
    got = 0

    def on_wg_b() -> None:
        nonlocal got
        for _ in range(64):
            try:
                wgs[1].recv(65535)
            except BlockingIOError:
                return
            got += 1

    loop.add_reader(wgs[1].fileno(), on_wg_b)
    try:
        for p, k in zip(proxies, keys, strict=True):
            await p.configure([region], _creds(k), node_key=k, use_turn=kind == "turn")
        if kind == "turn":
            await _until(lambda: all(p.turn_relay for p in proxies))
        else:
            await _until(lambda: all(p.home_region == 1 for p in proxies))
            assert proxies[0].regions()[0][2] == kind
        for i, p in enumerate(proxies):
            other = 1 - i
            p.set_route(keys[other], 1, proxies[other].turn_relay)
        dest = proxies[0].endpoint(keys[1])
        proxies[1].endpoint(keys[0])
        host, port = dest.split(":")
        addr = (host, int(port))
        payload = b"\x04" * size
        # warm up (channel binding, QUIC flow control) then measure
        for _ in range(10):
            wgs[0].sendto(payload, addr)
        await _until(lambda: got >= 5, f"{kind}: warm-up packets through")
        await asyncio.sleep(0.2)
        got = 0
        # The sender is its own process bound to A's "WireGuard" port, as wireguard-go would be.
        port_a = wgs[0].getsockname()[1]
        wgs[0].close()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _SENDER, str(port_a), host, port, str(size), str(seconds), str(rate),
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await proc.communicate()
        sent = int(out)
        await asyncio.sleep(0.3)  # drain
        return got / seconds, 1.0 - got / sent if sent else 0.0
    finally:
        loop.remove_reader(wgs[1].fileno())
        for p in proxies:
            await p.close()
        for s in wgs:
            s.close()  # closing twice is harmless


# ghostgate as its app runs it (uvloop when installed), or forced onto the stock asyncio loop
_GATE = {
    "default": "import sys; from ghostgate.app import main; sys.exit(main())",
    "asyncio": "import sys; sys.modules['uvloop'] = None; from ghostgate.app import main; sys.exit(main())",
}
_SENDER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", int(sys.argv[1])))
addr, payload = (sys.argv[2], int(sys.argv[3])), b"\\x04" * int(sys.argv[4])
start = time.monotonic()
end, rate, n = start + float(sys.argv[5]), float(sys.argv[6]), 0
while (now := time.monotonic()) < end:
    ahead = n / rate - (now - start)
    if ahead > 0:
        time.sleep(ahead)
    for _ in range(16):
        s.sendto(payload, addr)
    n += 16
print(n)
"""


def _wait_tcp(port: int) -> None:
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("ghostgate did not start")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--size", type=int, default=1200)
    ap.add_argument("--gate-loop", choices=sorted(_GATE), default="default", help="ghostgate's event loop")
    ap.add_argument("--rate", type=float, default=20000.0, help="packets/s the sender offers")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-link-relay-"))
    conf = tmp / "ghostgate.toml"
    conf.write_text(f'[relay]\nlisten = "127.0.0.1:{PORT}"\n[turn]\nsecret = "{SECRET}"\ndenied_peers = []\n')
    with (tmp / "ghostgate.log").open("wb") as fh:
        gate = subprocess.Popen(
            [sys.executable, "-c", _GATE[args.gate_loop], "--config", str(conf)],
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    loops: list[tuple[str, Callable[[], asyncio.AbstractEventLoop]]] = [("asyncio", asyncio.new_event_loop)]
    try:
        import uvloop  # noqa: PLC0415 - optional (the ``fast`` extra)

        loops.append(("uvloop", uvloop.new_event_loop))
    except ImportError:
        pass
    rows = []
    try:
        _wait_tcp(PORT)
        for loop_name, factory in loops:
            for kind in ("quic", "tcp", "turn"):
                with asyncio.Runner(loop_factory=factory) as runner:
                    pps, loss = runner.run(_run(kind, args.seconds, args.size, args.rate))
                rows.append((kind, loop_name, pps, loss))
    finally:
        gate.terminate()
        try:
            gate.wait(5)
        except subprocess.TimeoutExpired:
            gate.kill()
            gate.wait()
    print(
        f"{'path':<6} {'loop':<8} {'packets/s':>10} {'Mbit/s':>8} {'loss':>6}  ({args.size}-byte packets "
        f"offered at {args.rate:.0f}/s for {args.seconds:g} s by a sender process; proxies A+B in one "
        f"process, ghostgate in another on its {args.gate_loop} loop; logs {tmp})"
    )
    for kind, loop_name, pps, loss in rows:
        print(f"{kind:<6} {loop_name:<8} {pps:>10.0f} {pps * args.size * 8 / 1e6:>8.0f} {loss:>6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
