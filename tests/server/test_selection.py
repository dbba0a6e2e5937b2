"""Client selection from the plan: power-of-choice picks the highest-loss candidates,
through the real server, and a selection of one's own by import path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedclient import InvalidInput
from fedclient.protocol import TENSOR_MEDIA_TYPE, encode_tensors
from fedclient.runtime import NumpyModel
from fedclient.server import FederationService, ServerStore, plan_from_dict
from fedclient.server.selection import (
    NOT_SELECTED,
    SELECTION_PENDING,
    Candidate,
    PowerOfChoice,
)
from fedclient.sim.cli import main as fedsim
from tests.conftest import ManualClock, Server, enrol

pytestmark = pytest.mark.anyio


def test_power_of_choice_ranks_by_loss_and_explores_the_unknown_first() -> None:
    candidates = [
        Candidate("a", 10, 0.5),
        Candidate("b", 10, 2.0),
        Candidate("c"),  # never reported: it ranks first
        Candidate("d", 10, 1.0),
        Candidate("e", 10, 3.0),
    ]
    rng = np.random.default_rng(0)
    assert PowerOfChoice(d=5).select(1, candidates, 3, rng) == ["c", "e", "b"]
    assert PowerOfChoice(d=5).pool_size(3) == 5 and PowerOfChoice().pool_size(3) == 6
    with pytest.raises(ValueError, match="d must be"):
        PowerOfChoice(d=-1)


def _plan(**selection: Any) -> Any:
    return plan_from_dict(
        {
            "job": {"name": "digits", "rounds": 4, "devices_per_round": 2, "seed": 3},
            "model": {"kind": "mlp", "inputs": 64, "hidden": [8], "classes": 10},
            "selection": {"name": "power_of_choice", "d": 6, **selection},
        }
    )


async def test_power_of_choice_admits_the_highest_loss_devices_checking_in() -> None:
    plan = _plan()
    clock = ManualClock()
    service = FederationService(ServerStore(), clock=clock)
    service.add_job(plan)
    zeros = {k: np.zeros_like(v) for k, v in NumpyModel(plan.model).get_weights().items()}
    losses = {"d0": 0.4, "d1": 2.5, "d2": 0.9, "d3": 3.1, "d4": 1.7, "d5": 0.2}
    admitted_per_round = []
    async with Server(service, clock).http() as http:
        auth = {name: await enrol(http) for name in losses}
        for number in range(1, 5):
            answers = {}
            for name in losses:  # everyone checks in: the round gathers its six candidates
                r = await http.post("/v1/jobs/digits/checkin", json={}, headers=auth[name])
                answers[name] = r.json()
            pending = [n for n, a in answers.items() if a.get("reason") == SELECTION_PENDING]
            assert len(pending) == 5  # the sixth made the pool whole: it learnt at once
            clock.now += 10
            for name in pending:
                r = await http.post("/v1/jobs/digits/checkin", json={}, headers=auth[name])
                answers[name] = r.json()
            admitted = sorted(n for n, a in answers.items() if a["status"] == "admitted")
            assert all(answers[n]["reason"] == NOT_SELECTED for n in losses if n not in admitted)
            admitted_per_round.append(admitted)
            for name in admitted:  # each sends an update reporting its own loss
                plan_answer = answers[name]["plan"]
                meta = {
                    "num_examples": "10",
                    "train_loss": repr(losses[name]),
                    "model_version": str(plan_answer["model_version"]),
                    "round_id": str(plan_answer["round_id"]),
                }
                r = await http.post(
                    f"/v1/rounds/{plan_answer['round_id']}/updates",
                    content=encode_tensors(zeros, meta),
                    headers={**auth[name], "Idempotency-Key": f"{name}-{number}",
                             "Content-Type": TENSOR_MEDIA_TYPE},
                )  # fmt: skip
                assert r.status_code == 200, r.text
    # Rounds 1-3 explore: every device is tried once before any is picked again.
    assert sorted(n for names in admitted_per_round[:3] for n in names) == sorted(losses)
    # Then, every loss known: the two highest of the six checking in.
    assert admitted_per_round[3] == ["d1", "d3"]


def test_a_selection_is_refused_where_it_cannot_work() -> None:
    with pytest.raises(InvalidInput, match="unknown selection 'nope'"):
        plan_from_dict({"job": {"name": "x"}, "selection": {"name": "nope"}})
    with pytest.raises(InvalidInput, match="takes no setting 'k'"):
        plan_from_dict({"job": {"name": "x"}, "selection": {"name": "power_of_choice", "k": 2}})
    with pytest.raises(InvalidInput, match="not in async mode"):
        plan_from_dict(
            {"job": {"name": "x", "mode": "async"}, "selection": {"name": "power_of_choice"}}
        )


FASTEST = '''\
from fedclient.server.selection import Selection


class Fastest(Selection):
    """The quickest devices of their last round; the never-seen first."""

    def __init__(self, settings=None, *, pool=3):
        super().__init__(settings)
        self.pool = pool

    def pool_size(self, places):
        return self.pool * places

    def select(self, round_number, candidates, places, rng):
        known = sorted(candidates, key=lambda c: -1 if c.seconds is None else c.seconds)
        return [c.device_id for c in known[:places]]
'''


def test_fedsim_runs_a_selection_from_the_plan_and_replays_it(
    tmp_path: Path, monkeypatch: Any
) -> None:
    (tmp_path / "fastest_selection.py").write_text(FASTEST)
    common = '[job]\nname = "digits"\nrounds = 4\ndevices_per_round = 4\nseed = 2\n'
    common += "[train]\nepochs = 1\n"
    plans = {
        "first": common,
        "poc": common + '[selection]\nname = "power_of_choice"\nd = 12\n',
        "fast": common + '[selection]\nname = "fastest_selection:Fastest"\npool = 2\n',
    }
    monkeypatch.chdir(tmp_path)
    reports = {}
    for name, text in plans.items():
        (tmp_path / f"{name}.toml").write_text(text)
        args = ["run", "--plan", f"{name}.toml", "--devices", "30", "--quiet", "--no-plot"]
        assert fedsim([*args, "--report", f"{name}.json"]) == 0
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    for name in ("poc", "fast"):
        assert all(r["admitted"] == 4 for r in reports[name]["rounds"]), name
        # The candidates waited for the choice: the round took longer than first come.
        assert (
            reports[name]["rounds"][0]["round_seconds"]
            > reports["first"]["rounds"][0]["round_seconds"]
        )
    assert reports["fast"]["plan"]["selection"]["options"] == {"pool": 2}
    assert reports["fast"]["plugins"]["selection"]["name"] == "fastest_selection:Fastest"
    accuracy = {k: [r["accuracy"] for r in v["rounds"]] for k, v in reports.items()}
    assert accuracy["poc"] != accuracy["first"]
    assert fedsim(["replay", "poc.json", "--quiet"]) == 0
