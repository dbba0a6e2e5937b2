"""The ONNX Runtime backend: on-device training from a device bundle.

`OnnxBackend` trains with one of two engines (`fedclient.runtime._engines`):
ONNX Runtime's training API where ``onnxruntime-training`` is installed, or the
bundle's step graph in any plain ``onnxruntime`` build (aarch64 boards, Python
3.13, mobile builds). Neither imports torch. Both take the same SGD step, so
devices on either train one model in one federation. Weights are read and
written by parameter name as float32 numpy arrays, with the same names and
shapes as the numpy reference for the same model. Training visits minibatches
in the same order as the numpy backend for the same ``rng``: each epoch draws
``rng.permutation(n)``, and the last batch of an epoch is smaller.

Importing this module loads no runtime; ONNX Runtime loads when a backend is built.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from fedclient._exceptions import InvalidInput
from fedclient.protocol import ModelSpec, Weights
from fedclient.runtime import _ort
from fedclient.runtime._base import EvalResult, TrainResult, check_labels, cross_entropy
from fedclient.runtime._batchnorm import check_minibatch
from fedclient.runtime._bundle import (
    ENGINES,
    BundleManifest,
    builtin_bundle,
    forget_checked,
    manifest_digest,
    read_manifest,
)
from fedclient.runtime._engines import Engine, PlainEngine, TrainingApiEngine

__all__ = ["ENGINE_VARIABLE", "OnnxBackend"]

#: Examples per evaluation / prediction call, to bound memory on large sets.
EVAL_CHUNK = 2048
#: The environment variable that names the engine ``engine="auto"`` picks.
ENGINE_VARIABLE = "FEDCLIENT_ONNX_ENGINE"


def _choose_engine(engine: str, manifest: BundleManifest, bundle: Path) -> str:
    """``training`` or ``plain``: the one asked for, else what the bundle and the installed
    ONNX Runtime allow (the training API first: it is the faster where it exists)."""
    if engine == "auto":
        engine = os.environ.get(ENGINE_VARIABLE, "") or "auto"
    if engine not in ("auto", *ENGINES):
        raise InvalidInput(f"unknown ONNX engine {engine!r}; choose auto, training or plain")
    held = manifest.engines
    if engine == "auto":
        if "training" in held and _ort.has_training_api():
            return "training"
        if "plain" in held:
            return "plain"
        raise InvalidInput(
            f"the bundle {bundle} has no step graph for plain onnxruntime (convert it again with "
            f"this fedclient), and the training API is not installed: {_ort.INSTALL_HINT}"
        )
    if engine not in held:
        raise InvalidInput(f"the bundle {bundle} holds no files for the {engine!r} engine")
    return engine


class OnnxBackend:
    """A model trained on-device by ONNX Runtime, loaded from a bundle directory.

    ``bundle`` is a directory written by `write_bundle` or ``fedconvert``;
    ``verify`` checks its files against the manifest's checksums first.
    ``engine`` is ``training`` (ONNX Runtime's training API), ``plain`` (the
    step graph, any ONNX Runtime build) or ``auto``: ``$FEDCLIENT_ONNX_ENGINE``
    if set, else the training API where it is installed and the bundle holds
    its files, else the step graph.
    """

    runtime = "onnx"

    def __init__(
        self,
        bundle: str | os.PathLike[str],
        *,
        verify: bool = True,
        threads: int = 1,
        engine: str = "auto",
    ) -> None:
        self.bundle = Path(bundle)
        self.manifest: BundleManifest = read_manifest(self.bundle, verify=verify)
        #: The manifest's sha256: what a plan that federates this bundle names.
        self.digest = manifest_digest(self.bundle)
        chosen = _choose_engine(engine, self.manifest, self.bundle)
        kind = TrainingApiEngine if chosen == "training" else PlainEngine
        self._engine: Engine = kind(self.bundle, self.manifest, threads=threads)
        #: The engine that trains: ``training`` or ``plain``.
        self.engine = chosen
        self.input_shape: tuple[int, ...] = self.manifest.input_shape
        self.inputs = int(np.prod(self.input_shape))
        self.classes = self.manifest.classes
        #: BatchNorm's running statistics, by name (exchanged with the weights; empty
        #: unless BatchNorm trains on batch statistics).
        self.statistics: list[str] = [t.name for t in self.manifest.statistics]
        self._variances = {layer.var for layer in self.manifest.batchnorm}
        self._shapes = {
            p.name: tuple(int(d or 0) for d in p.shape)
            for p in [*self.manifest.parameters, *self.manifest.statistics]
        }

    @classmethod
    def for_spec(
        cls, spec: ModelSpec, *, seed: int = 0, cache_dir: str | os.PathLike[str] | None = None
    ) -> OnnxBackend:
        """The built-in model ``spec``, initialised exactly like the numpy reference for
        ``seed``; its bundle is built once and cached (see `builtin_bundle`)."""
        path = builtin_bundle(spec, seed=seed, cache_dir=cache_dir)
        try:
            return cls(path)
        except InvalidInput:  # the cached files changed since this process checked them
            forget_checked(path)
            return cls(builtin_bundle(spec, seed=seed, cache_dir=cache_dir))

    # -- weights ---------------------------------------------------------------
    def get_weights(self) -> Weights:
        """A copy of the trainable parameters, by name, as float32 arrays; with BatchNorm
        on batch statistics, its running statistics too (they travel with the weights)."""
        return {name: np.array(self._engine.get(name), dtype=np.float32) for name in self._shapes}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Replace all trainable parameters (and running statistics, as `get_weights`);
        names, shapes and dtypes must match exactly. A running variance below zero is
        read as zero."""
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
        for name in self._shapes:
            value = weights[name]
            if name in self._variances:  # noise (DP) can push an averaged variance below 0
                value = np.maximum(value, np.float32(0))
            self._engine.set(name, np.ascontiguousarray(value))

    # -- data ------------------------------------------------------------------
    def _features(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.dtype.kind not in "fiu":
            raise InvalidInput(f"x must hold real numbers, got dtype {x.dtype}")
        if x.ndim == 2 and x.shape[1] == self.inputs:
            x = x.reshape((x.shape[0], *self.input_shape))
        elif x.shape[1:] != self.input_shape:
            example = ", ".join(map(str, self.input_shape))
            raise InvalidInput(
                f"x must have shape (n, {self.inputs}) or (n, {example}), got {x.shape}"
            )
        if x.shape[0] == 0:
            raise InvalidInput("the data set is empty")
        if self.manifest.input.dtype == "int64":
            return self._token_ids(x)
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise InvalidInput("x contains NaN or Inf (or values too large for float32)")
        return x

    def _token_ids(self, x: np.ndarray) -> np.ndarray:
        """``x`` as int64 token ids, each checked to lie in the model's vocabulary (an id
        out of range would make ONNX Runtime fail in the middle of a step)."""
        ids = np.ascontiguousarray(x, dtype=np.int64)
        if x.dtype.kind == "f" and not np.array_equal(ids, x):
            raise InvalidInput("x must hold whole numbers: the model takes token ids")
        top = self.manifest.vocabulary
        if ids.min() < 0 or (top is not None and ids.max() >= top):
            raise InvalidInput(
                f"token ids must lie in [0, {top if top is not None else 'inf'}), "
                f"got {ids.min()} to {ids.max()}"
            )
        return ids

    def _labels(self, y: np.ndarray, n: int) -> np.ndarray:
        return check_labels(y, n, self.classes)

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
        x = self._features(x)
        y = self._labels(y, x.shape[0])
        n = x.shape[0]
        layers = self.manifest.batchnorm
        check_minibatch(layers, min(n, batch_size))
        # BatchNorm on batch statistics: a last minibatch of one value per channel has no
        # variance (PyTorch refuses it); it sits this epoch out, the next shuffles anew.
        smallest = max((-(-2 // layer.per_example) for layer in layers), default=1)
        steps = 0
        epoch_loss = 0.0
        for _ in range(epochs):
            order = rng.permutation(n)
            total, seen = 0.0, 0
            for start in range(0, n, batch_size):
                if interrupt is not None:
                    interrupt()
                idx = order[start : start + batch_size]
                if len(idx) < smallest:
                    continue
                total += self._engine.step(x[idx], y[idx], learning_rate) * len(idx)
                seen += len(idx)
                steps += 1
            epoch_loss = total / seen
        return TrainResult(loss=epoch_loss, num_examples=n, steps=steps)

    def gradients(self, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        """The gradient of the mean cross-entropy of (x, y) at the current weights, by
        parameter name (what an SGD step with learning rate 1 subtracts); nothing changes."""
        x = self._features(x)
        return self._engine.gradients(x, self._labels(y, x.shape[0]))

    # -- inference ---------------------------------------------------------------
    def _logits(self, x: np.ndarray) -> np.ndarray:
        """Logits over ``x``, in chunks."""
        chunks = range(0, x.shape[0], EVAL_CHUNK)
        return np.concatenate([self._engine.logits(x[i : i + EVAL_CHUNK]) for i in chunks])

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities, shape (n, classes)."""
        logits = self._logits(self._features(x))
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> EvalResult:
        """Mean cross-entropy and accuracy on (x, y)."""
        x = self._features(x)
        y = self._labels(y, x.shape[0])
        logits = self._logits(x).astype(np.float64)
        loss = cross_entropy(logits, y)
        accuracy = float((logits.argmax(axis=1) == y).mean())
        return EvalResult(loss=loss, accuracy=accuracy, num_examples=x.shape[0])

    def export_inference_model(self, path: str | os.PathLike[str]) -> Path:
        """Write the forward graph with the current weights as a plain ONNX model
        (``onnxruntime.InferenceSession`` runs it); return its path."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        self._engine.export_inference_model(target)
        return target

    def __repr__(self) -> str:
        return (
            f"OnnxBackend({str(self.bundle)!r}, name={self.manifest.name!r}, "
            f"engine={self.engine!r})"
        )
