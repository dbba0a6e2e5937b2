"""The cryptography of secure aggregation, all from `cryptography`: no cipher is written here.

- Key agreement: X25519. Raw 32-byte public keys; an agreement that yields the
  all-zero secret (a low-order point) is refused.
- Key derivation: HKDF-SHA256, salted with the aggregation's context (the
  agreed roster's digest, which holds the session) and domain-separated by
  purpose and device ids, so no derived key is ever used for two purposes, two
  directions, two rounds or two views of one round.
- Share encryption: AES-256-GCM with a random 96-bit nonce (OS CSPRNG) and
  associated data binding the protocol, the context, the sender and the
  recipient; a share replayed to another device, direction or round, or opened
  by a device shown another roster, fails.
- Mask expansion: the ChaCha20 keystream (counter and nonce zero; each key is
  used for exactly one stream) read as little-endian uint32 words.
- Commitments: truncated SHA-256 digests of each share, and of the self-mask
  seed, so the server can reject a wrong revealed share and check what it
  reconstructs. The committed values are uniform 256-bit field elements, so
  the digests reveal nothing useful.
- Signed statements (Ed25519, with the device's identity key): its advertised
  keys (bound to the session), the roster it agrees to, and the contributor list
  it agrees to unmask (both bound to the roster's digest).
- The roster's digest (`roster_digest`: the parameters and every signed key
  advertisement) is the *context* of everything after the roster: it keys and
  authenticates the shares, the masks, the commitments and the contributor list,
  so material made for one view of the roster is useless to a device shown another.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "DIGEST_BYTES",
    "DOMAIN",
    "KEY_BYTES",
    "SHARE_CIPHERTEXT_BYTES",
    "SHARE_PLAINTEXT_BYTES",
    "MaskExpander",
    "advertisement_message",
    "agree",
    "check_public_key",
    "decrypt_share",
    "encrypt_share",
    "pairwise_mask_key",
    "private_bytes",
    "public_bytes",
    "roster_digest",
    "roster_message",
    "secret_digest",
    "self_mask_key",
    "share_digest",
    "survivors_message",
]

DOMAIN = b"fedclient/secagg/v1"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
DIGEST_BYTES = 16
SHARE_PLAINTEXT_BYTES = 66  # a self-mask share and a key share, 33 bytes each
SHARE_CIPHERTEXT_BYTES = NONCE_BYTES + SHARE_PLAINTEXT_BYTES + TAG_BYTES

_RAW = serialization.Encoding.Raw
_RAW_PUBLIC = serialization.PublicFormat.Raw
_RAW_PRIVATE = serialization.PrivateFormat.Raw


def _id(device: int) -> bytes:
    return device.to_bytes(4, "big")


def public_bytes(key: X25519PrivateKey) -> bytes:
    """The raw 32-byte public key of ``key``."""
    return key.public_key().public_bytes(_RAW, _RAW_PUBLIC)


def private_bytes(key: X25519PrivateKey) -> bytes:
    """The raw 32-byte private key (what gets secret-shared)."""
    return key.private_bytes(_RAW, _RAW_PRIVATE, serialization.NoEncryption())


def agree(private: X25519PrivateKey, public: bytes) -> bytes:
    """The X25519 shared secret; ValueError for a malformed or low-order public key."""
    if len(public) != KEY_BYTES:
        raise ValueError(f"an X25519 public key is {KEY_BYTES} bytes, got {len(public)}")
    # cryptography refuses an all-zero result (a low-order point) with ValueError.
    return private.exchange(X25519PublicKey.from_public_bytes(public))


def check_public_key(public: bytes) -> None:
    """ValueError unless ``public`` is a usable X25519 key (agreement with a throwaway key)."""
    agree(X25519PrivateKey.generate(), public)


def _hkdf(secret: bytes, context: bytes, info: bytes) -> bytes:
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=context, info=DOMAIN + info).derive(secret)


def _share_aad(context: bytes, sender: int, recipient: int) -> bytes:
    return DOMAIN + b"/share-aad" + context + _id(sender) + _id(recipient)


def encrypt_share(
    shared_secret: bytes, context: bytes, sender: int, recipient: int, plaintext: bytes
) -> bytes:
    """Nonce, ciphertext and tag of ``plaintext`` from ``sender`` to ``recipient``."""
    key = _hkdf(shared_secret, context, b"/share-key" + _id(sender) + _id(recipient))
    nonce = os.urandom(NONCE_BYTES)
    aad = _share_aad(context, sender, recipient)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def decrypt_share(
    shared_secret: bytes, context: bytes, sender: int, recipient: int, blob: bytes
) -> bytes:
    """The plaintext of a share; ValueError if it is malformed or does not authenticate."""
    if len(blob) != SHARE_CIPHERTEXT_BYTES:
        raise ValueError(f"ciphertext is {len(blob)} bytes, not {SHARE_CIPHERTEXT_BYTES}")
    key = _hkdf(shared_secret, context, b"/share-key" + _id(sender) + _id(recipient))
    aad = _share_aad(context, sender, recipient)
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag:
        raise ValueError("AES-GCM authentication failed") from None


def pairwise_mask_key(shared_secret: bytes, context: bytes, a: int, b: int) -> bytes:
    """The PRG key of the mask between devices ``a`` and ``b`` (symmetric in a, b)."""
    lo, hi = min(a, b), max(a, b)
    return _hkdf(shared_secret, context, b"/pairwise-mask" + _id(lo) + _id(hi))


def self_mask_key(seed: bytes, context: bytes, device: int) -> bytes:
    """The PRG key of ``device``'s self-mask, from its secret seed ``b``."""
    return _hkdf(seed, context, b"/self-mask" + _id(device))


def share_digest(context: bytes, kind: bytes, owner: int, holder: int, share: bytes) -> bytes:
    """The commitment to one share: ``kind`` is ``b"b"`` (self-mask seed) or ``b"s"`` (key)."""
    data = DOMAIN + b"/share-commit/" + kind + context + _id(owner) + _id(holder) + share
    return hashlib.sha256(data).digest()[:DIGEST_BYTES]


def secret_digest(context: bytes, owner: int, seed: bytes) -> bytes:
    """The commitment to a self-mask seed, checked after it is reconstructed."""
    return hashlib.sha256(DOMAIN + b"/seed-commit" + context + _id(owner) + seed).digest()


def advertisement_message(session: bytes, device: int, c_public: bytes, s_public: bytes) -> bytes:
    """What a device signs when it advertises its keys."""
    return DOMAIN + b"/advertise" + session + _id(device) + c_public + s_public


def survivors_message(context: bytes, contributors: list[int]) -> bytes:
    """What a device signs to agree to unmask the sum of ``contributors`` (sorted), in the
    aggregation whose agreed roster has the digest ``context``."""
    listed = hashlib.sha256(b"".join(_id(d) for d in contributors)).digest()
    return DOMAIN + b"/survivors" + context + listed


def roster_message(context: bytes) -> bytes:
    """What a device signs to say it was shown the roster whose digest is ``context``."""
    return DOMAIN + b"/roster" + context


def roster_digest(params: bytes, entries: list[tuple[int, bytes, bytes, bytes, bytes]]) -> bytes:
    """The digest of one view of an aggregation: its encoded parameters (session,
    participants, threshold, floor, encoding) and every roster entry (device, c key,
    s key, identity key, certificate), sorted by device.

    Devices sign it before any share leaves (`roster_message`), and it is the context
    of every key, commitment and signature after that. It is also the SecAgg+ graph's
    seed: the devices' fresh keys are in it, so the server cannot pick the graph (it
    could only retry with other subsets of devices)."""
    digest = hashlib.sha256(DOMAIN + b"/roster-digest")
    digest.update(len(params).to_bytes(4, "big") + params)
    for device, c_public, s_public, identity, certificate in sorted(entries):
        digest.update(_id(device) + c_public + s_public + identity)
        digest.update(len(certificate).to_bytes(2, "big") + certificate)
    return digest.digest()


class MaskExpander:
    """Adds or subtracts ChaCha20 keystreams of ``length`` uint32 words into a vector.

    Buffers are reused across calls, so expanding a mask allocates nothing.
    """

    def __init__(self, length: int) -> None:
        self.length = length
        self._zeros = bytes(4 * length)
        self._buffer = bytearray(4 * length + 64)
        self._words = np.frombuffer(self._buffer, dtype="<u4", count=length)

    def expand(self, key: bytes) -> npt.NDArray[np.uint32]:
        """The mask for ``key`` (a view into a reused buffer: copy it to keep it)."""
        encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
        encryptor.update_into(self._zeros, self._buffer)
        return self._words

    def add(self, into: npt.NDArray[np.uint32], key: bytes, sign: int) -> None:
        """``into += sign * mask(key)`` in Z_{2^32} (``sign`` is +1 or -1)."""
        mask = self.expand(key)
        if sign > 0:
            np.add(into, mask, out=into)
        else:
            np.subtract(into, mask, out=into)
