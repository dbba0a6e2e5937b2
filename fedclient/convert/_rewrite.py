"""Graph rewrites before the training graph is built, so a mobile model trains as its
source does:

    untie_initialisers     parameters torch's exporter tied get their own tensors back
    decompose_activations  HardSwish, HardSigmoid in ops ONNX Runtime differentiates
    relu_clips             ReLU6 as Relu then Clip(max): no gradient at 0, as in PyTorch
    inference_batchnorm    BatchNorm on its running statistics, which stay frozen

ReLU6 (``Clip(x, 0, 6)``) at exactly 0. ONNX Runtime's training graph passes the
gradient of a Clip at its lower bound; PyTorch (and the step graph) pass none there,
and on a blank image background a conv without bias gives exactly 0 everywhere: one
SGD step was 5e-2 off PyTorch's. ``Relu`` then ``Clip(·, max)`` computes the same
values, and every engine differentiates ``Relu`` at 0 as PyTorch does.

BatchNormalization in inference mode. ONNX Runtime's training graph runs every
``BatchNormalization`` node in training mode (batch statistics), while the model
the device serves, and the reference it is verified against, normalise with the
stored running statistics: the loss at the same weights differed by 3.1 on a small
conv net. On-device fine-tuning keeps the statistics frozen and trains the affine
scale and shift, so each node becomes the same arithmetic in plain ops that ONNX
Runtime differentiates as written::

    y = (x - mean) * (scale / sqrt(var + epsilon)) + bias

``mean`` and ``var`` stay initialisers and are frozen (never trained, never
uploaded); ``scale`` and ``bias`` train. Parameter names do not change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

__all__ = ["decompose_activations", "inference_batchnorm", "relu_clips", "untie_initialisers"]


def decompose_activations(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """``model`` with the activations ONNX Runtime training cannot differentiate written
    in ops it can, and the op types rewritten (one entry a node):

        HardSwish(x)   = x * Clip(x + 3, 0, 6) / 6        (MobileNetV3)
        HardSigmoid(x) = Clip(alpha * x + beta, 0, 1)
    """
    import onnx
    from onnx import helper, numpy_helper

    wanted = {"HardSwish", "HardSigmoid"}
    if not any(n.op_type in wanted for n in model.graph.node):
        return model, []
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    rewritten: list[str] = []

    def constant(name: str, value: float) -> onnx.NodeProto:
        tensor = numpy_helper.from_array(np.array(value, np.float32))
        return helper.make_node("Constant", [], [name], value=tensor)

    for node in model.graph.node:
        if node.op_type not in wanted:
            out.graph.node.append(node)
            continue
        rewritten.append(node.op_type)
        x, y = node.input[0], node.output[0]
        t = f"{y}.{node.op_type.lower()}"
        if node.op_type == "HardSwish":
            out.graph.node.extend(
                [
                    constant(f"{t}.three", 3.0),
                    constant(f"{t}.zero", 0.0),
                    constant(f"{t}.six", 6.0),
                    helper.make_node("Add", [x, f"{t}.three"], [f"{t}.shifted"]),
                    helper.make_node(
                        "Clip", [f"{t}.shifted", f"{t}.zero", f"{t}.six"], [f"{t}.relu6"]
                    ),
                    helper.make_node("Mul", [x, f"{t}.relu6"], [f"{t}.product"]),
                    helper.make_node("Div", [f"{t}.product", f"{t}.six"], [y]),
                ]
            )
        else:
            alpha = next((a.f for a in node.attribute if a.name == "alpha"), 0.2)
            beta = next((a.f for a in node.attribute if a.name == "beta"), 0.5)
            out.graph.node.extend(
                [
                    constant(f"{t}.alpha", alpha),
                    constant(f"{t}.beta", beta),
                    constant(f"{t}.zero", 0.0),
                    constant(f"{t}.one", 1.0),
                    helper.make_node("Mul", [x, f"{t}.alpha"], [f"{t}.scaled"]),
                    helper.make_node("Add", [f"{t}.scaled", f"{t}.beta"], [f"{t}.shifted"]),
                    helper.make_node("Clip", [f"{t}.shifted", f"{t}.zero", f"{t}.one"], [y]),
                ]
            )
    return out, rewritten


def relu_clips(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every ``Clip`` whose lower bound is the constant 0 (ReLU6) written as
    ``Relu`` then a ``Clip`` with the upper bound only (see the module docstring)."""
    import onnx
    from onnx import helper, numpy_helper

    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)

    def at_zero(node: onnx.NodeProto) -> bool:
        if node.op_type != "Clip" or len(node.input) < 2 or node.input[1] not in constants:
            return False
        low = constants[node.input[1]]
        return bool(low.size == 1 and float(low.reshape(())) == 0.0)

    if not any(at_zero(n) for n in model.graph.node):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    for node in model.graph.node:
        if not at_zero(node):
            out.graph.node.append(node)
            continue
        rectified = f"{node.output[0]}.relu"
        upper = [node.input[2]] if len(node.input) > 2 and node.input[2] else []
        out.graph.node.extend(
            [
                helper.make_node("Relu", [node.input[0]], [rectified]),
                helper.make_node("Clip", [rectified, "", *upper], list(node.output)),
            ]
        )
    return out


def untie_initialisers(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """``model`` with each parameter the exporter tied to an equal one given back its own
    initialiser. ``torch.onnx.export`` keeps one copy of equal initialisers (two fresh
    BatchNorm layers' scales are both ones) and feeds the others through ``Identity``
    nodes: trained as exported, the layers would share one tensor, and the bundle would
    lose the source's names. ``names``: the source's parameter names (its state_dict)."""
    import onnx

    initialisers = {t.name: t for t in model.graph.initializer}
    tied = [
        n
        for n in model.graph.node
        if n.op_type == "Identity"
        and n.input[0] in initialisers
        and n.output[0] in names
        and n.output[0] not in initialisers
    ]
    if not tied:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(n for n in model.graph.node if n not in tied)
    for node in tied:
        copy = onnx.TensorProto()
        copy.CopyFrom(initialisers[node.input[0]])
        copy.name = node.output[0]
        out.graph.initializer.append(copy)
    return out


def inference_batchnorm(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """``model`` with each BatchNormalization node written out in inference mode, and
    the names of the running statistics it reads (to freeze). The model is unchanged
    (and the list empty) when it has no such node."""
    import onnx
    from onnx import helper, numpy_helper

    if not any(n.op_type == "BatchNormalization" for n in model.graph.node):
        return model, []
    inferred = onnx.shape_inference.infer_shapes(model)
    ranks = {
        v.name: len(v.type.tensor_type.shape.dim)
        for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
        if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")
    }
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    statistics: list[str] = []
    for node in model.graph.node:
        if node.op_type != "BatchNormalization":
            out.graph.node.append(node)
            continue
        x, scale, bias, mean, var = node.input[:5]
        statistics += [mean, var]
        epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        rank = ranks.get(x, 4)
        tag = node.output[0]

        def name(what: str, tag: str = tag) -> str:
            return f"{tag}.bn.{what}"

        # Per-channel vectors broadcast over (N, C, ...): shape (C, 1, ..., 1).
        shape = np.array([-1] + [1] * max(0, rank - 2), dtype=np.int64)
        out.graph.initializer.append(numpy_helper.from_array(shape, name("shape")))
        epsilon_value = numpy_helper.from_array(np.array(epsilon, np.float32))
        out.graph.node.append(  # a constant, not an initialiser: nothing to train or freeze
            helper.make_node("Constant", [], [name("epsilon")], value=epsilon_value)
        )
        shaped = {}
        for role, tensor in (("scale", scale), ("bias", bias), ("mean", mean), ("var", var)):
            shaped[role] = name(role)
            out.graph.node.append(
                helper.make_node("Reshape", [tensor, name("shape")], [shaped[role]])
            )
        out.graph.node.extend(
            [
                helper.make_node("Add", [shaped["var"], name("epsilon")], [name("var_eps")]),
                helper.make_node("Sqrt", [name("var_eps")], [name("std")]),
                helper.make_node("Div", [shaped["scale"], name("std")], [name("factor")]),
                helper.make_node("Sub", [x, shaped["mean"]], [name("centred")]),
                helper.make_node("Mul", [name("centred"), name("factor")], [name("scaled")]),
                helper.make_node("Add", [name("scaled"), shaped["bias"]], [node.output[0]]),
            ]
        )
    return out, statistics
