"""ghostlink's ICMP echo edge (``ghostctl ping``) on loopback: real raw sockets, real kernel replies."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest
import uvloop

from ghostlink.pinger import IcmpPinger


def _raw_sockets() -> bool:
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()
    except PermissionError:
        return False
    return True


pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not _raw_sockets(), reason="raw ICMP sockets need root (CAP_NET_RAW)"
)


def test_it_runs_on_uvloop_as_ghostlink_does() -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        rtt = runner.run(IcmpPinger("lo").echo("127.0.0.1", 2.0))
    assert rtt is not None
    assert 0 < rtt < 2.0


@pytest.mark.parametrize("address", ["127.0.0.1", "::1"])
async def test_the_kernel_answers_and_the_round_trip_is_timed(address: str) -> None:
    pinger = IcmpPinger("lo")
    rtts = [await pinger.echo(address, 2.0) for _ in range(3)]
    assert all(r is not None and 0 < r < 2.0 for r in rtts), rtts


async def test_an_address_only_another_interface_reaches_gets_no_answer() -> None:
    # Bound to lo, the echo to a public address cannot leave by the default route: no answer within the
    # wait, never an answer from somewhere else.
    assert await IcmpPinger("lo").echo("192.0.2.1", 0.3) is None
