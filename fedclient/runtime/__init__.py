"""Training backends behind one interface: ``numpy`` here; edge runtimes load lazily."""

from __future__ import annotations

from fedclient._exceptions import InvalidInput
from fedclient.protocol import ModelSpec
from fedclient.runtime._base import EvalResult, TrainingBackend, TrainResult, check_dataset
from fedclient.runtime._numpy import NumpyModel

__all__ = [
    "EvalResult",
    "NumpyModel",
    "TrainResult",
    "TrainingBackend",
    "check_dataset",
    "create_backend",
]

RUNTIMES = ("numpy",)


def create_backend(spec: ModelSpec, runtime: str = "numpy", *, seed: int = 0) -> TrainingBackend:
    """A fresh model of architecture ``spec`` on the named runtime."""
    if runtime == "numpy":
        return NumpyModel(spec, seed=seed)
    raise InvalidInput(f"unknown runtime {runtime!r}; available: {', '.join(RUNTIMES)}")
