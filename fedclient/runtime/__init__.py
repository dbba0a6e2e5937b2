"""Training backends behind one interface: ``numpy`` here; edge runtimes load lazily.

``onnx`` (the ``[onnx]`` extra) trains device bundles with ONNX Runtime;
``tflite`` (the ``[tflite]`` extra) trains ``.tflite`` models with training
signatures through the LiteRT interpreter. Their modules import no runtime
until a backend is built.
"""

from __future__ import annotations

from fedclient._exceptions import InvalidInput
from fedclient.protocol import ModelSpec
from fedclient.runtime._base import (
    EvalResult,
    TrainingBackend,
    TrainResult,
    check_dataset,
    check_train_options,
    schedule_factor,
)
from fedclient.runtime._bundle import (
    BundleManifest,
    bundle_weights,
    manifest_digest,
    read_manifest,
    write_bundle,
)
from fedclient.runtime._cnn import CnnShape, NumpyCnn, cnn_initial_weights
from fedclient.runtime._numpy import NumpyModel
from fedclient.runtime._onnx import OnnxBackend
from fedclient.runtime._tflite import TfliteBackend, TfliteManifest, read_tflite_manifest

__all__ = [
    "BundleManifest",
    "CnnShape",
    "EvalResult",
    "NumpyCnn",
    "NumpyModel",
    "OnnxBackend",
    "TfliteBackend",
    "TfliteManifest",
    "TrainResult",
    "TrainingBackend",
    "bundle_weights",
    "check_dataset",
    "check_train_options",
    "cnn_initial_weights",
    "create_backend",
    "manifest_digest",
    "read_manifest",
    "read_tflite_manifest",
    "schedule_factor",
    "write_bundle",
]

RUNTIMES = ("numpy", "onnx", "tflite")


def create_backend(spec: ModelSpec, runtime: str = "numpy", *, seed: int = 0) -> TrainingBackend:
    """A fresh model of architecture ``spec`` on the named runtime (a ``bundle`` spec:
    its bundle, on ONNX Runtime)."""
    if spec.kind == "bundle":
        if runtime != "onnx":
            raise InvalidInput(f"a bundle model trains on ONNX Runtime, not {runtime!r}")
        backend = OnnxBackend(spec.bundle)
        if spec.digest and backend.digest != spec.digest:
            raise InvalidInput(f"the bundle in {spec.bundle} is not the plan's (digest differs)")
        return backend
    if runtime == "numpy" and spec.kind == "cnn":
        return NumpyCnn(CnnShape.for_spec(spec), seed=seed)
    if runtime == "numpy":
        return NumpyModel(spec, seed=seed)
    if runtime == "onnx":  # builds (once, cached) and loads the spec's bundle; imports ONNX Runtime
        return OnnxBackend.for_spec(spec, seed=seed)
    if runtime == "tflite":  # loads the spec's shipped .tflite model; imports LiteRT
        return TfliteBackend.for_spec(spec, seed=seed)
    raise InvalidInput(f"unknown runtime {runtime!r}; available: {', '.join(RUNTIMES)}")
