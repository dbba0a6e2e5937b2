"""Device identity: a signing key each device makes and keeps, and who vouches for it.

Secure aggregation against a malicious server needs to know that a public key
in a roster belongs to a real, distinct device, not to the server (Bonawitz et
al. 2017 assume a PKI). So:

- Each device makes an **Ed25519 identity key** when it first needs one, keeps it
  in its SQLite state and registers its public half with the server: at
  enrolment if an authority certified it, else when a secure-aggregation job
  first asks (`fedclient.IdentityRequired`). It signs its secure-aggregation
  keys and the contributor list it agrees to unmask with it.
- An **identity authority** certifies identity keys: an Ed25519 key of the
  operator's that is *not* held by the aggregation server (the app's backend,
  an attestation service, a provisioning step in the factory). A certificate is
  its signature over the identity key. Devices whose `fedclient.PrivacyPolicy`
  pins the authority (``trusted_authorities``) accept a peer only with a valid
  certificate, so the server cannot invent devices or swap a device's keys.
- Without a pinned authority a device trusts the identity keys the server
  relays: signatures then stop a server from swapping the keys of a device it
  registered honestly, but a server that enrols devices of its own can always
  surround a target with them (see the README's threat model).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from fedclient._exceptions import InvalidInput

__all__ = [
    "IdentityAuthority",
    "SigningKey",
    "verify_certificate",
    "verify_signature",
]

DOMAIN = b"fedclient/identity/v1"
KEY_BYTES = 32
SIGNATURE_BYTES = 64


class SigningKey:
    """An Ed25519 private key (a device's identity key, or an authority's)."""

    def __init__(self, private: bytes | None = None) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        if private is None:
            self._key = Ed25519PrivateKey.generate()
        else:
            if len(private) != KEY_BYTES:
                raise InvalidInput(f"an Ed25519 private key is {KEY_BYTES} bytes")
            self._key = Ed25519PrivateKey.from_private_bytes(private)

    @property
    def public(self) -> bytes:
        """The raw 32-byte public key."""
        from cryptography.hazmat.primitives import serialization

        return self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def private_bytes(self) -> bytes:
        """The raw 32-byte private key (to store it)."""
        from cryptography.hazmat.primitives import serialization

        return self._key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def sign(self, message: bytes) -> bytes:
        """The 64-byte signature of ``message``."""
        return self._key.sign(message)


@functools.lru_cache(maxsize=65536)
def verify_signature(public: bytes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is ``public``'s Ed25519 signature of ``message`` (cached: a
    device checks the same peers' certificates round after round)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if len(public) != KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def _certified(identity_key: bytes) -> bytes:
    return DOMAIN + b"/certificate" + identity_key


class IdentityAuthority:
    """The operator's enrolment authority: it certifies device identity keys.

    Keep its private key away from the aggregation server: a server that holds it
    can certify devices of its own. ``IdentityAuthority()`` makes a new key;
    ``IdentityAuthority(private)`` loads one."""

    def __init__(self, private: bytes | None = None) -> None:
        self._key = SigningKey(private)

    @property
    def public(self) -> bytes:
        """What devices pin (`fedclient.PrivacyPolicy.trusted_authorities`)."""
        return self._key.public

    def private_bytes(self) -> bytes:
        """The raw private key, to keep it."""
        return self._key.private_bytes()

    def certify(self, identity_key: bytes) -> bytes:
        """The certificate of a device's identity public key."""
        if len(identity_key) != KEY_BYTES:
            raise InvalidInput(f"an identity key is {KEY_BYTES} bytes")
        return self._key.sign(_certified(identity_key))


def verify_certificate(
    authorities: Iterable[bytes], identity_key: bytes, certificate: bytes
) -> bool:
    """Whether one of ``authorities`` certified ``identity_key`` with ``certificate``."""
    message = _certified(identity_key)
    return any(verify_signature(a, certificate, message) for a in authorities)
