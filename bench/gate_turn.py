"""Benchmark: ghostgate's TURN relay packets/s as a ratio to coturn's, on the same traffic in this run.

Both servers run on 127.0.0.1 with TURN REST credentials (coturn: ``--use-auth-secret``). One client
allocates, binds a channel to a loopback peer socket, then for ``--seconds`` sends 1200-byte ChannelData as
fast as a thread can while the main thread counts what reaches the peer. Packets/s = received / seconds.
Run: `.venv/bin/python -m bench.gate_turn [--seconds S]`. Needs Debian's coturn (``turnserver``); no root.
Loopback only, and everything started here is stopped by PID.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import hmac
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from aioice import stun

SECRET = "bench-secret"  # noqa: S105 - a throw-away secret for two loopback servers
REALM = "ghostmesh"


def _creds() -> tuple[str, str, bytes]:
    username = f"{int(time.time()) + 3600}:bench"
    password = base64.b64encode(hmac.new(SECRET.encode(), username.encode(), hashlib.sha1).digest()).decode()
    key = hashlib.md5(f"{username}:{REALM}:{password}".encode(), usedforsecurity=False).digest()
    return username, password, key


def _transact(sock: socket.socket, server: tuple[str, int], msg: stun.Message) -> stun.Message:
    for _ in range(5):  # bounded retries over loopback
        sock.sendto(bytes(msg), server)
        try:
            while True:
                data, _ = sock.recvfrom(65535)
                resp = stun.parse_message(data)
                if resp.transaction_id == msg.transaction_id:
                    return resp
        except TimeoutError:
            continue
    raise RuntimeError(f"no answer from {server}")


def _setup(server: tuple[str, int], peer: tuple[str, int]) -> socket.socket:
    """Allocate (401 first, then authenticated) and bind channel 0x4000 to ``peer``."""
    username, _, key = _creds()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(1.0)
    first = stun.Message(
        stun.Method.ALLOCATE, stun.Class.REQUEST, attributes={"REQUESTED-TRANSPORT": 17 << 24}
    )
    nonce = _transact(sock, server, first).attributes["NONCE"]
    auth = {"USERNAME": username, "REALM": REALM, "NONCE": nonce}
    for method, attrs in (
        (stun.Method.ALLOCATE, {"REQUESTED-TRANSPORT": 17 << 24}),
        (stun.Method.CHANNEL_BIND, {"CHANNEL-NUMBER": 0x4000, "XOR-PEER-ADDRESS": peer}),
    ):
        msg = stun.Message(method, stun.Class.REQUEST, attributes={**attrs, **auth})
        msg.add_message_integrity(key)
        resp = _transact(sock, server, msg)
        if resp.message_class != stun.Class.RESPONSE:
            raise RuntimeError(f"{method.name} refused by {server}: {resp.attributes.get('ERROR-CODE')}")
    return sock


def measure(server: tuple[str, int], seconds: float) -> float:
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    peer.settimeout(0.5)
    client = _setup(server, peer.getsockname())
    frame = b"\x40\x00" + (1200).to_bytes(2, "big") + bytes(1200)
    stop = threading.Event()

    def blast() -> None:
        while not stop.is_set():
            # A full socket buffer (OSError) means the relay is the bottleneck, which is what we measure.
            with contextlib.suppress(OSError):
                for _ in range(64):
                    client.sendto(frame, server)

    sender = threading.Thread(target=blast, daemon=True)
    got = 0
    sender.start()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            peer.recv(2048)
            got += 1
        except TimeoutError:
            continue
    stop.set()
    sender.join(5)
    client.close()
    peer.close()
    return got / seconds


def _start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as fh:
        return subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT)


def _wait_ready(server: tuple[str, int]) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(0.2)
    try:
        for _ in range(50):
            try:
                _transact(sock, server, stun.Message(stun.Method.BINDING, stun.Class.REQUEST))
                return
            except (RuntimeError, OSError):
                time.sleep(0.1)
        raise RuntimeError(f"{server} never answered a STUN binding request")
    finally:
        sock.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-gate-"))
    conf = tmp / "ghostgate.toml"
    conf.write_text(f'[relay]\nlisten = "127.0.0.1:34791"\n[turn]\nsecret = "{SECRET}"\ndenied_peers = []\n')
    gate = _start([sys.executable, "-m", "ghostgate.app", "--config", str(conf)], tmp / "ghostgate.log")
    coturn = _start(
        ["turnserver", "-n", "--listening-ip", "127.0.0.1", "--listening-port", "34792", "--relay-ip",
         "127.0.0.1", "--use-auth-secret", "--static-auth-secret", SECRET, "--realm", REALM,
         "--allow-loopback-peers", "--no-tls", "--no-dtls", "--no-cli", "--simple-log",
         "--log-file", str(tmp / "coturn-file.log")],
        tmp / "coturn.log",
    )  # fmt: skip
    try:
        results = {}
        for name, addr in (("ghostgate", ("127.0.0.1", 34791)), ("coturn", ("127.0.0.1", 34792))):
            _wait_ready(addr)
            results[name] = measure(addr, args.seconds)
    finally:
        for proc in (gate, coturn):
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    print(
        f"{'server':<10} {'packets/s':>10}  "
        f"(1200-byte ChannelData, one client, {args.seconds:g} s, logs {tmp})"
    )
    for name, pps in results.items():
        print(f"{name:<10} {pps:>10.0f}")
    ratio = results["ghostgate"] / results["coturn"] if results["coturn"] else float("nan")
    print(f"ratio ghostgate / coturn: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
