"""Benchmark: ghostgate's TURN relay packets/s as a ratio to coturn's, on the same traffic in this run.

Both servers run on 127.0.0.1 with TURN REST credentials (coturn: ``--use-auth-secret``). Each of
``--clients`` flows allocates, binds a channel to a loopback peer socket of its own, and then for
``--seconds``:

- ``to-peer``: the clients send 1200-byte ChannelData as fast as one sender process can and one receiver
  process counts what reaches the peers;
- ``to-client``: the peers send 1200-byte datagrams to the relayed addresses and the clients count the
  ChannelData that comes back.

Load generation uses ``sendmmsg`` / ``recvmmsg`` (64 datagrams per system call, through ctypes) so the
Python of the generator is not the bottleneck it was. Packets/s = datagrams received in the window (after
a short warm-up) / seconds. Rounds alternate which server goes first; each round gives a ratio per
direction and the median over rounds is printed, with each server's CPU seconds (user + system, from
``/proc/<pid>/stat``, every thread) per GB of payload relayed in the window.

Run: ``.venv/bin/python -m bench.gate_turn [--seconds S] [--rounds R] [--clients N]``. Needs Debian's coturn
(``turnserver``) and Linux; no root. Loopback only; everything started here is stopped by PID.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import ctypes.util
import hashlib
import hmac
import multiprocessing as mp
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path

from aioice import stun

SECRET = "bench-secret"  # noqa: S105 - a throw-away secret for two loopback servers
REALM = "ghostmesh"
PAYLOAD = 1200
CHANNEL = 0x4000
BATCH = 64
WARMUP = 0.5
DIRECTIONS = ("to-peer", "to-client")


# ---- sendmmsg / recvmmsg through ctypes (Linux) ----------------------------------------------------


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_void_p),
        ("namelen", ctypes.c_uint32),
        ("iov", ctypes.POINTER(_IoVec)),
        ("iovlen", ctypes.c_size_t),
        ("control", ctypes.c_void_p),
        ("controllen", ctypes.c_size_t),
        ("flags", ctypes.c_int),
    ]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("hdr", _MsgHdr), ("len", ctypes.c_uint)]


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_MSG_DONTWAIT = 0x40


class _Batch:
    """``BATCH`` message headers over ``BATCH`` buffers of ``size`` bytes (for sending: one shared frame)."""

    def __init__(self, size: int, frame: bytes | None = None) -> None:
        if frame is not None:
            self._bufs = [ctypes.create_string_buffer(frame, len(frame))]
        else:
            self._bufs = [ctypes.create_string_buffer(size) for _ in range(BATCH)]
        self._iov = (_IoVec * BATCH)()
        self.msgs = (_MMsgHdr * BATCH)()
        for i in range(BATCH):
            buf = self._bufs[i % len(self._bufs)]
            self._iov[i].base = ctypes.addressof(buf)
            self._iov[i].len = size
            self.msgs[i].hdr.iov = ctypes.pointer(self._iov[i])
            self.msgs[i].hdr.iovlen = 1

    def send(self, fd: int) -> int:
        return int(_libc.sendmmsg(fd, self.msgs, BATCH, 0))

    def recv(self, fd: int) -> int:
        return int(_libc.recvmmsg(fd, self.msgs, BATCH, _MSG_DONTWAIT, None))


def _sender(fds: list[int], frame: bytes, stop: Synchronized[int]) -> None:
    batch = _Batch(len(frame), frame)
    while not stop.value:
        for fd in fds:
            batch.send(fd)  # -1 on a full buffer: the relay is the bottleneck, which is what we measure


def _receiver(fds: list[int], got: Synchronized[int], stop: Synchronized[int]) -> None:
    batch = _Batch(PAYLOAD + 64)
    poll = select.epoll()
    for fd in fds:
        poll.register(fd, select.EPOLLIN)
    count = 0
    while not stop.value:
        for fd, _ in poll.poll(0.2):
            while (n := batch.recv(fd)) > 0:
                count += n
            got.value = count


# ---- TURN set-up -------------------------------------------------------------------------------------


def _key(username: str) -> bytes:
    password = base64.b64encode(hmac.new(SECRET.encode(), username.encode(), hashlib.sha1).digest()).decode()
    return hashlib.md5(f"{username}:{REALM}:{password}".encode(), usedforsecurity=False).digest()


def _transact(sock: socket.socket, server: tuple[str, int], msg: stun.Message) -> stun.Message:
    for _ in range(5):  # bounded retries over loopback
        sock.sendto(bytes(msg), server)
        try:
            for _ in range(100_000):  # skip relayed data still queued, bounded
                data, _ = sock.recvfrom(65535)
                if data[:1] in (b"\x00", b"\x01"):
                    resp = stun.parse_message(data)
                    if resp.transaction_id == msg.transaction_id:
                        return resp
        except TimeoutError:
            continue
    raise RuntimeError(f"no answer from {server}")


@dataclass
class Flow:
    client: socket.socket
    peer: socket.socket
    relay: tuple[str, int]
    auth: dict[str, object]
    key: bytes
    server: tuple[str, int]

    def close(self) -> None:
        """Delete the allocation (Refresh LIFETIME 0), so quotas never fill over rounds."""
        with contextlib.suppress(RuntimeError, OSError):
            msg = stun.Message(
                stun.Method.REFRESH, stun.Class.REQUEST, attributes={"LIFETIME": 0, **self.auth}
            )
            msg.add_message_integrity(self.key)
            self.client.settimeout(0.5)
            _transact(self.client, self.server, msg)
        self.client.close()
        self.peer.close()


def _udp(rcvbuf: int = 4 << 20) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, rcvbuf)
    s.bind(("127.0.0.1", 0))
    return s


def setup(server: tuple[str, int], index: int) -> Flow:
    """Allocate (401 first, then authenticated) and bind ``CHANNEL`` to a fresh peer socket."""
    username = f"{int(time.time()) + 3600}:bench{index}"
    key = _key(username)
    client, peer = _udp(), _udp()
    client.settimeout(1.0)
    first = stun.Message(
        stun.Method.ALLOCATE, stun.Class.REQUEST, attributes={"REQUESTED-TRANSPORT": 17 << 24}
    )
    nonce = _transact(client, server, first).attributes["NONCE"]
    auth: dict[str, object] = {"USERNAME": username, "REALM": REALM, "NONCE": nonce}
    relay: tuple[str, int] | None = None
    for method, attrs in (
        (stun.Method.ALLOCATE, {"REQUESTED-TRANSPORT": 17 << 24}),
        (stun.Method.CHANNEL_BIND, {"CHANNEL-NUMBER": CHANNEL, "XOR-PEER-ADDRESS": peer.getsockname()}),
    ):
        msg = stun.Message(method, stun.Class.REQUEST, attributes={**attrs, **auth})
        msg.add_message_integrity(key)
        resp = _transact(client, server, msg)
        if resp.message_class != stun.Class.RESPONSE:
            raise RuntimeError(f"{method.name} refused by {server}: {resp.attributes.get('ERROR-CODE')}")
        relay = resp.attributes.get("XOR-RELAYED-ADDRESS", relay)
    assert relay is not None
    client.connect(server)
    peer.connect(relay)
    return Flow(client, peer, relay, auth, key, server)


# ---- one measurement ---------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and all its threads so far (fields 14 and 15 of /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Result:
    pps: float
    cpu_per_gb: float  # the server's CPU seconds per GB of payload relayed


def measure(server: tuple[str, int], pid: int, direction: str, clients: int, seconds: float) -> Result:
    flows = [setup(server, i) for i in range(clients)]
    try:
        if direction == "to-peer":
            frame = CHANNEL.to_bytes(2, "big") + PAYLOAD.to_bytes(2, "big") + bytes(PAYLOAD)
            senders, receivers = [f.client for f in flows], [f.peer for f in flows]
        else:
            frame = bytes(PAYLOAD)
            senders, receivers = [f.peer for f in flows], [f.client for f in flows]
        for s in senders + receivers:
            s.setblocking(True)
        ctx = mp.get_context("fork")  # the sockets are inherited, not pickled
        stop, got = ctx.Value("i", 0, lock=False), ctx.Value("q", 0, lock=False)
        recv = ctx.Process(target=_receiver, args=([s.fileno() for s in receivers], got, stop))
        send = ctx.Process(target=_sender, args=([s.fileno() for s in senders], frame, stop))
        recv.start()
        send.start()
        try:
            time.sleep(WARMUP)
            first, cpu0, t0 = got.value, cpu_seconds(pid), time.monotonic()
            time.sleep(seconds)
            last, cpu1, t1 = got.value, cpu_seconds(pid), time.monotonic()
        finally:
            stop.value = 1
            for proc in (send, recv):
                proc.join(5)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
        packets = last - first
        gb = packets * PAYLOAD / 1e9
        return Result(packets / (t1 - t0), (cpu1 - cpu0) / gb if gb else float("inf"))
    finally:
        for flow in flows:
            flow.close()


# ---- servers -----------------------------------------------------------------------------------------


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


def _free_port(span: int = 1) -> int:
    """A port P such that UDP and TCP P..P+span-1 on 127.0.0.1 are free now (the OS picks P).

    Fixed ports clashed: ghostgate's QUIC relay defaults to its listen port + 1, which was the port given
    to coturn (whose own alternative port is its listen port + 1 as well), so one of the two servers failed
    to bind at random. Each port used here is chosen free and named explicitly instead (see ``ports``).
    """
    for _ in range(100):
        socks: list[socket.socket] = []
        try:
            first = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(first)
            first.bind(("127.0.0.1", 0))
            port: int = first.getsockname()[1]
            if port + span > 65535:
                continue
            for p in range(port, port + span):
                for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                    if p == port and kind == socket.SOCK_DGRAM:
                        continue
                    s = socket.socket(socket.AF_INET, kind)
                    socks.append(s)
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free loopback port range found")


def ports() -> tuple[int, int, int]:
    """(ghostgate listen = its TLS relay TCP port, ghostgate QUIC UDP port, coturn listen port), pairwise
    apart: coturn takes its port and the next one (its alternative port), UDP and TCP."""
    gate, coturn = _free_port(), _free_port(span=2)
    for _ in range(100):
        if gate not in (coturn, coturn + 1):
            break
        gate = _free_port()
    quic = _free_port()
    for _ in range(100):
        if quic not in (gate, coturn, coturn + 1):
            break
        quic = _free_port()
    taken = [gate, quic, coturn, coturn + 1]
    if len(set(taken)) != len(taken):
        raise RuntimeError(f"could not choose distinct ports: {taken}")
    return gate, quic, coturn


@contextlib.contextmanager
def _started(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0, help="measured window per run")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, each server and direction once per round")
    ap.add_argument("--clients", type=int, default=1, help="flows (allocations) at once")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-gate-"))
    conf = tmp / "ghostgate.toml"
    gate_port, quic_port, coturn_port = ports()
    conf.write_text(
        f'[relay]\nlisten = "127.0.0.1:{gate_port}"\nquic_port = {quic_port}\ntcp_port = {gate_port}\n'
        f'[turn]\nsecret = "{SECRET}"\ndenied_peers = []\nmax_allocations_per_user = 1000\n'
    )
    gate_argv = [sys.executable, "-m", "ghostgate.app", "--config", str(conf)]
    coturn_argv = [
        "turnserver", "-n", "--listening-ip", "127.0.0.1", "--listening-port", str(coturn_port),
        "--relay-ip", "127.0.0.1", "--use-auth-secret", "--static-auth-secret", SECRET, "--realm", REALM,
        "--allow-loopback-peers", "--no-tls", "--no-dtls", "--no-cli", "--simple-log",
        "--log-file", str(tmp / "coturn-file.log"),
    ]  # fmt: skip
    load = os.getloadavg()[0]
    results: dict[tuple[str, str], list[Result]] = {}
    with (
        _started(gate_argv, tmp / "ghostgate.log") as gate,
        _started(coturn_argv, tmp / "coturn.log") as coturn,
    ):
        servers = {
            "ghostgate": (("127.0.0.1", gate_port), gate.pid),
            "coturn": (("127.0.0.1", coturn_port), coturn.pid),
        }
        for addr, _ in servers.values():
            _wait_ready(addr)
        for r in range(args.rounds):
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            for direction in DIRECTIONS:
                for name in order:
                    addr, pid = servers[name]
                    res = measure(addr, pid, direction, args.clients, args.seconds)
                    results.setdefault((name, direction), []).append(res)
    print(
        f"TURN relay, {PAYLOAD}-byte payloads, {args.clients} client(s), "
        f"{args.rounds} rounds of {args.seconds:g} s, load average {load:.2f} -> "
        f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs (logs {tmp})"
    )
    print(f"{'direction':<10} {'server':<10} {'packets/s (median)':>19} {'CPU s/GB (median)':>18}  rounds")
    for direction in DIRECTIONS:
        for name in servers:
            runs = results[(name, direction)]
            pps = statistics.median(r.pps for r in runs)
            cpu = statistics.median(r.cpu_per_gb for r in runs)
            each = " ".join(f"{r.pps:.0f}" for r in runs)
            print(f"{direction:<10} {name:<10} {pps:>19.0f} {cpu:>18.2f}  {each}")
        ratios = [
            g.pps / c.pps if c.pps else float("nan")
            for g, c in zip(results[("ghostgate", direction)], results[("coturn", direction)], strict=True)
        ]
        print(
            f"{direction:<10} ratio ghostgate / coturn: median {statistics.median(ratios):.2f} "
            f"(rounds: {' '.join(f'{x:.2f}' for x in ratios)})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
