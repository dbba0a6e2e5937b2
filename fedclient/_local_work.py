"""What the job loop asks of the device itself, apart from the server: the examples it
trains on now, whether they (and the model the server sends) fit the job's model, the
model it holds and the backend that trains it, and how long it expects to need.

`fedclient._flow.JobLoop` inherits these; each is a plain check or a read of the device's
own state, with no effect to yield."""

from __future__ import annotations

import numpy as np

from fedclient._effects import FlowBase
from fedclient._examples import ExampleStore
from fedclient._exceptions import InvalidInput, ModelMismatch
from fedclient._state import RoundProgress
from fedclient.protocol import ModelSpec, RoundPlan, Weights, decode_tensors
from fedclient.runtime import TrainingBackend, check_dataset, create_backend

__all__ = ["LocalWork"]


class LocalWork(FlowBase):
    """The device's own examples and model, as the job loop checks and uses them."""

    def _training_data(self) -> tuple[np.ndarray, np.ndarray, int]:
        """The examples to train on now (the arrays given, or a snapshot of the store)
        and the store's generation."""
        x, y, generation = self._examples_now()
        if len(y) == 0:
            raise InvalidInput("the example store is empty: nothing to train on")
        return x, y, generation

    def _forgotten_since(self, progress: RoundProgress) -> bool:
        """Whether the example store forgot examples since ``progress``'s update was
        trained (so the update may hold them)."""
        if not isinstance(self.data, ExampleStore) or progress.data_generation is None:
            return False
        return progress.data_generation != self.data.generation

    def _model_shape(self) -> tuple[int, int] | None:
        """(inputs, classes) of the job's model, if the device knows it before a check-in
        (its own model, or the architecture of the model it holds)."""
        if self.model is not None:
            return self.model.inputs, self.model.classes
        if self._job_shape is not None:
            return self._job_shape
        spec = self._store.held_spec(self.job)
        return None if spec is None else (spec.inputs, spec.classes)

    def _check_data(self, inputs: int, classes: int) -> None:
        """`InvalidInput` unless the device's examples (and held-out examples) fit a model
        of ``inputs`` features and ``classes`` classes."""
        if self._data_fits == (inputs, classes):
            return  # arrays do not change: checked once
        try:
            if self._arrays is not None:
                check_dataset(*self._arrays, inputs=inputs, classes=classes)
            else:
                assert isinstance(self.data, ExampleStore)
                held_inputs, bounds = self.data.inputs, self.data.label_bounds()
                if held_inputs is not None and held_inputs != inputs:
                    raise InvalidInput(f"examples have {held_inputs} features, not {inputs}")
                if bounds is not None and bounds[1] >= classes:
                    raise InvalidInput(
                        f"labels must lie in [0, {classes}), got [{bounds[0]}, {bounds[1]}]"
                    )
            if self.eval_data is not None:
                check_dataset(*self.eval_data, inputs=inputs, classes=classes)
        except InvalidInput as exc:
            raise InvalidInput(
                f"the device's data do not fit job {self.job!r}'s model ({inputs} features, "
                f"{classes} classes): {exc}"
            ) from None
        if self._arrays is not None:
            self._data_fits = (inputs, classes)

    def _examples_now(self) -> tuple[np.ndarray, np.ndarray, int]:
        """The examples now and the store's generation (0 for arrays), read together."""
        if self._arrays is not None:
            return (*self._arrays, 0)
        assert isinstance(self.data, ExampleStore)
        return self.data.snapshot()

    def _example_count(self) -> int:
        return len(self._arrays[1]) if self._arrays is not None else len(self.data)

    def _seconds_needed(self, plan: RoundPlan) -> float | None:
        """Seconds this device expects to need to train and upload, if it can tell."""
        work = plan.train.work(self._example_count())
        if self.estimate_seconds is not None:
            return self.estimate_seconds(work)
        speed = self._store.speed()  # examples per second, learned from past rounds
        return None if speed is None else work / speed

    def _held_weights(self, plan: RoundPlan) -> Weights:
        """The stored model for this round, decoded (handed over by the download that
        just stored it, when that was this process)."""
        downloaded, self._downloaded = self._downloaded, None
        held = self._store.held_version(self.job)
        assert held is not None and held[0] == plan.model_version
        if downloaded is not None and downloaded[:2] == held:
            return downloaded[2]
        stored = self._store.held_model(self.job)
        assert stored is not None
        return decode_tensors(stored[2])[0]

    def _backend(self, plan: RoundPlan) -> TrainingBackend:
        return self._backend_for(plan.model)

    def _backend_for(self, spec: ModelSpec) -> TrainingBackend:
        if self.model is None:
            self.model = create_backend(spec, self.runtime)
        return self.model

    def _check_model(self, weights: Weights, plan: RoundPlan) -> None:
        self._check_weights(weights, plan.model)

    def _check_weights(self, weights: Weights, spec: ModelSpec) -> None:
        """`ModelMismatch` unless ``weights`` fit the local model of architecture ``spec``."""
        backend = self._backend_for(spec)
        digest = getattr(backend, "digest", "")
        if spec.digest and digest and digest != spec.digest:
            raise ModelMismatch(
                f"the job's model is bundle {spec.digest[:12]}; this device holds "
                f"bundle {digest[:12]}"
            )
        local = backend.get_weights()
        if {k: (v.shape, v.dtype) for k, v in weights.items()} != {
            k: (v.shape, v.dtype) for k, v in local.items()
        }:  # the common case compares without formatting anything
            theirs = {k: (tuple(v.shape), str(v.dtype)) for k, v in weights.items()}
            ours = {k: (tuple(v.shape), str(v.dtype)) for k, v in local.items()}
            differ = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))
            detail = "; ".join(
                f"{k}: job {_describe(theirs.get(k))}, local {_describe(ours.get(k))}"
                for k in differ[:5]
            )
            raise ModelMismatch(
                f"the job's model does not match the local model ({len(differ)} tensors "
                f"differ): {detail}"
            )


def _describe(tensor: tuple[tuple[int, ...], str] | None) -> str:
    return "missing" if tensor is None else f"{tensor[1]}{list(tensor[0])}"
