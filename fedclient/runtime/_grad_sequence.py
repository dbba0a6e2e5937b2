"""Gradient rules of the step graph for what sequence models export to.

``nn.Embedding`` exports to Gather on the weight, ``nn.LayerNorm`` to
LayerNormalization, ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``
to batched MatMul, Softmax, Transpose, Reshape, Gather (the query, key and value
of one projection; the last position of a sequence), masks to Where, and
indexing to Slice and Split.

Gather's gradient scatters the incoming gradient back into zeros of the data's
shape and adds where an index repeats (a token seen twice), as PyTorch's
embedding does. LayerNormalization's needs the mean and inverse deviation of
the forward pass: the forward node is replaced by its variant that also
returns them (they are LayerNormalization's optional outputs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fedclient.runtime._gradbase import NoGradientRule, RuleSet, attributes

if TYPE_CHECKING:
    import onnx

__all__ = ["SequenceRules"]


class SequenceRules(RuleSet):
    """Gather, LayerNormalization, Where, Slice, Split, Expand, Cast, Pow."""

    def _gather(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        if not want[0]:
            return  # the indices: integers, nothing to differentiate
        b = self.b
        data, indices = node.input[0], node.input[1]
        rank = len(self.shape(data))
        axis = int(attributes(node).get("axis", 0)) % rank
        index_rank = len(self.shape(indices))
        # ScatterND writes along the leading axes: bring the gathered axis (in the data)
        # and the index dimensions (in the gradient) to the front.
        to_front = [axis, *range(axis), *range(axis + 1, rank)]
        data_shape = b.op("Shape", [data], "gather_grad")
        front_shape = data_shape if axis == 0 else b.op("Gather", [data_shape, b.const(to_front)])
        zeros = b.op("ConstantOfShape", [front_shape], "gather_grad")
        if axis and index_rank:
            g_rank = rank - 1 + index_rank
            order = [
                *range(axis, axis + index_rank),
                *range(axis),
                *range(axis + index_rank, g_rank),
            ]
            g = b.op("Transpose", [g], "gather_grad", perm=order)
        size = b.op("Gather", [data_shape, b.const([axis])], "gather_grad")
        ids = b.op("Unsqueeze", [indices, b.const([-1])], "gather_grad")
        values = self.constant(indices)
        if values is None or (values < 0).any():  # negative indices count from the end
            negative = b.op("Less", [ids, b.const(0)])
            ids = b.op("Where", [negative, b.op("Add", [ids, size]), ids], "gather_grad")
        grad = b.op("ScatterND", [zeros, ids, g], "gather_grad", reduction="add")
        if axis:
            back = [*range(1, axis + 1), 0, *range(axis + 1, rank)]
            grad = b.op("Transpose", [grad], "gather_grad", perm=back)
        self.add_grad(data, grad)

    def _layernormalization(
        self, index: int, node: onnx.NodeProto, g: str, want: list[bool]
    ) -> None:
        from onnx import helper

        b = self.b
        x, scale = node.input[0], node.input[1]
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        shape = self.shape(x)
        rank = len(shape)
        attrs = attributes(node)
        axis = int(attrs.get("axis", -1)) % rank
        normalised = shape[axis:]
        if None in normalised:
            raise NoGradientRule(
                f"LayerNormalization {node.output[0]!r}: the normalised dimensions must be fixed"
            )
        count = int(np.prod(normalised))  # type: ignore[arg-type]
        outputs = list(node.output) + [""] * (3 - len(node.output))
        for i, what in ((1, "mean"), (2, "inv_std")):
            if not outputs[i]:
                outputs[i] = b.fresh(f"layernorm_{what}")
        if outputs != list(node.output):
            self.replaced[index] = helper.make_node(
                "LayerNormalization", list(node.input), outputs, name=node.name, **attrs
            )
        mean, inv_std = outputs[1], outputs[2]
        xhat = b.op("Mul", [b.op("Sub", [x, mean]), inv_std], "layernorm_xhat")
        leading = b.const(list(range(axis)))
        if want[1]:
            grad = b.op("Mul", [g, xhat], "layernorm_grad_scale")
            if axis:
                grad = b.op("ReduceSum", [grad, leading], keepdims=0)
            self.add_grad(scale, self.unbroadcast(grad, [int(d) for d in normalised], scale))  # type: ignore[arg-type]
        if bias is not None and len(want) > 2 and want[2]:
            grad = b.op("ReduceSum", [g, leading], keepdims=0) if axis else g
            self.add_grad(bias, self.unbroadcast(grad, [int(d) for d in normalised], bias))  # type: ignore[arg-type]
        if want[0]:
            # dx = inv_std * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
            inner = b.const(list(range(axis, rank)))
            share = b.const(1.0 / count, np.float32)
            dxhat = b.op("Mul", [g, scale], "layernorm_dxhat")
            mean_d = b.op("Mul", [b.op("ReduceSum", [dxhat, inner], keepdims=1), share])
            both = b.op("Mul", [dxhat, xhat])
            mean_dx = b.op("Mul", [b.op("ReduceSum", [both, inner], keepdims=1), share])
            centred = b.op("Sub", [b.op("Sub", [dxhat, mean_d]), b.op("Mul", [xhat, mean_dx])])
            self.add_grad(x, b.op("Mul", [centred, inv_std], "layernorm_grad_x"))

    def _where(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        b = self.b
        condition = node.input[0]
        zero = b.const(0.0, np.float32)
        out = self.shape(node.output[0])
        for i, picked in ((1, [g, zero]), (2, [zero, g])):
            if want[i]:
                grad = b.op("Where", [condition, *picked], "where_grad")
                self.add_grad(node.input[i], self.unbroadcast(grad, out, node.input[i]))

    def _expand(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        if want[0]:
            self.add_grad(
                node.input[0], self.unbroadcast(g, self.shape(node.output[0]), node.input[0])
            )

    def _cast(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        from onnx import TensorProto

        if int(attributes(node)["to"]) in (TensorProto.FLOAT, TensorProto.DOUBLE):
            # float to float: the identity (the forward graph's parameters are float32)
            self.add_grad(node.input[0], self.b.op("Cast", [g], "cast_grad", to=TensorProto.FLOAT))
        # to an integer or boolean type: piecewise constant, no gradient

    def _pow(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        b = self.b
        x, exponent = node.input[0], node.input[1]
        if want[1]:
            raise NoGradientRule(f"Pow {node.output[0]!r}: its exponent cannot be trained")
        if want[0]:  # d x^p = p x^(p-1)
            lower = b.op("Sub", [exponent, b.const(1.0, np.float32)])
            slope = b.op("Mul", [exponent, b.op("Pow", [x, lower])])
            self.add_grad(
                x,
                self.unbroadcast(
                    b.op("Mul", [g, slope], "pow_grad"), self.shape(node.output[0]), x
                ),
            )

    def _slice(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        if not want[0]:
            return
        x = node.input[0]
        shape = self.shape(x)
        rank = len(shape)
        given = [self.constant(n) if n else None for n in node.input[1:]]
        given += [None] * (4 - len(given))
        starts, ends, axes, steps = given
        named_axes = len(node.input) > 3 and bool(node.input[3])
        if starts is None or ends is None or (named_axes and axes is None):
            raise NoGradientRule(f"Slice {node.output[0]!r}: its bounds must be constants")
        if axes is None:
            axes = np.arange(len(starts))
        if steps is not None and (steps != 1).any():
            raise NoGradientRule(f"Slice {node.output[0]!r}: only steps of 1 have a rule")
        pads = [0] * (2 * rank)
        for start, end, axis in zip(starts.tolist(), ends.tolist(), axes.tolist(), strict=True):
            axis %= rank
            size = shape[axis]
            if size is None:
                raise NoGradientRule(f"Slice {node.output[0]!r}: slices a dimension of no size")
            begin = min(max(start + size if start < 0 else start, 0), size)
            stop = min(max(end + size if end < 0 else end, 0), size)
            pads[axis] = begin
            pads[rank + axis] = size - max(stop, begin)
        b = self.b
        self.add_grad(x, b.op("Pad", [g, b.const(pads)], "slice_grad"))

    def _split(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        if not want[0]:
            return
        b = self.b
        rank = len(self.shape(node.input[0]))
        axis = int(attributes(node).get("axis", 0)) % rank
        parts = []
        for out in node.output:
            part = self.grad_of(out) if out else None
            if part is None:  # an output nothing differentiable reads: its gradient is 0
                part = b.op("ConstantOfShape", [b.op("Shape", [out])], "split_zeros")
            parts.append(part)
        self.add_grad(node.input[0], b.op("Concat", parts, "split_grad", axis=axis))
