"""Built-in models an app can train standalone or federated (numpy reference backend)."""

from __future__ import annotations

from fedclient.protocol import ModelSpec
from fedclient.runtime import NumpyModel

__all__ = ["mlp", "softmax_regression"]


def mlp(
    inputs: int, hidden: int | list[int] = 64, classes: int = 10, *, seed: int = 0
) -> NumpyModel:
    """A ReLU multilayer perceptron; ``hidden`` is one width or a list of widths."""
    widths = [hidden] if isinstance(hidden, int) else list(hidden)
    return NumpyModel(ModelSpec("mlp", inputs, widths, classes), seed=seed)


def softmax_regression(inputs: int, classes: int, *, seed: int = 0) -> NumpyModel:
    """Multinomial logistic regression."""
    return NumpyModel(ModelSpec("softmax", inputs, [], classes), seed=seed)
