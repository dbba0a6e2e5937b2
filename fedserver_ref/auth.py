"""Device enrolment and bearer tokens. Only a token's SHA-256 is stored.

Tokens are 256-bit random strings, so a fast hash is enough: there is no
low-entropy secret to protect against guessing.
"""

from __future__ import annotations

import hashlib
import secrets

from fedclient._exceptions import Unauthorized

__all__ = ["bearer_token", "hash_token", "new_credentials"]


def new_credentials() -> tuple[str, str]:
    """A fresh (device_id, token) pair."""
    return "d-" + secrets.token_hex(8), secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """What the store keeps of a token."""
    return hashlib.sha256(token.encode()).hexdigest()


def bearer_token(authorization: str | None) -> str:
    """The token from an ``Authorization: Bearer ...`` header, or `Unauthorized`."""
    if not authorization:
        raise Unauthorized("missing Authorization header")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("expected 'Authorization: Bearer <token>'")
    return token.strip()
