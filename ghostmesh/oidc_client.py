"""The OpenID provider as ghostmesh's relying party sees it: discovery, the authorization request, the code
exchange and the ID token check. One instance per server, shared by both logins that use ``[oidc]``: the
nodes' (:mod:`ghostmesh.oidc`) and the web console's admins' (:mod:`ghostmesh.console_oidc`), so both
verify tokens with the same code and the same cached signing keys.

OpenID Connect Core 1.0, section 3.1 (Authorization Code Flow) with PKCE (RFC 7636):

- :meth:`OidcProvider.discover` reads ``<issuer>/.well-known/openid-configuration`` (OpenID Connect
  Discovery 1.0 section 4) and the JWKS once, at start; a failure is one line and stops the start.
- :meth:`OidcProvider.authorization_url`: ``response_type=code``, ``scope``, ``state``, ``nonce`` and
  ``code_challenge`` S256 for the caller's ``redirect_uri``.
- :meth:`OidcProvider.callback_claims`: the provider's redirect back (``code`` or ``error``), the code
  exchanged at the token endpoint with the PKCE verifier (client_secret_basic; plain httpx: authlib 1.9's
  httpx integration raises a DeprecationWarning at import, which our warnings-as-errors runs reject), and
  the ID token validated (section 3.1.3.7): signature against the provider's JWKS, ``iss``, ``aud`` =
  client id, ``exp``/``iat`` and ``nonce``. A token signed with a key the JWKS in hand lacks makes the
  provider's keys be fetched again, at most once per ``oidc.jwks_refresh_interval`` (section 10.1.1,
  :class:`ghostmesh.oidc_core.JwksCache`).

Every failure is an ``AuthError`` with one line that quotes nothing secret: the client secret, codes,
tokens, ``state`` and nonces never reach a message or a log.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

import httpx
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from authlib.oidc.core import CodeIDToken
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from joserfc.jws import JWSRegistry

from ghostcore.errors import AuthError, ConfigError, Unavailable
from ghostmesh.config import OidcConfig
from ghostmesh.oidc_core import JwksCache, one_line

log = logging.getLogger(__name__)

HTTP_TIMEOUT = 10.0  # seconds, for each request to the provider
LEEWAY = 60  # seconds of clock skew accepted on exp / iat


class OidcProvider:
    """The provider's metadata and signing keys, and the requests made to it."""

    def __init__(self, cfg: OidcConfig, clock: Callable[[], float]) -> None:
        self.cfg = cfg
        self.clock = clock
        self.metadata: dict[str, Any] = {}
        self.jwks = JwksCache(cfg.jwks_refresh_interval)
        self._jwks_lock = asyncio.Lock()  # one JWKS fetch at a time; the others use its result
        self._secret = cfg.secret()

    def __repr__(self) -> str:  # the client secret stays out
        return f"OidcProvider(issuer={self.cfg.issuer!r}, client_id={self.cfg.client_id!r})"

    async def discover(self) -> None:
        """Read the provider's metadata and keys; Unavailable / ConfigError (one line) otherwise."""
        issuer = self.cfg.issuer.rstrip("/")
        url = issuer + "/.well-known/openid-configuration"
        try:
            async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
                resp = await http.get(url)
                resp.raise_for_status()
                meta = resp.json()
                jwks = (await http.get(meta["jwks_uri"])).raise_for_status().json()
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            raise Unavailable(
                f"oidc.issuer: discovery at {url} failed ({type(exc).__name__}: {exc})"
            ) from None
        named = meta.get("issuer") if isinstance(meta, dict) else None
        if not isinstance(named, str) or named.rstrip("/") != issuer:
            raise ConfigError(f"oidc.issuer: {url} names issuer {named!r}, not {issuer!r}")
        for key in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            if not isinstance(meta.get(key), str):
                raise Unavailable(f"oidc.issuer: discovery at {url} lacks {key}")
        self.jwks.attempted(self.clock())
        try:
            self.jwks.install(jwks)
        except ValueError as exc:
            raise Unavailable(f"oidc.issuer: {exc} ({meta['jwks_uri']})") from None
        self.metadata = meta

    @property
    def authorization_endpoint(self) -> str:
        return str(self.metadata["authorization_endpoint"])

    def authorization_url(self, redirect_uri: str, state: str, nonce: str, verifier: str) -> str:
        """Where the browser goes to log in (OpenID Connect Core 1.0 section 3.1.2.1; RFC 7636 section
        4.3): the provider comes back to ``redirect_uri`` with ``state``."""
        return str(
            prepare_grant_uri(
                self.authorization_endpoint,
                self.cfg.client_id,
                "code",
                redirect_uri=redirect_uri,
                scope=" ".join(self.cfg.scopes),
                state=state,
                nonce=nonce,
                code_challenge=create_s256_code_challenge(verifier),
                code_challenge_method="S256",
            )
        )

    async def callback_claims(
        self, query: Mapping[str, str], verifier: str, nonce: str, redirect_uri: str
    ) -> Mapping[str, Any]:
        """The verified ID token claims of the provider's redirect back (its ``query``); AuthError (one
        line) for a refusal by the provider, a failed exchange or a token that does not verify."""
        if "error" in query:
            raise AuthError(f"the provider refused the login: {one_line(query['error'])}")
        code = query.get("code", "")
        if not code:
            raise AuthError("the provider sent no authorization code")
        token = await self._exchange(code, verifier, redirect_uri)
        return await self._validate_id_token(token, nonce)

    async def _exchange(self, code: str, verifier: str, redirect_uri: str) -> Mapping[str, Any]:
        """The token request (RFC 6749 section 4.1.3, client_secret_basic; RFC 7636 section 4.5)."""
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": verifier,
        }
        try:
            async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
                resp = await http.post(
                    self.metadata["token_endpoint"], data=form, auth=(self.cfg.client_id, self._secret)
                )
            token = resp.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise AuthError(f"code exchange at the provider failed ({type(exc).__name__})") from None
        if resp.status_code != 200 or not isinstance(token, dict):
            err = token.get("error", resp.status_code) if isinstance(token, dict) else resp.status_code
            raise AuthError(f"the provider refused the code exchange ({one_line(str(err))})")
        return token

    async def _signing_keys(self, id_token: str) -> KeySet:
        """The provider's keys, fetched again when the token names a ``kid`` they lack (at most once per
        ``oidc.jwks_refresh_interval``; the keys in hand stay until a new set arrives)."""
        try:
            header = jws.extract_compact(id_token.encode()).headers()
        except (JoseError, ValueError) as exc:
            raise AuthError(f"the ID token is not valid ({type(exc).__name__})") from None
        kid = header.get("kid")
        kid = kid if isinstance(kid, str) else None
        async with self._jwks_lock:
            if not self.jwks.knows(kid):
                await self._refetch_jwks(kid)
            if self.jwks.keys is None:  # pragma: no cover - discover() installs a set or fails
                raise Unavailable("the provider's keys are not loaded; restart ghostmesh")
            return self.jwks.keys

    async def _refetch_jwks(self, kid: str | None) -> None:
        now = self.clock()
        shown = repr(one_line(kid, 64)) if kid is not None else "none"
        if not self.jwks.may_fetch(now):
            raise AuthError(
                f"the ID token is signed by a key the provider did not publish (kid {shown}); its keys are "
                f"fetched again at most every {self.cfg.jwks_refresh_interval:g} s, retry in "
                f"{max(1, round(self.jwks.retry_in(now)))} s"
            )
        self.jwks.attempted(now)
        url = self.metadata["jwks_uri"]
        try:
            async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
                self.jwks.install((await http.get(url)).raise_for_status().json())
        except (httpx.HTTPError, ValueError) as exc:  # the keys in hand stay in force
            log.warning("oidc: fetching the provider's keys from %s failed (%s)", url, type(exc).__name__)
        else:
            log.info("oidc: fetched the provider's keys again (a token named kid %s)", shown)
        if not self.jwks.knows(kid):
            raise AuthError(f"the ID token is signed by a key the provider does not publish (kid {shown})")

    async def _validate_id_token(self, token: Mapping[str, Any], nonce: str) -> Mapping[str, Any]:
        """OpenID Connect Core 1.0 section 3.1.3.7: signature, iss, aud, exp/iat, nonce."""
        id_token = token.get("id_token")
        if not isinstance(id_token, str):
            raise AuthError("the provider returned no ID token")
        keys = await self._signing_keys(id_token)
        algs = self.metadata.get("id_token_signing_alg_values_supported") or ["RS256"]
        try:
            decoded = jwt.decode(id_token, keys, registry=JWSRegistry(algorithms=algs))
            claims = CodeIDToken(
                decoded.claims,
                decoded.header,
                {"iss": {"essential": True, "value": self.metadata["issuer"]}},
                {"nonce": nonce, "client_id": self.cfg.client_id, "access_token": token.get("access_token")},
            )
            claims.validate(leeway=LEEWAY)
        except (JoseError, ValueError, KeyError) as exc:
            what = getattr(exc, "claim", "") or type(exc).__name__
            raise AuthError(f"the ID token is not valid ({one_line(f'{what}: {exc}', 200)})") from None
        if not isinstance(claims.get("sub"), str) or not claims["sub"]:
            raise AuthError("the ID token is not valid (sub: missing)")
        return dict(claims)
