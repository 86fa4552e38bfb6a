"""ghostcore.config (strict TOML -> dataclasses, precedence) and ghostcore.ipalloc."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ghostcore.config import duration, load, parse_duration, parse_hostport
from ghostcore.errors import ConfigError, Unavailable
from ghostcore.ipalloc import Allocator, parse_prefix


@dataclass(frozen=True)
class _Server:
    bind: str = "0.0.0.0:7777"
    workers: int = 1
    debug: bool = False
    timeout: float = duration(5.0)
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if ":" not in self.bind:
            raise ConfigError(f"server.bind: expected host:port, got {self.bind!r}")


@dataclass(frozen=True)
class _Cfg:
    server: _Server = field(default_factory=_Server)


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("1h30m", 5400), ("50ms", 0.05), ("180d", 180 * 86400), (12, 12), (0.5, 0.5), ("0s", 0)],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "1x", "h", "1h 30m", "-1s", -3, True, "30s5"])
def test_parse_duration_refuses_garbage_naming_the_key(text: str | float) -> None:
    with pytest.raises(ConfigError, match=r"^nodes\.ttl: "):
        parse_duration(text, "nodes.ttl")


def test_defaults_file_env_flags_precedence(tmp_path: Path) -> None:
    path = _write(tmp_path, '[server]\nbind = "127.0.0.1:1"\nworkers = 2\ntimeout = "1m"\n')
    cfg = load(_Cfg, path, env_prefix="GX")
    assert cfg.server == _Server(bind="127.0.0.1:1", workers=2, timeout=60.0)
    env = {"GX_SERVER_WORKERS": "3", "GX_SERVER_DEBUG": "yes", "GX_SERVER_TAGS": "a, b"}
    cfg = load(_Cfg, path, env_prefix="GX", environ=env)
    assert (cfg.server.workers, cfg.server.debug, cfg.server.tags) == (3, True, ["a", "b"])
    cfg = load(_Cfg, path, env_prefix="GX", environ=env, flags={"server.workers": 9, "server.bind": None})
    assert (cfg.server.workers, cfg.server.bind) == (9, "127.0.0.1:1")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[server]\nbnd = "x:1"\n', r"server\.bnd: unknown key \(known here: bind, debug"),
        ('[sever]\nbind = "x:1"\n', r"sever: unknown key"),
        ("[server]\nworkers = 'two'\n", r"server\.workers: expected an integer"),
        ("[server]\ndebug = 1\n", r"server\.debug: expected true or false"),
        ('[server]\ntimeout = "soon"\n', r"server\.timeout: expected a duration"),
        ('[server]\nbind = "nocolon"\n', r"server\.bind: expected host:port"),
        ("[server]\ntags = [1]\n", r"server\.tags: expected a list of str"),
        ("server = 3\n", r"server: expected a table"),
        ("[server\n", r"not valid TOML"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load(_Cfg, path, env_prefix="GX")
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_environment_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"environment \(GX_\*\): server\.workers"):
        load(_Cfg, None, env_prefix="GX", environ={"GX_SERVER_WORKERS": "many"})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load(_Cfg, tmp_path / "nope.toml", env_prefix="GX")


def test_allocator_is_sequential_unique_and_skips_used() -> None:
    net = ipaddress.ip_network("100.64.0.0/29")
    alloc = Allocator(net, used=[ipaddress.ip_address("100.64.0.2")])
    got = [alloc.allocate() for _ in range(5)]
    assert [str(a) for a in got] == ["100.64.0.1", "100.64.0.3", "100.64.0.4", "100.64.0.5", "100.64.0.6"]
    with pytest.raises(Unavailable, match="exhausted"):
        alloc.allocate()
    alloc.release(ipaddress.ip_address("100.64.0.4"))
    assert str(alloc.allocate()) == "100.64.0.4"


def test_allocator_is_stable_when_reseeded_from_what_was_stored() -> None:
    net = ipaddress.ip_network("fd7a:115c:a1e0::/48")
    first = Allocator(net)
    stored = [first.allocate() for _ in range(3)]
    again = Allocator(net, used=stored)
    fresh = again.allocate()
    assert fresh not in stored
    assert str(fresh) == "fd7a:115c:a1e0::4"


def test_allocator_does_amortised_constant_work() -> None:
    alloc = Allocator(ipaddress.ip_network("100.64.0.0/10"))
    got = {alloc.allocate() for _ in range(20_000)}
    assert len(got) == 20_000  # would take minutes if every allocation rescanned from the start


def test_parse_prefix_names_the_key() -> None:
    assert str(parse_prefix("100.64.0.0/10", "network.ipv4_prefix")) == "100.64.0.0/10"
    with pytest.raises(ConfigError, match=r"network\.ipv4_prefix: not a network prefix"):
        parse_prefix("100.64.0.1/10", "network.ipv4_prefix")


@pytest.mark.parametrize(
    ("text", "ip_only", "expected"),
    [
        ("0.0.0.0:7777", False, ("0.0.0.0", 7777)),
        ("[::]:3478", True, ("::", 3478)),
        ("ghostmesh.example:443", False, ("ghostmesh.example", 443)),
    ],
)
def test_parse_hostport(text: str, ip_only: bool, expected: tuple[str, int]) -> None:
    assert parse_hostport(text, "server.bind", ip_only=ip_only) == expected


@pytest.mark.parametrize(
    ("text", "ip_only"),
    [("nocolon", False), ("::1:80", False), ("[1.2.3.4]:80", False), ("[::1:80", False), ("host:80", True),
     ("1.2.3.4:99999", False), (":80", False), ("1.2.3.4:", False)],
)  # fmt: skip
def test_parse_hostport_refuses_naming_the_key(text: str, ip_only: bool) -> None:
    with pytest.raises(ConfigError, match=r"^relay\.listen: "):
        parse_hostport(text, "relay.listen", ip_only=ip_only)
