"""MobileNetV3-small as torchvision builds it (``torchvision.models.mobilenet_v3_small``),
written out so that tests and benchmarks need no torchvision: the same layers, kernel
sizes, expansions, squeeze-and-excitation blocks, activations, BatchNorm settings and
``state_dict`` names, freshly initialised as torchvision does."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["mobilenet_v3_small"]

# (input, kernel, expanded, output, squeeze-and-excite, activation, stride), torchvision's
# inverted-residual setting for the small model.
SMALL = [
    (16, 3, 16, 16, True, "RE", 2),
    (16, 3, 72, 24, False, "RE", 2),
    (24, 3, 88, 24, False, "RE", 1),
    (24, 5, 96, 40, True, "HS", 2),
    (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 120, 48, True, "HS", 1),
    (48, 5, 144, 48, True, "HS", 1),
    (48, 5, 288, 96, True, "HS", 2),
    (96, 5, 576, 96, True, "HS", 1),
    (96, 5, 576, 96, True, "HS", 1),
]


def _divisible(value: float, divisor: int = 8) -> int:
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvBNActivation(nn.Sequential):
    """Conv (no bias) -> BatchNorm (eps 0.001, momentum 0.01) -> activation (or none)."""

    def __init__(
        self,
        inputs: int,
        outputs: int,
        kernel: int,
        stride: int = 1,
        groups: int = 1,
        activation: type[nn.Module] | None = nn.Hardswish,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(
                inputs, outputs, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False
            ),
            nn.BatchNorm2d(outputs, eps=0.001, momentum=0.01),
        ]
        if activation is not None:
            layers.append(activation())
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """Global average pool -> 1x1 conv -> ReLU -> 1x1 conv -> Hardsigmoid -> rescale."""

    def __init__(self, channels: int, squeezed: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.fc2 = nn.Conv2d(squeezed, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.fc2(self.activation(self.fc1(self.avgpool(x))))
        return self.scale_activation(scale) * x  # type: ignore[no-any-return]


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise (k x k), squeeze-and-excite, project (1x1); residual when the
    shape allows."""

    def __init__(
        self, inputs: int, kernel: int, expanded: int, outputs: int, se: bool, act: str, stride: int
    ) -> None:
        super().__init__()
        activation = nn.Hardswish if act == "HS" else nn.ReLU
        self.use_res_connect = stride == 1 and inputs == outputs
        layers: list[nn.Module] = []
        if expanded != inputs:
            layers.append(ConvBNActivation(inputs, expanded, 1, activation=activation))
        layers.append(
            ConvBNActivation(expanded, expanded, kernel, stride, expanded, activation=activation)
        )
        if se:
            layers.append(SqueezeExcitation(expanded, _divisible(expanded // 4)))
        layers.append(ConvBNActivation(expanded, outputs, 1, activation=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_res_connect else out  # type: ignore[no-any-return]


class MobileNetV3(nn.Module):
    """torchvision's MobileNetV3-small (``features``, ``avgpool``, ``classifier``)."""

    def __init__(self, classes: int = 1000, channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBNActivation(channels, 16, 3, 2)]
        layers += [InvertedResidual(*row) for row in SMALL]
        layers.append(ConvBNActivation(96, 576, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(576, 1024), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(1024, classes)
        )
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, shape (n, classes)."""
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))  # type: ignore[no-any-return]


def mobilenet_v3_small(classes: int = 10, channels: int = 3, seed: int = 0) -> MobileNetV3:
    """A fresh MobileNetV3-small for ``classes`` classes (torch's generator seeded)."""
    torch.manual_seed(seed)
    return MobileNetV3(classes, channels)
