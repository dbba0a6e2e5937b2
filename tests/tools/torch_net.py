"""A small PyTorch CNN for the fedconvert tests (imported only where torch is installed)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional


class Net(nn.Module):
    """conv 3x3 -> ReLU -> max-pool 2x2 -> linear, for 1x8x8 images and 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = functional.max_pool2d(functional.relu(self.conv(x)), 2)
        return self.fc(torch.flatten(x, 1))  # type: ignore[no-any-return]
