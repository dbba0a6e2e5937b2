"""fedsim with plugins named by import path in a plan: strategies (and their settings),
run from the plan's folder by the installed ``fedsim`` command, recorded and replayed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from fedclient.sim.cli import main as fedsim

STRATEGY = '''\
"""Server momentum with a step size that decays per round: a strategy of one's own."""

import numpy as np

from fedclient.server.strategies import MeanStrategy


class DecayingMomentum(MeanStrategy):
    def __init__(self, settings=None, *, beta=0.9, decay=0.5):
        super().__init__(settings)
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta, self.decay = beta, decay

    def step(self, weights, mean, state):
        rounds = state.get("rounds", np.array(0))  # a 0-d array, kept as one
        scale = self.learning_rate * self.decay ** int(rounds)
        velocity = {
            k: self.beta * state.get("v." + k, np.zeros_like(mean[k])) + mean[k] for k in weights
        }
        new = {k: (weights[k] + scale * velocity[k]).astype(weights[k].dtype) for k in weights}
        return new, {"rounds": rounds + 1, **{"v." + k: v for k, v in velocity.items()}}
'''

PLAN = """\
[job]
name = "digits"
rounds = 3
devices_per_round = 5
min_devices = 3
seed = 4
[model]
kind = "mlp"
inputs = 64
hidden = [16]
classes = 10
[train]
epochs = 1
[strategy]
name = "{module}:DecayingMomentum"
beta = {beta}
decay = 0.5
"""


def _fedsim(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The installed ``fedsim`` command (not ``python -m``, which would put the current
    directory on the import path by itself)."""
    command = Path(sys.executable).with_name("fedsim")
    return subprocess.run(
        [str(command), *args], cwd=cwd, capture_output=True, text=True, env=dict(os.environ)
    )


def test_a_strategy_in_its_own_file_runs_from_its_folder_and_replays(tmp_path: Path) -> None:
    module = "my_momentum_strategy"
    (tmp_path / f"{module}.py").write_text(STRATEGY)
    (tmp_path / "plan.toml").write_text(PLAN.format(module=module, beta=0.5))
    common = ["--devices", "20", "--quiet", "--no-plot"]
    done = _fedsim("run", "--plan", "plan.toml", *common, "--report", "r.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads((tmp_path / "r.json").read_text())
    strategy = report["plan"]["strategy"]
    assert strategy["name"] == f"{module}:DecayingMomentum"
    assert strategy["options"] == {"beta": 0.5, "decay": 0.5}
    plugin = report["plugins"]["strategy"]
    assert plugin["file"] == str(tmp_path / f"{module}.py") and len(plugin["sha256"]) == 64
    assert report["final"]["rounds_completed"] == 3
    # Its setting is its own and it matters: another beta, another run.
    (tmp_path / "other.toml").write_text(PLAN.format(module=module, beta=0.0))
    done = _fedsim("run", "--plan", "other.toml", *common, "--report", "o.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    other = json.loads((tmp_path / "o.json").read_text())
    assert [r["accuracy"] for r in other["rounds"]] != [r["accuracy"] for r in report["rounds"]]
    # Replayed from the report, with no wrapper either.
    done = _fedsim("replay", "r.json", "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the same per-round accuracies" in done.stdout
    # An edited strategy file is named in the replay's output.
    (tmp_path / f"{module}.py").write_text(STRATEGY.replace("** int(rounds)", "** 0"))
    done = _fedsim("replay", "r.json", "--quiet", cwd=tmp_path)
    assert done.returncode == 1 and f"the strategy {module}:DecayingMomentum" in done.stdout
    # A setting the class refuses stops the run before it starts, with its message.
    (tmp_path / "bad.toml").write_text(PLAN.format(module=module, beta=1.5))
    done = _fedsim("run", "--plan", "bad.toml", *common, "--report", "b.json", cwd=tmp_path)
    assert done.returncode == 2 and "beta must be in [0, 1)" in done.stderr


def test_a_run_from_its_plan_s_folder_replays_from_another_and_after_a_move(
    tmp_path: Path,
) -> None:
    """``--plan plan.toml`` given relative to the folder it ran in: the report records where
    the run found the plan, so a replay from elsewhere reads the same file; a folder of runs
    moved elsewhere replays from the plan beside its report."""
    module = "my_momentum_strategy"
    ran = tmp_path / "ran"
    ran.mkdir()
    (ran / f"{module}.py").write_text(STRATEGY)
    (ran / "plan.toml").write_text(PLAN.format(module=module, beta=0.5))
    common = ["--devices", "20", "--quiet", "--no-plot"]
    done = _fedsim("run", "--plan", "plan.toml", *common, "--report", "r.json", cwd=ran)
    assert done.returncode == 0, done.stderr
    report = json.loads((ran / "r.json").read_text())
    assert report["config"]["plan_file"] == str(ran / "plan.toml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = _fedsim("replay", str(ran / "r.json"), "--quiet", cwd=elsewhere)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the same per-round accuracies" in done.stdout
    # A plan with no plugin of its own, its folder moved: the plan beside the report.
    builtin = PLAN.split("[strategy]")[0] + '[strategy]\nname = "fedavgm"\n'
    (ran / "builtin.toml").write_text(builtin)
    done = _fedsim("run", "--plan", "builtin.toml", *common, "--report", "b.json", cwd=ran)
    assert done.returncode == 0, done.stderr
    moved = tmp_path / "moved"
    ran.rename(moved)
    done = _fedsim("replay", str(moved / "b.json"), "--quiet", cwd=elsewhere)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the same per-round accuracies" in done.stdout
    (moved / "builtin.toml").unlink()
    done = _fedsim("replay", str(moved / "b.json"), "--quiet", cwd=elsewhere)
    assert done.returncode == 2 and "is not there, nor beside the report" in done.stderr


def _readme_block(first_line: str) -> str:
    """The README's Python block that starts with ``first_line``."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    start = readme.index(first_line)
    return readme[start : readme.index("```", start)]


def test_the_readme_s_krum_runs_from_a_plan(tmp_path: Path, monkeypatch: Any) -> None:
    (tmp_path / "krum_readme.py").write_text(_readme_block("# krum.py, beside plan.toml"))
    (tmp_path / "plan.toml").write_text(
        '[job]\nname = "digits"\nrounds = 2\ndevices_per_round = 6\n[train]\nepochs = 1\n'
        '[strategy]\nname = "krum_readme:Krum"\nf = 2\n'
    )
    monkeypatch.chdir(tmp_path)
    assert fedsim(["run", "--plan", "plan.toml", "--devices", "20", "--quiet", "--no-plot"]) == 0
    report = json.loads((tmp_path / "fedsim-report.json").read_text())
    assert report["plan"]["strategy"]["options"] == {"f": 2}
    assert report["final"]["rounds_completed"] == 2


def test_the_feddyn_example_sweeps_and_replays_from_anywhere(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """examples/feddyn: a trainer and a strategy of one's own, outside the package."""
    example = Path(__file__).parents[2] / "examples" / "feddyn"
    monkeypatch.chdir(tmp_path)  # neither the example's folder nor the repository's
    out = tmp_path / "runs"
    args = ["sweep", "--plan", str(example / "feddyn.toml"), "--seeds", "1"]
    args += ["--grid", "job.rounds=3", "--devices", "20", "--partition", "shards:2"]
    assert fedsim([*args, "--out", str(out), "--jobs", "1", "--quiet"]) == 0
    report = json.loads((out / "feddyn-rounds=3-seed1.json").read_text())
    assert report["plugins"]["trainer"]["file"] == str(example / "feddyn.py")
    assert report["plan"]["train"]["trainer_options"] == {"alpha": 0.01}
    assert report["final"]["rounds_completed"] == 3
    # A new process replays it: it finds the plugins where the report says the run did.
    done = _fedsim("replay", str(out / "feddyn-rounds=3-seed1.json"), "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
