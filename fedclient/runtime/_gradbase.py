"""What every gradient rule of the step graph builds on.

`Builder` appends named ONNX nodes to one graph; `RuleSet` holds the forward
model's shapes and constants, collects each tensor's gradient parts, and
dispatches an op to its rule: a method ``_<op type in lower case>(index, node,
grad, want)`` that a family of rules defines (`fedclient.runtime._grad_dense`,
``_grad_conv``, ``_grad_sequence``). `fedclient.runtime._gradients` assembles
the families into the `Differentiator`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedclient._exceptions import InvalidInput

if TYPE_CHECKING:
    import onnx

__all__ = ["Builder", "NoGradientRule", "RuleSet", "Shape", "attributes"]


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
        """A name no other tensor of the graph has."""
        return f"{self._prefix}/{hint}/{next(self._count)}"

    def op(self, op_type: str, inputs: Sequence[str], hint: str = "", **attrs: Any) -> str:
        """Append one node of one output; return that output's name."""
        from onnx import helper

        out = self.fresh(hint or op_type)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, value: Any, dtype: Any = np.int64, hint: str = "const") -> str:
        """A constant tensor (an initialiser of the graph)."""
        from onnx import numpy_helper

        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name


Shape = list[int | None]


def _tensor_types(
    model: onnx.ModelProto, constants: dict[str, np.ndarray]
) -> tuple[dict[str, Shape], dict[str, int]]:
    """Every tensor's static shape, and its element type where shape inference knows it.
    Slice bounds computed in the graph (from constants only) are added to ``constants``."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as exc:  # InferenceError and friends
        raise InvalidInput(f"cannot infer the model's tensor shapes: {exc}") from exc
    shapes: dict[str, Shape] = {}
    types: dict[str, int] = {}
    graph = inferred.graph
    for value in itertools.chain(graph.input, graph.value_info, graph.output):
        tensor_type = value.type.tensor_type
        types[value.name] = int(tensor_type.elem_type)
        if tensor_type.HasField("shape"):
            shapes[value.name] = [
                int(d.dim_value) if d.HasField("dim_value") else None for d in tensor_type.shape.dim
            ]
    for tensor in graph.initializer:
        shapes[tensor.name] = [int(d) for d in tensor.dims]
        types[tensor.name] = int(tensor.data_type)
    unknown = [
        o
        for n in model.graph.node
        for o in n.output
        if o and (o not in shapes or shapes[o].count(None) > 1)
    ]
    bounds = [
        i
        for n in model.graph.node
        if n.op_type == "Slice"
        for i in n.input[1:]
        if i and i not in constants and i not in unknown
    ]
    if unknown or bounds:  # shapes computed at run time (torch's attention reshapes)
        seen = _observed(model, [*unknown, *bounds])
        for name in bounds:
            value = seen[name][2]
            if value is not None:
                constants[name] = value
        for name, (shape, kind, _) in seen.items():
            known = shapes.get(name)
            if known is None or len(known) != len(shape):
                shapes[name] = shape
            else:  # what inference could not tell, the run does
                shapes[name] = [
                    a if a is not None else b for a, b in zip(known, shape, strict=True)
                ]
            types.setdefault(name, kind)
    return shapes, types


def _observed(
    model: onnx.ModelProto, names: list[str]
) -> dict[str, tuple[Shape, int, np.ndarray | None]]:
    """The shapes and element types of tensors ``names`` seen by running ``model`` in ONNX
    Runtime on zeros, at batch sizes 2 and 3: a dimension that changes with the batch is
    symbolic (None). ONNX's shape inference cannot follow a shape computed from
    ``Shape``, ``Gather``, ``Mod`` and ``Concat``, as torch's exporter writes attention.
    The third item is the value of a small integer tensor that both runs agree on (a
    Slice bound computed from constants), else None."""
    import onnx
    from onnx import helper

    from fedclient.runtime import _ort

    watched = onnx.ModelProto()
    watched.CopyFrom(model)
    del watched.graph.output[:]
    for name in names:
        watched.graph.output.append(onnx.ValueInfoProto(name=name))
    ort = _ort.ort()
    options = _ort.session_options()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(
            watched.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        initialised = {t.name for t in model.graph.initializer}
        (x,) = [i for i in model.graph.input if i.name not in initialised]
        dims = [d.dim_value for d in x.type.tensor_type.shape.dim[1:]]
        dtype = helper.tensor_dtype_to_np_dtype(x.type.tensor_type.elem_type)
        runs = [session.run(names, {x.name: np.zeros((batch, *dims), dtype)}) for batch in (2, 3)]
    except Exception as exc:  # onnxruntime's own exception types
        raise InvalidInput(f"cannot infer the model's tensor shapes by running it: {exc}") from exc
    seen: dict[str, tuple[Shape, int, np.ndarray | None]] = {}
    for name, small, large in zip(names, *runs, strict=True):
        shape: Shape = [
            a if a == b else None for a, b in zip(small.shape, large.shape, strict=True)
        ]
        fixed = small.dtype.kind in "iu" and small.size <= 8 and np.array_equal(small, large)
        value = np.asarray(small) if fixed else None
        seen[name] = (shape, int(helper.np_dtype_to_tensor_dtype(small.dtype)), value)
    return seen


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The values of the graph's initialisers and ``Constant`` nodes, by tensor name."""
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def attributes(node: onnx.NodeProto) -> dict[str, Any]:
    """A node's attributes as Python values."""
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class RuleSet:
    """Reverse-mode differentiation state of one forward graph, and the helpers rules use."""

    def __init__(self, model: onnx.ModelProto, b: Builder) -> None:
        self.model = model
        self.b = b
        self.constants = _constants(model)
        self.shapes, self._types = _tensor_types(model, self.constants)
        self.grads: dict[str, list[str]] = {}
        #: Forward nodes replaced by a variant with extra outputs (MaxPool's indices,
        #: LayerNormalization's mean and inverse deviation).
        self.replaced: dict[int, onnx.NodeProto] = {}
        self.opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))

    # -- helpers -------------------------------------------------------------
    def shape(self, name: str) -> Shape:
        """A tensor's static shape (``None`` where a dimension is symbolic)."""
        try:
            return self.shapes[name]
        except KeyError:
            raise InvalidInput(f"the shape of {name!r} is unknown; cannot differentiate") from None

    def differentiable(self, name: str) -> bool:
        """Whether a gradient can flow through tensor ``name``: a float tensor (shapes,
        indices and masks are integers or booleans; an unknown type counts as float)."""
        from onnx import TensorProto

        kind = self._types.get(name, TensorProto.FLOAT)
        return kind in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16)

    def constant(self, name: str) -> np.ndarray | None:
        """The value of a tensor fixed when the graph is written, else None."""
        return self.constants.get(name)

    def add_grad(self, name: str, grad: str) -> None:
        """Add one part of the gradient of ``name`` (parts are summed when it is read)."""
        self.grads.setdefault(name, []).append(grad)

    def grad_of(self, name: str) -> str | None:
        """The gradient of ``name``, or None if nothing depends on it."""
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
        """A boolean tensor as float32 ones and zeros."""
        from onnx import TensorProto

        return self.b.op("Cast", [condition], "mask", to=TensorProto.FLOAT)

    def spread(self, x: str, g: str, count: int) -> str:
        """``g`` broadcast back over ``x``'s shape and divided by ``count`` (a mean's grad)."""
        b = self.b
        expanded = b.op("Expand", [g, b.op("Shape", [x])], "mean_grad")
        return b.op("Mul", [expanded, b.const(1.0 / count, np.float32)], "mean_grad")

    # -- dispatch ------------------------------------------------------------
    def backward(self, index: int, node: onnx.NodeProto, needs: set[str]) -> None:
        """Add the gradients of ``node``'s inputs in ``needs`` from its outputs' gradients."""
        grad = self.grad_of(node.output[0])
        if grad is None and not any(self.grad_of(o) for o in node.output[1:] if o):
            return
        rule = getattr(self, f"_{node.op_type.lower()}", None)
        if rule is None or node.domain not in ("", "ai.onnx"):
            raise NoGradientRule(
                f"op {node.op_type!r} ({node.name or node.output[0]}) lies between a trainable "
                "parameter and the loss, and the plain-onnxruntime step graph has no gradient "
                "rule for it"
            )
        rule(index, node, grad or "", [i in needs for i in node.input])
