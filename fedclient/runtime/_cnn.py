"""A small CNN for square grey-scale images, in pure numpy: its shape, its initial
weights and a reference implementation (forward, exact gradients, minibatch SGD).

    input (n, side*side) -> reshape (n, 1, side, side)
    conv1 3x3 pad 1 -> ReLU -> max-pool 2x2     (n, c1, side/2, side/2)
    conv2 3x3 pad 1 -> ReLU -> max-pool 2x2     (n, c2, side/4, side/4)
    flatten (channel-major, like ONNX/PyTorch) -> fc1 -> logits (n, classes)

Parameter names and layouts follow PyTorch (``conv1.weight`` is ``(out, in, 3, 3)``,
``fc1.weight`` is ``(out, in)``). The initial weights live here, not in a backend,
so a server can create a job's version-0 model without any runtime installed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedclient._exceptions import InvalidInput
from fedclient.protocol import ModelSpec, Weights
from fedclient.runtime._base import EvalResult, NumpyWeights, check_dataset

__all__ = ["CnnShape", "NumpyCnn", "cnn_initial_weights"]


@dataclass(frozen=True)
class CnnShape:
    """The architecture of the built-in CNN: image side, channels and classes."""

    side: int = 28
    classes: int = 10
    channels: tuple[int, int] = (8, 16)

    def __post_init__(self) -> None:
        if self.side < 4 or self.side % 4:
            raise InvalidInput(
                f"the CNN needs square images with a side divisible by 4, got {self.side}"
            )
        if self.classes < 2 or min(self.channels) < 1 or len(self.channels) != 2:
            raise InvalidInput(f"invalid CNN shape {self}")

    @property
    def height(self) -> int:
        """Image height in pixels."""
        return self.side

    @property
    def width(self) -> int:
        """Image width in pixels."""
        return self.side

    @property
    def inputs(self) -> int:
        """Features per example (flat pixels)."""
        return self.side * self.side

    @property
    def flat(self) -> int:
        """Features entering the linear layer."""
        return self.channels[1] * (self.side // 4) ** 2

    @classmethod
    def for_spec(cls, spec: ModelSpec) -> CnnShape:
        """The CNN a ``ModelSpec`` describes: ``inputs`` is side², ``hidden`` the two channel
        counts (default 8 and 16)."""
        side = math.isqrt(spec.inputs)
        if side * side != spec.inputs:
            raise InvalidInput(f"a CNN needs square images; inputs={spec.inputs} is not a square")
        hidden = tuple(spec.hidden)
        if hidden and len(hidden) != 2:
            raise InvalidInput(f"a CNN's hidden lists its two channel counts, got {list(hidden)}")
        channels = (hidden[0], hidden[1]) if hidden else (8, 16)
        return cls(side=side, classes=spec.classes, channels=channels)

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter's name and shape, in graph order."""
        c1, c2 = self.channels
        return {
            "conv1.weight": (c1, 1, 3, 3),
            "conv1.bias": (c1,),
            "conv2.weight": (c2, c1, 3, 3),
            "conv2.bias": (c2,),
            "fc1.weight": (self.classes, self.flat),
            "fc1.bias": (self.classes,),
        }


def cnn_initial_weights(shape: CnnShape, *, seed: int = 0, dtype: type = np.float32) -> Weights:
    """Glorot-uniform weights (fans include the 3x3 receptive field) and zero biases."""
    rng = np.random.default_rng(seed)
    weights: Weights = {}
    for name, dims in shape.parameter_shapes().items():
        if name.endswith(".bias"):
            weights[name] = np.zeros(dims, dtype=dtype)
            continue
        receptive = int(np.prod(dims[2:])) if len(dims) > 2 else 1
        fan_out, fan_in = dims[0] * receptive, dims[1] * receptive
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        weights[name] = rng.uniform(-limit, limit, dims).astype(dtype)
    return weights


def _im2col(x: np.ndarray) -> np.ndarray:
    """The 3x3 windows of ``x`` zero-padded by 1, as rows: (n*h*w, c*9)."""
    n, c, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * h * w, c * 9)


def _col2im(cols: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The adjoint of `_im2col`: add each window row back onto the image it came from."""
    n, c, h, w = shape
    windows = cols.reshape(n, h, w, c, 3, 3)
    padded = np.zeros((n, c, h + 2, w + 2), dtype=cols.dtype)
    for a in range(3):
        for b in range(3):
            padded[:, :, a : a + h, b : b + w] += windows[..., a, b].transpose(0, 3, 1, 2)
    return padded[:, :, 1:-1, 1:-1]


def _pool(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2x2 max-pool; also the index (0..3) of each window's first maximum."""
    n, c, h, w = x.shape
    windows = x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5)
    windows = windows.reshape(n, c, h // 2, w // 2, 4)
    where = windows.argmax(axis=-1)
    return np.take_along_axis(windows, where[..., None], axis=-1)[..., 0], where


def _unpool(grad: np.ndarray, where: np.ndarray) -> np.ndarray:
    n, c, h2, w2 = grad.shape
    out = np.zeros((n, c, h2, w2, 4), dtype=grad.dtype)
    np.put_along_axis(out, where[..., None], grad[..., None], axis=-1)
    return out.reshape(n, c, h2, w2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, 2 * h2, 2 * w2)


class NumpyCnn(NumpyWeights):
    """The built-in CNN in pure numpy: the reference the ONNX CNN is checked against."""

    runtime = "numpy"

    def __init__(self, shape: CnnShape, *, seed: int = 0, dtype: type = np.float32) -> None:
        self.shape = shape
        self.inputs = shape.inputs
        self.classes = shape.classes
        self._dtype = np.dtype(dtype)
        self._params = cnn_initial_weights(shape, seed=seed, dtype=dtype)

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        p = self._params
        side = self.shape.side
        cache: dict[str, np.ndarray] = {"image": x.reshape(-1, 1, side, side)}
        current = cache["image"]
        for i in (1, 2):
            weight = p[f"conv{i}.weight"]
            n, _, h, w = current.shape
            cols = _im2col(current)
            z = (cols @ weight.reshape(weight.shape[0], -1).T + p[f"conv{i}.bias"]).reshape(
                n, h, w, -1
            )
            z = z.transpose(0, 3, 1, 2)
            pooled, where = _pool(np.maximum(z, 0))
            cache[f"cols{i}"], cache[f"z{i}"], cache[f"where{i}"] = cols, z, where
            cache[f"shape{i}"] = np.array(current.shape)
            current = pooled
        flat = current.reshape(current.shape[0], -1)
        cache["flat"] = flat
        return flat @ p["fc1.weight"].T + p["fc1.bias"], cache

    @staticmethod
    def _softmax(logits: np.ndarray) -> np.ndarray:
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]

    def loss_and_grads(self, x: np.ndarray, y: np.ndarray) -> tuple[float, Weights]:
        """Mean cross-entropy on (x, y) and its gradient for every parameter."""
        p = self._params
        logits, cache = self._forward(x)
        probs = self._softmax(logits)
        n = x.shape[0]
        loss = float(-np.log(np.maximum(probs[np.arange(n), y], 1e-12)).mean())
        delta = probs
        delta[np.arange(n), y] -= 1.0
        delta /= n
        grads: Weights = {"fc1.weight": delta.T @ cache["flat"], "fc1.bias": delta.sum(axis=0)}
        upstream = (delta @ p["fc1.weight"]).reshape(cache["where2"].shape)
        for i in (2, 1):
            weight = p[f"conv{i}.weight"]
            dz = _unpool(upstream, cache[f"where{i}"]) * (cache[f"z{i}"] > 0)
            dz_rows = dz.transpose(0, 2, 3, 1).reshape(-1, weight.shape[0])
            grads[f"conv{i}.weight"] = (dz_rows.T @ cache[f"cols{i}"]).reshape(weight.shape)
            grads[f"conv{i}.bias"] = dz_rows.sum(axis=0)
            if i > 1:
                cols_grad = dz_rows @ weight.reshape(weight.shape[0], -1)
                upstream = _col2im(cols_grad, tuple(cache[f"shape{i}"]))
        return loss, {name: grads[name].astype(self._dtype, copy=False) for name in p}

    def logits(self, x: np.ndarray) -> np.ndarray:
        """The forward pass's logits of ``x`` (as given: no cast, no softmax)."""
        return self._forward(x)[0]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities (computed in chunks: im2col copies grow with the batch)."""
        x = np.asarray(x, dtype=self._dtype)
        chunks = [self._forward(x[i : i + 512])[0] for i in range(0, len(x), 512)]
        return self._softmax(np.concatenate(chunks))

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> EvalResult:
        """Mean cross-entropy and accuracy on (x, y)."""
        x, y = check_dataset(x, y, inputs=self.inputs, classes=self.classes)
        probs = self.predict(x)
        n = x.shape[0]
        loss = float(-np.log(np.maximum(probs[np.arange(n), y], 1e-12)).mean())
        return EvalResult(
            loss=loss, accuracy=float((probs.argmax(axis=1) == y).mean()), num_examples=n
        )
