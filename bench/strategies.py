"""Every aggregation strategy on the same non-IID federation (same data split, same seed).

    .venv/bin/python bench/strategies.py [--rounds 40] [--target 0.9] [--alpha 0.3]

Prints each strategy's final accuracy, its best accuracy, and the first round at
which the global model reached the target accuracy on the held-out test set.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from threadpoolctl import threadpool_limits

from fedclient.sim.engine import SimulationConfig, simulate

STRATEGIES = [
    ("fedavg", {}),
    ("fedprox", {"proximal_mu": 0.1}),
    ("fedavgm", {"strategy": "fedavgm", "server_learning_rate": 0.5}),
    ("fedadam", {"strategy": "fedadam"}),
    ("fedyogi", {"strategy": "fedyogi"}),
    ("fedadagrad", {"strategy": "fedadagrad"}),
    ("median", {"strategy": "median"}),
    ("trimmed_mean", {"strategy": "trimmed_mean"}),
    ("norm_bound", {"strategy": "norm_bound"}),
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--alpha", type=float, default=0.3, help="Dirichlet concentration")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(
        f"digits, 100 devices, Dirichlet({args.alpha}), 20 a round, {args.rounds} rounds, "
        f"5 local epochs, batch 8, lr 0.1, seed {args.seed}; target accuracy {args.target}"
    )
    print(f"{'strategy':<14}{'final acc':>10}{'best acc':>10}{'rounds to target':>18}{'wall s':>8}")
    for label, overrides in STRATEGIES:
        config = SimulationConfig(
            dataset="digits",
            devices=100,
            devices_per_round=20,
            rounds=args.rounds,
            partition=f"dirichlet:{args.alpha}",
            seed=args.seed,
            **overrides,
        )
        started = time.perf_counter()
        with threadpool_limits(limits=1):
            report = asyncio.run(simulate(config))
        accuracies = [r["accuracy"] for r in report["rounds"]]
        reached = next((r["round"] for r in report["rounds"] if r["accuracy"] >= args.target), None)
        print(
            f"{label:<14}{accuracies[-1]:>10.4f}{max(accuracies):>10.4f}"
            f"{reached if reached is not None else '-':>18}"
            f"{time.perf_counter() - started:>8.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
