"""The TFLite backend (LiteRT) against the numpy reference and the ONNX inference model.

The models are the converted ones shipped in ``fedclient/runtime/models/``; converting
needs TensorFlow, which only the slow test at the end uses (skipped without it).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import fedclient
from fedclient.protocol import ModelSpec
from fedclient.runtime import (
    NumpyModel,
    TfliteBackend,
    TrainingBackend,
    create_backend,
    read_tflite_manifest,
)
from fedclient.runtime._tflite import MODELS_DIR, interpreter_class, manifest_path, model_filename
from fedclient.sim.datasets import Dataset

try:
    interpreter_class()
except fedclient.InvalidInput:
    pytest.skip("the tflite extra is not installed (ai-edge-litert)", allow_module_level=True)

#: The shipped models (fedclient/convert/make_tflite_models.py SHIPPED).
SPECS = [
    ModelSpec("softmax", 64, [], 10),
    ModelSpec("mlp", 64, [16], 10),
    ModelSpec("mlp", 64, [32], 10),
    ModelSpec("mlp", 64, [64], 10),
]
IDS = [model_filename(s).removesuffix(".tflite") for s in SPECS]


def _tflite(spec: ModelSpec, seed: int = 0) -> TfliteBackend:
    backend = create_backend(spec, "tflite", seed=seed)
    assert isinstance(backend, TfliteBackend)
    return backend


def _trained_weights(spec: ModelSpec, digits: Dataset) -> dict[str, np.ndarray]:
    """Weights far from the initial ones, so logits spread like a real model's."""
    model = NumpyModel(spec, seed=4)
    model.train(
        digits.x_train[:400],
        digits.y_train[:400],
        epochs=3,
        batch_size=16,
        learning_rate=0.1,
        rng=np.random.default_rng(0),
    )
    return model.get_weights()


def test_importing_fedclient_loads_no_tflite_runtime_until_a_backend_is_built() -> None:
    code = (
        "import sys, fedclient, fedclient.runtime\n"
        "heavy = {'ai_edge_litert', 'tflite_runtime', 'tensorflow'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
        "from fedclient.protocol import ModelSpec\n"
        "m = fedclient.create_backend(ModelSpec('softmax', 64, [], 10), 'tflite')\n"
        "print(m.runtime, sorted({n.split('.')[0] for n in sys.modules} & heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, check=True
    )
    before, after = out.stdout.strip().splitlines()
    assert before == "[]"
    assert after.startswith("tflite [") and "tensorflow" not in after


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_initial_weights_are_the_numpy_models_by_name(spec: ModelSpec) -> None:
    model = _tflite(spec, seed=3)
    assert isinstance(model, TrainingBackend)
    weights = model.get_weights()
    numpy_weights = NumpyModel(spec, seed=3).get_weights()
    assert list(weights) == list(numpy_weights)  # same names, same order
    for name, value in numpy_weights.items():
        assert weights[name].dtype == np.float32
        np.testing.assert_array_equal(weights[name], value, err_msg=name)
    assert (model.inputs, model.classes, model.train_batch) == (64, 10, 16)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_inference_matches_the_onnx_inference_model_within_1e_5(
    spec: ModelSpec, digits: Dataset
) -> None:
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    weights = _trained_weights(spec, digits)
    onnx_model, tflite_model = create_backend(spec, "onnx"), _tflite(spec)
    onnx_model.set_weights(weights)
    tflite_model.set_weights(weights)
    # More rows than one inference chunk (2048), and sizes that are not multiples of anything.
    x = np.concatenate([digits.x_test] * 6)[:2501]
    expected = onnx_model.predict(x)
    for rows in (x, x[:1], x[:17]):
        got = tflite_model.predict(rows)
        assert got.shape == (len(rows), 10) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected[: len(rows)], atol=1e-5, rtol=0)
    onnx_eval = onnx_model.evaluate(digits.x_test, digits.y_test)
    tflite_eval = tflite_model.evaluate(digits.x_test, digits.y_test)
    assert tflite_eval.accuracy == onnx_eval.accuracy > 0.5  # chance is 0.1
    assert tflite_eval.loss == pytest.approx(onnx_eval.loss, abs=1e-5)


@pytest.mark.parametrize(
    "batch_size",
    [16, 5, 40],
    ids=["fixed-batch", "padded", "accumulated"],
)
@pytest.mark.parametrize("spec", [SPECS[0], SPECS[2]], ids=[IDS[0], IDS[2]])
def test_training_matches_numpy_within_1e_5(
    spec: ModelSpec, batch_size: int, digits: Dataset
) -> None:
    # 300 examples: the last minibatch of every epoch is smaller (12, 0 and 20 examples), so
    # padding and masking run in every case; batches of 40 exceed the model's fixed 16 and
    # are accumulated in chunks.
    x, y = digits.x_train[:300], digits.y_train[:300]
    models: dict[str, TrainingBackend] = {
        "numpy": NumpyModel(spec, seed=5),
        "tflite": _tflite(spec, 5),
    }
    results = {
        name: model.train(
            x, y, epochs=3, batch_size=batch_size, learning_rate=0.1, rng=np.random.default_rng(11)
        )
        for name, model in models.items()
    }
    steps = 3 * -(-300 // batch_size)
    assert results["tflite"].steps == results["numpy"].steps == steps
    assert results["tflite"].num_examples == 300
    assert results["tflite"].loss == pytest.approx(results["numpy"].loss, abs=1e-5)
    initial = NumpyModel(spec, seed=5).get_weights()
    trained = {name: m.get_weights() for name, m in models.items()}
    for name, value in trained["numpy"].items():
        assert np.abs(value - initial[name]).max() > 1e-2  # training really moved the weights
        np.testing.assert_allclose(trained["tflite"][name], value, atol=1e-5, rtol=0, err_msg=name)


def test_weights_set_on_one_runtime_continue_on_the_other(digits: Dataset) -> None:
    spec = SPECS[1]
    numpy_model, tflite_model = NumpyModel(spec, seed=1), _tflite(spec, seed=2)
    kwargs = {"epochs": 1, "batch_size": 8, "learning_rate": 0.05}
    tflite_model.train(
        digits.x_train[:64], digits.y_train[:64], rng=np.random.default_rng(0), **kwargs
    )
    numpy_model.set_weights(tflite_model.get_weights())
    for model in (numpy_model, tflite_model):
        model.train(
            digits.x_train[64:128], digits.y_train[64:128], rng=np.random.default_rng(1), **kwargs
        )
    for name, value in numpy_model.get_weights().items():
        np.testing.assert_allclose(tflite_model.get_weights()[name], value, atol=1e-5, err_msg=name)


def test_set_weights_rejects_wrong_names_shapes_and_dtypes() -> None:
    model = _tflite(SPECS[2])
    good = model.get_weights()
    with pytest.raises(fedclient.InvalidInput, match="names"):
        model.set_weights({k: v for k, v in good.items() if k != "fc2.bias"})
    with pytest.raises(fedclient.InvalidInput, match=r"fc1\.weight"):
        model.set_weights({**good, "fc1.weight": good["fc1.weight"].T.copy()})
    with pytest.raises(fedclient.InvalidInput, match="float64"):
        model.set_weights({**good, "fc1.bias": good["fc1.bias"].astype(np.float64)})
    np.testing.assert_array_equal(model.get_weights()["fc1.bias"], good["fc1.bias"])
    changed = {k: v + 1 for k, v in good.items()}
    model.set_weights(changed)
    for name, value in model.get_weights().items():
        np.testing.assert_array_equal(value, changed[name])


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        (np.zeros((4, 63), np.float32), np.zeros(4, np.int64), r"shape \(n, 64\)"),
        (np.zeros((4, 8, 8), np.float32), np.zeros(4, np.int64), r"shape \(n, 64\)"),
        (np.zeros((4, 64), np.float32), np.zeros(3, np.int64), r"shape \(4,\)"),
        (np.full((4, 64), "a"), np.zeros(4, np.int64), "real numbers"),
        (np.full((4, 64), np.nan, np.float32), np.zeros(4, np.int64), "NaN"),
        (np.full((4, 64), 1e39), np.zeros(4, np.int64), "Inf"),
        (np.zeros((4, 64), np.float32), np.zeros(4, np.float32), "integers"),
        (np.zeros((4, 64), np.float32), np.array([0, 1, 2, 10]), r"\[0, 10\)"),
        (np.zeros((4, 64), np.float32), np.array([0, -1, 2, 3]), r"\[0, 10\)"),
        (np.zeros((0, 64), np.float32), np.zeros(0, np.int64), "empty"),
    ],
    ids=[
        "features",
        "images",
        "labels-shape",
        "dtype",
        "nan",
        "float32-overflow",
        "float-labels",
        "label-high",
        "label-low",
        "empty",
    ],
)
def test_bad_inputs_raise_invalid_input(x: np.ndarray, y: np.ndarray, match: str) -> None:
    model = _tflite(SPECS[2])
    before = model.get_weights()
    with pytest.raises(fedclient.InvalidInput, match=match):
        model.train(x, y, epochs=1, batch_size=2, learning_rate=0.1, rng=np.random.default_rng(0))
    with pytest.raises(fedclient.InvalidInput, match=match):
        model.evaluate(x, y)
    for name, value in model.get_weights().items():  # nothing trained on bad data
        np.testing.assert_array_equal(value, before[name])


def test_bad_training_settings_and_predict_inputs_raise_invalid_input(digits: Dataset) -> None:
    model = _tflite(SPECS[2])
    x, y = digits.x_train[:20], digits.y_train[:20]
    for settings in ({"epochs": 0}, {"batch_size": 0}, {"learning_rate": 0.0}):
        kwargs = {"epochs": 1, "batch_size": 4, "learning_rate": 0.1, **settings}
        with pytest.raises(fedclient.InvalidInput, match="epochs and batch_size"):
            model.train(x, y, rng=np.random.default_rng(0), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(fedclient.InvalidInput, match=r"shape \(n, 64\)"):
        model.predict(np.zeros(64, np.float32))
    with pytest.raises(fedclient.InvalidInput, match="empty"):
        model.predict(np.zeros((0, 64), np.float32))


def test_a_model_file_that_does_not_match_its_manifest_is_refused(tmp_path: Path) -> None:
    name = model_filename(SPECS[0])
    copy = tmp_path / name
    shutil.copy(MODELS_DIR / name, copy)
    shutil.copy(manifest_path(MODELS_DIR / name), manifest_path(copy))
    assert TfliteBackend(copy).manifest == read_tflite_manifest(MODELS_DIR / name)
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(fedclient.InvalidInput, match="checksum"):
        TfliteBackend(copy)
    manifest_path(copy).write_text("{not json")
    with pytest.raises(fedclient.InvalidInput, match="not a valid TFLite model manifest"):
        TfliteBackend(copy)
    with pytest.raises(fedclient.InvalidInput, match="no such TFLite model"):
        TfliteBackend(tmp_path / "missing.tflite")
    (tmp_path / "junk.tflite").write_bytes(b"not a flatbuffer")
    with pytest.raises(fedclient.InvalidInput, match="cannot load"):
        TfliteBackend(tmp_path / "junk.tflite")


def test_without_a_manifest_parameters_are_named_by_signature_key(tmp_path: Path) -> None:
    name = model_filename(SPECS[2])
    shutil.copy(MODELS_DIR / name, tmp_path / name)
    model = TfliteBackend(tmp_path / name)
    assert model.manifest is None and model.classes == 10 and model.inputs == 64
    assert sorted(model.get_weights()) == ["fc1_bias", "fc1_weight", "fc2_bias", "fc2_weight"]


def test_specs_without_a_shipped_model_are_refused_with_the_command_that_makes_one(
    bundle_cache: Path,
) -> None:
    with pytest.raises(fedclient.InvalidInput, match=r"make_tflite_models\.py .*mlp-64-24-10"):
        create_backend(ModelSpec("mlp", 64, [24], 10), "tflite")
    with pytest.raises(fedclient.InvalidInput, match="mlp and softmax"):
        create_backend(ModelSpec("cnn", 64, [8, 16], 10), "tflite")
    # A model the user converted into the cache is found there.
    cached = bundle_cache / "tflite" / "mlp-64-24-10.tflite"
    cached.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(MODELS_DIR / "mlp-64-32-10.tflite", cached)
    shutil.copy(manifest_path(MODELS_DIR / "mlp-64-32-10.tflite"), manifest_path(cached))
    try:  # ... and checked against the spec: this one is a renamed 64-32-10
        with pytest.raises(fedclient.InvalidInput, match="was converted from"):
            create_backend(ModelSpec("mlp", 64, [24], 10), "tflite")
    finally:
        shutil.rmtree(cached.parent)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_shipped_models_pass_fedconverts_verification(spec: ModelSpec) -> None:
    from fedclient.convert._references import NumpyReference
    from fedclient.convert._tflite import verify_tflite

    path = MODELS_DIR / model_filename(spec)
    verification = verify_tflite(path, NumpyReference(NumpyModel(spec, seed=0)))
    assert verification.passed, verification.checks
    names = [c.name for c in verification.checks]
    assert names == [
        "files",
        "initial weights",
        "inference",
        "loss",
        "training step (padded)",
        "training step (accumulated)",
    ]
    manifest = read_tflite_manifest(path)
    assert manifest is not None and manifest.spec() == spec
    assert manifest.file.bytes < 100_000  # small enough to commit


@pytest.mark.slow
def test_tensorflow_converts_a_model_that_litert_trains_like_numpy(tmp_path: Path) -> None:
    pytest.importorskip(
        "tensorflow",
        reason="TensorFlow is not installed (build time only; "
        "see fedclient/convert/make_tflite_models.py)",
    )
    from fedclient.convert.make_tflite_models import main as make_models

    started = time.perf_counter()
    assert make_models(["--out", str(tmp_path), "mlp-64-32-10", "softmax-64-10"]) == 0
    seconds = time.perf_counter() - started
    for name in ("mlp-64-32-10.tflite", "softmax-64-10.tflite"):
        made, shipped = (
            read_tflite_manifest(tmp_path / name),
            read_tflite_manifest(MODELS_DIR / name),
        )
        assert made is not None and shipped is not None
        if made.tensorflow == shipped.tensorflow:  # conversion is deterministic per TF version
            assert made.file == shipped.file, f"{name}: regenerate the shipped models"
    assert seconds < 120
    # A conversion with another training batch trains exactly like numpy all the same.
    from fedclient.convert._tflite import convert_tflite

    spec = SPECS[2]
    convert_tflite(spec, tmp_path / "b4.tflite", train_batch=4, seed=5)
    model, reference = TfliteBackend(tmp_path / "b4.tflite"), NumpyModel(spec, seed=5)
    assert model.train_batch == 4
    rng = np.random.default_rng(0)
    x, y = rng.random((30, 64), dtype=np.float32), rng.integers(0, 10, 30)
    for m in (model, reference):
        m.train(x, y, epochs=2, batch_size=7, learning_rate=0.1, rng=np.random.default_rng(1))
    for name, value in reference.get_weights().items():
        np.testing.assert_allclose(model.get_weights()[name], value, atol=1e-5, err_msg=name)


def test_a_model_converted_with_0d_scalar_inputs_still_trains_like_numpy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Models converted before the scalar inputs became shape [1] take them 0-d; the
    # backend feeds each scalar in the shape the model declares.
    pytest.importorskip(
        "tensorflow",
        reason="TensorFlow is not installed (build time only; "
        "see fedclient/convert/make_tflite_models.py)",
    )
    from fedclient.convert import _tflite as convert

    monkeypatch.setattr(convert, "_SCALAR_SHAPE", [])
    spec = SPECS[0]
    convert.convert_tflite(spec, tmp_path / "old.tflite", train_batch=4, seed=3)
    model, reference = TfliteBackend(tmp_path / "old.tflite"), NumpyModel(spec, seed=3)
    interpreter = interpreter_class()(model_path=str(tmp_path / "old.tflite"))
    for signature, name in [
        ("train", "learning_rate"),
        ("apply_gradients", "learning_rate"),
        ("apply_gradients", "count"),
    ]:
        details = interpreter.get_signature_runner(signature).get_input_details()
        assert list(details[name]["shape"]) == [], (signature, name)
    rng = np.random.default_rng(0)
    x, y = rng.random((30, 64), dtype=np.float32), rng.integers(0, 10, 30)
    for batch_size in (3, 7):  # train, then accumulate + apply_gradients
        for m in (model, reference):
            m.train(
                x,
                y,
                epochs=1,
                batch_size=batch_size,
                learning_rate=0.1,
                rng=np.random.default_rng(1),
            )
        for name, value in reference.get_weights().items():
            np.testing.assert_allclose(model.get_weights()[name], value, atol=1e-5, err_msg=name)


def test_shipped_models_take_scalar_inputs_of_shape_1() -> None:
    interpreter = interpreter_class()(model_path=str(MODELS_DIR / model_filename(SPECS[0])))
    train = interpreter.get_signature_runner("train").get_input_details()
    apply = interpreter.get_signature_runner("apply_gradients").get_input_details()
    shapes = [train["learning_rate"], apply["learning_rate"], apply["count"]]
    assert [list(d["shape"]) for d in shapes] == [[1], [1], [1]]


def test_environment_keeps_the_onnx_training_build() -> None:
    # ai-edge-litert must not pull in plain onnxruntime, which overwrites the training build.
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    code = (
        "from fedclient.runtime import _ort; api = _ort.training_api(); "
        "import ai_edge_litert.interpreter; print(api.CheckpointState.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "CheckpointState"
