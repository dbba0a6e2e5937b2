"""Client trainers by import path (fedclient.trainers), with SCAFFOLD as the worked
example: its arithmetic, its extra tensors through the real server, and its benefit on
a non-IID split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import sqlite_utils

import fedclient
from fedclient import DeviceState, InvalidInput
from fedclient.protocol import (
    BROADCAST,
    TENSOR_MEDIA_TYPE,
    ModelSpec,
    TrainSettings,
    decode_tensors,
    encode_tensors,
    with_extras,
)
from fedclient.runtime import NumpyModel
from fedclient.server import FederationService, ServerStore, plan_from_dict
from fedclient.server.strategies import ClientUpdate
from fedclient.sim.cli import main as fedsim
from fedclient.sim.scaffold import Scaffold, ScaffoldTrainer
from fedclient.trainers import TrainContext
from tests.conftest import ManualClock, Server, enrol

SPEC = ModelSpec("mlp", 6, [5], 3)
SCAFFOLD = """\
[job]
name = "digits"
rounds = {rounds}
devices_per_round = 5
min_devices = 2
seed = 1
[model]
kind = "mlp"
inputs = 64
hidden = [32]
classes = 10
[train]
epochs = 5
batch_size = 8
learning_rate = 0.05
{train}
[strategy]
{strategy}
"""
TRAINER = 'trainer = "fedclient.sim.scaffold:ScaffoldTrainer"'
STRATEGY = 'name = "fedclient.sim.scaffold:Scaffold"\ndevices = 50'


def _context(model: NumpyModel, server: dict[str, Any], state: dict[str, Any]) -> TrainContext:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 6)).astype(np.float32)
    y = rng.integers(0, 3, 20)
    settings = TrainSettings(epochs=2, batch_size=5)
    return TrainContext(model, x, y, settings, 0.1, 1, np.random.default_rng(4), server, state)


def test_the_scaffold_trainer_corrects_each_step_and_updates_its_control_variate() -> None:
    model = NumpyModel(SPEC, seed=1)
    start = model.get_weights()
    rng = np.random.default_rng(9)
    c = {f"c.{k}": rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in start.items()}
    c_i = {f"c.{k}": rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in start.items()}
    result = ScaffoldTrainer().train(_context(model, c, c_i))
    # The same steps by hand: y -= lr (g(y) - c_i + c) on the batches minibatches draws.
    reference = NumpyModel(SPEC, seed=1)
    y = {k: v.copy() for k, v in start.items()}
    ctx = _context(reference, c, c_i)
    order_rng = np.random.default_rng(4)
    for _ in range(2):
        order = order_rng.permutation(20)
        for s in range(0, 20, 5):
            reference.set_weights(y)
            _, g = reference.loss_and_grads(ctx.x[order[s : s + 5]], ctx.y[order[s : s + 5]])
            y = {k: y[k] - 0.1 * (g[k] - c_i[f"c.{k}"] + c[f"c.{k}"]) for k in y}
    trained = model.get_weights()
    for k in start:
        np.testing.assert_allclose(trained[k], y[k], rtol=1e-5, atol=1e-6)
        new_c_i = c_i[f"c.{k}"] - c[f"c.{k}"] + (start[k] - trained[k]) / (8 * 0.1)
        assert result.state is not None and result.extras is not None
        np.testing.assert_allclose(result.state[f"c.{k}"], new_c_i, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(
            result.extras[f"c.{k}"], new_c_i - c_i[f"c.{k}"], rtol=1e-4, atol=1e-6
        )
    assert result.steps == 8 and result.num_examples == 20


def test_the_scaffold_strategy_moves_c_by_the_sampled_share() -> None:
    weights = {"w": np.zeros(2, np.float32)}
    updates = [
        ClientUpdate("a", 1, {"w": np.array([1.0, 0.0], np.float32)}, extras={"c.w": np.ones(2)}),
        ClientUpdate("b", 3, {"w": np.array([0.0, 1.0], np.float32)}, extras={"c.w": -np.ones(2)}),
        ClientUpdate("c", 1, {"w": np.zeros(2, np.float32)}, extras={"c.w": 4 * np.ones(2)}),
    ]
    strategy = Scaffold(devices=6)
    new, state = strategy.aggregate(weights, updates, {"c.w": np.full(2, 0.5, np.float32)})
    np.testing.assert_allclose(new["w"], [0.2, 0.6])  # example-weighted, as FedAvg
    np.testing.assert_allclose(state["c.w"], 0.5 + 3 / 6 * (4 / 3))  # |S|/N x mean change
    assert strategy.broadcast(state) == state
    with pytest.raises(ValueError, match="devices"):
        Scaffold(devices=-1)


def _run(tmp_path: Path, name: str, plan: str, *flags: str) -> dict[str, Any]:
    (tmp_path / f"{name}.toml").write_text(plan)
    out = tmp_path / f"{name}.json"
    fleet = ["--devices", "50", "--partition", "shards:2", "--fleet", "uniform", "--quiet"]
    args = ["run", "--plan", str(tmp_path / f"{name}.toml"), *fleet, "--no-plot", *flags]
    assert fedsim([*args, "--report", str(out)]) == 0
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def test_scaffold_beats_fedavg_on_a_non_iid_split(tmp_path: Path) -> None:
    scaffold = _run(
        tmp_path, "scaffold", SCAFFOLD.format(rounds=15, train=TRAINER, strategy=STRATEGY)
    )
    fedavg = _run(
        tmp_path, "fedavg", SCAFFOLD.format(rounds=15, train="", strategy='name = "fedavg"')
    )
    assert scaffold["plugins"]["trainer"]["name"] == "fedclient.sim.scaffold:ScaffoldTrainer"
    assert scaffold["plan"]["strategy"]["options"] == {"devices": 50}
    last = {
        name: np.mean([r["accuracy"] for r in report["rounds"][-5:]])
        for name, report in (("scaffold", scaffold), ("fedavg", fedavg))
    }
    # Two classes a device: local steps drift apart; the control variates pull them back.
    assert last["scaffold"] > last["fedavg"] + 0.05, last
    # The control variates travel too: about twice the bytes each way.
    assert scaffold["final"]["bytes_up"] > 1.8 * fedavg["final"]["bytes_up"]


def test_a_trainer_on_worker_processes_gives_the_same_report(tmp_path: Path) -> None:
    plan = SCAFFOLD.format(rounds=3, train=TRAINER, strategy=STRATEGY)
    inline, pooled = _run(tmp_path, "a", plan), _run(tmp_path, "b", plan, "--workers", "2")
    assert [r["accuracy"] for r in inline["rounds"]] == [r["accuracy"] for r in pooled["rounds"]]


def test_each_device_keeps_its_control_variate_between_rounds(tmp_path: Path) -> None:
    state = tmp_path / "state"
    report = _run(
        tmp_path,
        "kept",
        SCAFFOLD.format(rounds=4, train=TRAINER, strategy=STRATEGY),
        "--state-dir",
        str(state),
    )
    (path,) = state.glob("devices-*.sqlite")
    db = sqlite_utils.Database(path)
    took_part = sum(r["updates"] for r in report["rounds"])
    kept = [DeviceState(db, key=f"device-{i}").trainer_state("digits") for i in range(50)]
    held = [decode_tensors(k)[0] for k in kept if k is not None]
    names = {f"c.fc{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    assert 0 < len(held) <= took_part and all(set(h) == names for h in held)
    assert all(any(np.abs(v).sum() > 0 for v in h.values()) for h in held)


def test_trainer_settings_it_cannot_honour_are_refused(tmp_path: Path, capsys: Any) -> None:
    plan = SCAFFOLD.format(rounds=2, train=TRAINER + "\nmomentum = 0.9", strategy=STRATEGY)
    (tmp_path / "p.toml").write_text(plan)
    args = ["run", "--plan", str(tmp_path / "p.toml"), "--devices", "10", "--quiet"]
    assert fedsim([*args, "--report", str(tmp_path / "r.json")]) == 2
    assert "cannot honour the plan's [train] momentum" in capsys.readouterr().err
    unknown = SCAFFOLD.format(rounds=2, train=TRAINER + "\nsmoothing = 0.5", strategy=STRATEGY)
    (tmp_path / "u.toml").write_text(unknown)
    args = ["run", "--plan", str(tmp_path / "u.toml"), "--devices", "10", "--quiet"]
    assert fedsim([*args, "--report", str(tmp_path / "r.json")]) == 2
    assert "takes no setting 'smoothing'" in capsys.readouterr().err
    with pytest.raises(InvalidInput, match="unknown field `smoothing`"):  # no trainer: a typo
        plan_from_dict({"job": {"name": "x"}, "train": {"smoothing": 0.5}})


def _scaffold_service() -> tuple[FederationService, Any, ManualClock]:
    plan = plan_from_dict(
        {
            "job": {"name": "digits", "rounds": 3, "devices_per_round": 1},
            "model": {"kind": "mlp", "inputs": 64, "hidden": [8], "classes": 10},
            "train": {"epochs": 1, "trainer": "fedclient.sim.scaffold:ScaffoldTrainer"},
            "strategy": {"name": "fedclient.sim.scaffold:Scaffold", "devices": 4},
        }
    )
    clock = ManualClock()
    service = FederationService(ServerStore(), clock=clock)
    service.add_job(plan)
    return service, plan, clock


@pytest.mark.anyio
async def test_a_device_without_the_plan_s_trainer_refuses_and_leaves(digits: Any) -> None:
    service, _, clock = _scaffold_service()
    device = fedclient.Client(
        "http://fl",
        "digits",
        (digits.x_train[:40], digits.y_train[:40]),
        transport=Server(service, clock).transport(),
        seed=1,
    )
    with pytest.raises(InvalidInput, match="does not hold"):
        await device.arun_once()
    assert service.store.admitted_count(service.store.latest_rounds("digits", 1)[0].round_id) == 0
    holding = fedclient.Client(
        "http://fl",
        "digits",
        (digits.x_train[:40], digits.y_train[:40]),
        transport=Server(service, clock).transport(),
        seed=2,
        trainers={"fedclient.sim.scaffold:ScaffoldTrainer": ScaffoldTrainer()},
    )
    assert (await holding.arun_once()).status == "uploaded"
    held = service.store.strategy_state("digits")
    assert held is not None and set(decode_tensors(held)[0]) == {
        "c.fc1.weight",
        "c.fc1.bias",
        "c.fc2.weight",
        "c.fc2.bias",
    }


@pytest.mark.anyio
async def test_the_server_checks_extra_tensors_and_serves_the_broadcast(digits: Any) -> None:
    service, plan, clock = _scaffold_service()
    server = Server(service, clock)
    async with server.http() as http:
        auth = await enrol(http)
        admitted = await http.post("/v1/jobs/digits/checkin", json={}, headers=auth)
        round_id = admitted.json()["plan"]["round_id"]
        zeros = {k: np.zeros_like(v) for k, v in NumpyModel(plan.model).get_weights().items()}
        meta = {"num_examples": "10", "model_version": "0", "round_id": str(round_id)}

        async def upload(extras: dict[str, np.ndarray], key: str) -> httpx.Response:
            return await http.post(
                f"/v1/rounds/{round_id}/updates",
                content=encode_tensors(with_extras(zeros, extras), meta),
                headers={**auth, "Idempotency-Key": key, "Content-Type": TENSOR_MEDIA_TYPE},
            )

        bad = {"c.fc1.bias": np.full(8, np.nan, np.float32)}
        assert (await upload(bad, "k1")).status_code == 400
        huge = {"c.x": np.zeros(5 * sum(v.size for v in zeros.values()), np.float32)}
        assert (await upload(huge, "k2")).status_code == 400
        first = await http.get(BROADCAST.url(job="digits", version=0), headers=auth)
        assert first.status_code == 200 and decode_tensors(first.content)[0] == {}
        good = {f"c.{k}": np.ones_like(v) for k, v in zeros.items()}
        assert (await upload(good, "k3")).status_code == 200
        after = await http.get(BROADCAST.url(job="digits", version=1), headers=auth)
        c = decode_tensors(after.content)[0]
        np.testing.assert_allclose(c["c.fc1.bias"], np.full(8, 1 / 4))  # |S| / N = 1 / 4
        stale = await http.get(BROADCAST.url(job="digits", version=0), headers=auth)
        assert stale.status_code == 409


@pytest.mark.anyio
async def test_a_strategy_that_reads_no_extras_refuses_them(server: Server) -> None:
    async with server.http() as http:
        auth = await enrol(http)
        admitted = await http.post("/v1/jobs/digits/checkin", json={}, headers=auth)
        round_id = admitted.json()["plan"]["round_id"]
        zeros = {
            k: np.zeros_like(v)
            for k, v in NumpyModel(ModelSpec("mlp", 64, [16], 10), seed=7).get_weights().items()
        }
        meta = {"num_examples": "10", "model_version": "0", "round_id": str(round_id)}
        answer = await http.post(
            f"/v1/rounds/{round_id}/updates",
            content=encode_tensors(with_extras(zeros, {"c": np.ones(3, np.float32)}), meta),
            headers={**auth, "Idempotency-Key": "k", "Content-Type": TENSOR_MEDIA_TYPE},
        )
        assert answer.status_code == 400 and "takes no extra tensors" in answer.text
