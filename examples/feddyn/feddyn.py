"""FedDyn (Acar et al. 2021) written against fedsim's plugin interfaces, from outside
the package: a client trainer with per-device state, and a strategy with its own.

Each device minimises L_i(w) - <g_i, w> + alpha/2 |w - w_server|^2, then moves its
state g_i -= alpha (w_i - w_server); the server keeps h -= alpha / N x (the sum of
the updates) and publishes mean(w_i) - h / alpha. Nothing travels beside the update:
g_i stays on the device (`TrainResult.state`), h in the strategy's state.
"""

from __future__ import annotations

import numpy as np

from fedclient.server.strategies import Strategy
from fedclient.trainers import Trainer, TrainResult, minibatches


class FedDynTrainer(Trainer):
    """Local SGD on the dynamically regularised objective."""

    train_options = frozenset({"local_steps"})

    def __init__(self, *, alpha: float = 0.01) -> None:
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        self.alpha = alpha

    def train(self, ctx):  # type: ignore[no-untyped-def]
        model, lr, a = ctx.model, ctx.learning_rate, self.alpha
        start = model.get_weights()
        w = {k: v.copy() for k, v in start.items()}
        g_i = {k: ctx.state.get(k, np.zeros_like(v)) for k, v in start.items()}
        total, seen, steps = 0.0, 0, 0
        for x, y in minibatches(ctx):
            model.set_weights(w)
            loss, grads = model.loss_and_grads(x, y)
            for k, g in grads.items():  # grad of L_i - <g_i, w> + a/2 |w - w0|^2
                w[k] -= lr * (g - g_i[k] + a * (w[k] - start[k]))
            total, seen, steps = total + loss * len(y), seen + len(y), steps + 1
        model.set_weights(w)
        kept = {k: (g_i[k] - a * (w[k] - start[k])).astype(np.float32) for k in start}
        return TrainResult(total / seen, len(ctx.y), steps, state=kept)


class FedDyn(Strategy):
    """w = w_server + mean(update) - h / alpha, h -= alpha / N x sum(update)."""

    def __init__(self, settings=None, *, alpha: float = 0.01, devices: int = 100) -> None:  # type: ignore[no-untyped-def]
        super().__init__(settings)
        if alpha <= 0 or devices < 1:
            raise ValueError("alpha must be positive and devices at least 1")
        self.alpha, self.devices = alpha, devices

    def aggregate(self, weights, updates, state):  # type: ignore[no-untyped-def]
        new_weights, new_state = {}, {}
        for k, w in weights.items():
            deltas = np.stack([u.delta[k].astype(np.float64) for u in updates])
            h = state.get(f"h.{k}", np.zeros(w.shape)).astype(np.float64)
            h = h - self.alpha / self.devices * deltas.sum(axis=0)
            new_weights[k] = (w + deltas.mean(axis=0) - h / self.alpha).astype(w.dtype)
            new_state[f"h.{k}"] = h.astype(np.float32)
        return new_weights, new_state
