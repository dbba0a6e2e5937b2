"""Synthetic(alpha, beta): a fleet's data drawn per device, on demand, from its id and the seed.

After the data set of Shamir et al. 2014 that LEAF and FedProx (Li et al. 2020)
use: 60 features, 10 classes, each device its own softmax model and its own
feature distribution. Device ``k``:

    u_k ~ N(0, alpha)    W_k = W + N(u_k, alpha)  (60 x 10)    b_k = b + N(u_k, alpha)  (10)
    B_k ~ N(0, beta)     v_k ~ N(B_k, 1)  (60)
    x ~ N(v_k, diag(j ** -1.2 for j = 1..60))        y = argmax(x W_k + b_k)

where ``W`` and ``b`` (entries N(0, 1)) are drawn once from the seed and shared by
every device. That shared model is this module's one change to FedProx's
generator, whose ``W_k ~ N(u_k, 1)`` share nothing: with FedProx's 30 devices a
global model can learn each of them, with millions it could not learn anything
that holds on devices it never saw (the test set's). ``alpha`` sets how far the
devices' models stray from the shared one, ``beta`` how much their features
differ: ``synthetic:0,0`` gives every device the same model (features still
differ per device); ``synthetic`` alone is Synthetic(1, 1). How many examples
device ``k`` holds follows a power law (as in LEAF): a Pareto tail of exponent
`SIZE_EXPONENT` above `MIN_EXAMPLES`, capped at `MAX_EXAMPLES` (median ~32, mean ~55).

Nothing is stored per device: everything above comes from a generator seeded with
``(seed, k)``, so fifteen million registered devices cost no arrays, and device
``k`` holds the same examples whenever (and on whichever process) it is asked.
The test set is the held-out examples of devices 0 to `TEST_DEVICES` - 1 (fresh
features from their own distributions, `TEST_PER_DEVICE` each), whatever the size
of the fleet.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedclient._exceptions import InvalidInput

__all__ = [
    "CLASSES",
    "FEATURES",
    "MAX_EXAMPLES",
    "MIN_EXAMPLES",
    "SIZE_EXPONENT",
    "TEST_DEVICES",
    "TEST_PER_DEVICE",
    "SyntheticDevices",
]

FEATURES = 60
CLASSES = 10
MIN_EXAMPLES = 20
MAX_EXAMPLES = 1000
SIZE_EXPONENT = 1.5
TEST_DEVICES = 200
TEST_PER_DEVICE = 50

#: The random streams (with the run's seed and the device's id) that draw a device's
#: model and training examples, and its held-out examples.
_STREAM, _HELD_OUT = 0x5E7, 1

_SCALE = np.power(np.arange(1, FEATURES + 1, dtype=np.float64), -1.2) ** 0.5


@dataclass(frozen=True)
class SyntheticDevices:
    """Synthetic(alpha, beta) for the run's seed: any device's data, when asked."""

    alpha: float = 1.0
    beta: float = 1.0
    seed: int = 0
    shared: tuple[np.ndarray, np.ndarray] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng([self.seed, _STREAM])
        shared = (rng.normal(0.0, 1.0, (FEATURES, CLASSES)), rng.normal(0.0, 1.0, CLASSES))
        object.__setattr__(self, "shared", shared)

    @classmethod
    def parse(cls, name: str, seed: int) -> SyntheticDevices:
        """``synthetic`` (alpha = beta = 1) or ``synthetic:ALPHA,BETA``."""
        _, _, arg = name.partition(":")
        if not arg:
            return cls(seed=seed)
        try:
            alpha, beta = (float(v) for v in arg.split(","))
        except ValueError:
            raise InvalidInput(f"--dataset {name}: use synthetic or synthetic:ALPHA,BETA") from None
        if alpha < 0 or beta < 0:
            raise InvalidInput(f"--dataset {name}: alpha and beta must be 0 or more")
        return cls(alpha, beta, seed)

    def _generator(self, device: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _STREAM, device])

    def _size(self, rng: np.random.Generator) -> int:
        tail = MIN_EXAMPLES * (1.0 - rng.random()) ** (-1.0 / SIZE_EXPONENT)
        return int(min(MAX_EXAMPLES, tail))

    def size(self, device: int) -> int:
        """How many training examples ``device`` holds (its first draw)."""
        return self._size(self._generator(device))

    def _model(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        u = rng.normal(0.0, self.alpha)
        b_mean = rng.normal(0.0, self.beta)
        shared_weights, shared_bias = self.shared
        weights = shared_weights + rng.normal(u, self.alpha, (FEATURES, CLASSES))
        bias = shared_bias + rng.normal(u, self.alpha, CLASSES)
        centre = rng.normal(b_mean, 1.0, FEATURES)
        return weights, bias, centre

    @staticmethod
    def _examples(
        rng: np.random.Generator,
        count: int,
        model: tuple[np.ndarray, np.ndarray, np.ndarray],
    ) -> tuple[np.ndarray, np.ndarray]:
        weights, bias, centre = model
        x = centre + rng.standard_normal((count, FEATURES)) * _SCALE
        y = np.argmax(x @ weights + bias, axis=1).astype(np.int64)
        return x.astype(np.float32), y

    def device_data(self, device: int) -> tuple[np.ndarray, np.ndarray]:
        """Device ``device``'s training examples (float32 features, int64 labels)."""
        rng = self._generator(device)
        count = self._size(rng)
        return self._examples(rng, count, self._model(rng))

    def held_out(self, device: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """``count`` examples of ``device``'s distribution that it never trains on."""
        rng = self._generator(device)
        self._size(rng)
        model = self._model(rng)
        return self._examples(
            np.random.default_rng([self.seed, _STREAM, device, _HELD_OUT]), count, model
        )

    def test_set(self) -> tuple[np.ndarray, np.ndarray]:
        """The central test set: devices 0..TEST_DEVICES-1's held-out examples."""
        parts = [self.held_out(k, TEST_PER_DEVICE) for k in range(TEST_DEVICES)]
        return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])
