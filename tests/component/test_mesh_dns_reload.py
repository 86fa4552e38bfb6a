"""ghostmesh in-process: ``[dns]`` re-read from the config file while nodes hold map streams (SIGHUP,
ghostmesh.reload): a change reaches each stream as one delta and later full maps, is audited and counted;
a bad file, and unchanged settings, send nothing; other changed tables are named and ignored."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from pathlib import Path

import pytest

from ghostcore.pb.ghostmesh.v1 import coordination_pb2 as pb
from ghostmesh import app, metrics
from ghostmesh.config import load_config
from ghostmesh.server import RunningServer, start_server
from tests.component._mesh_fixtures import NodeClient, auth_key, next_update

DNS = """
[dns]
magic_dns = true
base_domain = "mesh.example"
[[dns.extra_records]]
name = "db.mesh.example"
type = "A"
value = "100.64.9.9"
"""
NEW_RECORD = """
[[dns.extra_records]]
name = "new.mesh.example"
type = "A"
value = "100.64.9.10"
"""


def write_config(tmp_path: Path, dns: str = DNS, limits: str = "") -> Path:
    path = tmp_path / "ghostmesh.toml"
    path.write_text(
        f'[server]\nbind = "127.0.0.1:0"\nadmin_socket = "{tmp_path / "run" / "admin.sock"}"\n'
        f'state_dir = "{tmp_path / "state"}"\n[nodes]\npresence_grace = "0s"\n'
        f'[mapper]\nbatch_delay = "50ms"\n{limits}{dns}'
    )
    return path


async def start(path: Path) -> RunningServer:
    return await start_server(load_config(path, environ={}), reload=lambda: load_config(path, environ={}))


def records(update: pb.MapUpdate) -> list[str]:
    return [r.name for r in update.dns.extra_records]


async def no_delta(srv: RunningServer, wait: float = 0.4) -> None:
    """No stream is sent a delta within ``wait`` seconds (reading the stream with a timeout would
    cancel it)."""
    sent = srv.hub.mapper.stats.deltas_sent
    await asyncio.sleep(wait)
    assert srv.hub.mapper.stats.deltas_sent == sent


async def test_a_reloaded_dns_change_reaches_open_streams_as_one_delta(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    srv = await start(path)
    try:
        key = await auth_key(srv, reusable=True)
        a, b = NodeClient(srv), NodeClient(srv)
        await a.register(key, "a")
        await b.register(key, "b")
        call_a = a.sync()
        full = await next_update(call_a)
        assert records(full) == ["db.mesh.example"]
        seq = srv.store.last_audit().seq  # type: ignore[union-attr]

        path.write_text(path.read_text() + NEW_RECORD)
        assert srv.reloader is not None
        with app._reload_on_sighup(srv):  # the handler ghostmesh installs while it serves
            os.kill(os.getpid(), signal.SIGHUP)
            delta = await next_update(call_a)
        # once the server stops serving, a reload is ignored, not the default action (ending the process)
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        assert not delta.full
        assert records(delta) == ["db.mesh.example", "new.mesh.example"]
        assert list(delta.peers_upserted) == []
        assert srv.reloader.counts == {"applied": 1, "unchanged": 0, "refused": 0}
        row = srv.store.last_audit()
        assert row is not None
        assert row.seq == seq + 1
        assert (row.actor, row.action, row.target) == ("system", "dns.update", "dns")
        assert json.loads(row.detail) == {"changed": ["extra_records"]}

        call_b = b.sync()  # a new stream's full map carries the new settings
        assert records(await next_update(call_b)) == ["db.mesh.example", "new.mesh.example"]
        online = await next_update(call_a)  # b came online: a plain delta, without dns
        assert not online.HasField("dns")

        assert srv.reloader.reload() == "unchanged"  # nothing changed: nothing sent, nothing audited
        await no_delta(srv)
        assert srv.store.last_audit().seq == seq + 1  # type: ignore[union-attr]

        path.write_text(write_config(tmp_path, dns="").read_text())  # [dns] removed
        assert srv.reloader.reload() == "applied"
        gone = await next_update(call_a)
        assert gone.HasField("dns")
        assert gone.dns == pb.DnsConfig()  # empty: no DNS settings any more
        call_a.cancel()
        call_b.cancel()
        await a.close()
        await b.close()
    finally:
        await srv.stop(grace=0.2)


async def test_a_bad_reload_changes_nothing_and_other_tables_wait_for_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_config(tmp_path)
    srv = await start(path)
    try:
        a = NodeClient(srv)
        await a.register(await auth_key(srv), "a")
        call = a.sync()
        await next_update(call)
        seq = srv.store.last_audit().seq  # type: ignore[union-attr]
        assert srv.reloader is not None

        bad_dns = write_config(tmp_path, dns=DNS + '[dns.split]\n"corp.example" = ["x"]\n').read_text()
        cases = (
            (bad_dns, "dns.split.corp.example[0]"),
            ("[dns\n", "not valid TOML"),
            ('[dns]\nbase_domain = "\xe9"\n', "not UTF-8 text"),
            (None, ""),
        )
        for text, what in cases:
            if text is None:
                path.unlink()  # the file went away
            elif "not UTF-8" in what:
                path.write_bytes(text.encode("latin-1"))
            else:
                path.write_text(text)
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="ghostmesh.reload"):
                assert srv.reloader.reload() == "refused"
            assert len(caplog.records) == 1  # one line, naming the file and what is wrong in it
            assert str(path) in caplog.records[0].getMessage()
            assert what in caplog.records[0].getMessage()
        assert srv.reloader.counts == {"applied": 0, "unchanged": 0, "refused": 4}
        reg = metrics.registry(srv.hub, srv.store, None, srv.reloader)
        assert reg.get_sample_value("ghostmesh_config_reloads_total", {"result": "refused"}) == 4
        await no_delta(srv)
        assert srv.store.last_audit().seq == seq  # type: ignore[union-attr]

        # another table changed and [dns] did not: one line naming it, nothing sent
        write_config(tmp_path, limits="[limits]\nfull_maps_in_flight = 8\n")
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="ghostmesh.reload"):
            assert srv.reloader.reload() == "unchanged"
        lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert lines == [
            "config reload: [limits] changed; ignored until a restart (only [dns] is applied live)"
        ]
        assert srv.hub.limits.cfg.full_maps_in_flight != 8
        await no_delta(srv)
        call.cancel()
        await a.close()
    finally:
        await srv.stop(grace=0.2)
