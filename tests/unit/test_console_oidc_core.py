"""The pure parts of the console's OIDC login for admins: who ``console.oidc_admins`` admits and as which
audit actor, the logins in progress (state bound to the browser's pre-login cookie, used once, capped),
the config checks, and the login page's link."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ghostcore.errors import AuthError, ConfigError, ResourceExhausted
from ghostmesh import console_pages as pages
from ghostmesh.config import load_config
from ghostmesh.console_core import OidcLogins
from ghostmesh.oidc_core import admin_actor, admin_match, new_cookie

T0 = 1_700_000_000.0

ALICE: dict[str, Any] = {
    "sub": "248289761001",
    "email": "Alice@Example.com",
    "email_verified": True,
    "preferred_username": "alice",
}


# -- who may administer --------------------------------------------------------------------------------


def test_an_empty_allow_list_admits_no_one() -> None:
    assert admin_match(ALICE, ["admins"], []) is None


def test_a_verified_email_admits_case_insensitively() -> None:
    match = admin_match(ALICE, [], ["bob@example.com", "alice@example.COM"])
    assert match is not None
    assert (match.actor, match.entry) == ("oidc:alice@example.com", "alice@example.COM")


@pytest.mark.parametrize(
    "claims",
    [
        {**ALICE, "email_verified": False},
        {**ALICE, "email_verified": "false"},
        {k: v for k, v in ALICE.items() if k != "email_verified"},  # the provider does not say: not enough
        {k: v for k, v in ALICE.items() if k != "email"},
    ],
)
def test_an_email_the_provider_did_not_verify_admits_no_one(claims: dict[str, Any]) -> None:
    assert admin_match(claims, [], ["alice@example.com"]) is None
    match = admin_match(claims, [], ["alice@example.com", f"sub:{ALICE['sub']}"])  # its sub still does
    assert match is not None
    assert match.actor == f"oidc:sub:{ALICE['sub']}"  # and the actor is not the unverified address


def test_a_group_admits_its_members_as_the_provider_spells_it() -> None:
    match = admin_match(ALICE, ["staff", "Mesh-Admins"], ["group:Mesh-Admins"])
    assert match is not None
    assert (match.actor, match.entry) == ("oidc:alice@example.com", "group:Mesh-Admins")
    assert admin_match(ALICE, ["mesh-admins"], ["group:Mesh-Admins"]) is None
    assert admin_match(ALICE, [], ["group:Mesh-Admins"]) is None


def test_a_sub_admits_that_account_only() -> None:
    assert admin_match(ALICE, [], ["sub:248289761001"]) is not None
    assert admin_match({**ALICE, "sub": "248289761002"}, [], ["sub:248289761001"]) is None


def test_the_user_name_claims_never_admit() -> None:
    # preferred_username is neither unique nor stable (OpenID Connect Core section 5.7): an entry that
    # looks like a name matches nothing (and the config refuses it, below)
    assert admin_match(ALICE, [], ["alice"]) is None
    assert admin_match({**ALICE, "email": "alice"}, [], ["alice"]) is None


def test_the_actor_is_one_printable_line() -> None:
    assert admin_actor({"sub": "a\nb\x1b[31m", "email_verified": True}) == "oidc:sub:a?b?[31m"


# -- logins in progress ----------------------------------------------------------------------------------


def test_a_login_is_taken_once_in_the_browser_that_started_it() -> None:
    logins = OidcLogins(timeout=600, max_pending=100, max_per_source=10)
    cookie = new_cookie()
    login = logins.start(cookie, "192.0.2.1", T0)
    assert len({login.state, login.nonce, login.verifier}) == 3
    assert len(login.state) >= 43
    assert 43 <= len(login.verifier) <= 128  # RFC 7636 section 4.1
    for secret in (login.state, login.nonce, login.verifier, cookie):
        assert secret not in repr(login)
    assert logins.take(login.state, cookie, T0 + 1) is login
    assert logins.take(login.state, cookie, T0 + 2) is None  # replayed: unknown now
    assert len(logins) == 0


def test_a_forged_state_is_unknown() -> None:
    logins = OidcLogins(timeout=600, max_pending=100, max_per_source=10)
    cookie = new_cookie()
    login = logins.start(cookie, "192.0.2.1", T0)
    assert logins.take(login.state[:-1] + "x", cookie, T0) is None
    assert logins.take("", cookie, T0) is None
    assert logins.take(login.state, cookie, T0) is login  # the real one is untouched


@pytest.mark.parametrize("cookie", ["", "another-browsers-cookie"])
def test_a_state_in_a_browser_without_its_cookie_is_refused_and_kept(cookie: str) -> None:
    logins = OidcLogins(timeout=600, max_pending=100, max_per_source=10)
    mine = new_cookie()
    login = logins.start(mine, "192.0.2.1", T0)
    with pytest.raises(AuthError, match="this browser did not start this login"):
        logins.take(login.state, cookie, T0)
    assert logins.take(login.state, mine, T0) is login  # its own browser may still finish it


def test_a_login_expires() -> None:
    logins = OidcLogins(timeout=600, max_pending=100, max_per_source=10)
    cookie = new_cookie()
    login = logins.start(cookie, "192.0.2.1", T0)
    assert logins.take(login.state, cookie, T0 + 600) is None
    assert len(logins) == 0


def test_logins_in_progress_are_capped_per_source_and_in_all() -> None:
    logins = OidcLogins(timeout=600, max_pending=3, max_per_source=2)
    c1, c2, c3 = new_cookie(), new_cookie(), new_cookie()
    first = logins.start(c1, "192.0.2.1", T0)
    second = logins.start(c2, "192.0.2.1", T0 + 1)
    third = logins.start(c3, "192.0.2.1", T0 + 2)  # over the source's cap: its oldest goes
    assert len(logins) == 2
    assert logins.take(first.state, c1, T0 + 3) is None
    logins.start(new_cookie(), "192.0.2.2", T0 + 3)
    with pytest.raises(ResourceExhausted, match=r"\(oidc\.max_pending\)"):
        logins.start(new_cookie(), "192.0.2.3", T0 + 3)
    assert len(logins) == 3
    assert logins.take(second.state, c2, T0 + 4) is second
    assert logins.take(third.state, c3, T0 + 4) is third
    logins.start(new_cookie(), "192.0.2.3", T0 + 604)  # the rest expired
    assert len(logins) == 1


def test_a_browser_starting_again_replaces_its_own_login() -> None:
    logins = OidcLogins(timeout=600, max_pending=100, max_per_source=10)
    cookie = new_cookie()
    old = logins.start(cookie, "192.0.2.1", T0)
    new = logins.start(cookie, "192.0.2.1", T0 + 1)
    assert len(logins) == 1
    assert logins.take(old.state, cookie, T0 + 2) is None
    assert logins.take(new.state, cookie, T0 + 2) is new


# -- config ----------------------------------------------------------------------------------------------

OIDC = '[oidc]\nissuer = "https://login.example.com"\nclient_id = "ghostmesh"\n'
CONSOLE = '[console]\nlisten = "127.0.0.1:8080"\npublic_url = "https://console.example.com"\n'


def _load(tmp_path: Path, text: str) -> Any:
    p = tmp_path / "ghostmesh.toml"
    p.write_text(text)
    return load_config(p, environ={})


def test_oidc_admins_load(tmp_path: Path) -> None:
    admins = '["alice@example.com", "group:mesh-admins", "sub:248289761001"]'
    cfg = _load(tmp_path, f"{CONSOLE}oidc_admins = {admins}\n{OIDC}")
    assert cfg.console.oidc_admins == ["alice@example.com", "group:mesh-admins", "sub:248289761001"]
    assert cfg.server.auth_method == "authkey"  # the admins' login needs no OIDC for nodes
    assert _load(tmp_path, CONSOLE).console.oidc_admins == []  # off by default


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            f'{CONSOLE}oidc_admins = ["alice"]\n{OIDC}',
            r"oidc_admins\[0\]: expected a verified email",
        ),
        (f'{CONSOLE}oidc_admins = ["a@b.c", "group:"]\n{OIDC}', r"console\.oidc_admins\[1\]: expected"),
        (f'{CONSOLE}oidc_admins = ["user:alice"]\n{OIDC}', r"console\.oidc_admins\[0\]: expected"),
        (f'{CONSOLE}oidc_admins = [" a@b.c"]\n{OIDC}', r"console\.oidc_admins\[0\]: expected"),
        (f'{CONSOLE}oidc_admins = ["a@b@c.d"]\n{OIDC}', r"console\.oidc_admins\[0\]: expected"),
        (f'{CONSOLE}oidc_admins = ["a@localhost"]\n{OIDC}', r"console\.oidc_admins\[0\]: expected"),
        (f"{CONSOLE}oidc_admins = ['[\"a@b.c\"]']\n{OIDC}", r"console\.oidc_admins\[0\]: expected"),
        (f'{CONSOLE}oidc_admins = ["sub: x"]\n{OIDC}', r"console\.oidc_admins\[0\]: expected"),
        (
            f'[console]\nlisten = "127.0.0.1:8080"\noidc_admins = ["a@b.c"]\n{OIDC}',
            r"console\.public_url: required when console\.oidc_admins is set",
        ),
        (
            f'[console]\npublic_url = "https://c.example.com"\noidc_admins = ["a@b.c"]\n{OIDC}',
            r"console\.oidc_admins: set, but console\.listen is empty",
        ),
        (f'{CONSOLE}oidc_admins = ["a@b.c"]\n', r"oidc\.issuer: required when console\.oidc_admins is set"),
        (
            f"{CONSOLE.replace('https://console.example.com', 'https://c.example.com/console')}",
            r"console\.public_url: expected the console's origin",
        ),
        (
            f"{CONSOLE.replace('https://console.example.com', 'ftp://c.example.com')}",
            r"console\.public_url: expected the console's origin",
        ),
        (
            f'{CONSOLE.replace("https://", "http://")}oidc_admins = ["a@b.c"]\n{OIDC}',
            r"console\.public_url: must be https:// .*set oidc\.allow_insecure_http = true only for tests",
        ),
    ],
)
def test_bad_oidc_admin_config_is_one_line_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        _load(tmp_path, text)
    assert "\n" not in str(info.value)


def test_plain_http_public_url_only_with_allow_insecure_http(tmp_path: Path) -> None:
    text = f'{CONSOLE.replace("https://", "http://")}oidc_admins = ["a@b.c"]\n{OIDC}'
    cfg = _load(tmp_path, text + "allow_insecure_http = true\n")
    assert cfg.console.public_url == "http://console.example.com"


# -- the login page --------------------------------------------------------------------------------------


def test_login_page_links_to_the_provider_only_when_configured() -> None:
    assert 'id="oidc-login"' not in pages.login_page()
    page = pages.login_page(oidc_url="https://c.example.com/login/oidc", oidc_name='<b>"x"</b>')
    assert '<a class="button" id="oidc-login" href="https://c.example.com/login/oidc">' in page
    assert "Log in with &lt;b&gt;&quot;x&quot;&lt;/b&gt;" in page
    assert 'id="api_key"' in page  # the API key form stays


def test_logged_in_page_escapes_the_actor_and_goes_on_to_the_nodes() -> None:
    page = pages.logged_in_page('oidc:<script>"')
    assert "oidc:&lt;script&gt;&quot;" in page
    assert '<meta http-equiv="refresh" content="0;url=/nodes">' in page
    assert "<script>" not in page.replace('<script src="/static/console.js" defer></script>', "")
