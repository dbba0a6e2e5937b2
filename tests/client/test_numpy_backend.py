"""The numpy reference backend: exact gradients, learning, and input validation."""

from __future__ import annotations

import numpy as np
import pytest

import fedclient
from fedclient.protocol import ModelSpec
from fedclient.runtime import NumpyModel
from fedclient.sim.datasets import Dataset


@pytest.mark.parametrize(
    "spec",
    [ModelSpec("softmax", 5, [], 3), ModelSpec("mlp", 5, [7], 3), ModelSpec("mlp", 5, [6, 4], 4)],
)
def test_gradients_match_finite_differences(spec: ModelSpec) -> None:
    rng = np.random.default_rng(0)
    model = NumpyModel(spec, seed=1, dtype=np.float64)
    weights = model.get_weights()
    for name in weights:  # non-zero biases so every path is exercised
        weights[name] = weights[name] + rng.normal(0, 0.1, weights[name].shape)
    model.set_weights(weights)
    x = rng.normal(size=(9, spec.inputs))
    y = rng.integers(0, spec.classes, 9)
    _, grads = model.loss_and_grads(x, y)
    eps = 1e-6
    for name, value in weights.items():
        numeric = np.zeros_like(value)
        for idx in np.ndindex(value.shape):
            for sign in (1, -1):
                shifted = {k: v.copy() for k, v in weights.items()}
                shifted[name][idx] += sign * eps
                model.set_weights(shifted)
                numeric[idx] += sign * model.loss_and_grads(x, y)[0] / (2 * eps)
        model.set_weights(weights)
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-5, atol=1e-8, err_msg=name)


def test_training_learns_digits(digits: Dataset) -> None:
    model = fedclient.models.mlp(64, 32, 10, seed=0)
    before = model.evaluate(digits.x_test, digits.y_test)
    model.train(
        digits.x_train,
        digits.y_train,
        epochs=5,
        batch_size=16,
        learning_rate=0.1,
        rng=np.random.default_rng(0),
    )
    after = model.evaluate(digits.x_test, digits.y_test)
    assert before.accuracy < 0.3 < 0.9 < after.accuracy
    assert after.loss < before.loss


def test_training_is_deterministic_for_a_seed(digits: Dataset) -> None:
    runs = []
    for _ in range(2):
        model = fedclient.models.softmax_regression(64, 10)
        model.train(
            digits.x_train[:200],
            digits.y_train[:200],
            epochs=2,
            batch_size=8,
            learning_rate=0.1,
            rng=np.random.default_rng(3),
        )
        runs.append(model.get_weights())
    for name in runs[0]:
        assert np.array_equal(runs[0][name], runs[1][name])


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        (np.zeros((4, 3)), np.zeros(4, int), "shape"),
        (np.zeros((4, 64)), np.zeros(3, int), "shape"),
        (np.zeros((4, 64)), np.array([0, 1, 2, 10]), "labels must lie"),
        (np.zeros((4, 64)), np.array([0, 1, 2, -1]), "labels must lie"),
        (np.zeros((4, 64)), np.zeros(4), "integers"),
        (np.full((4, 64), np.nan), np.zeros(4, int), "NaN"),
        (np.zeros((0, 64)), np.zeros(0, int), "empty"),
        (np.full((4, 64), "a", dtype=object), np.zeros(4, int), "numbers"),
    ],
)
def test_bad_data_raises_invalid_input(x: np.ndarray, y: np.ndarray, match: str) -> None:
    model = fedclient.models.mlp(64, 8, 10)
    with pytest.raises(fedclient.InvalidInput, match=match):
        fedclient.fit(model, (x, y), epochs=1)


def test_set_weights_rejects_wrong_names_shapes_and_dtypes() -> None:
    model = fedclient.models.mlp(4, 3, 2)
    good = model.get_weights()
    with pytest.raises(fedclient.InvalidInput):
        model.set_weights({k: v for k, v in good.items() if k != "fc1.bias"})
    with pytest.raises(fedclient.InvalidInput):
        model.set_weights({**good, "fc1.bias": np.zeros(5, np.float32)})
    with pytest.raises(fedclient.InvalidInput):
        model.set_weights({**good, "fc1.bias": good["fc1.bias"].astype(np.float64)})
    assert all(np.array_equal(model.get_weights()[k], good[k]) for k in good)
