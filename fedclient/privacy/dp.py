"""Local differential privacy for model updates, and a privacy ledger that survives crashes.

A device protects an update in three steps:

1. **Clip** the whole update (every tensor together, as one vector) to L2 norm
   ``clip`` with `clip_update`.
2. **Add Gaussian noise** with `GaussianMechanism.privatize`. Its standard
   deviation is ``noise_multiplier * sensitivity``, where the sensitivity
   depends on the neighbouring relation: ``"replace"`` (local DP proper: the
   device's whole dataset may be swapped for any other, so two clipped updates
   differ by up to ``2 * clip``) or ``"add_remove"`` (the device's update
   against no contribution, i.e. the zero vector: ``clip``).
3. **Charge the ledger before the update leaves the device** with
   `PrivacyLedger.charge`, in the same SQLite transaction that stores the
   noised bytes to upload. A retried upload resends those stored bytes and a
   retried charge with the same ``release_id`` is a no-op, so a crash can neither
   spend privacy unrecorded nor count one release twice.

Calibration: `analytic_gaussian_sigma` gives the smallest sigma for one
release at (epsilon, delta) with the analytic Gaussian mechanism (Balle & Wang
2018, Theorem 8), tight for every epsilon, unlike the classical
``sqrt(2 ln(1.25/delta)) / epsilon`` which only holds for epsilon < 1.
Repeated releases are composed by `RdpAccountant`: Renyi DP of the Gaussian
mechanism, ``alpha / (2 z^2)`` per release at noise multiplier ``z``, summed
over releases and turned into (epsilon, delta) with the conversion of Canonne,
Kamath & Steinke 2020 (Prop. 12) over the same grid of orders as Google's
``dp-accounting``. `noise_multiplier_for_budget` calibrates ``z`` so that a
given number of releases stays within a job's budget under that accountant,
which is the accountant the ledger charges with.

Noise: the clipped update is rounded to a fine grid (a power of two, about
2^-20 of the sensitivity over sqrt(d)) and integer noise from the discrete
Gaussian is added to its grid coordinates (`fedclient.privacy.noise`), drawn
from a `NoiseSource`: a CSPRNG on a device, so no one can subtract the noise,
and no floating-point trace of the clipped value survives (Mironov 2012). The
rounding moves two neighbouring updates apart by at most sqrt(d) grid steps,
which the noise is calibrated for, so the accountant's figures hold exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import sqlite_utils

from fedclient._exceptions import InvalidInput, PrivacyBudgetExceeded
from fedclient.privacy.noise import NoiseSource, discrete_gaussian

__all__ = [
    "DEFAULT_RDP_ORDERS",
    "Charge",
    "GaussianMechanism",
    "Neighbouring",
    "PrivacyBudget",
    "PrivacyLedger",
    "RdpAccountant",
    "analytic_gaussian_sigma",
    "clip_update",
    "gaussian_delta",
    "l2_norm",
    "noise_multiplier_for_budget",
    "smallest_satisfying",
]

Update = Mapping[str, npt.NDArray[np.floating]]
Neighbouring = Literal["replace", "add_remove"]

#: Renyi orders: the default grid of Google's dp-accounting ``RdpAccountant``.
DEFAULT_RDP_ORDERS: tuple[float, ...] = tuple(
    [1.0 + x / 10.0 for x in range(1, 100)]
    + [float(a) for a in range(11, 64)]
    + [128.0, 256.0, 512.0, 1024.0]
)


# -- clipping -----------------------------------------------------------------------------
def l2_norm(update: Update) -> float:
    """The L2 norm of every tensor of ``update`` taken together (in float64)."""
    total = 0.0
    for value in update.values():
        flat = np.asarray(value, dtype=np.float64).ravel()
        total += float(flat @ flat)
    return math.sqrt(total)


def clip_update(
    update: Update, max_norm: float
) -> tuple[dict[str, npt.NDArray[np.float32]], float]:
    """Scale ``update`` (as one vector) to L2 norm at most ``max_norm``; also its norm before.

    Tensors come back as float32 with the same names and shapes. The scaled
    result is re-checked after the cast to float32, so its norm never exceeds
    ``max_norm`` by a rounding error (the sensitivity bound is exact).
    """
    if not (math.isfinite(max_norm) and max_norm > 0):
        raise InvalidInput(f"max_norm must be a positive finite number, got {max_norm}")
    for name, value in update.items():
        if not np.all(np.isfinite(value)):
            raise InvalidInput(f"update tensor {name!r} holds NaN or Inf")
    norm = l2_norm(update)
    factor = min(1.0, max_norm / norm) if norm > 0 else 1.0
    while True:
        clipped = {
            name: (np.asarray(value, dtype=np.float64) * factor).astype(np.float32)
            for name, value in update.items()
        }
        if l2_norm(clipped) <= max_norm:
            return clipped, norm
        factor *= 1.0 - 2.0**-20


# -- the Gaussian mechanism -------------------------------------------------------------
def _log_ndtr(x: float) -> float:
    """log Phi(x) for the standard normal CDF, accurate far into the lower tail."""
    if x > -20.0:
        return math.log(0.5 * math.erfc(-x / math.sqrt(2.0)))
    # Asymptotic series of the Mills ratio; for x <= -20 the terms fall fast.
    inv2 = 1.0 / (x * x)
    term, series = 1.0, 1.0
    for k in range(1, 8):
        term *= -(2 * k - 1) * inv2
        series += term
    return -0.5 * x * x - math.log(-x) - 0.5 * math.log(2.0 * math.pi) + math.log(series)


def gaussian_delta(sigma: float, epsilon: float, sensitivity: float = 1.0) -> float:
    """The smallest delta for which the Gaussian mechanism is (epsilon, delta)-DP.

    The exact privacy profile (Balle & Wang 2018, Theorem 8) of adding
    N(0, sigma^2) noise to a query of L2 sensitivity ``sensitivity``:
    ``Phi(D/(2s) - e s/D) - exp(e) Phi(-D/(2s) - e s/D)``.
    """
    if sigma <= 0 or sensitivity <= 0 or epsilon < 0:
        raise InvalidInput("sigma and sensitivity must be positive and epsilon non-negative")
    a = sensitivity / (2.0 * sigma)
    b = epsilon * sigma / sensitivity
    first = 0.5 * math.erfc(-(a - b) / math.sqrt(2.0))
    second = math.exp(epsilon + _log_ndtr(-a - b))
    return max(0.0, first - second)


def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """The smallest noise sigma making one Gaussian release (epsilon, delta)-DP.

    Solves `gaussian_delta` (sigma) = delta by bisection to a relative width of
    1e-12 and returns the upper end, so the returned sigma always satisfies the
    guarantee (Balle & Wang 2018, "analytic Gaussian mechanism").
    """
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise InvalidInput(f"epsilon must be positive and finite, got {epsilon}")
    if not 0 < delta < 1:
        raise InvalidInput(f"delta must be in (0, 1), got {delta}")
    if not sensitivity > 0:
        raise InvalidInput(f"sensitivity must be positive, got {sensitivity}")
    return smallest_satisfying(
        lambda sigma: gaussian_delta(sigma, epsilon, sensitivity) <= delta, sensitivity, 1e-12
    )


def smallest_satisfying(enough: Callable[[float], bool], start: float, width: float) -> float:
    """The smallest positive x with ``enough(x)``, for a monotone ``enough`` (False below
    some point, True above): doubled or halved from ``start`` until it brackets it, then
    bisected to a relative ``width``; the upper end is returned, so ``enough`` holds."""
    hi = start
    while not enough(hi):
        hi *= 2.0
    lo = hi / 2.0
    while enough(lo) and lo > start * 1e-12:
        hi, lo = lo, lo / 2.0
    while hi - lo > width * hi:
        mid = 0.5 * (lo + hi)
        if enough(mid):
            hi = mid
        else:
            lo = mid
    return hi


#: The grid a release is rounded to: at most 2^-GRID_BITS of the sensitivity over sqrt(d).
GRID_BITS = 20


@dataclass(frozen=True)
class GaussianMechanism:
    """Clip an update to ``clip`` and add N(0, (noise_multiplier * sensitivity)^2) per coordinate.

    ``neighbouring`` fixes the sensitivity: ``"replace"`` is ``2 * clip`` (local
    DP: any two datasets of the device), ``"add_remove"`` is ``clip`` (the
    device's update against the zero vector). The ledger is charged in units
    of ``noise_multiplier``, which is independent of ``clip``.
    """

    clip: float
    noise_multiplier: float
    neighbouring: Neighbouring = "replace"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise InvalidInput(f"clip must be positive and finite, got {self.clip}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise InvalidInput(f"noise_multiplier must be positive, got {self.noise_multiplier}")
        if self.neighbouring not in ("replace", "add_remove"):
            raise InvalidInput(f"unknown neighbouring relation {self.neighbouring!r}")

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity of the clipped update under ``neighbouring``."""
        return 2.0 * self.clip if self.neighbouring == "replace" else self.clip

    @property
    def stddev(self) -> float:
        """Standard deviation of the noise added to each coordinate."""
        return self.noise_multiplier * self.sensitivity

    @classmethod
    def for_release(
        cls, epsilon: float, delta: float, clip: float, neighbouring: Neighbouring = "replace"
    ) -> GaussianMechanism:
        """The mechanism whose single release is (epsilon, delta)-DP (analytic calibration)."""
        unit = analytic_gaussian_sigma(epsilon, delta, 1.0)
        return cls(clip, unit, neighbouring)

    @classmethod
    def for_budget(
        cls,
        budget: PrivacyBudget,
        releases: int,
        clip: float,
        neighbouring: Neighbouring = "replace",
    ) -> GaussianMechanism:
        """The mechanism of which ``releases`` releases fit ``budget`` under `RdpAccountant`."""
        return cls(clip, noise_multiplier_for_budget(budget, releases), neighbouring)

    def epsilon(self, delta: float, releases: int = 1) -> float:
        """Epsilon at ``delta`` after ``releases`` releases, by the RDP accountant."""
        return RdpAccountant().compose(self.noise_multiplier, releases).epsilon(delta)

    def grid(self, dimension: int) -> float:
        """The grid step a release of ``dimension`` coordinates is rounded to (a power of
        two, so the grid values are exact floats)."""
        step = self.sensitivity * 2.0**-GRID_BITS / math.sqrt(max(1, dimension))
        return 2.0 ** math.floor(math.log2(step))

    def privatize(self, update: Update, source: NoiseSource) -> dict[str, npt.NDArray[np.float32]]:
        """Clip ``update``, round it to `grid`, add discrete Gaussian noise from ``source``.

        Float32 out, same names and shapes. ``source`` must be a fresh
        `NoiseSource()` on a device; a seeded one (simulations) is public. The
        noise's standard deviation is ``noise_multiplier`` times the sensitivity
        in grid steps plus ``sqrt(d)`` (what rounding can add), so a release is
        exactly as private as the accountant says.
        """
        clipped, _ = clip_update(update, self.clip)
        names = list(clipped)
        flat = np.concatenate([clipped[n].astype(np.float64).ravel() for n in names])
        grid = self.grid(flat.size)
        points = np.rint(flat / grid).astype(np.int64)
        sigma = self.noise_multiplier * (self.sensitivity / grid + math.sqrt(flat.size))
        points += discrete_gaussian(sigma, flat.size, source)
        noised = points.astype(np.float64) * grid
        out, at = {}, 0
        for name in names:
            shape = clipped[name].shape
            size = clipped[name].size
            out[name] = noised[at : at + size].reshape(shape).astype(np.float32)
            at += size
        return out


# -- accounting ---------------------------------------------------------------------------
@dataclass(frozen=True)
class PrivacyBudget:
    """A job's privacy budget: at most ``epsilon`` at ``delta`` over all its releases."""

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        if not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise InvalidInput(f"budget epsilon must be positive and finite, got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise InvalidInput(f"budget delta must be in (0, 1), got {self.delta}")


class RdpAccountant:
    """Renyi-DP accountant for repeated Gaussian releases (full participation, no sampling).

    Each release at noise multiplier ``z`` (noise stddev over L2 sensitivity)
    adds ``alpha / (2 z^2)`` of RDP at every order ``alpha``; `epsilon` converts
    the total with the bound ``rdp + log1p(-1/alpha) - log(delta * alpha) /
    (alpha - 1)`` minimised over the orders, as ``dp_accounting.rdp`` does.
    """

    def __init__(self, orders: Sequence[float] = DEFAULT_RDP_ORDERS) -> None:
        if not orders or min(orders) <= 1:
            raise InvalidInput("RDP orders must be non-empty and all above 1")
        self.orders = np.asarray(orders, dtype=np.float64)
        self.rdp = np.zeros_like(self.orders)

    def compose(self, noise_multiplier: float, count: int = 1) -> RdpAccountant:
        """Add ``count`` Gaussian releases at ``noise_multiplier``; returns ``self``."""
        if not noise_multiplier > 0:
            raise InvalidInput(f"noise_multiplier must be positive, got {noise_multiplier}")
        if count < 0:
            raise InvalidInput(f"count must be non-negative, got {count}")
        self.rdp = self.rdp + count * self.orders / (2.0 * noise_multiplier**2)
        return self

    def epsilon(self, delta: float) -> float:
        """The smallest epsilon this accountant certifies at ``delta``."""
        if not 0 < delta < 1:
            raise InvalidInput(f"delta must be in (0, 1), got {delta}")
        best = math.inf
        for alpha, rdp in zip(self.orders.tolist(), self.rdp.tolist(), strict=True):
            if delta**2 + math.expm1(-rdp) > 0:
                # KL bound: delta <= sqrt(1 - exp(-rdp)) already holds at epsilon 0.
                return 0.0
            if alpha > 1.01:
                eps = rdp + math.log1p(-1.0 / alpha) - math.log(delta * alpha) / (alpha - 1.0)
                best = min(best, eps)
        return max(0.0, best)


def noise_multiplier_for_budget(budget: PrivacyBudget, releases: int) -> float:
    """The smallest noise multiplier whose ``releases`` releases fit ``budget`` (RDP).

    Found by bisection to a relative width of 1e-9; the upper end is returned,
    so the budget is never exceeded by calibration error.
    """
    if releases < 1:
        raise InvalidInput(f"releases must be at least 1, got {releases}")

    def fits(z: float) -> bool:
        return RdpAccountant().compose(z, releases).epsilon(budget.delta) <= budget.epsilon

    return smallest_satisfying(fits, 1.0, 1e-9)


# -- the ledger ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Charge:
    """One release recorded in the ledger, and the job's spend once it is counted.

    ``new`` is False when ``release_id`` had already been charged (a retry):
    nothing was added.
    """

    job: str
    release_id: str
    noise_multiplier: float
    count: int
    epsilon_spent: float
    delta: float
    new: bool


class PrivacyLedger:
    """The privacy a device has spent per job, in its SQLite state (table ``privacy_ledger``).

    Rows are keyed by device ``key``, ``job`` and ``release_id``, so many
    virtual devices may share one database file, as with `fedclient.DeviceState`.
    Charge a release **before** its bytes leave the device, ideally in the same
    transaction that stores them for upload::

        with ledger.db.atomic():
            ledger.charge(job, release_id, mechanism.noise_multiplier, budget)
            state.record_update(job, plan, noised_bytes, idempotency_key)

    If the process dies after the commit, the restarted device resends the
    stored bytes and a repeated `charge` with the same ``release_id`` adds
    nothing; if it dies before, neither happened. Never re-noise a release that
    may have left the device: two noisy copies of one update cost two releases.
    """

    def __init__(self, db: sqlite_utils.Database, key: str = "device") -> None:
        self.db = db
        self.key = key
        with db.atomic():
            db.execute(
                "CREATE TABLE IF NOT EXISTS privacy_ledger ("
                " key TEXT NOT NULL, job TEXT NOT NULL, release_id TEXT NOT NULL,"
                " noise_multiplier REAL NOT NULL, count INTEGER NOT NULL,"
                " charged_at REAL NOT NULL,"
                " PRIMARY KEY (key, job, release_id))"
            )

    def _rows(self, job: str | None) -> list[tuple[str, float, int]]:
        """A job's releases (every job's, for ``None``)."""
        where, args = ("key=?", [self.key]) if job is None else ("key=? AND job=?", [self.key, job])
        rows = self.db.execute(
            "SELECT release_id, noise_multiplier, count FROM privacy_ledger"
            f" WHERE {where} ORDER BY rowid",
            args,
        ).fetchall()
        return [(str(r[0]), float(r[1]), int(r[2])) for r in rows]

    @staticmethod
    def _epsilon(releases: Iterable[tuple[float, int]], delta: float) -> float:
        accountant = RdpAccountant()
        for noise_multiplier, count in releases:
            accountant.compose(noise_multiplier, count)
        return accountant.epsilon(delta)

    def spent(self, job: str, delta: float) -> float:
        """Epsilon the device has spent on ``job`` so far, at ``delta``."""
        return self._epsilon(((z, c) for _, z, c in self._rows(job)), delta)

    def spent_lifetime(self, delta: float) -> float:
        """Epsilon the device has spent over every job together, at ``delta``."""
        return self._epsilon(((z, c) for _, z, c in self._rows(None)), delta)

    def releases(self, job: str) -> int:
        """How many releases the ledger holds for ``job``."""
        return sum(c for _, _, c in self._rows(job))

    def _refuse_over(
        self,
        job: str,
        noise_multiplier: float,
        count: int,
        budget: PrivacyBudget,
        lifetime: PrivacyBudget | None,
        rows: list[tuple[str, float, int]],
    ) -> float:
        """The job's spend with ``count`` more releases; raise if it or the lifetime's
        would pass their budget."""
        after = self._epsilon(
            [*((z, c) for _, z, c in rows), (noise_multiplier, count)], budget.delta
        )
        if after > budget.epsilon * (1.0 + 1e-12):
            raise PrivacyBudgetExceeded(job, epsilon=after, budget=budget.epsilon)
        if lifetime is not None:
            every = [(z, c) for _, z, c in self._rows(None)]
            total = self._epsilon([*every, (noise_multiplier, count)], lifetime.delta)
            if total > lifetime.epsilon * (1.0 + 1e-12):
                raise PrivacyBudgetExceeded(
                    job, epsilon=total, budget=lifetime.epsilon, scope="lifetime"
                )
        return after

    def check(
        self,
        job: str,
        noise_multiplier: float,
        budget: PrivacyBudget,
        count: int = 1,
        *,
        lifetime: PrivacyBudget | None = None,
    ) -> float:
        """Raise `PrivacyBudgetExceeded` unless ``count`` more releases fit the job's
        ``budget`` (and the device's ``lifetime`` budget over every job, if given); else
        the job's spend after them.

        Call it before training, to refuse a job early; it records nothing.
        """
        return self._refuse_over(job, noise_multiplier, count, budget, lifetime, self._rows(job))

    def charge(
        self,
        job: str,
        release_id: str,
        noise_multiplier: float,
        budget: PrivacyBudget,
        count: int = 1,
        *,
        lifetime: PrivacyBudget | None = None,
    ) -> Charge:
        """Record ``count`` releases at ``noise_multiplier`` under ``release_id``, once.

        Idempotent by ``release_id``: charging it again returns the recorded
        charge with ``new=False``; charging it again with a different noise
        multiplier or count is a bug and raises `fedclient.InvalidInput`. If the
        release would exceed ``budget`` (or ``lifetime``), raises
        `PrivacyBudgetExceeded` and records nothing. Runs in one transaction (a
        savepoint inside the caller's transaction, if any).
        """
        if not release_id:
            raise InvalidInput("release_id must be a non-empty string")
        if count < 1:
            raise InvalidInput(f"count must be at least 1, got {count}")
        if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
            raise InvalidInput(f"noise_multiplier must be positive, got {noise_multiplier}")
        with self.db.atomic():
            rows = self._rows(job)
            for rid, z, c in rows:
                if rid == release_id:
                    if z != noise_multiplier or c != count:
                        raise InvalidInput(
                            f"release {release_id!r} of job {job!r} was charged with noise "
                            f"multiplier {z} x{c}, not {noise_multiplier} x{count}"
                        )
                    spent = self._epsilon(((zz, cc) for _, zz, cc in rows), budget.delta)
                    return Charge(job, release_id, z, c, spent, budget.delta, new=False)
            after = self._refuse_over(job, noise_multiplier, count, budget, lifetime, rows)
            self.db.execute(
                "INSERT INTO privacy_ledger (key, job, release_id, noise_multiplier, count,"
                " charged_at) VALUES (?, ?, ?, ?, ?, ?)",
                [self.key, job, release_id, noise_multiplier, count, time.time()],
            )
        return Charge(job, release_id, noise_multiplier, count, after, budget.delta, new=True)
