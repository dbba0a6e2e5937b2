"""The ONNX Runtime backend: on-device training from a device bundle.

`OnnxBackend` trains with ``onnxruntime.training.api`` (``CheckpointState``,
``Module``, ``Optimizer`` with SGD) and never imports torch. Weights are read
and written by parameter name as float32 numpy arrays, with the same names and
shapes as the numpy reference for the same model, so numpy and ONNX devices
train one model in one federation. Training visits minibatches in the same
order as the numpy backend for the same ``rng``: each epoch draws
``rng.permutation(n)``, and the last batch of an epoch is smaller.

Importing this module loads no runtime; ONNX Runtime loads when a backend is built.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedclient._exceptions import InvalidInput
from fedclient.protocol import ModelSpec, Weights
from fedclient.runtime import _ort
from fedclient.runtime._base import EvalResult, TrainResult, check_labels
from fedclient.runtime._bundle import (
    BUNDLE_FILES,
    BundleManifest,
    builtin_bundle,
    forget_checked,
    manifest_digest,
    read_manifest,
)

__all__ = ["OnnxBackend"]

#: Examples per evaluation / prediction call, to bound memory on large sets.
EVAL_CHUNK = 2048


class OnnxBackend:
    """A model trained on-device by ONNX Runtime, loaded from a bundle directory.

    ``bundle`` is a directory written by `write_bundle` or ``fedconvert``;
    ``verify`` checks its files against the manifest's checksums first.
    """

    runtime = "onnx"

    def __init__(
        self, bundle: str | os.PathLike[str], *, verify: bool = True, threads: int = 1
    ) -> None:
        self.bundle = Path(bundle)
        self.manifest: BundleManifest = read_manifest(self.bundle, verify=verify)
        #: The manifest's sha256: what a plan that federates this bundle names.
        self.digest = manifest_digest(self.bundle)
        api = _ort.training_api()
        files = {role: str(self.bundle / name) for role, name in BUNDLE_FILES.items()}
        try:
            self._state: Any = api.CheckpointState.load_checkpoint(files["checkpoint"])
            self._module: Any = api.Module(
                files["training_model"],
                self._state,
                files["eval_model"],
                session_options=_ort.session_options(threads=threads),
            )
            self._optimizer: Any = api.Optimizer(files["optimizer_model"], self._module)
        except RuntimeError as exc:
            raise InvalidInput(f"ONNX Runtime cannot load the bundle {self.bundle}: {exc}") from exc
        self.input_shape: tuple[int, ...] = self.manifest.input_shape
        self.inputs = int(np.prod(self.input_shape))
        self.classes = self.manifest.classes
        self._shapes = {
            p.name: tuple(int(d or 0) for d in p.shape) for p in self.manifest.parameters
        }
        stored = {name for name, _ in self._state.parameters}
        if not set(self._shapes) <= stored:
            raise InvalidInput(
                f"the bundle's checkpoint lacks parameters {sorted(set(self._shapes) - stored)}"
            )
        self._learning_rate: float | None = None

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
        """A copy of the trainable parameters, by name, as float32 arrays."""
        return {
            name: np.array(self._state.parameters[name].data, dtype=np.float32)
            for name in self._shapes
        }

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
        for name in self._shapes:
            self._state.parameters[name] = np.ascontiguousarray(weights[name])

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
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise InvalidInput("x contains NaN or Inf (or values too large for float32)")
        return x

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
    ) -> TrainResult:
        """Minibatch SGD; each epoch visits the examples in an order drawn from ``rng``."""
        if epochs < 1 or batch_size < 1 or not learning_rate > 0:
            raise InvalidInput("epochs and batch_size must be >= 1 and learning_rate > 0")
        x = self._features(x)
        y = self._labels(y, x.shape[0])
        if learning_rate != self._learning_rate:
            self._optimizer.set_learning_rate(float(learning_rate))
            self._learning_rate = learning_rate
        module, optimizer = self._module, self._optimizer
        module.train()
        n = x.shape[0]
        steps = 0
        epoch_loss = 0.0
        for _ in range(epochs):
            order = rng.permutation(n)
            total = 0.0
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                loss = module(x[idx], y[idx])[0]
                optimizer.step()
                module.lazy_reset_grad()
                total += float(loss) * len(idx)
                steps += 1
            epoch_loss = total / n
        return TrainResult(loss=epoch_loss, num_examples=n, steps=steps)

    # -- inference ---------------------------------------------------------------
    def _logits(self, x: np.ndarray, y: np.ndarray | None) -> tuple[np.ndarray, float]:
        """Logits, and the summed loss (0 without labels) over ``x``, in chunks."""
        self._module.eval()
        outputs = []
        total = 0.0
        for start in range(0, x.shape[0], EVAL_CHUNK):
            xs = x[start : start + EVAL_CHUNK]
            # The eval graph takes labels; without them any valid class will do.
            ys = np.zeros(xs.shape[0], np.int64) if y is None else y[start : start + EVAL_CHUNK]
            loss, logits = self._module(xs, ys)
            total += float(loss) * xs.shape[0]
            outputs.append(logits)
        return np.concatenate(outputs), total

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities, shape (n, classes)."""
        logits, _ = self._logits(self._features(x), None)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> EvalResult:
        """Mean cross-entropy and accuracy on (x, y)."""
        x = self._features(x)
        y = self._labels(y, x.shape[0])
        logits, total = self._logits(x, y)
        n = x.shape[0]
        accuracy = float((logits.argmax(axis=1) == y).mean())
        return EvalResult(loss=total / n, accuracy=accuracy, num_examples=n)

    def export_inference_model(self, path: str | os.PathLike[str]) -> Path:
        """Write the forward graph with the current weights as a plain ONNX model
        (``onnxruntime.InferenceSession`` runs it); return its path."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        self._module.export_model_for_inferencing(str(target), [self.manifest.output.name])
        return target

    def __repr__(self) -> str:
        return f"OnnxBackend({str(self.bundle)!r}, name={self.manifest.name!r})"
