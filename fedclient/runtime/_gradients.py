"""Reverse-mode differentiation of an ONNX forward graph, written as ONNX nodes.

`Differentiator` walks a forward graph backwards and, for every op between a
trainable parameter and the loss, appends the nodes of its vector-Jacobian
product (a rule per op: ``_conv``, ``_maxpool``, ...) through a `Builder` that
names them. Only default-domain ops are emitted, so the result runs on any ONNX
Runtime build; `fedclient.runtime._stepgraph` assembles the step graph around it.
Subgradients follow PyTorch: ReLU and Clip pass the gradient only strictly inside
their linear range, MaxPool routes it to the first maximum of a window.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedclient._exceptions import InvalidInput

if TYPE_CHECKING:
    import onnx

__all__ = ["Builder", "Differentiator", "NoGradientRule"]


class NoGradientRule(InvalidInput):
    """The model has an op on a trainable path that `step_graph` cannot differentiate."""


class Builder:
    """Appends nodes with fresh names to one graph."""

    def __init__(self, prefix: str = "step") -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = itertools.count()
        self._prefix = prefix

    def fresh(self, hint: str) -> str:
        return f"{self._prefix}/{hint}/{next(self._count)}"

    def op(self, op_type: str, inputs: Sequence[str], hint: str = "", **attrs: Any) -> str:
        from onnx import helper

        out = self.fresh(hint or op_type)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, value: Any, dtype: Any = np.int64, hint: str = "const") -> str:
        from onnx import numpy_helper

        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name


Shape = list[int | None]


def _shapes(model: onnx.ModelProto) -> dict[str, Shape]:
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as exc:  # InferenceError and friends
        raise InvalidInput(f"cannot infer the model's tensor shapes: {exc}") from exc
    shapes: dict[str, Shape] = {}
    graph = inferred.graph
    for value in itertools.chain(graph.input, graph.value_info, graph.output):
        tensor_type = value.type.tensor_type
        if tensor_type.HasField("shape"):
            shapes[value.name] = [
                int(d.dim_value) if d.HasField("dim_value") else None for d in tensor_type.shape.dim
            ]
    for tensor in graph.initializer:
        shapes[tensor.name] = [int(d) for d in tensor.dims]
    return shapes


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class Differentiator:
    """Reverse-mode differentiation of one forward graph, emitting ONNX nodes."""

    def __init__(self, model: onnx.ModelProto, b: Builder) -> None:
        self.model = model
        self.b = b
        self.shapes = _shapes(model)
        self.grads: dict[str, list[str]] = {}
        #: Forward nodes replaced by a variant with extra outputs (MaxPool's indices).
        self.replaced: dict[int, onnx.NodeProto] = {}
        self.opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))

    # -- helpers -------------------------------------------------------------
    def shape(self, name: str) -> Shape:
        try:
            return self.shapes[name]
        except KeyError:
            raise InvalidInput(f"the shape of {name!r} is unknown; cannot differentiate") from None

    def add_grad(self, name: str, grad: str) -> None:
        self.grads.setdefault(name, []).append(grad)

    def grad_of(self, name: str) -> str | None:
        parts = self.grads.get(name)
        if not parts:
            return None
        if len(parts) > 1:
            total = self.b.op("Sum", parts, "sum")
            self.grads[name] = [total]
        return self.grads[name][0]

    def unbroadcast(self, grad: str, out_shape: Shape, operand: str) -> str:
        """Sum ``grad`` (of shape ``out_shape``) down to the shape of ``operand``."""
        shape = self.shape(operand)
        if shape == out_shape:
            return grad
        lead = len(out_shape) - len(shape)
        axes = list(range(lead)) + [
            lead + i for i, d in enumerate(shape) if d == 1 and out_shape[lead + i] != 1
        ]
        b = self.b
        if axes:
            grad = b.op("ReduceSum", [grad, b.const(axes)], "unbroadcast", keepdims=1)
        if None in shape:
            return b.op("Reshape", [grad, b.op("Shape", [operand])], "unbroadcast")
        return b.op("Reshape", [grad, b.const(shape)], "unbroadcast")

    def mask(self, condition: str) -> str:
        from onnx import TensorProto

        return self.b.op("Cast", [condition], "mask", to=TensorProto.FLOAT)

    # -- rules ---------------------------------------------------------------
    def backward(self, index: int, node: onnx.NodeProto, needs: set[str]) -> None:
        """Add the gradients of ``node``'s inputs in ``needs`` from its output's gradient."""
        grad = self.grad_of(node.output[0])
        if grad is None:
            return
        rule = getattr(self, f"_{node.op_type.lower()}", None)
        if rule is None:
            raise NoGradientRule(
                f"op {node.op_type!r} ({node.name or node.output[0]}) lies between a trainable "
                "parameter and the loss, and the plain-onnxruntime step graph has no gradient "
                "rule for it"
            )
        rule(index, node, grad, [i in needs for i in node.input])

    def _identity(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        self.add_grad(node.input[0], g)

    def _reshape(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        b = self.b
        x = node.input[0]
        self.add_grad(x, b.op("Reshape", [g, b.op("Shape", [x])], "reshape_grad"))

    _flatten = _squeeze = _unsqueeze = _reshape

    def _transpose(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        perm = list(_attrs(node).get("perm") or reversed(range(len(self.shape(node.input[0])))))
        inverse = [perm.index(i) for i in range(len(perm))]
        self.add_grad(node.input[0], self.b.op("Transpose", [g], "transpose_grad", perm=inverse))

    def _relu(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        b = self.b
        x = node.input[0]
        positive = b.op("Greater", [x, b.const(0.0, np.float32)])
        self.add_grad(x, b.op("Mul", [g, self.mask(positive)], "relu_grad"))

    def _leakyrelu(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        b = self.b
        x = node.input[0]
        alpha = float(_attrs(node).get("alpha", 0.01))
        positive = b.op("Greater", [x, b.const(0.0, np.float32)])
        slope = b.op("Where", [positive, b.const(1.0, np.float32), b.const(alpha, np.float32)])
        self.add_grad(x, b.op("Mul", [g, slope], "leaky_grad"))

    def _clip(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        b = self.b
        x = node.input[0]
        if any(want[1:]):
            raise NoGradientRule(f"Clip {node.output[0]!r}: its bounds cannot be trained")
        inside: str | None = None
        if len(node.input) > 1 and node.input[1]:
            inside = b.op("Greater", [x, node.input[1]])
        if len(node.input) > 2 and node.input[2]:
            below = b.op("Less", [x, node.input[2]])
            inside = below if inside is None else b.op("And", [inside, below])
        self.add_grad(x, g if inside is None else b.op("Mul", [g, self.mask(inside)], "clip_grad"))

    def _sigmoid(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        b = self.b
        y = node.output[0]
        slope = b.op("Mul", [y, b.op("Sub", [b.const(1.0, np.float32), y])])
        self.add_grad(node.input[0], b.op("Mul", [g, slope], "sigmoid_grad"))

    def _tanh(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        b = self.b
        y = node.output[0]
        slope = b.op("Sub", [b.const(1.0, np.float32), b.op("Mul", [y, y])])
        self.add_grad(node.input[0], b.op("Mul", [g, slope], "tanh_grad"))

    def _exp(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        self.add_grad(node.input[0], self.b.op("Mul", [g, node.output[0]], "exp_grad"))

    def _sqrt(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        b = self.b
        half = b.op("Div", [b.const(0.5, np.float32), node.output[0]])
        self.add_grad(node.input[0], b.op("Mul", [g, half], "sqrt_grad"))

    def _log(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        self.add_grad(node.input[0], self.b.op("Div", [g, node.input[0]], "log_grad"))

    def _abs(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        sign = self.b.op("Sign", [node.input[0]])
        self.add_grad(node.input[0], self.b.op("Mul", [g, sign], "abs_grad"))

    def _erf(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        b = self.b
        x = node.input[0]
        bell = b.op("Exp", [b.op("Neg", [b.op("Mul", [x, x])])])
        slope = b.op("Mul", [bell, b.const(2.0 / np.sqrt(np.pi), np.float32)])
        self.add_grad(x, b.op("Mul", [g, slope], "erf_grad"))

    def _softmax(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        b = self.b
        y = node.output[0]
        axis = int(_attrs(node).get("axis", -1))
        inner = b.op("ReduceSum", [b.op("Mul", [g, y]), b.const([axis])], keepdims=1)
        self.add_grad(node.input[0], b.op("Mul", [y, b.op("Sub", [g, inner])], "softmax_grad"))

    def _concat(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        b = self.b
        rank = len(self.shape(node.output[0]))
        axis = int(_attrs(node)["axis"]) % rank
        start = 0
        for i, part in enumerate(node.input):
            size = self.shape(part)[axis]
            if size is None:
                raise NoGradientRule(f"Concat {node.output[0]!r}: parts of unknown size")
            if want[i]:
                piece = b.op(
                    "Slice",
                    [g, b.const([start]), b.const([start + size]), b.const([axis])],
                    "concat_grad",
                )
                self.add_grad(part, piece)
            start += size

    def _neg(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        self.add_grad(node.input[0], self.b.op("Neg", [g], "neg_grad"))

    def _binary(self, node: onnx.NodeProto, g: str, want: list[bool], grads: Sequence[Any]) -> None:
        out = self.shape(node.output[0])
        for i, make in enumerate(grads):
            if want[i]:
                self.add_grad(node.input[i], self.unbroadcast(make(), out, node.input[i]))

    def _add(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        self._binary(node, g, want, [lambda: g, lambda: g])

    def _sub(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        self._binary(node, g, want, [lambda: g, lambda: self.b.op("Neg", [g], "sub_grad")])

    def _mul(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        a, c = node.input[0], node.input[1]
        b = self.b
        self._binary(
            node,
            g,
            want,
            [lambda: b.op("Mul", [g, c], "mul_grad"), lambda: b.op("Mul", [g, a], "mul_grad")],
        )

    def _div(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        c, y = node.input[1], node.output[0]
        b = self.b
        self._binary(
            node,
            g,
            want,
            [
                lambda: b.op("Div", [g, c], "div_grad"),
                lambda: b.op("Neg", [b.op("Div", [b.op("Mul", [g, y]), c])], "div_grad"),
            ],
        )

    def _gemm(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        attrs = _attrs(node)
        alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
        trans_a, trans_b = int(attrs.get("transA", 0)), int(attrs.get("transB", 0))
        a, w = node.input[0], node.input[1]
        b = self.b
        if want[0]:  # dA = alpha * g op(B)^T, transposed back when transA
            if trans_a:
                grad = b.op("Gemm", [w, g], "gemm_grad", alpha=alpha, transA=trans_b, transB=1)
            else:
                grad = b.op("Gemm", [g, w], "gemm_grad", alpha=alpha, transB=1 - trans_b)
            self.add_grad(a, grad)
        if want[1]:  # dB = alpha * op(A)^T g, transposed back when transB
            if trans_b:
                grad = b.op("Gemm", [g, a], "gemm_grad", alpha=alpha, transA=1, transB=trans_a)
            else:
                grad = b.op("Gemm", [a, g], "gemm_grad", alpha=alpha, transA=1 - trans_a)
            self.add_grad(w, grad)
        if len(want) > 2 and want[2]:
            scaled = g if beta == 1.0 else b.op("Mul", [g, b.const(beta, np.float32)])
            self.add_grad(
                node.input[2], self.unbroadcast(scaled, self.shape(node.output[0]), node.input[2])
            )

    def _matmul(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        a, w = node.input[0], node.input[1]
        if len(self.shape(a)) != 2 or len(self.shape(w)) != 2:
            raise NoGradientRule(f"MatMul {node.output[0]!r}: only 2-D operands have a rule")
        b = self.b
        if want[0]:
            self.add_grad(a, b.op("Gemm", [g, w], "matmul_grad", transB=1))
        if want[1]:
            self.add_grad(w, b.op("Gemm", [a, g], "matmul_grad", transA=1))

    def _conv(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        x, w = node.input[0], node.input[1]
        x_shape, w_shape, y_shape = self.shape(x), self.shape(w), self.shape(node.output[0])
        if len(x_shape) != 4 or None in x_shape[1:] or None in y_shape[1:]:
            raise NoGradientRule(f"Conv {node.output[0]!r}: only 2-D images of fixed size")
        attrs = _attrs(node)
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise NoGradientRule(f"Conv {node.output[0]!r}: auto_pad is not supported; pad")
        group = int(attrs.get("group", 1))
        strides = list(attrs.get("strides", [1, 1]))
        dilations = list(attrs.get("dilations", [1, 1]))
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        kernel = [int(d) for d in w_shape[2:]]  # type: ignore[arg-type]
        c_in, height, width = (int(d) for d in x_shape[1:])  # type: ignore[arg-type]
        out_hw = [int(d) for d in y_shape[2:]]  # type: ignore[arg-type]
        b = self.b
        if want[0]:  # dX: the transposed convolution of g with the same kernel
            padding = [
                size - (s * (o - 1) + (k - 1) * d + 1 - p0 - p1)
                for size, s, o, k, d, p0, p1 in zip(
                    (height, width),
                    strides,
                    out_hw,
                    kernel,
                    dilations,
                    pads[:2],
                    pads[2:],
                    strict=True,
                )
            ]
            grad = b.op(
                "ConvTranspose",
                [g, w],
                "conv_grad_x",
                strides=strides,
                pads=pads,
                dilations=dilations,
                group=group,
                output_padding=padding,
            )
            self.add_grad(x, grad)
        if want[1]:  # dW: X (channels as batch) correlated with g (per-group) as the kernel
            per_group = c_in // group
            split = b.op("Reshape", [x, b.const([0, group, per_group, height, width])])
            moved = b.op("Transpose", [split], perm=[2, 1, 0, 3, 4])
            images = b.op("Reshape", [moved, b.const([per_group, -1, height, width])])
            kernels = b.op("Transpose", [g], perm=[1, 0, 2, 3])
            full = b.op(
                "Conv",
                [images, kernels],
                "conv_grad_w",
                strides=dilations,
                dilations=strides,
                pads=pads,
                group=group,
            )
            # The correlation may run past the kernel when the stride does not divide evenly.
            cut = b.op(
                "Slice", [full, b.const([0, 0]), b.const(kernel), b.const([2, 3])], "conv_grad_w"
            )
            self.add_grad(w, b.op("Transpose", [cut], "conv_grad_w", perm=[1, 0, 2, 3]))
        if len(want) > 2 and want[2]:
            self.add_grad(
                node.input[2], b.op("ReduceSum", [g, b.const([0, 2, 3])], "conv_grad_b", keepdims=0)
            )

    def _maxpool(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        from onnx import helper

        attrs = _attrs(node)
        if int(attrs.get("storage_order", 0)) != 0:
            raise NoGradientRule(f"MaxPool {node.output[0]!r}: column-major storage order")
        b = self.b
        indices = node.output[1] if len(node.output) > 1 and node.output[1] else None
        if indices is None:
            indices = b.fresh("maxpool_indices")
            variant = helper.make_node(
                "MaxPool", list(node.input), [node.output[0], indices], name=node.name, **attrs
            )
            self.replaced[index] = variant
        x = node.input[0]
        zeros = b.op("ConstantOfShape", [b.op("Shape", [x])])
        flat = b.op("Reshape", [zeros, b.const([-1])])
        scattered = b.op(
            "ScatterElements",
            [flat, b.op("Reshape", [indices, b.const([-1])]), b.op("Reshape", [g, b.const([-1])])],
            "maxpool_grad",
            axis=0,
            reduction="add",
        )
        self.add_grad(x, b.op("Reshape", [scattered, b.op("Shape", [x])], "maxpool_grad"))

    def _spread(self, x: str, g: str, count: int) -> str:
        """``g`` broadcast back over ``x``'s shape and divided by ``count`` (a mean's grad)."""
        b = self.b
        expanded = b.op("Expand", [g, b.op("Shape", [x])], "mean_grad")
        return b.op("Mul", [expanded, b.const(1.0 / count, np.float32)], "mean_grad")

    def _globalaveragepool(
        self, index: int, node: onnx.NodeProto, g: str, want: list[bool]
    ) -> None:
        x = node.input[0]
        spatial = self.shape(x)[2:]
        if None in spatial:
            raise NoGradientRule(f"GlobalAveragePool {node.output[0]!r}: the size must be fixed")
        self.add_grad(x, self._spread(x, g, int(np.prod(spatial))))  # type: ignore[arg-type]

    def _reduce_axes(self, node: onnx.NodeProto) -> tuple[list[int], bool]:
        attrs = _attrs(node)
        rank = len(self.shape(node.input[0]))
        if len(node.input) > 1 and node.input[1]:
            raise NoGradientRule(f"{node.op_type} {node.output[0]!r}: axes given as an input")
        axes = [a % rank for a in attrs.get("axes", range(rank))]
        return axes, bool(attrs.get("keepdims", 1))

    def _reduce_grad(self, node: onnx.NodeProto, g: str, count: int) -> None:
        axes, keepdims = self._reduce_axes(node)
        x = node.input[0]
        if not keepdims:
            g = self.b.op("Unsqueeze", [g, self.b.const(sorted(axes))], "reduce_grad")
        self.add_grad(x, self._spread(x, g, count))

    def _reducemean(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        axes, _ = self._reduce_axes(node)
        dims = [self.shape(node.input[0])[a] for a in axes]
        if None in dims:
            raise NoGradientRule(f"ReduceMean {node.output[0]!r}: reduces a dimension of no size")
        self._reduce_grad(node, g, int(np.prod(dims)))  # type: ignore[arg-type]

    def _reducesum(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        self._reduce_grad(node, g, 1)

    def _averagepool(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        attrs = _attrs(node)
        kernel = list(attrs["kernel_shape"])
        if any(attrs.get("pads", [0])) or int(attrs.get("ceil_mode", 0)):
            raise NoGradientRule(f"AveragePool {node.output[0]!r}: only without padding")
        strides = list(attrs.get("strides", [1] * len(kernel)))
        x = node.input[0]
        channels = self.shape(x)[1]
        if channels is None:
            raise NoGradientRule(f"AveragePool {node.output[0]!r}: channels must be fixed")
        # Each output spreads evenly over its window: a transposed depthwise conv of ones/k.
        ones = self.b.const(
            np.full((channels, 1, *kernel), 1.0 / np.prod(kernel)), np.float32, "avgpool_kernel"
        )
        x_shape = self.shape(x)
        y_shape = self.shape(node.output[0])
        padding = [
            int(size) - (s * (int(o) - 1) + k)  # type: ignore[arg-type]
            for size, s, o, k in zip(x_shape[2:], strides, y_shape[2:], kernel, strict=True)
        ]
        self.add_grad(
            x,
            self.b.op(
                "ConvTranspose",
                [g, ones],
                "avgpool_grad",
                strides=strides,
                group=channels,
                output_padding=padding,
            ),
        )
