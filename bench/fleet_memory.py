"""Memory of a registered virtual device that has not yet taken part, and of a fleet.

    python bench/fleet_memory.py                  # 100,000 devices, phones preset
    python bench/fleet_memory.py --devices 1000000 --fleet diurnal

Builds the fleet as ``fedsim run`` does (a partition of the training set, the
profiles drawn from the preset, one `Device` record per device) and prints what
tracemalloc saw it allocate, in total and per device, next to the issue's budget
(100,000 devices in 2 GB). Random labels stand in for the data set, which is
shared by the fleet, not held per device: six examples a device by default (MNIST
over 10,000 devices). A device that took part also keeps its state (its last
model, its receipts) in SQLite, in memory unless ``--state-dir``: about the
model's size plus a few kB (~36 kB for MNIST's softmax).
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from fedclient.sim.datasets import partition
from fedclient.sim.devices import draw_profiles
from fedclient.sim.fleet import Device

BUDGET_BYTES = 2 * 1024**3  # the issue's: 100,000 registered devices in 2 GB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--examples", type=int, help="training examples (default 6 per device)")
    parser.add_argument("--fleet", default="phones")
    parser.add_argument("--partition", default="iid")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    examples = args.examples or 6 * args.devices
    y = np.random.default_rng(args.seed).integers(0, 10, examples)

    tracemalloc.start()
    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    parts = partition(y, args.devices, args.partition, rng)
    profiles = draw_profiles(len(parts), rng, args.fleet)
    devices = [Device(i, profiles[i], part) for i, part in enumerate(parts)]
    seconds = time.perf_counter() - started
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    per = held / len(devices)
    print(
        f"{len(devices):,} idle devices ({args.fleet}, {args.partition}, {examples:,} examples): "
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
