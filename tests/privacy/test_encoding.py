"""Compressed and noised secure sums: the rotated grid, bit packing, distributed DP's accounting."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from dp_accounting import GaussianDpEvent
from dp_accounting.rdp import RdpAccountant as GoogleRdp

from fedclient import InvalidInput
from fedclient.privacy.distributed import (
    device_sigma,
    effective_noise_multiplier,
    sum_divergence,
)
from fedclient.privacy.dp import RdpAccountant
from fedclient.privacy.noise import NoiseSource, discrete_gaussian
from fedclient.privacy.secagg import RotatedQuantization, pack, unpack
from fedclient.privacy.secagg._encoding import rounded_norm_bound
from tests.privacy.harness import Aggregation


def _grid(d: int = 1000, n: int = 20, **kwargs: object) -> RotatedQuantization:
    return RotatedQuantization.create(d, clip=1.0, max_devices=n, seed=b"s" * 32, **kwargs)  # type: ignore[arg-type]


def test_the_rotation_is_orthonormal_and_flattens_a_spike() -> None:
    grid = _grid(1000)
    x = np.zeros(1000)
    x[3] = 1.0  # all the mass on one coordinate
    y = grid.rotate(x)
    assert y.size == grid.padded == 1024
    assert np.linalg.norm(y) == pytest.approx(1.0)
    assert np.abs(y).max() < grid.bound  # spread: no coordinate near the spike's height
    back = grid.unrotate(y)
    np.testing.assert_allclose(back, x, atol=1e-12)
    other = RotatedQuantization.create(1000, clip=1.0, max_devices=20, seed=b"t" * 32, bits=8)
    assert not np.allclose(other.rotate(x), y)  # the seed chooses the rotation


@pytest.mark.parametrize("bits", [8, 4])
def test_a_compressed_sum_is_the_weighted_sum_within_rounding(bits: int) -> None:
    n, d = 20, 3000
    grid = _grid(d, n, bits=bits)
    assert grid.levels == 2 ** (bits - 1) - 1
    # n devices at the largest values fit the ring: no wrap-around
    assert 2 * n * grid.levels < 2**grid.modulus_bits
    rng = np.random.default_rng(1)
    updates = [rng.normal(0, 0.5 / math.sqrt(d), d) for _ in range(n)]
    weights = rng.uniform(0.2, 1.0, n)
    total = np.zeros(grid.vector_length, dtype=np.uint64)
    for u, w in zip(updates, weights, strict=True):
        total += grid.encode(u * w, float(w), rng)
    ring = (total % 2**grid.modulus_bits).astype(np.uint32)
    summed, weight = grid.decode(ring)
    expected = sum(u * w for u, w in zip(updates, weights, strict=True))
    # Stochastic rounding: each coordinate of each device is off by under a step, with
    # variance at most step^2 / 4, unbiased; so the sum's error is about that, no more.
    rounding = math.sqrt(n * grid.padded) * grid.step / 2
    assert np.linalg.norm(summed - expected) < 1.1 * rounding
    if bits == 8:
        assert np.linalg.norm(summed - expected) < 0.05 * np.linalg.norm(expected)
    assert weight == pytest.approx(weights.sum(), abs=n / grid.levels)


def test_an_update_over_the_clip_is_clipped_first() -> None:
    grid = _grid(500, 2, bits=8)
    rng = np.random.default_rng(0)
    big = np.full(500, 1.0)  # norm 22, clip 1
    summed, _ = grid.decode(grid.encode(big, 1.0, rng))
    assert np.linalg.norm(summed) == pytest.approx(1.0, rel=0.1)


def test_bad_values_are_refused() -> None:
    grid = _grid(10, bits=8)
    rng = np.random.default_rng(0)
    with pytest.raises(InvalidInput, match="NaN"):
        grid.encode(np.full(10, np.nan), 1.0, rng)
    with pytest.raises(InvalidInput, match="values"):
        grid.encode(np.zeros(11), 1.0, rng)
    with pytest.raises(InvalidInput, match="weight"):
        grid.encode(np.zeros(10), 0.0, rng)
    with pytest.raises(InvalidInput, match="do not fit"):
        RotatedQuantization.create(10, clip=1.0, max_devices=2**30, seed=b"s" * 32, bits=8)


@pytest.mark.parametrize("bits", [2, 7, 13, 31, 32])
def test_packing_round_trips_and_checks_the_length(bits: int) -> None:
    rng = np.random.default_rng(bits)
    values = rng.integers(0, 2**bits, 1001, dtype=np.uint64).astype(np.uint32)
    data = pack(values, bits)
    assert len(data) == math.ceil(1001 * bits / 8)
    np.testing.assert_array_equal(unpack(data, bits, 1001), values)
    with pytest.raises(InvalidInput):
        unpack(data + b"\0\0\0\0", bits, 1001)


def test_a_secure_sum_in_a_narrow_ring_is_exact() -> None:
    # The masked inputs are packed at modulus_bits; the masks still cancel exactly.
    grid = _grid(200, 6, bits=8)
    rng = np.random.default_rng(3)
    inputs = {d: grid.encode(rng.normal(0, 0.05, 200), 1.0, rng) for d in range(1, 7)}
    agg = Aggregation.start(6, grid.vector_length, inputs=inputs, rotation=grid)
    assert agg.params.modulus_bits == grid.modulus_bits < 32
    result = agg.run({"mask": [2]})
    sent = agg.sent["mask"][1].vector
    assert len(sent) == math.ceil(grid.vector_length * grid.modulus_bits / 8)
    expected = sum(inputs[d].astype(np.uint64) for d in (1, 3, 4, 5, 6))
    np.testing.assert_array_equal(
        result.ring_sum, (expected % 2**grid.modulus_bits).astype(np.uint32)
    )


# -- distributed DP -------------------------------------------------------------------------
def test_conditional_rounding_keeps_the_norm_bound() -> None:
    grid = RotatedQuantization.create(
        2000, clip=1.0, max_devices=10, seed=b"s" * 32, noise_ratio=5.0
    )
    rng = np.random.default_rng(0)
    bound = grid.sensitivity()
    assert bound == pytest.approx(rounded_norm_bound(grid.clip / grid.step, grid.padded))
    zero = np.zeros(grid.padded, dtype=np.int64)
    for _ in range(20):
        u = rng.normal(0, 1, 2000)
        v = grid.encode(u, 1.0, rng, zero)
        signed = v.astype(np.int64)
        signed = np.where(signed >= 2**31, signed - 2**32, signed)
        assert np.linalg.norm(signed[:-1]) <= bound


def test_ddgauss_matches_the_gaussian_when_the_noise_is_wide() -> None:
    # With sigma of a few grid steps the sum is all but a discrete Gaussian (tau ~ 0):
    # n devices of sigma each are worth one Gaussian of sigma sqrt(n).
    assert sum_divergence(3.0, 100) < 1e-30
    z = effective_noise_multiplier(sigma=50.0, sensitivity=1000.0, n=16, d=10_000)
    assert z == pytest.approx(50.0 * 4 / 1000.0)
    # ...and is charged as such: the same Renyi DP as dp-accounting's Gaussian.
    google = GoogleRdp().compose(GaussianDpEvent(z), 40).get_epsilon(1e-5)
    assert RdpAccountant().compose(z, 40).epsilon(1e-5) == pytest.approx(google, rel=1e-6)


def test_narrow_noise_is_worth_less_than_its_variance_says() -> None:
    # sigma below ~1 grid step: the sum is far from a discrete Gaussian; tau costs.
    naive = 0.5 * math.sqrt(20) / 10.0
    assert effective_noise_multiplier(0.5, 10.0, 20, 5000) < naive / 10


@pytest.mark.parametrize("n", [1, 10, 100])
def test_device_sigma_is_the_least_noise_that_is_worth_the_target(n: int) -> None:
    sigma = device_sigma(0.8, 2000.0, n, 4096)
    assert effective_noise_multiplier(sigma, 2000.0, n, 4096) >= 0.8
    assert effective_noise_multiplier(sigma * (1 - 1e-6), 2000.0, n, 4096) < 0.8
    assert sigma == pytest.approx(0.8 * 2000.0 / math.sqrt(n), rel=1e-6)


def test_a_sum_of_shares_has_the_noise_of_one_release() -> None:
    # n devices each add N_Z(0, sigma^2): the sum's spread is sigma sqrt(n).
    source = NoiseSource()
    n, sigma = 25, 40.0
    total = sum(discrete_gaussian(sigma, 20_000, source) for _ in range(n))
    assert np.std(total) == pytest.approx(sigma * math.sqrt(n), rel=0.03)


def test_the_aggregation_rejects_a_random_session_seed_of_the_wrong_size() -> None:
    with pytest.raises(InvalidInput, match="32 bytes"):
        RotatedQuantization.create(10, clip=1.0, max_devices=2, seed=os.urandom(8), bits=8)
