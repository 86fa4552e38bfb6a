"""ghostctl ping, without a node: its flags, its lines, its JSON, its exit codes (a scripted LocalNode)."""

from __future__ import annotations

import argparse
import io
import json
from typing import Any

import pytest

from ghostcore.pb.ghostmesh.v1 import local_pb2
from ghostctl import ping
from ghostctl.cli import build_parser, main
from ghostctl.context import Context


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["ping"], "PEER"),
        (["ping", "beta", "-c", "0"], "-c '0': give a whole number from 1 to 1000"),
        (["ping", "beta", "-c", "x"], "-c 'x'"),
        (["ping", "beta", "--wait", "0"], "more than 0 and at most 30"),
        (["ping", "beta", "-W", "nan"], "more than 0"),
        (["ping", "beta", "-W", "31"], "at most 30"),
        (["ping", "beta", "-i", "-1"], "more than 0 and at most 60"),
    ],
)
def test_bad_flags_exit_2_in_one_line(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert "Traceback" not in err


def test_defaults() -> None:
    args = build_parser().parse_args(["ping", "beta"])
    assert (args.peer, args.count, args.wait, args.interval) == ("beta", 3, 2.0, 1.0)


def _reply(answered: bool = True, **kw: Any) -> local_pb2.LocalPingResponse:
    base: dict[str, Any] = {
        "name": "beta",
        "node_key": "a2V5Mg==",
        "address": "100.64.0.2",
        "answered": answered,
        "rtt_ms": 0.42 if answered else -1.0,
        "path": "direct",
        "endpoint": "198.51.100.2:41641",
        "path_latency_ms": 0.3,
    }
    base.update(kw)
    return local_pb2.LocalPingResponse(**base)


PROXY = "127.0.0.1:40001"


@pytest.mark.parametrize(
    ("kw", "via"),
    [
        ({}, "via direct 198.51.100.2:41641 in 0.4 ms"),
        (
            {"path": "relay", "relay": "fra", "endpoint": "127.0.0.1:40001"},
            "via relay fra (127.0.0.1:40001) in",
        ),
        (
            {"path": "turn", "relay": "ams", "endpoint": "127.0.0.1:40002"},
            "via turn ams (127.0.0.1:40002) in",
        ),
        ({"path": "", "endpoint": "198.51.100.2:41641"}, "via no path yet (198.51.100.2:41641) in"),
        ({"path": "", "endpoint": ""}, "via no path yet in"),
    ],
)
def test_a_pong_names_the_path(kw: dict[str, Any], via: str) -> None:
    line = ping.round_line(_reply(**kw), 2.0)
    assert line.startswith("pong from beta (100.64.0.2) ")
    assert via in line


def test_no_answer_says_how_long_and_why_it_may_be() -> None:
    line = ping.round_line(_reply(answered=False, path="relay", relay="fra", endpoint=""), 1.5)
    assert line.startswith("no answer from beta (100.64.0.2) within 1.5 s (path: relay fra;")
    assert "ACL policy" in line


def test_summary() -> None:
    replies = [_reply(rtt_ms=1.0), _reply(answered=False), _reply(rtt_ms=3.0)]
    assert ping.summary_line("beta", replies) == (
        "--- beta: 3 sent, 2 answered, 33% loss; rtt min/avg/max 1.0/2.0/3.0 ms"
    )
    assert ping.summary_line("beta", [_reply(answered=False)]) == "--- beta: 1 sent, 0 answered, 100% loss"


class ScriptedNode:
    """The LocalNode stub, answering from a script and recording the calls' deadlines."""

    def __init__(self, replies: list[local_pb2.LocalPingResponse]) -> None:
        self.replies = replies
        self.requests: list[tuple[local_pb2.LocalPingRequest, float]] = []

    def Ping(self, request: local_pb2.LocalPingRequest, timeout: float, metadata: object) -> Any:
        self.requests.append((request, timeout))
        return self.replies[len(self.requests) - 1]


def _run(
    replies: list[local_pb2.LocalPingResponse], argv: list[str], mode: str = "table"
) -> tuple[int, str, ScriptedNode, list[float]]:
    node, out, pauses = ScriptedNode(replies), io.StringIO(), []
    ctx = Context(output_mode=mode, stdout=out)
    ctx.local = lambda: (node, "ghostlink at unix:/x")  # type: ignore[assignment,method-assign,return-value]
    args = build_parser().parse_args(["ping", *argv])
    code = ping.run_ping(ctx, args, sleep=pauses.append)
    return code, out.getvalue(), node, pauses


def test_rounds_print_as_they_come_then_a_summary() -> None:
    code, out, node, pauses = _run([_reply(), _reply(answered=False), _reply()], ["beta", "-W", "4"])
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 4
    assert lines[1].startswith("no answer")
    assert lines[3].startswith("--- beta: 3 sent, 2 answered")
    assert [(r.peer, r.timeout_s) for r, _ in node.requests] == [("beta", 4.0)] * 3
    assert all(t >= 4.0 + ping.CALL_MARGIN for _, t in node.requests), "the deadline covers the wait"
    assert len(pauses) == 1, "a pause after the answered first round only, none after the last"


def test_no_answer_at_all_exits_1() -> None:
    code, out, _, _ = _run([_reply(answered=False)], ["beta", "-c", "1"])
    assert code == 1
    assert "0 answered" in out


def test_json_is_one_document() -> None:
    replies = [_reply(), _reply(answered=False, path="relay", relay="fra")]
    code, out, _, _ = _run(replies, ["beta", "-c", "2"], mode="json")
    assert code == 0
    doc = json.loads(out)
    assert doc["peer"] == "beta"
    assert (doc["sent"], doc["answered"]) == (2, 1)
    assert doc["replies"][0] == {
        "rtt_ms": 0.42,
        "path": "direct",
        "relay": "",
        "endpoint": "198.51.100.2:41641",
        "path_latency_ms": 0.3,
    }
    assert doc["replies"][1]["rtt_ms"] is None
    assert doc["replies"][1]["relay"] == "fra"


def test_parser_is_registered_under_ping() -> None:
    assert isinstance(build_parser().parse_args(["ping", "x"]), argparse.Namespace)
