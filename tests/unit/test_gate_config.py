"""configs/ghostgate.toml loads; the documented keys work as written; bad values are refused by key path."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from ghostcore import relaywire, tlscert
from ghostcore.errors import ConfigError
from ghostcore.joinkey import format_pin
from ghostgate.app import main
from ghostgate.config import GateConfig, TurnConfig, load_config, relay_host, relay_ports, served, turn_secret
from ghostgate.turn_core import is_denied
from ghostmesh.config import RelayConfig as MeshRelayConfig
from ghostmesh.relaymap import RelayMinter

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "ghostgate.toml"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "g.toml"
    p.write_text(text)
    return p


def test_example_loads() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.relay.listen == "0.0.0.0:3478"
    assert cfg.relay.use_quic is True
    assert cfg.relay.fallback == ["ice", "turn", "stun"]
    assert cfg.turn.realm == "ghostmesh"
    assert cfg.turn.default_lifetime == 600.0
    assert cfg.turn.max_allocations == 1000
    assert cfg.turn.max_allocations_per_user == 10
    assert "127.0.0.0/8" in cfg.turn.denied_peers
    assert cfg == GateConfig()  # the example spells out the defaults
    assert turn_secret(cfg) is None
    assert served(cfg, None) == (
        ["stun"],
        [
            "turn (no turn.secret or turn.secret_file)",
            "relay (no turn.secret or turn.secret_file: the relay shares the TURN secret)",
            "relay.fallback ice/turn/stun (nodes follow ghostmesh's relay.fallback)",
        ],
    )


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('[relay]\nlisten = "nowhere"', "relay.listen"),
        ('[relay]\nfallback = ["ice", "derp"]', "relay.fallback"),
        ('[relay]\nfallback = ["ice", "ice"]', "relay.fallback"),
        ('[relay]\nuse_quic = "yes"', "relay.use_quic"),
        ('[turn]\ndefault_lifetime = "2h"', "turn.default_lifetime"),
        ("[turn]\nmax_allocations = 0", "turn.max_allocations"),
        ('[turn]\ndenied_peers = ["10.0.0.0/99"]', "turn.denied_peers"),
        ('[turn]\nrelay_address = "host"', "turn.relay_address"),
        ('[turn]\nsecret = "a"\nsecret_file = "b"', "turn"),
        ("[relay]\nquic_port = 70000", "relay.quic_port"),
        ("[relay]\ntcp_port = -1", "relay.tcp_port"),
        ('[relay]\ncert_file = "c.pem"', "relay"),
        ("[turn]\nbogus = 1", "turn.bogus"),
    ],
)
def test_bad_values_name_their_key(tmp_path: Path, text: str, where: str) -> None:
    with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
        load_config(write(tmp_path, text))


def test_secret_sources_and_no_leak(tmp_path: Path) -> None:
    (tmp_path / "gate.secret").write_text("topsecret\n")
    cfg = load_config(
        write(tmp_path, '[relay]\nlisten = "127.0.0.1:3478"\n[turn]\nsecret_file = "gate.secret"')
    )
    assert turn_secret(cfg) == b"topsecret"
    env = load_config(None, environ={"GHOSTGATE_TURN_SECRET": "fromenv", "GHOSTGATE_RELAY_USE_QUIC": "false"})
    assert turn_secret(env) == b"fromenv"
    assert "fromenv" not in repr(env)
    assert served(env, b"x") == (
        ["stun", "turn", "tls relay tcp/3478"],  # use_quic = false: the TLS relay only
        ["relay.fallback ice/turn/stun (nodes follow ghostmesh's relay.fallback)"],
    )
    assert served(load_config(None), b"x")[0] == ["stun", "turn", "quic relay udp/3479", "tls relay tcp/3478"]
    assert served(load_config(None), b"x", (5000, 6000))[0][2:] == [
        "quic relay udp/5000",
        "tls relay tcp/6000",
    ]
    with pytest.raises(ConfigError, match=r"turn\.secret_file"):
        turn_secret(load_config(write(tmp_path, '[turn]\nsecret_file = "missing"')))


def test_turn_on_unspecified_listen_needs_relay_address() -> None:
    cfg = load_config(None, environ={"GHOSTGATE_TURN_SECRET": "x"})
    with pytest.raises(ConfigError, match=r"turn\.relay_address"):
        relay_host(cfg, b"x")
    ok = load_config(
        None, environ={"GHOSTGATE_TURN_SECRET": "x", "GHOSTGATE_TURN_RELAY_ADDRESS": "192.0.2.1"}
    )
    assert relay_host(ok, b"x") == "192.0.2.1"


def test_config_check_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", "--config", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "serves stun" in out
    assert "relay (no turn.secret" in out
    assert main(["config", "check", "--config", str(write(tmp_path, "[relay]\nlisten = 1"))]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ghostgate: ")
    assert "relay.listen" in err
    assert len(err.strip().splitlines()) == 1


def test_relay_ports_and_cert_paths(tmp_path: Path) -> None:
    assert relay_ports(load_config(None)) == (3479, 3478)
    cfg = load_config(
        write(tmp_path, '[relay]\nlisten = "127.0.0.1:0"\ncert_file = "c.pem"\nkey_file = "/k.pem"')
    )
    assert relay_ports(cfg) == (0, 0)  # an ephemeral listen port: ephemeral relay ports too
    assert cfg.relay.cert_file == str(tmp_path.resolve() / "c.pem")  # next to the config file
    assert cfg.relay.key_file == "/k.pem"
    pinned = load_config(
        None, environ={"GHOSTGATE_RELAY_QUIC_PORT": "4433", "GHOSTGATE_RELAY_TCP_PORT": "443"}
    )
    assert relay_ports(pinned) == (4433, 443)
    with pytest.raises(ConfigError, match=r"relay\.quic_port"):
        relay_ports(load_config(None, flags={"relay.listen": "0.0.0.0:65535"}))


def test_config_check_reads_the_relay_cert(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pair = tlscert.self_signed("ghostgate")
    (tmp_path / "c.pem").write_bytes(pair.cert_pem)
    (tmp_path / "k.pem").write_bytes(pair.key_pem)
    good = (
        '[turn]\nsecret = "s"\nrelay_address = "192.0.2.1"\n[relay]\ncert_file = "c.pem"\nkey_file = "k.pem"'
    )
    assert main(["config", "check", "--config", str(write(tmp_path, good))]) == 0
    assert "quic relay udp/3479, tls relay tcp/3478" in capsys.readouterr().out
    (tmp_path / "k.pem").write_bytes(tlscert.self_signed("ghostgate").key_pem)  # another key: does not match
    assert main(["config", "check", "--config", str(write(tmp_path, good))]) == 1
    assert "relay.key_file" in capsys.readouterr().err
    (tmp_path / "c.pem").write_text("not a cert")
    assert main(["config", "check", "--config", str(write(tmp_path, good))]) == 1
    assert "relay.cert_file" in capsys.readouterr().err


def test_config_pin_prints_what_ghostmesh_puts_in_the_relay_map(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    derived = write(tmp_path, '[turn]\nsecret = "s"\nrelay_address = "192.0.2.1"')
    assert main(["config", "pin", "--config", str(derived)]) == 0
    pin = capsys.readouterr().out.strip()
    assert pin == format_pin(tlscert.key_pin(tlscert.derived_key(relaywire.relay_tls_seed(b"s"))))
    minted = RelayMinter.from_config(
        MeshRelayConfig(secret="s", regions=[{"id": 1, "name": "a", "host": "192.0.2.1"}]), b"s"
    ).mint(1, "k", 0)
    assert format_pin(minted.regions[0].tls_pin) == pin
    pair = tlscert.self_signed("ghostgate")  # a gate with its own certificate: its pin, for tls_pin
    (tmp_path / "c.pem").write_bytes(pair.cert_pem)
    (tmp_path / "k.pem").write_bytes(pair.key_pem)
    own = write(
        tmp_path,
        '[turn]\nsecret = "s"\nrelay_address = "192.0.2.1"\n[relay]\ncert_file = "c.pem"\nkey_file = "k.pem"',
    )
    assert main(["config", "pin", "--config", str(own)]) == 0
    assert capsys.readouterr().out.strip() == tlscert.fingerprint(pair.certificate)
    assert main(["config", "pin", "--config", str(EXAMPLE)]) == 1  # no secret: no relay
    assert "no turn.secret" in capsys.readouterr().err


@pytest.mark.parametrize(
    "peer",
    ["169.254.169.254", "10.0.0.1", "192.168.1.1", "172.17.0.1", "100.64.0.1", "127.0.0.1", "0.0.0.0",
     "224.0.0.251", "255.255.255.255", "fe80::1", "fd00:ec2::254", "::1", "::ffff:10.0.0.1",
     "::ffff:169.254.169.254"],
)  # fmt: skip
def test_default_denied_peers_keep_the_relay_host_and_private_networks_out(peer: str) -> None:
    nets = tuple(ipaddress.ip_network(n) for n in TurnConfig().denied_peers)
    assert is_denied(peer, nets)


@pytest.mark.parametrize("peer", ["198.51.100.7", "203.0.113.9", "2001:db8::7", "8.8.8.8"])
def test_public_peers_are_not_denied(peer: str) -> None:
    assert not is_denied(peer, tuple(ipaddress.ip_network(n) for n in TurnConfig().denied_peers))


def test_allowed_peers_open_a_range_on_purpose() -> None:
    cfg = TurnConfig(allowed_peers=["10.1.0.0/16"])
    denied = tuple(ipaddress.ip_network(n) for n in cfg.denied_peers)
    allowed = tuple(ipaddress.ip_network(n) for n in cfg.allowed_peers)
    assert not is_denied("10.1.2.3", denied, allowed)
    assert is_denied("10.2.0.1", denied, allowed)
    with pytest.raises(ConfigError, match=r"turn\.allowed_peers: expected"):
        TurnConfig(allowed_peers=["fe80::%eth0/64"])
