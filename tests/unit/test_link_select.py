"""Backend selection (kernel if the module works, else wireguard-go) and the kernel netlink translation."""

from __future__ import annotations

import pytest

from ghostcore.errors import ConfigError
from ghostcore.keys import PrivateKey
from ghostlink.wg.kernel import KernelBackend, peer_dict
from ghostlink.wg.select import Choice, choose, make_backend
from ghostlink.wg.uapi_codec import PeerChange
from ghostlink.wg.wggo import WireGuardGoBackend

KEY = PrivateKey.generate().public_key().base64()


def has(_: str) -> str | None:
    return "/usr/bin/wireguard-go"


def missing(_: str) -> str | None:
    return None


def test_auto_prefers_kernel() -> None:
    c = choose("auto", probe=lambda: True, which=has)
    assert c.backend == "kernel"


def test_auto_falls_back_to_wireguard_go() -> None:
    c = choose("auto", probe=lambda: False, which=has)
    assert c == Choice("wireguard-go", "auto: no kernel WireGuard module, using wireguard-go")


def test_auto_with_nothing_available() -> None:
    with pytest.raises(ConfigError, match="install wireguard-go"):
        choose("auto", probe=lambda: False, which=missing)


def test_explicit_kernel_without_module() -> None:
    with pytest.raises(ConfigError, match="kernel WireGuard is not available"):
        choose("kernel", probe=lambda: False, which=has)


def test_explicit_wireguard_go_never_probes_kernel() -> None:
    def boom() -> bool:
        raise AssertionError("probe must not run")

    assert choose("wireguard-go", probe=boom, which=has).backend == "wireguard-go"
    with pytest.raises(ConfigError, match="not found"):
        choose("wireguard-go", "/nope/wireguard-go", probe=boom, which=missing)


def test_make_backend_types() -> None:
    assert isinstance(make_backend(Choice("kernel", "x"), "gl0"), KernelBackend)
    b = make_backend(Choice("wireguard-go", "x"), "gl0", "/usr/bin/wireguard-go")
    assert isinstance(b, WireGuardGoBackend)
    assert b.name == "wireguard-go"
    assert str(b.sock) == "/var/run/wireguard/gl0.sock"


def test_kernel_peer_dict_is_incremental() -> None:
    assert peer_dict(PeerChange(KEY, remove=True)) == {"public_key": KEY, "remove": True}
    d = peer_dict(PeerChange(KEY, endpoint="[2001:db8::1]:51820"))
    assert d == {
        "public_key": KEY,
        "update_only": True,
        "endpoint_addr": "2001:db8::1",
        "endpoint_port": 51820,
    }
    d = peer_dict(PeerChange(KEY, create=True, allowed_ips=("10.0.0.0/8",), keepalive=25))
    assert d["replace_allowed_ips"] is True
    assert d["allowed_ips"] == ["10.0.0.0/8"]
    assert d["update_only"] is False
    assert d["persistent_keepalive"] == 25


def test_kernel_info_parsing() -> None:
    from ghostlink.wg.kernel import _device_from_info  # noqa: PLC0415 - a private helper, tested alone

    msgs = [
        {
            "WGDEVICE_A_LISTEN_PORT": 41641,
            "WGDEVICE_A_PEERS": [
                {
                    "WGPEER_A_PUBLIC_KEY": KEY.encode(),
                    "WGPEER_A_ENDPOINT": {"addr": "2001:db8::1", "port": 51820},
                    "WGPEER_A_LAST_HANDSHAKE_TIME": {"tv_sec": 1700000000, "tv_nsec": 3},
                    "WGPEER_A_RX_BYTES": 10,
                    "WGPEER_A_TX_BYTES": 20,
                    "WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL": 25,
                    "WGPEER_A_ALLOWEDIPS": [{"addr": "100.64.0.2/32"}],
                }
            ],
        }
    ]
    dev = _device_from_info(msgs)
    assert dev.listen_port == 41641
    p = dev.peers[KEY]
    assert p.endpoint == "[2001:db8::1]:51820"
    assert (p.last_handshake_sec, p.rx_bytes, p.tx_bytes, p.keepalive) == (1700000000, 10, 20, 25)
    assert p.allowed_ips == ("100.64.0.2/32",)
