"""Shakespeare next-character prediction: a small transformer federated by role through ONNX
Runtime, against the same model trained centrally on as many examples.

    python bench/shakespeare.py --data-dir ../shared/data [--rounds 20] [--workers 2]

1. ``fedconvert`` turns examples/shakespeare/charformer.py (a one-layer transformer
   whose head also sees the last 8 characters through a hidden layer, 212,112
   parameters, token-id input; ``--width``, ``--layers``, ``--recent`` and
   ``--head-hidden`` change it) into a device bundle, verified against PyTorch on
   both engines.
2. ``fedsim`` federates it: one device per (play, role) (LEAF's natural partition),
   each keeping at most ``--max-examples`` of its training windows; devices train
   with the bundle's SGD through ONNX Runtime (``--engine``: the step graph by
   default, 2.6x the training API's speed on this model); the server aggregates with
   ``--strategy``. The global model's next-character accuracy on a sample of the
   devices' held-out windows is printed after every round.
3. The same model, from the same initial weights, trains centrally in PyTorch with
   the devices' optimiser (plain SGD, their learning rate and batch size) on the
   union of the devices' training windows, shuffled, for as many examples as the
   federation trained on; it is evaluated on the same held-out windows.

The last line is ``shakespeare federated_accuracy=A central_accuracy=C examples=N
rounds=R devices=D wall_s=W``. Needs torch (conversion and the central run) and the
onnx extra.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parent / "examples" / "shakespeare"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", required=True, help="folder holding shakespeare/")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--devices-per-round", type=int, default=20)
    parser.add_argument("--max-examples", type=int, default=400, help="windows a device keeps")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=0.25)
    parser.add_argument("--strategy", default="fedadam")
    parser.add_argument("--server-learning-rate", type=float, default=0.03)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--workers", type=int, default=0, help="fedsim's training processes (0: one per CPU)"
    )
    parser.add_argument(
        "--engine",
        choices=("training", "plain"),
        default="plain",
        help="ONNX Runtime engine (the same SGD step; the step graph is the faster here)",
    )
    model = parser.add_argument_group("the model (default: charformer.Net's defaults)")
    model.add_argument("--width", type=int, help="the transformer's width (its MLP's: twice)")
    model.add_argument("--layers", type=int, help="encoder layers")
    model.add_argument("--head-hidden", type=int, help="the head's hidden layer (0: none)")
    model.add_argument("--recent", type=int, help="last characters the head sees")
    parser.add_argument("--central-threads", type=int, default=1, help="torch's, central run")
    parser.add_argument("--out", help="keep the bundle, plan and report here")
    return parser


def _plan(args: argparse.Namespace, bundle: Path) -> str:
    return f"""[job]
name = "shakespeare"
rounds = {args.rounds}
devices_per_round = {args.devices_per_round}
min_devices = {max(1, args.devices_per_round // 2)}
over_selection = 1.0
seed = {args.seed}

[model]
kind = "bundle"
bundle = "{bundle}"

[train]
epochs = {args.epochs}
batch_size = {args.batch_size}
learning_rate = {args.learning_rate}

[strategy]
name = "{args.strategy}"
server_learning_rate = {args.server_learning_rate}
"""


def federate(args: argparse.Namespace, out: Path) -> tuple[dict[str, Any], Path]:
    """Convert the model, federate it with fedsim; the report and the bundle."""
    from threadpoolctl import threadpool_limits

    from fedclient.convert.cli import main as fedconvert
    from fedclient.sim.engine import SimulationConfig, simulate

    bundle = out / "bundle"
    sys.path.insert(0, str(EXAMPLE))
    started = time.perf_counter()
    (out / "shakespeare_model.py").write_text(
        "import charformer\n\n\ndef Net():\n"
        f"    return charformer.Net(**{_model_settings(args)!r})\n"
    )
    model = f"{out / 'shakespeare_model.py'}:Net"
    argv = [model, "--input-shape", "80", "--input-dtype", "int64", "-o", str(bundle)]
    if fedconvert(argv) != 0:
        raise SystemExit("fedconvert failed")
    print(f"converted in {time.perf_counter() - started:.1f} s", flush=True)
    plan = out / "plan.toml"
    plan.write_text(_plan(args, bundle))
    config = SimulationConfig(
        dataset="shakespeare",
        data_dir=args.data_dir,
        plan_file=str(plan),
        partition="natural",
        max_examples=args.max_examples,
        runtime="onnx",
        seed=args.seed,
        workers=args.workers,
    )
    seen = 0

    def on_round(r: dict[str, Any]) -> None:
        nonlocal seen
        seen += r["examples"]
        print(
            f"round {r['round']:>3}  accuracy {r['accuracy']:.4f}  examples {seen:>7}  "
            f"updates {r['updates']}  wall {r['wall_seconds']:.0f}s",
            flush=True,
        )

    with threadpool_limits(limits=1):
        report = asyncio.run(simulate(config, on_round))
    return report, bundle


def _model_settings(args: argparse.Namespace) -> dict[str, int]:
    """charformer.Net's settings given on the command line."""
    given = {"layers": args.layers, "head_hidden": args.head_hidden, "recent": args.recent}
    if args.width is not None:
        given.update(width=args.width, hidden=2 * args.width)
    return {name: value for name, value in given.items() if value is not None}


def central(args: argparse.Namespace, examples: int, checkpoints: int) -> list[tuple[int, float]]:
    """The same model trained in PyTorch on the union of the devices' training windows, for
    ``examples`` examples of SGD; its accuracy at ``checkpoints`` points on the way."""
    import torch

    from fedclient.sim.datasets import load_dataset, partition
    from fedclient.sim.fleet import keep_at_most

    sys.path.insert(0, str(EXAMPLE))
    import charformer

    data = load_dataset("shakespeare", args.data_dir, seed=args.seed)
    parts = partition(data.y_train, 0, "natural", np.random.default_rng(args.seed), data.users)
    union = np.concatenate(keep_at_most(parts, args.max_examples, args.seed))
    model = charformer.Net(**_model_settings(args))
    optimiser = torch.optim.SGD(model.parameters(), lr=args.learning_rate)
    x_test = torch.from_numpy(data.x_test.astype(np.int64))
    y_test = torch.from_numpy(data.y_test)
    rng = np.random.default_rng([args.seed, 0xCE])
    order = np.empty(0, dtype=np.int64)
    marks = set(np.linspace(0, examples, checkpoints + 1, dtype=int)[1:].tolist())
    curve: list[tuple[int, float]] = []
    done = 0
    while done < examples:
        if len(order) < args.batch_size:  # a new epoch over the union, reshuffled
            order = np.concatenate([order, rng.permutation(union)])
        take = min(args.batch_size, examples - done)
        batch, order = order[:take], order[take:]
        x, y = data.device_data(batch)
        loss = torch.nn.functional.cross_entropy(
            model(torch.from_numpy(x.astype(np.int64))), torch.from_numpy(y)
        )
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        before, done = done, done + take
        if any(before < m <= done for m in marks):
            with torch.no_grad():
                accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
            curve.append((done, accuracy))
            print(f"central examples {done:>7}  accuracy {accuracy:.4f}", flush=True)
    return curve


def main() -> None:
    """Run both trainings and print the figures."""
    args = _parser().parse_args()
    started = time.perf_counter()
    if args.engine:
        os.environ["FEDCLIENT_ONNX_ENGINE"] = args.engine
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(args.out) if args.out else Path(scratch)
        out.mkdir(parents=True, exist_ok=True)
        report, _ = federate(args, out)
    final = report["final"]
    examples, federated = int(final["examples"]), float(final["accuracy"])
    fed_wall = time.perf_counter() - started
    import torch

    # One thread: on a shared machine, a second one mostly waits for the first.
    torch.set_num_threads(args.central_threads)
    curve = central(args, examples, checkpoints=4)
    wall = time.perf_counter() - started
    print(f"federated wall {fed_wall:.0f} s, central wall {wall - fed_wall:.0f} s")
    print(
        f"shakespeare federated_accuracy={federated:.4f} central_accuracy={curve[-1][1]:.4f} "
        f"examples={examples} rounds={final['rounds_completed']} devices={final['devices']} "
        f"wall_s={wall:.0f}"
    )


if __name__ == "__main__":
    main()
