"""A MobileNet-style classifier for 28 x 28 grey-scale digits, and its pre-trained copy.

    input (n, 1, 28, 28)
    conv 3x3 stride 2 -> BatchNorm -> Hardswish                      (n, 32, 14, 14)
    depthwise-separable block, stride 1, ReLU6                       (n, 64, 14, 14)
    depthwise-separable block, stride 2, Hardswish                   (n, 128, 7, 7)
    depthwise-separable block, stride 2, Hardswish                   (n, 128, 4, 4)
    global average pooling -> linear                                 (n, 10)

A depthwise-separable block is a 3x3 depthwise conv -> BatchNorm -> ReLU6, then a
1x1 pointwise conv -> BatchNorm -> the block's activation (MobileNetV1/V3).

``fedconvert mobilenet:pretrained --input-shape 1,28,28 --freeze features.`` turns
the pre-trained copy (``pretrain.py`` writes its weights) into a device bundle.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["WEIGHTS", "Net", "pretrained"]

#: Where ``pretrain.py`` writes the pre-trained state dict and `pretrained` reads it.
WEIGHTS = Path(__file__).with_name("mobilenet.pt")


def _conv_bn(
    inputs: int, outputs: int, kernel: int, stride: int, groups: int, activation: type[nn.Module]
) -> list[nn.Module]:
    # The convs keep PyTorch's default bias: with none (or a zero one), MNIST's blank
    # background makes a ReLU6's input exactly 0, where ONNX Runtime's training API
    # passes a gradient and PyTorch does not, and fedconvert's check fails.
    return [
        nn.Conv2d(inputs, outputs, kernel, stride=stride, padding=kernel // 2, groups=groups),
        nn.BatchNorm2d(outputs),
        activation(),
    ]


def _separable(
    inputs: int, outputs: int, stride: int, activation: type[nn.Module]
) -> list[nn.Module]:
    return [
        *_conv_bn(inputs, inputs, 3, stride, inputs, nn.ReLU6),  # depthwise
        *_conv_bn(inputs, outputs, 1, 1, 1, activation),  # pointwise
    ]


class Net(nn.Module):
    """The MobileNet-style network above, freshly initialised (PyTorch's defaults, seed 0).

    ``features`` is the backbone (what ``--freeze features.`` keeps fixed on devices)
    and ``head`` the linear classifier on its 128 pooled features.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            *_conv_bn(1, 32, 3, 2, 1, nn.Hardswish),
            *_separable(32, 64, 1, nn.ReLU6),
            *_separable(64, 128, 2, nn.Hardswish),
            *_separable(128, 128, 2, nn.Hardswish),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, shape (n, 10), of images shaped (n, 1, 28, 28) with pixels in [0, 1]."""
        return self.head(self.features(x))  # type: ignore[no-any-return]


def pretrained(weights: str | Path = WEIGHTS) -> Net:
    """`Net` with the weights and BatchNorm statistics ``pretrain.py`` wrote."""
    net = Net()
    net.load_state_dict(torch.load(weights, weights_only=True))
    return net
