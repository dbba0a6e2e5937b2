"""Convert the built-in MLP and softmax models to TFLite with on-device training signatures,
and verify a converted model through the LiteRT interpreter.

Conversion needs TensorFlow, at build time only (``tensorflow-cpu==2.21.0``, a
1.6 GB environment: keep it in its own venv, never a fedclient dependency);
verification needs only LiteRT. The graph is written with the constructs that
convert to TFLite builtin ops and run on LiteRT (the official on-device
training recipe emits TensorFlow-only ops no device runs):

- ReLU as ``tf.maximum(x, 0)`` (the ReLU gradient op is TensorFlow-only);
- loss ``-sum(one_hot(y) * log_softmax(logits))`` over the rows whose mask is 1,
  divided by their count (no ``SparseSoftmaxCrossEntropyWithLogits``);
- a fixed training batch (a dynamic one emits ``BroadcastGradientArgs``);
- plain SGD by ``assign_sub`` on resource variables, and ``get_weights`` /
  ``set_weights`` signatures instead of checkpoint save/restore;
- the converter restricted to ``TFLITE_BUILTINS`` with resource variables on.

The signatures are documented in `fedclient.runtime._tflite`; `training_signatures` and
`write_tflite` build and write them for any forward pass, a Keras model's too
(`fedclient.convert._keras`).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from fedclient._exceptions import InvalidInput
from fedclient.convert._references import NumpyReference, Reference
from fedclient.convert._report import _size, _table, verification_data, verification_lines
from fedclient.convert._verify import (
    TOLERANCE,
    Check,
    Verification,
    difference,
    max_difference,
)
from fedclient.protocol import ModelSpec
from fedclient.runtime import NumpyModel
from fedclient.runtime._bundle import FileInfo, TensorInfo, file_sha256
from fedclient.runtime._tflite import (
    SIGNATURES,
    TFLITE_FORMAT,
    TfliteBackend,
    TfliteManifest,
    manifest_path,
    model_filename,
)

__all__ = [
    "TF_HINT",
    "TRAIN_BATCH",
    "TfliteConversion",
    "convert_and_verify",
    "convert_tflite",
    "render_tflite",
    "signature_key",
    "tensorflow",
    "tflite_summary",
    "training_signatures",
    "verify_tflite",
    "write_tflite",
]

#: The fixed training batch of converted models. Smaller minibatches are padded and
#: masked, larger ones accumulated in chunks (exact either way), so this only trades
#: padding work against calls: digits trains in batches of 8, MNIST and FEMNIST of 10.
TRAIN_BATCH = 16
#: The shape of the scalar inputs (``learning_rate``, ``count``): [1], not 0-d, as the
#: signature runner resizes every input before each call, and under qemu-aarch64 its
#: resize to empty dims crashes LiteRT (SIGSEGV). Models converted before take them 0-d.
_SCALAR_SHAPE = [1]
TF_HINT = (
    "converting to TFLite needs TensorFlow at build time, in its own venv (1.6 GB): "
    "python -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu==2.21.0 "
    "ai-edge-litert numpy msgspec httpx cryptography sqlite-utils safetensors"
)


def tensorflow() -> Any:
    """The ``tensorflow`` module, its C++ start-up chatter quieted."""
    # TensorFlow logs oneDNN and CPU-feature notices to stderr at import; they are not
    # the user's concern. An explicit setting by the user wins.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise InvalidInput(TF_HINT) from exc
    return tf


def signature_key(name: str) -> str:
    """A parameter name as a signature key (keys are identifiers: ``fc1.weight`` ->
    ``fc1_weight``)."""
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name)


def training_signatures(
    tf: Any,
    weights: Mapping[str, np.ndarray],
    logits: Callable[[Any, Any, list[Any]], Any],
    *,
    inputs: int,
    classes: int,
    train_batch: int,
) -> tuple[Any, dict[str, Any]]:
    """A tf.Module whose variables hold a model's trainable parameters, and the concrete
    functions of its signatures: `SIGNATURES`, with the inputs, outputs and contract that
    `fedclient.runtime._tflite` documents.

    ``weights`` are the initial parameters by signature key (`signature_key`), in the order of
    the variables; ``logits(tf, x, params)`` computes the logits ``[N, classes]`` of flat
    examples ``x[N, inputs]`` from those variables, in ops that convert to TFLite builtins.
    ``train`` and ``accumulate`` take batches of exactly ``train_batch`` rows, ``infer`` any
    number; a parameter the loss does not reach gets a zero gradient.
    """
    keys = list(weights)
    f32 = tf.float32

    class TrainableModel(tf.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(name="fedclient_model")
            self.params = [tf.Variable(weights[k], name=k) for k in keys]
            self.grads = [
                tf.Variable(tf.zeros(weights[k].shape, f32), name=f"{k}_grad") for k in keys
            ]

    module = TrainableModel()

    def summed_loss(x: Any, y: Any, mask: Any) -> Any:
        log_probs = tf.nn.log_softmax(logits(tf, x, module.params))
        per_example = -tf.reduce_sum(tf.one_hot(y, classes) * log_probs, axis=1)
        return tf.reduce_sum(per_example * mask)

    def gradients(tape: Any, loss: Any) -> Any:
        zero = tf.UnconnectedGradients.ZERO  # a parameter the loss does not reach
        return tape.gradient(loss, module.params, unconnected_gradients=zero)

    def infer(x: Any) -> Any:
        return {"logits": logits(tf, x, module.params)}

    def scalar(value: Any) -> Any:
        return tf.reshape(value, [])

    def train(x: Any, y: Any, mask: Any, learning_rate: Any) -> Any:
        with tf.GradientTape() as tape:
            loss = summed_loss(x, y, mask) / tf.maximum(tf.reduce_sum(mask), 1.0)
        for param, grad in zip(module.params, gradients(tape, loss), strict=True):
            param.assign_sub(scalar(learning_rate) * grad)
        return {"loss": loss}

    def accumulate(x: Any, y: Any, mask: Any) -> Any:
        with tf.GradientTape() as tape:
            total = summed_loss(x, y, mask)
        for acc, grad in zip(module.grads, gradients(tape, total), strict=True):
            acc.assign_add(grad)
        return {"loss_sum": total}

    def apply_gradients(learning_rate: Any, count: Any) -> Any:
        step = scalar(learning_rate) / scalar(count)
        for param, acc in zip(module.params, module.grads, strict=True):
            param.assign_sub(step * acc)
            acc.assign(tf.zeros_like(acc))
        return {"count": scalar(count)}

    def get_weights() -> Any:
        return {k: tf.identity(p) for k, p in zip(keys, module.params, strict=True)}

    def set_weights(*values: Any) -> Any:
        for param, value in zip(module.params, values, strict=True):
            param.assign(value)
        return {"count": tf.constant(len(values))}

    def spec_of(shape: Sequence[int | None], name: str, dtype: Any = f32) -> Any:
        return tf.TensorSpec(shape, dtype, name=name)

    batch = [
        spec_of([train_batch, inputs], "x"),
        spec_of([train_batch], "y", tf.int32),
        spec_of([train_batch], "mask"),
    ]
    learning_rate = spec_of(_SCALAR_SHAPE, "learning_rate")
    signatures: dict[str, tuple[Any, list[Any]]] = {
        "infer": (infer, [spec_of([None, inputs], "x")]),
        "train": (train, [*batch, learning_rate]),
        "accumulate": (accumulate, batch),
        "apply_gradients": (apply_gradients, [learning_rate, spec_of(_SCALAR_SHAPE, "count")]),
        "get_weights": (get_weights, []),
        "set_weights": (set_weights, [spec_of(list(weights[k].shape), k) for k in keys]),
    }
    functions = {
        name: tf.function(fn, input_signature=specs, autograph=False)
        for name, (fn, specs) in signatures.items()
    }
    assert tuple(functions) == SIGNATURES
    return module, {name: f.get_concrete_function() for name, f in functions.items()}


def write_tflite(
    path: str | os.PathLike[str],
    weights: Mapping[str, np.ndarray],
    logits: Callable[[Any, Any, list[Any]], Any],
    *,
    name: str,
    source: str,
    inputs: int,
    classes: int,
    train_batch: int,
    model_spec: ModelSpec | None = None,
) -> TfliteManifest:
    """Write a model as a ``.tflite`` file at ``path`` with the signatures of
    `training_signatures`, and its manifest beside it (``path`` + ``.json``). ``weights`` are
    its float32 trainable parameters by name, in order, and ``logits`` its forward pass, as
    `training_signatures` takes them; ``name``, ``source`` and ``model_spec`` (a built-in
    model's) are the manifest's. Needs TensorFlow."""
    if train_batch < 1:
        raise InvalidInput(f"the training batch must be >= 1, got {train_batch}")
    keys = {n: signature_key(n) for n in weights}
    if len(set(keys.values())) != len(keys):
        raise InvalidInput(f"weight names collide as signature keys: {sorted(keys)}")
    tf = tensorflow()
    module, signatures = training_signatures(
        tf,
        {keys[n]: v for n, v in weights.items()},
        logits,
        inputs=inputs,
        classes=classes,
        train_batch=train_batch,
    )
    with tempfile.TemporaryDirectory(prefix="fedconvert-tf-") as saved:
        # Custom gradients (a Keras model's layers carry them) are already part of the
        # training signatures; saving them apart would trace them on infer's free batch
        # size, which they do not take.
        options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
        tf.saved_model.save(module, saved, signatures=signatures, options=options)
        # Loading the saved model warns, once per signature, of those unsaved gradients.
        absl = logging.getLogger("absl")
        level = absl.level
        absl.setLevel(logging.ERROR)
        try:
            converter = tf.lite.TFLiteConverter.from_saved_model(
                saved, signature_keys=list(signatures)
            )
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
            converter.experimental_enable_resource_variables = True
            flatbuffer = converter.convert()
        except Exception as exc:  # the converter raises ConverterError and friends
            raise InvalidInput(f"TensorFlow cannot convert {name}: {exc}") from exc
        finally:
            absl.setLevel(level)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".tmp")
    partial.write_bytes(flatbuffer)
    partial.replace(target)
    manifest = TfliteManifest(
        format=TFLITE_FORMAT,
        name=name,
        source=source,
        input=TensorInfo("x", [None, inputs], "float32"),
        output=TensorInfo("logits", [None, classes], "float32"),
        classes=classes,
        train_batch=train_batch,
        parameters=[
            TensorInfo(n, [int(d) for d in v.shape], "float32") for n, v in weights.items()
        ],
        signature_keys=keys,
        signatures=list(signatures),
        file=FileInfo(target.stat().st_size, file_sha256(target)),
        tensorflow=str(tf.__version__),
        model_spec=None if model_spec is None else msgspec.to_builtins(model_spec),
    )
    sidecar = manifest_path(target)
    partial = sidecar.with_name(sidecar.name + ".tmp")
    partial.write_bytes(msgspec.json.format(msgspec.json.encode(manifest), indent=2) + b"\n")
    partial.replace(sidecar)
    return manifest


def convert_tflite(
    spec: ModelSpec,
    path: str | os.PathLike[str],
    *,
    weights: Mapping[str, np.ndarray] | None = None,
    seed: int = 0,
    train_batch: int = TRAIN_BATCH,
) -> TfliteManifest:
    """Write built-in model ``spec`` as a ``.tflite`` file at ``path`` with training signatures,
    and its manifest beside it (``path`` + ``.json``). Its variables start at ``weights``
    (default: the numpy reference's for ``seed``). Needs TensorFlow."""
    if spec.kind not in ("mlp", "softmax"):
        raise InvalidInput(
            f"TFLite conversion supports the built-in mlp and softmax models, not {spec.kind!r}"
        )
    reference = NumpyModel(spec, seed=seed).get_weights()
    if weights is None:
        weights = reference
    if {k: v.shape for k, v in weights.items()} != {k: v.shape for k, v in reference.items()}:
        raise InvalidInput(f"weights for {model_filename(spec)} must be {sorted(reference)}")
    weights = {name: np.asarray(weights[name], dtype=np.float32) for name in reference}
    layers = len(weights) // 2

    def logits(tf: Any, x: Any, params: list[Any]) -> Any:
        a = x
        for i in range(layers):
            # Weights are (out, in) like nn.Linear: TFLite's FULLY_CONNECTED layout.
            z = tf.matmul(a, params[2 * i], transpose_b=True) + params[2 * i + 1]
            a = tf.maximum(z, 0.0) if i < layers - 1 else z
        return a

    name = model_filename(spec).removesuffix(".tflite")
    return write_tflite(
        path,
        weights,
        logits,
        name=name,
        source=f"builtin:{spec.kind} {name} seed {seed}",
        inputs=spec.inputs,
        classes=spec.classes,
        train_batch=train_batch,
        model_spec=spec,
    )


def _litert_version() -> str:
    for package in ("ai-edge-litert", "tflite-runtime"):
        try:
            return f"{package} {importlib.metadata.version(package)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "LiteRT"


def verify_tflite(
    path: str | os.PathLike[str],
    reference: Reference,
    *,
    tolerance: float = TOLERANCE,
    learning_rate: float = 0.1,
    seed: int = 0,
) -> Verification:
    """Check a converted model through LiteRT against ``reference``: checksum, initial weights,
    inference logits, the loss and one SGD step on a padded minibatch (``train``), and one SGD
    step on a minibatch larger than the training batch (``accumulate`` + ``apply_gradients``)."""
    backend = TfliteBackend(path, verify=True)  # raises InvalidInput on a checksum mismatch
    checks = [Check("files", f"{Path(path).name}, sha256", 0.0, 0.0, "mismatches")]
    initial = reference.initial_weights()
    checks.append(
        Check(
            "initial weights",
            f"{len(initial)} tensors",
            max_difference(backend.get_weights(), initial),
            0.0,
        )
    )
    width = backend.train_batch or 1
    rng = np.random.default_rng(seed)
    x = rng.random((2 * width + 3, backend.inputs), dtype=np.float32)
    y = rng.integers(0, backend.classes, len(x))
    error = difference(backend.logits(x), reference.logits(x))
    checks.append(Check("inference", f"{len(x)} examples, logits", error, tolerance))
    if backend.train_batch is None:
        return Verification(reference.label, _litert_version(), checks)
    for label, count in (("padded", max(1, width - 3)), ("accumulated", len(x))):
        backend.set_weights(initial)
        xs, ys = x[:count], y[:count]
        result = backend.train(
            xs, ys, epochs=1, batch_size=count, learning_rate=learning_rate, rng=rng
        )
        if label == "padded":
            loss_error = difference(result.loss, reference.loss(initial, xs, ys))
            checks.append(
                Check("loss", "cross-entropy at the initial weights", loss_error, tolerance)
            )
        expected = reference.sgd_step(xs, ys, learning_rate)
        if expected is None:  # only references that train can check a TFLite step
            raise InvalidInput(f"{reference.label} cannot take the SGD step to compare with")
        checks.append(
            Check(
                f"training step ({label})",
                f"SGD lr {learning_rate:g}, batch {count} (fixed {width}), weights",
                max_difference(backend.get_weights(), expected),
                tolerance,
            )
        )
    return Verification(reference.label, _litert_version(), checks)


@dataclass(frozen=True)
class TfliteConversion:
    """A converted model, its manifest, its verification and the time both took."""

    path: Path
    manifest: TfliteManifest
    verification: Verification | None
    seconds: float


def convert_and_verify(
    spec: ModelSpec,
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    train_batch: int = TRAIN_BATCH,
    verify: bool = True,
    tolerance: float = TOLERANCE,
    learning_rate: float = 0.1,
) -> TfliteConversion:
    """`convert_tflite`, then `verify_tflite` against the numpy reference for ``seed``."""
    started = time.perf_counter()
    manifest = convert_tflite(spec, path, seed=seed, train_batch=train_batch)
    verification = None
    if verify:
        verification = verify_tflite(
            path,
            NumpyReference(NumpyModel(spec, seed=seed)),
            tolerance=tolerance,
            learning_rate=learning_rate,
        )
    return TfliteConversion(Path(path), manifest, verification, time.perf_counter() - started)


def render_tflite(conversion: TfliteConversion) -> str:
    """The human-readable summary of one conversion."""
    m = conversion.manifest
    lines = [f"tflite: {m.source} -> {conversion.path}", ""]
    rows = [[p.name, "x".join(map(str, p.shape)), p.dtype] for p in m.parameters]
    lines += _table(["parameter", "shape", "dtype"], rows)
    lines.append(
        f"  signatures {', '.join(m.signatures)}; training batch {m.train_batch} "
        f"(smaller minibatches padded and masked, larger ones accumulated)"
    )
    lines.append(
        f"  {conversion.path.name} {_size(m.file.bytes)} sha256 {m.file.sha256[:16]}   "
        f"TensorFlow {m.tensorflow}"
    )
    lines.append("")
    verification = conversion.verification
    if verification is None:
        lines.append("verification skipped (--no-verify)")
        return "\n".join(lines)
    lines += verification_lines(verification)
    verdict = "verified" if verification.passed else "FAILED verification"
    lines.append(f"TFLite model {verdict}; converted and checked in {conversion.seconds:.2f} s")
    return "\n".join(lines)


def tflite_summary(conversion: TfliteConversion) -> dict[str, Any]:
    """The same summary as data (``fedconvert --tflite --json``)."""
    verification = conversion.verification
    return {
        "model": str(conversion.path),
        "manifest": msgspec.to_builtins(conversion.manifest),
        "verification": verification_data(verification),
        "seconds": round(conversion.seconds, 3),
    }
