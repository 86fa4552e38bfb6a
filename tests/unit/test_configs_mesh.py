"""configs/ghostmesh.toml loads, and bad ghostmesh config is refused with the key path in the message."""

from __future__ import annotations

from pathlib import Path

import pytest

from ghostcore.config import parse_hostport
from ghostcore.errors import ConfigError
from ghostmesh.config import (
    AuditConfig,
    ConsoleConfig,
    DatabaseConfig,
    LimitsConfig,
    MeshConfig,
    TlsConfig,
    load_config,
)

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
    assert cfg.tls == TlsConfig()  # the default: a self-signed certificate kept next to the database
    text = EXAMPLE.read_text()
    assert '# auth_method = "oidc"' in text
    assert '# acl_file = "acls.toml"' in text
    assert "\n# [tls]\n" in text


def test_example_tls_table_loads_when_uncommented(tmp_path: Path) -> None:
    lines = EXAMPLE.read_text().splitlines()
    start = lines.index("# [tls]")
    table = [
        ln.removeprefix("# ")
        for ln in lines[start:]
        if ln.startswith(("# [tls]", "# cert_file", "# key_file"))
    ]
    cfg = load_config(_write(tmp_path, "\n".join(table) + "\n"), environ={})
    assert cfg.tls == TlsConfig("/etc/ghostmesh/tls/fullchain.pem", "/etc/ghostmesh/tls/privkey.pem")


@pytest.mark.parametrize(
    ("text", "missing"), [('cert_file = "c.pem"', "key_file"), ('key_file = "k.pem"', "cert_file")]
)
def test_tls_files_come_in_pairs(tmp_path: Path, text: str, missing: str) -> None:
    with pytest.raises(
        ConfigError, match=rf"ghostmesh\.toml: tls\.{missing}: set tls\.cert_file and tls\.key_file together"
    ):
        load_config(_write(tmp_path, f"[tls]\n{text}\n"), environ={})


def test_tls_files_relative_to_config_dir(tmp_path: Path) -> None:
    cfg = load_config(
        _write(tmp_path, '[tls]\ncert_file = "tls/chain.pem"\nkey_file = "/k.pem"\n'), environ={}
    )
    assert (cfg.tls.cert_file, cfg.tls.key_file) == (str(tmp_path / "tls" / "chain.pem"), "/k.pem")


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


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('type = "mysql"', r'database\.type: expected "sqlite" or "postgres"'),
        ('type = "postgres"', r"database\.dsn: required"),
        (
            'type = "postgres"\ndsn = "dbname=x"\npath = "/x.db"',
            r"database\.path: only with type = \"sqlite\"",
        ),
        ('dsn = "dbname=x"', r"database\.dsn: only with type = \"postgres\""),
        ('type = "postgres"\ndsn = "dbname password=hunter2"', r"database\.dsn: not a libpq connection"),
        ('type = "postgres"\ndsn = "postgresql://u:pw@h/db"\nport = 5', r"database\.port"),
    ],
)
def test_database_table_is_strict(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        load_config(_write(tmp_path, f"[database]\n{text}\n"), environ={})
    assert "hunter2" not in str(err.value)


def test_example_postgres_lines_load_and_the_dsn_stays_out_of_reprs(tmp_path: Path) -> None:
    lines = EXAMPLE.read_text().splitlines()
    start = lines.index("[database]")
    table = ["[database]"] + [
        ln.removeprefix("# ") for ln in lines[start:] if ln.startswith(('# type = "postgres"', "# dsn ="))
    ]
    cfg = load_config(_write(tmp_path, "\n".join(table) + "\n"), environ={})
    assert cfg.database == DatabaseConfig(
        "postgres", "", "host=/run/postgresql dbname=ghostmesh user=ghostmesh"
    )
    env = {"GHOSTMESH_DATABASE_TYPE": "postgres", "GHOSTMESH_DATABASE_DSN": "postgresql://m:hunter2@db/mesh"}
    cfg = load_config(None, environ=env)
    assert cfg.database.dsn == "postgresql://m:hunter2@db/mesh"
    assert "hunter2" not in repr(cfg)


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


def test_example_limits_and_audit_tables() -> None:
    cfg = load_config(EXAMPLE, environ={})
    assert cfg.limits == LimitsConfig()
    assert (cfg.limits.status_reports_per_second, cfg.limits.status_report_burst) == (2.0, 10)
    assert (cfg.limits.calls_per_source, cfg.limits.calls_total, cfg.limits.connections_total) == (
        1024,
        16384,
        16384,
    )
    assert cfg.audit == AuditConfig()  # retention 0: keep everything; the key in the state directory
    text = EXAMPLE.read_text()
    assert '\n# key_file = "/etc/ghostmesh/audit.key"\n' in text
    assert "\n# max_pending_per_source = 10 " in text


def test_limits_and_audit_from_file_and_environment(tmp_path: Path) -> None:
    text = '[limits]\ncalls_total = 2000\n[audit]\nretention = "30d"\nkey_file = "keys/audit.key"\n'
    cfg = load_config(_write(tmp_path, text), environ={"GHOSTMESH_LIMITS_CALLS_PER_SOURCE": "10"})
    assert (cfg.limits.calls_total, cfg.limits.calls_per_source) == (2000, 10)
    assert cfg.audit.retention == 30 * 86400
    assert cfg.audit.key_file == str(tmp_path / "keys" / "audit.key")  # relative to the config file


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[limits]\ncalls_per_second = 5\n", r"limits\.calls_per_second: unknown key"),
        ("[limits]\nstatus_reports_per_second = 0\n", r"limits\.status_reports_per_second: expected more"),
        (
            "[limits]\nauth_failures_per_minute = 0\n",
            r"limits\.auth_failures_per_minute: expected 1\.\.1000000",
        ),
        ("[limits]\nconnections_total = -1\n", r"limits\.connections_total: expected 1\.\.1000000"),
        ("[limits]\ncalls_per_source = 9\ncalls_total = 8\n", r"limits\.calls_per_source: 9 is more than"),
        ('[limits]\npending_requests = "many"\n', r"limits\.pending_requests: expected an integer"),
        ('[audit]\nretention = "30m"\n', r"audit\.retention: 0 \(keep everything\) or at least 1h"),
        ("[audit]\nkeep = 1\n", r"audit\.keep: unknown key"),
        ("[oidc]\nmax_pending = 0\n", r"oidc\.max_pending: expected 1\.\.1000000"),
    ],
)
def test_bad_limits_name_their_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, text), environ={})


def test_console_is_off_by_default_and_the_example_table_loads() -> None:
    cfg = load_config(EXAMPLE, environ={})
    assert cfg.console == ConsoleConfig()
    assert cfg.console.listen == ""
    assert "\n[console]\n" in EXAMPLE.read_text()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('listen = "localhost:8080"', r"console\.listen: "),
        ('listen = "127.0.0.1:99999"', r"console\.listen: "),
        (
            'listen = "0.0.0.0:8080"',
            r"console\.listen: 0\.0\.0\.0:8080 is not a loopback address; set console\.tls",
        ),
        ('session_lifetime = "10s"', r"console\.session_lifetime: at least 1m"),
        ("max_sessions = 0", r"console\.max_sessions: 1\.\.10000, got 0"),
        ('colour = "blue"', r"console\.colour"),
    ],
)
def test_bad_console_config_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, f"[console]\n{text}\n"), environ={})


def test_console_beyond_loopback_needs_tls(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, '[console]\nlisten = "[::]:8443"\ntls = true\n'), environ={})
    assert cfg.console == ConsoleConfig(listen="[::]:8443", tls=True)
    cfg = load_config(_write(tmp_path, '[console]\nlisten = "[::1]:8080"\n'), environ={})
    assert cfg.console.listen == "[::1]:8080"
