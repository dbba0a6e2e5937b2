"""fedsim's framework time per client-round: W3 through fedsim beside the plain numpy loop.

    python bench/overhead.py                     # W3: MNIST, 10,000 devices, 1,000 a round
    python bench/overhead.py --repeats 3         # alternate the two, three times each
    python bench/overhead.py --data-dir ../shared/data

W3 (`bench/vs_flower.py`): MNIST softmax regression 784-10 from zeros, 10,000
devices IID (fedsim's partition and seed), 1,000 a round, 5 rounds, 1 local epoch,
batch 10, lr 0.1, FedAvg weighted by examples, the test set evaluated after every
round. The numpy loop does exactly that work and nothing else: no server, no
protocol, no state. Both run as subprocesses, alternated, each timed from launch to
exit ("process s"); inside, the numpy loop times its rounds and fedsim reports its
own ``final.wall_seconds`` ("in-run s"); each process's CPU time (user + sys) too,
which a loaded machine distorts less. Printed: both, their ratios, and fedsim's
framework time per client-round, (fedsim - numpy) / (devices a round x rounds).
fedsim runs with ``--quiet --no-plot``, as the done-when check does; decompressing
MNIST is cached and the packages byte-compiled before the first timed run. The load
average is printed before and after: on a shared machine, quote ratios from one run.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared/data"
FEDSIM = Path(sys.executable).with_name("fedsim")
W3 = {"devices": 10_000, "per_round": 1000, "rounds": 5, "epochs": 1, "batch": 10, "lr": 0.1}


def numpy_loop(data_dir: str, seed: int) -> dict[str, float]:
    """W3 as a plain numpy loop; returns its accuracy and the seconds its rounds took."""
    from fedclient.sim.datasets import load_dataset, partition

    data = load_dataset("mnist", data_dir, seed=seed)
    parts = partition(data.y_train, W3["devices"], "iid", np.random.default_rng(seed))
    started = time.perf_counter()
    weights = np.zeros((10, 784), dtype=np.float32)  # (out, in), as PyTorch lays it out
    bias = np.zeros(10, dtype=np.float32)
    rng = np.random.default_rng([seed, 1])
    accuracy = 0.0
    for _ in range(W3["rounds"]):
        chosen = rng.permutation(W3["devices"])[: W3["per_round"]]
        sum_w, sum_b, total = np.zeros_like(weights), np.zeros_like(bias), 0
        for device in chosen:
            x, y = data.device_data(parts[device])
            w, b = weights.copy(), bias.copy()
            for _ in range(W3["epochs"]):
                order = rng.permutation(len(y))
                for start in range(0, len(y), W3["batch"]):
                    idx = order[start : start + W3["batch"]]
                    z = x[idx] @ w.T + b
                    z -= z.max(axis=1, keepdims=True)
                    p = np.exp(z)
                    p /= p.sum(axis=1, keepdims=True)
                    p[np.arange(len(idx)), y[idx]] -= 1.0
                    p /= len(idx)
                    w -= W3["lr"] * (p.T @ x[idx])
                    b -= W3["lr"] * p.sum(axis=0)
            sum_w += len(y) * w
            sum_b += len(y) * b
            total += len(y)
        weights, bias = sum_w / total, sum_b / total
        predicted = (data.x_test @ weights.T + bias).argmax(axis=1)
        accuracy = float((predicted == data.y_test).mean())
    return {"seconds": time.perf_counter() - started, "accuracy": accuracy}


def fedsim_argv(data_dir: str, seed: int, report: Path) -> list[str]:
    """The done-when ``scale-10x`` line (W3), with its report at ``report``."""
    return [
        str(FEDSIM), "run", "--dataset", "mnist", "--data-dir", data_dir,
        "--devices", str(W3["devices"]), "--devices-per-round", str(W3["per_round"]),
        "--rounds", str(W3["rounds"]), "--partition", "iid", "--seed", str(seed),
        "--epochs", str(W3["epochs"]), "--batch-size", str(W3["batch"]),
        "--learning-rate", str(W3["lr"]), "--model", "softmax", "--no-plot", "--quiet",
        "--report", str(report),
    ]  # fmt: skip


def timed(argv: list[str]) -> tuple[float, float, str]:
    """Run ``argv``; its wall seconds from launch to exit, its CPU seconds (user + sys),
    and its stdout."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--numpy-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.numpy_only:
        print(json.dumps(numpy_loop(args.data_dir, args.seed)))
        return 0
    client_rounds = W3["per_round"] * W3["rounds"]
    # Untimed: bytecode for the packages, even where PYTHONDONTWRITEBYTECODE is set
    # (every run would compile ~70 modules again: ~0.3 s of fedsim's start-up).
    compileall.compile_dir(Path(__file__).resolve().parents[1] / "fedclient", quiet=1)
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "w3.json"
        # Untimed: fills fedsim's cache of the decompressed MNIST files for both.
        subprocess.run([*fedsim_argv(args.data_dir, args.seed, report)[:-8], "--rounds", "1",
                        "--devices-per-round", "10", "--quiet", "--no-plot",
                        "--report", str(report)], check=True, capture_output=True)  # fmt: skip
        print(f"load average before: {os.getloadavg()[0]:.2f}")
        rows = []
        for _ in range(args.repeats):
            numpy_process, numpy_cpu, out = timed(
                [sys.executable, __file__, "--numpy-only", "--data-dir", args.data_dir,
                 "--seed", str(args.seed)]
            )  # fmt: skip
            loop = json.loads(out.strip().splitlines()[-1])
            fedsim_process, fedsim_cpu, _ = timed(fedsim_argv(args.data_dir, args.seed, report))
            final = json.loads(report.read_text())["final"]
            rows.append((numpy_process, numpy_cpu, loop, fedsim_process, fedsim_cpu, final))
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(
        "numpy process s (cpu s) | numpy loop s | fedsim process s (cpu s) | fedsim in-run s | "
        "ratio process (cpu) | ratio in-run | framework ms/client-round process (cpu) | "
        "accuracy numpy / fedsim"
    )
    for numpy_process, numpy_cpu, loop, fedsim_process, fedsim_cpu, final in rows:
        in_run = final["wall_seconds"]
        print(
            f"{numpy_process:.2f} ({numpy_cpu:.2f}) | {loop['seconds']:.2f} | "
            f"{fedsim_process:.2f} ({fedsim_cpu:.2f}) | {in_run:.2f} | "
            f"{fedsim_process / numpy_process:.1f}x ({fedsim_cpu / numpy_cpu:.1f}x) | "
            f"{in_run / loop['seconds']:.1f}x | "
            f"{1000 * (fedsim_process - numpy_process) / client_rounds:.2f} "
            f"({1000 * (fedsim_cpu - numpy_cpu) / client_rounds:.2f}) | "
            f"{loop['accuracy']:.4f} / {final['accuracy']:.4f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
