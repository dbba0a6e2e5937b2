"""BatchNorm that learns: batch statistics in the training graphs, running statistics on the
device.

A bundle converted with batch statistics (``fedconvert --batchnorm batch``) trains as
PyTorch's ``module.train()`` does. Each ``BatchNormalization`` node of the training
graphs (ONNX Runtime's training model and ``step.onnx``) becomes plain ops that both
engines differentiate::

    mean = ReduceMean(x, over batch and space)        var = ReduceMean((x - mean)^2)
    y    = (x - mean) * (scale / sqrt(var + epsilon)) + bias

and hands ``mean`` and ``var`` out of the graph. The device folds them into the
layer's running statistics after each step, as PyTorch does (the ONNX node's
``momentum`` is the share the old value keeps; the variance is made unbiased)::

    running_mean = momentum * running_mean + (1 - momentum) * mean
    running_var  = momentum * running_var  + (1 - momentum) * var * n / (n - 1)

``n`` is the number of values per channel in the minibatch. The inference graphs
(``inference.onnx``, ``forward.onnx``) keep the node in inference mode on the running
statistics, which travel with the weights (`OnnxBackend.get_weights` holds them):
averaged by the server with the rest, or kept on the device
(`fedclient.trainers.LocalStatistics`, FedBN's idea), as the plan says.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING

import msgspec
import numpy as np

from fedclient._exceptions import InvalidInput

if TYPE_CHECKING:
    import onnx

__all__ = [
    "BatchNormLayer",
    "batch_statistics",
    "check_minibatch",
    "update_running_statistics",
]


class BatchNormLayer(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One BatchNorm layer of a bundle trained on batch statistics: its running statistics
    (initialisers of the inference graphs), the training graphs' outputs holding the
    minibatch's mean and variance (shape (1, C, 1, ...)), the ONNX ``momentum`` and the
    values per channel of one example (``n`` above is this times the batch)."""

    mean: str
    var: str
    batch_mean: str
    batch_var: str
    momentum: float
    per_example: int


def batch_statistics(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[BatchNormLayer]]:
    """``model`` with every BatchNormalization node normalising by its minibatch's statistics
    (see the module docstring; the running statistics leave the graph), and the layers."""
    import onnx
    from onnx import helper, numpy_helper

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset >= 18:  # ReduceMean takes its axes as an input from opset 18
        raise InvalidInput(
            f"BatchNorm on batch statistics needs a model of opset 17 or older, not {opset}"
        )
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {
        v.name: [
            d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim
        ]
        for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
        if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")
    }
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    layers: list[BatchNormLayer] = []
    for node in model.graph.node:
        if node.op_type != "BatchNormalization":
            out.graph.node.append(node)
            continue
        x, scale, bias, mean, var = node.input[:5]
        attrs = {a.name: a for a in node.attribute}
        epsilon = attrs["epsilon"].f if "epsilon" in attrs else 1e-5
        momentum = attrs["momentum"].f if "momentum" in attrs else 0.9
        dims = shapes.get(x)
        if dims is None or len(dims) < 2 or any(d is None for d in dims[1:]):
            raise InvalidInput(f"BatchNorm {node.output[0]!r}: its input's shape is not known")
        rank = len(dims)
        axes = [0, *range(2, rank)]
        tag = f"{node.output[0]}.bn"

        def name(what: str, tag: str = tag) -> str:
            return f"{tag}.{what}"

        shape = np.array([-1] + [1] * (rank - 2), dtype=np.int64)
        out.graph.initializer.append(numpy_helper.from_array(shape, name("shape")))
        eps = numpy_helper.from_array(np.array(epsilon, np.float32))
        out.graph.node.extend(
            [
                helper.make_node("Constant", [], [name("epsilon")], value=eps),
                helper.make_node("ReduceMean", [x], [name("batch_mean")], axes=axes, keepdims=1),
                helper.make_node("Sub", [x, name("batch_mean")], [name("centred")]),
                helper.make_node("Mul", [name("centred"), name("centred")], [name("squared")]),
                helper.make_node(
                    "ReduceMean", [name("squared")], [name("batch_var")], axes=axes, keepdims=1
                ),
                helper.make_node("Add", [name("batch_var"), name("epsilon")], [name("var_eps")]),
                helper.make_node("Sqrt", [name("var_eps")], [name("std")]),
                helper.make_node("Reshape", [scale, name("shape")], [name("scale")]),
                helper.make_node("Reshape", [bias, name("shape")], [name("bias")]),
                helper.make_node("Div", [name("scale"), name("std")], [name("factor")]),
                helper.make_node("Mul", [name("centred"), name("factor")], [name("scaled")]),
                helper.make_node("Add", [name("scaled"), name("bias")], [node.output[0]]),
            ]
        )
        layers.append(
            BatchNormLayer(
                mean=mean,
                var=var,
                batch_mean=name("batch_mean"),
                batch_var=name("batch_var"),
                momentum=float(f"{momentum:.6g}"),  # 0.9, not float32 0.8999999761
                per_example=int(np.prod([int(d or 0) for d in dims[2:]], dtype=np.int64)),
            )
        )
    statistics = {n for layer in layers for n in (layer.mean, layer.var)}
    read = {i for n in out.graph.node for i in n.input}
    kept = [t for t in out.graph.initializer if t.name not in statistics or t.name in read]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    return out, layers


def update_running_statistics(
    statistics: MutableMapping[str, np.ndarray],
    layers: Sequence[BatchNormLayer],
    batch: Mapping[str, np.ndarray],
    examples: int,
) -> None:
    """Fold one minibatch's statistics (``batch``: the training graph's outputs by name) of
    ``examples`` examples into the running ``statistics``, in float32 as PyTorch does."""
    for layer in layers:
        n = examples * layer.per_example
        keep = np.float32(layer.momentum)
        new = np.float32(1.0 - layer.momentum)
        mean = np.asarray(batch[layer.batch_mean], np.float32).reshape(-1)
        var = np.asarray(batch[layer.batch_var], np.float32).reshape(-1)
        unbiased = var * np.float32(n / (n - 1))
        statistics[layer.mean] = (keep * statistics[layer.mean] + new * mean).astype(np.float32)
        statistics[layer.var] = (keep * statistics[layer.var] + new * unbiased).astype(np.float32)


def check_minibatch(layers: Sequence[BatchNormLayer], examples: int) -> None:
    """Refuse a minibatch too small for batch statistics (as PyTorch does): one value per
    channel has no variance, and the layer's output would be its bias alone."""
    for layer in layers:
        if examples * layer.per_example < 2:
            raise InvalidInput(
                "BatchNorm on batch statistics needs at least 2 values per channel in a "
                f"minibatch; a minibatch of {examples} gives {examples * layer.per_example} "
                f"({layer.mean}): use a larger batch_size"
            )
