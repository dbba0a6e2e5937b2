"""Gradient rules of the step graph for dense layers, activations, elementwise arithmetic
with broadcasting, reshaping and reductions.

Subgradients follow PyTorch: ReLU and Clip pass the gradient only strictly inside
their linear range.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedclient.runtime._gradbase import NoGradientRule, RuleSet, attributes

if TYPE_CHECKING:
    import onnx

__all__ = ["DenseRules"]


class DenseRules(RuleSet):
    """Gemm, MatMul, the activations, elementwise ops, reshaping, Concat, reductions."""

    def _identity(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        self.add_grad(node.input[0], g)

    def _reshape(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        b = self.b
        x = node.input[0]
        self.add_grad(x, b.op("Reshape", [g, b.op("Shape", [x])], "reshape_grad"))

    _flatten = _squeeze = _unsqueeze = _reshape

    def _transpose(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        perm = list(attributes(node).get("perm") or reversed(range(len(self.shape(node.input[0])))))
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
        alpha = float(attributes(node).get("alpha", 0.01))
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
        axis = int(attributes(node).get("axis", -1))
        inner = b.op("ReduceSum", [b.op("Mul", [g, y]), b.const([axis])], keepdims=1)
        self.add_grad(node.input[0], b.op("Mul", [y, b.op("Sub", [g, inner])], "softmax_grad"))

    def _concat(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        b = self.b
        rank = len(self.shape(node.output[0]))
        axis = int(attributes(node)["axis"]) % rank
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
        attrs = attributes(node)
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
        a_shape, w_shape = self.shape(a), self.shape(w)
        if len(a_shape) < 2 or len(w_shape) < 2:
            raise NoGradientRule(f"MatMul {node.output[0]!r}: a 1-D operand has no rule")
        b = self.b
        if len(a_shape) == 2 and len(w_shape) == 2:
            if want[0]:
                self.add_grad(a, b.op("Gemm", [g, w], "matmul_grad", transB=1))
            if want[1]:
                self.add_grad(w, b.op("Gemm", [a, g], "matmul_grad", transA=1))
            return
        # Batched: (..., m, k) @ (..., k, n), the batch dimensions broadcast.
        batch = self.shape(node.output[0])[:-2]
        if want[0]:  # dA = g @ B^T, summed over the dimensions A was broadcast along
            grad = b.op("MatMul", [g, self._swap_last(w, len(w_shape))], "matmul_grad")
            self.add_grad(a, self.unbroadcast(grad, [*batch, *a_shape[-2:]], a))
        if want[1]:
            if len(w_shape) == 2:  # a weight shared by every row: one product over all rows
                k, n = w_shape
                rows = b.op("Reshape", [a, b.const([-1, k])], "matmul_grad")
                grads = b.op("Reshape", [g, b.const([-1, n])], "matmul_grad")
                self.add_grad(w, b.op("Gemm", [rows, grads], "matmul_grad", transA=1))
            else:  # dB = A^T @ g
                grad = b.op("MatMul", [self._swap_last(a, len(a_shape)), g], "matmul_grad")
                self.add_grad(w, self.unbroadcast(grad, [*batch, *w_shape[-2:]], w))

    def _swap_last(self, x: str, rank: int) -> str:
        """``x`` with its last two axes swapped (a batched transpose)."""
        perm = [*range(rank - 2), rank - 1, rank - 2]
        return self.b.op("Transpose", [x], "swap_last", perm=perm)

    def _reduce_axes(self, node: onnx.NodeProto) -> tuple[list[int], bool]:
        attrs = attributes(node)
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
        self.add_grad(x, self.spread(x, g, count))

    def _reducemean(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        axes, _ = self._reduce_axes(node)
        dims = [self.shape(node.input[0])[a] for a in axes]
        if None in dims:  # over the batch (BatchNorm's statistics): the count at run time
            b, x = self.b, node.input[0]
            kept = b.op("Cast", [b.op("Size", [node.output[0]])], "mean_count", to=1)
            every = b.op("Cast", [b.op("Size", [x])], "mean_count", to=1)
            share = b.op("Div", [kept, every], "mean_share")
            if not attributes(node).get("keepdims", 1):
                g = b.op("Unsqueeze", [g, b.const(sorted(axes))], "reduce_grad")
            expanded = b.op("Expand", [g, b.op("Shape", [x])], "mean_grad")
            self.add_grad(x, b.op("Mul", [expanded, share], "mean_grad"))
            return
        self._reduce_grad(node, g, int(np.prod(dims)))  # type: ignore[arg-type]

    def _reducesum(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        self._reduce_grad(node, g, 1)
