"""Per-epoch device training time: the numpy backend vs ONNX Runtime, same model, same data.

    python bench/runtimes.py [--data-dir ../shared/data] [--repeats 5]

Each row trains one epoch of minibatch SGD on one device-sized shard (the
median over ``--repeats`` runs, after one warm-up epoch), plus the one-off cost
of loading the ONNX bundle (built once and cached beforehand). MNIST rows need
``--data-dir``. One thread per session, as on a device.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedclient.protocol import ModelSpec
from fedclient.runtime import (
    CnnShape,
    NumpyCnn,
    NumpyModel,
    OnnxBackend,
    TrainingBackend,
    write_bundle,
)
from fedclient.runtime._graphs import cnn_graph
from fedclient.sim.datasets import Dataset, load_dataset


def _epoch_ms(
    model: TrainingBackend, x: np.ndarray, y: np.ndarray, batch: int, repeats: int
) -> float:
    rng = np.random.default_rng(0)
    model.train(x, y, epochs=1, batch_size=batch, learning_rate=0.05, rng=rng)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.train(x, y, epochs=1, batch_size=batch, learning_rate=0.05, rng=rng)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _row(
    name: str,
    data: Dataset,
    examples: int,
    batch: int,
    numpy_model: Callable[[], TrainingBackend],
    onnx_model: Callable[[], OnnxBackend],
    repeats: int,
) -> str:
    x, y = data.device_data(np.arange(examples))
    start = time.perf_counter()
    onnx = onnx_model()
    load_ms = (time.perf_counter() - start) * 1e3
    numpy_ms = _epoch_ms(numpy_model(), x, y, batch, repeats)
    onnx_ms = _epoch_ms(onnx, x, y, batch, repeats)
    return (
        f"| {name} | {examples} | {batch} | {numpy_ms:.2f} | {onnx_ms:.2f} | "
        f"{numpy_ms / onnx_ms:.1f}x | {load_ms:.0f} |"
    )


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", help="folder holding mnist/ (adds the MNIST rows)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print("| model | examples | batch | numpy ms/epoch | onnx ms/epoch | speed-up | onnx load ms |")
    print("|---|---|---|---|---|---|---|")
    digits = load_dataset("digits")
    mlp = ModelSpec("mlp", 64, [64], 10)
    for examples in (14, 100, 1437):
        print(
            _row(
                "digits mlp 64-64-10",
                digits,
                examples,
                8,
                lambda: NumpyModel(mlp),
                lambda: OnnxBackend.for_spec(mlp),
                args.repeats,
            )
        )
    if args.data_dir:
        mnist = load_dataset("mnist", args.data_dir)
        softmax = ModelSpec("softmax", 784, [], 10)
        print(
            _row(
                "mnist softmax",
                mnist,
                600,
                10,
                lambda: NumpyModel(softmax),
                lambda: OnnxBackend.for_spec(softmax),
                args.repeats,
            )
        )
        shape = CnnShape(side=28, classes=10)
        with tempfile.TemporaryDirectory() as scratch:
            bundle = Path(scratch)
            write_bundle(cnn_graph(shape, NumpyCnn(shape).get_weights()), bundle, name="cnn")
            print(
                _row(
                    "mnist cnn 8-16",
                    mnist,
                    600,
                    10,
                    lambda: NumpyCnn(shape),
                    lambda: OnnxBackend(bundle),
                    max(1, args.repeats // 2),
                )
            )


if __name__ == "__main__":
    main()
