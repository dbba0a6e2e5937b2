"""``fedconvert model.keras --tflite``: a user's Keras model becomes a .tflite model that
`TfliteBackend` trains like TensorFlow.

Converting needs TensorFlow (with tf-keras), which CI does not install: those tests skip
without it. Run them in a TensorFlow venv as the README's TFLite section shows.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedclient
from fedclient.convert.cli import main as fedconvert
from fedclient.runtime import TfliteBackend, read_tflite_manifest

NO_TENSORFLOW = (
    "TensorFlow is not installed (conversion only, in its own venv: see the README's "
    "TFLite section for the commands that run these tests)"
)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = fedconvert(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def keras() -> Any:
    """tf-keras (Keras 2, as ``TF_USE_LEGACY_KERAS=1`` makes ``tf.keras``), or a skip."""
    from fedclient.convert._tflite import tensorflow

    try:
        tensorflow()
        from fedclient.runtime._tflite import interpreter_class

        interpreter_class()
    except fedclient.InvalidInput:
        pytest.skip(NO_TENSORFLOW)
    return pytest.importorskip("tf_keras", reason=NO_TENSORFLOW)


def _trainable(model: Any) -> dict[str, np.ndarray]:
    """A Keras model's trainable weights by the names fedconvert gives them."""
    return {
        f"{layer.name}/{w.name.rsplit('/', 1)[-1].split(':')[0]}": np.array(w.numpy())
        for layer in model.layers
        for w in layer.trainable_weights
    }


def _save(model: Any, path: Path) -> Path:
    with warnings.catch_warnings():  # Keras calls HDF5 legacy, and TensorFlow logs via warnings
        warnings.simplefilter("ignore")
        model.save(str(path))
    return path


# -- without TensorFlow too ------------------------------------------------------------------


def test_importing_the_converter_loads_no_tensorflow() -> None:
    code = (
        "import sys, fedclient.convert, fedclient.convert.cli, fedclient.convert._keras\n"
        "heavy = {'tensorflow', 'tf_keras', 'keras'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_a_keras_file_converts_to_tflite_only_and_is_checked_before_tensorflow_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = str(tmp_path / "net.keras")
    for argv, message in [
        ([model], "converts to TFLite only: add --tflite"),
        ([model, "--tflite", "--freeze", "conv."], "set layer.trainable = False"),
        ([model, "--tflite"], "no such file"),
        ([str(tmp_path / "net.h5"), "--tflite"], "no such file"),
    ]:
        code, out, err = _run(capsys, *argv, "-o", str(tmp_path / "x"))
        assert (code, out) == (2, "") and message in err, (argv, err)


# -- with TensorFlow ---------------------------------------------------------------------------


def _cnn(keras: Any) -> Any:
    """Conv, depthwise conv, both poolings, ReLU6, dense layers and a softmax output."""
    layers = keras.layers
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            layers.Input((8, 8, 1)),
            layers.Conv2D(4, 3, padding="same", activation="relu", name="conv"),
            layers.MaxPooling2D(name="pool"),
            layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="depthwise"),
            layers.ReLU(6.0, name="relu6"),
            layers.AveragePooling2D(2, strides=1, name="average"),
            layers.Flatten(name="flatten"),
            layers.Dense(16, activation="relu", name="hidden"),
            layers.Dense(10, activation="softmax", name="head"),
        ],
        name="cnn",
    )


def test_a_keras_cnn_converts_and_litert_trains_it_like_tensorflow(
    keras: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _cnn(keras)
    path = _save(model, tmp_path / "cnn.keras")
    out = tmp_path / "bundle"
    code, printed, _ = _run(capsys, str(path), "--tflite", "-o", str(out), "--train-batch", "8")
    assert code == 0, printed
    assert "verification: ai-edge-litert" in printed and "TFLite model verified" in printed
    code, printed, _ = _run(
        capsys, str(path), "--tflite", "-o", str(out), "--train-batch", "8", "--json"
    )
    summary = json.loads(printed)["tflite"]
    assert code == 0 and summary["verification"]["passed"]
    checks = {c["name"]: c for c in summary["verification"]["checks"]}
    assert {"inference", "loss", "training step (padded)", "training step (accumulated)"} <= set(
        checks
    )
    assert all(c["error"] <= 1e-5 for c in checks.values())
    manifest = read_tflite_manifest(out / "model.tflite")
    assert manifest is not None and manifest.model_spec is None
    assert "softmax of 'head' dropped" in manifest.source
    assert [p.name for p in manifest.parameters] == [
        "conv/kernel",
        "conv/bias",
        "depthwise/depthwise_kernel",
        "depthwise/bias",
        "hidden/kernel",
        "hidden/bias",
        "head/kernel",
        "head/bias",
    ]
    assert (manifest.input.shape, manifest.classes) == ([None, 64], 10)

    # The runtime trains it unchanged; Keras trains the same minibatches with its own SGD.
    backend = TfliteBackend(out / "model.tflite")
    assert backend.get_weights().keys() == _trainable(model).keys()
    data = np.random.default_rng(7)
    x, y = data.random((30, 64), dtype=np.float32), data.integers(0, 10, 30)
    epochs, batch, lr = 2, 12, 0.05  # 12 > the fixed 8: accumulated; the last 6: padded
    backend.train(
        x, y, epochs=epochs, batch_size=batch, learning_rate=lr, rng=np.random.default_rng(1)
    )
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=lr),
        loss=keras.losses.SparseCategoricalCrossentropy(),
    )
    order = np.random.default_rng(1)
    for _ in range(epochs):
        permutation = order.permutation(len(x))
        for start in range(0, len(x), batch):
            idx = permutation[start : start + batch]
            model.train_on_batch(x[idx].reshape(-1, 8, 8, 1), y[idx])
    trained = backend.get_weights()
    for name, value in _trainable(model).items():
        np.testing.assert_allclose(trained[name], value, atol=1e-5, err_msg=name)
    probabilities = model(x.reshape(-1, 8, 8, 1), training=False).numpy()
    np.testing.assert_allclose(backend.predict(x), probabilities, atol=1e-5)


def test_a_functional_model_with_frozen_layers_keeps_them_on_the_device(
    keras: Any, tmp_path: Path
) -> None:
    from fedclient.convert._keras import keras_convert_and_verify
    from fedclient.convert._tflite import render_tflite

    layers = keras.layers
    keras.utils.set_random_seed(1)
    inputs = layers.Input((10, 10, 2))
    stem = layers.Conv2D(6, 3, strides=2, padding="same", name="stem", trainable=False)(inputs)
    stem = layers.BatchNormalization(name="norm")(stem)
    branch = layers.Conv2D(6, 3, padding="same", activation="relu6", name="branch")(stem)
    merged = layers.ZeroPadding2D(1)(layers.Add()([stem, branch]))
    down = layers.LeakyReLU(0.1)(layers.Conv2D(4, 3, strides=2, name="down")(merged))
    pooled = layers.Concatenate()(
        [layers.GlobalAveragePooling2D()(down), layers.GlobalMaxPooling2D()(down)]
    )
    logits = layers.Dense(3, name="head")(layers.Dropout(0.5)(pooled))
    model = keras.Model(inputs, layers.Softmax()(logits))
    path = _save(model, tmp_path / "residual.h5")

    lite = keras_convert_and_verify(path, tmp_path / "residual.tflite", train_batch=4)
    assert lite.verification is not None and lite.verification.passed, render_tflite(lite)
    # The frozen conv and BatchNormalization's statistics are constants: they never travel.
    assert [p.name for p in lite.manifest.parameters] == [
        "norm/gamma",
        "norm/beta",
        "branch/kernel",
        "branch/bias",
        "down/kernel",
        "down/bias",
        "head/kernel",
        "head/bias",
    ]
    backend = TfliteBackend(lite.path)
    x, y = np.random.default_rng(2).random((9, 200), dtype=np.float32), np.arange(9) % 3
    before = backend.evaluate(x, y).loss
    backend.train(x, y, epochs=5, batch_size=4, learning_rate=0.1, rng=np.random.default_rng(0))
    assert backend.evaluate(x, y).loss < before


def test_a_model_that_keras_3_saved_converts_too(keras: Any, tmp_path: Path) -> None:
    from fedclient.convert._keras import keras_convert_and_verify

    try:
        keras3 = importlib.import_module("keras")
    except ImportError:
        pytest.skip("Keras 3 is not installed")
    layers = keras3.layers
    keras3.utils.set_random_seed(0)
    model = keras3.Sequential(
        [
            layers.Input((6, 6, 1)),
            layers.Conv2D(3, 3, activation="relu", name="conv"),
            layers.MaxPooling2D(name="pool"),
            layers.Flatten(),
            layers.Dense(4, activation="softmax", name="head"),
        ]
    )
    path = _save(model, tmp_path / "keras3.keras")
    lite = keras_convert_and_verify(path, tmp_path / "keras3.tflite")
    assert lite.verification is not None and lite.verification.passed
    assert "Keras 3." in lite.verification.reference
    assert [p.name for p in lite.manifest.parameters] == [
        "conv/kernel",
        "conv/bias",
        "head/kernel",
        "head/bias",
    ]


def test_layers_that_cannot_train_on_litert_are_named(
    keras: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layers = keras.layers
    cases = [
        ([layers.Input((4, 3)), layers.LSTM(2, name="memory"), layers.Dense(2)], "'memory' (LSTM)"),
        (
            [layers.Input((6, 6, 1)), layers.Conv2D(2, 3, dilation_rate=2, name="wide")],
            "'wide' (Conv2D): dilated",
        ),
        (
            [
                layers.Input((4,)),
                layers.Dense(3, activation="softmax", name="mid"),
                layers.Dense(2),
            ],
            "'mid' (Dense): softmax is supported only at the model's output",
        ),
        (
            [layers.Input((4,)), layers.Dense(1, activation="sigmoid", name="out")],
            "'out' (Dense): a sigmoid output",
        ),
    ]
    for i, (stack, message) in enumerate(cases):
        path = _save(keras.Sequential(stack), tmp_path / f"m{i}.keras")
        code, out, err = _run(capsys, str(path), "--tflite", "-o", str(tmp_path / f"b{i}"))
        assert (code, out) == (2, "") and message in err, err
        assert "Traceback" not in err

    class Subclassed(keras.Model):  # type: ignore[misc]
        def call(self, x: Any) -> Any:
            return x

    from fedclient.convert._keras import convert_keras_tflite

    with pytest.raises(fedclient.InvalidInput, match="subclassed Keras model"):
        convert_keras_tflite(Subclassed(), tmp_path / "s.tflite")
