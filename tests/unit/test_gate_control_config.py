"""ghostgate's ``[control]`` table: the documented keys load, bad values are refused naming their key, and
``ghostgate config check`` validates the table (a secret to prove the gate with, a readable CA file, a
name)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ghostcore.errors import ConfigError
from ghostcore.joinkey import format_pin
from ghostgate.app import main
from ghostgate.config import check_control, control_name, load_config, served

PIN = format_pin(bytes(range(32)))
BASE = '[relay]\nlisten = "127.0.0.1:3478"\n[turn]\nsecret = "s"\n'
EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "ghostgate.toml"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "g.toml"
    p.write_text(text)
    return p


def test_the_commented_example_loads(tmp_path: Path) -> None:
    lines = EXAMPLE.read_text().splitlines()
    start = lines.index("# [control]")
    table = []
    for line in lines[start:]:
        if not line.startswith("#"):
            break
        if not line.startswith("#  "):  # "#   …": a comment continued
            table.append(line[2:].split("  #")[0])
    text = "\n".join(table).replace("sha256:…", PIN).replace('ca_file = "ghostmesh-ca.pem"', "")
    cfg = load_config(write(tmp_path, BASE + text))
    assert cfg.control.server == "192.0.2.1:7777"
    assert cfg.control.pin == PIN
    assert cfg.control.name == "gate-eu1"
    assert cfg.control.reconnect_max == 10.0
    assert "revocations from 192.0.2.1:7777" in served(cfg, b"s")[0]


def test_without_control_nothing_changes(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.control.server == ""
    check_control(cfg, None)  # nothing to check
    assert not any("revocations" in s for s in served(cfg, b"s")[0])


@pytest.mark.parametrize(
    ("table", "where"),
    [
        ('server = "nowhere"', "control.server"),
        ('server = "192.0.2.1:0"', "control.server"),
        (f'pin = "{PIN}"', "control.pin"),  # without a server
        ('server = "192.0.2.1:7777"\npin = "sha256:short"', "control.pin"),
        (f'server = "192.0.2.1:7777"\npin = "{PIN}"\nca_file = "ca.pem"', "control"),
        ('server = "192.0.2.1:7777"\nname = "a gate"', "control.name"),
        ('server = "192.0.2.1:7777"\nreconnect_max = "0s"', "control.reconnect_max"),
        ('server = "192.0.2.1:7777"\nbogus = 1', "control.bogus"),
    ],
)
def test_bad_control_values_name_their_key(tmp_path: Path, table: str, where: str) -> None:
    with pytest.raises(ConfigError, match=where.replace(".", r"\.")) as exc:
        load_config(write(tmp_path, BASE + "[control]\n" + table))
    assert "\n" not in str(exc.value)


def test_control_needs_a_secret_and_a_readable_ca_file(tmp_path: Path) -> None:
    no_secret = load_config(write(tmp_path, '[control]\nserver = "192.0.2.1:7777"'))
    with pytest.raises(ConfigError, match=r"control\.server: needs turn\.secret"):
        check_control(no_secret, None)
    missing_ca = load_config(write(tmp_path, BASE + '[control]\nserver = "h:7777"\nca_file = "ca.pem"'))
    assert missing_ca.control.ca_file == str(tmp_path.resolve() / "ca.pem")  # next to the config file
    with pytest.raises(ConfigError, match=r"control\.ca_file"):
        check_control(missing_ca, b"s")
    (tmp_path / "ca.pem").write_text("x")
    check_control(missing_ca, b"s")


def test_the_name_defaults_to_the_host_name(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE + '[control]\nserver = "192.0.2.1:7777"'))
    assert control_name(cfg, "relay-1.example") == "relay-1.example"
    with pytest.raises(ConfigError, match=r"control\.name \(default: the host name\)"):
        control_name(cfg, "a host name with spaces")
    named = load_config(write(tmp_path, BASE + '[control]\nserver = "192.0.2.1:7777"\nname = "g1"'))
    assert control_name(named, "ignored") == "g1"


def test_config_check_validates_control(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path, BASE + f'[control]\nserver = "192.0.2.1:7777"\npin = "{PIN}"\nname = "g1"')
    assert main(["config", "check", "--config", str(good)]) == 0
    assert "revocations from 192.0.2.1:7777" in capsys.readouterr().out
    for text in (
        '[control]\nserver = "192.0.2.1:7777"',  # no secret
        BASE + '[control]\nserver = "192.0.2.1:7777"\npin = "sha256:x"',
    ):
        assert main(["config", "check", "--config", str(write(tmp_path, text))]) == 1
        err = capsys.readouterr().err
        assert err.startswith("ghostgate: ")
        assert "control." in err
        assert len(err.strip().splitlines()) == 1
