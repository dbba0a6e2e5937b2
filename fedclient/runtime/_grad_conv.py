"""Gradient rules of the step graph for convolutions and pooling (2-D images).

MaxPool routes the gradient to the first maximum of each window, as PyTorch does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fedclient.runtime._gradbase import NoGradientRule, RuleSet, attributes

if TYPE_CHECKING:
    import onnx

__all__ = ["ConvRules"]


class ConvRules(RuleSet):
    """Conv (any stride, padding, dilation, group), MaxPool, AveragePool, GlobalAveragePool."""

    def _conv(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        x, w = node.input[0], node.input[1]
        x_shape, w_shape, y_shape = self.shape(x), self.shape(w), self.shape(node.output[0])
        if len(x_shape) != 4 or None in x_shape[1:] or None in y_shape[1:]:
            raise NoGradientRule(f"Conv {node.output[0]!r}: only 2-D images of fixed size")
        attrs = attributes(node)
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

        attrs = attributes(node)
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

    def _globalaveragepool(
        self, index: int, node: onnx.NodeProto, g: str, want: list[bool]
    ) -> None:
        x = node.input[0]
        spatial = self.shape(x)[2:]
        if None in spatial:
            raise NoGradientRule(f"GlobalAveragePool {node.output[0]!r}: the size must be fixed")
        self.add_grad(x, self.spread(x, g, int(np.prod(spatial))))  # type: ignore[arg-type]

    def _averagepool(self, index: int, node: onnx.NodeProto, g: str, want: list[bool]) -> None:
        attrs = attributes(node)
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
