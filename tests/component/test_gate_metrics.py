"""ghostgate's metrics listener in-process over a real TURN edge and relay: the exposition parses, health
and readiness answer, relayed packets and refusals move the counters, sessions are counted by transport."""

from __future__ import annotations

import asyncio
import http.client
import re
from dataclasses import replace
from pathlib import Path

import pytest
from aioice.turn import create_turn_endpoint
from prometheus_client.parser import text_string_to_metric_families

from ghostcore import relaywire as rw
from ghostcore.config import MetricsConfig
from ghostgate import metrics
from ghostgate.config import GateConfig, RelayConfig, TurnConfig
from ghostgate.relay import start_relay
from ghostgate.turn_edge import start_turn
from tests.component._gate_fixtures import SECRET as SECRET_TURN
from tests.component._gate_fixtures import Collector, gate_config, gate_process, rest_credentials
from tests.component._metrics import get, promtool_check, scrape, until, value
from tests.component.test_gate_relay_server import SECRET, finish, new_key, quic_node, tls_node


async def test_gate_metrics_follow_relay_traffic() -> None:
    cfg = GateConfig(
        relay=RelayConfig(listen="127.0.0.1:0"),
        turn=TurnConfig(secret=SECRET),
        metrics=MetricsConfig(listen="127.0.0.1:0"),
    )
    turn = await start_turn(cfg, SECRET.encode())
    relay = await start_relay(cfg, SECRET.encode())
    served = await metrics.serve(cfg, turn, relay)
    assert served is not None
    port = served.port
    try:
        assert (await get(port, "/healthz"))[0] == 200
        assert (await get(port, "/readyz")) == (200, "text/plain; charset=utf-8", "ready\n")
        before = await scrape(port)
        assert value(before, "ghostgate_relay_packets_total") == 0
        assert value(before, "ghostgate_turn_allocations") == 0
        q_key, t_key = new_key(), new_key()
        async with quic_node(relay) as q, tls_node(relay) as t:
            assert (await q.login(q_key)).type == rw.AUTH_OK
            assert (await t.login(t_key)).type == rw.AUTH_OK
            q.send_datagram(t_key, b"from-quic")
            assert (await t.frame()).type == rw.RECV
            during = await scrape(port)
            assert value(during, "ghostgate_relay_sessions", transport="quic") == 1
            assert value(during, "ghostgate_relay_sessions", transport="tcp") == 1
            assert value(during, "ghostgate_relay_packets_total") == 1
            assert value(during, "ghostgate_relay_bytes_total") == len(b"from-quic")
            assert value(during, "ghostgate_relay_authenticated_total") == 2
        async with tls_node(relay) as bad:
            assert (await bad.login(new_key(), ttl=-5)).type == rw.ERROR
        after = await until(port, lambda s: value(s, "ghostgate_relay_sessions", transport="tcp") == 0)
        assert value(after, "ghostgate_relay_events_total", event="auth_expired") == 1
        assert value(after, "ghostgate_relay_sessions", transport="quic") == 0
        promtool_check((await get(port, "/metrics"))[2])
        relay.hub.close()  # shutting down: not ready any more
        status, _, body = await get(port, "/readyz")
        assert (status, body) == (503, "not ready: relay stopping\n")
    finally:
        await served.close()
        await finish(relay)
        turn.close()


async def test_gate_without_metrics_listens_nowhere() -> None:
    cfg = GateConfig(relay=RelayConfig(listen="127.0.0.1:0"), turn=TurnConfig(secret=SECRET))
    turn = await start_turn(cfg, SECRET.encode())
    try:
        assert await metrics.serve(replace(cfg, metrics=MetricsConfig()), turn, None) is None
    finally:
        turn.close()


def _get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def test_the_command_serves_metrics_and_stops_on_sigterm(tmp_path: Path) -> None:
    conf = tmp_path / "g.toml"
    conf.write_text(
        '[relay]\nlisten = "127.0.0.1:0"\n[turn]\nsecret = "x"\n[metrics]\nlisten = "127.0.0.1:0"\n'
    )
    with gate_process(conf) as proc:
        assert proc.stderr is not None
        lines = [proc.stderr.readline() for _ in range(3)]  # listening, not served, metrics
        found = re.search(r"^ghostgate: metrics on http://127\.0\.0\.1:(\d+)/metrics$", lines[2].rstrip())
        assert found, lines
        port = int(found.group(1))
        assert _get(port, "/readyz") == (200, "ready\n")
        status, body = _get(port, "/metrics")
        assert status == 200
        names = {f.name for f in text_string_to_metric_families(body)}
        assert {"ghostgate_turn_allocations", "ghostgate_relay_sessions", "ghostgate_relay_packets"} <= names
        proc.terminate()
        assert proc.wait(timeout=10) == 0


def test_a_bad_metrics_listen_fails_in_one_line(tmp_path: Path) -> None:
    conf = tmp_path / "g.toml"
    conf.write_text('[relay]\nlisten = "127.0.0.1:0"\n[metrics]\nlisten = "localhost:9090"\n')
    with gate_process(conf) as proc:
        _, err = proc.communicate(timeout=20)
    assert proc.returncode != 0
    assert err.startswith("ghostgate: ")
    assert "metrics.listen: expected IP:port" in err
    assert len(err.strip().splitlines()) == 1


REFUSALS = "ghostgate_turn_refusals_total"


async def test_gate_metrics_follow_turn_traffic_and_refusals() -> None:
    turn_server = await start_turn(gate_config(denied=[]), SECRET_TURN.encode())
    served = await metrics.serve(
        replace(gate_config(), metrics=MetricsConfig("127.0.0.1:0")), turn_server, None
    )
    assert served is not None
    port = served.port
    loop = asyncio.get_running_loop()
    peer_t, peer = await loop.create_datagram_endpoint(Collector, local_addr=("127.0.0.1", 0))
    peer_addr = peer_t.get_extra_info("sockname")
    try:
        username, password = rest_credentials()
        client_t, client = await asyncio.wait_for(
            create_turn_endpoint(Collector, turn_server.address, username, password), 5
        )
        try:
            relayed = client_t.get_extra_info("sockname")
            for i in range(3):
                client_t.sendto(b"to-peer-%d" % i, peer_addr)
                await asyncio.wait_for(peer.queue.get(), 5)
            peer_t.sendto(b"to-client", relayed)
            await asyncio.wait_for(client.queue.get(), 5)
            samples = await scrape(port)
            assert value(samples, "ghostgate_turn_allocations") == 1
            assert value(samples, "ghostgate_turn_packets_total", direction="to_peer") == 3
            assert value(samples, "ghostgate_turn_bytes_total", direction="to_peer") == 3 * len(b"to-peer-0")
            assert value(samples, "ghostgate_turn_packets_total", direction="to_client") == 1
            assert value(samples, "ghostgate_turn_bytes_total", direction="to_client") == len(b"to-client")
        finally:
            client_t.close()
        with pytest.raises(Exception):  # noqa: B017, PT011 - aioice raises its own TransactionFailed
            await asyncio.wait_for(
                create_turn_endpoint(Collector, turn_server.address, username, "wrong password"), 5
            )
        refused = await until(
            port, lambda s: value(s, "ghostgate_turn_refusals_total", reason="auth_failed") > 0
        )
        assert value(refused, "ghostgate_turn_refusals_total", reason="auth_failed") >= 1
        # no relay in this gate: its metrics are absent, not zero
        assert ("ghostgate_relay_sessions", (("transport", "quic"),)) not in refused
        promtool_check((await get(port, "/metrics"))[2])
    finally:
        peer_t.close()
        await served.close()
        turn_server.close()
