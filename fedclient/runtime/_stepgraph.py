"""A training step in standard ONNX ops, for devices with plain ``onnxruntime``.

ONNX Runtime's training packages (``onnxruntime-training``) have no wheel for
aarch64 Linux or Python 3.13, and their gradient graphs use ``com.microsoft``
gradient ops that only the training build runs. `step_graph` writes one SGD
step of a forward model as an ordinary ONNX graph instead: the forward pass,
the mean cross-entropy, the gradients by reverse-mode differentiation, and the
update, all in default-domain ops that any ONNX Runtime build (or another ONNX
engine) runs::

    inputs   <input> (batch, ...) float32 features or int64 token ids, labels (batch,)
             int64, learning_rate () float32, and every trainable parameter
    outputs  loss () float32, then <parameter>.next for every parameter, in order,
             then <parameter>.grad (the mean loss's gradient) for every parameter,
             then any forward tensors asked for (BatchNorm's batch statistics)

`forward_graph` is the forward model with its trainable parameters as inputs
(their initial values kept as overridable defaults), for inference at any weights.

Gradient rules exist for the ops the converter emits, mobile models and
transformers use: Gemm, MatMul (2-D and batched, with broadcasting), Conv (2-D,
any stride, padding, dilation and group, so depthwise too), MaxPool,
GlobalAveragePool, AveragePool (no padding), ReduceMean and ReduceSum (axes
attribute; ReduceMean over the batch too: BatchNorm's batch statistics), Relu,
Clip, LeakyRelu, Sigmoid, Tanh, Softmax (any axis), Erf (GELU as exported),
elementwise Add/Sub/Mul/Div/Neg/Sqrt/Exp/Log/Abs/Pow with
broadcasting, Gather (embeddings, indexing), LayerNormalization, Where (masks),
Slice, Split, Concat, Expand, Cast, Flatten, Reshape, Squeeze, Unsqueeze,
Transpose, Identity. Gradients flow through float tensors only (shapes, masks
and indices computed from parameters carry none). An op without a rule between
a trainable parameter and the loss raises `NoGradientRule` naming it; ops that
only see constants (BatchNorm's frozen statistics, a frozen backbone) need
none. The rules are in `fedclient.runtime._gradients` and its families.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from fedclient._exceptions import InvalidInput
from fedclient.runtime._gradients import Builder, Differentiator, NoGradientRule

if TYPE_CHECKING:
    import onnx

__all__ = [
    "LEARNING_RATE",
    "LOSS",
    "STEP_GRAPH",
    "NoGradientRule",
    "forward_graph",
    "grad_name",
    "next_name",
    "step_graph",
]

#: The step graph's version: bumped when the graphs it writes change (cached bundles rebuild).
STEP_GRAPH = 2
LOSS = "loss"
LEARNING_RATE = "learning_rate"
LABELS = "labels"
#: The lowest default-domain opset the rules are written for (ReduceSum's axes input,
#: ScatterElements' reduction).
MIN_OPSET = 16


def next_name(parameter: str) -> str:
    """The step graph's output holding ``parameter`` after the update."""
    return f"{parameter}.next"


def grad_name(parameter: str) -> str:
    """The step graph's output holding the gradient of the loss with respect to
    ``parameter`` (verification compares it with the source's, tensor by tensor)."""
    return f"{parameter}.grad"


def forward_graph(model: onnx.ModelProto, trainable: Sequence[str]) -> onnx.ModelProto:
    """``model`` with each of ``trainable`` also a graph input (its value the default)."""
    import onnx

    result = onnx.ModelProto()
    result.CopyFrom(model)
    by_name = {t.name: t for t in result.graph.initializer}
    for name in trainable:
        tensor = by_name[name]
        result.graph.input.append(
            onnx.helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims))
        )
    return result


def step_graph(
    model: onnx.ModelProto,
    trainable: Sequence[str],
    *,
    labels: str = LABELS,
    extra_outputs: Sequence[str] = (),
) -> onnx.ModelProto:
    """One SGD step of ``model`` (one input, one logits output) on the mean cross-entropy,
    in standard ONNX ops (see the module docstring for its inputs and outputs), also
    returning the forward pass's tensors ``extra_outputs`` last (BatchNorm's batch
    statistics)."""
    import onnx
    from onnx import TensorProto, helper

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise NoGradientRule(
            f"the model's opset is {opset}; the plain step graph needs {MIN_OPSET} or newer"
        )
    graph = model.graph
    initialised = {t.name for t in graph.initializer}
    (x,) = [i for i in graph.input if i.name not in initialised]
    (logits,) = graph.output
    b = Builder()
    diff = Differentiator(model, b)

    # Which tensors depend on a trainable parameter: only they need gradients.
    needs = set(trainable)
    for node in graph.node:
        if any(i in needs for i in node.input):
            needs.update(o for o in node.output if o and diff.differentiable(o))
    if logits.name not in needs:
        raise InvalidInput("the logits do not depend on any trainable parameter")

    # Mean cross-entropy and its gradient with respect to the logits.
    classes = diff.shape(logits.name)[1]
    log_probs = b.op("LogSoftmax", [logits.name], "log_probs", axis=1)
    one_hot = b.op(
        "OneHot",
        [labels, b.const([classes]), b.const([0.0, 1.0], np.float32)],
        "one_hot",
        axis=-1,
    )
    count = b.op("Cast", [b.op("Size", [labels])], "count", to=TensorProto.FLOAT)
    picked = b.op("ReduceSum", [b.op("Mul", [one_hot, log_probs])], "picked", keepdims=0)
    b.nodes.append(helper.make_node("Div", [b.op("Neg", [picked]), count], [LOSS]))
    probs = b.op("Exp", [log_probs], "probs")
    diff.add_grad(logits.name, b.op("Div", [b.op("Sub", [probs, one_hot]), count], "dlogits"))

    for index in reversed(range(len(graph.node))):
        node = graph.node[index]
        if any(o in needs for o in node.output):
            diff.backward(index, node, needs)

    learning_rate = LEARNING_RATE
    outputs = [helper.make_tensor_value_info(LOSS, TensorProto.FLOAT, [])]
    updates = []
    by_name = {t.name: t for t in graph.initializer}
    for name in trainable:
        grad = diff.grad_of(name)
        if grad is None:  # not on any path to the loss: it never changes
            zeros = b.op("ConstantOfShape", [b.const(list(by_name[name].dims))], "no_grad")
            updates.append(helper.make_node("Identity", [zeros], [grad_name(name)]))
            updates.append(helper.make_node("Identity", [name], [next_name(name)]))
        else:
            b.nodes.append(helper.make_node("Identity", [grad], [grad_name(name)]))
            scaled = b.op("Mul", [learning_rate, grad_name(name)], "scaled")
            updates.append(helper.make_node("Sub", [name, scaled], [next_name(name)]))
        outputs.append(
            helper.make_tensor_value_info(
                next_name(name), TensorProto.FLOAT, list(by_name[name].dims)
            )
        )
    outputs += [
        helper.make_tensor_value_info(grad_name(n), TensorProto.FLOAT, list(by_name[n].dims))
        for n in trainable
    ]
    outputs += [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, diff.shape(n)) for n in extra_outputs
    ]
    forward = [diff.replaced.get(i, node) for i, node in enumerate(graph.node)]
    inputs = [
        x,
        helper.make_tensor_value_info(labels, TensorProto.INT64, ["batch"]),
        helper.make_tensor_value_info(learning_rate, TensorProto.FLOAT, []),
        *(
            helper.make_tensor_value_info(name, TensorProto.FLOAT, list(by_name[name].dims))
            for name in trainable
        ),
    ]
    constants = [t for t in graph.initializer if t.name not in set(trainable)]
    step = helper.make_graph(
        [*forward, *b.nodes, *updates],
        f"{graph.name or 'model'}_step",
        inputs,
        outputs,
        [*constants, *b.initializers],
    )
    result = helper.make_model(
        step,
        opset_imports=list(model.opset_import),
        ir_version=model.ir_version,
        producer_name="fedclient",
    )
    try:
        onnx.checker.check_model(result)
    except onnx.checker.ValidationError as exc:  # a rule wrote an invalid graph: our bug
        raise RuntimeError(f"the step graph is invalid: {exc}") from exc
    return result
