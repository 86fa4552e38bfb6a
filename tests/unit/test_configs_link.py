"""configs/ghostlink.toml loads; bad keys and values are refused with the key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from ghostcore.errors import ConfigError
from ghostlink.config import LinkConfig, load_config, validate_ifname

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "ghostlink.toml"


def test_example_loads() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.node.server == "127.0.0.1:7777"
    assert cfg.wireguard.interface == "ghost0"
    assert cfg.wireguard.listen_port == 41641
    assert cfg.wireguard.backend == "auto"
    assert cfg.control.reconnect_max == 30.0
    assert cfg.control.connect_timeout == 5.0
    assert cfg.log.level == "info"
    assert cfg.dns.accept


def test_accept_dns_from_file_environment_and_flag(tmp_path: Path) -> None:
    assert not load_config(write(tmp_path, "[dns]\naccept = false\n")).dns.accept
    assert not load_config(None, environ={"GHOSTLINK_DNS_ACCEPT": "false"}).dns.accept
    assert not load_config(None, flags={"dns.accept": False}).dns.accept
    with pytest.raises(ConfigError, match=r"dns\.accept: expected true or false"):
        load_config(write(tmp_path, "[dns]\naccept = 'maybe'\n"))


def test_defaults_without_file() -> None:
    cfg = load_config(None)
    assert cfg == LinkConfig()
    assert cfg.node.server == ""
    assert cfg.node.hostname
    assert cfg.node.state_dir == "/var/lib/ghostlink"
    assert cfg.wireguard.mtu == 1280
    assert cfg.wireguard.wireguard_go == "wireguard-go"
    assert cfg.control.socket == "/var/run/ghostlink/ghostlink.sock"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "g.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[node]\nservre = 'a:1'\n", r"node\.servre: unknown key"),
        (
            "[wireguard]\ninterface = 'a-very-long-interface'\n",
            r"wireguard\.interface: .*valid interface name",
        ),
        ("[wireguard]\ninterface = 'a/b'\n", r"wireguard\.interface"),
        ("[wireguard]\nlisten_port = 70000\n", r"wireguard\.listen_port"),
        ("[wireguard]\nlisten_port = 'x'\n", r"wireguard\.listen_port: expected an integer"),
        ("[wireguard]\nbackend = 'userspace'\n", r"wireguard\.backend"),
        ("[wireguard]\nmtu = 500\n", r"wireguard\.mtu"),
        ("[node]\nserver = 'nohost'\n", r"node\.server: 'nohost' is not host:port"),
        ("[control]\nreconnect_max = 'soon'\n", r"control\.reconnect_max: expected a duration"),
        ("[log]\nlevel = 'loud'\n", r"log\.level"),
        ("[extra]\nx = 1\n", r"extra: unknown key"),
        ("[node\n", r"not valid TOML"),
    ],
)
def test_bad_files(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text))


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    p = write(tmp_path, "[wireguard]\nlisten_port = 1000\ninterface = 'gl1'\n")
    cfg = load_config(
        p,
        environ={"GHOSTLINK_WIREGUARD_LISTEN_PORT": "2000", "GHOSTLINK_NODE_SERVER": "[::1]:7"},
        flags={"wireguard.listen_port": 3000, "wireguard.interface": None},
    )
    assert cfg.wireguard.listen_port == 3000
    assert cfg.wireguard.interface == "gl1"
    assert cfg.node.server == "[::1]:7"


@pytest.mark.parametrize(
    "name", ["", ".", "..", "a/b", "a:b", "a b", "a\tb", "a\nb", "a\rb", "a\vb", "x" * 16]
)
def test_an_interface_name_the_kernel_would_refuse_is_refused(name: str) -> None:
    """The kernel's rule (no '/', ':' or whitespace, at most 15 bytes), which also keeps the name one word
    in the line-based `ip -batch` and `nft -f` scripts ghostlink writes."""
    with pytest.raises(ConfigError, match="is not a valid interface name"):
        validate_ifname(name)


def test_interface_names_the_kernel_takes_pass() -> None:
    for name in ("ghost0", "wg-a_1.2", "x" * 15):
        assert validate_ifname(name) == name
