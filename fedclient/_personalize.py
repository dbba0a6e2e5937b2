"""Personalisation: the global model, fine-tuned on one device's own data, kept there.

A global model serves the average device; on a device whose data differ (its
user's handwriting, vocabulary, sensors) a few local epochs from the global
weights usually serve it better (Wang et al. 2019, "Federated evaluation of
on-device personalization"). The fine-tuned model never leaves the device and is
never uploaded: updates are always computed from the global model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedclient._exceptions import InvalidInput
from fedclient.protocol import Weights
from fedclient.runtime import TrainingBackend, TrainResult

__all__ = ["Personalization"]


@dataclass(frozen=True)
class Personalization:
    """How a device fine-tunes the global model on its own data."""

    epochs: int = 2
    learning_rate: float = 0.05
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not self.learning_rate > 0:
            raise InvalidInput("personalisation needs epochs >= 1, batch_size >= 1, lr > 0")

    def apply(
        self,
        backend: TrainingBackend,
        weights: Weights,
        x: np.ndarray,
        y: np.ndarray,
        *,
        seed: int | None = None,
    ) -> TrainResult:
        """Set ``backend`` to ``weights`` and fine-tune it on (x, y)."""
        backend.set_weights(weights)
        return backend.train(
            x,
            y,
            epochs=self.epochs,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            rng=np.random.default_rng(seed),
        )
