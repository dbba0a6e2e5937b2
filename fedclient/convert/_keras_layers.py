"""Keras layers as TensorFlow functions whose gradients are TFLite builtin ops.

TensorFlow's own gradients of convolutions, pooling and ReLU
(``Conv2DBackpropFilter``, ``DepthwiseConv2dNativeBackprop*``, ``MaxPoolGrad``,
``AvgPoolGrad``, ``ReluGrad``) are TensorFlow-only ops that no LiteRT build runs,
so each layer here carries a ``tf.custom_gradient`` written in builtin ops (the
table is in `fedclient.convert._keras`). Every function takes the ``tensorflow``
module as its first argument: TensorFlow is imported by the caller, at conversion
time only. Tensors are NHWC.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

__all__ = [
    "Op",
    "avg_pool",
    "batch_norm",
    "conv2d",
    "depthwise_conv2d",
    "max_pool",
    "relu",
    "relu_layer",
]

#: A layer as a function of its input tensors and the parameters by name.
Op = Callable[[list[Any], Mapping[str, Any]], Any]


def relu(tf: Any, *, slope: float = 0.0, ceiling: float | None = None) -> Any:
    """ReLU, ReLU6, leaky and capped ReLU, with gradients in builtin ops."""

    def relu(x: Any) -> Any:
        if ceiling == 6.0 and not slope:
            y = tf.nn.relu6(x)
        else:
            y = tf.nn.leaky_relu(x, slope) if slope else tf.nn.relu(x)
            if ceiling is not None:
                y = tf.minimum(y, ceiling)

        def grad(dy: Any) -> Any:
            passes = tf.cast(x > 0.0, dy.dtype)
            if slope:
                passes = slope + (1.0 - slope) * passes
            if ceiling is not None:
                passes = passes * tf.cast(x < ceiling, dy.dtype)
            return dy * passes

        return y, grad

    return tf.custom_gradient(relu)


def relu_layer(
    tf: Any, kind: str, config: Mapping[str, Any], refuse: Callable[[str], Exception]
) -> Op:
    if kind == "LeakyReLU":  # tf-keras calls the slope alpha, Keras 3 negative_slope
        slope = float(config.get("negative_slope", config.get("alpha", 0.3)))
        ceiling = None
    else:
        if float(config.get("threshold") or 0.0) != 0.0:
            raise refuse("a ReLU threshold other than 0 is not supported")
        slope = float(config.get("negative_slope") or 0.0)
        ceiling = None if config.get("max_value") is None else float(config["max_value"])
    if not 0.0 <= slope < 1.0:
        raise refuse(f"negative slope {slope} is not supported (0 <= slope < 1)")
    function = relu(tf, slope=slope, ceiling=ceiling)
    return lambda inputs, params: function(inputs[0])


def batch_norm(
    tf: Any,
    config: Mapping[str, Any],
    names: Mapping[str, str],
    refuse: Callable[[str], Exception],
) -> Op:
    """Inference-mode batch normalisation: the statistics frozen, scale and shift train."""
    axis = config.get("axis", -1)
    axis = axis[0] if isinstance(axis, list | tuple) and len(axis) == 1 else axis
    epsilon = float(config.get("epsilon", 1e-3))
    gamma, beta = names.get("gamma"), names.get("beta")

    def batch_norm(inputs: list[Any], params: Mapping[str, Any]) -> Any:
        (x,) = inputs
        if axis not in (-1, len(x.shape) - 1):
            raise refuse("only normalisation over the last (channel) axis is supported")
        scale = tf.math.rsqrt(params[names["moving_variance"]] + epsilon)
        if gamma:
            scale = scale * params[gamma]
        shift = -params[names["moving_mean"]] * scale
        return x * scale + (shift + params[beta] if beta else shift)

    return batch_norm


def _pads(
    h: int, w: int, size: tuple[int, int], stride: int, padding: str
) -> tuple[int, int, list[list[int]]]:
    """Output height and width of a window op, and TensorFlow's padding for it (NHWC)."""
    if padding == "VALID":
        return (h - size[0]) // stride + 1, (w - size[1]) // stride + 1, [[0, 0]] * 4
    outs, pads = [], [[0, 0]]
    for n, k in ((h, size[0]), (w, size[1])):
        out = -(-n // stride)
        total = max((out - 1) * stride + k - n, 0)
        outs.append(out)
        pads.append([total // 2, total - total // 2])
    return outs[0], outs[1], [*pads, [0, 0]]


def _kernel_grad(tf: Any, x: Any, dy: Any, size: tuple[int, int], stride: int, pad: str) -> Any:
    """d(loss)/d(kernel) of ``conv2d(x, kernel)``: the input correlated with the output
    gradient, batch and channels swapped, the gradient dilated by the stride."""
    _, _, pads = _pads(x.shape[1], x.shape[2], size, stride, pad)
    padded = tf.pad(x, pads) if pad == "SAME" else x
    out = tf.nn.conv2d(
        tf.transpose(padded, [3, 1, 2, 0]),
        tf.transpose(dy, [1, 2, 0, 3]),
        1,
        "VALID",
        dilations=stride,
    )
    return tf.transpose(out[:, : size[0], : size[1], :], [1, 2, 0, 3])


def conv2d(tf: Any, x: Any, kernel: Any, stride: int, padding: str) -> Any:
    def conv(x: Any, kernel: Any) -> Any:
        def grad(dy: Any) -> Any:
            dx = tf.nn.conv2d_transpose(dy, kernel, list(x.shape), stride, padding)
            size = (kernel.shape[0], kernel.shape[1])
            return dx, _kernel_grad(tf, x, dy, size, stride, padding)

        return tf.nn.conv2d(x, kernel, stride, padding), grad

    return tf.custom_gradient(conv)(x, kernel)


def depthwise_conv2d(tf: Any, x: Any, kernel: Any, stride: int, padding: str) -> Any:
    def conv(x: Any, kernel: Any) -> Any:
        def grad(dy: Any) -> Any:
            # A depthwise conv is a full conv whose kernel is block-diagonal over channels.
            kh, kw, channels, multiplier = kernel.shape
            eye = tf.constant(np.eye(channels, dtype=np.float32)[None, None, :, :, None])
            full = tf.reshape(kernel[:, :, :, None, :] * eye, [kh, kw, channels, -1])
            dx = tf.nn.conv2d_transpose(dy, full, list(x.shape), stride, padding)
            dfull = _kernel_grad(tf, x, dy, (kh, kw), stride, padding)
            dfull = tf.reshape(dfull, [kh, kw, channels, channels, multiplier])
            return dx, tf.reduce_sum(dfull * eye, axis=3)

        y = tf.nn.depthwise_conv2d(x, kernel, [1, stride, stride, 1], padding)
        return y, grad

    return tf.custom_gradient(conv)(x, kernel)


def _windows(x: Any, size: tuple[int, int], stride: int, out: tuple[int, int]) -> list[Any]:
    """Each window position's values, (N, out_h, out_w, C), in row-major window order."""
    return [
        x[:, i : i + (out[0] - 1) * stride + 1 : stride, j : j + (out[1] - 1) * stride + 1 : stride]
        for i in range(size[0])
        for j in range(size[1])
    ]


def _scatter(
    tf: Any, parts: list[Any], size: tuple[int, int], stride: int, shape: Any, pads: Any
) -> Any:
    """The inverse of `_windows`: add each window position's part back where it came from (a
    transposed convolution with one one-hot kernel per position), the padding cropped."""
    n, h, w, c = shape
    hp, wp = h + sum(pads[1]), w + sum(pads[2])
    _, oh, ow, _ = parts[0].shape
    positions = size[0] * size[1]
    stacked = tf.transpose(tf.stack(parts, axis=-1), [0, 3, 1, 2, 4])
    kernel = np.zeros((size[0], size[1], 1, positions), np.float32)
    for p in range(positions):
        kernel[p // size[1], p % size[1], 0, p] = 1.0
    out = tf.nn.conv2d_transpose(
        tf.reshape(stacked, [n * c, oh, ow, positions]),
        tf.constant(kernel),
        [n * c, hp, wp, 1],
        stride,
        "VALID",
    )
    out = tf.transpose(tf.reshape(out, [n, c, hp, wp]), [0, 2, 3, 1])
    return out[:, pads[1][0] : pads[1][0] + h, pads[2][0] : pads[2][0] + w, :]


def max_pool(tf: Any, x: Any, size: tuple[int, int], stride: int, padding: str) -> Any:
    def pool(x: Any) -> Any:
        y = tf.nn.max_pool2d(x, size, stride, padding)

        def grad(dy: Any) -> Any:
            oh, ow, pads = _pads(x.shape[1], x.shape[2], size, stride, padding)
            lowest = float(np.finfo(np.float32).min)
            padded = tf.pad(x, pads, constant_values=lowest) if padding == "SAME" else x
            taken = tf.zeros_like(dy)
            parts = []
            for window in _windows(padded, size, stride, (oh, ow)):
                # Each window's gradient goes to its first maximum, as TensorFlow's does.
                hit = tf.cast(tf.equal(window, y), dy.dtype) * (1.0 - taken)
                taken = taken + hit
                parts.append(hit * dy)
            return _scatter(tf, parts, size, stride, x.shape, pads)

        return y, grad

    return tf.custom_gradient(pool)(x)


def avg_pool(tf: Any, x: Any, size: tuple[int, int], stride: int, padding: str) -> Any:
    def pool(x: Any) -> Any:
        def grad(dy: Any) -> Any:
            oh, ow, pads = _pads(x.shape[1], x.shape[2], size, stride, padding)
            # SAME pooling averages over the window's real (unpadded) elements only.
            real = np.pad(np.ones(x.shape[1:3], np.float32), pads[1:3])
            counts = sum(w for w in _windows(real[None, :, :, None], size, stride, (oh, ow)))
            share = dy * tf.constant((1.0 / counts).astype(np.float32))
            return _scatter(tf, [share] * (size[0] * size[1]), size, stride, x.shape, pads)

        return tf.nn.avg_pool2d(x, size, stride, padding), grad

    return tf.custom_gradient(pool)(x)
