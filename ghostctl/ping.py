"""``ghostctl ping PEER``: echoes to a peer through the tunnel, timed by the local ghostlink, with the path.

Like ``tailscale ping``: PEER is a peer's name, one of its overlay addresses or its node key; each round is
one LocalNode ``Ping`` call, in which ghostlink sends an ICMP echo to the peer's overlay address through the
WireGuard interface and times the reply (:mod:`ghostlink.pinger`), then reads the path WireGuard's packets
for that peer take (direct, relay or TURN, the relay region, the endpoint). ``-c N`` rounds (default 3), each
waiting at most ``--wait`` seconds, ``--interval`` apart. Exit 0 when at least one echo was answered, 1 when
none was; an unknown peer is exit 4.

Table output prints one line per round as it happens and a summary; ``-o json`` prints one document at the
end (``replies``: one object per round, ``rtt_ms`` null when unanswered).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from ghostcore.pb.ghostmesh.v1 import local_pb2
from ghostctl.context import Context
from ghostctl.errors import EXIT_GENERIC, EXIT_OK

DEFAULT_COUNT = 3
DEFAULT_WAIT = 2.0
DEFAULT_INTERVAL = 1.0
MAX_COUNT = 1000
MAX_WAIT = 30.0  # ghostlink's own ceiling for one echo (ghostlink.localapi.MAX_PING_TIMEOUT)
CALL_MARGIN = 3.0  # seconds a call may take beyond the echo's wait (socket, path read, gRPC)


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_COUNT:
        raise argparse.ArgumentTypeError(f"-c {text!r}: give a whole number from 1 to {MAX_COUNT}")
    return n


def _seconds(most: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            s = float(text)
        except ValueError:
            s = -1.0
        if not 0 < s <= most:  # also refuses nan
            raise argparse.ArgumentTypeError(f"{text!r}: give seconds, more than 0 and at most {most:g}")
        return s

    return parse


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = sub.add_parser(
        "ping",
        parents=[common],
        help="echo a peer through the tunnel: round trip, path (direct / relay / turn), endpoint",
    )
    p.add_argument("peer", metavar="PEER", help="a peer's name, overlay address or node key")
    p.add_argument("-c", "--count", type=_count, default=DEFAULT_COUNT, help="rounds (default 3)")
    p.add_argument(
        "-W", "--wait", type=_seconds(MAX_WAIT), default=DEFAULT_WAIT, help="seconds to wait for each reply"
    )
    p.add_argument(
        "-i", "--interval", type=_seconds(60.0), default=DEFAULT_INTERVAL, help="seconds between rounds"
    )
    p.set_defaults(func=run_ping)


def via_text(r: local_pb2.LocalPingResponse) -> str:
    """How the peer's packets travel: ``direct 198.51.100.7:41641``, ``relay fra (127.0.0.1:40001)``."""
    if not r.path:
        return f"no path yet ({r.endpoint})" if r.endpoint else "no path yet"
    kind = f"{r.path} {r.relay}" if r.relay else r.path
    if not r.endpoint:
        return kind
    return f"{kind} {r.endpoint}" if r.path == "direct" else f"{kind} ({r.endpoint})"


def round_line(r: local_pb2.LocalPingResponse, wait: float) -> str:
    who = f"{r.name} ({r.address})"
    if r.answered:
        return f"pong from {who} via {via_text(r)} in {r.rtt_ms:.1f} ms"
    return (
        f"no answer from {who} within {wait:g} s (path: {via_text(r)}; "
        "the peer's ACL policy may not allow ICMP from this node)"
    )


def summary_line(name: str, replies: list[local_pb2.LocalPingResponse]) -> str:
    rtts = [r.rtt_ms for r in replies if r.answered]
    loss = 100 * (len(replies) - len(rtts)) // len(replies) if replies else 0
    line = f"--- {name}: {len(replies)} sent, {len(rtts)} answered, {loss}% loss"
    if rtts:
        line += f"; rtt min/avg/max {min(rtts):.1f}/{sum(rtts) / len(rtts):.1f}/{max(rtts):.1f} ms"
    return line


def reply_doc(r: local_pb2.LocalPingResponse) -> dict[str, Any]:
    return {
        "rtt_ms": round(r.rtt_ms, 3) if r.answered else None,
        "path": r.path,
        "relay": r.relay,
        "endpoint": r.endpoint,
        "path_latency_ms": round(r.path_latency_ms, 3) if r.path_latency_ms > 0 else None,
    }


def ping_doc(replies: list[local_pb2.LocalPingResponse]) -> dict[str, Any]:
    first = replies[0]
    return {
        "peer": first.name,
        "node_key": first.node_key,
        "address": first.address,
        "sent": len(replies),
        "answered": sum(1 for r in replies if r.answered),
        "replies": [reply_doc(r) for r in replies],
    }


def run_ping(ctx: Context, args: argparse.Namespace, *, sleep: Callable[[float], None] = time.sleep) -> int:
    stub, where = ctx.local()
    request = local_pb2.LocalPingRequest(peer=args.peer, timeout_s=args.wait)
    deadline = max(ctx.timeout, args.wait + CALL_MARGIN)
    replies: list[local_pb2.LocalPingResponse] = []
    for i in range(args.count):
        started = time.monotonic()
        r = ctx.call(stub.Ping, request, where, node=True, timeout=deadline)
        replies.append(r)
        if not ctx.json:
            ctx.stdout.write(round_line(r, args.wait) + "\n")
            ctx.stdout.flush()
        if i + 1 < args.count:
            # An unanswered round already waited its whole --wait: no pause on top of that.
            pause = args.interval - (time.monotonic() - started) if r.answered else 0.0
            if pause > 0:
                sleep(pause)
    if ctx.json:
        ctx.emit(ping_doc(replies), str)
    else:
        ctx.stdout.write(summary_line(replies[0].name, replies) + "\n")
    return EXIT_OK if any(r.answered for r in replies) else EXIT_GENERIC
