"""The built-in CNN: exact numpy gradients, and ONNX Runtime training that matches them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import fedclient
from fedclient.protocol import ModelSpec
from fedclient.runtime import CnnShape, NumpyCnn, cnn_initial_weights


def test_numpy_cnn_gradients_match_finite_differences() -> None:
    shape = CnnShape(side=8, classes=4, channels=(3, 5))
    model = NumpyCnn(shape, seed=1, dtype=np.float64)
    rng = np.random.default_rng(0)
    weights = {k: v + rng.normal(0, 0.1, v.shape) for k, v in model.get_weights().items()}
    model.set_weights(weights)
    x, y = rng.normal(size=(5, 64)), rng.integers(0, 4, 5)
    _, grads = model.loss_and_grads(x, y)
    eps = 1e-6
    for name, value in weights.items():
        picks = rng.choice(value.size, size=min(value.size, 12), replace=False)
        for flat in picks:
            idx = np.unravel_index(flat, value.shape)
            losses = []
            for sign in (1, -1):
                shifted = {k: v.copy() for k, v in weights.items()}
                shifted[name][idx] += sign * eps
                model.set_weights(shifted)
                losses.append(model.loss_and_grads(x, y)[0])
            numeric = (losses[0] - losses[1]) / (2 * eps)
            assert grads[name][idx] == pytest.approx(numeric, rel=1e-5, abs=1e-8), (name, idx)
        model.set_weights(weights)


def test_cnn_shapes_and_initial_weights() -> None:
    shape = CnnShape.for_spec(ModelSpec("mlp", 784, [4, 6], 10))
    assert (shape.side, shape.channels, shape.flat) == (28, (4, 6), 6 * 7 * 7)
    weights = cnn_initial_weights(shape, seed=3)
    assert {k: v.shape for k, v in weights.items()} == shape.parameter_shapes()
    assert all(v.dtype == np.float32 for v in weights.values())
    np.testing.assert_array_equal(
        weights["conv1.weight"], cnn_initial_weights(shape, seed=3)["conv1.weight"]
    )
    assert not np.array_equal(
        weights["conv1.weight"], cnn_initial_weights(shape, seed=4)["conv1.weight"]
    )
    with pytest.raises(fedclient.InvalidInput, match="square"):
        CnnShape.for_spec(ModelSpec("mlp", 60, [], 10))
    with pytest.raises(fedclient.InvalidInput, match="divisible by 4"):
        CnnShape(side=6)


def test_onnx_cnn_trains_like_the_numpy_cnn(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    pytest.importorskip("onnx", reason="the onnx extra is not installed")
    from fedclient.runtime import OnnxBackend, write_bundle
    from fedclient.runtime._graphs import cnn_graph

    shape = CnnShape(side=8, classes=10)
    reference = NumpyCnn(shape, seed=2)
    manifest = write_bundle(cnn_graph(shape, reference.get_weights()), tmp_path, name="cnn")
    assert manifest.ops == {"Conv": 2, "Gemm": 1, "MaxPool": 2, "Relu": 2, "Reshape": 2}
    backend = OnnxBackend(tmp_path)
    rng = np.random.default_rng(0)
    x, y = rng.random((45, 64), dtype=np.float32), rng.integers(0, 10, 45)
    for model in (reference, backend):
        model.train(x, y, epochs=2, batch_size=10, learning_rate=0.2, rng=np.random.default_rng(1))
    for name, value in reference.get_weights().items():
        np.testing.assert_allclose(backend.get_weights()[name], value, atol=1e-4, err_msg=name)
    np.testing.assert_allclose(backend.predict(x), reference.predict(x), atol=1e-5)


def test_create_backend_builds_the_cnn_on_both_runtimes() -> None:
    # ModelSpec's kind does not list "cnn" yet; msgspec only validates when decoding a plan.
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    spec = ModelSpec("cnn", 64, [4, 8], 10)  # type: ignore[arg-type]
    numpy_model = fedclient.create_backend(spec, "numpy", seed=6)
    onnx_model = fedclient.create_backend(spec, "onnx", seed=6)
    assert isinstance(numpy_model, NumpyCnn) and numpy_model.shape.channels == (4, 8)
    initial = numpy_model.get_weights()
    assert list(onnx_model.get_weights()) == list(initial)
    for name, value in initial.items():
        np.testing.assert_array_equal(onnx_model.get_weights()[name], value)
    rng = np.random.default_rng(0)
    x, y = rng.random((30, 64), dtype=np.float32), rng.integers(0, 10, 30)
    for model in (numpy_model, onnx_model):
        model.train(x, y, epochs=2, batch_size=8, learning_rate=0.1, rng=np.random.default_rng(2))
    for name, value in numpy_model.get_weights().items():
        np.testing.assert_allclose(onnx_model.get_weights()[name], value, atol=1e-4, err_msg=name)
