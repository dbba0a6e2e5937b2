"""Privacy noise: the CSPRNG source, the discrete Gaussian, and releases on a grid."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fedclient import InvalidInput
from fedclient.privacy.dp import GaussianMechanism
from fedclient.privacy.noise import (
    NoiseSource,
    SeededNoiseWarning,
    discrete_gaussian,
    discrete_laplace,
)


@pytest.mark.parametrize("sigma", [0.6, 1.3, 4.0])
def test_the_discrete_gaussian_has_the_right_probabilities(sigma: float) -> None:
    draws = discrete_gaussian(sigma, 400_000, NoiseSource())
    support = np.arange(-int(6 * sigma) - 1, int(6 * sigma) + 2)
    pmf = np.exp(-(support**2) / (2 * sigma * sigma))
    pmf /= pmf.sum()
    observed = np.array([(draws == k).sum() for k in support])
    keep = pmf * draws.size > 5  # chi-square needs expected counts of 5 or more
    expected = pmf[keep] * draws.size
    expected *= observed[keep].sum() / expected.sum()
    assert stats.chisquare(observed[keep], expected).pvalue > 1e-4
    assert draws.dtype == np.int64


def test_the_discrete_laplace_has_the_right_probabilities() -> None:
    draws = discrete_laplace(2.5, 200_000, NoiseSource())
    for k in (0, 1, 3, -2):
        p = math.exp(-abs(k) / 2.5) * (1 - math.exp(-1 / 2.5)) / (1 + math.exp(-1 / 2.5))
        assert (draws == k).mean() == pytest.approx(p, abs=5 * math.sqrt(p / draws.size))


def test_an_unseeded_source_never_repeats_and_a_seeded_one_warns_and_repeats() -> None:
    assert not np.array_equal(NoiseSource().words(8), NoiseSource().words(8))
    with pytest.warns(SeededNoiseWarning, match="not private"):
        a = NoiseSource.seeded_for_simulation(1, 2)
    with pytest.warns(SeededNoiseWarning):
        b = NoiseSource.seeded_for_simulation(1, 2)
    assert a.seeded and not NoiseSource().seeded
    np.testing.assert_array_equal(a.words(16), b.words(16))
    u = NoiseSource().uniform(100_000)
    assert u.min() > 0 and u.max() <= 1 and abs(u.mean() - 0.5) < 0.01


def test_bad_noise_parameters_are_refused() -> None:
    with pytest.raises(InvalidInput):
        discrete_gaussian(0.0, 3, NoiseSource())
    with pytest.raises(InvalidInput):
        discrete_gaussian(math.inf, 3, NoiseSource())
    with pytest.raises(InvalidInput):
        NoiseSource(b"short")


def test_a_release_is_noise_on_a_grid_with_no_trace_of_the_value_below_it() -> None:
    # Mironov's attack reads the clipped value from the low bits of a float sample.
    # Here the release minus any grid point is a whole number of grid steps: two
    # updates that differ below the grid give releases from the same set of values.
    mechanism = GaussianMechanism.for_release(8.0, 1e-5, clip=1.0)
    update = {"w": np.full(1000, 0.01, dtype=np.float32)}
    out = mechanism.privatize(update, NoiseSource())["w"].astype(np.float64)
    grid = mechanism.grid(1000)
    assert grid == 2.0 ** round(math.log2(grid))  # a power of two: grid points are exact
    steps = out / grid
    assert np.all(steps == np.rint(steps))  # every coordinate is a grid point


def test_the_noise_covers_the_rounding_to_the_grid() -> None:
    # Rounding can move two neighbouring updates sqrt(d) grid steps further apart;
    # the noise's standard deviation in grid steps is z * (sensitivity / grid + sqrt(d)).
    mechanism = GaussianMechanism(clip=1.0, noise_multiplier=2.0, neighbouring="add_remove")
    d = 20_000
    out = mechanism.privatize({"w": np.zeros(d, dtype=np.float32)}, NoiseSource())["w"]
    grid = mechanism.grid(d)
    sigma_steps = 2.0 * (1.0 / grid + math.sqrt(d))
    assert np.std(out.astype(np.float64) / grid) == pytest.approx(sigma_steps, rel=0.03)
