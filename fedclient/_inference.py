"""What the device serves its app: the newest global model it holds, and that model
fine-tuned on the device's own examples, with no network call.

An app predicts on its UI thread while `fedclient.Client.run_forever` trains on
another. The two never share a model object: training works on the client's
training backend, inference on backends of its own, built here once per held
model version and kept (a round's download replaces them). Reads of the device
state are single statements, so a prediction waits at most for one short
transaction, never for a round.

A personalised model is cached by the held version *and* the example store's
`generation`: after a `fedclient.ExampleStore.forget`, the next request tunes a
new one on what is left, and the model tuned on the forgotten examples is gone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from fedclient._exceptions import InvalidInput, StateError
from fedclient._personalize import Personalization
from fedclient._state import DeviceState
from fedclient.protocol import ModelSpec, decode_tensors
from fedclient.runtime import TrainingBackend, create_backend

__all__ = ["HeldModels"]

#: The device's examples now: (x, y, the example store's generation; 0 for arrays).
Examples = Callable[[], tuple[np.ndarray, np.ndarray, int]]


class HeldModels:
    """The inference side of one `fedclient.Client` (see the module docstring).

    ``training_model`` gives the client's training backend, if the app supplied one:
    a held model without a stored architecture (an older state) runs on it, and a
    bundle's inference copy is loaded from the same bundle."""

    def __init__(
        self,
        state: DeviceState,
        job: str,
        runtime: str,
        *,
        training_model: Callable[[], TrainingBackend | None],
        personalize: Personalization | None,
        examples: Examples,
        seed: int | None,
    ) -> None:
        self.state = state
        self.job = job
        self.runtime = runtime
        self.personalize = personalize
        self._training_model = training_model
        self._examples = examples
        self._seed = seed
        # One model is built, tuned or run at a time (a LiteRT interpreter is not
        # thread-safe); training never takes this lock.
        self._lock = threading.RLock()
        self._global: tuple[int, TrainingBackend] | None = None
        self._personal: tuple[tuple[int, int], TrainingBackend] | None = None

    def latest(self, *, personalized: bool = False) -> TrainingBackend:
        """The newest global model held (``personalized``: fine-tuned on the device's
        examples), ready for inference; `StateError` if none is held yet."""
        if personalized and self.personalize is None:
            raise InvalidInput("personalized=True needs Client(personalize=...)")
        with self._lock:
            held = self.state.held(self.job)
            if held is None:
                raise StateError(f"the device holds no model of job {self.job!r} yet")
            version, body, spec = held
            if not personalized:
                if self._global is None or self._global[0] != version:
                    self._global = (version, self._build(spec, decode_tensors(body)[0]))
                return self._global[1]
            assert self.personalize is not None
            x, y, generation = self._examples()
            if self._personal is None or self._personal[0] != (version, generation):
                self._personal = None  # drop the old one first: it may hold forgotten data
                if len(y) == 0:
                    raise InvalidInput("no examples to personalise the model on")
                tuned = self._build(spec, None)
                self.personalize.apply(tuned, decode_tensors(body)[0], x, y, seed=self._seed)
                self._personal = ((version, generation), tuned)
            return self._personal[1]

    def predict(self, x: Any, *, personalized: bool = False) -> npt.NDArray[Any]:
        """Class probabilities of ``x`` (shape (n, features)) under `latest`: (n, classes).

        A wrong shape or a non-finite feature is an `InvalidInput` naming the shape the
        model expects."""
        with self._lock:
            model = self.latest(personalized=personalized)
            features = np.asarray(x)
            if (
                features.dtype.kind not in "fiu"
                or features.ndim != 2
                or features.shape[1] != model.inputs
            ):
                kind = "" if features.dtype.kind in "fiu" else f" of {features.dtype}"
                raise InvalidInput(
                    f"predict takes x of shape (n, {model.inputs}): one row of "
                    f"{model.inputs} numbers per example; got shape {features.shape}{kind}"
                )
            if not np.isfinite(features).all():
                raise InvalidInput("predict takes finite features; x holds NaN or Inf")
            result: npt.NDArray[Any] = model.predict(features)
            return result

    def _build(self, spec: ModelSpec | None, weights: Any) -> TrainingBackend:
        """A backend of the held architecture for inference alone (``weights`` set, if
        given)."""
        trained = self._training_model()
        if spec is None:  # an older state: only the app's own model knows the layout
            if trained is None:
                raise StateError("the held model's architecture is unknown (an older state)")
            backend = _sibling(trained)
        elif spec.kind == "bundle" and trained is not None:
            backend = _sibling(trained)  # the app's copy of the bundle, not the server's path
        else:
            backend = create_backend(spec, self.runtime)
        if weights is not None:
            backend.set_weights(weights)
        return backend


def _sibling(model: TrainingBackend) -> TrainingBackend:
    """Another backend like ``model``, for inference beside its training."""
    bundle = getattr(model, "bundle", None)
    if bundle is not None:
        from fedclient.runtime import OnnxBackend

        return OnnxBackend(bundle)
    spec = getattr(model, "spec", None)
    if isinstance(spec, ModelSpec):
        return create_backend(spec, model.runtime)
    raise StateError(
        f"cannot make an inference copy of a {type(model).__name__}: the state holds no "
        "architecture for the model (an older state)"
    )
