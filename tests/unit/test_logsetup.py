"""The daemons' log handler: our debug lines pass, libraries' chatter below WARNING does not, even when a
library resets its own logger's level (importing pyroute2 does)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from ghostcore import logsetup


@pytest.fixture
def captured(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    logsetup.configure("debug")
    try:
        yield capsys
    finally:
        root.handlers[:], root.level = saved


def test_library_chatter_below_warning_is_dropped_ours_is_kept(captured: pytest.CaptureFixture[str]) -> None:
    logging.getLogger("pyroute2").setLevel(logging.NOTSET)  # what importing pyroute2 does
    logging.getLogger("ghostlink.daemon").debug("ours at debug")
    logging.getLogger("pyroute2.netlink.core").debug("netlink message")
    logging.getLogger("async_upnp_client.ssdp").info("ssdp packet")
    logging.getLogger("asyncio").debug("Using selector")
    logging.getLogger("pyroute2.netlink.core").warning("netlink trouble")
    logging.getLogger("grpcish").debug("not a quiet library, only a similar name")
    err = captured.readouterr().err
    assert "ours at debug" in err
    assert "netlink trouble" in err
    assert "not a quiet library" in err
    for dropped in ("netlink message", "ssdp packet", "Using selector"):
        assert dropped not in err
