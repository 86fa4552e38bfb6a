"""ghostmesh's [dns] table: the example loads, bad values are refused naming their key, and the map's DNS
settings are built from it (ghostmesh.dnsmap) and ride in every full map, never in a delta."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ghostcore.dnsname import normalize_domain, normalize_server, parse_domain
from ghostcore.errors import ConfigError, InvalidArgument
from ghostmesh.config import DnsConfig, ExtraRecord, load_config
from ghostmesh.dnsmap import dns_map

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "ghostmesh.toml"
_TOML_LINE = re.compile(r'# ((\[\[?[a-z._]+\]\]?)|([a-z_]+|"[a-z.]+") = .*?)(\s+#.*)?$')


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "ghostmesh.toml"
    p.write_text(text)
    return p


def test_example_dns_table_loads_when_uncommented(tmp_path: Path) -> None:
    lines = EXAMPLE.read_text().splitlines()
    block = lines[
        lines.index("[dns]") : lines.index(
            '# [oidc]                                       # with auth_method = "oidc"'
        )
    ]
    table = ["[dns]", "magic_dns = true"]
    for line in block:
        m = _TOML_LINE.fullmatch(line)
        if m:
            table.append(m.group(1))
    cfg = load_config(_write(tmp_path, "\n".join(table) + "\n"), environ={}).dns
    assert cfg.magic_dns
    assert cfg.base_domain == "mesh.example"
    assert cfg.nameservers == ["192.0.2.53:53", "[2001:db8::53]:53"]
    assert cfg.split == {"corp.example": ["10.1.0.53:53", "10.1.0.54:5353"]}
    assert cfg.search_domains == ["corp.example"]
    assert cfg.records() == (
        ExtraRecord("db.mesh.example", "A", "100.64.0.10"),
        ExtraRecord("wiki.mesh.example", "CNAME", "db.mesh.example"),
    )


def test_default_sends_nothing() -> None:
    assert load_config(EXAMPLE, environ={}).dns == DnsConfig()
    assert dns_map(DnsConfig()) is None


def test_names_are_made_canonical(tmp_path: Path) -> None:
    text = (
        '[dns]\nmagic_dns = true\nbase_domain = "Mesh.Example."\n'
        '[dns.split]\n"CORP.example" = ["10.1.0.53"]\n'
    )
    cfg = load_config(_write(tmp_path, text), environ={}).dns
    assert cfg.base_domain == "mesh.example"
    assert cfg.split == {"corp.example": ["10.1.0.53:53"]}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("magic_dns = true", r"dns\.base_domain: required with dns\.magic_dns"),
        ('base_domain = "mesh..example"', r"dns\.base_domain: expected a DNS name"),
        ('base_domain = "-bad.example"', r"dns\.base_domain: expected a DNS name"),
        ('base_domain = "a.123"', r"dns\.base_domain: expected a DNS name"),
        (f'base_domain = "{"a" * 64}.example"', r"dns\.base_domain: expected a DNS name"),
        ('nameservers = ["10.0.0.1", "not-an-ip"]', r"dns\.nameservers\[1\]: expected an IP address"),
        ('nameservers = ["10.0.0.1:0"]', r"dns\.nameservers\[0\]: expected"),
        ('nameservers = ["fe80::1%eth0"]', r"dns\.nameservers\[0\]: expected"),
        ("nameservers = [1]", r"dns\.nameservers: expected a list of str"),
        ('search_domains = ["ok.example", "bad_name"]', r"dns\.search_domains\[1\]: expected a DNS name"),
        ('split = { "corp.example" = [] }', r"dns\.split\.corp\.example: needs at least one server"),
        ('split = { "corp.example" = ["x"] }', r"dns\.split\.corp\.example\[0\]: expected an IP address"),
        ('split = { "corp.example" = "10.1.0.53" }', r"dns\.split: expected a table of string lists"),
        (
            'split = { "a.example" = ["10.0.0.1"], "A.example" = ["10.0.0.2"] }',
            r"dns\.split\.A\.example: a\.example is listed twice",
        ),
        (
            'magic_dns = true\nbase_domain = "mesh.example"\nsplit = { "x.mesh.example" = ["10.0.0.1"] }',
            r"dns\.split\.x\.mesh\.example: .* inside dns\.base_domain",
        ),
        (
            'extra_records = [{ name = "db.example", type = "MX", value = "x" }]',
            r"dns\.extra_records\[0\]\.type",
        ),
        (
            'extra_records = [{ name = "db.example", type = "A", value = "fd00::1" }]',
            r"dns\.extra_records\[0\]\.value: an A record needs an IPv4",
        ),
        (
            'extra_records = [{ name = "db.example", type = "AAAA", value = "10.0.0.1" }]',
            r"\[0\]\.value: an AAAA record needs an IPv6",
        ),
        (
            'extra_records = [{ name = "db.example", type = "A", value = "nope" }]',
            r"dns\.extra_records\[0\]\.value: expected",
        ),
        (
            'extra_records = [{ name = "db example", type = "A", value = "10.0.0.1" }]',
            r"dns\.extra_records\[0\]\.name",
        ),
        (
            'extra_records = [{ name = "db.example", type = "CNAME", value = "-x" }]',
            r"dns\.extra_records\[0\]\.value: expected a DNS name",
        ),
        (
            'extra_records = [{ name = "db.example", type = "A", value = "10.0.0.1", ttl = 5 }]',
            r"dns\.extra_records\[0\]\.ttl: unknown key",
        ),
        (
            'extra_records = [{ name = "db.example", type = "A", value = "10.0.0.1" }, '
            '{ name = "db.example", type = "CNAME", value = "x.example" }]',
            r"dns\.extra_records\[1\]\.name: db\.example has a CNAME and other records",
        ),
        ("resolver = 1", r"dns\.resolver: unknown key"),
    ],
)
def test_bad_dns_values_name_their_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, f"[dns]\n{text}\n"), environ={})


def test_dns_map_carries_the_table() -> None:
    cfg = DnsConfig(
        magic_dns=True,
        base_domain="mesh.example",
        nameservers=["192.0.2.53"],
        split={"corp.example": ["10.1.0.53"]},
        search_domains=["corp.example"],
        extra_records=[{"name": "db.mesh.example", "type": "aaaa", "value": "FD7A:115C:A1E0::10"}],
    )
    m = dns_map(cfg)
    assert m is not None
    assert m.magic_dns
    assert m.base_domain == "mesh.example"
    assert list(m.nameservers) == ["192.0.2.53:53"]
    assert [(s.domain, list(s.servers)) for s in m.split] == [("corp.example", ["10.1.0.53:53"])]
    assert [(r.name, r.type, r.value) for r in m.extra_records] == [
        ("db.mesh.example", "AAAA", "fd7a:115c:a1e0::10")
    ]


def test_wire_names_must_be_canonical() -> None:
    assert parse_domain("mesh.example") == "mesh.example"
    for bad in ("Mesh.example", "mesh.example.", "", "a..b", "a" * 254):
        with pytest.raises(InvalidArgument):
            parse_domain(bad)
    assert normalize_domain("EXAMPLE.com.", "x") == "example.com"
    assert normalize_server("[2001:DB8::1]:5353", "x") == "[2001:db8::1]:5353"
