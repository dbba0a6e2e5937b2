"""Convert a user's Keras model (Sequential or functional, ``.keras`` or ``.h5``) to a ``.tflite``
model with on-device training signatures, and verify it through LiteRT against TensorFlow's own
step.

The model is read layer by layer and written again as a ``tf.Module`` with the constructs that
convert to TFLite builtin ops (see `fedclient.convert._tflite`): a fixed training batch, the loss
``-sum(one_hot * log_softmax)`` over the masked rows, SGD by ``assign_sub`` on resource
variables, ``get_weights`` / ``set_weights`` signatures. TensorFlow's own gradients of
convolutions, pooling and ReLU (``Conv2DBackpropFilter``, ``DepthwiseConv2dNativeBackprop*``,
``MaxPoolGrad``, ``AvgPoolGrad``, ``ReluGrad``) are TensorFlow-only ops, so those layers carry
gradients written in builtin ops:

    conv kernel      a convolution of the input with the output gradient (dilated by the stride)
    conv input       a transposed convolution (``TRANSPOSE_CONV``)
    depthwise conv   the same, through the equivalent block-diagonal full kernel
    pooling          the windows as strided slices, scattered back by a transposed convolution
                     with one-hot kernels (max pooling: to each window's first maximum)
    ReLU, ReLU6      ``dy * (x > 0)`` (and ``x < 6``), TensorFlow's choice at the kinks

Supported layers: `SUPPORTED_LAYERS` (channels last, equal strides, no dilation). Another layer
is refused with `InvalidInput` naming it.

What the device sees:

- parameters named by their Keras weight path, ``layer/weight`` (``conv2d/kernel``,
  ``dense_1/bias``), in Keras's layouts (a Dense kernel is ``(in, out)``); non-trainable weights
  (BatchNormalization statistics, layers with ``trainable = False``) are constants of the graph:
  they never change and never travel;
- flat examples ``x[N, prod(input shape)]``, reshaped in the graph to the Keras input shape;
- logits: a final softmax (``activation="softmax"`` or a Softmax layer) is dropped, and the
  manifest's ``source`` says so; the device's ``predict`` applies it;
- inference-mode training, as on-device fine-tuning does: Dropout is the identity and
  BatchNormalization normalises by its frozen statistics; the verification's TensorFlow step
  calls the model with ``training=False`` too.

TensorFlow is imported when a model is converted, never when this module is imported. Files of
tf-keras (Keras 2, ``TF_USE_LEGACY_KERAS=1``) load with ``tf_keras``, those that Keras 3 wrote
with ``keras``.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedclient._exceptions import InvalidInput
from fedclient.convert import _keras_layers as layers
from fedclient.convert._keras_layers import Op
from fedclient.convert._tflite import (
    TRAIN_BATCH,
    TfliteConversion,
    tensorflow,
    verify_tflite,
    write_tflite,
)
from fedclient.convert._verify import TOLERANCE
from fedclient.protocol import Weights
from fedclient.runtime._base import cross_entropy
from fedclient.runtime._tflite import TfliteManifest

__all__ = [
    "KERAS_SUFFIXES",
    "SUPPORTED_LAYERS",
    "KerasReference",
    "convert_keras_tflite",
    "keras_convert_and_verify",
    "load_keras_model",
]

#: File names ``fedconvert`` reads as Keras models.
KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
#: The Keras layers a model may hold.
SUPPORTED_LAYERS = (
    "InputLayer",
    "Dense",
    "Conv2D",
    "DepthwiseConv2D",
    "MaxPooling2D",
    "AveragePooling2D",
    "GlobalAveragePooling2D",
    "GlobalMaxPooling2D",
    "ZeroPadding2D",
    "Flatten",
    "Reshape",
    "BatchNormalization",
    "Activation",
    "ReLU",
    "LeakyReLU",
    "Softmax",
    "Dropout",
    "Add",
    "Concatenate",
)
#: Activations a layer may apply (softmax only at the model's output, where it is dropped).
_ACTIVATIONS = ("linear", "relu", "relu6", "sigmoid", "tanh", "softmax")

# -- loading ---------------------------------------------------------------------------------


def _keras(legacy: bool) -> Any:
    """tf-keras (``legacy``) or Keras 3, after TensorFlow (its install hint when missing)."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # tf.keras in the user's custom objects
    tensorflow()
    name = "tf_keras" if legacy else "keras"
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise InvalidInput(
            f"reading this Keras model needs {name}: pip install "
            + ("tf-keras==2.21.0" if legacy else "keras")
        ) from exc


def _written_by_keras_3(path: Path) -> bool:
    """Whether Keras 3 wrote a model file: a ``.keras`` archive names its Keras version; HDF5
    files are the legacy format, which tf-keras reads."""
    if path.suffix.lower() != ".keras":
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            metadata = json.loads(archive.read("metadata.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise InvalidInput(f"{path} is not a Keras model archive: {exc}") from exc
    return str(metadata.get("keras_version", "")).startswith("3.")


def load_keras_model(path: str | os.PathLike[str]) -> Any:
    """The Keras model saved at ``path`` (``.keras`` or ``.h5``), loaded without its training
    configuration. Needs TensorFlow."""
    file = Path(path)
    if file.suffix.lower() not in KERAS_SUFFIXES:
        raise InvalidInput(f"{file} is not a Keras model file ({', '.join(KERAS_SUFFIXES)})")
    if not file.is_file():
        raise InvalidInput(f"no such file: {file}")
    keras = _keras(legacy=not _written_by_keras_3(file))
    try:
        return keras.models.load_model(str(file), compile=False)
    except Exception as exc:  # Keras raises anything from ValueError to TypeError here
        problem = f"{type(exc).__name__}: {exc}"
        raise InvalidInput(f"cannot load the Keras model {file}: {problem}") from exc


def _keras_of(model: Any) -> Any:
    """The Keras package a loaded model belongs to."""
    return _keras(legacy=type(model).__module__.startswith("tf_keras"))


# -- reading the model -------------------------------------------------------------------------


@dataclass
class _Graph:
    """A Keras model read layer by layer: what the TFLite graph computes, and from what."""

    input_shape: tuple[int, ...]
    classes: int = 0
    #: (layer name, op, input tensor ids, output tensor id), in order; tensor 0 is the input.
    steps: list[tuple[str, Op, list[int], int]] = field(default_factory=list)
    output: int = 0
    trainable: dict[str, np.ndarray] = field(default_factory=dict)
    frozen: dict[str, np.ndarray] = field(default_factory=dict)
    #: The layer whose softmax was dropped from the output, if one was.
    dropped_softmax: str | None = None

    @property
    def inputs(self) -> int:
        """Features per flat example."""
        return math.prod(self.input_shape)

    def logits(self, tf: Any, x: Any, params: Mapping[str, Any]) -> Any:
        """The model's logits for flat examples ``x``."""
        values = {0: tf.reshape(x, [-1, *self.input_shape])}
        for _, op, inputs, output in self.steps:
            values[output] = op([values[i] for i in inputs], params)
        return values[self.output]


def _short_name(variable: Any) -> str:
    """``kernel`` of tf-keras's ``dense/kernel:0`` and of Keras 3's ``kernel``."""
    return str(variable.name).rsplit("/", 1)[-1].split(":")[0]


def _read(tf: Any, model: Any) -> _Graph:
    """Read a Sequential or functional model into a `_Graph`; `InvalidInput` for what cannot
    train on LiteRT, naming the layer."""
    kind = type(model).__name__
    if kind not in ("Sequential", "Functional"):
        raise InvalidInput(
            f"{kind} is a subclassed Keras model, which cannot be read layer by layer: "
            "build it with keras.Sequential or the functional API"
        )
    inputs, outputs = list(model.inputs or []), list(model.outputs or [])
    if len(inputs) != 1 or len(outputs) != 1:
        raise InvalidInput(
            "the Keras model must have one input and one output, with a known input shape "
            f"(give it an Input layer); it has {len(inputs)} and {len(outputs)}"
        )
    shape = tuple(inputs[0].shape)[1:]
    if not shape or any(d is None for d in shape):
        raise InvalidInput(f"the model's input shape must be known, got {tuple(inputs[0].shape)}")
    graph = _Graph(input_shape=tuple(int(d) for d in shape))
    layers = [layer for layer in model.layers if type(layer).__name__ != "InputLayer"]
    links: list[tuple[Any, list[int], int]] = []
    if kind == "Sequential":
        links = [(layer, [i], i + 1) for i, layer in enumerate(layers)]
        graph.output = len(layers)
    else:
        ids = {id(inputs[0]): 0}
        for layer in layers:
            try:
                ins, outs = tf.nest.flatten(layer.input), tf.nest.flatten(layer.output)
            except (AttributeError, RuntimeError, ValueError) as exc:
                raise InvalidInput(
                    f"layer {layer.name!r} is called more than once (shared layers are not "
                    "supported)"
                ) from exc
            if len(outs) != 1 or any(id(t) not in ids for t in ins):
                raise InvalidInput(f"layer {layer.name!r} is not part of a single-input graph")
            ids[id(outs[0])] = len(ids)
            links.append((layer, [ids[id(t)] for t in ins], ids[id(outs[0])]))
        if id(outputs[0]) not in ids:
            raise InvalidInput("the model's output is not produced by its layers")
        graph.output = ids[id(outputs[0])]
    for layer, ins, out in links:
        if hasattr(layer, "layers"):
            raise InvalidInput(
                f"layer {layer.name!r} is a nested model ({type(layer).__name__}): "
                "save the model with its layers at the top level"
            )
        names = _weights(graph, layer)
        op = _op(tf, layer, names, graph, final=out == graph.output)
        graph.steps.append((layer.name, op, ins, out))
    if not graph.trainable:
        raise InvalidInput("the Keras model has no trainable weights")
    graph.classes = _classes(tf, model, graph)
    return graph


def _weights(graph: _Graph, layer: Any) -> dict[str, str]:
    """Record a layer's weights in ``graph`` by name; their names by short name."""
    trainable = {id(v) for v in layer.trainable_weights}
    names: dict[str, str] = {}
    for variable in layer.weights:
        short = _short_name(variable)
        name = f"{layer.name}/{short}"
        value = np.array(variable.numpy())
        if value.dtype != np.float32:
            raise InvalidInput(f"weight {name!r} is {value.dtype}: only float32 models convert")
        if name in graph.trainable or name in graph.frozen:
            raise InvalidInput(f"two weights are named {name!r}")
        (graph.trainable if id(variable) in trainable else graph.frozen)[name] = value
        names[short] = name
    return names


def _classes(tf: Any, model: Any, graph: _Graph) -> int:
    """The number of classes: the output's width, checked by tracing the forward pass."""
    params = {n: tf.constant(v) for n, v in {**graph.trainable, **graph.frozen}.items()}
    shape = graph.logits(tf, tf.zeros([1, graph.inputs]), params).shape
    if len(shape) != 2 or shape[1] < 2:
        raise InvalidInput(
            f"the model must output logits of shape (batch, classes >= 2), not {tuple(shape)} "
            "(a single sigmoid unit: use Dense(2) and softmax)"
        )
    return int(shape[1])


# -- layers as builtin ops ----------------------------------------------------------------------


def _op(tf: Any, layer: Any, names: Mapping[str, str], graph: _Graph, *, final: bool) -> Op:
    """The op computing ``layer``, in ops with builtin gradients."""
    kind = type(layer).__name__
    config = layer.get_config()
    label = f"layer {layer.name!r} ({kind})"

    def refuse(why: str) -> InvalidInput:
        return InvalidInput(f"{label}: {why}")

    if kind not in SUPPORTED_LAYERS:
        raise InvalidInput(
            f"{label} cannot train on LiteRT; supported layers: "
            + ", ".join(n for n in SUPPORTED_LAYERS if n != "InputLayer")
        )
    if config.get("data_format", "channels_last") not in (None, "channels_last"):
        raise refuse("only channels_last data is supported")
    if kind in ("Dense", "Conv2D", "DepthwiseConv2D", "Activation", "Softmax"):
        if kind == "Softmax":
            activation: Any = "softmax"
            if config.get("axis", -1) not in (-1, [-1]):
                raise refuse("softmax over an axis other than the last")
        else:
            activation = config.get("activation", "linear")
        if activation == "softmax" and final:
            graph.dropped_softmax = layer.name
            activation = "linear"
        act = _activation(tf, activation, label, final=final)
    # tf-keras names a depthwise kernel depthwise_kernel, Keras 3 kernel.
    kernel = names.get("kernel", names.get("depthwise_kernel", ""))
    bias = names.get("bias")

    if kind == "Dense":

        def dense(inputs: list[Any], params: Mapping[str, Any]) -> Any:
            (x,) = inputs
            if len(x.shape) != 2:
                raise refuse(f"a Dense layer on a rank-{len(x.shape)} input; Flatten it first")
            z = tf.matmul(x, params[kernel])
            return act(z + params[bias] if bias else z)

        return dense
    if kind in ("Conv2D", "DepthwiseConv2D"):
        stride, padding = _window(config, refuse)
        if tuple(config.get("dilation_rate", (1, 1))) != (1, 1) or config.get("groups", 1) != 1:
            raise refuse("dilated and grouped convolutions are not supported")
        conv = layers.conv2d if kind == "Conv2D" else layers.depthwise_conv2d

        def convolution(inputs: list[Any], params: Mapping[str, Any]) -> Any:
            z = conv(tf, inputs[0], params[kernel], stride, padding)
            return act(z + params[bias] if bias else z)

        return convolution
    if kind in ("MaxPooling2D", "AveragePooling2D"):
        stride, padding = _window(config, refuse)
        size = (int(config["pool_size"][0]), int(config["pool_size"][1]))
        pool = layers.max_pool if kind == "MaxPooling2D" else layers.avg_pool
        return lambda inputs, params: pool(tf, inputs[0], size, stride, padding)
    if kind in ("GlobalAveragePooling2D", "GlobalMaxPooling2D"):
        reduce = tf.reduce_mean if kind == "GlobalAveragePooling2D" else tf.reduce_max
        keep = bool(config.get("keepdims", False))
        return lambda inputs, params: reduce(inputs[0], axis=[1, 2], keepdims=keep)
    if kind == "ZeroPadding2D":
        (top, bottom), (left, right) = config["padding"]
        pads = [[0, 0], [top, bottom], [left, right], [0, 0]]
        return lambda inputs, params: tf.pad(inputs[0], pads)
    if kind == "Flatten":
        return lambda inputs, params: tf.reshape(inputs[0], [-1, math.prod(inputs[0].shape[1:])])
    if kind == "Reshape":
        target = [int(d) for d in config["target_shape"]]

        def reshape(inputs: list[Any], params: Mapping[str, Any]) -> Any:
            (x,) = inputs
            known = math.prod(d for d in target if d != -1)
            size = [math.prod(x.shape[1:]) // known if d == -1 else d for d in target]
            return tf.reshape(x, [-1, *size])

        return reshape
    if kind == "BatchNormalization":
        return layers.batch_norm(tf, config, names, refuse)
    if kind in ("Activation", "Softmax"):
        return lambda inputs, params: act(inputs[0])
    if kind in ("ReLU", "LeakyReLU"):
        return layers.relu_layer(tf, kind, config, refuse)
    if kind == "Dropout":  # inference-mode training: see the module docstring
        return lambda inputs, params: inputs[0]
    if kind == "Add":
        return lambda inputs, params: tf.add_n(inputs)
    axis = config.get("axis", -1)  # Concatenate
    return lambda inputs, params: tf.concat(inputs, axis=axis)


def _window(config: Mapping[str, Any], refuse: Callable[[str], Exception]) -> tuple[int, str]:
    """A conv or pooling layer's (equal) stride and its padding, as TensorFlow spells it."""
    strides = config.get("strides") or config["pool_size"]
    if len(set(strides)) != 1:
        raise refuse(f"unequal strides {tuple(strides)} are not supported")
    padding = str(config.get("padding", "valid")).upper()
    if padding not in ("VALID", "SAME"):
        raise refuse(f"padding {padding.lower()!r} is not supported (valid, same)")
    return int(strides[0]), padding


def _activation(tf: Any, name: Any, label: str, *, final: bool) -> Callable[[Any], Any]:
    if name in (None, "linear"):
        return lambda z: z
    function: Callable[[Any], Any]
    if name in ("relu", "relu6"):
        function = layers.relu(tf, ceiling=6.0 if name == "relu6" else None)
        return function
    if name in ("sigmoid", "tanh") and not final:
        function = tf.sigmoid if name == "sigmoid" else tf.tanh
        return function
    if name == "softmax":
        raise InvalidInput(
            f"{label}: softmax is supported only at the model's output (where it is dropped: "
            "the device trains on logits)"
        )
    if name in ("sigmoid", "tanh"):
        raise InvalidInput(
            f"{label}: a {name} output does not train with the softmax cross-entropy; "
            "output logits or a softmax"
        )
    raise InvalidInput(f"{label}: activation {name!r} is not supported ({', '.join(_ACTIVATIONS)})")


# -- the TFLite model --------------------------------------------------------------------------


@dataclass
class _KerasSource:
    """A loaded Keras model, its package, its graph, and how the manifest names it."""

    model: Any
    keras: Any
    graph: _Graph
    name: str
    description: str


def _source(model: Any) -> _KerasSource:
    """A model file's path, or a loaded Sequential or functional model, read for conversion."""
    if isinstance(model, str | os.PathLike):
        path = Path(model)
        loaded = load_keras_model(path)
        name, origin = path.stem, f"keras:{path}"
    else:
        loaded, name = model, str(model.name)
        origin = f"keras:{name}"
    keras = _keras_of(loaded)
    graph = _read(tensorflow(), loaded)
    description = f"{origin} input {'x'.join(map(str, graph.input_shape))}"
    if graph.dropped_softmax is not None:
        description += f" (softmax of {graph.dropped_softmax!r} dropped: outputs logits)"
    return _KerasSource(loaded, keras, graph, name, description)


def convert_keras_tflite(
    model: Any, path: str | os.PathLike[str], *, train_batch: int = TRAIN_BATCH
) -> TfliteManifest:
    """Write a Keras model (a ``.keras`` / ``.h5`` path, or a loaded Sequential or functional
    model) as a ``.tflite`` file at ``path`` with training signatures, and its manifest beside
    it; `fedclient.runtime.TfliteBackend` trains it. Needs TensorFlow."""
    return _convert(_source(model), path, train_batch)


def _convert(
    source: _KerasSource, path: str | os.PathLike[str], train_batch: int
) -> TfliteManifest:
    graph = source.graph

    def logits(tf: Any, x: Any, params: list[Any]) -> Any:
        values = {n: tf.constant(v) for n, v in graph.frozen.items()}
        values.update(zip(graph.trainable, params, strict=True))
        return graph.logits(tf, x, values)

    return write_tflite(
        path,
        graph.trainable,
        logits,
        name=source.name,
        source=source.description,
        inputs=graph.inputs,
        classes=graph.classes,
        train_batch=train_batch,
    )


# -- verification -------------------------------------------------------------------------------


class KerasReference:
    """A Keras model run by TensorFlow itself: Keras's forward pass (``training=False``) and one
    step of Keras's SGD on ``SparseCategoricalCrossentropy(from_logits=True)``. A dropped final
    softmax is dropped from a clone of the model here too."""

    def __init__(self, model: Any) -> None:
        source = model if isinstance(model, _KerasSource) else _source(model)
        self._tf = tensorflow()
        self._keras = source.keras
        self._shape = source.graph.input_shape
        self.label = f"TensorFlow {self._tf.__version__} (Keras {self._keras.__version__})"
        self._model = _logits_model(source)
        self._variables = {
            f"{layer.name}/{_short_name(v)}": v
            for layer in self._model.layers
            for v in layer.trainable_weights
        }
        if set(self._variables) != set(source.graph.trainable):
            raise InvalidInput(
                f"the Keras reference trains {sorted(self._variables)}, "
                f"the converted model {sorted(source.graph.trainable)}"
            )
        self._initial = {n: np.array(v.numpy(), np.float32) for n, v in self._variables.items()}

    def initial_weights(self) -> Weights:
        """The model's trainable weights, by name."""
        return {k: v.copy() for k, v in self._initial.items()}

    def _set(self, weights: Mapping[str, np.ndarray]) -> None:
        for name, variable in self._variables.items():
            variable.assign(np.asarray(weights[name], np.float32))

    def _forward(self, x: np.ndarray) -> Any:
        examples = np.asarray(x, np.float32).reshape(-1, *self._shape)
        return self._model(self._tf.constant(examples), training=False)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Keras's logits for flat examples, at the initial weights."""
        return np.asarray(self._forward(x), np.float32)

    def loss(self, weights: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
        """Mean cross-entropy at ``weights`` (Keras's float32 logits, the rest in float64)."""
        try:
            self._set(weights)
            return cross_entropy(self.logits(x).astype(np.float64), y)
        finally:
            self._set(self._initial)

    def gradients(self, x: np.ndarray, y: np.ndarray) -> None:
        """Not measured: the TFLite verification compares the step (`sgd_step`)."""
        return None

    def rounding(self, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """No gradient, no rounding to measure."""
        return {}

    def sgd_step(self, x: np.ndarray, y: np.ndarray, learning_rate: float) -> Weights:
        """The weights after one step of Keras's SGD from the initial weights."""
        tf, keras = self._tf, self._keras
        variables = list(self._variables.values())
        try:
            with tf.GradientTape() as tape:
                logits = self._forward(x)
                loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
                    tf.constant(np.asarray(y, np.int64)), logits
                )
            zero = tf.UnconnectedGradients.ZERO
            grads = tape.gradient(loss, variables, unconnected_gradients=zero)
            keras.optimizers.SGD(learning_rate=learning_rate).apply_gradients(
                zip(grads, variables, strict=True)
            )
            return {n: np.array(v.numpy(), np.float32) for n, v in self._variables.items()}
        finally:
            self._set(self._initial)


def _logits_model(source: _KerasSource) -> Any:
    """The model itself, or a clone whose final softmax is dropped."""
    model, keras = source.model, source.keras
    layer_name = source.graph.dropped_softmax
    if layer_name is None:
        return model
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    layer = clone.get_layer(layer_name)
    if type(layer).__name__ != "Softmax":  # Dense, Conv2D or Activation: its activation goes
        layer.activation = keras.activations.linear
        return clone
    if type(clone).__name__ == "Sequential":
        return keras.Sequential(clone.layers[:-1])
    return keras.Model(clone.inputs, layer.input)


def keras_convert_and_verify(
    model: Any,
    path: str | os.PathLike[str],
    *,
    train_batch: int = TRAIN_BATCH,
    verify: bool = True,
    tolerance: float = TOLERANCE,
    learning_rate: float = 0.1,
) -> TfliteConversion:
    """`convert_keras_tflite`, then `fedclient.convert._tflite.verify_tflite` against the Keras
    model run by TensorFlow (`KerasReference`)."""
    started = time.perf_counter()
    source = _source(model)
    manifest = _convert(source, path, train_batch)
    verification = None
    if verify:
        verification = verify_tflite(
            path,
            KerasReference(source),
            tolerance=tolerance,
            learning_rate=learning_rate,
        )
    return TfliteConversion(Path(path), manifest, verification, time.perf_counter() - started)
