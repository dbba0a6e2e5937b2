"""Local DP: clipping, calibration, noise, the RDP accountant against dp-accounting, the ledger."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import sqlite_utils
from dp_accounting.pld.privacy_loss_mechanism import GaussianPrivacyLoss
from scipy import stats

from fedclient import DeviceState, InvalidInput
from fedclient._exceptions import PrivacyBudgetExceeded
from fedclient.privacy.dp import (
    GaussianMechanism,
    PrivacyBudget,
    PrivacyLedger,
    RdpAccountant,
    analytic_gaussian_sigma,
    clip_update,
    gaussian_delta,
    l2_norm,
    noise_multiplier_for_budget,
)
from fedclient.privacy.noise import NoiseSource, SeededNoiseWarning


# -- clipping ------------------------------------------------------------------------------
def test_clipping_scales_the_whole_update_to_the_bound() -> None:
    rng = np.random.default_rng(0)
    update = {"w": rng.normal(0, 1, (30, 20)), "b": rng.normal(0, 5, 20)}
    clipped, norm = clip_update(update, 2.0)
    assert norm == pytest.approx(math.sqrt(sum(float(np.sum(v**2)) for v in update.values())))
    assert 2.0 * (1 - 1e-6) <= l2_norm(clipped) <= 2.0
    for name, value in update.items():  # one factor for every tensor: the direction stays
        assert clipped[name].dtype == np.float32 and clipped[name].shape == value.shape
        np.testing.assert_allclose(clipped[name], value * 2.0 / norm, rtol=1e-5, atol=1e-7)


def test_clipping_leaves_a_small_update_alone_and_refuses_nan() -> None:
    small = {"w": np.array([0.3, -0.4], dtype=np.float32)}
    clipped, norm = clip_update(small, 1.0)
    assert norm == pytest.approx(0.5)
    np.testing.assert_array_equal(clipped["w"], small["w"])
    with pytest.raises(InvalidInput, match="NaN"):
        clip_update({"w": np.array([np.nan])}, 1.0)
    with pytest.raises(InvalidInput):
        clip_update(small, 0.0)


def test_clipping_never_exceeds_the_bound_after_float32_rounding() -> None:
    rng = np.random.default_rng(1)
    for _ in range(200):
        update = {"w": rng.normal(0, 10, rng.integers(1, 50)).astype(np.float32)}
        bound = float(rng.uniform(0.01, 3))
        assert l2_norm(clip_update(update, bound)[0]) <= bound


# -- calibration -----------------------------------------------------------------------------
@pytest.mark.parametrize("epsilon", [0.05, 0.5, 1.0, 4.0, 8.0, 20.0])
@pytest.mark.parametrize("delta", [1e-3, 1e-5, 1e-7])
def test_analytic_sigma_is_exactly_calibrated(epsilon: float, delta: float) -> None:
    sigma = analytic_gaussian_sigma(epsilon, delta)
    # dp-accounting's exact hockey-stick divergence of the Gaussian agrees...
    assert GaussianPrivacyLoss(sigma, sensitivity=1.0).get_delta_for_epsilon(epsilon) <= delta * (
        1 + 1e-9
    )
    # ...and sigma is tight: 0.1% less noise breaks the guarantee.
    loss = GaussianPrivacyLoss(sigma * 0.999, sensitivity=1.0)
    assert loss.get_delta_for_epsilon(epsilon) > delta
    assert gaussian_delta(sigma, epsilon) == pytest.approx(delta, rel=1e-6)
    assert analytic_gaussian_sigma(epsilon, delta, sensitivity=3.0) == pytest.approx(3 * sigma)


def test_analytic_calibration_beats_the_classical_bound_and_holds_where_it_fails() -> None:
    classical = lambda e, d: math.sqrt(2 * math.log(1.25 / d)) / e  # noqa: E731
    assert analytic_gaussian_sigma(0.5, 1e-5) < 0.75 * classical(0.5, 1e-5)
    # For epsilon > 1 the classical sigma does not give (epsilon, delta)-DP at all.
    loss = GaussianPrivacyLoss(classical(20.0, 1e-7), sensitivity=1.0)
    assert loss.get_delta_for_epsilon(20.0) > 1e-7


def test_the_mechanism_adds_gaussian_noise_of_the_calibrated_size() -> None:
    mechanism = GaussianMechanism.for_release(epsilon=2.0, delta=1e-5, clip=0.5)
    assert mechanism.sensitivity == 1.0 and mechanism.stddev == pytest.approx(
        analytic_gaussian_sigma(2.0, 1e-5, 1.0)
    )
    assert GaussianMechanism(0.5, 1.0, "add_remove").stddev == 0.5
    zeros = {"a": np.zeros((200, 500), dtype=np.float32), "b": np.zeros(5000, dtype=np.float32)}
    with pytest.warns(SeededNoiseWarning):
        out = mechanism.privatize(zeros, NoiseSource.seeded_for_simulation(7))
    assert out["a"].dtype == np.float32 and out["a"].shape == (200, 500)
    noise = np.concatenate([out["a"].ravel(), out["b"]]).astype(np.float64)
    assert abs(noise.mean()) < 5 * mechanism.stddev / math.sqrt(noise.size)
    assert noise.std() == pytest.approx(mechanism.stddev, rel=0.01)
    assert stats.kstest(noise / mechanism.stddev, "norm").pvalue > 1e-3
    with pytest.warns(SeededNoiseWarning):
        again = mechanism.privatize(zeros, NoiseSource.seeded_for_simulation(7))
    np.testing.assert_array_equal(again["a"], out["a"])  # the seed fixes the noise
    other = mechanism.privatize(zeros, NoiseSource())
    assert not np.array_equal(other["a"], out["a"])


def test_privatize_clips_before_adding_noise() -> None:
    mechanism = GaussianMechanism(clip=1.0, noise_multiplier=1e-6)
    out = mechanism.privatize({"w": np.full(100, 10.0)}, NoiseSource())
    assert l2_norm(out) == pytest.approx(1.0, abs=1e-4)


# -- accounting ------------------------------------------------------------------------------
NOISE = [0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0]
ROUNDS = [1, 2, 5, 10, 50, 100, 300, 1000]
DELTAS = [1e-3, 1e-5, 1e-7]


def reference_epsilon(noise: float, rounds: int, delta: float) -> float:
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(noise), rounds)
    return float(accountant.get_epsilon(delta))


def test_the_accountant_agrees_with_dp_accounting_within_one_percent() -> None:
    worst = 0.0
    for noise in NOISE:
        for rounds in ROUNDS:
            for delta in DELTAS:
                ours = RdpAccountant().compose(noise, rounds).epsilon(delta)
                ref = reference_epsilon(noise, rounds, delta)
                assert ours == pytest.approx(ref, rel=0.01), (noise, rounds, delta)
                worst = max(worst, abs(ours - ref) / ref)
    assert worst < 0.01


def test_heterogeneous_releases_compose_like_dp_accounting() -> None:
    releases = [(0.8, 3), (2.0, 10), (1.1, 1)]
    ours = RdpAccountant()
    event = dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), c)
            for z, c in releases
        ]
    )
    reference = dp_accounting.rdp.RdpAccountant()
    reference.compose(event)
    for z, c in releases:
        ours.compose(z, c)
    assert ours.epsilon(1e-6) == pytest.approx(reference.get_epsilon(1e-6), rel=0.01)


def test_calibrating_for_a_budget_fits_exactly() -> None:
    budget = PrivacyBudget(epsilon=8.0, delta=1e-5)
    for releases in (1, 8, 40):
        z = noise_multiplier_for_budget(budget, releases)
        assert reference_epsilon(z, releases, 1e-5) <= 8.0 * 1.01
        assert RdpAccountant().compose(z, releases).epsilon(1e-5) <= 8.0
        assert RdpAccountant().compose(z * 0.99, releases).epsilon(1e-5) > 8.0
    mechanism = GaussianMechanism.for_budget(budget, 8, clip=1.0)
    assert mechanism.epsilon(1e-5, releases=8) <= 8.0


# -- the ledger ------------------------------------------------------------------------------
BUDGET = PrivacyBudget(epsilon=4.0, delta=1e-5)


def test_a_charge_is_recorded_once_per_release_id() -> None:
    db = sqlite_utils.Database(memory=True)
    ledger = PrivacyLedger(db, key="dev-1")
    first = ledger.charge("digits", "round-1", 2.0, BUDGET)
    assert first.new and first.epsilon_spent == pytest.approx(reference_epsilon(2.0, 1, 1e-5))
    again = ledger.charge("digits", "round-1", 2.0, BUDGET)
    assert not again.new and again.epsilon_spent == first.epsilon_spent
    assert ledger.releases("digits") == 1
    with pytest.raises(InvalidInput, match="was charged with"):
        ledger.charge("digits", "round-1", 3.0, BUDGET)
    second = ledger.charge("digits", "round-2", 2.0, BUDGET)
    assert second.new and second.epsilon_spent == pytest.approx(reference_epsilon(2.0, 2, 1e-5))
    assert ledger.spent("digits", 1e-5) == second.epsilon_spent
    # Jobs and devices sharing the file are separate; reopening the table is harmless.
    assert PrivacyLedger(db, key="dev-2").releases("digits") == 0
    assert PrivacyLedger(db, key="dev-1").releases("other-job") == 0
    assert PrivacyLedger(db, key="dev-1").releases("digits") == 2


def test_the_ledger_refuses_a_release_over_budget_and_records_nothing() -> None:
    ledger = PrivacyLedger(sqlite_utils.Database(memory=True))
    z = noise_multiplier_for_budget(BUDGET, 3)
    for i in range(3):
        ledger.charge("job", f"r{i}", z, BUDGET)
    with pytest.raises(PrivacyBudgetExceeded) as info:
        ledger.check("job", z, BUDGET)
    assert info.value.job == "job" and info.value.epsilon > 4.0 and info.value.budget == 4.0
    with pytest.raises(PrivacyBudgetExceeded, match="budget of 4"):
        ledger.charge("job", "r3", z, BUDGET)
    assert ledger.releases("job") == 3
    assert ledger.charge("job", "r2", z, BUDGET).new is False  # a retry is still fine
    assert ledger.check("job", z, PrivacyBudget(8.0, 1e-5)) <= 8.0  # a bigger budget allows it


def test_a_charge_commits_or_rolls_back_with_the_callers_transaction() -> None:
    db = sqlite_utils.Database(memory=True)
    ledger = PrivacyLedger(db)
    with pytest.raises(RuntimeError), db.atomic():
        ledger.charge("job", "r1", 2.0, BUDGET)
        raise RuntimeError("the upload bytes could not be stored")
    assert ledger.releases("job") == 0
    with db.atomic():
        ledger.charge("job", "r1", 2.0, BUDGET)
    assert ledger.releases("job") == 1


CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import sqlite_utils
    from fedclient import DeviceState
    from fedclient.privacy.dp import PrivacyBudget, PrivacyLedger

    path, release, kill = sys.argv[1], sys.argv[2], sys.argv[3]
    state = DeviceState(path, key="dev-7")          # WAL, as on a device
    ledger = PrivacyLedger(state.db, key="dev-7")
    budget = PrivacyBudget(4.0, 1e-5)
    if kill == "inside":
        with state.db.atomic():
            ledger.charge("digits", release, 2.0, budget)
            os.kill(os.getpid(), signal.SIGKILL)    # dies before the commit
    charge = ledger.charge("digits", release, 2.0, budget)
    print("new" if charge.new else "retry", flush=True)
    if kill == "after":
        os.kill(os.getpid(), signal.SIGKILL)        # charged, not yet uploaded
    print("uploaded", flush=True)
    """
)


def run_child(path: Path, release: str, kill: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(path), release, kill],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_the_ledger_survives_sigkill_between_charged_and_uploaded(tmp_path: Path) -> None:
    path = tmp_path / "device.sqlite"

    died = run_child(path, "round-1", "after")
    assert died.returncode == -signal.SIGKILL and died.stdout.split() == ["new"]

    ledger = PrivacyLedger(DeviceState(path, key="dev-7").db, key="dev-7")
    assert ledger.releases("digits") == 1  # recorded before anything left: not under-charged
    spent = ledger.spent("digits", 1e-5)

    retry = run_child(path, "round-1", "none")  # the restarted device retries the upload
    assert retry.returncode == 0 and retry.stdout.split() == ["retry", "uploaded"]
    ledger = PrivacyLedger(DeviceState(path, key="dev-7").db, key="dev-7")
    assert ledger.releases("digits") == 1 and ledger.spent("digits", 1e-5) == spent

    torn = run_child(path, "round-2", "inside")  # killed inside the charging transaction
    assert torn.returncode == -signal.SIGKILL and torn.stdout == ""
    ledger = PrivacyLedger(DeviceState(path, key="dev-7").db, key="dev-7")
    assert ledger.releases("digits") == 1

    fresh = run_child(path, "round-2", "none")
    assert fresh.returncode == 0 and fresh.stdout.split() == ["new", "uploaded"]
    ledger = PrivacyLedger(DeviceState(path, key="dev-7").db, key="dev-7")
    assert ledger.releases("digits") == 2
    assert ledger.spent("digits", 1e-5) == pytest.approx(reference_epsilon(2.0, 2, 1e-5))
