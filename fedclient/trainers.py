"""Client trainers: local training as a plugin, for research in simulation.

A plan's ``[train] trainer = "module:Class"`` replaces a device's local training with
``Class().train(context)``. The trainer gets the model (a `TrainingBackend` holding
the round's global weights), the device's data, the plan's settings, this round's
learning rate and a seeded generator, the tensors the job's strategy sends beside the
model (`fedclient.server.strategies.Strategy.broadcast`) and what it kept on this
device after its last round. It leaves the trained weights in the model (their change
is the update) and returns a `TrainResult`, with ``extras`` to send beside the update
(a strategy that ``accepts_extras`` reads them as `ClientUpdate.extras`) and ``state``
to keep on the device::

    class Prox(Trainer):
        def __init__(self, *, mu=0.01):      # [train] trainer = "prox:Prox"  mu = 0.1
            self.mu = mu

        def train(self, ctx):
            anchor = ctx.model.get_weights()
            for x, y in minibatches(ctx):
                loss, grads = ctx.model.loss_and_grads(x, y)  # the numpy models'
                ...

`minibatches` draws the batches the built-in training draws (``epochs`` or
``local_steps``, shuffled by the round's generator). A device trains with a trainer
only if it holds one under the plan's name (`fedclient.Client`'s ``trainers``;
``fedsim`` imports the plan's for its simulated devices): a plan never makes a device
import code. The trainer's ``train_options`` lists the `TrainSettings` options it
honours (by default none: a plan asking for momentum is refused, not ignored).
`fedclient.sim.scaffold` is a worked example (SCAFFOLD, Karimireddy et al. 2020).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedclient._exceptions import InvalidInput
from fedclient.protocol import TrainSettings, Weights
from fedclient.runtime import TrainingBackend, TrainResult

__all__ = [
    "LocalStatistics",
    "TrainContext",
    "TrainResult",
    "Trainer",
    "check_trainer_options",
    "minibatches",
]


@dataclass(frozen=True)
class TrainContext:
    """What a trainer gets for one round's local training."""

    model: TrainingBackend  # holds the round's global weights; train it in place
    x: np.ndarray  # the device's examples (float32 features)
    y: np.ndarray  # their labels
    settings: TrainSettings  # the plan's [train] table
    learning_rate: float  # this round's (after the plan's per-round lr_decay)
    round_number: int
    rng: np.random.Generator  # seeded per device and round
    server: Weights  # what the job's strategy sent beside the model ({}: nothing)
    state: Weights  # what this trainer kept on this device last time ({} at first)


class Trainer(ABC):
    """A device's local training for one round (see the module's documentation)."""

    #: The `TrainSettings` options this trainer honours (`TrainSettings.options`).
    train_options: ClassVar[frozenset[str]] = frozenset()

    @abstractmethod
    def train(self, ctx: TrainContext) -> TrainResult:
        """Train ``ctx.model`` from the global weights it holds; say what it did."""


def minibatches(ctx: TrainContext) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The round's minibatches: ``epochs`` passes (or ``local_steps`` steps) over the
    examples, each pass in an order drawn from ``ctx.rng``."""
    s, n = ctx.settings, len(ctx.y)
    steps = s.local_steps or s.epochs * -(-n // s.batch_size)
    step = 0
    while step < steps:
        order = ctx.rng.permutation(n)
        for start in range(0, n, s.batch_size):
            if step == steps:
                return
            idx = order[start : start + s.batch_size]
            yield ctx.x[idx], ctx.y[idx]
            step += 1


def check_trainer_options(trainer: Trainer, name: str, settings: TrainSettings) -> None:
    """Refuse the plan's training settings the trainer does not honour."""
    unsupported = sorted(set(settings.options()) - trainer.train_options)
    if unsupported:
        raise InvalidInput(
            f"the trainer {name} cannot honour the plan's [train] {', '.join(unsupported)}"
        )


class LocalStatistics(Trainer):
    """BatchNorm's running statistics kept on the device (the idea of FedBN, Li et al.
    2021), for a model whose BatchNorm trains on batch statistics (``fedconvert
    --batchnorm batch``)::

        [train]
        trainer = "fedclient.trainers:LocalStatistics"

    Without it the server averages the statistics with the weights and every device
    starts each round from the average. With it a device starts from the statistics it
    kept after its last round (the received ones at its first), so each normalises by
    its own data's statistics, however far they lie from the fleet's. The update still
    carries the statistics' change from the received ones: the server's model holds the
    average of the devices' own statistics, for a new device and for evaluation.
    """

    def train(self, ctx: TrainContext) -> TrainResult:
        names = list(getattr(ctx.model, "statistics", []))
        if not names:
            raise InvalidInput(
                "LocalStatistics keeps BatchNorm's running statistics on the device: the "
                "model has none (convert it with fedconvert --batchnorm batch)"
            )
        if ctx.state:
            weights = ctx.model.get_weights()
            weights.update({k: ctx.state[k] for k in names if k in ctx.state})
            ctx.model.set_weights(weights)
        s = ctx.settings
        result = ctx.model.train(
            ctx.x,
            ctx.y,
            epochs=s.epochs,
            batch_size=s.batch_size,
            learning_rate=ctx.learning_rate,
            rng=ctx.rng,
        )
        after = ctx.model.get_weights()
        return TrainResult(
            result.loss, result.num_examples, result.steps, state={k: after[k] for k in names}
        )
