"""TURN REST credentials: the username / password maths ghostmesh mints with and ghostgate checks. Pure.

TURN REST convention (draft-uberti-behave-turn-rest-00 §2.2, coturn's ``use-auth-secret``): the username
is ``"<expiry unix time>:<id>"`` and the password is ``base64(HMAC-SHA1(secret, username))``. A TURN
server holding the same secret recomputes the password from the username alone, so it keeps no user
table, and the expiry inside the username bounds the credentials' life. HMAC-SHA1 is the convention's
choice (coturn interoperates only with it), not ours.

ghostmesh cannot import ghostgate (programs never import each other), so this lives in ghostcore.
"""

from __future__ import annotations

import base64
import hashlib
import hmac


def rest_username(expiry: int, user_id: str) -> str:
    """``"<expiry>:<user_id>"``: the TURN username valid until ``expiry`` (unix seconds)."""
    return f"{expiry}:{user_id}"


def rest_password(secret: bytes, username: str) -> str:
    """The TURN password for ``username``: ``base64(HMAC-SHA1(secret, username))``."""
    return base64.b64encode(hmac.new(secret, username.encode(), hashlib.sha1).digest()).decode()
