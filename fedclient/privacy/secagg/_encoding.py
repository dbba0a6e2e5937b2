"""Compressed and noised secure sums: an update as a few bits per coordinate in Z_{2^b}.

The fixed-point encoding (`Quantization`) spends 32 bits per coordinate. To
send fewer (``q8``, ``q4``) or to add noise for distributed DP, every device
must put its update on one common grid, known before anyone trains. This is
the construction of Kairouz, Liu & Steinke 2021 (DDGauss):

1. **Clip** the update to L2 norm ``clip``.
2. **Rotate** it: a random permutation, random signs and a Walsh-Hadamard
   transform on blocks of ``BLOCK`` coordinates (zero-padded to a multiple of
   it). The rotation is orthonormal, so the norm stays; it spreads the mass
   evenly, so each coordinate is about ``clip / sqrt(d)`` and rarely beyond
   ``bound = 4 clip / sqrt(d)``, where coordinates are clipped. Its randomness
   is public (``seed``): every device and the server apply the same one.
3. **Round** to the grid ``step = bound / levels`` stochastically (unbiased),
   so a coordinate is an integer in [-levels, levels]; with distributed DP,
   *conditionally*: re-drawn until the rounded vector's norm is under a bound
   (`rounded_norm_bound`), which fixes the sensitivity the noise is made for.
4. With distributed DP, **add** discrete Gaussian noise (`noise.discrete_gaussian`).
5. Append the device's **weight**, ``round(w * levels)`` for w in (0, 1].
6. Reduce **mod 2^modulus_bits**; `pack` sends ``modulus_bits`` bits a value.

The sum of up to ``max_devices`` such vectors (and their noise) fits the ring
without wrapping, so the server's ring sum, centred and scaled by ``step``,
rotated back and divided by the weight sum, is the weighted mean plus the
rounding and the noise.
"""

from __future__ import annotations

import math

import msgspec
import numpy as np
import numpy.typing as npt

from fedclient._exceptions import InvalidInput

__all__ = [
    "BLOCK",
    "RotatedQuantization",
    "pack",
    "rounded_norm_bound",
    "unpack",
]

#: Coordinates per Walsh-Hadamard block (a power of two). Small, so padding costs
#: little (a 4,810-parameter model pads to 4,864); the random permutation before it
#: spreads the mass over the blocks.
BLOCK = 256
#: The rotated coordinate bound in units of clip / sqrt(d).
BOUND_SIGMAS = 4.0
#: How far (in standard deviations of the noise of the sum) the ring must reach.
NOISE_TAIL = 8.0
#: The conditional rounding's beta (Kairouz et al. 2021): the norm bound holds for all
#: but exp(-0.5) of unconditioned roundings, so a redraw is needed ~40% of the time at most.
ROUNDING_BETA = math.exp(-0.5)


def rounded_norm_bound(c: float, d: int, beta: float = ROUNDING_BETA) -> float:
    """The L2 norm a conditionally rounded vector stays under, for an input of norm ``c``
    in ``d`` coordinates (grid units; Kairouz et al. 2021, Theorem 1)."""
    first = c * c + d / 4 + math.sqrt(2 * math.log(1 / beta)) * (c + math.sqrt(d) / 2)
    return min(math.sqrt(first), c + math.sqrt(d))


def _walsh_hadamard(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """The orthonormal Walsh-Hadamard transform of each row of ``x`` (its own inverse)."""
    rows, n = x.shape
    y = x.copy()
    h = 1
    while h < n:
        y = y.reshape(rows, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = np.stack((a + b, a - b), axis=2)
        h *= 2
    return y.reshape(rows, n) / math.sqrt(n)


def _keystream_words(seed: bytes, purpose: bytes, n: int) -> npt.NDArray[np.uint64]:
    """``n`` public pseudo-random words from ``seed`` (ChaCha20: the same on every platform,
    unlike a numpy generator's stream, which may change between numpy versions)."""
    import hashlib

    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    key = hashlib.sha256(b"fedclient/secagg/rotation/" + purpose + seed).digest()
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    return np.frombuffer(stream.update(bytes(8 * n)), dtype="<u8")


class RotatedQuantization(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The common grid of one compressed or noised secure sum (see the module docstring).

    The vector a device sends has ``padded + 1`` ring elements: the rotated update,
    then its weight.
    """

    dimension: int
    clip: float
    levels: int
    modulus_bits: int
    seed: bytes

    def __post_init__(self) -> None:
        if self.dimension < 1:
            raise InvalidInput("dimension must be at least 1")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise InvalidInput(f"clip must be positive and finite, got {self.clip}")
        if not 1 <= self.levels < 2**30:
            raise InvalidInput(f"levels must be in [1, 2^30), got {self.levels}")
        if not 2 <= self.modulus_bits <= 32:
            raise InvalidInput(f"modulus_bits must be in [2, 32], got {self.modulus_bits}")
        if 2 * self.levels + 1 > 2**self.modulus_bits:
            raise InvalidInput("one device's values do not fit the ring")
        if len(self.seed) != 32:
            raise InvalidInput("the rotation seed is 32 bytes")

    @classmethod
    def create(
        cls,
        dimension: int,
        *,
        clip: float,
        max_devices: int,
        seed: bytes,
        bits: int | None = None,
        noise_ratio: float = 0.0,
    ) -> RotatedQuantization:
        """The grid for ``max_devices`` devices: ``bits`` levels per device (``q8``: 8),
        or with ``bits=None`` as many as a 32-bit ring holds. ``noise_ratio`` is each
        device's noise standard deviation in grid steps per level (distributed DP):
        the ring is made wide enough for the noise of the sum too."""
        if max_devices < 1:
            raise InvalidInput("max_devices must be at least 1")
        # The sum's reach, in levels: the values of n devices and the tail of their noise.
        reach = max_devices + NOISE_TAIL * math.sqrt(max_devices) * noise_ratio
        if bits is not None:
            levels = 2 ** (bits - 1) - 1
            modulus_bits = math.ceil(math.log2(2 * reach * levels + 2))
            if modulus_bits > 32:
                raise InvalidInput(f"{max_devices} devices of {bits} bits do not fit 32 bits")
        else:
            modulus_bits = 32
            levels = int((2**31 - 1) // (reach + 1))
        return cls(dimension, clip, levels, max(2, modulus_bits), seed)

    @property
    def padded(self) -> int:
        """The rotated length: ``dimension`` rounded up to whole blocks."""
        return -(-self.dimension // BLOCK) * BLOCK

    @property
    def vector_length(self) -> int:
        """Ring elements a device sends: the rotated update and its weight."""
        return self.padded + 1

    @property
    def bound(self) -> float:
        """Where a rotated coordinate is clipped."""
        return BOUND_SIGMAS * self.clip / math.sqrt(self.padded)

    @property
    def step(self) -> float:
        """The grid step, in the update's units."""
        return self.bound / self.levels

    # -- the rotation -------------------------------------------------------------------
    def _permutation(self) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float64]]:
        words = _keystream_words(self.seed, b"perm", self.padded)
        order = np.argsort(words, kind="stable")
        signs = _keystream_words(self.seed, b"sign", self.padded) & np.uint64(1)
        return order, 1.0 - 2.0 * signs.astype(np.float64)

    def rotate(self, flat: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """The update (``dimension`` floats) rotated into ``padded`` coordinates."""
        x = np.zeros(self.padded)
        x[: self.dimension] = np.asarray(flat, dtype=np.float64).ravel()
        order, signs = self._permutation()
        y = (x[order] * signs).reshape(-1, BLOCK)
        return _walsh_hadamard(y).ravel()

    def unrotate(self, rotated: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """The inverse of `rotate` (the padding dropped)."""
        y = _walsh_hadamard(np.asarray(rotated, dtype=np.float64).reshape(-1, BLOCK)).ravel()
        order, signs = self._permutation()
        x = np.empty(self.padded)
        x[order] = y * signs
        return x[: self.dimension]

    # -- a device's vector --------------------------------------------------------------
    def sensitivity(self) -> float:
        """The L2 norm (grid steps) one device's rounded vector stays under, weight aside."""
        return rounded_norm_bound(self.clip / self.step, self.padded)

    def encode(
        self,
        flat: npt.ArrayLike,
        weight: float,
        rng: np.random.Generator,
        noise: npt.NDArray[np.int64] | None = None,
    ) -> npt.NDArray[np.uint32]:
        """One device's ring vector: ``flat`` (already scaled by the caller's weight, if
        any) clipped, rotated, rounded, plus ``noise`` (integers, distributed DP; the
        rounding is then conditional on `sensitivity`), then ``weight`` in (0, 1]."""
        x = np.asarray(flat, dtype=np.float64).ravel()
        if x.size != self.dimension:
            raise InvalidInput(f"the update has {x.size} values, the encoding {self.dimension}")
        if not np.all(np.isfinite(x)):
            raise InvalidInput("the update holds NaN or Inf")
        if not 0 < weight <= 1:
            raise InvalidInput(f"a weight is in (0, 1], got {weight}")
        norm = float(np.linalg.norm(x))
        if norm > self.clip:
            x = x * (self.clip / norm)
        scaled = np.clip(self.rotate(x), -self.bound, self.bound) / self.step
        limit = self.sensitivity() if noise is not None else math.inf
        for _ in range(1000):
            q = np.floor(scaled + rng.random(scaled.shape))
            if float(np.linalg.norm(q)) <= limit:
                break
        else:  # pragma: no cover - probability below 0.4^1000
            raise InvalidInput("conditional rounding did not converge")
        ints = np.clip(q, -self.levels, self.levels).astype(np.int64)
        if noise is not None:
            if noise.shape != ints.shape:
                raise InvalidInput(f"noise of shape {noise.shape}, want {ints.shape}")
            ints = ints + noise
        w = math.floor(weight * self.levels + rng.random())
        out = np.concatenate([ints, [max(1, min(self.levels, w))]])
        ring: npt.NDArray[np.uint32] = (out & (2**self.modulus_bits - 1)).astype(np.uint32)
        return ring

    def decode(self, ring_sum: npt.NDArray[np.uint32]) -> tuple[npt.NDArray[np.float64], float]:
        """The weighted sum of the devices' updates and the sum of their weights."""
        modulus = 2**self.modulus_bits
        values = np.asarray(ring_sum, dtype=np.int64) % modulus
        centred = np.where(values >= modulus // 2, values - modulus, values)
        if centred.size != self.vector_length:
            raise InvalidInput(f"a ring sum of {centred.size} values, want {self.vector_length}")
        total = self.unrotate(centred[:-1].astype(np.float64) * self.step)
        return total, float(centred[-1]) / self.levels


def pack(values: npt.NDArray[np.uint32], bits: int) -> bytes:
    """``values`` (each below 2^bits) as a little-endian bit string, ``bits`` bits each."""
    if bits == 32:
        return np.asarray(values, dtype="<u4").tobytes()
    v = np.asarray(values, dtype=np.uint32)
    planes = ((v[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(planes.ravel(), bitorder="little").tobytes()


def unpack(data: bytes, bits: int, length: int) -> npt.NDArray[np.uint32]:
    """The inverse of `pack`; InvalidInput if ``data`` is not ``length`` values long."""
    expected = 4 * length if bits == 32 else -(-length * bits // 8)
    if len(data) != expected:
        raise InvalidInput(f"{len(data)} bytes, want {expected} for {length} values of {bits} bits")
    if bits == 32:
        return np.frombuffer(data, dtype="<u4").astype(np.uint32)
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    planes = flat[: length * bits].reshape(length, bits).astype(np.uint32)
    out: npt.NDArray[np.uint32] = (planes << np.arange(bits, dtype=np.uint32)).sum(
        axis=1, dtype=np.uint32
    )
    return out
