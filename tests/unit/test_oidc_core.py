"""OIDC pieces without a provider: config validation, pending-login bookkeeping, claims -> user/groups,
State.register_oidc, and "oidc:<group>" members of policy groups."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from ghostcore.errors import AuthError, ConfigError
from ghostcore.keys import PrivateKey
from ghostmesh.changes import NodeAdded, NodeChanged
from ghostmesh.config import OidcConfig, load_config
from ghostmesh.mapper import Mapper
from ghostmesh.oidc import PendingLogins, groups_from_claims, username_from_claims
from ghostmesh.policy import Compiler, NodeIdent, PolicyError, parse_policy
from ghostmesh.state import State, StateConfig
from ghostmesh.store.base import NodeRec
from ghostmesh.store.sqlite import SqliteStore

T0 = 1_700_000_000.0


def _key() -> str:
    return PrivateKey.generate().public_key().base64()


def _cfg(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "ghostmesh.toml"
    p.write_text(text)
    return p


OIDC_OK = """
[server]
auth_method = "oidc"
[oidc]
issuer = "https://login.example.com"
client_id = "ghostmesh"
client_secret = "s3cret-value"
public_url = "http://192.0.2.1:7780"
login_timeout = "5m"
"""


def test_config_loads_and_hides_secret(tmp_path: Path) -> None:
    cfg = load_config(_cfg(tmp_path, OIDC_OK), environ={})
    assert cfg.server.auth_method == "oidc"
    assert cfg.oidc.login_timeout == 300
    assert cfg.oidc.scopes == ["openid", "profile", "email", "groups"]
    assert cfg.oidc.secret() == "s3cret-value"
    assert "s3cret-value" not in repr(cfg)


def test_config_secret_file(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("from-file\n")
    text = OIDC_OK.replace('client_secret = "s3cret-value"', f'client_secret_file = "{tmp_path / "secret"}"')
    assert load_config(_cfg(tmp_path, text), environ={}).oidc.secret() == "from-file"
    missing = OidcConfig(client_secret_file=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=r"oidc\.client_secret_file: cannot read"):
        missing.secret()


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('client_id = "ghostmesh"\n', "", r'oidc\.client_id: required when server\.auth_method = "oidc"'),
        ('public_url = "http://192.0.2.1:7780"\n', "", r"oidc\.public_url: required"),
        (
            'issuer = "https://login.example.com"',
            'issuer = "login.example.com"',
            r"oidc\.issuer: expected an http",
        ),
        ('login_timeout = "5m"', 'login_timeout = "1s"', r"oidc\.login_timeout: expected 10s\.\.24h"),
        ('login_timeout = "5m"', 'http_bind = "nowhere"', r"oidc\.http_bind: expected host:port"),
        ('login_timeout = "5m"', 'scopes = ["profile"]', r'oidc\.scopes: must include "openid"'),
        ('login_timeout = "5m"', 'client_secret_file = "/x"', r"oidc\.client_secret_file: set either"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, old: str, new: str, message: str) -> None:
    assert old in OIDC_OK
    with pytest.raises(ConfigError, match=message):
        load_config(_cfg(tmp_path, OIDC_OK.replace(old, new)), environ={})


def test_pending_logins_bookkeeping() -> None:
    book = PendingLogins(timeout=60.0)
    a = book.create("key-a", "laptop", T0)
    assert (a.node_key, a.hostname, a.expires) == ("key-a", "laptop", T0 + 60)
    assert len({a.id, a.state, a.nonce, a.verifier}) == 4
    assert 43 <= len(a.verifier) <= 128  # RFC 7636 section 4.1
    assert all(secret not in repr(a) for secret in (a.state, a.nonce, a.verifier))
    assert book.get(a.id, T0 + 1) is a
    assert book.for_node("key-a", T0 + 1) is a
    again = book.create("key-a", "laptop", T0 + 2)  # join run again: the old login is gone
    assert book.get(a.id, T0 + 2) is None
    assert book.take(a.state, T0 + 2) is None
    assert len(book) == 1
    assert book.take(again.state, T0 + 3) is again
    assert book.take(again.state, T0 + 3) is None  # single use
    assert len(book) == 0


def test_pending_logins_expire() -> None:
    book = PendingLogins(timeout=60.0)
    a = book.create("key-a", "h", T0)
    b = book.create("key-b", "h", T0 + 30)
    assert book.get(a.id, T0 + 60) is None
    assert book.take(a.state, T0 + 61) is None  # expired state: refused
    assert book.expire(T0 + 61) == []  # take removed it already
    assert book.expire(T0 + 90) == [b]
    assert len(book) == 0


def test_username_and_groups_from_claims() -> None:
    assert username_from_claims({"preferred_username": "Alice", "sub": "1"}, "preferred_username") == "alice"
    assert username_from_claims({"email": "Bob.X@Example.com", "sub": "1"}, "preferred_username") == (
        "bob.x-example.com"
    )
    assert username_from_claims({"sub": "abc|123"}, "preferred_username") == "abc-123"
    assert username_from_claims({}, "preferred_username") == ""
    assert groups_from_claims({"groups": ["eng", 3, "", "ops"]}, "groups") == ["eng", "ops"]
    assert groups_from_claims({"roles": "admin"}, "roles") == ["admin"]
    assert groups_from_claims({}, "groups") == []


def _state(tmp_path: Path) -> State:
    return State(SqliteStore(tmp_path / "db.sqlite"), StateConfig(key_expiry=1000.0), T0)


def test_register_oidc_creates_user_and_node(tmp_path: Path) -> None:
    st = _state(tmp_path)
    node, changes = st.register_oidc(_key(), "laptop", "alice", "sub-1", groups=["eng"], now=T0)
    assert (node.user, node.name, node.auth_key_id, node.expires) == ("alice", "laptop", None, T0 + 1000)
    assert changes == [NodeAdded(node, False)]
    user = st.store.get_user("alice")
    assert user is not None
    assert (user.oidc_subject, user.groups) == ("sub-1", ("eng",))
    assert st.groups_of("alice") == frozenset({"eng"})
    # groups survive a restart
    st.store.close()
    assert _state(tmp_path).groups_of("alice") == frozenset({"eng"})


def test_register_oidc_group_change_touches_the_users_nodes(tmp_path: Path) -> None:
    st = _state(tmp_path)
    first, _ = st.register_oidc(_key(), "a", "alice", "sub-1", groups=["eng"], now=T0)
    second, changes = st.register_oidc(_key(), "b", "alice", "sub-1", groups=["ops"], now=T0 + 1)
    assert changes == [NodeChanged(first, False), NodeAdded(second, False)]
    _, changes = st.register_oidc(_key(), "c", "alice", "sub-1", groups=["ops"], now=T0 + 2)
    assert len(changes) == 1  # same groups: only the new node


def test_register_oidc_refuses_other_subject(tmp_path: Path) -> None:
    st = _state(tmp_path)
    st.register_oidc(_key(), "a", "alice", "sub-1", groups=[], now=T0)
    before = (list(st.store.list_nodes()), list(st.store.list_users()))
    with pytest.raises(AuthError, match="user 'alice' belongs to another OIDC account"):
        st.register_oidc(_key(), "b", "alice", "sub-2", groups=[], now=T0)
    with pytest.raises(AuthError, match="this account is bound to user 'alice', not 'bob'"):
        st.register_oidc(_key(), "b", "bob", "sub-1", groups=[], now=T0)
    with pytest.raises(AuthError, match="not a valid ghostmesh user name"):
        st.register_oidc(_key(), "b", "", "sub-9", groups=[], now=T0)
    assert (list(st.store.list_nodes()), list(st.store.list_users())) == before


POLICY = """
[groups]
"group:eng" = ["bob", "oidc:engineering"]

[[acls]]
action = "accept"
src = ["group:eng"]
dst = ["srv:22"]
"""


def _ident(i: int, user: str, groups: frozenset[str] = frozenset()) -> NodeIdent:
    addrs = (ipaddress.ip_address(f"100.64.0.{i}"), ipaddress.ip_address(f"fd7a:115c:a1e0::{i}"))
    return NodeIdent(i, user, frozenset(), addrs, f"n{i}", groups=groups)


def test_policy_oidc_group_member_matches_users_groups() -> None:
    policy = parse_policy(POLICY)
    c = Compiler(
        policy, [_ident(1, "srv"), _ident(2, "alice", frozenset({"engineering"})), _ident(3, "carol")]
    )
    assert c.can_see(2, 1)
    assert not c.can_see(3, 1)
    # carol logs in again and now is in engineering: an identity change, her node gains the server
    delta = c.upsert(_ident(3, "carol", frozenset({"engineering", "x"})))
    assert delta.added == {3: {1}, 1: {3}}
    assert 1 in delta.filters
    assert c.can_see(3, 1)
    delta = c.upsert(_ident(2, "alice"))  # alice left the group
    assert delta.removed == {2: {1}, 1: {2}}


def test_policy_oidc_member_syntax() -> None:
    with pytest.raises(PolicyError, match=r'groups\."group:eng"\[0\]: "oidc:" is not an OIDC group'):
        parse_policy('[groups]\n"group:eng" = ["oidc:"]\n')


def test_mapper_reads_groups_of_users() -> None:
    policy = parse_policy(POLICY)
    m = Mapper(25, policy)
    m.groups_of = lambda user: frozenset({"engineering"}) if user == "alice" else frozenset()
    m.load(((_rec(i, user), False) for i, user in ((1, "srv"), (2, "alice"))), T0)
    assert m.compiler.can_see(2, 1)


def _rec(i: int, user: str) -> NodeRec:
    return NodeRec(
        id=i,
        name=f"n{i}",
        user=user,
        node_key=_key(),
        ipv4=f"100.64.0.{i}",
        ipv6=f"fd7a:115c:a1e0::{i}",
        ephemeral=False,
        tags=(),
        created=T0,
        expires=0,
        last_seen=T0,
        endpoints=(),
        hostname=f"n{i}",
        auth_key_id=None,
    )


def test_example_config_oidc_block_is_valid(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[2] / "configs" / "ghostmesh.toml"
    head, _, block = example.read_text().partition("# [oidc]")
    head = head.replace('# auth_method = "oidc"\nauth_method = "authkey"\n', 'auth_method = "oidc"\n')
    block = "[oidc]" + "\n".join(line.removeprefix("# ") for line in block.splitlines())
    cfg = load_config(_cfg(tmp_path, head + block), environ={})
    assert cfg.server.auth_method == "oidc"
    assert (cfg.oidc.issuer, cfg.oidc.public_url) == ("https://login.example.com", "http://192.0.2.1:7780")
    assert cfg.oidc.login_timeout == 600
