"""``fedsim``: simulate a fleet of devices federating against the real server.

    fedsim run --dataset digits --devices 100 --devices-per-round 20 --rounds 40 \\
               --partition dirichlet:0.5 --seed 1 --report runs/digits.json
    fedsim compare runs/a.json runs/b.json --plot runs/a-vs-b.png
    fedsim replay runs/digits.json        # rerun from the report; check it reproduces
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import os
import sys
from pathlib import Path
from typing import Any

# Only the standard library up here: a run starts decompressing its data set (on
# threads) before it imports the rest, so the two overlap (fedclient.sim._prefetch).
from fedclient.sim import _prefetch
from fedclient.sim.flags import add_run_arguments

__all__ = ["console", "main"]

SWEEP_HELP = """\
Run every configuration (each --plan, times the --grid) once per seed, several runs at
once, and write each run's report into --out, named after its configuration and seed
(e.g. scaffold-seed2.json), with each run's plan (plans/) and an index (sweep.json).

    fedsim sweep --plan fedavg.toml --plan scaffold.toml --seeds 1,2,3 \\
        --dataset mnist --data-dir ../shared/data --devices 100 --partition shards:2 \\
        --out runs/scaffold
    fedsim compare runs/scaffold --target 0.95 --plot runs/scaffold/accuracy.pdf

The other flags are fedsim run's: the same for every run."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedsim", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a simulated federation")
    add_run_arguments(run, sweep=False)
    sweep = commands.add_parser(
        "sweep",
        help="run seeds x a grid of configurations, several at once; reports in one folder",
        description=SWEEP_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_arguments(sweep, sweep=True)
    sweep.add_argument(
        "--seeds", default="1,2,3", help="comma-separated seeds, each run per configuration"
    )
    sweep.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a grid axis: a plan key (train.learning_rate=0.05,0.1; needs --plan) or a "
        "flag (partition=iid,shards:2); several multiply",
    )
    sweep.add_argument("--out", default="sweep", help="the folder of the reports (and plans)")
    sweep.add_argument("--jobs", type=int, default=0, help="runs at once (default 0: one per CPU)")
    sweep.add_argument("--plot", action="store_true", help="a PNG beside each report too")

    compare = commands.add_parser(
        "compare",
        help="compare runs: grouped by configuration, mean and spread across seeds",
    )
    compare.add_argument(
        "reports", nargs="+", help="reports written by fedsim run, or folders of them (a sweep's)"
    )
    compare.add_argument(
        "--plot",
        help="the figure: .pdf, .svg or .png (default: a PNG beside the first report)",
    )
    compare.add_argument(
        "--target",
        type=float,
        help="an accuracy: rounds, MB and simulated minutes each configuration took to reach it",
    )

    replay = commands.add_parser("replay", help="rerun a report's simulation and check it")
    replay.add_argument(
        "report", help="a report written by fedsim run, or a folder of them (a sweep's)"
    )
    replay.add_argument("--data-dir", help="where the data files are now, if they moved")
    replay.add_argument("--out", help="report of the replay (default: REPORT.replay.json)")
    replay.add_argument("--quiet", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedsim`` command."""
    args = _parser().parse_args(argv)
    if args.command == "run":
        _prefetch.prefetch(args.dataset, args.data_dir)
    from fedclient._exceptions import FedError

    try:
        from fedclient.sim import engine  # noqa: F401  (it needs the sim extra)
        from fedclient.sim import report as reports
    except ImportError as exc:
        print(f"fedsim needs the sim extra: pip install 'fedclient[sim]' ({exc})", file=sys.stderr)
        return 2
    _collect_from_here()
    try:
        if args.command == "compare":
            return _compare(args, reports)
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "replay":
            return _replay(args, reports)
        if args.enrolment_secret_file:
            args.enrolment_credential = _read_secret(args.enrolment_secret_file)
        if args.partition is None and args.dataset == "shakespeare":
            args.partition = "natural"  # Shakespeare's devices are its roles
        config = _config(args)
        report = _simulate(config, args.quiet)
    except FedError as exc:
        print(f"fedsim: {exc}", file=sys.stderr)
        return exc.exit_code
    json_path, png_path = reports.write_report(report, args.report, plot=not args.no_plot)
    final = report["final"]
    result = (
        "no round closed"  # every device was turned away (its privacy budget spent, say)
        if final["accuracy"] is None
        else f"accuracy {final['accuracy']:.4f}  loss {final['loss']:.4f}"
    )
    print(
        f"final {result}  "
        f"bytes up {final['bytes_up']:,}  down {final['bytes_down']:,}  "
        f"simulated {final['simulated_seconds']:.0f}s  wall {final['wall_seconds']:.1f}s"
    )
    print(f"report {json_path}" + (f"  plot {png_path}" if png_path else ""))
    return 0


def _read_secret(path: str) -> str:
    """The secret in file ``path``, surrounding whitespace dropped."""
    from fedclient._exceptions import InvalidInput

    try:
        secret = Path(path).read_text().strip()
    except OSError as exc:
        raise InvalidInput(f"cannot read the enrolment secret file {path}: {exc}") from None
    if not secret:
        raise InvalidInput(f"the enrolment secret file {path} is empty")
    return secret


def _config(args: argparse.Namespace) -> Any:
    """The run's `SimulationConfig`: the flags given, the defaults for the others. A flag
    the plan sets is refused, as is --devices with a natural partition (one device per
    user): neither would be obeyed."""
    from fedclient._exceptions import InvalidInput
    from fedclient.sim.config import PLAN_FIELDS, SimulationConfig, flag_name

    given = {
        name: getattr(args, name)
        for name in SimulationConfig.__dataclass_fields__
        if getattr(args, name) is not None
    }
    if args.plan_file is not None or args.server is not None:
        named = PLAN_FIELDS if args.plan_file is not None else PLAN_FIELDS[1:]  # --job: which
        overridden = [name for name in named if name in given]
        if overridden:
            where = f"the plan {args.plan_file}" if args.plan_file else "the server's plan"
            raise InvalidInput(
                f"{', '.join(flag_name(n) for n in overridden)}: {where} sets the job, its "
                "training, strategy and privacy; change it there"
            )
    if args.plan_file is not None and "seed" in given:
        from fedclient.server import load_plan

        planned = load_plan(args.plan_file).job.seed
        if planned and planned != given["seed"]:
            raise InvalidInput(
                f"two seeds: --seed {given['seed']} and the plan's [job] seed = {planned}: "
                "a run has one; give one"
            )
    remote_only = [name for name in ("ca_bundle", "server_patience") if name in given]
    if remote_only and args.server is None:
        raise InvalidInput(
            f"{', '.join(flag_name(n) for n in remote_only)}: only with --server (a remote server)"
        )
    if args.partition == "natural" and "devices" in given:
        raise InvalidInput("--partition natural makes one device per user: drop --devices")
    if "plan_file" in given:  # where the run found it, as its plugins are: replay runs anywhere
        given["plan_file"] = str(Path(given["plan_file"]).resolve())
    return SimulationConfig(**given)


def _recorded_plan(plan_file: str, report: Path) -> str:
    """The plan a report's run read: where the report says, else (a folder of runs moved
    elsewhere) the file of that name beside the report or in its ``plans`` folder."""
    from fedclient._exceptions import InvalidInput

    recorded = Path(plan_file)
    candidates = [recorded, report.parent / recorded.name, report.parent / "plans" / recorded.name]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    raise InvalidInput(
        f"the plan {plan_file} that {report} was run with is not there, nor beside the report"
    )


def _replay(args: argparse.Namespace, reports: Any) -> int:
    """``fedsim replay``: rerun a report (or each report of a folder, a sweep's) and check
    it gives the same per-round accuracies; exit 1 if any does not."""
    from fedclient._exceptions import InvalidInput
    from fedclient.plugins import find_recorded
    from fedclient.sim.compare import reports_in
    from fedclient.sim.config import SimulationConfig

    folder = Path(args.report).is_dir()
    if folder and args.out:
        raise InvalidInput("--out names one report's replay: not with a folder")
    differing = 0
    for path in reports_in([args.report]):
        original = reports.load_report(path)
        for plugin in original.get("plugins", {}).values():
            find_recorded(plugin)  # where the run found it, wherever this runs from
        config = SimulationConfig(**original["config"])
        if config.plan_file is not None:
            config.plan_file = _recorded_plan(config.plan_file, path)
        if args.data_dir:
            config.data_dir = args.data_dir
        out = args.out or str(path).removesuffix(".json") + ".replay.json"
        replayed = _simulate(config, args.quiet)
        reports.write_report(replayed, out, plot=not folder)
        same = _accuracies(replayed) == _accuracies(original)
        differing += not same
        print(
            f"replayed {len(replayed['rounds'])} rounds into {out}: "
            f"{'the same' if same else 'DIFFERENT'} per-round accuracies"
        )
        for difference in reports.replay_differences(original, replayed):
            print(f"  {difference}")
    return 1 if differing else 0


def _sweep(args: argparse.Namespace) -> int:
    """``fedsim sweep``: every run planned (and checked) first, then run on a pool."""
    from fedclient._exceptions import InvalidInput
    from fedclient.sim.sweep import SweepProgress, parse_grid, plan_runs, run_sweep
    from fedclient.sim.trainpool import resolve_workers

    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise InvalidInput(f"--seeds {args.seeds!r}: comma-separated integers") from None
    for flag, name in (("--seed", "seed"), ("--state-dir", "state_dir"), ("--server", "server")):
        if getattr(args, name) is not None:  # one per run, or one shared by runs at once
            raise InvalidInput(f"{flag}: a sweep's runs take --seeds, their own state, in-process")
    args.plan_file, args.report, args.no_plot, args.save_model = None, "", True, None
    plans = args.plan_files or []
    # The flags are checked as fedsim run checks them, against the first plan.
    if plans:
        args.plan_file = plans[0]
    base = _config(args)
    base = dataclasses.replace(base, plan_file=None, seed=0)
    out = Path(args.out)
    runs = plan_runs(base, plans, parse_grid(args.grid), seeds, out)
    jobs = min(resolve_workers(args.jobs), len(runs))
    print(f"{len(runs)} runs ({len(runs) // len(seeds)} configurations x {len(seeds)} seeds), "
          f"{jobs} at once, into {out}")  # fmt: skip
    progress = None if args.quiet else SweepProgress(len(runs))
    try:
        summaries = run_sweep(
            runs, out, jobs, plot=args.plot, on_done=progress.done if progress else None
        )
    finally:
        if progress is not None:
            progress.stop()
    for run, summary in zip(runs, summaries, strict=True):
        print(
            f"{run.name:<40} accuracy {summary['accuracy']:.4f}  rounds {summary['rounds']}  "
            f"wall {summary['wall_seconds']:.1f}s"
        )
    print(f"reports in {out}; compare them: fedsim compare {out}")
    return 0


def _simulate(config: Any, quiet: bool) -> dict[str, Any]:
    """Run one simulation with a progress bar and a line per round (``quiet``: neither)."""
    from threadpoolctl import threadpool_limits

    from fedclient.sim.engine import simulate

    # Device models are small: BLAS threads only contend (a 10x784 @ 784x200
    # product takes 0.17 ms on one thread and up to 15 ms on two busy cores).
    with threadpool_limits(limits=1):
        if quiet:  # no progress bar, nor the thread that refreshes it
            return asyncio.run(simulate(config))
        return _with_progress(config, simulate)


def _with_progress(config: Any, simulate: Any) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        rounds = config.rounds
        if config.plan_file is not None:
            from fedclient.server import load_plan

            rounds = load_plan(config.plan_file).job.rounds
        task = progress.add_task("rounds", total=rounds)

        def on_round(r: dict[str, Any]) -> None:
            # With devices that come and go: how many were online when the round opened.
            online = r.get("participation", {}).get("available", 0)
            came = f"online {online:,}  " if config.availability != "always" and online else ""
            progress.console.print(
                f"round {r['round']:>4}  accuracy {r['accuracy']:.4f}  loss {r['loss']:.4f}  "
                f"{came}updates {r['updates']}/{r['admitted']}  {r['status']}  "
                f"sim {r['simulated_seconds']:.0f}s  wall {r['wall_seconds']:.1f}s",
                soft_wrap=True,  # one line per round, whatever the terminal's width
            )
            progress.update(task, advance=1, description=f"accuracy {r['accuracy']:.3f}")

        return asyncio.run(simulate(config, on_round))


def _accuracies(report: dict[str, Any]) -> list[Any]:
    return [r["accuracy"] for r in report["rounds"]]


def _compare(args: argparse.Namespace, reports: Any) -> int:
    from fedclient.sim.compare import group_reports, plot_groups, reports_in, summary_table

    paths = reports_in(args.reports)
    groups = group_reports([(p.stem, reports.load_report(p)) for p in paths])
    print(summary_table(groups, args.target))
    plot = args.plot or str(
        paths[0].with_name("-vs-".join(group.label for group in groups) + ".png")
    )
    plot_groups(groups, plot, args.target)
    print(f"plot {plot}")
    return 0


def console() -> int:
    """The ``fedsim`` command: `main`, then no last garbage collection at exit.

    Python's shutdown collects once more over every object the run left behind (the
    fleet, the server's store, the data set): ~0.1 s of a short run for memory the
    process is about to give back anyway. Frozen objects are skipped."""
    gc.disable()  # until the imports are done: see _collect_from_here
    _without_httpx_cli()
    _one_blas_thread()
    code = main()
    gc.freeze()
    return code


def _collect_from_here() -> None:
    """The ``fedsim`` process imports with the cyclic garbage collector off (its ~100
    collections there freed a few hundred objects: modules and classes live to the
    end), then freezes what the imports made, so the run's own collections skip it.
    Collecting took 50 ms of a W2 run, 9 ms now. A caller that left the collector on
    (a test calling `main`) keeps it as it is."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def _one_blas_thread() -> None:
    """Tell OpenBLAS, before numpy loads it, that the run uses one thread (`_simulate`
    holds BLAS to one anyway). Told only afterwards, it has already started a thread
    per core, and those spin for their first ~0.1 s: a tenth of a second of CPU taken
    from the second core, where the evaluation runs. A value the user set stays."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _without_httpx_cli() -> None:
    """Keep httpx from importing its own command-line client into this process.

    ``import httpx`` imports ``httpx._main`` (rich, click and pygments) whenever those
    happen to be installed, as they are next to fedsim: ~55 ms, 40% of httpx's import,
    for a CLI fedsim never calls (httpx falls back to a stub ``httpx.main`` when the
    import fails). Only the ``fedsim`` process does this, before anything imports
    httpx; the device SDK leaves its host application's imports alone."""
    if "httpx" not in sys.modules:
        sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]


if __name__ == "__main__":
    raise SystemExit(console())
