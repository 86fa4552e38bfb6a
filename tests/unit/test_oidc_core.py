"""OIDC pieces without a provider: config validation, pending-login bookkeeping and the browser binding,
claims -> user/groups, State.register_oidc and user bindings, and "oidc:<group>" members of policy groups.
The allow-lists, the JWKS cache and the pages: tests/unit/test_oidc_guard.py."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from ghostcore.errors import (
    AuthError,
    ConfigError,
    Conflict,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from ghostcore.keys import PrivateKey
from ghostcore.policy import Compiler, NodeIdent, PolicyError, parse_policy
from ghostmesh.changes import NodeAdded, NodeChanged
from ghostmesh.config import OidcConfig, load_config
from ghostmesh.mapper import Mapper
from ghostmesh.oidc import PendingLogins, groups_from_claims, username_from_claims
from ghostmesh.oidc_core import PendingLogin, csrf_token, new_cookie, peer_address
from ghostmesh.state import State, StateConfig
from ghostmesh.store.base import NodeRec, UserRec
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
public_url = "https://login.mesh.example.com"
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
        ('public_url = "https://login.mesh.example.com"\n', "", r"oidc\.public_url: required"),
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


def _confirmed(book: PendingLogins, login: PendingLogin, now: float) -> str:
    """Confirm ``login`` as a browser would; its cookie."""
    cookie = new_cookie()
    assert book.confirm(login.id, cookie, csrf_token(login, cookie), now) is login
    return cookie


def test_pending_logins_bookkeeping() -> None:
    book = PendingLogins(timeout=60.0, max_pending=10, max_per_source=10)
    a = book.create("key-a", "laptop", "192.0.2.1", T0, "ipv4:192.0.2.1:40000")
    assert (a.node_key, a.hostname, a.remote, a.created, a.expires) == (
        "key-a", "laptop", "192.0.2.1", T0, T0 + 60,
    )  # fmt: skip
    assert len({a.id, a.state, a.nonce, a.verifier}) == 4
    assert 43 <= len(a.verifier) <= 128  # RFC 7636 section 4.1
    assert all(secret not in repr(a) for secret in (a.state, a.nonce, a.verifier, repr(a.csrf_key)))
    assert book.get(a.id, T0 + 1) is a
    assert book.for_node("key-a", T0 + 1) is a
    again = book.create("key-a", "laptop", "192.0.2.1", T0 + 2)  # join run again: the old login is gone
    assert book.get(a.id, T0 + 2) is None
    assert book.by_state(a.state, T0 + 2) is None
    assert len(book) == 1
    cookie = _confirmed(book, again, T0 + 2)
    assert book.take(again.state, cookie, T0 + 3) is again
    assert book.take(again.state, cookie, T0 + 3) is None  # single use
    assert len(book) == 0


def test_pending_logins_expire() -> None:
    book = PendingLogins(timeout=60.0, max_pending=10, max_per_source=10)
    a = book.create("key-a", "h", "192.0.2.1", T0)
    b = book.create("key-b", "h", "192.0.2.1", T0 + 30)
    cookie = _confirmed(book, a, T0 + 1)
    assert book.get(a.id, T0 + 60) is None
    assert book.take(a.state, cookie, T0 + 61) is None  # expired state: refused, and dropped
    assert book.expire(T0 + 61) == []
    assert book.expire(T0 + 90) == [b]
    assert len(book) == 0


def test_confirmation_needs_the_cookie_and_its_token_once() -> None:
    """The CSRF token is bound to the login and to the browser's cookie: a token read from the page by
    someone else (who got another cookie) or made for another login does not confirm; nor does a second
    post."""
    book = PendingLogins(timeout=60.0, max_pending=10, max_per_source=10)
    a = book.create("key-a", "h", "192.0.2.1", T0)
    b = book.create("key-b", "h", "192.0.2.1", T0)
    victim, attacker = new_cookie(), new_cookie()
    assert csrf_token(a, victim) != csrf_token(a, attacker) != csrf_token(b, attacker)
    for cookie, token in (
        ("", csrf_token(a, attacker)),  # another site's form post: no cookie rides along
        (victim, csrf_token(a, attacker)),  # the attacker's token, the victim's cookie
        (victim, csrf_token(b, victim)),  # another login's token
        (victim, ""),
    ):
        with pytest.raises(AuthError, match="stale or was not opened in this browser"):
            book.confirm(a.id, cookie, token, T0 + 1)
        assert not a.confirmed
    with pytest.raises(AuthError, match="unknown or expired login"):
        book.confirm("no-such-id", victim, csrf_token(a, victim), T0 + 1)
    with pytest.raises(AuthError, match="unknown or expired login"):
        book.confirm(a.id, victim, csrf_token(a, victim), T0 + 60)
    assert book.confirm(a.id, victim, csrf_token(a, victim), T0 + 1) is a
    with pytest.raises(AuthError, match="confirmed already"):
        book.confirm(a.id, victim, csrf_token(a, victim), T0 + 2)


def test_callback_needs_the_browser_that_confirmed() -> None:
    book = PendingLogins(timeout=60.0, max_pending=10, max_per_source=10)
    a = book.create("key-a", "h", "192.0.2.1", T0)
    with pytest.raises(AuthError, match="this browser did not confirm the login"):
        book.take(a.state, new_cookie(), T0 + 1)  # never confirmed: the state cannot be used
    cookie = _confirmed(book, a, T0 + 1)
    for other in ("", new_cookie()):
        with pytest.raises(AuthError, match="this browser did not confirm the login"):
            book.take(a.state, other, T0 + 2)
    assert len(book) == 1  # the login stays for its own browser
    assert book.take("forged", cookie, T0 + 2) is None
    assert book.take(a.state, cookie, T0 + 2) is a


def test_peer_address() -> None:
    assert peer_address("ipv4:192.0.2.1:40000") == "192.0.2.1"
    assert peer_address("ipv6:%5B2001:db8::1%5D:40000") == "2001:db8::1"
    assert peer_address("unix:/run/x.sock") == "unix:/run/x.sock"


def test_pending_logins_are_capped_per_source_and_in_all() -> None:
    book = PendingLogins(timeout=60.0, max_pending=3, max_per_source=2)
    book.create("a1", "h", "192.0.2.1", T0)
    a2 = book.create("a2", "h", "192.0.2.1", T0)
    with pytest.raises(ResourceExhausted, match=r"from 192\.0\.2\.1 \(2, oidc\.max_pending_per_source\)"):
        book.create("a3", "h", "192.0.2.1", T0)
    assert book.create("a2", "h", "192.0.2.1", T0 + 1) is not a2  # join run again: a replacement fits
    book.create("b1", "h", "198.51.100.1", T0)
    with pytest.raises(
        ResourceExhausted, match=r"^too many OIDC logins in progress \(3, oidc\.max_pending\)"
    ):
        book.create("c1", "h", "203.0.113.1", T0)
    assert len(book) == 3  # nothing replaced or made by a refusal
    assert book.for_node("c1", T0) is None
    book.expire(T0 + 61)  # expired logins free their places
    assert book.create("c1", "h", "203.0.113.1", T0 + 61).source == "203.0.113.1"


def test_oidc_caps_are_validated(tmp_path: Path) -> None:
    cfg = load_config(_cfg(tmp_path, OIDC_OK), environ={})
    assert (cfg.oidc.max_pending, cfg.oidc.max_pending_per_source) == (1000, 10)
    with pytest.raises(ConfigError, match=r"oidc\.max_pending_per_source: expected 1\.\.oidc\.max_pending"):
        load_config(_cfg(tmp_path, OIDC_OK + "max_pending = 5\nmax_pending_per_source = 6\n"), environ={})


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


ISS = "https://login.example.com"


def _state(tmp_path: Path, issuer: str = ISS) -> State:
    return State(SqliteStore(tmp_path / "db.sqlite"), StateConfig(key_expiry=1000.0, oidc_issuer=issuer), T0)


def _users(st: State) -> list[UserRec]:
    return list(st.store.list_users())


def test_register_oidc_creates_user_and_node(tmp_path: Path) -> None:
    st = _state(tmp_path)
    node, changes = st.register_oidc(_key(), "laptop", "alice", "sub-1", issuer=ISS, groups=["eng"], now=T0)
    assert (node.user, node.name, node.auth_key_id, node.expires) == ("alice", "laptop", None, T0 + 1000)
    assert changes == [NodeAdded(node, False, frozenset({"eng"}))]  # the records carry the user's groups
    user = st.store.get_user("alice")
    assert user is not None
    assert (user.oidc_issuer, user.oidc_subject, user.groups) == (ISS, "sub-1", ("eng",))
    assert st.groups_of("alice") == frozenset({"eng"})
    # groups survive a restart
    st.store.close()
    assert _state(tmp_path).groups_of("alice") == frozenset({"eng"})


def test_register_oidc_group_change_touches_the_users_nodes(tmp_path: Path) -> None:
    st = _state(tmp_path)
    first, _ = st.register_oidc(_key(), "a", "alice", "sub-1", issuer=ISS, groups=["eng"], now=T0)
    second, changes = st.register_oidc(_key(), "b", "alice", "sub-1", issuer=ISS, groups=["ops"], now=T0 + 1)
    ops = frozenset({"ops"})
    assert changes == [NodeChanged(first, False, ops), NodeAdded(second, False, ops)]  # the new groups
    _, changes = st.register_oidc(_key(), "c", "alice", "sub-1", issuer=ISS, groups=["ops"], now=T0 + 2)
    assert len(changes) == 1  # same groups: only the new node


def test_register_oidc_refuses_other_subject(tmp_path: Path) -> None:
    st = _state(tmp_path)
    st.register_oidc(_key(), "a", "alice", "sub-1", issuer=ISS, groups=[], now=T0)
    before = (list(st.store.list_nodes()), _users(st))
    with pytest.raises(PermissionDenied, match="user 'alice' belongs to another OIDC account"):
        st.register_oidc(_key(), "b", "alice", "sub-2", issuer=ISS, groups=[], now=T0)
    with pytest.raises(PermissionDenied, match="user 'alice' belongs to another OIDC account"):
        st.register_oidc(_key(), "b", "alice", "sub-1", issuer="https://other.example", groups=[], now=T0)
    with pytest.raises(PermissionDenied, match="not a valid ghostmesh user name"):
        st.register_oidc(_key(), "b", "", "sub-9", issuer=ISS, groups=[], now=T0)
    assert (list(st.store.list_nodes()), _users(st)) == before


def test_the_bound_account_is_the_user_whatever_its_name_claim(tmp_path: Path) -> None:
    """Identity is (issuer, sub): an account renamed at the provider stays its user, and a login carrying
    another user's name does not reach that user."""
    st = _state(tmp_path)
    st.register_oidc(_key(), "a", "alice", "sub-1", issuer=ISS, groups=[], now=T0)
    node, _ = st.register_oidc(_key(), "b", "alice.renamed", "sub-1", issuer=ISS, groups=[], now=T0 + 1)
    assert node.user == "alice"
    assert [u.name for u in _users(st)] == ["alice"]


def test_admin_created_user_is_not_taken_over_by_a_login(tmp_path: Path) -> None:
    """Before: the first OIDC account whose name matched an admin-made user (even ``default``) became it."""
    st = _state(tmp_path)
    st.create_user("alice", T0)
    st.create_auth_key(now=T0)  # makes "default"
    before = (list(st.store.list_nodes()), _users(st))
    for name in ("alice", "default"):
        with pytest.raises(PermissionDenied) as info:
            st.register_oidc(_key(), "x", name, "sub-1", issuer=ISS, groups=["eng"], now=T0)
        assert str(info.value) == (
            f"login refused: user {name!r} exists and is bound to no OIDC account; an admin may bind it "
            f"to this account: ghostctl users bind {name} --oidc-subject sub-1 --issuer {ISS}"
        )
    assert (list(st.store.list_nodes()), _users(st)) == before
    assert st.groups_of("alice") == frozenset()
    # a subject that would not paste as one shell word is quoted; one that is not printable is not shown
    with pytest.raises(PermissionDenied, match=r"--oidc-subject 'a b;c' --issuer"):
        st.register_oidc(_key(), "x", "alice", "a b;c", issuer=ISS, groups=[], now=T0)
    with pytest.raises(PermissionDenied, match=r"--oidc-subject SUB --issuer ISSUER$"):
        st.register_oidc(_key(), "x", "alice", "a\nb", issuer=ISS, groups=[], now=T0)


def test_admin_binds_and_unbinds(tmp_path: Path) -> None:
    st = _state(tmp_path)
    st.create_user("alice", T0)
    rec, changed = st.bind_user("alice", "sub-1")  # issuer: the configured one
    assert changed
    assert (rec.oidc_issuer, rec.oidc_subject) == (ISS, "sub-1")
    assert st.bind_user("alice", "sub-1", ISS + "/") == (rec, False)  # the same issuer, spelt with a /
    node, _ = st.register_oidc(_key(), "x", "al", "sub-1", issuer=ISS, groups=["eng"], now=T0)
    assert node.user == "alice"
    assert st.groups_of("alice") == frozenset({"eng"})
    st.create_user("bob", T0)
    with pytest.raises(Conflict, match="bound to user 'alice'; unbind it there first"):
        st.bind_user("bob", "sub-1")
    with pytest.raises(Conflict, match="bound to another OIDC account; `ghostctl users unbind alice` first"):
        st.bind_user("alice", "sub-2")
    for bad, message in (
        ("", "invalid OIDC subject"),
        ("x" * 256, "invalid OIDC subject"),
        ("a\nb", "invalid OIDC subject"),
    ):
        with pytest.raises(InvalidArgument, match=message):
            st.bind_user("bob", bad)
    with pytest.raises(InvalidArgument, match="invalid OIDC issuer"):
        st.bind_user("bob", "sub-3", "login.example.com")
    with pytest.raises(NotFound, match="user 'carol' not found"):
        st.bind_user("carol", "sub-3")
    # unbinding takes the account's groups away: the user's nodes change identity (policy)
    rec, changes = st.unbind_user("alice", T0)
    assert (rec.oidc_issuer, rec.oidc_subject, rec.groups) == ("", None, ())
    assert changes == [NodeChanged(node, False, frozenset())]
    assert st.unbind_user("alice", T0) == (rec, [])
    with pytest.raises(PermissionDenied, match="exists and is bound to no OIDC account"):
        st.register_oidc(_key(), "y", "alice", "sub-1", issuer=ISS, groups=[], now=T0)


def test_create_user_bound_at_once(tmp_path: Path) -> None:
    st = _state(tmp_path)
    rec = st.create_user("alice", T0, oidc_subject="sub-1", oidc_issuer="https://idp.example/")
    assert (rec.oidc_issuer, rec.oidc_subject) == ("https://idp.example", "sub-1")
    with pytest.raises(Conflict):  # the account is alice's: bob is not created either
        st.create_user("bob", T0, oidc_subject="sub-1", oidc_issuer="https://idp.example")
    assert st.store.get_user("bob") is None
    with pytest.raises(InvalidArgument, match="without a subject binds nothing"):
        st.create_user("bob", T0, oidc_issuer="https://idp.example")
    bare = State(SqliteStore(tmp_path / "other.sqlite"), StateConfig(), T0)  # no OIDC configured
    with pytest.raises(InvalidArgument, match=r"pass the account's issuer \(--issuer URL\)"):
        bare.create_user("alice", T0, oidc_subject="sub-1")
    assert bare.store.get_user("alice") is None


def test_legacy_bindings_are_adopted_for_the_configured_issuer(tmp_path: Path) -> None:
    """Bindings stored before issuers were recorded (schema 4) belong to the issuer configured at the first
    start that has one."""
    store = SqliteStore(tmp_path / "db.sqlite")
    store.put_oidc_user("alice", "", "sub-1", ["eng"], T0)
    store.close()
    assert State(SqliteStore(tmp_path / "db.sqlite"), StateConfig(), T0).store.get_user("alice") == UserRec(
        1, "alice", T0, "sub-1", ("eng",), ""
    )  # no issuer configured: left as it is
    st = _state(tmp_path)
    user = st.store.get_user("alice")
    assert user is not None
    assert (user.oidc_issuer, user.oidc_subject) == (ISS, "sub-1")
    node, _ = st.register_oidc(_key(), "a", "whatever", "sub-1", issuer=ISS, groups=[], now=T0)
    assert node.user == "alice"


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


def test_mapper_takes_groups_from_the_records_it_is_given() -> None:
    policy = parse_policy(POLICY)
    m = Mapper(25, policy)
    eng = frozenset({"engineering"})
    m.load([NodeAdded(_rec(1, "srv"), False), NodeAdded(_rec(2, "alice"), False, eng)], T0)
    assert m.compiler.can_see(2, 1)
    m.apply(NodeAdded(_rec(3, "carol"), False), T0)
    assert not m.compiler.can_see(3, 1)
    m.apply(NodeChanged(_rec(3, "carol"), False, eng), T0)  # carol logged in with the group
    assert m.compiler.can_see(3, 1)
    m.apply(NodeChanged(_rec(2, "alice"), False), T0)  # alice left it
    assert not m.compiler.can_see(2, 1)


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
    assert (cfg.oidc.issuer, cfg.oidc.public_url) == (
        "https://login.example.com",
        "https://login.mesh.example.com",
    )
    assert cfg.oidc.login_timeout == 600
    assert cfg.oidc.allowed_domains == ["example.com"]
    assert cfg.oidc.allowed_groups == ["engineering", "ops"]
    assert cfg.oidc.jwks_refresh_interval == 60
