"""What guards the OIDC login, without a provider: https-only config, the allow-lists, the verified email,
the JWKS cache's refresh rule, and the pages (escaped, no script, CSP)."""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest
from joserfc.jwk import RSAKey

from ghostcore.errors import ConfigError
from ghostmesh.config import OidcConfig, load_config
from ghostmesh.oidc_core import JwksCache, PendingLogins, csrf_token, new_cookie, refusal, verified_email
from ghostmesh.oidc_pages import STYLE, confirm_page, headers, message_page, origin

T0 = 1_700_000_000.0

BASE = """
[server]
auth_method = "oidc"
[oidc]
issuer = "https://login.example.com"
client_id = "ghostmesh"
public_url = "https://mesh.example.com"
"""


def _load(tmp_path: Path, text: str) -> OidcConfig:
    p = tmp_path / "ghostmesh.toml"
    p.write_text(text)
    return load_config(p, environ={}).oidc


# -- config --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ('public_url = "https://mesh.example.com"', 'public_url = "http://192.0.2.1:7780"', "public_url"),
        ('issuer = "https://login.example.com"', 'issuer = "http://login.example.com"', "issuer"),
    ],
)
def test_plain_http_is_refused_unless_allowed(tmp_path: Path, old: str, new: str, key: str) -> None:
    text = BASE.replace(old, new)
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    message = str(info.value)
    assert "\n" not in message
    url = new.partition(" = ")[2].strip('"')
    assert message.endswith(
        f"oidc.{key}: must be https:// (on http the login can be read and changed on the way), got "
        f"'{url}'; set oidc.allow_insecure_http = true only for tests"
    )
    assert getattr(_load(tmp_path, text + "allow_insecure_http = true\n"), key).startswith("http://")


def test_allow_lists_load_and_are_validated(tmp_path: Path) -> None:
    cfg = _load(
        tmp_path,
        BASE + 'allowed_domains = ["example.com"]\nallowed_groups = ["eng"]\nallowed_users = ["alice"]\n'
        'jwks_refresh_interval = "5m"\n',
    )
    lists = (cfg.allowed_domains, cfg.allowed_groups, cfg.allowed_users)
    assert lists == (["example.com"], ["eng"], ["alice"])
    assert cfg.jwks_refresh_interval == 300
    assert _load(tmp_path, BASE).jwks_refresh_interval == 60
    for line, message in (
        ('allowed_domains = ["@example.com"]', r"oidc\.allowed_domains\[0\]: expected a domain such as"),
        ('allowed_domains = [".example.com"]', r"oidc\.allowed_domains\[0\]: expected a domain such as"),
        ('allowed_users = ["alice", " "]', r"oidc\.allowed_users\[1\]: expected a non-empty value"),
        ('allowed_groups = [""]', r"oidc\.allowed_groups\[0\]: expected a non-empty value"),
        ('jwks_refresh_interval = "0s"', r"oidc\.jwks_refresh_interval: expected 1s\.\.24h"),
    ):
        with pytest.raises(ConfigError, match=message):
            _load(tmp_path, BASE + line + "\n")


# -- allow-lists ---------------------------------------------------------------------------------------

ALICE = {
    "sub": "1",
    "email": "Alice@Example.com",
    "email_verified": True,
    "preferred_username": "alice",
    "groups": ["eng"],
}


def test_verified_email() -> None:
    assert verified_email(ALICE) == "alice@example.com"
    assert verified_email({**ALICE, "email_verified": "true"}) == "alice@example.com"
    assert verified_email({"email": "a@example.com"}) == "a@example.com"  # the provider does not say
    for claims in (
        {**ALICE, "email_verified": False},
        {**ALICE, "email_verified": "false"},
        {**ALICE, "email_verified": None},
        {"email": "a@b@example.com"},
        {"email": "no-at-sign"},
        {"email": 5},
        {},
    ):
        assert verified_email(claims) == "", claims


def _cfg(**lists: list[str]) -> OidcConfig:
    return OidcConfig(**lists)  # type: ignore[arg-type]


def test_no_allow_list_admits_everyone() -> None:
    assert refusal({"sub": "x"}, "x", [], _cfg()) is None


def test_allowed_domains_need_a_verified_email_of_that_exact_domain() -> None:
    cfg = _cfg(allowed_domains=["example.com", "Corp.Example"])
    assert refusal(ALICE, "alice", ["eng"], cfg) is None
    assert refusal({**ALICE, "email": "bob@corp.example"}, "bob", [], cfg) is None
    for claims, message in (
        ({**ALICE, "email": "alice@evil.com"}, "login refused: email domain evil.com is not in"),
        ({**ALICE, "email": "alice@mail.example.com"}, "email domain mail.example.com is not in"),
        ({**ALICE, "email": "alice@example.com.evil"}, "email domain example.com.evil is not in"),
        ({**ALICE, "email_verified": False}, "the provider sent no verified email"),
        ({"sub": "1", "preferred_username": "alice@example.com"}, "the provider sent no verified email"),
    ):
        got = refusal(claims, "alice", ["eng"], cfg)
        assert got is not None
        assert got.rule == "allowed_domains"
        assert message in got.message
        assert "\n" not in got.message


def test_allowed_groups_need_one_of_them() -> None:
    cfg = _cfg(allowed_groups=["eng", "ops"])
    assert refusal(ALICE, "alice", ["sales", "ops"], cfg) is None
    got = refusal(ALICE, "alice", ["sales"], cfg)
    assert got is not None
    assert got.message == "login refused: none of this account's groups is in oidc.allowed_groups"
    assert refusal(ALICE, "alice", ["Eng"], cfg) is not None  # groups compare as the provider spells them


def test_allowed_users_match_the_user_name_or_the_verified_email() -> None:
    cfg = _cfg(allowed_users=["Alice", "carol@example.com"])
    assert refusal(ALICE, "alice", [], cfg) is None
    carol = {**ALICE, "email": "carol@example.com", "preferred_username": "c"}
    assert refusal(carol, "c", [], cfg) is None
    assert refusal({**carol, "email_verified": False}, "c", [], cfg) is not None  # unverified: not carol
    got = refusal({**ALICE, "email": "bob@example.com"}, "bob", [], cfg)
    assert got is not None
    assert got.message == "login refused: user bob is not in oidc.allowed_users; ask an admin"


def test_every_configured_list_must_match() -> None:
    cfg = _cfg(allowed_domains=["example.com"], allowed_groups=["eng"], allowed_users=["alice"])
    assert refusal(ALICE, "alice", ["eng"], cfg) is None
    rules = [
        refusal({**ALICE, "email": "alice@other.org"}, "alice", ["eng"], cfg),
        refusal(ALICE, "alice", ["sales"], cfg),
        refusal(ALICE, "bob", ["eng"], cfg),
    ]
    assert [r.rule if r else None for r in rules] == ["allowed_domains", "allowed_groups", "allowed_users"]


# -- JWKS ------------------------------------------------------------------------------------------------


def _jwks(*kids: str) -> dict[str, object]:
    keys = [RSAKey.generate_key(2048, {"kid": kid, "use": "sig"}) for kid in kids]
    return {"keys": [key.as_dict(private=False) for key in keys]}


def test_jwks_cache_fetches_again_at_most_once_per_interval_and_keeps_keys_until_a_new_set() -> None:
    cache = JwksCache(interval=60.0)
    assert not cache.knows(None)
    assert cache.may_fetch(T0)
    cache.attempted(T0)
    cache.install(_jwks("a"))
    assert cache.knows("a")
    assert cache.knows(None)  # no kid: the signature check decides
    assert not cache.knows("b")
    assert not cache.may_fetch(T0 + 59)
    assert cache.retry_in(T0 + 59) == pytest.approx(1.0)
    assert cache.may_fetch(T0 + 60)
    cache.attempted(T0 + 60)
    for bad in ({"keys": []}, {"nope": 1}, "text", {"keys": [{"kty": "nope"}]}):
        with pytest.raises(ValueError, match="JWKS"):
            cache.install(bad)
        assert cache.knows("a")  # a failed fetch leaves the keys in hand
    cache.install(_jwks("b"))
    assert cache.knows("b")
    assert not cache.knows("a")  # the provider withdrew it: no longer trusted
    assert cache.fetches == 2


# -- pages -----------------------------------------------------------------------------------------------


def _login(hostname: str) -> tuple[str, str]:
    book = PendingLogins(timeout=600.0, max_pending=10, max_per_source=10)
    login = book.create("bm9kZWtleQ==", hostname, "192.0.2.7", T0, "ipv4:192.0.2.7:40000")
    token = csrf_token(login, new_cookie())
    return confirm_page(login, token, f"/oidc/login/{login.id}", T0 + 125, "mesh.example.com"), token


def test_confirmation_page_names_the_node_escaped_and_has_no_script() -> None:
    evil = '"><script>alert(1)</script><img src=x onerror=alert(2)>'
    page, token = _login(evil)
    assert "<script" not in page
    assert "<img" not in page
    assert html.escape(evil) in page
    for fact in ("192.0.2.7", "bm9kZWtleQ==", "2023-11-14 22:13:20 UTC (2 min ago)", "mesh.example.com"):
        assert fact in page
    (form,) = re.findall(r"<form[^>]*>", page)
    assert form.startswith('<form method="post" action="/oidc/login/')
    assert f'name="csrf" value="{token}"' in page
    assert re.findall(r"<(\w+)", page).count("style") == 1  # the one block the CSP hash allows
    assert STYLE in page


def test_message_page_is_escaped() -> None:
    page = message_page("Login failed", "login refused: user <b>&x</b> is not in oidc.allowed_users")
    assert '<p id="message">login refused: user &lt;b&gt;&amp;x&lt;/b&gt; is not in' in page


def test_headers_deny_scripts_framing_and_other_form_targets() -> None:
    h = headers((origin("https://idp.example.com:8443/authorize?x=1"),))
    csp = dict(part.strip().split(" ", 1) for part in h["Content-Security-Policy"].split(";"))
    assert csp["default-src"] == "'none'"
    assert csp["style-src"].startswith("'sha256-")
    assert csp["form-action"] == "'self' https://idp.example.com:8443"  # the redirect after the POST too
    assert csp["frame-ancestors"] == "'none'"
    assert "script-src" not in csp  # falls back to default-src 'none'
    assert h["X-Frame-Options"] == "DENY"
    assert h["Referrer-Policy"] == "no-referrer"
    assert h["Cache-Control"] == "no-store"
