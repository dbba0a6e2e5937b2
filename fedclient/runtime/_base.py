"""The one interface every training backend (numpy, ONNX Runtime, TFLite) implements."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fedclient._exceptions import InvalidInput
from fedclient.protocol import Weights

__all__ = [
    "NUMPY_TRAIN_OPTIONS",
    "EvalResult",
    "NumpyWeights",
    "TrainResult",
    "TrainingBackend",
    "check_dataset",
    "check_train_options",
    "check_labels",
    "cross_entropy",
    "schedule_factor",
]


@dataclass(frozen=True)
class TrainResult:
    """What one call to `TrainingBackend.train` (or a `fedclient.trainers.Trainer`) did.

    A trainer may add ``extras``, tensors sent beside the update (e.g. SCAFFOLD's
    control-variate change), and ``state``, tensors the device keeps for its next
    round (its control variate)."""

    loss: float  # mean training loss over the last epoch
    num_examples: int
    steps: int
    extras: Weights | None = None
    state: Weights | None = None


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


#: What `NumpyWeights.train` takes beyond epochs, batch size and learning rate: every
#: `fedclient.protocol.TrainSettings.options` key.
NUMPY_TRAIN_OPTIONS = frozenset(
    {
        "proximal_mu",
        "lr_schedule",
        "optimizer",
        "momentum",
        "weight_decay",
        "local_steps",
        "clip_grad_norm",
    }
)

ADAM_BETAS = (0.9, 0.999)
ADAM_EPSILON = 1e-8


def schedule_factor(schedule: str, step: int, steps: int) -> float:
    """The share of the round's learning rate at local ``step`` (from 0) of ``steps``."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / steps))
    if schedule == "linear":
        return 1.0 - step / steps
    if schedule == "constant":
        return 1.0
    raise InvalidInput(f"unknown lr_schedule {schedule!r}; use constant, cosine or linear")


class NumpyWeights:
    """What the numpy backends share: parameters kept as numpy arrays and exchanged by
    name, and minibatch training over a subclass's ``loss_and_grads``."""

    _params: Weights
    _dtype: np.dtype[Any]
    inputs: int
    classes: int
    #: The `TrainSettings` options `train` honours (a device refuses a plan asking for
    #: one its backend does not list).
    train_options: frozenset[str] = NUMPY_TRAIN_OPTIONS

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
        lr_schedule: str = "constant",
        optimizer: str = "sgd",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        local_steps: int = 0,
        clip_grad_norm: float | None = None,
    ) -> TrainResult:
        """Minibatch SGD; each epoch visits the examples in an order drawn from ``rng``.

        ``proximal_mu`` > 0 adds FedProx's term mu/2 |w - w_start|^2 to the loss.
        ``interrupt`` is called before each minibatch (what it raises ends training).
        The other options are `fedclient.protocol.TrainSettings`': a per-step schedule of
        the learning rate, SGD with momentum or Adam, weight decay (L2 on the gradient),
        ``local_steps`` steps instead of ``epochs`` epochs, and gradient clipping to an
        L2 norm (every tensor together, the proximal term in; weight decay is added
        after, as PyTorch's optimisers add theirs). Each matches ``torch.optim``."""
        if (lr_schedule, optimizer, momentum, weight_decay, local_steps, clip_grad_norm) != (
            "constant",
            "sgd",
            0.0,
            0.0,
            0,
            None,
        ):
            return self._train_with(
                x,
                y,
                epochs=epochs,
                batch_size=batch_size,
                learning_rate=learning_rate,
                rng=rng,
                proximal_mu=proximal_mu,
                interrupt=interrupt,
                lr_schedule=lr_schedule,
                optimizer=optimizer,
                momentum=momentum,
                weight_decay=weight_decay,
                local_steps=local_steps,
                clip_grad_norm=clip_grad_norm,
            )
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

    def _train_with(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int,
        batch_size: int,
        learning_rate: float,
        rng: np.random.Generator,
        proximal_mu: float,
        interrupt: Callable[[], None] | None,
        lr_schedule: str,
        optimizer: str,
        momentum: float,
        weight_decay: float,
        local_steps: int,
        clip_grad_norm: float | None,
    ) -> TrainResult:
        """`train` with any of its options (plain SGD keeps to the loop above, whose
        results earlier reports hold)."""
        if optimizer not in ("sgd", "adam"):
            raise InvalidInput(f"unknown optimizer {optimizer!r}; use sgd or adam")
        anchor = self.get_weights() if proximal_mu else None
        x, y = check_dataset(x, y, inputs=self.inputs, classes=self.classes)
        x = x.astype(self._dtype, copy=False)
        n = x.shape[0]
        steps = local_steps or epochs * -(-n // batch_size)
        first: Weights = {}  # momentum (SGD) or first moment (Adam), in float64
        second: Weights = {}  # Adam's second moment
        beta1, beta2 = ADAM_BETAS
        step = 0
        epoch_loss = 0.0
        while step < steps:
            order = rng.permutation(n)
            total, seen = 0.0, 0
            for start in range(0, n, batch_size):
                if step == steps:
                    break
                if interrupt is not None:
                    interrupt()
                idx = order[start : start + batch_size]
                loss, grads = self.loss_and_grads(x[idx], y[idx])
                gradient = {k: g.astype(np.float64) for k, g in grads.items()}
                if anchor is not None:
                    for name, g in gradient.items():
                        g += proximal_mu * (self._params[name] - anchor[name])
                if clip_grad_norm is not None:
                    norm = math.sqrt(sum(float(np.vdot(g, g)) for g in gradient.values()))
                    scale = clip_grad_norm / (norm + 1e-6)  # torch's clip_grad_norm_
                    if scale < 1:
                        for g in gradient.values():
                            g *= scale
                if weight_decay:  # as PyTorch's optimisers: after clipping
                    for name, g in gradient.items():
                        g += weight_decay * self._params[name]
                rate = learning_rate * schedule_factor(lr_schedule, step, steps)
                for name, g in gradient.items():
                    if optimizer == "adam":
                        m = first[name] = beta1 * first.get(name, 0.0) + (1 - beta1) * g
                        v = second[name] = beta2 * second.get(name, 0.0) + (1 - beta2) * g * g
                        m_hat = m / (1 - beta1 ** (step + 1))
                        v_hat = v / (1 - beta2 ** (step + 1))
                        change = m_hat / (np.sqrt(v_hat) + ADAM_EPSILON)
                    elif momentum:
                        change = first[name] = momentum * first.get(name, 0.0) + g
                    else:
                        change = g
                    self._params[name] -= (rate * change).astype(self._dtype)
                total += loss * len(idx)
                seen += len(idx)
                step += 1
            epoch_loss = total / seen
        return TrainResult(loss=epoch_loss, num_examples=n, steps=step)

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


def check_train_options(backend: TrainingBackend, options: Mapping[str, Any]) -> None:
    """Refuse training settings ``backend`` does not honour (those its ``train_options``
    does not list): a device trains as the plan says, or not at all."""
    unsupported = sorted(set(options) - set(getattr(backend, "train_options", ())))
    if unsupported:
        asked = ", ".join(f"{name} = {options[name]!r}" for name in unsupported)
        raise InvalidInput(
            f"the {backend.runtime} runtime cannot honour the plan's [train] {asked}: its "
            "training is plain minibatch SGD (the numpy models take every setting)"
        )


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
