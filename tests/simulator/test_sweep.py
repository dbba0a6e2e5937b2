"""fedsim sweep (seeds x a grid, several runs at once) and fedsim compare (grouped by
configuration: mean and spread across seeds, rounds and bytes to a target, figures)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedclient.sim.cli import main as fedsim
from fedclient.sim.compare import group_reports, to_target

PLAN = """\
[job]
name = "digits"
rounds = 3
devices_per_round = 4
min_devices = 2
[model]
kind = "mlp"
inputs = 64
hidden = [16]
classes = 10
[train]
epochs = 1
{strategy}
"""
FLEET = ["--devices", "12", "--quiet"]


def _plans(tmp_path: Path) -> tuple[Path, Path]:
    fedavg, fedadam = tmp_path / "fedavg.toml", tmp_path / "fedadam.toml"
    fedavg.write_text(PLAN.format(strategy=""))
    fedadam.write_text(PLAN.format(strategy='[strategy]\nname = "fedadam"'))
    return fedavg, fedadam


def _report(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def test_a_sweep_runs_every_plan_and_grid_point_per_seed(tmp_path: Path, capsys: Any) -> None:
    fedavg, fedadam = _plans(tmp_path)
    out = tmp_path / "runs"
    args = ["sweep", "--plan", str(fedavg), "--plan", str(fedadam), "--seeds", "1,2"]
    args += ["--grid", "train.batch_size=4,8", "--out", str(out), "--jobs", "2", *FLEET]
    assert fedsim(args) == 0
    index = _report(out / "sweep.json")["runs"]
    names = sorted(run["name"] for run in index)
    assert names == sorted(
        f"{plan}-batch_size={b}-seed{s}" for plan in ("fedavg", "fedadam") for b in (4, 8)
        for s in (1, 2)
    )  # fmt: skip
    for run in index:
        report = _report(out / run["report"])
        assert report["config"]["seed"] == report["plan"]["job"]["seed"] == run["seed"]
        assert report["plan"]["train"]["batch_size"] == run["grid"]["train.batch_size"]
        assert report["plan"]["strategy"]["name"] == run["name"].split("-")[0]
        assert report["config"]["plan_file"] == str(out / "plans" / f"{run['name']}.toml")
    # A run of the sweep is the run fedsim run makes of its plan, alone.
    alone = tmp_path / "alone.json"
    plan = out / "plans" / "fedadam-batch_size=8-seed2.toml"
    assert fedsim(["run", "--plan", str(plan), *FLEET, "--no-plot", "--report", str(alone)]) == 0
    swept = _report(out / "fedadam-batch_size=8-seed2.json")
    assert [r["accuracy"] for r in _report(alone)["rounds"]] == [
        r["accuracy"] for r in swept["rounds"]
    ]
    assert "8 runs (4 configurations x 2 seeds)" in capsys.readouterr().out
    # The whole sweep again, from its reports: every run the same.
    assert fedsim(["replay", str(out), "--quiet"]) == 0
    replays = capsys.readouterr().out.splitlines()
    assert len(replays) == 8 and all("the same per-round accuracies" in r for r in replays)
    assert len(list(out.glob("*.replay.json"))) == 8


def test_a_sweep_over_flags_needs_no_plan(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    args = ["sweep", "--seeds", "3", "--grid", "partition=iid,shards:2", "--rounds", "2"]
    assert fedsim([*args, "--out", str(out), "--jobs", "1", *FLEET]) == 0
    partitions = {
        _report(out / f"partition={p.replace(':', '_')}-seed3.json")["config"]["partition"]
        for p in ("iid", "shards:2")
    }
    assert partitions == {"iid", "shards:2"}


def test_a_sweep_refuses_what_it_cannot_run(tmp_path: Path, capsys: Any) -> None:
    fedavg, _ = _plans(tmp_path)
    out = ["--out", str(tmp_path / "runs"), *FLEET]
    assert fedsim(["sweep", "--grid", "train.epochs=1,2", *out]) == 2
    assert "a plan key needs --plan" in capsys.readouterr().err
    assert fedsim(["sweep", "--plan", str(fedavg), "--grid", "colour=red", *out]) == 2
    assert "neither a plan key" in capsys.readouterr().err
    assert fedsim(["sweep", "--plan", str(fedavg), "--rounds", "5", *out]) == 2
    assert "--rounds" in capsys.readouterr().err
    for flag in (["--seed", "3"], ["--state-dir", str(tmp_path)]):
        assert fedsim(["sweep", "--plan", str(fedavg), *flag, *out]) == 2
        assert flag[0] in capsys.readouterr().err
    assert not (tmp_path / "runs" / "sweep.json").exists()


def test_compare_draws_mean_and_spread_across_seeds(tmp_path: Path, capsys: Any) -> None:
    fedavg, fedadam = _plans(tmp_path)
    out = tmp_path / "runs"
    sweep = ["sweep", "--plan", str(fedavg), "--plan", str(fedadam), "--seeds", "1,2,3"]
    assert fedsim([*sweep, "--out", str(out), "--jobs", "2", *FLEET]) == 0
    capsys.readouterr()
    for figure in ("fig.pdf", "fig.svg"):
        assert fedsim(["compare", str(out), "--target", "0.5", "--plot", str(out / figure)]) == 0
    table = capsys.readouterr().out
    # One row per configuration, its three seeds pooled: mean ± s.d. of the final accuracy.
    reports = {p.stem: _report(p) for p in out.glob("*-seed*.json")}
    for name in ("fedavg", "fedadam"):
        finals = [reports[f"{name}-seed{s}"]["final"]["accuracy"] for s in (1, 2, 3)]
        row = next(line for line in table.splitlines() if line.startswith(name + " "))
        assert f"{np.mean(finals):.4f} ± {np.std(finals, ddof=1):.4f}" in row
        reached = [to_target(reports[f"{name}-seed{s}"], 0.5) for s in (1, 2, 3)]
        assert f"{sum(r is not None for r in reached)}/3" in row
    assert (out / "fig.pdf").read_bytes()[:5] == b"%PDF-"
    svg = (out / "fig.svg").read_text()
    assert "<svg" in svg and "fedsim" not in svg  # a paper's figure: no tool's title
    groups = group_reports(sorted(reports.items()))
    assert sorted(g.label for g in groups) == ["fedadam", "fedavg"]
    assert all(len(g.runs) == 3 for g in groups)


def test_rounds_and_bytes_to_a_target() -> None:
    rounds = [
        {"round": n, "accuracy": a, "bytes_up": 10, "bytes_down": 5, "simulated_seconds": 60.0 * n}
        for n, a in ((1, 0.3), (2, 0.6), (3, 0.5), (4, 0.9))
    ]
    report = {"rounds": rounds}
    assert to_target(report, 0.6) == (2, 30, 120.0)
    assert to_target(report, 0.85) == (4, 60, 240.0)
    assert to_target(report, 0.95) is None


@pytest.mark.parametrize("suffix", [".eps", ".txt"])
def test_compare_refuses_a_figure_format_it_cannot_write(
    tmp_path: Path, suffix: str, capsys: Any
) -> None:
    report = tmp_path / "a.json"
    assert fedsim(["run", *FLEET, "--rounds", "1", "--no-plot", "--report", str(report)]) == 0
    assert fedsim(["compare", str(report), "--plot", str(tmp_path / f"x{suffix}")]) == 2
    assert ".pdf, .svg or .png" in capsys.readouterr().err


def test_a_run_stops_at_its_target_accuracy(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    args = ["run", *FLEET, "--rounds", "30", "--seed", "2", "--no-plot", "--stop-at", "0.6"]
    assert fedsim([*args, "--report", str(out)]) == 0
    accuracy = [r["accuracy"] for r in _report(out)["rounds"]]
    assert len(accuracy) < 30
    assert accuracy[-1] >= 0.6 and all(a < 0.6 for a in accuracy[:-1])
    full = tmp_path / "full.json"
    assert fedsim([*args[:-2], "--report", str(full)]) == 0
    # The rounds it ran are those of the whole run.
    assert [r["accuracy"] for r in _report(full)["rounds"]][: len(accuracy)] == accuracy


def test_runs_of_different_lengths_share_a_band_where_they_overlap(tmp_path: Path) -> None:
    from fedclient.sim.compare import Group, plot_groups

    def report(accuracy: list[float]) -> dict[str, Any]:
        rounds = [
            {"round": i + 1, "accuracy": a, "bytes_up": 1, "bytes_down": 1}
            for i, a in enumerate(accuracy)
        ]
        return {"rounds": rounds}

    group = Group("x", [("x-seed1", report([0.2, 0.5, 0.9])), ("x-seed2", report([0.4, 0.7]))])
    plot_groups([group], tmp_path / "f.svg", target=0.8)  # warnings are errors in the suite
    assert (tmp_path / "f.svg").read_text().count("<svg") == 1
