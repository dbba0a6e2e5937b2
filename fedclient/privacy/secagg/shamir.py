"""Shamir t-of-n secret sharing of 256-bit secrets over the prime field GF(2^256 + 297).

The modulus is the smallest prime above 2^256, so every 32-byte secret (a
self-mask seed, an X25519 private key) is one field element. Shares are
encoded as 33 big-endian bytes. Polynomial coefficients come from the OS
CSPRNG (`secrets`). The evaluation points are the devices' ids (non-zero and
distinct, which `SecAggParams` guarantees).
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Iterable, Mapping, Sequence

__all__ = ["ELEMENT_BYTES", "PRIME", "decode_element", "encode_element", "reconstruct", "split"]

PRIME = 2**256 + 297
ELEMENT_BYTES = 33
_BLOCK = 8


def split(secret: int, threshold: int, xs: Iterable[int]) -> dict[int, int]:
    """Shares of ``secret`` at the points ``xs``: any ``threshold`` of them recover it."""
    if not 0 <= secret < PRIME:
        raise ValueError("secret is not a field element")
    if threshold < 1:
        raise ValueError("threshold must be at least 1")
    # Highest degree first for Horner's rule; the constant term is the secret.
    coefficients = [secrets.randbelow(PRIME) for _ in range(threshold - 1)] + [secret]
    # Horner in blocks of _BLOCK coefficients, reducing once per block: Python's
    # big-integer reduction, not the multiplication, is the cost. The first
    # block is the short one, so every later block shifts by x^_BLOCK.
    head = len(coefficients) % _BLOCK or _BLOCK
    blocks = [coefficients[:head]] + [
        coefficients[i : i + _BLOCK] for i in range(head, len(coefficients), _BLOCK)
    ]
    shares = {}
    for x in xs:
        shift = pow(x, _BLOCK, PRIME)
        acc = 0
        for block in blocks:
            value = 0
            for c in block:
                value = value * x + c
            acc = (acc * shift + value) % PRIME
        shares[x] = acc
    return shares


@functools.lru_cache(maxsize=64)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    weights = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        weights.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(weights)


def reconstruct(shares: Mapping[int, int], threshold: int) -> int:
    """The secret from ``threshold`` shares (the lowest points are used; extra ones ignored)."""
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} shares, {threshold} needed")
    xs: Sequence[int] = sorted(shares)[:threshold]
    weights = _lagrange_at_zero(tuple(xs))
    return sum(w * shares[x] for w, x in zip(weights, xs, strict=True)) % PRIME


def encode_element(value: int) -> bytes:
    """A field element as ``ELEMENT_BYTES`` big-endian bytes."""
    return value.to_bytes(ELEMENT_BYTES, "big")


def decode_element(data: bytes) -> int:
    """The field element in ``data``; ValueError if it has the wrong size or is out of range."""
    if len(data) != ELEMENT_BYTES:
        raise ValueError(f"a field element is {ELEMENT_BYTES} bytes, got {len(data)}")
    value = int.from_bytes(data, "big")
    if value >= PRIME:
        raise ValueError("value is not a field element")
    return value
