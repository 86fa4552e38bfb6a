"""Tailscale's policy semantics, one behaviour per test: sources that are subnets, standby routers,
autogroup:self's sources, the default policy, protocols, prefixes as sources, policy tests, ``*``,
grants with ``ip`` and ``via``, the HuJSON import and policy diffs."""

from __future__ import annotations

import ipaddress

import pytest

from ghostcore.policy import Compiler, FRule, NodeIdent, PolicyError, check, parse_policy, run_tests, tsimport
from ghostcore.policy import diff as policy_diff
from ghostcore.policy.model import MESH, mesh_ranges

TAGS = '[tag_owners]\n"tag:server" = ["alice"]\n"tag:router" = ["alice"]\n"tag:client" = ["alice"]\n'
MESH_TEXT = tuple(sorted(str(m) for m in MESH))


def node(i: int, user: str = "alice", tags: tuple[str, ...] = (), routes: tuple[str, ...] = ()) -> NodeIdent:
    addrs = (ipaddress.ip_address(f"100.64.0.{i}"), ipaddress.ip_address(f"fd7a:115c:a1e0::{i:x}"))
    nets = tuple(ipaddress.ip_network(r) for r in routes)
    return NodeIdent(i, user, frozenset(tags), addrs, f"n{i}", nets)


def acl(src: str, dst: str, extra: str = "") -> str:
    return f'[[acls]]\naction = "accept"\nsrc = [{src}]\ndst = [{dst}]\n{extra}\n'


def errors_of(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(text)
    return info.value.errors


def test_router_of_a_subnet_inside_a_source_prefix_is_a_peer_of_the_destination() -> None:
    pol = parse_policy(TAGS + acl('"10.0.0.0/8"', '"tag:server:22"'))
    srv, router, other = (
        node(1, tags=("tag:server",)),
        node(2, tags=("tag:router",), routes=("10.33.0.0/16",)),
        node(3),
    )
    c = Compiler(pol, [srv, router, other])
    assert c.peers(1) == {2}  # the router brings the LAN's traffic: it must be a WireGuard peer
    assert c.peers(2) == {1}
    assert c.filter(1)[0].src == ("10.0.0.0/8",)


def test_standby_router_is_a_peer_and_gets_the_filter_for_its_prefix() -> None:
    pol = parse_policy(TAGS + acl('"tag:client"', '"10.33.0.0/16:443"'))
    client = node(1, tags=("tag:client",))
    primary = node(2, tags=("tag:router",), routes=("10.33.0.0/16",))
    standby = node(3, tags=("tag:router",), routes=("10.33.0.0/16",))
    c = Compiler(pol, [client, primary, standby])
    assert c.peers(1) == {2, 3}
    assert c.filter(3) == c.filter(2) != ()
    assert c.filter(3)[0].dst == (("10.33.0.0/16", 443, 443),)


@pytest.mark.parametrize("src", ['"tag:client"', '"autogroup:tagged"', '"100.64.0.0/10"', '"db"'])
def test_autogroup_self_with_a_source_that_is_not_a_user_is_refused(src: str) -> None:
    errs = errors_of(TAGS + '[hosts]\ndb = "100.64.0.9"\n' + acl(src, '"autogroup:self:*"'))
    assert errs == [
        f"acls[0].src[0]: {src}: autogroup:self can only be used with users, groups, or supported autogroups"
    ]


def test_autogroup_self_takes_users_groups_member_and_star_in_acls_but_not_star_in_grants() -> None:
    base = TAGS + '[groups]\n"group:eng" = ["alice"]\n'
    parse_policy(base + acl('"alice", "group:eng", "autogroup:member", "*"', '"autogroup:self:*"'))
    errs = errors_of(base + '[[grants]]\nsrc = ["*"]\ndst = ["autogroup:self"]\nip = ["*"]\n')
    assert errs[0].startswith('grants[0].src[0]: "*": autogroup:self can only be used')


def test_no_acls_and_no_grants_allows_all_but_an_empty_list_denies_all() -> None:
    a, b = node(1), node(2, "bob")
    c = Compiler(parse_policy(TAGS), [a, b])
    assert c.peers(1) == {2}
    assert c.filter(2) == (
        FRule(MESH_TEXT, (("100.64.0.2/32", 0, 65535), ("fd7a:115c:a1e0::2/128", 0, 65535)), ()),
    )
    assert check(parse_policy(TAGS), "alice", "bob:22").allowed
    for empty in ("acls = []\n", "grants = []\n"):
        c = Compiler(parse_policy(empty + TAGS), [a, b])
        assert (c.peers(1), c.filter(2)) == (set(), ())


def test_icmp_is_protocol_1_only_and_ipv6_icmp_is_58() -> None:
    pol = parse_policy(TAGS + acl('"alice"', '"tag:server:*"', 'proto = "icmp"'))
    assert check(pol, "alice", "tag:server:0", "icmp").allowed
    assert not check(pol, "alice", "tag:server:0", "ipv6-icmp").allowed
    assert not check(pol, "alice", "tag:server:0", "58").allowed
    assert parse_policy(TAGS + acl('"alice"', '"tag:server:*"', 'proto = "58"')).rules[0].protos == (
        "ipv6-icmp",
    )


def test_ip_prefix_source_is_the_prefix_not_the_whole_nodes_inside() -> None:
    pol = parse_policy(TAGS + acl('"100.64.0.0/16"', '"tag:server:22"'))
    inside, srv = node(7), node(1, tags=("tag:server",))
    c = Compiler(pol, [inside, srv])
    assert c.filter(1)[0].src == ("100.64.0.0/16",)  # not inside's IPv6 address
    assert c.peers(1) == {7}  # but the node inside is a peer


def test_group_is_accepted_as_a_test_source_and_a_test_without_accept_or_deny_is_refused() -> None:
    base = TAGS + '[groups]\n"group:eng" = ["alice", "bob"]\n' + acl('"group:eng"', '"tag:server:22"')
    pol = parse_policy(base + '[[tests]]\nsrc = "group:eng"\naccept = ["tag:server:22"]\n')
    assert run_tests(pol) == (1, [])
    assert errors_of(base + '[[tests]]\nsrc = "group:eng"\n') == [
        'tests[0]: a test needs "accept" or "deny" (a list of HOST:PORT)'
    ]


@pytest.mark.parametrize(
    ("dst", "says"),
    [
        ("tag:server:22,80", "one number"),
        ("tag:server:*", "one number"),
        ("10.0.0.0/8:22", "a prefix"),
        ("autogroup:self:22", "cannot be a test destination"),
    ],
)
def test_a_test_destination_is_one_address_and_one_port(dst: str, says: str) -> None:
    pol = parse_policy(TAGS + acl('"*"', '"*:*"') + f'[[tests]]\nsrc = "alice"\naccept = ["{dst}"]\n')
    _, errors = run_tests(pol)
    assert len(errors) == 1
    assert says in errors[0]


def test_star_as_a_source_is_the_mesh_and_approved_routes_never_the_internet() -> None:
    pol = parse_policy(TAGS + acl('"*"', '"tag:server:22"'))
    srv, router = node(1, tags=("tag:server",)), node(2, tags=("tag:router",), routes=("192.168.5.0/24",))
    c = Compiler(pol, [srv])
    assert c.filter(1)[0].src == MESH_TEXT
    assert "0.0.0.0/0" not in c.filter(1)[0].src
    delta = c.upsert(router)  # a new approved route joins "*": the filter lists it
    assert 1 in delta.filters
    assert c.filter(1)[0].src == tuple(sorted((*MESH_TEXT, "192.168.5.0/24")))
    c.remove(2)
    assert c.filter(1)[0].src == MESH_TEXT


def test_star_covers_a_mesh_configured_outside_tailscales_ranges() -> None:
    inside = (ipaddress.ip_network("100.64.0.0/16"), ipaddress.ip_network("fd7a:115c:a1e0:1::/64"))
    assert mesh_ranges(inside) == MESH  # a prefix within Tailscale's ranges changes nothing
    own = (ipaddress.ip_network("10.77.0.0/16"), ipaddress.ip_network("fd7a:115c:a1e0::/48"))
    mesh = mesh_ranges(own)
    assert mesh == (*MESH, ipaddress.ip_network("10.77.0.0/16"))
    pol = parse_policy(TAGS + acl('"*"', '"tag:server:22"'))
    c = Compiler(pol, [node(1, tags=("tag:server",))], mesh)
    assert c.filter(1)[0].src == tuple(sorted((*MESH_TEXT, "10.77.0.0/16")))


def test_rule_without_proto_carries_the_default_set_not_every_protocol() -> None:
    pol = parse_policy(TAGS + acl('"alice"', '"tag:server:*"'))
    assert check(pol, "alice", "tag:server:22").allowed
    assert check(pol, "alice", "tag:server:0", "ipv6-icmp").allowed
    assert not check(pol, "alice", "tag:server:0", "gre").allowed
    assert not check(pol, "alice", "tag:server:0", "sctp").allowed


# -- grants ---------------------------------------------------------------------------------------------


def test_grant_ip_entries_become_rules_per_protocol() -> None:
    pol = parse_policy(
        TAGS
        + '[[grants]]\nsrc = ["alice"]\ndst = ["tag:server"]\n'
        + 'ip = ["tcp:22", "udp:53", "80-443", "47:*", "icmp:*"]\n'
    )
    got = {r.protos: r.dst[0].ports for r in pol.rules}
    assert got == {
        ("tcp",): ((22, 22),),
        ("udp",): ((53, 53),),
        (): ((80, 443),),
        ("gre",): ((0, 65535),),
        ("icmp",): ((0, 65535),),
    }
    assert all(r.origin == "grants[0]" for r in pol.rules)
    assert check(pol, "alice", "tag:server:0", "gre").allowed
    assert check(pol, "alice", "tag:server:100").allowed
    assert not check(pol, "alice", "tag:server:22", "udp").allowed


@pytest.mark.parametrize(
    ("grant", "says"),
    [
        (
            'src = ["*"]\ndst = ["*"]\nip = ["*"]\napp = { "example.com/cap/x" = [{}] }\n',
            "grants[0].app: app capabilities are not supported",
        ),
        ('src = ["*"]\ndst = ["*"]\nip = []\n', "grants[0].ip: empty"),
        ('src = ["*"]\ndst = ["*"]\n', "grants[0].ip: missing"),
        ('src = ["*"]\ndst = ["*"]\nip = ["icmp"]\n', 'grants[0].ip[0]: bad port "icmp"'),
        ('src = ["*"]\ndst = ["*"]\nip = ["tcp:0"]\n', "the first port must be > 0"),
        ('src = ["*"]\ndst = ["0.0.0.0/0"]\nip = ["*"]\n', 'use "*" or "autogroup:internet"'),
        ('src = ["*"]\ndst = ["10.0.0.0/8"]\nip = ["*"]\nvia = ["alice"]\n', "via can only be a tag"),
        ('src = ["*"]\ndst = ["*"]\nip = ["bogus:22"]\n', 'unknown protocol "bogus"'),
    ],
)
def test_bad_grants_are_refused_with_one_line_naming_the_key(grant: str, says: str) -> None:
    errs = errors_of(TAGS + "[[grants]]\n" + grant)
    assert len(errs) == 1
    assert says in errs[0]


def test_grant_via_routes_the_destination_prefix_through_the_named_routers_only() -> None:
    pol = parse_policy(
        TAGS + '"tag:ha" = ["alice"]\n'
        '[[grants]]\nsrc = ["tag:client"]\ndst = ["10.33.0.0/16"]\nip = ["tcp:443"]\nvia = ["tag:router"]\n'
    )
    client = node(1, tags=("tag:client",))
    via = node(2, tags=("tag:router",), routes=("10.33.0.0/16",))
    other = node(3, tags=("tag:ha",), routes=("10.33.0.0/16",))
    c = Compiler(pol, [client, via, other])
    assert c.peers(1) == {2}
    assert c.filter(2)[0].dst == (("10.33.0.0/16", 443, 443),)
    assert c.filter(3) == ()


def test_incremental_equals_full_with_routes_grants_and_star() -> None:
    pol = parse_policy(
        TAGS
        + acl('"*"', '"tag:server:22"')
        + acl('"10.0.0.0/8"', '"alice:80"')
        + '[[grants]]\nsrc = ["tag:client"]\ndst = ["10.0.0.0/8"]\nip = ["*"]\nvia = ["tag:router"]\n'
    )
    nodes = [
        node(1, tags=("tag:server",)),
        node(2, tags=("tag:router",), routes=("10.1.0.0/16",)),
        node(3, tags=("tag:client",)),
        node(4, "alice"),
        node(5, tags=("tag:router",), routes=("10.2.0.0/16", "192.168.0.0/24")),
    ]
    inc = Compiler(pol, nodes[:2])
    for n in nodes[2:]:
        inc.upsert(n)
    inc.upsert(node(2, tags=("tag:router",), routes=("10.9.0.0/16",)))  # a route change
    inc.remove(5)
    final = [nodes[0], node(2, tags=("tag:router",), routes=("10.9.0.0/16",)), nodes[2], nodes[3]]
    full = Compiler(pol, final)
    for n in final:
        assert inc.peers(n.id) == full.peers(n.id)
        assert inc.filter(n.id) == full.filter(n.id)


# -- import and diff ------------------------------------------------------------------------------------

HUJSON = """
// a Tailscale policy, as people write them
{
  "groups": {"group:eng": ["alice@example.com", "bob@",],},
  "tagOwners": {"tag:server": ["group:eng"], "tag:router": ["alice@example.com"]},
  "hosts": {"db": "100.64.0.10"},
  "acls": [
    {"action": "accept", "src": ["group:eng"], "dst": ["tag:server:22", "db:5432"]}, // ssh and the db
    {"action": "accept", "src": ["autogroup:admin"], "dst": ["*:*"]},
  ],
  "grants": [{"src": ["tag:server"], "dst": ["db"], "ip": ["tcp:5432"], "app": {"example.com/cap/x": [{}]}}],
  "autoApprovers": {"routes": {"10.0.0.0/8": ["tag:router"]}, "exitNode": ["tag:router"]},
  "ssh": [{"action": "accept", "src": ["group:eng"], "dst": ["tag:server"], "users": ["root"]}],
  "nodeAttrs": [],
  "tests": [{"src": "bob@", "accept": ["tag:server:22", "100.64.0.10:5432"], "deny": ["tag:server:80"]}],
}
"""


def test_import_turns_hujson_into_toml_and_lists_what_it_cannot_express() -> None:
    imported = tsimport.convert(HUJSON, "policy.hujson")
    assert imported.unsupported == [
        "ssh: SSH rules (ghostlink runs no SSH server): not supported",
        "nodeAttrs: node attributes: not supported",
        "acls[1].src[0]: autogroup:admin is not supported",
        "grants[0].app: app capabilities are not supported (ip grants only)",
    ]
    pol = parse_policy(imported.toml)
    assert pol.groups["group:eng"] == frozenset({"alice@example.com", "bob"})
    assert pol.auto_exit[0].tag == "tag:router"
    # round trip: the file's own tests give the same decisions here
    assert run_tests(pol) == (3, [])
    assert not check(pol, "bob", "tag:server:80").allowed


def test_import_refuses_what_is_not_a_policy_with_one_line() -> None:
    with pytest.raises(ValueError, match="not a HuJSON policy file"):
        tsimport.convert("{ acls: [ }")
    with pytest.raises(ValueError, match="top level must be an object"):
        tsimport.convert("[1, 2]")


def test_diff_lists_pairs_that_gain_or_lose_access_and_peers() -> None:
    old = parse_policy(TAGS + acl('"alice"', '"tag:server:22"'))
    new = parse_policy(TAGS + acl('"alice"', '"tag:server:22,443"') + acl('"bob"', '"alice:80"'))
    nodes = [node(1), node(2, "bob"), node(3, tags=("tag:server",))]
    pairs, peers = policy_diff.diff(old, new, nodes)
    got = {(c.src, c.dst): ([policy_diff.grant_text(g) for g in c.gained], c.lost) for c in pairs}
    assert got == {
        ("n1", "n3"): (
            [
                "tcp:443 100.64.0.3/32",
                "tcp:443 fd7a:115c:a1e0::3/128",
                "udp:443 100.64.0.3/32",
                "udp:443 fd7a:115c:a1e0::3/128",
            ],
            (),
        ),
        ("n2", "n1"): (
            [
                "icmp 100.64.0.1/32",
                "ipv6-icmp fd7a:115c:a1e0::1/128",
                "tcp:80 100.64.0.1/32",
                "tcp:80 fd7a:115c:a1e0::1/128",
                "udp:80 100.64.0.1/32",
                "udp:80 fd7a:115c:a1e0::1/128",
            ],
            (),
        ),
    }
    assert [(p.node, p.peer, p.visible) for p in peers] == [("n1", "n2", True), ("n2", "n1", True)]
    assert policy_diff.diff(old, old, nodes) == ([], [])
