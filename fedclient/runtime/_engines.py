"""The two ways ONNX Runtime trains a bundle, behind one small interface (`Engine`).

    TrainingApiEngine   ``onnxruntime.training.api``: CheckpointState, Module and an SGD
                        Optimizer over the bundle's training artifacts (the
                        ``onnxruntime-training`` build: x86_64, Python <= 3.12)
    PlainEngine         ``step.onnx`` and ``forward.onnx`` in ``InferenceSession``s of any
                        ONNX Runtime build (aarch64, Python 3.13, mobile); the weights
                        live here as numpy arrays and go in and out of each step

Both hold float32 parameters by name and take one SGD step on the mean
cross-entropy of a minibatch; `OnnxBackend` picks one and adds the data handling.
A bundle whose BatchNorm trains on batch statistics (`fedclient.runtime._batchnorm`)
has running statistics too: both engines keep them as numpy arrays, read and written
by name like the parameters, fold each step's batch statistics into them, and
compute logits with ``forward.onnx``, where BatchNorm normalises by them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fedclient._exceptions import InvalidInput
from fedclient.runtime import _ort
from fedclient.runtime._batchnorm import check_minibatch, update_running_statistics
from fedclient.runtime._bundle import BUNDLE_FILES, BundleManifest
from fedclient.runtime._stepgraph import LEARNING_RATE, LOSS, grad_name, next_name

__all__ = ["Engine", "PlainEngine", "TrainingApiEngine"]


class Engine(Protocol):
    """Parameters by name, one SGD step, logits."""

    name: str

    def get(self, name: str) -> np.ndarray:
        """A parameter's current value (float32; the caller copies it if it keeps it)."""

    def set(self, name: str, value: np.ndarray) -> None:
        """Replace a parameter (float32, the right shape: checked by the caller)."""

    def step(self, x: np.ndarray, y: np.ndarray, learning_rate: float) -> float:
        """One SGD step on the minibatch's mean cross-entropy; the loss before the step."""

    def gradients(self, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        """The gradient of the minibatch's mean cross-entropy at the current parameters,
        by parameter name; no step is taken."""

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits of a batch at the current parameters."""

    def export_inference_model(self, target: Path) -> None:
        """The forward graph with the current parameters, for ``InferenceSession``."""


class TrainingApiEngine:
    """ONNX Runtime's on-device training API over the bundle's training artifacts."""

    name = "training"

    def __init__(self, bundle: Path, manifest: BundleManifest, *, threads: int) -> None:
        api = _ort.training_api()
        files = {role: str(bundle / name) for role, name in BUNDLE_FILES.items()}
        try:
            self._state: Any = api.CheckpointState.load_checkpoint(files["checkpoint"])
            self._module: Any = api.Module(
                files["training_model"],
                self._state,
                files["eval_model"],
                session_options=_ort.session_options(threads=threads),
            )
            self._optimizer: Any = api.Optimizer(files["optimizer_model"], self._module)
        except RuntimeError as exc:
            raise InvalidInput(f"ONNX Runtime cannot load the bundle {bundle}: {exc}") from exc
        self._manifest = manifest
        self._bundle = bundle
        self._output = manifest.output.name
        self._classes = manifest.classes
        self._learning_rate: float | None = None
        self._names = [p.name for p in manifest.parameters]
        stored = {name for name, _ in self._state.parameters}
        missing = sorted({p.name for p in manifest.parameters} - stored)
        if missing:
            raise InvalidInput(f"the bundle's checkpoint lacks parameters {missing}")
        self._statistics: dict[str, np.ndarray] = {}
        self._forward: Any = None
        if manifest.batchnorm:  # logits on the running statistics: forward.onnx
            forward = bundle / BUNDLE_FILES["forward_model"]
            self._statistics = _initialisers(forward, [t.name for t in manifest.statistics])
            self._forward = _ort.ort().InferenceSession(
                str(forward),
                _ort.session_options(threads=threads),
                providers=["CPUExecutionProvider"],
            )

    def get(self, name: str) -> np.ndarray:
        if name in self._statistics:
            return self._statistics[name]
        return np.asarray(self._state.parameters[name].data)

    def set(self, name: str, value: np.ndarray) -> None:
        if name in self._statistics:
            self._statistics[name] = value
        else:
            self._state.parameters[name] = value

    def step(self, x: np.ndarray, y: np.ndarray, learning_rate: float) -> float:
        layers = self._manifest.batchnorm
        check_minibatch(layers, len(x))
        if learning_rate != self._learning_rate:
            self._optimizer.set_learning_rate(float(learning_rate))
            self._learning_rate = learning_rate
        self._module.train()
        loss, _, *batch = self._module(x, y)
        self._optimizer.step()
        self._module.lazy_reset_grad()
        if layers:
            names = [n for layer in layers for n in (layer.batch_mean, layer.batch_var)]
            update_running_statistics(
                self._statistics, layers, dict(zip(names, batch, strict=True)), len(x)
            )
        return float(loss)

    def gradients(self, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        check_minibatch(self._manifest.batchnorm, len(x))
        self._module.train()
        self._module.lazy_reset_grad()
        self._module(x, y)
        grads = {
            name: np.array(self._state.parameters[name].grad, dtype=np.float32)
            for name in self._names
        }
        self._module.lazy_reset_grad()
        return grads

    def logits(self, x: np.ndarray) -> np.ndarray:
        if self._forward is not None:
            feeds = {name: self.get(name) for name in [*self._names, *self._statistics]}
            (logits,) = self._forward.run([self._output], {self._manifest.input.name: x, **feeds})
            return np.asarray(logits)
        self._module.eval()
        # The eval graph takes labels too; any valid class will do.
        _, logits = self._module(x, np.zeros(x.shape[0], np.int64))
        return np.asarray(logits)

    def export_inference_model(self, target: Path) -> None:
        if self._statistics:  # the eval graph normalises by batch statistics
            weights = {name: self.get(name) for name in [*self._names, *self._statistics]}
            _export_inference(self._bundle, weights, target)
            return
        self._module.export_model_for_inferencing(str(target), [self._output])


class PlainEngine:
    """The bundle's step graph in plain ``onnxruntime.InferenceSession``s."""

    name = "plain"

    def __init__(self, bundle: Path, manifest: BundleManifest, *, threads: int) -> None:
        ort = _ort.ort()
        self._bundle = bundle
        self._manifest = manifest
        options = _ort.session_options(threads=threads)
        try:
            self._step: Any = ort.InferenceSession(
                str(bundle / BUNDLE_FILES["step_model"]),
                options,
                providers=["CPUExecutionProvider"],
            )
            self._forward: Any = ort.InferenceSession(
                str(bundle / BUNDLE_FILES["forward_model"]),
                options,
                providers=["CPUExecutionProvider"],
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise InvalidInput(f"ONNX Runtime cannot load the bundle {bundle}: {exc}") from exc
        self._names = [p.name for p in manifest.parameters]
        forward = bundle / BUNDLE_FILES["forward_model"]
        self._weights = _initialisers(forward, self._names)
        statistics = [t.name for t in manifest.statistics]
        self._statistics = _initialisers(forward, statistics) if statistics else {}
        self._batch = [
            n for layer in manifest.batchnorm for n in (layer.batch_mean, layer.batch_var)
        ]
        self._outputs = [LOSS, *(next_name(n) for n in self._names), *self._batch]

    def get(self, name: str) -> np.ndarray:
        if name in self._statistics:
            return self._statistics[name]
        return self._weights[name]

    def set(self, name: str, value: np.ndarray) -> None:
        if name in self._statistics:
            self._statistics[name] = value
        else:
            self._weights[name] = value

    def step(self, x: np.ndarray, y: np.ndarray, learning_rate: float) -> float:
        layers = self._manifest.batchnorm
        check_minibatch(layers, len(x))
        feeds = {
            self._manifest.input.name: x,
            self._manifest.labels.name: y,
            LEARNING_RATE: np.asarray(learning_rate, dtype=np.float32),
            **self._weights,
        }
        loss, *updated = self._step.run(self._outputs, feeds)
        count = len(self._names)
        self._weights = dict(zip(self._names, updated[:count], strict=True))
        if layers:
            batch = dict(zip(self._batch, updated[count:], strict=True))
            update_running_statistics(self._statistics, layers, batch, len(x))
        return float(loss)

    def gradients(self, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        check_minibatch(self._manifest.batchnorm, len(x))
        feeds = {
            self._manifest.input.name: x,
            self._manifest.labels.name: y,
            LEARNING_RATE: np.asarray(0.0, dtype=np.float32),
            **self._weights,
        }
        wanted = [grad_name(n) for n in self._names]
        if not set(wanted) <= {o.name for o in self._step.get_outputs()}:
            raise InvalidInput(
                "this bundle's step graph has no gradient outputs (convert it again)"
            )
        return dict(zip(self._names, self._step.run(wanted, feeds), strict=True))

    def logits(self, x: np.ndarray) -> np.ndarray:
        feeds = {self._manifest.input.name: x, **self._weights, **self._statistics}
        (logits,) = self._forward.run([self._manifest.output.name], feeds)
        return np.asarray(logits)

    def export_inference_model(self, target: Path) -> None:
        _export_inference(self._bundle, {**self._weights, **self._statistics}, target)


def _export_inference(bundle: Path, weights: Mapping[str, np.ndarray], target: Path) -> None:
    """The bundle's inference model with ``weights`` in place of its initial ones."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(bundle / BUNDLE_FILES["inference_model"]))
    for tensor in model.graph.initializer:
        if tensor.name in weights:
            tensor.CopyFrom(numpy_helper.from_array(weights[tensor.name], tensor.name))
    onnx.save(model, str(target))


def _initialisers(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    """The named float32 initialisers of an ONNX file (needs the ``onnx`` package)."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:
        raise InvalidInput(f"training with the step graph needs onnx: {_ort.INSTALL_HINT}") from exc
    found: Mapping[str, Any] = {
        t.name: t for t in onnx.load(str(path)).graph.initializer if t.name in names
    }
    missing = [n for n in names if n not in found]
    if missing:
        raise InvalidInput(f"{path.name} lacks the parameters {missing[:5]}")
    return {n: np.ascontiguousarray(numpy_helper.to_array(found[n]), np.float32) for n in names}
