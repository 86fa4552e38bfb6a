"""``[metrics]`` in ghostmesh's and ghostgate's configs: off by default, an ip:port when set, bad values
refused with one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from ghostcore.config import MetricsConfig
from ghostcore.errors import ConfigError
from ghostgate.config import load_config as load_gate
from ghostlink.app import build_parser
from ghostlink.config import load_config as load_link
from ghostmesh.config import load_config as load_mesh


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_off_by_default() -> None:
    assert MetricsConfig().listen == ""


@pytest.mark.parametrize("load", [load_gate, load_mesh])
def test_listen_loads(tmp_path: Path, load: object) -> None:
    path = write(tmp_path, '[metrics]\nlisten = "127.0.0.1:9090"\n')
    cfg = load(path)  # type: ignore[operator]
    assert cfg.metrics.listen == "127.0.0.1:9090"
    assert load(write(tmp_path, '[metrics]\nlisten = "[::1]:0"\n')).metrics.listen == "[::1]:0"  # type: ignore[operator]


@pytest.mark.parametrize("load", [load_gate, load_mesh])
@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('listen = "localhost:9090"', "metrics.listen"),  # a name, not an IP: a socket to bind
        ('listen = "127.0.0.1"', "metrics.listen"),
        ('listen = "127.0.0.1:70000"', "metrics.listen"),
        ("listen = 9090", "metrics.listen"),
        ('path = "/metrics"', "metrics.path"),
    ],
)
def test_bad_values_refused_in_one_line(tmp_path: Path, load: object, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, f"[metrics]\n{text}\n"))  # type: ignore[operator]
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_env_sets_listen() -> None:
    cfg = load_gate(None, environ={"GHOSTGATE_METRICS_LISTEN": "127.0.0.1:9100"})
    assert cfg.metrics.listen == "127.0.0.1:9100"


def test_link_metrics_listen_from_file_and_flag(tmp_path: Path) -> None:
    path = write(tmp_path, '[metrics]\nlisten = "127.0.0.1:9090"\n')
    assert load_link(path).metrics.listen == "127.0.0.1:9090"
    args = build_parser().parse_args(["run", "--metrics-listen", "127.0.0.1:9191"])
    assert args.metrics_listen == "127.0.0.1:9191"
    assert load_link(path, flags={"metrics.listen": args.metrics_listen}).metrics.listen == "127.0.0.1:9191"
    with pytest.raises(ConfigError, match=r"^metrics\.listen: "):
        load_link(None, flags={"metrics.listen": "nowhere"})
