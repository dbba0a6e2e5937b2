"""Device bundles: the files an ONNX Runtime device trains from, and their manifest.

A bundle is a directory::

    checkpoint            the parameters (ONNX Runtime training checkpoint)    } the training
    training_model.onnx   forward + cross-entropy loss + gradients             } API's files
    eval_model.onnx       forward + loss, also returning the logits            } (onnxruntime-
    optimizer_model.onnx  SGD (learning rate set per call)                     }  training)
    step.onnx             one SGD step in standard ONNX ops                    } any ONNX
    forward.onnx          forward, the parameters as inputs (initial values)   } Runtime build
    inference.onnx        forward only; plain ``onnxruntime.InferenceSession`` runs it
    weights.bin           (without a checkpoint) the weights the ONNX files share
    manifest.json         `BundleManifest`: parameter names, shapes and dtypes, the
                          input spec, ops, and every file's size and sha256

Each weight is stored once: the ONNX files read theirs as external data from the
checkpoint, or from ``weights.bin`` (`fedclient.runtime._weights`).

A device trains with whichever set its ONNX Runtime runs (see `OnnxBackend`):
the training API where ``onnxruntime-training`` is installed, the step graph
(`fedclient.runtime._stepgraph`) everywhere else (aarch64, Python 3.13, mobile
builds). A bundle holds both sets when it can: built where the training
package is absent, it holds only the second; for a model with an op the step
graph cannot differentiate, only the first.

`write_bundle` turns a forward ONNX model (one input, float32 features or int64
token ids, whose first dimension is the batch, one logits output) into a bundle; `read_manifest`
reads one back and checks its files. `builtin_bundle` builds, once per
machine, the bundle of a built-in `ModelSpec` in a cache directory.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from fedclient._exceptions import InvalidInput
from fedclient.protocol import ModelSpec
from fedclient.runtime import _ort
from fedclient.runtime._artifacts import write_training_files
from fedclient.runtime._batchnorm import BatchNormLayer, batch_statistics
from fedclient.runtime._stepgraph import STEP_GRAPH, forward_graph
from fedclient.runtime._weights import WEIGHTS_FILE, share_weights

if TYPE_CHECKING:
    import onnx

__all__ = [
    "BUNDLE_FILES",
    "BUNDLE_FORMAT",
    "ENGINES",
    "PLAIN_FILES",
    "TRAINING_FILES",
    "BundleManifest",
    "BundleWarning",
    "FileInfo",
    "TensorInfo",
    "builtin_bundle",
    "bundle_weights",
    "cache_root",
    "file_sha256",
    "forget_checked",
    "manifest_digest",
    "read_manifest",
    "write_bundle",
]

BUNDLE_FORMAT = "fedclient-bundle/2"
#: Formats this fedclient reads: 2 stores each weight once (see `fedclient.runtime._weights`).
READABLE_FORMATS = ("fedclient-bundle/1", BUNDLE_FORMAT)
MANIFEST = "manifest.json"
#: Role -> file name of the files ONNX Runtime's training API trains from.
TRAINING_FILES = {
    "checkpoint": "checkpoint",
    "training_model": "training_model.onnx",
    "eval_model": "eval_model.onnx",
    "optimizer_model": "optimizer_model.onnx",
}
#: Role -> file name of the files any ONNX Runtime build trains from.
PLAIN_FILES = {"step_model": "step.onnx", "forward_model": "forward.onnx"}
#: Role -> file name of every file a bundle may hold besides its manifest (``weights``: the
#: weights the ONNX files share when there is no checkpoint to share).
BUNDLE_FILES = {
    **TRAINING_FILES,
    **PLAIN_FILES,
    "inference_model": "inference.onnx",
    "weights": WEIGHTS_FILE,
}
#: The engines that train a bundle, by the files each needs.
ENGINES = {"training": TRAINING_FILES, "plain": PLAIN_FILES}
LABELS = "labels"
#: ONNX element type -> manifest dtype of the inputs a bundle takes: features or token ids.
INPUT_DTYPES = {1: "float32", 7: "int64"}
#: The newest ONNX IR version and default-domain opset ONNX Runtime 1.19 loads.
MAX_IR_VERSION = 10
MAX_OPSET = 21


class TensorInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A named tensor's shape (``None`` for the batch dimension) and dtype."""

    name: str
    shape: list[int | None]
    dtype: str


class FileInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A bundle file's size in bytes and its sha256 (hex)."""

    bytes: int
    sha256: str


class BundleManifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a bundle holds, for devices, servers and people.

    ``parameters`` are the trainable tensors, in graph order; with
    ``statistics`` (BatchNorm's running statistics, when it trains on batch
    statistics: ``batchnorm``), exactly the names, shapes and dtypes a device
    uploads. ``frozen`` are float initialisers that are not trained.
    """

    format: str
    name: str
    source: str
    input: TensorInfo
    labels: TensorInfo
    output: TensorInfo
    classes: int
    parameters: list[TensorInfo]
    frozen: list[TensorInfo]
    ops: dict[str, int]
    files: dict[str, FileInfo]
    loss: str = "cross_entropy"
    optimizer: str = "sgd"
    opset: int = 17
    ir_version: int = 10
    onnxruntime: str = ""
    #: Token-id inputs (int64): ids lie in [0, vocabulary), the rows of the embedding
    #: that reads the input (None for float inputs, or ids no embedding reads directly).
    vocabulary: int | None = None
    #: The built-in ``ModelSpec`` the bundle was made from, as plain data (older and newer
    #: fedclient versions may know different model kinds); see `BundleManifest.spec`.
    model_spec: dict[str, Any] | None = None
    #: BatchNorm's running statistics, updated on the device from batch statistics.
    statistics: list[TensorInfo] = msgspec.field(default_factory=list)
    #: The BatchNorm layers that train on batch statistics (`fedclient.runtime._batchnorm`).
    batchnorm: list[BatchNormLayer] = msgspec.field(default_factory=list)

    def spec(self) -> ModelSpec | None:
        """The built-in model spec, if the bundle was made from one."""
        if self.model_spec is None:
            return None
        try:
            return msgspec.convert(self.model_spec, ModelSpec)
        except msgspec.ValidationError as exc:
            raise InvalidInput(
                f"this fedclient cannot read the bundle's model spec: {exc}"
            ) from exc

    @property
    def engines(self) -> list[str]:
        """The engines whose files the bundle holds: ``training`` (ONNX Runtime's training
        API) and ``plain`` (the step graph, on any ONNX Runtime build)."""
        return [engine for engine, files in ENGINES.items() if set(files) <= set(self.files)]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one example (the input's shape without its batch dimension)."""
        return tuple(int(d) for d in self.input.shape[1:] if d is not None)

    @property
    def num_parameters(self) -> int:
        """Trainable scalars."""
        total = 0
        for p in self.parameters:
            count = 1
            for d in p.shape:
                count *= d or 1
            total += count
        return total


def file_sha256(path: Path) -> str:
    """The sha256 (hex) of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _dims(value_info: Any) -> list[int | None]:
    return [
        int(d.dim_value) if d.HasField("dim_value") else None
        for d in value_info.type.tensor_type.shape.dim
    ]


@dataclass
class _Prepared:
    model: onnx.ModelProto
    input: onnx.ValueInfoProto
    output: onnx.ValueInfoProto
    trainable: list[str]
    frozen: list[str]


def _prepare(model: onnx.ModelProto) -> _Prepared:
    """A checked copy of ``model`` with a symbolic batch dimension, its input and output,
    and its trainable and frozen float initialisers."""
    import onnx

    if model.ir_version > MAX_IR_VERSION:
        raise InvalidInput(
            f"the model has ONNX IR version {model.ir_version}; ONNX Runtime 1.19 loads up to "
            f"{MAX_IR_VERSION}: export it with onnx==1.17 (or an older exporter)"
        )
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset > MAX_OPSET:
        raise InvalidInput(f"the model's default opset is {opset}; supported: 7 to {MAX_OPSET}")
    custom = sorted(
        {f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")}
    )
    if custom:
        raise InvalidInput(f"unsupported ops outside the standard ONNX domain: {', '.join(custom)}")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    external = [t.name for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise InvalidInput(
            f"initialisers stored as external data are not supported ({', '.join(external[:5])}); "
            "load the model with its data, or re-export it with the weights inline"
        )
    initialised = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initialised]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise InvalidInput(
            "a trainable model needs exactly one input and one output (the logits); got inputs "
            f"{[i.name for i in inputs]} and outputs {[o.name for o in graph.output]}"
        )
    x, logits = inputs[0], graph.output[0]
    if LABELS in (x.name, logits.name) or LABELS in initialised:
        raise InvalidInput(f"the name {LABELS!r} is reserved for the training labels")
    if x.type.tensor_type.elem_type not in INPUT_DTYPES:
        raise InvalidInput(
            f"the input {x.name!r} must be float32 (features) or int64 (token ids), not "
            f"{onnx.TensorProto.DataType.Name(x.type.tensor_type.elem_type).lower()}"
        )
    if logits.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise InvalidInput(f"the output {logits.name!r} must be float32 logits")
    x_dims, out_dims = _dims(x), _dims(logits)
    if len(x_dims) < 2 or any(d is None for d in x_dims[1:]):
        raise InvalidInput(
            f"the input {x.name!r} must be (batch, ...) with fixed example dimensions, got {x_dims}"
        )
    if len(out_dims) != 2 or out_dims[1] is None or out_dims[1] < 2:
        raise InvalidInput(
            f"the output {logits.name!r} must be logits of shape (batch, classes), got {out_dims}"
        )
    # The last minibatch of an epoch is smaller: make the batch dimension symbolic.
    for value in (x, logits):
        dim = value.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_value")
        dim.dim_param = "batch"
    del graph.value_info[:]  # intermediate shapes may carry the old fixed batch
    # Old exporters list initialisers as graph inputs too (IR < 4); parameters are not inputs.
    kept = [i for i in graph.input if i.name not in initialised]
    del graph.input[:]
    graph.input.extend(kept)
    model.ir_version = max(model.ir_version, 4)
    trainable: list[str] = []
    frozen: list[str] = []
    for tensor in graph.initializer:
        if tensor.data_type == onnx.TensorProto.FLOAT:
            (trainable if tensor.dims else frozen).append(tensor.name)
        elif tensor.data_type in (
            onnx.TensorProto.FLOAT16,
            onnx.TensorProto.DOUBLE,
            onnx.TensorProto.BFLOAT16,
        ):
            raise InvalidInput(
                f"parameter {tensor.name!r} is {onnx.TensorProto.DataType.Name(tensor.data_type)}; "
                "only float32 parameters are supported"
            )
    if not trainable:
        raise InvalidInput("the model has no float32 initialisers to train")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise InvalidInput(f"the ONNX model is invalid: {exc}") from exc
    return _Prepared(model, x, logits, trainable, frozen)


def write_bundle(
    model: onnx.ModelProto | str | os.PathLike[str],
    directory: str | os.PathLike[str],
    *,
    name: str,
    source: str = "",
    frozen: list[str] | None = None,
    model_spec: ModelSpec | None = None,
    batchnorm: str = "frozen",
) -> BundleManifest:
    """Turn a forward ONNX model into a device bundle in ``directory`` (created if needed).

    Every float32 initialiser with at least one dimension is trained, except
    those named in ``frozen``. ``batchnorm="batch"``: every BatchNormalization node
    trains on batch statistics and its running statistics are updated on the device
    (`fedclient.runtime._batchnorm`); ``"frozen"``: the model as given. Raises
    `InvalidInput` with the reason when the model cannot be trained on-device (op
    without a gradient, custom ops, ...).
    """
    import onnx

    if not isinstance(model, onnx.ModelProto):
        try:
            model = onnx.load(os.fspath(model))
        except Exception as exc:  # protobuf and file errors alike
            raise InvalidInput(f"cannot read the ONNX model {os.fspath(model)!r}: {exc}") from exc
    prepared = _prepare(model)
    model, x, logits = prepared.model, prepared.input, prepared.output
    trainable, constants = prepared.trainable, prepared.frozen
    for frozen_name in frozen or []:
        if frozen_name not in trainable:
            raise InvalidInput(f"cannot freeze {frozen_name!r}: not a float32 parameter")
        trainable.remove(frozen_name)
        constants.append(frozen_name)
    trained, layers, statistics = _training_model(model, batchnorm)
    trainable = [n for n in trainable if n not in statistics]
    constants = [n for n in constants if n not in statistics]
    if not trainable:
        raise InvalidInput("every parameter is frozen: nothing to train")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    batch = [n for layer in layers for n in (layer.batch_mean, layer.batch_var)]
    plain = _plain_graphs(trained, model, trainable, statistics, batch)
    training = _ort.has_training_api()
    if not training and isinstance(plain, str):
        raise InvalidInput(f"{plain}; onnxruntime-training could train it: {_ort.INSTALL_HINT}")
    for stale in BUNDLE_FILES.values():  # a bundle written here before must not leak files in
        (out / stale).unlink(missing_ok=True)
    inference = out / BUNDLE_FILES["inference_model"]
    if training:
        write_training_files(trained, trainable, constants, logits.name, out, inference, batch)
    if not training or layers:  # as ONNX Runtime would export it, BatchNorm on its statistics
        onnx.save(model, str(inference))
    if isinstance(plain, str):
        warnings.warn(f"no step graph for plain onnxruntime: {plain}", BundleWarning, stacklevel=2)
        if layers:  # the training API's engine evaluates through it
            onnx.save(
                forward_graph(model, [*trainable, *statistics]),
                str(out / PLAIN_FILES["forward_model"]),
            )
    else:
        for role, graph in zip(PLAIN_FILES, plain, strict=True):
            onnx.save(graph, str(out / PLAIN_FILES[role]))
    store = out / (BUNDLE_FILES["checkpoint"] if training else BUNDLE_FILES["weights"])
    share_weights([out / BUNDLE_FILES[role] for role in ("inference_model", *PLAIN_FILES)], store)
    initialisers = {t.name: t for t in model.graph.initializer}

    def info(tensor_name: str) -> TensorInfo:
        value = initialisers[tensor_name]
        return TensorInfo(tensor_name, [int(d) for d in value.dims], "float32")

    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    manifest = BundleManifest(
        format=BUNDLE_FORMAT,
        name=name,
        source=source,
        input=TensorInfo(x.name, _dims(x), INPUT_DTYPES[x.type.tensor_type.elem_type]),
        labels=TensorInfo(LABELS, [None], "int64"),
        output=TensorInfo(logits.name, _dims(logits), "float32"),
        classes=int(_dims(logits)[1] or 0),
        parameters=[info(n) for n in trainable],
        frozen=[info(n) for n in constants],
        ops=dict(sorted(collections.Counter(n.op_type for n in model.graph.node).items())),
        files={
            role: FileInfo((out / f).stat().st_size, file_sha256(out / f))
            for role, f in BUNDLE_FILES.items()
            if (out / f).is_file()
        },
        opset=opset,
        ir_version=int(model.ir_version),
        onnxruntime=str(_ort.ort().__version__),
        model_spec=None if model_spec is None else msgspec.to_builtins(model_spec),
        vocabulary=_vocabulary(model, x.name),
        statistics=[info(n) for n in statistics],
        batchnorm=layers,
    )
    data = msgspec.to_builtins(manifest)
    for empty in ("statistics", "batchnorm"):  # absent, a fedclient before them reads it
        if not data[empty]:
            del data[empty]
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(data), indent=2) + b"\n")
    tmp.replace(out / MANIFEST)
    return manifest


def _vocabulary(model: onnx.ModelProto, ids: str) -> int | None:
    """The number of rows of the smallest table a Gather indexes with ``ids`` (the input), or
    None: the range a token id must lie in."""
    tables = {t.name: [int(d) for d in t.dims] for t in model.graph.initializer}
    sizes = []
    for node in model.graph.node:
        if node.op_type == "Gather" and node.input[1] == ids and node.input[0] in tables:
            dims = tables[node.input[0]]
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            sizes.append(dims[axis % len(dims)])
    return min(sizes) if sizes else None


class BundleWarning(UserWarning):
    """A bundle was written without something it could have held (e.g. the step graph)."""


def _training_model(
    model: onnx.ModelProto, batchnorm: str
) -> tuple[onnx.ModelProto, list[BatchNormLayer], list[str]]:
    """The model the training graphs are built from, its BatchNorm layers that train on
    batch statistics, and their running statistics (``batchnorm="batch"``)."""
    if batchnorm == "frozen":
        return model, [], []
    if batchnorm != "batch":
        raise InvalidInput(f"batchnorm must be 'frozen' or 'batch', not {batchnorm!r}")
    trained, layers = batch_statistics(model)
    if not layers:
        raise InvalidInput("BatchNorm on batch statistics: the model has no BatchNormalization")
    return trained, layers, [n for layer in layers for n in (layer.mean, layer.var)]


def _plain_graphs(
    trained: onnx.ModelProto,
    model: onnx.ModelProto,
    trainable: list[str],
    statistics: list[str],
    batch: list[str],
) -> tuple[onnx.ModelProto, onnx.ModelProto] | str:
    """The step graph (of ``trained``, returning ``batch`` too) and the forward graph (of
    ``model``, the ``statistics`` inputs too) for plain ONNX Runtime, or why there is no
    step graph."""
    from fedclient.runtime._stepgraph import step_graph

    try:
        step = step_graph(trained, trainable, labels=LABELS, extra_outputs=batch)
    except InvalidInput as exc:
        return str(exc)
    return step, forward_graph(model, [*trainable, *statistics])


def manifest_digest(directory: str | os.PathLike[str]) -> str:
    """The sha256 of a bundle's manifest: it names every file's sha256, so it names the
    bundle (what a plan that federates it carries)."""
    return hashlib.sha256((Path(directory) / MANIFEST).read_bytes()).hexdigest()


def bundle_weights(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """A bundle's trainable parameters as initialised (from ``inference.onnx``, with the
    ``onnx`` package: a server needs no ONNX Runtime to start a job from a bundle)."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:
        raise InvalidInput(f"reading a bundle's weights needs onnx: {_ort.INSTALL_HINT}") from exc
    path = Path(directory)
    manifest = read_manifest(path)
    model = onnx.load(str(path / BUNDLE_FILES["inference_model"]))
    found = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    exchanged = [*manifest.parameters, *manifest.statistics]
    missing = [p.name for p in exchanged if p.name not in found]
    if missing:
        raise InvalidInput(f"the bundle's inference model lacks parameters {missing[:5]}")
    return {p.name: found[p.name].astype("float32") for p in exchanged}


def read_manifest(directory: str | os.PathLike[str], *, verify: bool = True) -> BundleManifest:
    """The manifest of the bundle in ``directory``; with ``verify``, every file's size and
    sha256 are checked against it."""
    path = Path(directory)
    try:
        manifest = msgspec.json.decode((path / MANIFEST).read_bytes(), type=BundleManifest)
    except FileNotFoundError as exc:
        raise InvalidInput(f"{path} is not a device bundle: no {MANIFEST}") from exc
    except msgspec.ValidationError as exc:
        raise InvalidInput(f"{path / MANIFEST} is not a valid bundle manifest: {exc}") from exc
    if manifest.format not in READABLE_FORMATS:
        raise InvalidInput(
            f"unsupported bundle format {manifest.format!r}; expected {BUNDLE_FORMAT}"
        )
    if "inference_model" not in manifest.files or not manifest.engines:
        raise InvalidInput(
            "the bundle manifest lists neither the training API's files "
            f"({', '.join(TRAINING_FILES.values())}) nor the step graph's "
            f"({', '.join(PLAIN_FILES.values())}), or no inference model"
        )
    if verify:
        for role, expected in manifest.files.items():
            file = path / BUNDLE_FILES.get(role, role)
            if not file.is_file():
                raise InvalidInput(f"the bundle lacks {file.name}")
            if file.stat().st_size != expected.bytes or file_sha256(file) != expected.sha256:
                raise InvalidInput(f"{file} does not match its checksum in the manifest")
    return manifest


def cache_root() -> Path:
    """Where built-in bundles are cached: ``$FEDCLIENT_CACHE_DIR``, else the user cache."""
    configured = os.environ.get("FEDCLIENT_CACHE_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fedclient"


def builtin_bundle(
    spec: ModelSpec, *, seed: int = 0, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """The bundle of built-in model ``spec`` initialised like the numpy reference for ``seed``;
    built on first use, then reused. The cache key holds the initial weights' digest, so a
    change to the numpy initialisation never reuses a stale bundle."""
    from fedclient.runtime._graphs import builtin_graph, builtin_weights

    root = Path(cache_dir) if cache_dir is not None else cache_root()
    weights = builtin_weights(spec, seed=seed)
    digest = hashlib.sha256()
    for name, value in weights.items():
        digest.update(name.encode() + str(value.shape).encode() + value.tobytes())
    key = msgspec.json.encode(
        [BUNDLE_FORMAT, STEP_GRAPH, *_versions(), spec, seed, digest.hexdigest()]
    )
    target = root / "onnx" / f"{spec.kind}-{hashlib.sha256(key).hexdigest()[:20]}"
    if target in _checked and (target / MANIFEST).is_file():
        return target  # checked earlier in this process (a simulator builds many devices)
    if (target / MANIFEST).is_file():
        try:
            read_manifest(target)
            _checked.add(target)
            return target
        except InvalidInput:
            shutil.rmtree(target, ignore_errors=True)  # a damaged cache entry: rebuild it
    target.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        write_bundle(
            builtin_graph(spec, weights=weights),
            building,
            name=spec.kind,
            source=f"builtin:{spec.kind}",
            model_spec=spec,
        )
        try:
            building.rename(target)
        except OSError:  # another process built it first; theirs is as good
            if not (target / MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    _checked.add(target)
    return target


#: Cached bundles whose checksums were verified by this process.
_checked: set[Path] = set()


def forget_checked(path: Path) -> None:
    """Make `builtin_bundle` verify (and, if damaged, rebuild) ``path`` again."""
    _checked.discard(path)


@functools.cache
def _versions() -> tuple[str, str]:
    import importlib.metadata  # only here: every import of the SDK would pay for it

    try:
        return str(_ort.ort().__version__), importlib.metadata.version("onnx")
    except importlib.metadata.PackageNotFoundError as exc:
        raise InvalidInput(f"building ONNX bundles needs onnx: {_ort.INSTALL_HINT}") from exc
