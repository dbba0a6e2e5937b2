"""``fedsim``: simulate a fleet of devices federating against the real server.

    fedsim run --dataset digits --devices 100 --devices-per-round 20 --rounds 40 \\
               --partition dirichlet:0.5 --seed 1 --report runs/digits.json
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from fedclient._exceptions import FedError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedsim", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a simulated federation")
    run.add_argument("--dataset", default="digits", help="digits (bundled) or mnist")
    run.add_argument("--data-dir", help="folder holding the data files (e.g. ../shared/data)")
    run.add_argument("--devices", type=int, default=100)
    run.add_argument("--devices-per-round", type=int, default=20)
    run.add_argument("--rounds", type=int, default=40)
    run.add_argument("--partition", default="iid", help="iid | dirichlet:ALPHA | shards:K")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--fleet", default="phones", help="device profile preset: phones | uniform")
    run.add_argument("--epochs", type=int)
    run.add_argument("--batch-size", type=int)
    run.add_argument("--learning-rate", type=float)
    run.add_argument("--min-devices", type=int)
    run.add_argument(
        "--over-selection",
        type=float,
        default=1.0,
        help="admit this many times --devices-per-round; the round closes when "
        "--devices-per-round updates arrived, so the slowest are cut (default 1.0)",
    )
    run.add_argument("--deadline-seconds", type=float, default=600.0)
    run.add_argument("--server", help="a running fedserver's base URL (default: in-process)")
    run.add_argument("--job", help="job name (default: the dataset's name)")
    run.add_argument("--state-dir", help="keep the devices' SQLite state here")
    run.add_argument(
        "--model",
        choices=("softmax", "mlp", "cnn"),
        help="model architecture (default: the data set's: digits mlp, mnist softmax, femnist mlp)",
    )
    run.add_argument(
        "--runtime",
        default="numpy",
        choices=("numpy", "onnx"),
        help="the devices' training backend (onnx needs the onnx extra; default numpy)",
    )
    run.add_argument(
        "--faults",
        help="inject network faults under every device, e.g. "
        "drop=0.3 (30%% of requests fail, every way) or lost=0.1,reset=0.05",
    )
    run.add_argument(
        "--report",
        default="fedsim-report.json",
        help="JSON report path; the plot goes beside it (.png)",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar or per-round lines")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedsim`` command."""
    args = _parser().parse_args(argv)
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
        from threadpoolctl import threadpool_limits

        from simulator.engine import SimulationConfig, simulate
        from simulator.report import write_report
    except ImportError as exc:
        print(f"fedsim needs the sim extra: pip install 'fedclient[sim]' ({exc})", file=sys.stderr)
        return 2
    config = SimulationConfig(
        dataset=args.dataset,
        data_dir=args.data_dir,
        devices=args.devices,
        devices_per_round=args.devices_per_round,
        rounds=args.rounds,
        partition=args.partition,
        seed=args.seed,
        fleet=args.fleet,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        min_devices=args.min_devices,
        over_selection=args.over_selection,
        deadline_seconds=args.deadline_seconds,
        server=args.server,
        job=args.job,
        state_dir=args.state_dir,
        faults=args.faults,
        runtime=args.runtime,
        model=args.model,
    )
    console = Console(stderr=True, quiet=args.quiet)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("rounds", total=config.rounds)

        def on_round(r: dict[str, Any]) -> None:
            progress.console.print(
                f"round {r['round']:>4}  accuracy {r['accuracy']:.4f}  loss {r['loss']:.4f}  "
                f"updates {r['updates']}/{r['admitted']}  {r['status']}  "
                f"sim {r['simulated_seconds']:.0f}s  wall {r['wall_seconds']:.1f}s"
            )
            progress.update(task, advance=1, description=f"accuracy {r['accuracy']:.3f}")

        try:
            # Device models are small: BLAS threads only contend (a 10x784 @ 784x200
            # product takes 0.17 ms on one thread and up to 15 ms on two busy cores).
            with threadpool_limits(limits=1):
                report = asyncio.run(simulate(config, on_round))
        except FedError as exc:
            console.print(f"[red]fedsim: {exc}[/red]")
            return exc.exit_code
    json_path, png_path = write_report(report, args.report)
    final = report["final"]
    print(
        f"final accuracy {final['accuracy']:.4f}  loss {final['loss']:.4f}  "
        f"bytes up {final['bytes_up']:,}  down {final['bytes_down']:,}  "
        f"simulated {final['simulated_seconds']:.0f}s  wall {final['wall_seconds']:.1f}s"
    )
    print(f"report {json_path}  plot {png_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
