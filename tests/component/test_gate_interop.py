"""Interop: coturn's ``turnutils_uclient`` (not ours) allocates and relays through ghostgate.

``-y`` makes two uclient allocations relay to each other (client -> ghostgate -> ghostgate -> client), with
ChannelData by default and Send/Data indications with ``-s``. Both relayed addresses are on 127.0.0.1, which
the default ``denied_peers`` refuses, so these tests run ghostgate with ``denied_peers = []`` (the refusal
itself is tested in test_gate_server.py and the unit tests). Credentials are TURN REST ones (``-u``/``-w``).
Needs Debian's coturn package (scripts/bootstrap.sh installs it).
"""

from __future__ import annotations

import asyncio
import re
import shutil

import pytest

from tests.component._gate_fixtures import rest_credentials, start

UCLIENT = shutil.which("turnutils_uclient")
pytestmark = pytest.mark.skipif(UCLIENT is None, reason="turnutils_uclient missing: apt-get install coturn")


async def _uclient(port: int, username: str, password: str, *extra: str) -> tuple[int, str]:
    assert UCLIENT is not None
    proc = await asyncio.create_subprocess_exec(
        UCLIENT, "-y", "-c", "-n", "20", "-l", "300", "-z", "5", "-p", str(port),
        "-u", username, "-w", password, "-L", "127.0.0.1", *extra, "127.0.0.1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


@pytest.mark.parametrize("mode", [(), ("-s",)], ids=["channeldata", "send-indication"])
async def test_uclient_allocates_and_relays_through_ghostgate(mode: tuple[str, ...]) -> None:
    server = await start(denied=[])
    try:
        username, password = rest_credentials("alice")
        code, out = await _uclient(server.address[1], username, password, *mode)
        assert code == 0, out
        totals = re.search(r"tot_send_msgs=(\d+), tot_recv_msgs=(\d+)\n", out)
        assert totals is not None, out
        assert int(totals.group(1)) == 40, out
        assert int(totals.group(2)) == 40, out
        assert "Total lost packets 0 " in out, out
        stats = server.stats()
        assert stats["relayed_to_peer"] >= 40
        assert stats["relayed_to_client"] >= 40
        assert stats["allocations_created"] >= 2
        assert stats.get("malformed", 0) == 0
    finally:
        server.close()


async def test_uclient_with_expired_credentials_is_refused() -> None:
    server = await start(denied=[])
    try:
        username, password = rest_credentials("alice", ttl=-60)
        code, out = await _uclient(server.address[1], username, password)
        assert code != 0 or "tot_recv_msgs=40" not in out, out
        assert not server.core.allocations
        assert server.stats()["auth_failed"] >= 1
        assert server.stats().get("allocations_created", 0) == 0
    finally:
        server.close()
