"""Distributed DP: each device adds a share of the noise, and the secure *sum* is private.

With local DP every device must noise its own update enough for the server to
see it alone; the mean of n such updates carries sqrt(n) times more noise than
it needs. With secure aggregation the server sees only the sum, so n devices
can each add 1/n of the variance the sum needs (Kairouz, Liu & Steinke 2021,
"The Distributed Discrete Gaussian Mechanism", DDGauss). Each device:

1. encodes its clipped, rotated update on the round's common grid with
   conditional rounding, so its L2 norm in grid steps is at most ``Delta``
   (`fedclient.privacy.secagg.RotatedQuantization.sensitivity`);
2. adds discrete Gaussian noise ``N_Z(0, sigma^2)`` to every coordinate, with
   ``sigma`` from `device_sigma`, drawn from a CSPRNG (`noise.NoiseSource`).

The sum of ``n`` devices' noise is close to ``N_Z(0, n sigma^2)``; their
Theorem 1 (as ``DDGauss`` bounds it, with the divergence ``tau`` of the sum from
a discrete Gaussian) gives ``rho = eps^2 / 2``-zCDP for one round with::

    eps = min( sqrt(D^2 / (n sigma^2) + tau d / 2),  D / (sqrt(n) sigma) + tau sqrt(d) )
    tau = 10 * sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1))

where ``D`` is the sensitivity (``Delta`` for add/remove, ``2 Delta`` for
replace) and ``d`` the number of coordinates. zCDP ``rho`` is Renyi DP
``alpha rho`` at every order, which is a Gaussian release of noise multiplier
``1 / eps``: that is what the device's ledger is charged per round
(`effective_noise_multiplier`), composing with everything else it spent.

The guarantee holds against a server that sees only the sum of at least ``n``
honest devices' noise. A device takes ``n`` from what it enforces itself, never
from the plan: the aggregation's floor (the fewest contributors any honest
device unmasks, `fedclient.privacy.secagg.SecAggClient`, at least the device's
``min_secure_cohort`` beyond its colluders) minus the ``c`` colluders it assumes,
who may add no noise (`honest_shares`). A server that inflates the floor makes
each share smaller but can then unmask only sums of that many.
"""

from __future__ import annotations

import math

from fedclient._exceptions import InvalidInput
from fedclient.privacy.dp import smallest_satisfying

__all__ = [
    "device_sigma",
    "effective_noise_multiplier",
    "honest_shares",
    "ring_holds_noise",
    "sum_divergence",
]

#: How far (in standard deviations of the sum's noise) a device wants the ring to reach
#: before it adds its share (the server sizes it for 8: `secagg.NOISE_TAIL`).
RING_TAIL = 6.0


def honest_shares(floor: int, colluders: int) -> int:
    """How many devices' noise shares a device counts on: the ``floor`` of contributors
    every honest device enforces, less the ``colluders`` it assumes (they may add none)."""
    if floor - colluders < 1:
        raise InvalidInput(f"a floor of {floor} leaves no device beyond {colluders} colluders")
    return floor - colluders


def ring_holds_noise(modulus_bits: int, levels: int, devices: int, sigma: float) -> bool:
    """Whether ``devices`` values of at most ``levels`` grid steps each, with noise shares
    of ``sigma`` steps each, fit Z_{2^modulus_bits} without wrapping (to `RING_TAIL`
    standard deviations): a wrapped sum would be silently wrong."""
    reach = devices * levels + RING_TAIL * math.sqrt(devices) * sigma
    return bool(reach < float(2 ** (modulus_bits - 1)))


def sum_divergence(sigma: float, n: int) -> float:
    """``tau``: how far the sum of ``n`` discrete Gaussians of ``sigma`` is from one."""
    total = 0.0
    for k in range(1, n):
        term = math.exp(-2 * math.pi**2 * sigma**2 * k / (k + 1))
        total += term
        if term < 1e-300:  # the terms only shrink: the rest add nothing
            break
    return 10.0 * total


def effective_noise_multiplier(sigma: float, sensitivity: float, n: int, d: int) -> float:
    """The Gaussian noise multiplier one round of DDGauss is worth (``1 / eps``, above):
    ``n`` devices each adding ``N_Z(0, sigma^2)`` to ``d`` integer coordinates of L2
    sensitivity ``sensitivity``."""
    if not (sigma > 0 and sensitivity > 0 and n >= 1 and d >= 1):
        raise InvalidInput("sigma, sensitivity, n and d must be positive")
    tau = sum_divergence(sigma, n)
    ratio = sensitivity**2 / (n * sigma**2)
    eps = min(
        math.sqrt(ratio + tau * d / 2),
        math.sqrt(ratio) + tau * math.sqrt(d),
    )
    return 1.0 / eps


def device_sigma(noise_multiplier: float, sensitivity: float, n: int, d: int) -> float:
    """The smallest per-device ``sigma`` (grid steps) at which the sum of ``n`` devices'
    noise is worth at least ``noise_multiplier`` (bisection to 1e-9, upper end)."""
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise InvalidInput(f"noise_multiplier must be positive, got {noise_multiplier}")

    def enough(sigma: float) -> bool:
        return effective_noise_multiplier(sigma, sensitivity, n, d) >= noise_multiplier

    return smallest_satisfying(
        enough, max(1.0, noise_multiplier * sensitivity / math.sqrt(n)), 1e-9
    )
