"""configs/ghostgate.toml loads; the spec's keys work as written; bad values are refused with the key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from ghostcore.errors import ConfigError
from ghostgate.app import main
from ghostgate.config import GateConfig, load_config, relay_host, served, turn_secret

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
            "quic relay (not in this build)",
            "relay.fallback ice/turn/stun (not yet sent to nodes)",
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
    assert served(env, b"x") == (["stun", "turn"], ["relay.fallback ice/turn/stun (not yet sent to nodes)"])
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
    assert "quic relay (not in this build)" in out
    assert main(["config", "check", "--config", str(write(tmp_path, "[relay]\nlisten = 1"))]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ghostgate: ")
    assert "relay.listen" in err
    assert len(err.strip().splitlines()) == 1
