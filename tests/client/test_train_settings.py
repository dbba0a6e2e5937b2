"""A plan's training settings: the numpy models follow each one as torch.optim does, and
a runtime that cannot follow one refuses it before anything trains."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

import fedclient
from fedclient import InvalidInput, TrainTask
from fedclient.protocol import ModelSpec, TrainSettings
from fedclient.runtime import NumpyModel, check_train_options, schedule_factor
from fedclient.server import FederationService, ServerStore, plan_from_dict
from fedclient.sim.cli import main as fedsim
from tests.conftest import ManualClock, Server

torch = pytest.importorskip("torch")

SPEC = ModelSpec("mlp", 6, [5], 3)


def _data(n: int = 23) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    return rng.normal(size=(n, SPEC.inputs)).astype(np.float32), rng.integers(0, 3, n)


def _torch_run(
    weights: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    *,
    steps: int,
    batch_size: int,
    seed: int,
    learning_rate: float,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    clip: float | None = None,
    schedule: str = "constant",
) -> dict[str, np.ndarray]:
    """The same training in PyTorch, on the batches `NumpyWeights.train` draws."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    net = net.double()
    names = {"0.weight": "fc1.weight", "0.bias": "fc1.bias", "2.weight": "fc2.weight"}
    names["2.bias"] = "fc2.bias"
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.from_numpy(weights[names[name]].astype(np.float64)))
    params = list(net.parameters())
    if optimizer == "adam":
        opt: Any = torch.optim.Adam(params, lr=learning_rate, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(
            params, lr=learning_rate, momentum=momentum, weight_decay=weight_decay
        )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: schedule_factor(schedule, step, steps)
    )
    rng = np.random.default_rng(seed)
    xt, yt = torch.from_numpy(x.astype(np.float64)), torch.from_numpy(y)
    done = 0
    while done < steps:
        order = rng.permutation(len(y))
        for start in range(0, len(y), batch_size):
            if done == steps:
                break
            idx = torch.from_numpy(order[start : start + batch_size])
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx]).backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            sched.step()
            done += 1
    return {names[n]: p.detach().numpy() for n, p in net.named_parameters()}


@pytest.mark.parametrize(
    "options",
    [
        {"momentum": 0.9},
        {"momentum": 0.5, "weight_decay": 0.01},
        {"optimizer": "adam"},
        {"optimizer": "adam", "weight_decay": 0.1},
        {"clip_grad_norm": 0.05},
        {"clip_grad_norm": 0.05, "momentum": 0.9, "weight_decay": 0.01},
        {"lr_schedule": "cosine", "momentum": 0.9},
        {"lr_schedule": "linear"},
        {"local_steps": 11},
    ],
)
def test_numpy_training_matches_torch_optim(options: dict[str, Any]) -> None:
    x, y = _data()
    model = NumpyModel(SPEC, seed=1, dtype=np.float64)
    start = model.get_weights()
    rate = 0.01 if options.get("optimizer") == "adam" else 0.3
    result = model.train(
        x, y, epochs=3, batch_size=4, learning_rate=rate, rng=np.random.default_rng(5), **options
    )
    steps = options.get("local_steps") or 3 * math.ceil(23 / 4)
    assert result.steps == steps and result.num_examples == 23
    expected = _torch_run(
        start,
        x,
        y,
        steps=steps,
        batch_size=4,
        seed=5,
        learning_rate=rate,
        optimizer=options.get("optimizer", "sgd"),
        momentum=options.get("momentum", 0.0),
        weight_decay=options.get("weight_decay", 0.0),
        clip=options.get("clip_grad_norm"),
        schedule=options.get("lr_schedule", "constant"),
    )
    trained = model.get_weights()
    for name, value in expected.items():
        np.testing.assert_allclose(trained[name], value, rtol=1e-7, atol=1e-9, err_msg=name)
    # Each setting changes the training: the default path would not give these weights.
    plain = NumpyModel(SPEC, seed=1, dtype=np.float64)
    plain.train(x, y, epochs=3, batch_size=4, learning_rate=rate, rng=np.random.default_rng(5))
    assert any(not np.allclose(plain.get_weights()[k], v) for k, v in trained.items())


def test_schedules_and_the_per_round_decay() -> None:
    assert schedule_factor("cosine", 0, 10) == 1.0
    assert schedule_factor("cosine", 5, 10) == pytest.approx(0.5)
    assert schedule_factor("linear", 5, 10) == 0.5
    train = TrainSettings(learning_rate=0.2, lr_decay=0.5)
    assert [train.round_learning_rate(r) for r in (1, 2, 3)] == [0.2, 0.1, 0.05]
    assert train.options() == {}  # lr_decay is the device's to apply: any runtime can
    assert TrainSettings(local_steps=3, momentum=0.9).options() == {
        "local_steps": 3,
        "momentum": 0.9,
    }
    assert TrainSettings(local_steps=3, batch_size=10).work(1000) == 30
    with pytest.raises(InvalidInput, match="adam keeps moments"):
        plan_from_dict({"job": {"name": "x"}, "train": {"optimizer": "adam", "momentum": 0.9}})
    with pytest.raises(InvalidInput, match="lr_decay"):
        plan_from_dict({"job": {"name": "x"}, "train": {"lr_decay": 1.5}})


class PlainSgd(NumpyModel):
    """A backend whose training is plain SGD: it lists no options."""

    train_options = frozenset()


def test_a_runtime_refuses_what_it_cannot_honour_before_training() -> None:
    x, y = _data()
    backend = PlainSgd(SPEC)
    weights = backend.get_weights()
    task = TrainTask(backend, weights, x, y, 1, 4, 0.1, 0, options={"momentum": 0.9})
    with pytest.raises(InvalidInput, match=r"cannot honour the plan's \[train\] momentum = 0.9"):
        task.run()
    with pytest.raises(InvalidInput, match="proximal_mu"):
        TrainTask(backend, weights, x, y, 1, 4, 0.1, 0, proximal_mu=0.1).run()
    check_train_options(NumpyModel(SPEC), {"momentum": 0.9, "local_steps": 3})  # honoured
    _, result, _ = TrainTask(NumpyModel(SPEC), weights, x, y, 1, 4, 0.1, 0).run()
    assert result.steps == 6


def _plan(tmp_path: Path, train: str) -> Path:
    plan = tmp_path / "plan.toml"
    plan.write_text(
        '[job]\nname = "digits"\nrounds = 3\ndevices_per_round = 4\nseed = 2\n'
        '[model]\nkind = "mlp"\ninputs = 64\nhidden = [16]\nclasses = 10\n'
        f"[train]\nepochs = 1\n{train}\n"
    )
    return plan


@pytest.mark.parametrize("runtime", ["onnx", "tflite"])
def test_fedsim_refuses_momentum_on_a_runtime_of_plain_sgd(
    tmp_path: Path, capsys: Any, runtime: str
) -> None:
    plan = _plan(tmp_path, "momentum = 0.9")
    out = tmp_path / "r.json"
    args = ["run", "--plan", str(plan), "--devices", "8", "--quiet", "--report", str(out)]
    assert fedsim([*args, "--runtime", runtime]) == 2
    err = capsys.readouterr().err
    assert f"the {runtime} runtime cannot honour" in err and "momentum = 0.9" in err
    assert not out.exists()


def test_fedsim_trains_with_the_plan_s_settings(tmp_path: Path) -> None:
    reports = {}
    for name, train in (
        ("plain", ""),
        ("tuned", 'momentum = 0.9\nweight_decay = 1e-4\nlr_decay = 0.5\nlr_schedule = "cosine"'),
        ("steps", "local_steps = 3"),
    ):
        out = tmp_path / f"{name}.json"
        plan = _plan(tmp_path, train)
        assert fedsim(["run", "--plan", str(plan), "--devices", "8", "--quiet", "--no-plot",
                       "--fleet", "uniform", "--report", str(out)]) == 0  # fmt: skip
        reports[name] = json.loads(out.read_text())
    tuned = reports["tuned"]["plan"]["train"]
    assert (tuned["momentum"], tuned["lr_decay"], tuned["lr_schedule"]) == (0.9, 0.5, "cosine")
    accuracy = {k: [r["accuracy"] for r in v["rounds"]] for k, v in reports.items()}
    assert accuracy["tuned"] != accuracy["plain"] != accuracy["steps"]
    # Three steps of 8 examples take less simulated time than an epoch of ~140.
    seconds = {k: v["rounds"][0]["round_seconds"] for k, v in reports.items()}
    assert seconds["steps"] < seconds["plain"]


class RecordingModel(NumpyModel):
    """Records the learning rate and options each round's training was asked for."""

    asked: ClassVar[list[tuple[float, dict[str, Any]]]] = []

    def train(self, x: Any, y: Any, *, learning_rate: float, **kwargs: Any) -> Any:
        options = {k: v for k, v in kwargs.items() if k not in ("epochs", "batch_size", "rng")}
        RecordingModel.asked.append((learning_rate, options))
        return super().train(x, y, learning_rate=learning_rate, **kwargs)


@pytest.mark.anyio
async def test_a_device_trains_each_round_as_its_plan_says(digits: Any) -> None:
    plan = plan_from_dict(
        {
            "job": {"name": "digits", "rounds": 3, "devices_per_round": 1},
            "model": {"kind": "mlp", "inputs": 64, "hidden": [8], "classes": 10},
            "train": {"learning_rate": 0.4, "lr_decay": 0.5, "momentum": 0.9, "local_steps": 2},
        }
    )
    clock = ManualClock()
    service = FederationService(ServerStore(), clock=clock)
    service.add_job(plan)
    device = fedclient.Client(
        "http://fl",
        "digits",
        (digits.x_train[:50], digits.y_train[:50]),
        transport=Server(service, clock).transport(),
        model=RecordingModel(plan.model),
        seed=1,
    )
    RecordingModel.asked.clear()
    for _ in range(3):
        assert (await device.arun_once()).status == "uploaded"
    assert [rate for rate, _ in RecordingModel.asked] == [0.4, 0.2, 0.1]
    assert all(o == {"momentum": 0.9, "local_steps": 2} for _, o in RecordingModel.asked)


@pytest.mark.anyio
async def test_a_device_whose_runtime_cannot_follow_the_plan_leaves_the_round(
    digits: Any,
) -> None:
    plan = plan_from_dict(
        {
            "job": {"name": "digits", "rounds": 2, "devices_per_round": 1},
            "model": {"kind": "mlp", "inputs": 64, "hidden": [8], "classes": 10},
            "train": {"momentum": 0.9},
        }
    )
    clock = ManualClock()
    service = FederationService(ServerStore(), clock=clock)
    service.add_job(plan)
    device = fedclient.Client(
        "http://fl",
        "digits",
        (digits.x_train[:40], digits.y_train[:40]),
        transport=Server(service, clock).transport(),
        model=PlainSgd(plan.model),
        seed=1,
    )
    with pytest.raises(InvalidInput, match=r"momentum = 0\.9"):
        await device.arun_once()
    round_id = service.store.latest_rounds("digits", 1)[0].round_id
    assert service.store.admitted_count(round_id) == 0  # its place went back
