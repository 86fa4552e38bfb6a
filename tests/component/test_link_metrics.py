"""ghostlink's metrics listener in-process over the daemon rig (fake WireGuard, fake ghostmesh): the
exposition parses, readiness follows the control connection, peers are counted by path and a dropped map
stream shows as a reconnect."""

from __future__ import annotations

from collections.abc import Callable

from ghostlink import metrics
from ghostlink.daemon import PathLayer, PathLayerFactory
from ghostlink.traversal.path_core import PeerPath
from tests.component._metrics import get, promtool_check, scrape, until, value
from tests.component.test_link_daemon import (
    DIRECT,
    PEER_KEYS,
    PROXY,
    ChosenPaths,
    _roam,
    chosen_paths,
    running,
)


async def test_link_metrics_follow_paths_and_reconnects() -> None:
    chosen = {PEER_KEYS[2]: DIRECT}
    async with running(chosen_paths(chosen)) as rig:
        served = await metrics.serve("127.0.0.1:0", rig.daemon)
        assert served is not None
        port = served.port
        try:
            assert (await get(port, "/healthz"))[0] == 200
            assert (await get(port, "/readyz"))[:1] == (200,)
            first = await scrape(port)
            assert value(first, "ghostlink_connected") == 1
            assert value(first, "ghostlink_peers", path="direct") == 1
            assert value(first, "ghostlink_peers", path="none") == 1
            assert value(first, "ghostlink_peers", path="relay") == 0
            assert value(first, "ghostlink_peers_handshake_stale") == 2  # the fake device never handshakes
            assert value(first, "ghostlink_relay_home_connected", transport="quic") == 0
            promtool_check((await get(port, "/metrics"))[2])
            assert value(first, "ghostlink_path_switches_total") == 0
            # WireGuard roams away from the chosen path: the guard puts it back, counted
            _roam(rig.backend, PEER_KEYS[2], PROXY)
            back = await until(port, lambda s: value(s, "ghostlink_endpoint_reasserts_total") == 1)
            assert value(back, "ghostlink_endpoint_reasserts_total") == 1
            # traversal chooses another path; the next map (after a reconnect) applies it: one switch
            sessions = value(first, "ghostlink_control_sessions_total")
            chosen[PEER_KEYS[2]] = "198.51.100.8:41641"
            rig.coord.drop_streams()
            again = await until(port, lambda s: value(s, "ghostlink_path_switches_total") == 1)
            assert value(again, "ghostlink_control_sessions_total") == sessions + 1
            assert value(again, "ghostlink_path_switches_total") == 1
            await rig.server.stop(None)  # ghostmesh gone: alive, not ready
            await until(port, lambda s: value(s, "ghostlink_connected") == 0)
            status, _, body = await get(port, "/readyz")
            assert (status, body) == (503, "not ready: not connected to ghostmesh\n")
            assert (await get(port, "/healthz"))[0] == 200
        finally:
            await served.close()


class RttPaths(ChosenPaths):
    """Chosen paths whose direct checks answered in 12 ms."""

    def path(self, key: str) -> PeerPath:
        return PeerPath("direct", "", 12.0) if key in self.chosen else PeerPath()


def rtt_paths(chosen: dict[str, str]) -> PathLayerFactory:
    def make(wg_port: int, on_paths: Callable[[], None], on_status: Callable[[], None]) -> PathLayer:
        return RttPaths(chosen)

    return make


async def test_link_metrics_show_round_trips_by_path() -> None:
    async with running(rtt_paths({PEER_KEYS[2]: DIRECT})) as rig:
        served = await metrics.serve("127.0.0.1:0", rig.daemon)
        assert served is not None
        try:
            samples = await scrape(served.port)
            assert value(samples, "ghostlink_peer_rtt_seconds_bucket", path="direct", le="0.01") == 0
            assert value(samples, "ghostlink_peer_rtt_seconds_bucket", path="direct", le="0.025") == 1
            assert value(samples, "ghostlink_peer_rtt_seconds_gcount", path="direct") == 1
            assert value(samples, "ghostlink_peer_rtt_seconds_gsum", path="direct") == 0.012
            assert value(samples, "ghostlink_peer_rtt_seconds_gcount", path="relay") == 0
            promtool_check((await get(served.port, "/metrics"))[2])
        finally:
            await served.close()


async def test_no_listen_no_listener() -> None:
    async with running() as rig:
        assert await metrics.serve("", rig.daemon) is None
