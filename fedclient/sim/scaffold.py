"""SCAFFOLD (Karimireddy et al. 2020, option II): a client trainer and its strategy.

    [train]                                         [strategy]
    trainer = "fedclient.sim.scaffold:ScaffoldTrainer"   name = "fedclient.sim.scaffold:Scaffold"
                                                    devices = 100   # N, the fleet's size

Each device corrects every local step by its control variate and the server's,
``y -= lr (g(y) - c_i + c)``, then sends the change of its own, ``c_i' - c_i`` with
``c_i' = c_i - c + (x - y) / (K lr)``, beside its update; the server moves the model
by the mean update and ``c`` by ``|S| / N`` times the mean change, and sends ``c``
beside the next model. A worked example of `fedclient.trainers` and of a strategy
that ``accepts_extras``: the numpy models only (it needs ``loss_and_grads``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedclient._exceptions import InvalidInput
from fedclient.protocol import StrategySettings, Weights
from fedclient.server.strategies import ClientUpdate, Strategy
from fedclient.trainers import TrainContext, Trainer, TrainResult, minibatches

__all__ = ["Scaffold", "ScaffoldTrainer"]


class ScaffoldTrainer(Trainer):
    """Local SGD corrected by the control variates; sends the change of its own."""

    train_options = frozenset({"local_steps"})

    def train(self, ctx: TrainContext) -> TrainResult:
        model, lr = ctx.model, ctx.learning_rate
        if not hasattr(model, "loss_and_grads"):
            raise InvalidInput(f"SCAFFOLD needs a model with loss_and_grads, not {model.runtime}")
        start = model.get_weights()
        y = {k: v.copy() for k, v in start.items()}
        zero = {k: np.zeros_like(v) for k, v in start.items()}
        c = {k: ctx.server.get(f"c.{k}", zero[k]) for k in start}
        c_i = {k: ctx.state.get(f"c.{k}", zero[k]) for k in start}
        correction = {k: c[k] - c_i[k] for k in start}
        steps, total, seen = 0, 0.0, 0
        for x, labels in minibatches(ctx):
            model.set_weights(y)
            loss, grads = model.loss_and_grads(x, labels)
            for k, g in grads.items():  # y -= lr (g - c_i + c), in place
                g += correction[k]
                g *= lr
                y[k] -= g
            steps, total, seen = steps + 1, total + loss * len(labels), seen + len(labels)
        model.set_weights(y)
        new_c_i = {k: c_i[k] - c[k] + (start[k] - y[k]) / (steps * lr) for k in start}
        return TrainResult(
            loss=total / seen,
            num_examples=len(ctx.y),
            steps=steps,
            extras={f"c.{k}": (new_c_i[k] - c_i[k]).astype(np.float32) for k in start},
            state={f"c.{k}": v.astype(np.float32) for k, v in new_c_i.items()},
        )


class Scaffold(Strategy):
    """x += lr x (example-weighted mean update); c += |S| / N x (mean control change).

    ``devices`` is N, the devices the control variate averages over (0: every round's
    devices are all of them, |S| / N = 1)."""

    accepts_extras = True

    def __init__(self, settings: StrategySettings | None = None, *, devices: int = 0) -> None:
        super().__init__(settings)
        if devices < 0:
            raise ValueError(f"devices must be 0 or more, got {devices}")
        self.devices = devices

    def aggregate(
        self, weights: Weights, updates: Sequence[ClientUpdate], state: Weights
    ) -> tuple[Weights, Weights]:
        total = sum(u.weight for u in updates)
        share = len(updates) / self.devices if self.devices else 1.0
        new_weights, new_state = {}, {}
        for k, w in weights.items():
            mean = sum(u.weight * u.delta[k].astype(np.float64) for u in updates) / total
            new_weights[k] = (w + self.learning_rate * mean).astype(w.dtype)
            changes = [u.extras.get(f"c.{k}", np.zeros(w.shape)) for u in updates]
            changes = [d if d.shape == w.shape else np.zeros(w.shape) for d in changes]
            c = state.get(f"c.{k}", np.zeros(w.shape, np.float32)).astype(np.float64)
            new_state[f"c.{k}"] = (c + share * np.mean(changes, axis=0)).astype(np.float32)
        return new_weights, new_state

    def broadcast(self, state: Weights) -> Weights:
        """The server control variate ``c``, beside the model."""
        return dict(state)
