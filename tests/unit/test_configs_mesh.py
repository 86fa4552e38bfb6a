"""configs/ghostmesh.toml loads, and bad ghostmesh config is refused with the key path in the message."""

from __future__ import annotations

from pathlib import Path

import pytest

from ghostcore.config import parse_hostport
from ghostcore.errors import ConfigError
from ghostmesh.config import MeshConfig, load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "ghostmesh.toml"


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "ghostmesh.toml"
    p.write_text(text)
    return p


def test_example_config_loads_with_spec_keys() -> None:
    cfg = load_config(EXAMPLE, environ={})
    assert cfg.server.bind == "0.0.0.0:7777"
    assert cfg.server.auth_method == "authkey"
    assert cfg.nodes.key_expiry == 180 * 86400
    assert cfg.mapper.batch_delay == pytest.approx(0.05)
    assert cfg.authkeys.default_expiration == 3600
    assert cfg.db_path == Path("/var/lib/ghostmesh/ghostmesh.db")
    text = EXAMPLE.read_text()
    assert '# auth_method = "oidc"' in text
    assert '# acl_file = "acls.toml"' in text


def test_defaults_equal_example() -> None:
    assert load_config(None, environ={}) == load_config(EXAMPLE, environ={})


def test_unknown_key_names_its_path(tmp_path: Path) -> None:
    p = _write(tmp_path, '[server]\nbind = "0.0.0.0:7777"\nlisten = "x"\n')
    with pytest.raises(ConfigError, match=r"server\.listen: unknown key"):
        load_config(p, environ={})


def test_unknown_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"derp: unknown key"):
        load_config(_write(tmp_path, "[derp]\n"), environ={})


def test_wrong_type(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"server\.max_message_bytes: expected an integer"):
        load_config(_write(tmp_path, '[server]\nmax_message_bytes = "big"\n'), environ={})


@pytest.mark.parametrize("bind", ["7777", "host", "0.0.0.0:99999", "::1:7777", "0.0.0.0:"])
def test_bad_bind(tmp_path: Path, bind: str) -> None:
    with pytest.raises(ConfigError, match=r"server\.bind"):
        load_config(_write(tmp_path, f'[server]\nbind = "{bind}"\n'), environ={})


def test_bind_forms() -> None:
    assert parse_hostport("[::]:7777", "x") == ("::", 7777)
    assert parse_hostport("127.0.0.1:0", "x") == ("127.0.0.1", 0)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("ipv4_prefix", "100.64.0.1/10"),
        ("ipv4_prefix", "fd00::/48"),
        ("ipv6_prefix", "10.0.0.0/8"),
        ("ipv6_prefix", "nonsense"),
    ],
)
def test_bad_prefix(tmp_path: Path, key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"network\.{key}"):
        load_config(_write(tmp_path, f'[network]\n{key} = "{value}"\n'), environ={})


def test_bad_duration(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nodes\.key_expiry: expected a duration"):
        load_config(_write(tmp_path, '[nodes]\nkey_expiry = "forever"\n'), environ={})


def test_oidc_without_issuer_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r'oidc\.issuer: required when server\.auth_method = "oidc"'):
        load_config(_write(tmp_path, '[server]\nauth_method = "oidc"\n'), environ={})


def test_unknown_auth_method_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r'server\.auth_method: expected "authkey" or "oidc", got \'mtls\''):
        load_config(_write(tmp_path, '[server]\nauth_method = "mtls"\n'), environ={})


def test_acl_file_relative_to_config_dir(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, '[server]\nacl_file = "acls.toml"\n'), environ={})
    assert cfg.server.acl_file == str(tmp_path / "acls.toml")
    cfg = load_config(_write(tmp_path, '[server]\nacl_file = "/etc/x/acls.toml"\n'), environ={})
    assert cfg.server.acl_file == "/etc/x/acls.toml"


def test_database_type(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"database\.type"):
        load_config(_write(tmp_path, '[database]\ntype = "postgres"\n'), environ={})


def test_log_format(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"log\.format"):
        load_config(_write(tmp_path, '[log]\nformat = "xml"\n'), environ={})


def test_precedence_env_and_flags(tmp_path: Path) -> None:
    p = _write(tmp_path, '[server]\nbind = "127.0.0.1:1000"\nstate_dir = "/srv/a"\n')
    env = {"GHOSTMESH_SERVER_BIND": "127.0.0.1:2000", "GHOSTMESH_NODES_KEEPALIVE": "10"}
    cfg = load_config(p, environ=env, flags={"server.state_dir": "/srv/b", "server.admin_socket": None})
    assert cfg.server.bind == "127.0.0.1:2000"
    assert cfg.nodes.keepalive == 10
    assert cfg.server.state_dir == "/srv/b"
    assert cfg.db_path == Path("/srv/b/ghostmesh.db")
    cfg2 = load_config(p, environ=env, flags={"server.bind": "127.0.0.1:3000"})
    assert cfg2.server.bind == "127.0.0.1:3000"


def test_database_path_explicit() -> None:
    cfg = MeshConfig()
    assert cfg.db_path.name == "ghostmesh.db"
    assert load_config(None, environ={"GHOSTMESH_DATABASE_PATH": "/x/y.db"}).db_path == Path("/x/y.db")
