"""Pre-train the MobileNet-style network on the server's public share of MNIST.

    python pretrain.py ../../../shared/data              # writes mobilenet.pt beside this file

The server trains centrally, as usual in PyTorch (BatchNorm on batch statistics,
SGD with momentum and weight decay, a one-cycle learning rate), on ``--examples``
MNIST training images drawn with ``--seed``: the ones ``fedsim --holdout`` keeps off
the devices, so the federation never sees them. Its BatchNorm layers end with real
running statistics, which the device bundle then keeps frozen. The same arguments
give the same weights (one thread, deterministic algorithms).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from mobilenet import WEIGHTS, Net
from torch import nn

from fedclient.sim.datasets import load_dataset


def public_share(data_dir: Path, examples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The server's public share of MNIST's training images: exactly the ones ``fedsim run
    --dataset mnist --seed SEED --holdout EXAMPLES`` keeps off every device (fedclient's own
    loader and `Dataset.holdout`), as float32 (n, 1, 28, 28) in [0, 1], and their labels."""
    data = load_dataset("mnist", data_dir, seed=seed)
    x, y = data.device_data(data.holdout(examples, seed))
    return torch.from_numpy(x.reshape(-1, 1, 28, 28)), torch.from_numpy(y.astype(np.int64))


def test_set(data_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST's 10,000 test images, scaled as devices see them (for the log only)."""
    data = load_dataset("mnist", data_dir)
    x = np.asarray(data.x_test, dtype=np.float32)
    if data.x_test.dtype == np.uint8:
        x = x / np.float32(255)
    labels = torch.from_numpy(data.y_test.astype(np.int64))
    return torch.from_numpy(x.reshape(-1, 1, 28, 28)), labels


def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of ``x`` that ``net`` (in inference mode) classifies as ``y``."""
    net.eval()
    with torch.no_grad():
        return float((net(x).argmax(dim=1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Pre-train the MobileNet-style network on a public share of MNIST."
    )
    parser.add_argument("data_dir", type=Path, help="the folder holding mnist/")
    parser.add_argument(
        "--examples", type=int, default=5000, help="the public share's size (fedsim --holdout)"
    )
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=1, help="the same as fedsim's --seed")
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    x, y = public_share(args.data_dir, args.examples, args.seed)
    x_test, y_test = test_set(args.data_dir)

    net = Net()
    batch = 32
    steps = args.epochs * -(-len(x) // batch)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=steps)
    order = torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        net.train()  # BatchNorm normalises by batch statistics and updates its running ones
        total = 0.0
        for batch_indices in torch.randperm(len(x), generator=order).split(batch):
            loss = nn.functional.cross_entropy(net(x[batch_indices]), y[batch_indices])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(batch_indices)
        print(
            f"epoch {epoch}  loss {total / len(x):.4f}  MNIST test accuracy "
            f"{accuracy(net, x_test, y_test):.4f}  ({time.perf_counter() - started:.0f} s)"
        )
    torch.save(net.state_dict(), args.out)
    print(f"wrote {args.out} ({len(x)} public examples, seed {args.seed})")


if __name__ == "__main__":
    main()
