"""Memory of the registered fleet: devices that have not worked yet, as fedsim holds them.

    python bench/fleet_memory.py                  # 100,000 devices, phones preset
    python bench/fleet_memory.py --devices 1000000 --fleet diurnal
    python bench/fleet_memory.py --devices 15000000 --dataset synthetic

Registers the fleet as ``fedsim run`` does (`fedclient.sim.registry.register_devices`:
the partition of the training set, the profiles as columns) and prints what
tracemalloc saw it allocate, in total and per device, next to the budget of issue
11 (100,000 devices in 2 GB). Random labels stand in for a partitioned data set,
which is shared by the fleet, not held per device: six examples a device by default
(MNIST over 10,000 devices); ``--dataset synthetic`` has no partition to hold (each
device's data is drawn when it works). A device that took part also keeps its state
(its last model, its receipts) in SQLite, in memory unless ``--state-dir``: about
the model's size plus a few kB (~36 kB for MNIST's softmax).
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from fedclient.sim.config import SimulationConfig
from fedclient.sim.datasets import Dataset, load_dataset
from fedclient.sim.registry import register_devices

BUDGET_BYTES = 2 * 1024**3  # the issue's: 100,000 registered devices in 2 GB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--examples", type=int, help="training examples (default 6 per device)")
    parser.add_argument("--fleet", default="phones")
    parser.add_argument("--partition", default="iid")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dataset", choices=("labels", "synthetic"), default="labels")
    args = parser.parse_args(argv)
    examples = args.examples or 6 * args.devices
    if args.dataset == "synthetic":
        data = load_dataset("synthetic", seed=args.seed)
        examples = 0
    else:
        y = np.random.default_rng(args.seed).integers(0, 10, examples)
        empty = np.zeros((examples, 1), dtype=np.uint8)  # a byte a row: no features
        data = Dataset("mnist", empty, y, empty[:0], y[:0], 10)  # its defaults
    config = SimulationConfig(
        dataset=args.dataset,
        devices=args.devices,
        partition="iid" if args.dataset == "synthetic" else args.partition,
        seed=args.seed,
        fleet=args.fleet,
        model="softmax",
    )
    plan = config.plan(data)

    tracemalloc.start()
    started = time.perf_counter()
    devices = register_devices(config, plan, data)
    seconds = time.perf_counter() - started
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    per = held / len(devices)
    print(
        f"{len(devices):,} idle devices ({args.fleet}, {args.dataset}, {args.partition}, "
        f"{examples:,} examples): "
        f"{held / 2**20:.1f} MB held, {peak / 2**20:.1f} MB at the peak, "
        f"{per:,.0f} bytes a device, built in {seconds:.2f} s"
    )
    print(
        f"100,000 such devices: {100_000 * per / 2**20:,.0f} MB "
        f"({100_000 * per / BUDGET_BYTES:.1%} of the 2 GB budget)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
