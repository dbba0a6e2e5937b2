"""ONNX forward graphs of the built-in models, written with the ``onnx`` helper API.

The graphs take a flat float32 ``input`` of shape ``(batch, features)`` and
return ``logits``; parameters are initialisers named and laid out like the
numpy reference (``fc1.weight`` is ``(out, in)``, used by ``Gemm`` with
``transB=1``), so weights travel by name between runtimes. The batch dimension
is symbolic: the last minibatch of an epoch may be smaller.

Needs the ``onnx`` package (the ``onnx`` extra); imported only when a bundle is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from fedclient._exceptions import InvalidInput
from fedclient.protocol import ModelSpec, Weights
from fedclient.runtime._cnn import CnnShape, cnn_initial_weights
from fedclient.runtime._numpy import NumpyModel

if TYPE_CHECKING:
    import onnx

__all__ = ["IR_VERSION", "OPSET", "builtin_graph", "builtin_weights", "cnn_graph", "dense_graph"]

#: What ONNX Runtime 1.19 runs: opset 17 is well covered by its gradient builder, IR 10 is its max.
OPSET = 17
IR_VERSION = 10
INPUT = "input"
LOGITS = "logits"
BATCH = "batch"


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
    except ImportError as exc:
        raise InvalidInput(
            "building ONNX models needs the onnx package: pip install 'fedclient[onnx]'"
        ) from exc


def dense_graph(spec: ModelSpec, weights: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A softmax-regression or MLP ``onnx.ModelProto`` for ``spec`` holding ``weights``."""
    _require_onnx()
    from onnx import TensorProto, helper, numpy_helper

    layers = len(weights) // 2
    nodes = []
    initializers = []
    current = INPUT
    for i in range(1, layers + 1):
        weight, bias = f"fc{i}.weight", f"fc{i}.bias"
        initializers += [
            numpy_helper.from_array(np.asarray(weights[weight], np.float32), weight),
            numpy_helper.from_array(np.asarray(weights[bias], np.float32), bias),
        ]
        out = LOGITS if i == layers else f"fc{i}"
        nodes.append(helper.make_node("Gemm", [current, weight, bias], [out], transB=1))
        if i < layers:
            nodes.append(helper.make_node("Relu", [out], [f"relu{i}"]))
            current = f"relu{i}"
    graph = helper.make_graph(
        nodes,
        spec.kind,
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [BATCH, spec.inputs])],
        [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, [BATCH, spec.classes])],
        initializers,
    )
    return _finish(graph)


def cnn_graph(shape: CnnShape, weights: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A small CNN ``onnx.ModelProto``: two 3x3 conv + ReLU + 2x2 max-pool blocks, then a
    linear layer. Input is flat ``(batch, height * width)``; it is reshaped in the graph."""
    _require_onnx()
    from onnx import TensorProto, helper, numpy_helper

    initializers = [
        numpy_helper.from_array(np.asarray(value, np.float32), name)
        for name, value in weights.items()
    ]
    initializers.append(
        numpy_helper.from_array(
            np.array([-1, 1, shape.height, shape.width], np.int64), "image_shape"
        )
    )
    initializers.append(numpy_helper.from_array(np.array([-1, shape.flat], np.int64), "flat_shape"))
    nodes = [helper.make_node("Reshape", [INPUT, "image_shape"], ["image"])]
    current = "image"
    for i in (1, 2):
        nodes += [
            helper.make_node(
                "Conv",
                [current, f"conv{i}.weight", f"conv{i}.bias"],
                [f"conv{i}"],
                kernel_shape=[3, 3],
                pads=[1, 1, 1, 1],
            ),
            helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"]),
            helper.make_node(
                "MaxPool", [f"relu{i}"], [f"pool{i}"], kernel_shape=[2, 2], strides=[2, 2]
            ),
        ]
        current = f"pool{i}"
    nodes += [
        helper.make_node("Reshape", [current, "flat_shape"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc1.weight", "fc1.bias"], [LOGITS], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [
            helper.make_tensor_value_info(
                INPUT, TensorProto.FLOAT, [BATCH, shape.height * shape.width]
            )
        ],
        [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, [BATCH, shape.classes])],
        initializers,
    )
    return _finish(graph)


def _finish(graph: onnx.GraphProto) -> onnx.ModelProto:
    import onnx
    from onnx import helper

    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="fedclient",
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def builtin_weights(spec: ModelSpec, *, seed: int = 0) -> Weights:
    """The numpy reference's initial weights of a built-in ``spec`` for ``seed``."""
    kind: str = spec.kind  # "cnn" once ModelSpec accepts it (see CnnShape.for_spec)
    if kind in ("softmax", "mlp"):
        return NumpyModel(spec, seed=seed).get_weights()
    if kind == "cnn":
        return cnn_initial_weights(CnnShape.for_spec(spec), seed=seed)
    raise InvalidInput(f"no ONNX graph for model kind {spec.kind!r}")


def builtin_graph(
    spec: ModelSpec, *, seed: int = 0, weights: Mapping[str, np.ndarray] | None = None
) -> onnx.ModelProto:
    """The ONNX model of a built-in ``spec`` holding ``weights`` (default: exactly the
    numpy reference's initial weights for ``seed``)."""
    weights = builtin_weights(spec, seed=seed) if weights is None else weights
    kind: str = spec.kind
    if kind == "cnn":
        return cnn_graph(CnnShape.for_spec(spec), weights)
    return dense_graph(spec, weights)
