"""Privacy noise that a server cannot predict or read through: a CSPRNG and the discrete Gaussian.

Two things can undo a differentially private release even when its noise is
calibrated right:

- **Predictable randomness.** Anyone who can recompute the noise subtracts it.
  numpy's PCG64 is not a cryptographic generator, and a seeded one is public.
  `NoiseSource` draws from ChaCha20 (the `cryptography` package) keyed with 256
  bits from the OS; `NoiseSource.seeded_for_simulation` exists for reproducible
  simulations only, and warns (`SeededNoiseWarning`) every time it is made.
- **Floating point.** Mironov (2012) showed that the low-order bits of a
  floating-point Laplace or Gaussian sample reveal the value it was added to.
  Here noise is an *integer*: a release is rounded to a grid first and a
  discrete Gaussian ``N_Z(0, sigma^2)`` is added to the grid coordinates in
  int64 (Canonne, Kamath & Steinke 2020). The sum is exact and the float a
  device finally sends is a fixed function of that integer, so it carries no
  trace of the value before the noise. The discrete Gaussian has the Gaussian's
  privacy: for an integer query of L2 sensitivity ``D``, ``N_Z(0, sigma^2)`` is
  ``D^2 / (2 sigma^2)``-zCDP (their Theorem 14), i.e. Renyi DP ``alpha D^2 /
  (2 sigma^2)``, which is what `fedclient.privacy.dp.RdpAccountant` charges.

Sampling follows their Algorithm 3 (rejection from a discrete Laplace), with
the acceptance tests in float64, vectorised over numpy arrays. Its
probabilities are those of the ideal sampler up to float64 rounding, and the
draws never depend on the data, so rounding cannot leak the data.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings

import numpy as np
import numpy.typing as npt

from fedclient._exceptions import InvalidInput

__all__ = [
    "NoiseSource",
    "SeededNoiseWarning",
    "discrete_gaussian",
    "discrete_laplace",
]

_BLOCK_WORDS = 1 << 16  # uint64 words drawn from the keystream at a time


class SeededNoiseWarning(UserWarning):
    """Privacy noise drawn from a seed: anyone who knows the seed can remove it."""


class NoiseSource:
    """Uniform random numbers from the ChaCha20 keystream (a CSPRNG).

    ``NoiseSource()`` keys it with 32 bytes from ``os.urandom``: what it draws
    cannot be predicted, even by someone who saw earlier draws.
    """

    def __init__(self, key: bytes | None = None) -> None:
        if key is None:
            key = os.urandom(32)
        if len(key) != 32:
            raise InvalidInput("a noise source's key is 32 bytes")
        # Imported here: an app that never adds noise need not load `cryptography`.
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

        self._stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
        self.seeded = False

    @classmethod
    def seeded_for_simulation(cls, *seed: int) -> NoiseSource:
        """A source drawn from ``seed``: **no privacy**; for reproducible simulations only.

        Warns with `SeededNoiseWarning` every time, so that it cannot be used by
        accident without a trace."""
        warnings.warn(
            "privacy noise is drawn from a seed (simulation only): anyone who knows the "
            "seed can subtract it, so the release is not private",
            SeededNoiseWarning,
            stacklevel=2,
        )
        text = ",".join(str(int(s)) for s in seed).encode()
        source = cls(hashlib.sha256(b"fedclient/noise/simulation/" + text).digest())
        source.seeded = True
        return source

    def words(self, n: int) -> npt.NDArray[np.uint64]:
        """``n`` uniform 64-bit words."""
        return np.frombuffer(self._stream.update(bytes(8 * n)), dtype="<u8").copy()

    def uniform(self, n: int) -> npt.NDArray[np.float64]:
        """``n`` uniform floats in (0, 1] with 53 random bits each (never 0: logs are safe)."""
        return ((self.words(n) >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53


def discrete_laplace(scale: float, n: int, source: NoiseSource) -> npt.NDArray[np.int64]:
    """``n`` draws with P(y) proportional to exp(-|y| / scale), y an integer.

    The difference of two geometric variables on {0, 1, ...} with ratio
    exp(-1/scale), each by inversion: floor(-scale * ln U)."""
    if not (scale > 0 and math.isfinite(scale)):
        raise InvalidInput(f"scale must be positive and finite, got {scale}")
    u = source.uniform(2 * n)
    g = np.floor(-scale * np.log(u)).astype(np.int64)
    return g[:n] - g[n:]


def discrete_gaussian(sigma: float, n: int, source: NoiseSource) -> npt.NDArray[np.int64]:
    """``n`` independent draws of the discrete Gaussian N_Z(0, sigma^2) on the integers.

    Canonne, Kamath & Steinke 2020, Algorithm 3: propose Y from the discrete
    Laplace with scale t = floor(sigma) + 1; accept with probability
    exp(-(|Y| - sigma^2/t)^2 / (2 sigma^2)). About 1.4 proposals per draw."""
    if not (sigma > 0 and math.isfinite(sigma)):
        raise InvalidInput(f"sigma must be positive and finite, got {sigma}")
    if sigma > 2.0**50:
        raise InvalidInput(f"sigma {sigma:.3g} is beyond what int64 noise can carry")
    out = np.empty(n, dtype=np.int64)
    t = math.floor(sigma) + 1
    filled = 0
    while filled < n:
        want = n - filled
        batch = min(_BLOCK_WORDS, int(want * 1.6) + 16)
        y = discrete_laplace(t, batch, source)
        gap = np.abs(y).astype(np.float64) - sigma * sigma / t
        accept = source.uniform(batch) <= np.exp(-(gap * gap) / (2.0 * sigma * sigma))
        taken = y[accept][:want]
        out[filled : filled + len(taken)] = taken
        filled += len(taken)
    return out
