"""The one interface every training backend (numpy, ONNX Runtime, TFLite) implements."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fedclient._exceptions import InvalidInput
from fedclient.protocol import Weights

__all__ = [
    "EvalResult",
    "NumpyWeights",
    "TrainResult",
    "TrainingBackend",
    "check_dataset",
    "check_labels",
    "cross_entropy",
]


@dataclass(frozen=True)
class TrainResult:
    """What one call to `TrainingBackend.train` did."""

    loss: float  # mean training loss over the last epoch
    num_examples: int
    steps: int


@dataclass(frozen=True)
class EvalResult:
    """Loss and accuracy of a model on a labelled set."""

    loss: float
    accuracy: float
    num_examples: int


@runtime_checkable
class TrainingBackend(Protocol):
    """A model a device can train. Weights are exchanged by parameter name."""

    runtime: str
    inputs: int
    classes: int

    def get_weights(self) -> Weights:
        """A copy of the parameters, by name."""

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Replace all parameters; names, shapes and dtypes must match."""

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
        """Minibatch SGD over (x, y), shuffled by ``rng``. ``interrupt`` is called before
        each minibatch; what it raises ends training there (the device stopped
        qualifying mid-round: `fedclient.Conditions`)."""

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> EvalResult:
        """Mean cross-entropy and accuracy."""

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities, shape (n, classes)."""


class NumpyWeights:
    """What the numpy backends share: parameters kept as numpy arrays and exchanged by
    name, and minibatch SGD over a subclass's ``loss_and_grads``."""

    _params: Weights
    _dtype: np.dtype[Any]
    inputs: int
    classes: int

    def loss_and_grads(self, x: np.ndarray, y: np.ndarray) -> tuple[float, Weights]:
        """Mean cross-entropy on (x, y) and its gradient for every parameter (new arrays:
        `train` scales them in place)."""
        raise NotImplementedError

    def train(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int,
        batch_size: int,
        learning_rate: float,
        rng: np.random.Generator,
        proximal_mu: float = 0.0,
        interrupt: Callable[[], None] | None = None,
    ) -> TrainResult:
        """Minibatch SGD; each epoch visits the examples in an order drawn from ``rng``.

        ``proximal_mu`` > 0 adds FedProx's term mu/2 |w - w_start|^2 to the loss.
        ``interrupt`` is called before each minibatch (what it raises ends training)."""
        anchor = self.get_weights() if proximal_mu else None
        x, y = check_dataset(x, y, inputs=self.inputs, classes=self.classes)
        x = x.astype(self._dtype, copy=False)
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
                loss, grads = self.loss_and_grads(x[idx], y[idx])
                for name, grad in grads.items():
                    if anchor is not None:
                        grad = grad + proximal_mu * (self._params[name] - anchor[name])
                    grad *= learning_rate  # in place: the step's own array, same values
                    self._params[name] -= grad.astype(self._dtype, copy=False)
                total += loss * len(idx)
                steps += 1
            epoch_loss = total / n
        return TrainResult(loss=epoch_loss, num_examples=n, steps=steps)

    def get_weights(self) -> Weights:
        """A copy of the parameters, by name."""
        return {name: value.copy() for name, value in self._params.items()}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Replace all parameters; names, shapes and dtypes must match exactly."""
        if set(weights) != set(self._params):
            raise InvalidInput(
                f"weights must have names {sorted(self._params)}, got {sorted(weights)}"
            )
        for name, value in weights.items():
            ref = self._params[name]
            if value.shape != ref.shape or value.dtype != ref.dtype:
                raise InvalidInput(
                    f"{name}: expected {ref.dtype}{list(ref.shape)}, "
                    f"got {value.dtype}{list(value.shape)}"
                )
        self._params = {name: np.array(weights[name]) for name in self._params}


def check_dataset(
    x: np.ndarray, y: np.ndarray, *, inputs: int, classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Validate a labelled set for a model and return it as (float32, int64)."""
    x = np.asarray(x)
    y = np.asarray(y)
    if x.dtype.kind not in "fiu":
        raise InvalidInput(f"x must hold numbers, got dtype {x.dtype}")
    if x.ndim != 2 or x.shape[1] != inputs:
        raise InvalidInput(f"x must have shape (n, {inputs}), got {x.shape}")
    if y.shape != (x.shape[0],):
        raise InvalidInput(f"y must have shape ({x.shape[0]},), got {y.shape}")
    if x.shape[0] == 0:
        raise InvalidInput("the data set is empty")
    y = check_labels(y, x.shape[0], classes)
    if not np.isfinite(x).all():
        raise InvalidInput("x contains NaN or Inf")
    return x.astype(np.float32, copy=False), y


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean cross-entropy of integer labels ``y`` under ``logits``, in the logits' dtype."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(y)), y].mean())


def check_labels(y: np.ndarray, n: int, classes: int) -> np.ndarray:
    """Validate ``n`` integer labels in [0, classes) and return them as int64.

    Runtimes accept out-of-range labels silently (ONNX Runtime trains on them,
    a one-hot of one is a zero row), so every backend refuses them here."""
    y = np.asarray(y)
    if y.shape != (n,):
        raise InvalidInput(f"y must have shape ({n},), got {y.shape}")
    if y.dtype.kind not in "iu":
        raise InvalidInput(f"labels must be integers, got dtype {y.dtype}")
    if n and (y.min() < 0 or y.max() >= classes):
        raise InvalidInput(f"labels must lie in [0, {classes}), got [{y.min()}, {y.max()}]")
    return np.ascontiguousarray(y, dtype=np.int64)
