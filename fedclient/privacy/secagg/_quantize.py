"""Fixed point in Z_{2^32}: how a float update becomes ring elements and the sum comes back.

Each coordinate is clipped to ``[-clip_range, clip_range]``, multiplied by
``scale`` and rounded stochastically (floor(x * scale + U), U ~ Uniform[0, 1),
unbiased), giving an integer in ``[-bound, bound]`` stored as uint32 (two's
complement). ``bound = (2^31 - 1) // max_devices``, so the sum of up to
``max_devices`` honest inputs lies in ``[-(2^31 - 1), 2^31 - 1]`` and reads
back as int32 with no wrap-around: the de-quantised sum is exact up to the
rounding of each input. Defaults: ``clip_range = 1.0`` and ``max_devices =
10,000`` give ``bound = 214,748`` and a resolution of 4.7e-6 per coordinate.
"""

from __future__ import annotations

import math

import msgspec
import numpy as np
import numpy.typing as npt

from fedclient._exceptions import InvalidInput

__all__ = ["MODULUS_BITS", "Quantization", "dequantize", "quantize"]

MODULUS_BITS = 32


class Quantization(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The fixed-point encoding of one aggregation (announced in `SecAggParams`)."""

    clip_range: float = 1.0
    max_devices: int = 10_000

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip_range) and self.clip_range > 0):
            raise InvalidInput(f"clip_range must be positive and finite, got {self.clip_range}")
        if not 1 <= self.max_devices <= 2**20:
            raise InvalidInput(f"max_devices must be in [1, 2^20], got {self.max_devices}")

    @property
    def bound(self) -> int:
        """Largest magnitude of one quantised coordinate."""
        return int((2 ** (MODULUS_BITS - 1) - 1) // self.max_devices)

    @property
    def scale(self) -> float:
        """Quantisation steps per unit: ``bound / clip_range``."""
        return self.bound / self.clip_range


def quantize(
    values: npt.ArrayLike, quantization: Quantization, rng: np.random.Generator
) -> npt.NDArray[np.uint32]:
    """A flat float vector as ring elements (uint32), rounded stochastically with ``rng``.

    ``rng`` may be seeded: the rounding hides nothing (the masks do).
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if not np.all(np.isfinite(x)):
        raise InvalidInput("the update holds NaN or Inf")
    r = quantization.clip_range
    scaled = np.clip(x, -r, r) * quantization.scale
    q = np.floor(scaled + rng.random(scaled.shape)).astype(np.int64)
    np.clip(q, -quantization.bound, quantization.bound, out=q)
    return q.astype(np.uint32)  # two's complement: -1 -> 2^32 - 1


def dequantize(
    ring_sum: npt.NDArray[np.uint32], quantization: Quantization
) -> npt.NDArray[np.float64]:
    """The float sum encoded by a ring sum of at most ``max_devices`` quantised inputs."""
    signed = np.asarray(ring_sum, dtype=np.uint32).view(np.int32)
    return signed.astype(np.float64) / quantization.scale
