"""The TFLite backend: on-device training and inference through the LiteRT interpreter.

`TfliteBackend` runs a ``.tflite`` model with these signatures (what
``fedconvert --tflite`` and ``fedclient/convert/make_tflite_models.py`` write)::

    infer(x[N, inputs]) -> logits[N, classes]          N free, or fixed (then padded)
    train(x[B, inputs], y[B] int32, mask[B], learning_rate[1]) -> loss
                        one SGD step on the mean cross-entropy of the rows whose mask is 1
    accumulate(x[B, inputs], y[B] int32, mask[B]) -> loss_sum
                        adds the summed gradient of the masked rows to an accumulator
    apply_gradients(learning_rate[1], count[1]) -> count
                        params -= learning_rate * accumulator / count; accumulator = 0
    get_weights() -> {key: tensor}     set_weights({key: tensor}) -> count

The scalar inputs ``learning_rate`` and ``count`` are float32 of shape ``[1]``: the
signature runner resizes every input before each call, and its resize of a 0-d input
crashes LiteRT under qemu-aarch64. Models converted before take them 0-d; the
backend feeds each in the shape its model declares, so those still train.

The training batch B is fixed in the model. A minibatch smaller than B (the last of
an epoch, or a job whose batch size is below B) is padded with zero rows whose mask
is 0, so it contributes nothing to the loss or the gradient: the step equals the
numpy backend's step on the same examples, every example is used every epoch, and
the minibatches are exactly the numpy backend's (each epoch draws
``rng.permutation(n)``). A minibatch larger than B is split into padded chunks of B
whose gradients ``accumulate`` sums before ``apply_gradients`` takes one step, which
again equals one step on the whole minibatch. Models without ``accumulate`` train
minibatches of at most B; models without ``train`` only evaluate and predict.

Weights are exchanged by parameter name (``fc1.weight`` ``(out, in)``, ...), float32,
exactly like the numpy and ONNX backends, so devices on any of the three runtimes
train one model in one federation. Signature keys cannot hold dots; the model's
sidecar manifest (``MODEL.tflite.json``, `TfliteManifest`) maps names to keys.

The interpreter is ``ai_edge_litert`` (the ``[tflite]`` extra), else
``tflite_runtime`` where only that is installed. Importing this module loads neither.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from fedclient._exceptions import InvalidInput
from fedclient.protocol import ModelSpec, Weights
from fedclient.runtime._base import EvalResult, TrainResult, check_labels, cross_entropy
from fedclient.runtime._bundle import FileInfo, TensorInfo, cache_root, file_sha256

__all__ = [
    "INSTALL_HINT",
    "MODELS_DIR",
    "TFLITE_FORMAT",
    "TfliteBackend",
    "TfliteManifest",
    "builtin_model_path",
    "interpreter_class",
    "manifest_path",
    "model_filename",
    "read_tflite_manifest",
]

TFLITE_FORMAT = "fedclient-tflite/1"
INSTALL_HINT = "pip install 'fedclient[tflite]'  (ai-edge-litert>=1.4)"
#: The converted built-in models shipped with fedclient
#: (see fedclient/convert/make_tflite_models.py).
MODELS_DIR = Path(__file__).parent / "models"
#: Examples per inference call when the model's ``infer`` takes any batch size.
EVAL_CHUNK = 2048
SIGNATURES = ("infer", "train", "accumulate", "apply_gradients", "get_weights", "set_weights")


class TfliteManifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a ``.tflite`` model holds, written beside it as ``MODEL.tflite.json``.

    ``parameters`` are the trainable tensors with the names devices upload;
    ``signature_keys`` maps each name to its key in ``get_weights`` and
    ``set_weights``. ``train_batch`` is the fixed batch of ``train`` and
    ``accumulate``; ``input.shape[0]`` is ``infer``'s batch (``None``: any).
    """

    format: str
    name: str
    source: str
    input: TensorInfo
    output: TensorInfo
    classes: int
    train_batch: int | None
    parameters: list[TensorInfo]
    signature_keys: dict[str, str]
    signatures: list[str]
    file: FileInfo
    loss: str = "cross_entropy"
    optimizer: str = "sgd"
    tensorflow: str = ""
    model_spec: dict[str, Any] | None = None

    def spec(self) -> ModelSpec | None:
        """The built-in model spec, if the model was made from one."""
        if self.model_spec is None:
            return None
        try:
            return msgspec.convert(self.model_spec, ModelSpec)
        except msgspec.ValidationError as exc:
            raise InvalidInput(f"this fedclient cannot read the model's spec: {exc}") from exc


def manifest_path(model: str | os.PathLike[str]) -> Path:
    """Where the manifest of the ``.tflite`` file ``model`` lives: beside it, ``.json`` added."""
    path = Path(model)
    return path.with_name(path.name + ".json")


def read_tflite_manifest(
    model: str | os.PathLike[str], *, verify: bool = True
) -> TfliteManifest | None:
    """The manifest beside ``model`` (None when there is none); with ``verify``, the model
    file's size and sha256 are checked against it."""
    path = Path(model)
    sidecar = manifest_path(path)
    if not sidecar.is_file():
        return None
    try:
        manifest = msgspec.json.decode(sidecar.read_bytes(), type=TfliteManifest)
    except msgspec.DecodeError as exc:  # ValidationError included
        raise InvalidInput(f"{sidecar} is not a valid TFLite model manifest: {exc}") from exc
    if manifest.format != TFLITE_FORMAT:
        raise InvalidInput(
            f"unsupported TFLite manifest format {manifest.format!r}; expected {TFLITE_FORMAT}"
        )
    if verify and (
        not path.is_file()
        or path.stat().st_size != manifest.file.bytes
        or file_sha256(path) != manifest.file.sha256
    ):
        raise InvalidInput(f"{path} does not match its checksum in {sidecar.name}")
    return manifest


def model_filename(spec: ModelSpec) -> str:
    """The file name of a built-in model's TFLite conversion, e.g. ``mlp-64-32-10.tflite``."""
    sizes = [spec.inputs, *(spec.hidden if spec.kind == "mlp" else []), spec.classes]
    return f"{spec.kind}-{'-'.join(map(str, sizes))}.tflite"


def builtin_model_path(spec: ModelSpec) -> Path:
    """The converted model of built-in ``spec``: shipped with fedclient, or converted by the
    user into ``<cache>/tflite/`` (``FEDCLIENT_CACHE_DIR``, else ``~/.cache/fedclient``)."""
    if spec.kind not in ("mlp", "softmax"):
        raise InvalidInput(
            f"the tflite runtime serves the built-in mlp and softmax models, not {spec.kind!r}"
        )
    name = model_filename(spec)
    candidates = [MODELS_DIR / name, cache_root() / "tflite" / name]
    for path in candidates:
        if path.is_file():
            return path
    shipped = sorted(p.name for p in MODELS_DIR.glob("*.tflite"))
    raise InvalidInput(
        f"no TFLite model for {name}; shipped: {', '.join(shipped) or 'none'}. Convert one "
        f"where TensorFlow is installed: python fedclient/convert/make_tflite_models.py --out "
        f"{candidates[1].parent} {name.removesuffix('.tflite')}"
    )


def interpreter_class() -> Any:
    """The LiteRT ``Interpreter`` class: ``ai_edge_litert``'s, else ``tflite_runtime``'s."""
    for module in ("ai_edge_litert.interpreter", "tflite_runtime.interpreter"):
        try:
            return importlib.import_module(module).Interpreter
        except ImportError:
            continue
    raise InvalidInput(f"the tflite runtime is not installed: {INSTALL_HINT}")


class TfliteBackend:
    """A model trained and served on-device by the LiteRT interpreter, from a ``.tflite`` file.

    The manifest beside the file (``MODEL.tflite.json``) names the parameters and,
    with ``verify``, is checked against the file; without a manifest the
    parameters are named by their signature keys.
    """

    runtime = "tflite"

    def __init__(
        self, model: str | os.PathLike[str], *, verify: bool = True, threads: int = 1
    ) -> None:
        self.path = Path(model)
        if not self.path.is_file():
            raise InvalidInput(f"no such TFLite model: {self.path}")
        self.manifest = read_tflite_manifest(self.path, verify=verify)
        interpreter = interpreter_class()
        try:
            self._interpreter: Any = interpreter(model_path=str(self.path), num_threads=threads)
            self._interpreter.allocate_tensors()
            available = self._interpreter.get_signature_list()
        except Exception as exc:  # the interpreter raises ValueError/RuntimeError, or worse
            raise InvalidInput(f"the TFLite interpreter cannot load {self.path}: {exc}") from exc
        for required in ("infer", "get_weights", "set_weights"):
            if required not in available:
                raise InvalidInput(
                    f"{self.path} lacks the {required!r} signature (it has {sorted(available)})"
                )
        self._runners: dict[str, Any] = {
            name: self._interpreter.get_signature_runner(name)
            for name in SIGNATURES
            if name in available
        }
        infer_inputs = self._runners["infer"].get_input_details()
        if (
            list(infer_inputs) != ["x"]
            or "logits" not in self._runners["infer"].get_output_details()
        ):
            raise InvalidInput(f"{self.path}: the 'infer' signature must map 'x' to 'logits'")
        dims = [int(d) for d in infer_inputs["x"]["shape_signature"]]
        if len(dims) != 2:
            raise InvalidInput(f"{self.path}: 'infer' must take x of shape (batch, features)")
        self.inputs = dims[1]
        self._infer_batch = None if dims[0] < 0 else dims[0]
        self._train_batch: int | None = None
        if "train" in self._runners:
            train_inputs = self._runners["train"].get_input_details()
            if set(train_inputs) != {"x", "y", "mask", "learning_rate"}:
                raise InvalidInput(
                    f"{self.path}: the 'train' signature must take x, y, mask and "
                    f"learning_rate, not {sorted(train_inputs)}"
                )
            self._train_batch = int(train_inputs["x"]["shape"][0])
        # Minibatches above the training batch need both halves of gradient accumulation.
        self._accumulates = {"accumulate", "apply_gradients"} <= set(self._runners)
        self._scalar_shapes = self._read_scalar_shapes()
        current = self._runners["get_weights"]()
        if self.manifest is not None:
            keys = self.manifest.signature_keys
            self._keys = {p.name: keys.get(p.name, p.name) for p in self.manifest.parameters}
            self.classes = self.manifest.classes
        else:
            self._keys = {key: key for key in sorted(current)}
            logits = self._runners["infer"](x=np.zeros((1, self.inputs), np.float32))["logits"]
            self.classes = int(logits.shape[1])
        if set(self._keys.values()) != set(current):
            raise InvalidInput(
                f"{self.path}: get_weights returns {sorted(current)}, "
                f"the manifest names {sorted(self._keys.values())}"
            )
        self._shapes = {name: tuple(current[key].shape) for name, key in self._keys.items()}

    def _read_scalar_shapes(self) -> dict[tuple[str, str], tuple[int, ...]]:
        """The declared shape of each scalar input, ``[1]`` or (models converted before) 0-d,
        by (signature, input): a scalar goes in exactly that shape, as the runner resizes
        each input to the array it is given."""
        wanted = {"train": ["learning_rate"], "apply_gradients": ["learning_rate", "count"]}
        shapes: dict[tuple[str, str], tuple[int, ...]] = {}
        for signature, names in wanted.items():
            if signature not in self._runners or (
                signature == "apply_gradients" and not self._accumulates
            ):
                continue
            details = self._runners[signature].get_input_details()
            for name in names:
                if name not in details:
                    raise InvalidInput(f"{self.path}: the {signature!r} signature lacks {name!r}")
                shape = tuple(int(d) for d in details[name]["shape"])
                if shape not in ((), (1,)):
                    raise InvalidInput(
                        f"{self.path}: {signature!r} must take {name} as a scalar or of "
                        f"shape [1], not {list(shape)}"
                    )
                shapes[signature, name] = shape
        return shapes

    def _scalar(self, signature: str, name: str, value: float) -> np.ndarray:
        return np.full(self._scalar_shapes[signature, name], value, np.float32)

    @classmethod
    def for_spec(cls, spec: ModelSpec, *, seed: int = 0) -> TfliteBackend:
        """The built-in model ``spec`` (see `builtin_model_path`), initialised exactly like the
        numpy reference for ``seed``."""
        from fedclient.runtime._numpy import NumpyModel

        backend = cls(builtin_model_path(spec))
        made_from = backend.manifest.spec() if backend.manifest is not None else None
        if made_from != spec:
            raise InvalidInput(f"{backend.path} was converted from {made_from}, not {spec}")
        backend.set_weights(NumpyModel(spec, seed=seed).get_weights())
        return backend

    @property
    def train_batch(self) -> int | None:
        """The model's fixed training batch; None when it cannot train."""
        return self._train_batch

    # -- weights ---------------------------------------------------------------
    def get_weights(self) -> Weights:
        """A copy of the trainable parameters, by name, as float32 arrays."""
        current = self._runners["get_weights"]()
        return {name: np.array(current[key], dtype=np.float32) for name, key in self._keys.items()}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Replace all trainable parameters; names, shapes and dtypes must match exactly."""
        if set(weights) != set(self._shapes):
            raise InvalidInput(
                f"weights must have names {sorted(self._shapes)}, got {sorted(weights)}"
            )
        for name, value in weights.items():
            if value.shape != self._shapes[name] or value.dtype != np.float32:
                raise InvalidInput(
                    f"{name}: expected float32{list(self._shapes[name])}, "
                    f"got {value.dtype}{list(value.shape)}"
                )
        self._runners["set_weights"](
            **{key: np.ascontiguousarray(weights[name]) for name, key in self._keys.items()}
        )

    # -- data ------------------------------------------------------------------
    def _features(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.dtype.kind not in "fiu":
            raise InvalidInput(f"x must hold real numbers, got dtype {x.dtype}")
        if x.ndim != 2 or x.shape[1] != self.inputs:
            raise InvalidInput(f"x must have shape (n, {self.inputs}), got {x.shape}")
        if x.shape[0] == 0:
            raise InvalidInput("the data set is empty")
        with np.errstate(over="ignore"):  # values beyond float32 become Inf, refused below
            x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise InvalidInput("x contains NaN or Inf (or values too large for float32)")
        return x

    def _labels(self, y: np.ndarray, n: int) -> np.ndarray:
        return check_labels(y, n, self.classes).astype(np.int32)

    # -- training ----------------------------------------------------------------
    def train(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int,
        batch_size: int,
        learning_rate: float,
        rng: np.random.Generator,
        interrupt: Callable[[], None] | None = None,
    ) -> TrainResult:
        """Minibatch SGD; each epoch visits the examples in an order drawn from ``rng``.
        ``interrupt`` is called before each minibatch (what it raises ends training)."""
        if epochs < 1 or batch_size < 1 or not learning_rate > 0:
            raise InvalidInput("epochs and batch_size must be >= 1 and learning_rate > 0")
        if self._train_batch is None:
            raise InvalidInput(f"{self.path} has no 'train' signature: it only serves inference")
        width = self._train_batch
        if batch_size > width and not self._accumulates:
            raise InvalidInput(
                f"{self.path} trains minibatches of at most {width} examples (it has no "
                f"'accumulate' and 'apply_gradients' signatures); got batch_size {batch_size}"
            )
        x = self._features(x)
        y = self._labels(y, x.shape[0])
        lr = self._scalar("train", "learning_rate", learning_rate)
        lr_step = lr
        if self._accumulates:
            lr_step = self._scalar("apply_gradients", "learning_rate", learning_rate)
        # Reused buffers for the padded chunks: rows past the chunk stay zero, mask 0.
        xb = np.zeros((width, self.inputs), np.float32)
        yb = np.zeros(width, np.int32)
        mb = np.zeros(width, np.float32)
        n = x.shape[0]
        steps = 0
        epoch_loss = 0.0
        for _ in range(epochs):
            order = rng.permutation(n)
            total = 0.0
            for start in range(0, n, batch_size):
                if interrupt is not None:
                    interrupt()
                idx = order[start : start + batch_size]
                if len(idx) <= width:
                    self._fill(xb, yb, mb, x, y, idx)
                    loss = float(
                        self._runners["train"](x=xb, y=yb, mask=mb, learning_rate=lr)["loss"]
                    )
                    total += loss * len(idx)
                else:
                    for chunk in range(0, len(idx), width):
                        self._fill(xb, yb, mb, x, y, idx[chunk : chunk + width])
                        out = self._runners["accumulate"](x=xb, y=yb, mask=mb)
                        total += float(out["loss_sum"])
                    count = self._scalar("apply_gradients", "count", len(idx))
                    self._runners["apply_gradients"](learning_rate=lr_step, count=count)
                steps += 1
            epoch_loss = total / n
        return TrainResult(loss=epoch_loss, num_examples=n, steps=steps)

    @staticmethod
    def _fill(
        xb: np.ndarray,
        yb: np.ndarray,
        mb: np.ndarray,
        x: np.ndarray,
        y: np.ndarray,
        idx: np.ndarray,
    ) -> None:
        k = len(idx)
        xb[:k] = x[idx]
        yb[:k] = y[idx]
        mb[:k] = 1.0
        xb[k:] = 0.0
        yb[k:] = 0
        mb[k:] = 0.0

    # -- inference ---------------------------------------------------------------
    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits through the ``infer`` signature, shape (n, classes)."""
        x = self._features(x)
        infer = self._runners["infer"]
        if self._infer_batch is None:
            chunks = [
                infer(x=x[start : start + EVAL_CHUNK])["logits"]
                for start in range(0, x.shape[0], EVAL_CHUNK)
            ]
            return np.concatenate(chunks)
        width = self._infer_batch
        padded = np.zeros((-(-x.shape[0] // width) * width, self.inputs), np.float32)
        padded[: x.shape[0]] = x
        chunks = [
            infer(x=padded[start : start + width])["logits"]
            for start in range(0, padded.shape[0], width)
        ]
        return np.concatenate(chunks)[: x.shape[0]]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities, shape (n, classes)."""
        logits = self.logits(x).astype(np.float32, copy=False)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> EvalResult:
        """Mean cross-entropy and accuracy on (x, y)."""
        x = self._features(x)
        y = self._labels(y, x.shape[0])
        logits = self.logits(x).astype(np.float64)
        n = x.shape[0]
        loss = cross_entropy(logits, y)
        accuracy = float((logits.argmax(axis=1) == y).mean())
        return EvalResult(loss=loss, accuracy=accuracy, num_examples=n)

    def __repr__(self) -> str:
        name = self.manifest.name if self.manifest is not None else self.path.stem
        return f"TfliteBackend({str(self.path)!r}, name={name!r})"
