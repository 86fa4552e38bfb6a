"""ghostctl output formatting and argument parsing: pure, no sockets."""

from __future__ import annotations

import argparse
import json

import pytest

from ghostcore import errors as e
from ghostcore.pb.ghostmesh.v1 import local_pb2
from ghostctl import errors as ce
from ghostctl import local_node, output
from ghostctl.argtypes import duration_arg, tags_arg
from ghostctl.context import Context, parse_server

NOW = 1_800_000_000.0


def test_table_aligns_columns_and_fills_empty_cells() -> None:
    text = output.table(("NAME", "ADDRESSES", "X"), [("a", "100.64.0.1", ""), ("longer-name", "", "yes")])
    lines = text.splitlines()
    assert lines[0] == "NAME         ADDRESSES   X"
    assert lines[1] == "a            100.64.0.1  -"
    assert lines[2] == "longer-name  -           yes"
    assert all(line == line.rstrip() for line in lines)


def test_table_rejects_ragged_rows() -> None:
    with pytest.raises(ValueError, match="2 cells"):
        output.table(("A", "B", "C"), [("1", "2")])


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (5 * 1024**3, "5.0 GiB")],
)
def test_human_bytes(n: int, text: str) -> None:
    assert output.human_bytes(n) == text


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s"), (12, "12s"), (60, "1m"), (3725, "1h2m"), (3605, "1h"), (90061, "1d1h")]
)
def test_human_span(seconds: int, text: str) -> None:
    assert output.human_span(seconds) == text


def test_relative_times() -> None:
    assert output.ago(0, NOW) == "never"
    assert output.ago(int(NOW) - 12, NOW) == "12s ago"
    assert output.ago(int(NOW) + 300, NOW) == "in 5m"
    assert output.until(0, NOW) == "never"
    assert output.until(int(NOW) + 3540, NOW) == "in 59m"
    assert output.until(int(NOW) - 180, NOW) == "expired 3m ago"


def test_json_time_fields_carry_unix_and_iso() -> None:
    assert output.time_fields("created", 1_800_000_000) == {
        "created_unix": 1_800_000_000,
        "created": "2027-01-15T08:00:00Z",
    }
    assert output.time_fields("expires", 0) == {"expires_unix": 0, "expires": None}


def test_key_values_aligns() -> None:
    assert output.key_values([("name", "n1"), ("last error", "")]) == "name:        n1\nlast error:  -"


def test_peers_rendering_humanises_handshake_and_bytes() -> None:
    peers = [
        local_pb2.LocalPeer(
            name="b", addresses=["100.64.0.2", "fd7a:115c:a1e0::2"], endpoint="198.51.100.2:41641",
            latest_handshake_unix=int(NOW) - 12, rx_bytes=2048, tx_bytes=10, online=True,
            path="direct", latency_ms=1.25,
        ),
        local_pb2.LocalPeer(name="c", addresses=["100.64.0.3"]),
    ]  # fmt: skip
    lines = local_node.render_peers(peers, NOW).splitlines()
    assert lines[0].split() == [
        "NAME", "ADDRESSES", "PATH", "ENDPOINT", "LATENCY", "HANDSHAKE", "RX", "TX", "ONLINE"
    ]  # fmt: skip
    addrs = "100.64.0.2,fd7a:115c:a1e0::2"
    assert lines[1].split() == [
        "b",
        addrs,
        "direct",
        "198.51.100.2:41641",
        "1.2",
        "ms",
        "12s",
        "ago",
        "2.0",
        "KiB",
        "10",
        "B",
        "yes",
    ]
    assert lines[2].split() == ["c", "100.64.0.3", "-", "-", "-", "never", "0", "B", "0", "B", "no"]


def test_peers_path_names_the_relay_region() -> None:
    assert local_node.path_text("relay", "fra") == "relay fra"
    assert local_node.path_text("turn", "coturn") == "turn coturn"
    assert local_node.path_text("", "") == "-"
    doc = local_node.peer_doc(local_pb2.LocalPeer(name="b", path="relay", relay="fra", latency_ms=-1.0))
    assert (doc["path"], doc["relay"], doc["latency_ms"]) == ("relay", "fra", None)


def test_netcheck_rendering_and_doc() -> None:
    r = local_pb2.NetcheckReport(
        udp=True, public_endpoint="203.0.113.5:41641", mapping="varies-by-destination", home_region=2,
        relay_transport="quic",
        relays=[
            local_pb2.RelayLatency(region=1, name="a", address="203.0.113.10:3478", latency_ms=-1.0),
            local_pb2.RelayLatency(region=2, name="b", address="203.0.113.11:3478", latency_ms=0.8,
                                   mapped="203.0.113.5:1024", home=True),
        ],
    )  # fmt: skip
    text = local_node.render_netcheck(r)
    assert "varies by destination" in text
    assert "b (quic)" in text
    rows = [line.split() for line in text.splitlines()[-2:]]
    assert rows[0] == ["1", "a", "203.0.113.10:3478", "-", "-", "-"]
    assert rows[1] == ["2", "b", "203.0.113.11:3478", "0.8", "ms", "203.0.113.5:1024", "*"]
    doc = local_node.netcheck_doc(r)
    assert doc["relays"][0]["latency_ms"] is None
    assert doc["relays"][1]["home"] is True


def test_status_doc_is_json_serialisable_with_iso_times() -> None:
    st = local_pb2.LocalStatus(name="n1", addresses=["100.64.0.1"], connected=True, last_map_unix=int(NOW))
    doc = json.loads(output.to_json(local_node.status_doc(st)))
    assert doc["name"] == "n1"
    assert doc["addresses"] == ["100.64.0.1"]
    assert doc["last_map_unix"] == int(NOW)
    assert doc["last_map"].endswith("Z")
    assert doc["expires"] is None


@pytest.mark.parametrize(
    ("text", "seconds"), [("1h", 3600), ("90d", 90 * 86400), ("1h30m", 5400), ("45", 45)]
)
def test_duration_arg(text: str, seconds: int) -> None:
    assert duration_arg(text) == seconds


@pytest.mark.parametrize("text", ["", "1x", "-5m", "soon"])
def test_duration_arg_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="expected a duration"):
        duration_arg(text)


def test_tags_arg() -> None:
    assert tags_arg("tag:a, tag:b-2") == ["tag:a", "tag:b-2"]
    with pytest.raises(argparse.ArgumentTypeError, match="web"):
        tags_arg("tag:a,web")


@pytest.mark.parametrize(
    ("text", "target", "unix"),
    [
        ("unix:/run/x.sock", "unix:/run/x.sock", True),
        ("unix:///run/x.sock", "unix:/run/x.sock", True),
        ("203.0.113.1:7777", "203.0.113.1:7777", False),
        ("mesh.example", "mesh.example:7777", False),
        ("[2001:db8::1]:9000", "[2001:db8::1]:9000", False),
        ("[2001:db8::1]", "[2001:db8::1]:7777", False),
    ],
)
def test_parse_server(text: str, target: str, unix: bool) -> None:
    t = parse_server(text)
    assert t.grpc_target == target
    assert t.is_unix is unix


@pytest.mark.parametrize(
    "text",
    [
        "unix:relative",
        "host:0",
        "host:99999",
        "2001:db8::1",
        "http://x/y",
        "",
        "[fe80::1%eth0]:7777",
        "a b:1",
    ],
)
def test_parse_server_rejects(text: str) -> None:
    with pytest.raises(e.InvalidArgument, match="--server"):
        parse_server(text)


@pytest.mark.parametrize(
    ("err", "code"),
    [
        (e.InvalidArgument("x"), 2),
        (e.AuthError("x"), 3),
        (e.PermissionDenied("x"), 3),
        (e.NotFound("x"), 4),
        (e.Unavailable("x"), 5),
        (e.Conflict("x"), 6),
        (e.ConfigError("x"), 1),
        (e.GhostError("x"), 1),
    ],
)
def test_exit_codes(err: e.GhostError, code: int) -> None:
    assert ce.exit_code_for(err) == code


def test_redact_removes_secret_and_newlines() -> None:
    assert ce.redact("bad key sk-123\nmore", "sk-123") == "bad key <redacted> more"
    assert ce.redact("plain", None) == "plain"


def test_tcp_admin_without_api_key_is_an_auth_error_before_any_connection() -> None:
    ctx = Context(server="203.0.113.1:7777", api_key=None)
    with pytest.raises(e.AuthError, match="--api-key"):
        ctx.admin()


def test_context_repr_hides_api_key() -> None:
    assert "sk-secret-1" not in repr(Context(api_key="sk-secret-1"))
