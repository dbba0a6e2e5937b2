"""The ONNX Runtime backend against the numpy reference: same names, same init, same training."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytest.importorskip("onnx", reason="the onnx extra is not installed")

import onnxruntime

import fedclient
from fedclient.protocol import ModelSpec
from fedclient.runtime import (
    NumpyModel,
    OnnxBackend,
    TrainingBackend,
    create_backend,
    read_manifest,
)
from fedclient.sim.datasets import Dataset

SPECS = [
    ModelSpec("softmax", 64, [], 10),
    ModelSpec("mlp", 64, [32], 10),
    ModelSpec("mlp", 64, [24, 16], 10),
]


def _onnx(spec: ModelSpec, seed: int = 0) -> OnnxBackend:
    backend = create_backend(spec, "onnx", seed=seed)
    assert isinstance(backend, OnnxBackend)
    return backend


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}{s.hidden}")
def test_initial_weights_are_the_numpy_models_by_name(spec: ModelSpec) -> None:
    onnx_weights = _onnx(spec, seed=3).get_weights()
    numpy_weights = NumpyModel(spec, seed=3).get_weights()
    assert list(onnx_weights) == list(numpy_weights)  # same names, same order
    for name, value in numpy_weights.items():
        assert onnx_weights[name].dtype == np.float32
        np.testing.assert_array_equal(onnx_weights[name], value, err_msg=name)
    assert isinstance(_onnx(spec), TrainingBackend)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}{s.hidden}")
def test_training_matches_numpy_within_1e_4(spec: ModelSpec, digits: Dataset) -> None:
    # 300 examples in batches of 16: every epoch ends with a smaller batch of 12.
    x, y = digits.x_train[:300], digits.y_train[:300]
    results = {}
    models: dict[str, TrainingBackend] = {"numpy": NumpyModel(spec, seed=5), "onnx": _onnx(spec, 5)}
    for name, model in models.items():
        results[name] = model.train(
            x, y, epochs=4, batch_size=16, learning_rate=0.1, rng=np.random.default_rng(11)
        )
    assert results["onnx"].steps == results["numpy"].steps == 4 * 19
    assert results["onnx"].loss == pytest.approx(results["numpy"].loss, abs=1e-4)
    trained = {name: m.get_weights() for name, m in models.items()}
    initial = NumpyModel(spec, seed=5).get_weights()
    for name, value in trained["numpy"].items():
        assert np.abs(value - initial[name]).max() > 1e-2  # training really moved the weights
        np.testing.assert_allclose(trained["onnx"][name], value, atol=1e-4, rtol=0, err_msg=name)
    numpy_eval = models["numpy"].evaluate(digits.x_test, digits.y_test)
    onnx_eval = models["onnx"].evaluate(digits.x_test, digits.y_test)
    assert onnx_eval.accuracy == numpy_eval.accuracy > 0.5  # chance is 0.1
    assert onnx_eval.loss == pytest.approx(numpy_eval.loss, abs=1e-4)
    np.testing.assert_allclose(
        models["onnx"].predict(digits.x_test), models["numpy"].predict(digits.x_test), atol=1e-5
    )


def test_weights_set_on_one_runtime_continue_on_the_other(digits: Dataset) -> None:
    spec = SPECS[1]
    numpy_model, onnx_model = NumpyModel(spec, seed=1), _onnx(spec, seed=2)
    kwargs = {"epochs": 1, "batch_size": 8, "learning_rate": 0.05}
    numpy_model.train(
        digits.x_train[:64], digits.y_train[:64], rng=np.random.default_rng(0), **kwargs
    )
    onnx_model.set_weights(numpy_model.get_weights())
    for model in (numpy_model, onnx_model):
        model.train(
            digits.x_train[64:128], digits.y_train[64:128], rng=np.random.default_rng(1), **kwargs
        )
    for name, value in numpy_model.get_weights().items():
        np.testing.assert_allclose(onnx_model.get_weights()[name], value, atol=1e-5, err_msg=name)


def test_set_weights_rejects_wrong_names_shapes_and_dtypes() -> None:
    model = _onnx(SPECS[1])
    good = model.get_weights()
    with pytest.raises(fedclient.InvalidInput, match="names"):
        model.set_weights({k: v for k, v in good.items() if k != "fc2.bias"})
    with pytest.raises(fedclient.InvalidInput, match=r"fc1\.weight"):
        model.set_weights({**good, "fc1.weight": good["fc1.weight"].T.copy()})
    with pytest.raises(fedclient.InvalidInput, match="float64"):
        model.set_weights({**good, "fc1.bias": good["fc1.bias"].astype(np.float64)})
    changed = {k: v + 1 for k, v in good.items()}
    model.set_weights(changed)
    for name, value in model.get_weights().items():
        np.testing.assert_array_equal(value, changed[name])


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        (np.zeros((4, 63), np.float32), np.zeros(4, np.int64), r"shape \(n, 64\)"),
        (np.zeros((4, 64), np.float32), np.zeros(3, np.int64), r"shape \(4,\)"),
        (np.full((4, 64), "a"), np.zeros(4, np.int64), "real numbers"),
        (np.full((4, 64), np.nan, np.float32), np.zeros(4, np.int64), "NaN"),
        (np.zeros((4, 64), np.float32), np.zeros(4, np.float32), "integers"),
        (np.zeros((4, 64), np.float32), np.array([0, 1, 2, 10]), r"\[0, 10\)"),
        (np.zeros((4, 64), np.float32), np.array([0, -1, 2, 3]), r"\[0, 10\)"),
        (np.zeros((0, 64), np.float32), np.zeros(0, np.int64), "empty"),
    ],
    ids=[
        "features",
        "labels-shape",
        "dtype",
        "nan",
        "float-labels",
        "label-high",
        "label-low",
        "empty",
    ],
)
def test_bad_inputs_raise_invalid_input(x: np.ndarray, y: np.ndarray, match: str) -> None:
    model = _onnx(SPECS[1])
    before = model.get_weights()
    with pytest.raises(fedclient.InvalidInput, match=match):
        model.train(x, y, epochs=1, batch_size=2, learning_rate=0.1, rng=np.random.default_rng(0))
    with pytest.raises(fedclient.InvalidInput, match=match):
        model.evaluate(x, y)
    for name, value in model.get_weights().items():  # nothing trained on bad data
        np.testing.assert_array_equal(value, before[name])


def test_exported_inference_model_runs_in_a_plain_session(tmp_path: Path, digits: Dataset) -> None:
    model = _onnx(SPECS[1])
    model.train(
        digits.x_train[:100],
        digits.y_train[:100],
        epochs=1,
        batch_size=10,
        learning_rate=0.1,
        rng=np.random.default_rng(0),
    )
    path = model.export_inference_model(tmp_path / "exported.onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": digits.x_test})
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probs, model.predict(digits.x_test), atol=1e-6)
    reference = NumpyModel(SPECS[1])
    reference.set_weights(model.get_weights())
    np.testing.assert_allclose(probs, reference.predict(digits.x_test), atol=1e-5)


def test_bundles_are_cached_by_spec_and_seed_and_rebuilt_when_damaged(bundle_cache: Path) -> None:
    spec = ModelSpec("mlp", 12, [5], 3)
    first = _onnx(spec, seed=0).bundle
    assert first.is_relative_to(bundle_cache)
    assert _onnx(spec, seed=0).bundle == first
    assert _onnx(spec, seed=1).bundle != first
    assert _onnx(ModelSpec("mlp", 12, [6], 3), seed=0).bundle != first
    checkpoint = first / "checkpoint"
    checkpoint.write_bytes(b"garbage")
    with pytest.raises(fedclient.InvalidInput, match="checksum"):
        read_manifest(first)
    rebuilt = _onnx(spec, seed=0)  # the damaged entry is rebuilt in place
    assert rebuilt.bundle == first
    read_manifest(first)
    np.testing.assert_array_equal(
        rebuilt.get_weights()["fc1.weight"], NumpyModel(spec).get_weights()["fc1.weight"]
    )


def test_manifest_describes_the_bundle() -> None:
    spec = SPECS[1]
    manifest = _onnx(spec).manifest
    assert [(p.name, p.shape, p.dtype) for p in manifest.parameters] == [
        (name, list(value.shape), "float32")
        for name, value in NumpyModel(spec).get_weights().items()
    ]
    assert manifest.input.shape == [None, 64] and manifest.input.dtype == "float32"
    assert manifest.labels.dtype == "int64" and manifest.classes == 10
    assert manifest.ops == {"Gemm": 2, "Relu": 1}
    assert manifest.spec() == spec
    assert set(manifest.files) == {
        "checkpoint",
        "training_model",
        "eval_model",
        "optimizer_model",
        "step_model",
        "forward_model",
        "inference_model",
    }
    assert manifest.engines == ["training", "plain"]


def test_unknown_runtime_is_refused() -> None:
    with pytest.raises(fedclient.InvalidInput, match="available: numpy, onnx"):
        create_backend(SPECS[0], "coreml")


def test_the_onnx_backend_never_runs_the_torch_importing_package_init(tmp_path: Path) -> None:
    # onnxruntime.training's __init__ imports torch; the backend must load without running it.
    if importlib.util.find_spec("torch") is not None:
        pytest.skip(
            "torch is installed: importing onnxruntime itself then loads it (a device has none)"
        )
    code = (
        "import sys; import fedclient\n"
        "assert 'onnxruntime' not in sys.modules\n"
        "from fedclient.protocol import ModelSpec\n"
        "m = fedclient.create_backend(ModelSpec('mlp', 8, [4], 3), 'onnx')\n"
        "pkg = sys.modules['onnxruntime.training']\n"
        "print('torch' in sys.modules, hasattr(pkg, 'TrainingParameters'), m.runtime)\n"
    )
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "FEDCLIENT_CACHE_DIR": str(tmp_path)},
    )
    assert out.stdout.split() == ["False", "False", "onnx"]
    assert "GraphTransformer" not in out.stderr  # generate_artifacts' INFO lines are hidden
