"""Device enrolment and bearer tokens. Only a token's SHA-256 is stored.

Tokens are 256-bit random strings, so a fast hash is enough: there is no
low-entropy secret to protect against guessing.

Who may enrol is the server's `EnrolmentPolicy`: anyone (a demo), whoever holds
the app's enrolment secret, whoever holds a single-use code the operator
issued (``fedserver admin codes``), or whatever the operator's verifier accepts
(an attestation token checked with the platform's service). An enrolment that
fails the policy is a 403 and creates nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING

from fedclient._exceptions import Forbidden, Unauthorized

if TYPE_CHECKING:
    from fedclient.server.store import ServerStore

__all__ = ["EnrolmentPolicy", "bearer_token", "hash_token", "matches", "new_credentials"]


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


def matches(secret: str, secret_hash: str) -> bool:
    """Whether ``secret`` hashes to ``secret_hash`` (compared in constant time)."""
    return hmac.compare_digest(hash_token(secret), secret_hash)


class EnrolmentPolicy:
    """Who may enrol a new device (a device enrolling again with its token always may).

    Build one with `open`, `secret`, `codes` or `verifier`."""

    def __init__(
        self,
        kind: str,
        secret_hash: str | None = None,
        check: Callable[[str], bool] | None = None,
    ) -> None:
        self.kind = kind
        self._secret_hash = secret_hash
        self._check = check

    @classmethod
    def open(cls) -> EnrolmentPolicy:
        """Anyone may enrol: a demo, or a closed network. Sybil devices are one request
        each (see the README's threat model)."""
        return cls("open")

    @classmethod
    def secret(cls, secret: str) -> EnrolmentPolicy:
        """Devices that present the app's enrolment secret (kept hashed here)."""
        if len(secret) < 16:
            raise ValueError("an enrolment secret needs at least 16 characters")
        return cls("secret", secret_hash=hash_token(secret))

    @classmethod
    def codes(cls) -> EnrolmentPolicy:
        """Devices that present an unspent code the operator issued (one device each)."""
        return cls("codes")

    @classmethod
    def verifier(cls, check: Callable[[str], bool]) -> EnrolmentPolicy:
        """Devices whose credential ``check`` accepts (e.g. a platform attestation)."""
        return cls("verifier", check=check)

    def admit(self, credential: str | None, device_id: str, store: ServerStore) -> None:
        """Let ``device_id`` enrol with ``credential``, or raise `Forbidden` (a code is
        spent in the caller's transaction)."""
        if self.kind == "open":
            return
        if not credential:
            raise Forbidden(f"enrolment here needs a credential ({self.kind})")
        if self.kind == "secret":
            assert self._secret_hash is not None
            ok = matches(credential, self._secret_hash)
        elif self.kind == "codes":
            ok = store.use_enrolment_code(hash_token(credential), device_id)
        else:
            assert self._check is not None
            ok = bool(self._check(credential))
        if not ok:
            raise Forbidden(f"the enrolment credential was refused ({self.kind})")
