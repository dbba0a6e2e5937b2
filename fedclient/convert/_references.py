"""What a bundle is verified against: the source model, run by something other than ONNX
Runtime's training engine.

    NumpyReference      built-in models: the numpy backend (exact SGD step)
    TorchReference      PyTorch modules: torch itself (exact SGD step)
    OnnxReference       ONNX files: onnx's reference evaluator (forward), and the gradient
                        checked by central finite differences in float64
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from fedclient.protocol import Weights
from fedclient.runtime import NumpyCnn, NumpyModel
from fedclient.runtime._base import cross_entropy

if TYPE_CHECKING:
    import onnx

__all__ = ["NumpyReference", "OnnxReference", "Reference", "TorchReference"]


class Reference(Protocol):
    """The source model, as the verifier sees it."""

    label: str

    def initial_weights(self) -> Weights:
        """The parameters the bundle must start from, by name."""

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits for a batch at the initial weights."""

    def sgd_step(self, x: np.ndarray, y: np.ndarray, learning_rate: float) -> Weights | None:
        """Weights after one SGD step on the mean cross-entropy of (x, y), or None when the
        reference cannot train (the verifier then checks the gradient numerically)."""

    def loss(self, weights: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
        """Mean cross-entropy at ``weights``, as precisely as the reference can."""

    def gradients(self, x: np.ndarray, y: np.ndarray) -> Weights | None:
        """The gradient of the mean cross-entropy of (x, y) at the initial weights, in
        float64, by parameter name; None when the reference cannot differentiate."""

    def rounding(self, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """How far the reference's own float32 gradient lies from its float64 one, per
        tensor (max |g32 - g64|); empty when it does not say."""


def _features(x: np.ndarray, dtype: Any) -> np.ndarray:
    """Features in ``dtype``; token ids (integers) stay int64."""
    return x.astype(np.int64) if x.dtype.kind in "iu" else x.astype(dtype)


class NumpyReference:
    """A built-in model's numpy implementation."""

    label = "numpy reference"

    def __init__(self, model: NumpyModel | NumpyCnn) -> None:
        self._model = model
        self._initial = model.get_weights()

    def initial_weights(self) -> Weights:
        """The numpy model's initial weights."""
        return {k: v.copy() for k, v in self._initial.items()}

    def _fresh(
        self, weights: Mapping[str, np.ndarray], dtype: type = np.float32
    ) -> NumpyModel | NumpyCnn:
        model: NumpyModel | NumpyCnn
        if isinstance(self._model, NumpyCnn):
            model = NumpyCnn(self._model.shape, dtype=dtype)
        else:
            model = NumpyModel(self._model.spec, dtype=dtype)
        model.set_weights({k: np.asarray(v, dtype=dtype) for k, v in weights.items()})
        return model

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Forward pass in float32."""
        return self._fresh(self._initial).logits(x.reshape(len(x), -1))

    def sgd_step(self, x: np.ndarray, y: np.ndarray, learning_rate: float) -> Weights:
        """One full-batch SGD step in float32."""
        model = self._fresh(self._initial)
        model.train(
            x.reshape(len(x), -1),
            y,
            epochs=1,
            batch_size=len(x),
            learning_rate=learning_rate,
            rng=np.random.default_rng(0),
        )
        return model.get_weights()

    def gradients(self, x: np.ndarray, y: np.ndarray) -> Weights:
        """One full-batch SGD step at learning rate 1 in float64: what it subtracted."""
        model = self._fresh(self._initial, np.float64)
        model.train(
            x.reshape(len(x), -1).astype(np.float64),
            y,
            epochs=1,
            batch_size=len(x),
            learning_rate=1.0,
            rng=np.random.default_rng(0),
        )
        after = model.get_weights()
        return {k: v.astype(np.float64) - after[k] for k, v in self._initial.items()}

    def rounding(self, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """Not measured: the engines match the numpy models' gradients closely."""
        return {}

    def loss(self, weights: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
        """Mean cross-entropy in float64."""
        model = self._fresh(weights, np.float64)
        return cross_entropy(model.logits(x.reshape(len(x), -1).astype(np.float64)), y)


class OnnxReference:
    """An ONNX model evaluated by ``onnx.reference.ReferenceEvaluator`` (pure numpy), with its
    float32 parameters fed as inputs so the loss can be taken at any weights."""

    label = "onnx reference evaluator"

    def __init__(self, model: onnx.ModelProto, parameters: list[str]) -> None:
        import onnx
        from onnx.reference import ReferenceEvaluator

        self._initial: Weights = {}
        variant = onnx.ModelProto()
        variant.CopyFrom(model)
        kept = []
        by_name = {t.name: t for t in model.graph.initializer}
        for tensor in model.graph.initializer:
            if tensor.name not in parameters:
                kept.append(tensor)
        for name in parameters:
            value = onnx.numpy_helper.to_array(by_name[name])
            self._initial[name] = np.array(value, dtype=np.float32)
            variant.graph.input.append(
                onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(value.shape))
            )
        del variant.graph.initializer[:]
        variant.graph.initializer.extend(kept)
        initialised = {t.name for t in model.graph.initializer}
        self._input = next(i.name for i in model.graph.input if i.name not in initialised)
        self._shape = tuple(
            d.dim_value
            for d in next(
                i for i in model.graph.input if i.name == self._input
            ).type.tensor_type.shape.dim[1:]
        )
        self._evaluator: Any = ReferenceEvaluator(variant)

    def initial_weights(self) -> Weights:
        """The model's float32 initialisers."""
        return {k: v.copy() for k, v in self._initial.items()}

    def _run(self, weights: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
        feeds = {self._input: x.reshape((len(x), *self._shape)), **weights}
        return np.asarray(self._evaluator.run(None, feeds)[0])

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Forward pass in float32."""
        return self._run(self._initial, _features(x, np.float32))

    def sgd_step(self, x: np.ndarray, y: np.ndarray, learning_rate: float) -> None:
        """The evaluator cannot differentiate: the verifier uses finite differences."""
        return None

    def gradients(self, x: np.ndarray, y: np.ndarray) -> None:
        """The evaluator cannot differentiate: the verifier uses finite differences."""
        return None

    def rounding(self, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """No gradient, no rounding to measure."""
        return {}

    def loss(self, weights: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
        """Mean cross-entropy, evaluated in float64."""
        wide = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
        return cross_entropy(self._run(wide, _features(x, np.float64)).astype(np.float64), y)


class TorchReference:
    """A PyTorch ``nn.Module``: torch computes the forward pass and the SGD step."""

    label = "PyTorch"

    def __init__(self, module: Any, names: Mapping[str, str], *, training: bool = False) -> None:
        """``names`` maps each bundle parameter name to the module's ``state_dict`` key.
        ``training``: the loss, gradients and step are torch's in training mode (BatchNorm
        on batch statistics, its running statistics updated by the step), logits in
        evaluation mode."""
        import torch

        self._torch: Any = torch
        self._module = module.eval()
        self._training = training
        self._names = dict(names)
        state = module.state_dict()
        self._initial: Weights = {
            name: state[key].detach().cpu().numpy().astype(np.float32).copy()
            for name, key in self._names.items()
        }

    def initial_weights(self) -> Weights:
        """The module's parameters, by bundle name."""
        return {k: v.copy() for k, v in self._initial.items()}

    def _input(self, x: np.ndarray, dtype: Any) -> Any:
        """A batch as torch sees it: token ids stay integers, features take ``dtype``."""
        if x.dtype.kind in "iu":
            return self._torch.from_numpy(x.astype(np.int64))
        return self._torch.from_numpy(x).to(dtype)

    def _load(self, weights: Mapping[str, np.ndarray], dtype: Any) -> Any:
        import copy

        torch = self._torch
        module = copy.deepcopy(self._module).to(dtype)
        state = module.state_dict()
        for name, key in self._names.items():
            state[key] = torch.from_numpy(np.asarray(weights[name])).to(dtype)
        module.load_state_dict(state)
        return module.train(self._training)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Forward pass in float32."""
        torch = self._torch
        with torch.no_grad():
            module = self._load(self._initial, torch.float32).eval()
            out = module(self._input(x, torch.float32))
        return np.asarray(out.numpy())

    def sgd_step(self, x: np.ndarray, y: np.ndarray, learning_rate: float) -> Weights:
        """One step of ``torch.optim.SGD`` on ``nn.CrossEntropyLoss``."""
        torch = self._torch
        module = self._load(self._initial, torch.float32)
        optimizer = torch.optim.SGD(module.parameters(), lr=learning_rate)
        loss = torch.nn.functional.cross_entropy(
            module(self._input(x, torch.float32)), torch.from_numpy(y.astype(np.int64))
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        state = module.state_dict()
        return {
            name: state[key].detach().numpy().astype(np.float32)
            for name, key in self._names.items()
        }

    def gradients(self, x: np.ndarray, y: np.ndarray) -> Weights:
        """torch's autograd of ``nn.CrossEntropyLoss``, in float64."""
        return self._gradients(x, y, self._torch.float64)

    def rounding(self, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """max |g32 - g64| per tensor: a gradient that cancels to zero in exact arithmetic
        (a conv's bias before BatchNorm on batch statistics) is float32 noise, in torch
        as in any engine."""
        wide = self._gradients(x, y, self._torch.float64)
        narrow = self._gradients(x, y, self._torch.float32)
        return {k: float(np.abs(narrow[k] - v).max(initial=0.0)) for k, v in wide.items()}

    def _gradients(self, x: np.ndarray, y: np.ndarray, dtype: Any) -> Weights:
        torch = self._torch
        module = self._load(self._initial, dtype)
        module.zero_grad()
        loss = torch.nn.functional.cross_entropy(
            module(self._input(x, dtype)), torch.from_numpy(y.astype(np.int64))
        )
        loss.backward()
        found = dict(module.named_parameters())
        grads = {}
        for name, key in self._names.items():
            grad = found[key].grad if key in found else None  # a buffer has no gradient
            grads[name] = (
                np.zeros(self._initial[name].shape)
                if grad is None
                else grad.detach().numpy().astype(np.float64)
            )
        return grads

    def loss(self, weights: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
        """Mean cross-entropy in float64."""
        torch = self._torch
        with torch.no_grad():
            out = self._load(weights, torch.float64)(self._input(x, torch.float64))
        return cross_entropy(out.numpy(), y)
