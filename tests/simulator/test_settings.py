"""fedsim: one meaning per setting (a flag the plan sets is refused; one seed; one default)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedclient import InvalidInput
from fedclient.protocol import JobSettings, StrategySettings, TrainSettings
from fedclient.sim.cli import main as fedsim
from fedclient.sim.config import PLAN_FIELDS, SimulationConfig
from fedclient.sim.engine import simulate

PLAN = """\
[job]
name = "digits"
rounds = 2
devices_per_round = 4
min_devices = 2
{seed}
[model]
kind = "mlp"
inputs = 64
hidden = [16]
classes = 10
[train]
epochs = 1
"""

FLEET = ["--devices", "12", "--quiet", "--no-plot"]


def _plan(tmp_path: Path, seed: int | None = None) -> Path:
    path = tmp_path / f"plan-{seed}.toml"
    path.write_text(PLAN.format(seed="" if seed is None else f"seed = {seed}"))
    return path


def _report(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "flag",
    [
        ["--rounds", "3"],
        ["--epochs", "2"],
        ["--strategy", "fedadam"],
        ["--over-selection", "1.0"],  # even the default: given beside a plan, it is refused
        ["--dp", "epsilon=8"],
        ["--secagg"],
        ["--distributed-dp"],
    ],
)
def test_a_flag_the_plan_sets_is_refused(tmp_path: Path, capsys: Any, flag: list[str]) -> None:
    out = tmp_path / "r.json"
    plan = _plan(tmp_path)
    assert fedsim(["run", "--plan", str(plan), *FLEET, *flag, "--report", str(out)]) == 2
    err = capsys.readouterr().err
    assert flag[0] in err and "plan" in err
    assert not out.exists()


def test_a_config_with_a_field_the_plan_sets_is_refused_too(tmp_path: Path) -> None:
    config = SimulationConfig(plan_file=str(_plan(tmp_path)), devices=12, rounds=3)
    with pytest.raises(InvalidInput, match="--rounds"):
        asyncio.run(simulate(config))
    # Every plan field is checked: each one moved off its default is named.
    for name in PLAN_FIELDS:
        default = SimulationConfig.__dataclass_fields__[name].default
        changed = {bool: True, int: 7, float: 0.5, str: "x"}.get(type(default), "x")
        config = dataclasses.replace(SimulationConfig(plan_file="p.toml"), **{name: changed})
        assert config.plan_conflicts() == [name]


def test_job_flags_beside_a_remote_server_are_refused(capsys: Any) -> None:
    code = fedsim(["run", "--server", "http://127.0.0.1:9", "--job", "j", "--rounds", "3"])
    assert code == 2 and "--rounds" in capsys.readouterr().err


def test_one_seed_from_the_flag_or_the_plan_and_two_are_refused(
    tmp_path: Path, capsys: Any
) -> None:
    seeded, unseeded = _plan(tmp_path, seed=5), _plan(tmp_path)
    a, b, c = (tmp_path / f"{n}.json" for n in "abc")
    assert fedsim(["run", "--plan", str(seeded), *FLEET, "--report", str(a)]) == 0
    assert fedsim(["run", "--plan", str(unseeded), *FLEET, "--seed", "5", "--report", str(b)]) == 0
    ra, rb = _report(a), _report(b)
    # The plan's seed is the run's: the split, the model and the check-ins alike.
    assert ra["config"]["seed"] == ra["plan"]["job"]["seed"] == 5
    assert rb["config"]["seed"] == rb["plan"]["job"]["seed"] == 5
    assert [r["accuracy"] for r in ra["rounds"]] == [r["accuracy"] for r in rb["rounds"]]
    assert fedsim(["run", "--plan", str(seeded), *FLEET, "--seed", "6", "--report", str(c)]) == 2
    assert "two seeds" in capsys.readouterr().err
    # --seed 0 is a seed too when given: refused beside another in the plan.
    assert fedsim(["run", "--plan", str(seeded), *FLEET, "--seed", "0", "--report", str(c)]) == 2
    with pytest.raises(InvalidInput, match="two seeds"):
        SimulationConfig(plan_file=str(seeded), seed=6).resolved()
    assert not c.exists()


def test_a_natural_partition_refuses_a_number_of_devices(tmp_path: Path, capsys: Any) -> None:
    rng = np.random.default_rng(0)
    data = tmp_path / "users.npz"
    np.savez(
        data,
        x=rng.random((60, 4)).astype(np.float32),
        y=rng.integers(0, 2, 60),
        user=np.repeat(np.arange(6), 10),
    )
    common = ["run", "--dataset", f"npz:{data}", "--partition", "natural", "--rounds", "1"]
    out = tmp_path / "r.json"
    assert fedsim([*common, "--devices", "3", "--quiet", "--report", str(out)]) == 2
    assert "one device per user" in capsys.readouterr().err
    config = SimulationConfig(dataset=f"npz:{data}", partition="natural", devices=3, rounds=1)
    with pytest.raises(InvalidInput, match="one device per user"):
        asyncio.run(simulate(config))
    assert fedsim([*common, "--devices-per-round", "3", "--quiet", "--report", str(out)]) == 0
    assert _report(out)["final"]["devices"] == 6


def test_the_plan_and_the_flags_default_alike() -> None:
    config = SimulationConfig()
    job, train, strategy = JobSettings(name="x"), TrainSettings(), StrategySettings()
    shared = {
        "over_selection": job.over_selection,
        "deadline_seconds": job.deadline_seconds,
        "mode": job.mode,
        "max_staleness": job.max_staleness,
        "compress": job.compression,
        "seed": job.seed,
        "proximal_mu": train.proximal_mu,
        "strategy": strategy.name,
        "server_learning_rate": strategy.server_learning_rate,
    }
    assert {name: getattr(config, name) for name in shared} == shared


def test_devices_cut_by_over_selection_are_not_called_deadline_dropouts(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    common = ["run", "--devices", "20", "--devices-per-round", "4", "--rounds", "3"]
    uniform = ["--fleet", "uniform", "--epochs", "1", "--seed", "2", "--quiet", "--no-plot"]
    assert fedsim([*common, *uniform, "--over-selection", "1.5", "--report", str(out)]) == 0
    rounds = _report(out)["rounds"]
    assert all(r["admitted"] == 6 and r["updates"] == 4 for r in rounds)
    assert [r["dropouts"]["over_selection"] for r in rounds] == [2, 2, 2]
    assert all(r["dropouts"]["deadline"] == 0 for r in rounds)
