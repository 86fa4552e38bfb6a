"""Addresses in the ACL policy are read strictly (ghostcore.addr): zone IDs, whitespace and control
characters are refused with the key path, and whatever the compiler emits into filter rules (which end up
in ``nft -f`` scripts on the nodes) is canonical, for any policy text (hypothesis)."""

from __future__ import annotations

import ipaddress
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ghostcore import addr
from ghostcore.errors import ConfigError
from ghostcore.policy import Compiler, NodeIdent, PolicyError, parse_policy

WIRE = re.compile(r"[0-9a-f.:/]+")


def _toml_str(text: str) -> str:
    """``text`` as a TOML basic string: printable ASCII as is, everything else escaped (TOML 1.0)."""
    out = []
    for c in text:
        if " " <= c <= "~" and c not in '"\\':
            out.append(c)
        else:
            out.append(f"\\U{ord(c):08X}")
    return '"' + "".join(out) + '"'


def _errors(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(text)
    return info.value.errors


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("fe80::1%eth0", "invalid address 'fe80::1%eth0'"),
        ("fe80::1%x\nremove", "invalid address 'fe80::1%x\\nremove'"),
        ("100.64.0.10 ", "invalid address '100.64.0.10 '"),
        ("\t100.64.0.10", "invalid address"),
        ("10.1.1.0/24\u0000", "invalid prefix"),
        ("fe80::%eth0/64", "invalid prefix"),
        ("::ffff:100.64.0.1", "embedded IPv4"),
        ("\uff11\uff10.0.0.1", "invalid address"),  # full-width digits
        ("10.1.1.0/024", "invalid prefix"),
    ],
)
def test_hosts_values_are_refused_with_their_key_path(value: str, says: str) -> None:
    errs = _errors(f"[hosts]\ndb = {_toml_str(value)}\n")
    assert len(errs) == 1
    assert errs[0].startswith("hosts.db: invalid ")
    assert says in errs[0]
    assert "\n" not in errs[0]


@pytest.mark.parametrize(
    ("key", "entry", "says"),
    [
        ("src", "fe80::1%eth0", "acls[0].src[0]: invalid address 'fe80::1%eth0'"),
        ("src", "10.0.0.0/8\n", "acls[0].src[0]: invalid prefix"),
        ("dst", "fe80::1%eth0:22", "acls[0].dst[0]: invalid address 'fe80::1%eth0'"),
        ("dst", "10.1.1.0/24%x:22", "acls[0].dst[0]: invalid prefix"),
    ],
)
def test_src_and_dst_addresses_are_refused_with_their_key_path(key: str, entry: str, says: str) -> None:
    sides = {"src": '"*"', "dst": '"*:*"', key: _toml_str(entry)}
    errs = _errors(f'[[acls]]\naction = "accept"\nsrc = [{sides["src"]}]\ndst = [{sides["dst"]}]\n')
    assert any(e.startswith(says) for e in errs), errs


def test_human_forms_are_accepted_and_emitted_canonical() -> None:
    policy = parse_policy(
        """
[hosts]
db = "FD7A:115C:A1E0:0::10"
lab = "10.1.1.7/24"

[[acls]]
action = "accept"
src = ["FD7A:115C:A1E0::0/120", "lab"]
dst = ["db:5432"]
"""
    )
    assert str(policy.hosts["db"]) == "fd7a:115c:a1e0::10/128"
    assert str(policy.hosts["lab"]) == "10.1.1.0/24"
    db = NodeIdent(
        1,
        "alice",
        frozenset(),
        (ipaddress.ip_address("100.64.0.10"), ipaddress.ip_address("fd7a:115c:a1e0::10")),
    )
    (rule,) = Compiler(policy, [db]).filter(1)
    assert {"10.1.1.0/24", "fd7a:115c:a1e0::/120"} <= set(rule.src)  # and db's own /32 and /128
    assert rule.dst == (("fd7a:115c:a1e0::10/128", 5432, 5432),)


# -- any policy text: refused, or everything emitted is canonical ------------------------------------------

ADDR_CHARS = "0123456789abcdefABCDEF.:/%-*\n\t \x00"
_v4 = st.ip_addresses(v=4)
_v6 = st.ip_addresses(v=6)
_address = st.one_of(  # as people write them: any case, host bits in prefixes
    _v4.map(str),
    _v6.map(lambda a: str(a).upper()),
    st.tuples(_v4, st.integers(0, 32)).map(lambda p: f"{p[0]}/{p[1]}"),
    st.tuples(_v6, st.integers(0, 128)).map(lambda p: f"{p[0].exploded}/{p[1]}"),
)
_network = st.one_of(
    st.tuples(_v4, st.integers(0, 32)).map(
        lambda p: str(ipaddress.ip_network(f"{p[0]}/{p[1]}", strict=False))
    ),
    st.tuples(_v6, st.integers(0, 128)).map(
        lambda p: str(ipaddress.ip_network(f"{p[0]}/{p[1]}", strict=False)).upper()
    ),
)
_zoned = st.tuples(_v6, st.text(max_size=8), st.sampled_from(["", "/64", "/128"])).map(
    lambda p: f"{p[0]}%{p[1]}{p[2]}"  # an IPv6 zone ID (RFC 4007 section 11), which Python's ipaddress takes
)
_padded = st.tuples(st.sampled_from([" ", "\t", "\n", "\x00", "\u00a0"]), _address, st.booleans()).map(
    lambda p: p[0] + p[1] if p[2] else p[1] + p[0]
)
_garbage = st.one_of(
    _zoned,
    _padded,
    st.text(alphabet=ADDR_CHARS, max_size=24),
    st.text(max_size=12),
    st.tuples(st.ip_addresses(), st.integers(0, 130)).map(lambda p: f"{p[0]}/{p[1]}"),
)
_near = st.sampled_from(  # the nodes' own addresses and routes (below), in human forms
    [
        "100.64.0.1",
        "100.64.0.7/24",
        "FD7A:115C:A1E0::2",
        "fd7a:115c:a1e0:0::/120",
        "10.1.2.3/24",
        "FD00:1::/48",
    ]
)
_selector = st.one_of(
    _address,
    _near,
    st.sampled_from(["*", "alice", "group:eng", "tag:server", "db", "lab", "autogroup:member"]),
)


def _mostly(valid: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """``valid`` nine times out of ten, else garbage: a policy (a dozen entries) parses often enough to
    compile."""
    return st.integers(0, 9).flatmap(lambda i: _garbage if i == 9 else valid)


_ports = _mostly(st.sampled_from(["*", "22", "80-90", "22,443"]))
_dst = st.tuples(_mostly(st.one_of(_selector, st.just("autogroup:internet"))), _ports).map(
    lambda t: f"{t[0]}:{t[1]}"
)

NODES = [
    NodeIdent(
        1,
        "alice",
        frozenset(),
        (ipaddress.ip_address("100.64.0.1"), ipaddress.ip_address("fd7a:115c:a1e0::1")),
    ),
    NodeIdent(
        2,
        "bob",
        frozenset({"tag:server"}),
        (ipaddress.ip_address("100.64.0.2"), ipaddress.ip_address("fd7a:115c:a1e0::2")),
        routes=(ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("fd00:1::/64")),
        exit_node=True,
    ),
    NodeIdent(
        3, "bob", frozenset(), (ipaddress.ip_address("100.64.0.3"), ipaddress.ip_address("fd7a:115c:a1e0::3"))
    ),
]


def _policy_text(hosts: dict[str, str], rules: list[tuple[list[str], list[str]]], routes: list[str]) -> str:
    lines = ['[groups]\n"group:eng" = ["alice"]', '[tag_owners]\n"tag:server" = ["alice"]', "[hosts]"]
    lines += [f"{_toml_str(k)} = {_toml_str(v)}" for k, v in hosts.items()]
    for src, dst in rules:
        lines.append('[[acls]]\naction = "accept"')
        lines.append(f"src = [{', '.join(_toml_str(s) for s in src)}]")
        lines.append(f"dst = [{', '.join(_toml_str(d) for d in dst)}]")
    lines.append("[auto_approvers.routes]")
    lines += [f'{_toml_str(r)} = ["tag:server"]' for r in dict.fromkeys(routes)]
    return "\n".join(lines) + "\n"


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.sampled_from(["db", "lab", "web"]), _mostly(st.one_of(_address, _near)), max_size=3),
    st.lists(
        st.tuples(
            st.lists(_mostly(_selector), min_size=1, max_size=3), st.lists(_dst, min_size=1, max_size=3)
        ),
        min_size=1,
        max_size=3,
    ),
    st.lists(_mostly(_network), max_size=2),
)
def test_any_policy_is_refused_or_compiles_to_canonical_prefixes(
    hosts: dict[str, str], rules: list[tuple[list[str], list[str]]], routes: list[str]
) -> None:
    try:
        policy = parse_policy(_policy_text(hosts, rules, routes))
    except (PolicyError, ConfigError):
        return
    compiler = Compiler(policy, NODES)
    for node in NODES:
        for rule in compiler.filter(node.id):
            for prefix in (*rule.src, *(p for p, _, _ in rule.dst)):
                assert WIRE.fullmatch(prefix), prefix
                assert str(addr.parse_prefix(prefix)) == prefix  # wire-strict: canonical, no host bits
    for net, _ in policy.auto_routes:
        addr.parse_prefix(str(net))
