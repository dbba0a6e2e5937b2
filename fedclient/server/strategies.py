"""Aggregation strategies: pure functions from (global weights, client updates, state) to
(new weights, new state).

A strategy is one class. Subclass `Strategy` and write ``aggregate``; a plan names
it by import path, and its own settings (keyword arguments of its constructor, after
the plan's `StrategySettings`) come from the same table::

    # krum.py, beside the plan              # plan.toml
    class Krum(Strategy):                   # [strategy]
        def __init__(self, settings=None, *, f=1):   # name = "krum:Krum"
            super().__init__(settings)      # f = 2
            if f < 0:
                raise ValueError("f must be 0 or more")
            self.f = f

        def aggregate(self, weights, updates, state):
            ...
            return new_weights, state

A subclass with a ``name`` is also known by that name once its module is imported.
``state`` is the strategy's memory between rounds (momentum, Adam moments): named
arrays of any shape and dtype numpy and safetensors share (0-d ones too); the server
keeps it in its database next to the model (`encode_state`), so a restarted server
resumes mid-optimisation.

A strategy that needs only the weighted mean of the updates subclasses
`MeanStrategy` and writes ``step`` (from that mean) instead: its rounds then
*stream*, folding each update into a `RunningSum` soon after it arrives and
dropping its body, so a round holds O(model) whatever its number of updates.
Robust strategies (median, trimmed mean) need every update at once: their rounds
keep every body until the close (``streams`` is False). Strategies built in:

    fedavg        example-weighted mean of the updates (McMahan et al. 2017)
    fedavgm       fedavg with server momentum (Hsu et al. 2019)
    fedadam       server Adam on the mean update (Reddi et al. 2021)
    fedyogi       server Yogi (Reddi et al. 2021)
    fedadagrad    server Adagrad (Reddi et al. 2021)
    median        coordinate-wise median of the updates (Yin et al. 2018)
    trimmed_mean  coordinate-wise mean without the extremes (Yin et al. 2018)
    norm_bound    fedavg of updates clipped to an L2 norm (Sun et al. 2019)

FedProx is a device-side change (a proximal term in local training: the plan's
``train.proximal_mu``) aggregated with fedavg.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from fedclient._exceptions import InvalidInput
from fedclient.plugins import construct, is_import_path, load_plugin
from fedclient.protocol import StrategySettings, Weights, decode_tensors, encode_tensors

__all__ = [
    "ClientUpdate",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedYogi",
    "MeanStrategy",
    "Median",
    "NormBound",
    "RunningSum",
    "Strategy",
    "TrimmedMean",
    "decode_state",
    "encode_state",
    "strategy_class",
    "strategy_for",
]


@dataclass(frozen=True)
class ClientUpdate:
    """One device's contribution to a round: the change it made to the weights."""

    device_id: str
    num_examples: int
    delta: Weights
    staleness: int = 0  # async: model versions between the one trained on and the current
    #: Tensors a client trainer sent beside the delta (for a strategy whose
    #: ``accepts_extras`` says it reads them; e.g. SCAFFOLD's control-variate change).
    extras: Weights = field(default_factory=dict)

    @property
    def weight(self) -> float:
        """Its share in a weighted mean: examples, damped by staleness (FedBuff)."""
        return float(self.num_examples / (1.0 + self.staleness) ** 0.5)


class Strategy(ABC):
    """How a round's updates become the next global model."""

    name: ClassVar[str] = ""
    default_learning_rate: ClassVar[float] = 1.0
    #: Whether a round may fold its updates into a `RunningSum` as they arrive (and
    #: keep no bodies): only a `MeanStrategy` may.
    streams: ClassVar[bool] = False
    #: Whether updates may carry extra tensors for it (`ClientUpdate.extras`): refused
    #: otherwise, as any unexpected tensor is.
    accepts_extras: ClassVar[bool] = False
    registry: ClassVar[dict[str, type[Strategy]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            Strategy.registry[cls.name] = cls

    def __init__(self, settings: StrategySettings | None = None) -> None:
        self.settings = settings or StrategySettings()
        self.learning_rate = self.settings.server_learning_rate or self.default_learning_rate

    @abstractmethod
    def aggregate(
        self, weights: Weights, updates: Sequence[ClientUpdate], state: Weights
    ) -> tuple[Weights, Weights]:
        """The next global weights (and strategy state) from this round's updates."""

    def broadcast(self, state: Weights) -> Weights:
        """Tensors the devices get beside the current model (from the state its last
        round left; a client trainer reads them, e.g. SCAFFOLD's server control
        variate). None by default."""
        return {}


def strategy_class(name: str, *, where: Sequence[str | Path] = ()) -> type[Strategy]:
    """The class a plan's strategy ``name`` means: a built-in name, or an import path
    (``module:Class``, imported with the folders ``where`` on the path)."""
    if is_import_path(name):
        found: type[Strategy] = load_plugin(name, Strategy, where=where)
        return found
    cls = Strategy.registry.get(name)
    if cls is None:
        raise InvalidInput(
            f"unknown strategy {name!r}; available: {', '.join(sorted(Strategy.registry))}, "
            "or your own class as module:Class"
        )
    return cls


def strategy_for(settings: StrategySettings, *, where: Sequence[str | Path] = ()) -> Strategy:
    """The strategy a plan names, built with its own settings (``settings.options``)."""
    cls = strategy_class(settings.name, where=where)
    return construct(cls, f"strategy {settings.name!r}", settings, options=settings.options)


def encode_state(state: Mapping[str, Any]) -> bytes:
    """A strategy's state as the server stores it: every value as an array (numbers
    too), each keeping its shape (safetensors' numpy binding reads a 0-d array back
    as shape (1,): their names go in the metadata)."""
    arrays = {name: np.asarray(value) for name, value in state.items()}
    scalars = sorted(name for name, value in arrays.items() if value.ndim == 0)
    return encode_tensors(arrays, {"scalars": json.dumps(scalars)} if scalars else None)


def decode_state(body: bytes) -> Weights:
    """The state `encode_state` stored, shapes as they were."""
    arrays, metadata = decode_tensors(body)
    for name in json.loads(metadata.get("scalars", "[]")):
        arrays[name] = arrays[name].reshape(())
    return arrays


class RunningSum:
    """Updates folded one by one: the sums of ``weight * contribution`` per tensor, and
    of the weights, in float64. O(model) memory however many updates it holds; the
    same updates folded in the same order give bit-identical sums."""

    def __init__(
        self, sums: dict[str, np.ndarray] | None = None, weight: float = 0.0, count: int = 0
    ) -> None:
        self.sums = sums if sums is not None else {}
        self.weight = weight
        self.count = count

    def add(self, weight: float, contribution: Weights) -> None:
        """Fold in one update's contribution with its weight (`ClientUpdate.weight`)."""
        for name, tensor in contribution.items():
            term = tensor.astype(np.float64) * weight
            if name in self.sums:
                self.sums[name] += term
            else:
                self.sums[name] = term
        self.weight += weight
        self.count += 1

    def merge(self, other: RunningSum) -> None:
        """Add another sum's updates (a partial sum of the same round) to this one."""
        for name, total in other.sums.items():
            if name in self.sums:
                self.sums[name] += total
            else:
                self.sums[name] = total.astype(np.float64, copy=True)
        self.weight += other.weight
        self.count += other.count

    def mean(self) -> dict[str, np.ndarray]:
        """The weighted mean of what was folded in."""
        if self.count == 0 or self.weight <= 0:
            raise ValueError("aggregation needs at least one update with examples")
        return {name: total / self.weight for name, total in self.sums.items()}


def _apply(weights: Weights, step: dict[str, np.ndarray]) -> Weights:
    return {k: (v.astype(np.float64) + step[k]).astype(v.dtype) for k, v in weights.items()}


class MeanStrategy(Strategy):
    """A strategy that sees the updates only through the weighted mean of their
    `contribution` s: its rounds stream (`RunningSum`)."""

    streams = True

    def contribution(self, update: ClientUpdate) -> Weights:
        """What of an update enters the mean (its delta; `NormBound` clips it first)."""
        return update.delta

    @abstractmethod
    def step(
        self, weights: Weights, mean: dict[str, np.ndarray], state: Weights
    ) -> tuple[Weights, Weights]:
        """The next global weights (and state) from the weighted mean of the updates."""

    def aggregate(
        self, weights: Weights, updates: Sequence[ClientUpdate], state: Weights
    ) -> tuple[Weights, Weights]:
        running = RunningSum()
        for update in updates:
            running.add(update.weight, self.contribution(update))
        return self.step(weights, running.mean(), state)


class FedAvg(MeanStrategy):
    """Add the example-weighted mean of the updates."""

    name = "fedavg"

    def step(
        self, weights: Weights, mean: dict[str, np.ndarray], state: Weights
    ) -> tuple[Weights, Weights]:
        return _apply(weights, {k: self.learning_rate * mean[k] for k in weights}), state


class FedAvgM(MeanStrategy):
    """FedAvg with server momentum: v = beta v + mean; w += lr v."""

    name = "fedavgm"

    def step(
        self, weights: Weights, mean: dict[str, np.ndarray], state: Weights
    ) -> tuple[Weights, Weights]:
        beta, lr = self.settings.momentum, self.learning_rate
        velocity = {}
        for k in weights:
            previous = state.get(f"v.{k}", np.zeros(weights[k].shape, np.float64))
            velocity[k] = beta * previous.astype(np.float64) + mean[k]
        return _apply(weights, {k: lr * v for k, v in velocity.items()}), {
            f"v.{k}": v.astype(np.float32) for k, v in velocity.items()
        }


class _ServerOptimizer(MeanStrategy):
    """Reddi et al. 2021: the mean update is a pseudo-gradient for an adaptive optimiser."""

    default_learning_rate = 0.03

    def second_moment(self, v: np.ndarray, g2: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def step(
        self, weights: Weights, mean: dict[str, np.ndarray], state: Weights
    ) -> tuple[Weights, Weights]:
        s = self.settings
        step, new_state = {}, {}
        for k in weights:
            delta = mean[k]
            m = state.get(f"m.{k}", np.zeros(delta.shape, np.float32)).astype(np.float64)
            v = state.get(f"v.{k}", np.full(delta.shape, s.tau**2, np.float32)).astype(np.float64)
            m = s.beta1 * m + (1 - s.beta1) * delta
            v = self.second_moment(v, delta * delta)
            step[k] = self.learning_rate * m / (np.sqrt(v) + s.tau)
            new_state[f"m.{k}"], new_state[f"v.{k}"] = m.astype(np.float32), v.astype(np.float32)
        return _apply(weights, step), new_state


class FedAdam(_ServerOptimizer):
    """Server Adam."""

    name = "fedadam"

    def second_moment(self, v: np.ndarray, g2: np.ndarray) -> np.ndarray:
        b2 = self.settings.beta2
        moment: np.ndarray = b2 * v + (1 - b2) * g2
        return moment


class FedYogi(_ServerOptimizer):
    """Server Yogi: the second moment moves additively, by the sign of the gap."""

    name = "fedyogi"

    def second_moment(self, v: np.ndarray, g2: np.ndarray) -> np.ndarray:
        moment: np.ndarray = v - (1 - self.settings.beta2) * g2 * np.sign(v - g2)
        return moment


class FedAdagrad(_ServerOptimizer):
    """Server Adagrad."""

    name = "fedadagrad"
    default_learning_rate = 0.1

    def second_moment(self, v: np.ndarray, g2: np.ndarray) -> np.ndarray:
        moment: np.ndarray = v + g2
        return moment


class Median(Strategy):
    """Coordinate-wise median of the updates: robust to a minority of bad devices."""

    name = "median"

    def aggregate(
        self, weights: Weights, updates: Sequence[ClientUpdate], state: Weights
    ) -> tuple[Weights, Weights]:
        step = {k: np.median(np.stack([u.delta[k] for u in updates]), axis=0) for k in weights}
        return _apply(weights, step), state


class TrimmedMean(Strategy):
    """Coordinate-wise mean after dropping the ``trim_fraction`` largest and smallest."""

    name = "trimmed_mean"

    def aggregate(
        self, weights: Weights, updates: Sequence[ClientUpdate], state: Weights
    ) -> tuple[Weights, Weights]:
        cut = int(len(updates) * self.settings.trim_fraction)
        step = {}
        for k in weights:
            stacked = np.sort(np.stack([u.delta[k].astype(np.float64) for u in updates]), axis=0)
            step[k] = stacked[cut : len(updates) - cut].mean(axis=0)
        return _apply(weights, step), state


class NormBound(FedAvg):
    """FedAvg of the updates, each first scaled down to L2 norm ``norm_bound`` at most."""

    name = "norm_bound"

    def contribution(self, update: ClientUpdate) -> Weights:
        norm = float(
            np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in update.delta.values()))
        )
        scale = min(1.0, self.settings.norm_bound / norm) if norm > 0 else 1.0
        return {k: v * scale for k, v in update.delta.items()}
