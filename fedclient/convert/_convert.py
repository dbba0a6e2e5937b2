"""Sources ``fedconvert`` turns into device bundles: built-in models, ONNX files, PyTorch modules.

A source is resolved into a forward ONNX model (opset 17, IR 10, one float32
input, one logits output) plus a `Reference` to verify the bundle against.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import math
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np

from fedclient._exceptions import InvalidInput
from fedclient.convert._references import NumpyReference, OnnxReference, Reference, TorchReference
from fedclient.convert._rewrite import (
    decompose_activations,
    inference_batchnorm,
    relu_clips,
    untie_initialisers,
)
from fedclient.protocol import ModelSpec
from fedclient.runtime import BundleManifest, CnnShape, NumpyCnn, NumpyModel, write_bundle
from fedclient.runtime._bundle import BundleWarning

if TYPE_CHECKING:
    import onnx

__all__ = [
    "BUILTINS",
    "Source",
    "builtin_source",
    "convert",
    "onnx_source",
    "resolve",
    "torch_source",
]

#: Built-in model names fedconvert knows.
BUILTINS = ("mlp", "softmax", "cnn")


@dataclass
class Source:
    """A model ready to become a bundle, and what verifies it."""

    name: str
    description: str
    model: onnx.ModelProto
    reference: Reference
    model_spec: ModelSpec | None = None
    frozen: list[str] = field(default_factory=list)
    #: BatchNorm running statistics: frozen (BatchNorm trains in inference mode), or
    #: updated on the device from batch statistics (``batchnorm == "batch"``).
    statistics: list[str] = field(default_factory=list)
    #: How BatchNorm trains: "frozen" or "batch" (`fedclient.runtime.write_bundle`).
    batchnorm: str = "frozen"


def builtin_source(
    name: str,
    *,
    inputs: int | None = None,
    hidden: Sequence[int] | None = None,
    classes: int = 10,
    side: int | None = None,
    seed: int = 0,
) -> Source:
    """A built-in model: ``mlp`` / ``softmax`` (``inputs``, ``hidden``, ``classes``) or ``cnn``
    (square ``side`` x ``side`` images, ``hidden`` = its two channel counts)."""
    from fedclient.runtime._graphs import cnn_graph, dense_graph

    if name in ("mlp", "softmax"):
        layers = [] if name == "softmax" else list(hidden if hidden is not None else [64])
        if name == "softmax" and hidden:
            raise InvalidInput("softmax regression has no hidden layers")
        try:  # msgspec checks the spec's constraints when converting, not when constructing
            spec = msgspec.convert(
                {"kind": name, "inputs": inputs or 64, "hidden": layers, "classes": classes},
                ModelSpec,
            )
        except msgspec.ValidationError as exc:
            raise InvalidInput(f"invalid {name} model: {exc}") from exc
        numpy_model = NumpyModel(spec, seed=seed)
        sizes = "-".join(map(str, [spec.inputs, *spec.hidden, spec.classes]))
        return Source(
            name,
            f"builtin:{name} {sizes} seed {seed}",
            dense_graph(spec, numpy_model.get_weights()),
            NumpyReference(numpy_model),
            model_spec=spec,
        )
    if name == "cnn":
        if side is None:
            side = 28 if inputs is None else math.isqrt(inputs)
            if inputs is not None and side * side != inputs:
                raise InvalidInput(f"a CNN needs square images; inputs={inputs} is not a square")
        channels = tuple(hidden) if hidden else (8, 16)
        if len(channels) != 2:
            raise InvalidInput(
                f"--hidden for a CNN gives its two channel counts, got {list(channels)}"
            )
        shape = CnnShape(side=side, classes=classes, channels=(channels[0], channels[1]))
        cnn = NumpyCnn(shape, seed=seed)
        return Source(
            "cnn",
            f"builtin:cnn {side}x{side} channels {shape.channels[0]},{shape.channels[1]} "
            f"classes {classes} seed {seed}",
            cnn_graph(shape, cnn.get_weights()),
            NumpyReference(cnn),
        )
    raise InvalidInput(f"unknown built-in model {name!r}; available: {', '.join(BUILTINS)}")


def onnx_source(
    path: str | os.PathLike[str], *, frozen: Sequence[str] = (), batchnorm: str = "frozen"
) -> Source:
    """An ONNX model file (weights inline or as external data beside it)."""
    import onnx

    if batchnorm != "frozen":
        raise InvalidInput(
            "--batchnorm batch takes PyTorch modules (verified against torch's training "
            "mode); onnx's reference evaluator has no training mode to verify an ONNX file"
        )

    try:
        model = onnx.load(os.fspath(path))
    except Exception as exc:  # protobuf and file errors alike
        raise InvalidInput(f"cannot read the ONNX model {os.fspath(path)!r}: {exc}") from exc
    # BatchNormalization trains in inference mode: its running statistics stay frozen.
    # ReLU6 first: the Clip inside a decomposed HardSwish keeps its own gradient.
    decomposed, rewritten = decompose_activations(relu_clips(model))
    trained, statistics = inference_batchnorm(decomposed)
    frozen = _frozen([t.name for t in model.graph.initializer], frozen, statistics)
    parameters = [
        t.name
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT and t.dims and t.name not in frozen
    ]
    if not parameters:
        raise InvalidInput(f"{path} has no float32 initialisers to train")
    try:
        reference = OnnxReference(model, parameters)  # the file as written, not the rewrite
    except Exception as exc:
        raise InvalidInput(f"onnx's reference evaluator cannot run {path}: {exc}") from exc
    description = f"onnx:{path}{_rewritten(rewritten)}"
    return Source(
        Path(path).stem, description, trained, reference, frozen=frozen, statistics=statistics
    )


def _frozen(names: Sequence[str], patterns: Sequence[str], statistics: Sequence[str]) -> list[str]:
    """The initialisers not to train: those named in ``patterns`` or under a module prefix
    there (one ending in ``.``: ``features.`` freezes a backbone), and the statistics."""
    prefixes = tuple(p for p in patterns if p.endswith("."))
    chosen = [n for n in names if n in patterns or (prefixes and n.startswith(prefixes))]
    unmatched = [p for p in patterns if p not in names and not any(n.startswith(p) for n in names)]
    if unmatched:
        raise InvalidInput(f"--freeze {unmatched[0]!r} names no initialiser of the model")
    return [*chosen, *(n for n in statistics if n not in chosen)]


def _rewritten(ops: list[str]) -> str:
    """What the description says of the ops rewritten for training, if any."""
    if not ops:
        return ""
    counts = ", ".join(f"{op} x{ops.count(op)}" for op in sorted(set(ops)))
    return f" (rewritten to train: {counts})"


def _load_object(target: str) -> Any:
    """``package.module:attr`` or ``path/to/file.py:attr``."""
    location, _, attr = target.rpartition(":")
    try:
        if location.endswith(".py"):
            spec = importlib.util.spec_from_file_location(Path(location).stem, location)
            if spec is None or spec.loader is None:
                raise InvalidInput(f"cannot import {location}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        else:
            # As `python -m` and uvicorn do: the working folder's modules import, so
            # `fedconvert mymodel:Net` works from the folder that holds mymodel.py.
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(location)
        return getattr(module, attr)
    except InvalidInput:
        raise
    except Exception as exc:  # the user's code may raise anything while importing
        raise InvalidInput(f"cannot load {target!r}: {type(exc).__name__}: {exc}") from exc


#: ``--input-dtype`` choices: features, or token ids (an embedding's input).
INPUT_DTYPES = ("float32", "int64")
#: ``--batchnorm`` choices: BatchNorm on its frozen running statistics, or on batch ones.
BATCHNORM = ("frozen", "batch")


def torch_source(
    target: str,
    input_shape: Sequence[int],
    *,
    frozen: Sequence[str] = (),
    input_dtype: str = "float32",
    batchnorm: str = "frozen",
) -> Source:
    """A PyTorch ``nn.Module`` (a class built with no arguments, a factory, or an instance)
    named ``module:attr`` or ``file.py:attr``, exported with ``torch.onnx.export``; its
    input is float32 features or, with ``input_dtype="int64"``, token ids. ``batchnorm``:
    BatchNorm trains on its frozen running statistics, or on batch statistics ("batch")."""
    try:
        import torch
    except ImportError as exc:
        raise InvalidInput(
            "converting a PyTorch module needs torch installed (pip install torch); "
            "or export it to ONNX yourself and pass the .onnx file"
        ) from exc
    import onnx

    if not input_shape:
        raise InvalidInput(
            "a PyTorch source needs --input-shape (one example's shape, e.g. 1,28,28)"
        )
    if input_dtype not in INPUT_DTYPES:
        raise InvalidInput(f"--input-dtype must be one of {', '.join(INPUT_DTYPES)}")
    if batchnorm not in BATCHNORM:
        raise InvalidInput(f"--batchnorm must be one of {', '.join(BATCHNORM)}")
    obj = _load_object(target)
    module = obj() if not isinstance(obj, torch.nn.Module) and callable(obj) else obj
    if not isinstance(module, torch.nn.Module):
        raise InvalidInput(f"{target} is not a torch.nn.Module (got {type(module).__name__})")
    module = module.float().eval()
    buffer = io.BytesIO()
    dummy = torch.zeros((2, *input_shape), dtype=getattr(torch, input_dtype))
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of the dynamo one, which needs
            # onnxscript and writes external data; it still suits small models. Its own
            # deprecation notices are not the user's concern.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            # torch's own modules check masks with Python booleans (TransformerEncoder's
            # causal-mask detection): traced as constants, which the verification against
            # torch covers. Such warnings from the user's code still show.
            warnings.filterwarnings(
                "ignore", message="Converting a tensor to a Python boolean", module=r"torch\."
            )
            torch.onnx.export(
                module,
                (dummy,),
                buffer,  # type: ignore[arg-type]  # a file object, as torch documents
                dynamo=False,  # the TorchScript exporter: inline weights, no onnxscript needed
                opset_version=17,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                do_constant_folding=False,  # folding renames (transposes) weights
                export_params=True,
            )
    except Exception as exc:  # the exporter raises many types for unsupported modules
        raise InvalidInput(f"torch.onnx.export cannot export {target}: {exc}") from exc
    # BatchNormalization trains in inference mode: its running statistics stay frozen
    # (the reference module is in eval mode too: torch leaves them alone in its step).
    # On batch statistics, the bundle's training graphs rewrite it (write_bundle), and
    # the reference trains in training mode.
    state = module.state_dict()
    exported = untie_initialisers(onnx.load_from_string(buffer.getvalue()), set(state))
    decomposed, rewritten = decompose_activations(relu_clips(exported))
    model, statistics = inference_batchnorm(decomposed)
    if batchnorm == "batch":
        model = decomposed
        if not statistics:
            raise InvalidInput("--batchnorm batch: the model has no BatchNorm layer")
    frozen = _frozen(
        [t.name for t in model.graph.initializer],
        frozen,
        statistics if batchnorm == "frozen" else [],
    )
    if batchnorm == "batch" and set(frozen) & set(statistics):
        raise InvalidInput(
            "--batchnorm batch updates the running statistics: do not freeze them "
            f"({sorted(set(frozen) & set(statistics))[0]})"
        )
    float_initialisers = [
        t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and t.dims
    ]
    unnamed = [n for n in float_initialisers if n not in state and n not in frozen]
    if unnamed:
        raise InvalidInput(
            f"the exported graph has weights that match no state_dict entry: {unnamed[:5]}; "
            "the exporter renamed or folded them"
        )
    names = {n: n for n in float_initialisers if n not in frozen}
    return Source(
        target.rpartition(":")[2].lower(),
        f"torch:{target} input {tuple(input_shape)}"
        f"{'' if input_dtype == 'float32' else ' ' + input_dtype}{_rewritten(rewritten)}",
        model,
        TorchReference(module, names, training=batchnorm == "batch"),
        frozen=frozen,
        statistics=statistics,
        batchnorm=batchnorm,
    )


def resolve(
    source: str,
    *,
    inputs: int | None = None,
    hidden: Sequence[int] | None = None,
    classes: int = 10,
    side: int | None = None,
    seed: int = 0,
    input_shape: Sequence[int] = (),
    input_dtype: str = "float32",
    frozen: Sequence[str] = (),
    batchnorm: str = "frozen",
) -> Source:
    """A built-in name, an ``.onnx`` path, or a PyTorch ``module:attr`` / ``file.py:attr``."""
    if source in BUILTINS:
        return builtin_source(
            source, inputs=inputs, hidden=hidden, classes=classes, side=side, seed=seed
        )
    if source.endswith(".onnx") or Path(source).is_file():
        if not Path(source).is_file():
            raise InvalidInput(f"no such file: {source}")
        return onnx_source(source, frozen=frozen, batchnorm=batchnorm)
    if ":" in source:
        return torch_source(
            source, input_shape, frozen=frozen, input_dtype=input_dtype, batchnorm=batchnorm
        )
    raise InvalidInput(
        f"cannot tell what {source!r} is: give a built-in model ({', '.join(BUILTINS)}), "
        "an .onnx file, or a PyTorch module as module:Class or file.py:Class"
    )


def fresh_statistics(source: Source) -> list[str]:
    """The BatchNorm layers of ``source`` whose running statistics were never measured
    (every mean 0, every variance 1: a freshly initialised model), named by their mean."""
    from onnx import numpy_helper

    values = {t.name: t for t in source.model.graph.initializer}
    means = source.statistics[0::2]
    fresh = []
    for mean, var in zip(means, source.statistics[1::2], strict=True):
        if mean in values and var in values:
            m, v = numpy_helper.to_array(values[mean]), numpy_helper.to_array(values[var])
            if not m.any() and np.all(v == 1):
                fresh.append(mean)
    return fresh


def convert(source: Source, out: str | os.PathLike[str]) -> BundleManifest:
    """Write ``source`` as a device bundle in ``out``. A model whose BatchNorm statistics
    were never measured is converted with a `BundleWarning` saying it will not learn."""
    fresh = fresh_statistics(source) if source.batchnorm == "frozen" else []
    if fresh:
        warnings.warn(
            f"{len(fresh)} of {len(source.statistics) // 2} BatchNorm layers have statistics "
            "that were never measured (mean 0, variance 1) and the bundle trains BatchNorm in "
            "inference mode, on those statistics: a freshly initialised network like this "
            "does not learn on devices (a MobileNet stayed at chance). Convert it with "
            "--batchnorm batch (batch statistics, as torch trains it), or pre-train it so "
            "that its statistics are real (examples/mobilenet/)",
            BundleWarning,
            stacklevel=2,
        )
    return write_bundle(
        source.model,
        out,
        name=source.name,
        source=source.description,
        frozen=source.frozen,
        model_spec=source.model_spec,
        batchnorm=source.batchnorm,
    )
