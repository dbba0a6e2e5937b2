"""``fedsim sweep``: seeds x a grid of configurations, run several at once.

A sweep's configurations are its plans (each ``--plan``; none: the flags' own plan)
times its grid (``--grid KEY=V1,V2``: a plan key such as ``train.learning_rate``, or a
``fedsim run`` flag such as ``partition``). Each configuration runs once per seed. A
run with a plan gets a plan file of its own (``plans/NAME.toml``: the base plan with
the grid's keys and the seed in ``[job] seed``), so its report replays like any other;
every report goes in one folder, named ``CONFIGURATION-seedN.json``, and
``sweep.json`` indexes them. The runs go to a pool of processes, one per CPU by
default; each run's report is the same however many run at once.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedclient._exceptions import InvalidInput
from fedclient.sim.config import SimulationConfig

__all__ = ["SweepProgress", "SweepRun", "parse_grid", "plan_runs", "plan_toml", "run_sweep"]


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: its name, configuration (without the seed) and seed."""

    name: str
    configuration: str
    seed: int
    grid: dict[str, Any]
    config: SimulationConfig

    @property
    def report(self) -> str:
        """Its report's file name in the sweep's folder."""
        return f"{self.name}.json"


def parse_grid(axes: Sequence[str]) -> dict[str, list[Any]]:
    """``["train.learning_rate=0.05,0.1", "partition=iid,shards:2"]`` -> the grid's axes,
    each value read as TOML reads it (numbers, booleans, else a string)."""
    grid: dict[str, list[Any]] = {}
    for axis in axes:
        key, _, values = axis.partition("=")
        if not key or not values:
            raise InvalidInput(f"--grid {axis!r}: use KEY=V1,V2")
        grid[key.strip()] = [_value(v.strip()) for v in values.split(",")]
    return grid


def _value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def plan_runs(
    base: SimulationConfig,
    plans: Sequence[str],
    grid: Mapping[str, Sequence[Any]],
    seeds: Sequence[int],
    out: Path,
) -> list[SweepRun]:
    """Every run of the sweep, with the plan file each needs written under ``out/plans``."""
    fields = {f.name for f in dataclasses.fields(SimulationConfig)}
    for key in grid:
        if "." not in key and key not in fields:
            raise InvalidInput(f"--grid {key}: neither a plan key (table.key) nor a flag")
        if "." in key and not plans:
            raise InvalidInput(f"--grid {key}: a plan key needs --plan")
        if key in ("seed", "plan_file"):
            raise InvalidInput(f"--grid {key}: the sweep sets it (--seeds, --plan)")
    names = _plan_names(plans)
    for plan in plans:
        # Each plan's plugins, found beside it (its runs' plans are elsewhere): the folder
        # stays on the import path, which the runs' processes inherit.
        SimulationConfig(plan_file=plan).import_plugins()
    runs = []
    choices: list[str | None] = [*plans] or [None]
    for plan, settings in itertools.product(choices, _product(grid)):
        configuration = "-".join(
            ([names[plan]] if plan else []) + [f"{_short(k)}={v}" for k, v in settings.items()]
        )
        configuration = _safe(configuration or "run")
        flags = {k: v for k, v in settings.items() if "." not in k}
        keys = {k: v for k, v in settings.items() if "." in k}
        for seed in seeds:
            name = f"{configuration}-seed{seed}"
            config = dataclasses.replace(base, **flags, seed=seed)
            if plan is not None:
                written = (out / "plans" / f"{name}.toml").resolve()
                written.parent.mkdir(parents=True, exist_ok=True)
                written.write_text(plan_toml(_variant(Path(plan), keys, seed)))
                config = dataclasses.replace(config, plan_file=str(written))
            config.resolved()  # a flag the plan sets, or two seeds: refused before any run
            runs.append(SweepRun(name, configuration, seed, dict(settings), config))
    if len({r.name for r in runs}) < len(runs):
        raise InvalidInput("two runs of the sweep would have the same name: vary the plans' names")
    return runs


def _product(grid: Mapping[str, Sequence[Any]]) -> Iterator[dict[str, Any]]:
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        yield dict(zip(keys, values, strict=True))


def _plan_names(plans: Sequence[str]) -> dict[str, str]:
    """Each plan's name in run names: its file's stem (its path, when two stems clash)."""
    stems = [Path(p).stem for p in plans]
    return {
        p: (s if stems.count(s) == 1 else str(Path(p).with_suffix("")))
        for p, s in zip(plans, stems, strict=True)
    }


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._=-" else "_" for c in name)


def _variant(path: Path, keys: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """The plan at ``path`` with ``keys`` set (``table.key``), the run's seed, and a
    bundle's directory made absolute (the variant lives elsewhere)."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InvalidInput(f"cannot read plan {path}: {exc}") from exc
    for key, value in keys.items():
        table, _, name = key.partition(".")
        data.setdefault(table, {})[name] = value
    data.setdefault("job", {})["seed"] = seed
    model = data.get("model", {})
    if model.get("bundle"):
        model["bundle"] = str((path.parent / model["bundle"]).resolve())
    return data


def plan_toml(data: Mapping[str, Mapping[str, Any]]) -> str:
    """A plan (tables of scalars, lists and inline tables) as TOML."""
    lines = []
    for table, settings in data.items():
        lines.append(f"[{table}]")
        lines.extend(f"{key} = {_toml(value)}" for key, value in settings.items())
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidInput(f"a plan value must be finite, got {value}")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    raise InvalidInput(f"cannot write {value!r} in a plan")


def run_sweep(
    runs: Sequence[SweepRun],
    out: Path,
    jobs: int,
    *,
    plot: bool = False,
    on_done: Callable[[SweepRun, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every run on ``jobs`` processes, write its report into ``out``, and the index
    (``sweep.json``); return each run's summary (name, seed, final accuracy, ...)."""
    import multiprocessing

    out.mkdir(parents=True, exist_ok=True)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    summaries: dict[str, dict[str, Any]] = {}
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context(method)) as pool:
        futures = {
            pool.submit(
                _run_one, dataclasses.asdict(r.config), str(out / f"{r.name}.json"), plot
            ): r
            for r in runs
        }
        for future in as_completed(futures):
            run = futures[future]
            summary = future.result()
            summaries[run.name] = summary
            if on_done is not None:
                on_done(run, summary)
    index = {
        "runs": [
            {
                "name": r.name,
                "configuration": r.configuration,
                "seed": r.seed,
                "grid": r.grid,
                "plan": r.config.plan_file,
                "report": r.report,
            }
            for r in runs
        ]
    }
    (out / "sweep.json").write_text(json.dumps(index, indent=2) + "\n")
    return [summaries[r.name] for r in runs]


def _run_one(config: dict[str, Any], report_path: str, plot: bool) -> dict[str, Any]:
    """In a worker: one run, quiet, its report written; a summary of it."""
    import asyncio

    from threadpoolctl import threadpool_limits

    from fedclient.sim.engine import simulate
    from fedclient.sim.report import write_report

    with threadpool_limits(limits=1):
        report = asyncio.run(simulate(SimulationConfig(**config)))
    write_report(report, report_path, plot=plot)
    final = report["final"]
    return {
        "report": report_path,
        "accuracy": final["accuracy"],
        "rounds": len(report["rounds"]),
        "wall_seconds": final["wall_seconds"],
    }


class SweepProgress:
    """A progress bar over a sweep's runs (rich), a line per finished run."""

    def __init__(self, total: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        self.progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.progress.start()
        self.task = self.progress.add_task("runs", total=total)

    def done(self, run: SweepRun, summary: dict[str, Any]) -> None:
        """A run finished: a line for it, one step of the bar."""
        self.progress.console.print(f"{run.name}: accuracy {summary['accuracy']:.4f}")
        self.progress.update(self.task, advance=1)

    def stop(self) -> None:
        """Take the bar away."""
        self.progress.stop()
