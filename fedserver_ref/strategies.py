"""Aggregation strategies: pure functions from (global weights, client updates) to new weights.

A strategy is one class with one method; to add one, subclass `Strategy` and
pass an instance to `FederationService`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedclient.protocol import Weights

__all__ = ["ClientUpdate", "FedAvg", "Strategy"]


@dataclass(frozen=True)
class ClientUpdate:
    """One device's contribution to a round: the change it made to the weights."""

    device_id: str
    num_examples: int
    delta: Weights


class Strategy(ABC):
    """How a round's updates become the next global model."""

    name: str = "strategy"

    @abstractmethod
    def aggregate(self, weights: Weights, updates: Sequence[ClientUpdate]) -> Weights:
        """The next global weights from the current ones and the round's updates."""


class FedAvg(Strategy):
    """McMahan et al. 2017: add the example-weighted mean of the updates.

    Sums run in float64 in the order the updates were received, so the same
    updates in the same order always give bit-identical weights.
    """

    name = "fedavg"

    def aggregate(self, weights: Weights, updates: Sequence[ClientUpdate]) -> Weights:
        total = sum(u.num_examples for u in updates)
        if not updates or total <= 0:
            raise ValueError("FedAvg needs at least one update with examples")
        result: Weights = {}
        for name, value in weights.items():
            acc = np.zeros(value.shape, dtype=np.float64)
            for update in updates:
                acc += update.delta[name].astype(np.float64) * (update.num_examples / total)
            result[name] = (value.astype(np.float64) + acc).astype(value.dtype)
        return result
