"""ONNX Runtime's training artifacts for a bundle, and what its gradient builder needs.

`write_training_files` runs ``onnxruntime.training.artifacts.generate_artifacts``
(checkpoint, training, eval and optimizer models) and exports the inference
model. Two things stand between it and a model as exporters write them:

* LayerNormalization. ONNX Runtime's gradient of it reads the node's optional
  mean and inverse-deviation outputs, and fails with a C++ assertion
  (``i < node_->OutputDefs().size() was false``) when the exporter left them
  out, as torch's does. `with_layernorm_statistics` gives every such node
  those outputs; the values the model computes do not change.
* Failures that name no op. When the gradient builder fails anyway, each
  distinct op on a trainable path is tried alone (one node, its loss the sum of
  its output; ~10 ms an op), and the first it cannot differentiate is named.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedclient._exceptions import InvalidInput
from fedclient.runtime import _ort

if TYPE_CHECKING:
    import onnx

__all__ = ["load_module", "with_layernorm_statistics", "write_training_files"]

_NO_GRADIENT = re.compile(r"gradient builder has not been registered: (\w+)")
CHECKPOINT = "checkpoint"
TRAINING_MODEL = "training_model.onnx"
EVAL_MODEL = "eval_model.onnx"


def with_layernorm_statistics(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every LayerNormalization node given its mean and inverse-deviation
    outputs (unused, as before); ``model`` itself when none lacks them."""
    import onnx

    if not any(n.op_type == "LayerNormalization" and len(n.output) < 3 for n in model.graph.node):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        if node.op_type == "LayerNormalization":
            while len(node.output) < 3:
                node.output.append("")
            for i, what in ((1, "mean"), (2, "inv_std_dev")):
                if not node.output[i]:
                    node.output[i] = f"{node.output[0]}.{what}"
    return out


def write_training_files(
    model: onnx.ModelProto,
    trainable: list[str],
    constants: list[str],
    logits: str,
    out: Path,
    inference: Path,
    extra_outputs: Sequence[str] = (),
) -> None:
    """ONNX Runtime's training artifacts into ``out``, and the inference model it exports
    into ``inference``; the training model returns the loss, the logits, then
    ``extra_outputs``. Raises `InvalidInput` naming the op it cannot differentiate."""
    artifacts = _ort.artifacts_api()
    prepared = with_layernorm_statistics(model)
    try:
        with _ort.quiet_native_stderr():
            artifacts.generate_artifacts(
                prepared,
                requires_grad=trainable,
                frozen_params=constants,
                loss=artifacts.LossType.CrossEntropyLoss,
                optimizer=artifacts.OptimType.SGD,
                artifact_directory=out,
                additional_output_names=[logits, *extra_outputs],
            )
    except Exception as exc:  # ORT raises bare RuntimeErrors; name the cause when known
        missing = _NO_GRADIENT.search(str(exc))
        culprit = _named(prepared, missing.group(1)) if missing else None
        culprit = culprit or _untrainable_op(prepared, trainable)
        if culprit:
            raise InvalidInput(
                f"unsupported op {culprit}: ONNX Runtime training has no gradient for it, so it "
                "cannot sit between a trainable parameter and the loss (freeze the parameters "
                "before it, or replace the op)"
            ) from exc
        raise InvalidInput(
            f"ONNX Runtime cannot build training artifacts: {first_line(exc)}"
        ) from exc
    state, module = load_module(out)
    try:
        module.export_model_for_inferencing(str(inference), [logits])
    except Exception as exc:
        raise InvalidInput(
            f"ONNX Runtime cannot export the inference model: {first_line(exc)}"
        ) from exc
    del module, state


def _named(model: onnx.ModelProto, op_type: str) -> str:
    """``'Op' (first node of that type)``."""
    node = next((n for n in model.graph.node if n.op_type == op_type), None)
    where = f" ({node.name or node.output[0]})" if node is not None else ""
    return f"{op_type!r}{where}"


def first_line(exc: BaseException) -> str:
    """The first line of an ONNX Runtime error, without its C++ source location."""
    text = str(exc).strip()
    for marker in ("was false.", "] "):
        if marker in text:
            text = text.split(marker, 1)[1].strip() or text
    return text.splitlines()[0] if text else type(exc).__name__


def load_module(directory: Path) -> tuple[Any, Any]:
    """The checkpoint state and training ``Module`` of the artifacts in ``directory``."""
    api = _ort.training_api()
    state = api.CheckpointState.load_checkpoint(str(directory / CHECKPOINT))
    module = api.Module(
        str(directory / TRAINING_MODEL),
        state,
        str(directory / EVAL_MODEL),
        session_options=_ort.session_options(),
    )
    return state, module


def _untrainable_op(model: onnx.ModelProto, trainable: Sequence[str]) -> str | None:
    """``'Op' (node)`` of the first op on a trainable path that ONNX Runtime's gradient
    builder cannot differentiate when tried alone, or None if each one alone trains."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # the full build failed for its own reason; nothing to add
        return None
    types = {
        v.name: v.type.tensor_type
        for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    }
    values = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute:
            values[node.output[0]] = node.attribute[0].t
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    needs = set(trainable)
    tried: set[bytes] = set()
    for node in model.graph.node:
        wanted = [i for i in node.input if i in needs]
        if not wanted:
            continue
        floats = [
            o for o in node.output if o in types and types[o].elem_type == onnx.TensorProto.FLOAT
        ]
        needs.update(floats)  # shapes, masks, indices: nothing flows back through them
        if node.output[0] not in floats:
            continue
        signature = repr(
            (node.op_type, [a.SerializeToString() for a in node.attribute], len(wanted))
        ).encode()
        if signature in tried:
            continue
        tried.add(signature)
        if not _trains_alone(node, wanted, types, values, opset):
            return f"{node.op_type!r} ({node.name or node.output[0]})"
    return None


def _trains_alone(
    node: onnx.NodeProto,
    wanted: list[str],
    types: dict[str, Any],
    values: dict[str, Any],
    opset: int,
) -> bool:
    """Whether ONNX Runtime builds the gradient of ``node`` alone with respect to ``wanted``
    (its other inputs must be constants)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    initialisers: list[onnx.TensorProto] = []
    for name in dict.fromkeys(i for i in node.input if i):
        if name in values:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(values[name])
            tensor.name = name
            initialisers.append(tensor)
            continue
        kind = types.get(name)
        if name not in wanted or kind is None or not kind.HasField("shape"):
            # A shape or mask computed in the graph, or an unknown shape: the node cannot
            # be rebuilt alone faithfully; say nothing rather than blame it.
            return True
        dims = [d.dim_value if d.HasField("dim_value") else 2 for d in kind.shape.dim]
        value = np.random.default_rng(0).random(dims).astype(np.float32) + 0.5
        initialisers.append(numpy_helper.from_array(value, name))
    total = helper.make_node("ReduceSum", [node.output[0]], ["probe.loss"], keepdims=0)
    graph = helper.make_graph(
        [node, total],
        "probe",
        [],
        [helper.make_tensor_value_info("probe.loss", TensorProto.FLOAT, [])],
        initialisers,
    )
    probe = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=onnx.IR_VERSION_2023_5_5
    )
    artifacts = _ort.artifacts_api()
    with tempfile.TemporaryDirectory() as scratch:
        try:
            with _ort.quiet_native_stderr():
                artifacts.generate_artifacts(
                    probe,
                    requires_grad=wanted,
                    loss=None,
                    optimizer=artifacts.OptimType.SGD,
                    artifact_directory=scratch,
                )
        except Exception:  # ORT's own exception types
            return False
    return True
