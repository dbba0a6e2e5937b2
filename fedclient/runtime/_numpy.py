"""The numpy reference backend: softmax regression and MLPs trained with minibatch SGD.

Parameter names and layouts follow PyTorch's ``nn.Linear`` (``fc1.weight`` is
``(out, in)``), so the same weights can travel to and from models exported by
other runtimes.
"""

from __future__ import annotations

import itertools

import numpy as np

from fedclient.protocol import ModelSpec, Weights
from fedclient.runtime._base import EvalResult, NumpyWeights, check_dataset

__all__ = ["NumpyModel"]


class NumpyModel(NumpyWeights):
    """A dense ReLU network with a softmax output, in pure numpy."""

    runtime = "numpy"

    def __init__(self, spec: ModelSpec, *, seed: int = 0, dtype: type = np.float32) -> None:
        self.spec = spec
        self.inputs = spec.inputs
        self.classes = spec.classes
        self._dtype = np.dtype(dtype)
        sizes = [spec.inputs, *(spec.hidden if spec.kind == "mlp" else []), spec.classes]
        rng = np.random.default_rng(seed)
        self._params: Weights = {}
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes), start=1):
            # Glorot uniform for networks; zeros for softmax regression, whose loss is
            # convex (random logits only slow it down: 0.47 vs 0.75 on MNIST in 5 rounds).
            limit = np.sqrt(6.0 / (fan_in + fan_out)) if spec.kind == "mlp" else 0.0
            self._params[f"fc{i}.weight"] = rng.uniform(-limit, limit, (fan_out, fan_in)).astype(
                self._dtype
            )
            self._params[f"fc{i}.bias"] = np.zeros(fan_out, dtype=self._dtype)
        self._layers = len(sizes) - 1
        # Built once: a training step looks its parameters up by these names.
        self._names = [(f"fc{i}.weight", f"fc{i}.bias") for i in range(1, self._layers + 1)]
        self._rows: dict[int, np.ndarray] = {}  # np.arange(n), by batch size

    # -- maths -----------------------------------------------------------------
    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        activations = [x]
        a = x
        for i, (weight, bias) in enumerate(self._names, start=1):
            z = a @ self._params[weight].T
            z += self._params[bias]
            a = np.maximum(z, 0) if i < self._layers else z
            activations.append(a)
        return a, activations

    @staticmethod
    def _softmax(logits: np.ndarray) -> np.ndarray:
        e: np.ndarray = logits - logits.max(axis=1, keepdims=True)
        np.exp(e, out=e)
        e /= e.sum(axis=1, keepdims=True)
        return e

    def loss_and_grads(self, x: np.ndarray, y: np.ndarray) -> tuple[float, Weights]:
        """Mean cross-entropy on (x, y) and its gradient for every parameter."""
        logits, acts = self._forward(x)
        probs = self._softmax(logits)
        n = x.shape[0]
        rows = self._rows.get(n)
        if rows is None:
            rows = self._rows[n] = np.arange(n)
        # The mean as ndarray.mean takes it (the sum in the model's dtype, divided in
        # float64, rounded back), without its Python-level wrapper: once per batch.
        total = np.add.reduce(-np.log(np.maximum(probs[rows, y], 1e-12)))
        loss = float(total.dtype.type(np.float64(total) / n))
        delta = probs
        delta[rows, y] -= 1.0
        delta /= n
        grads: Weights = {}
        for i in range(self._layers, 0, -1):
            weight, bias = self._names[i - 1]
            grads[weight] = delta.T @ acts[i - 1]
            grads[bias] = np.add.reduce(delta, axis=0)
            if i > 1:
                delta = (delta @ self._params[weight]) * (acts[i - 1] > 0)
        return loss, grads

    def logits(self, x: np.ndarray) -> np.ndarray:
        """The forward pass's logits of ``x`` (as given: no cast, no softmax)."""
        return self._forward(x)[0]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities."""
        logits, _ = self._forward(np.asarray(x, dtype=self._dtype))
        return self._softmax(logits)

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> EvalResult:
        """Mean cross-entropy and accuracy on (x, y)."""
        x, y = check_dataset(x, y, inputs=self.inputs, classes=self.classes)
        probs = self.predict(x)
        n = x.shape[0]
        loss = float(-np.log(np.maximum(probs[np.arange(n), y], 1e-12)).mean())
        accuracy = float((probs.argmax(axis=1) == y).mean())
        return EvalResult(loss=loss, accuracy=accuracy, num_examples=n)
