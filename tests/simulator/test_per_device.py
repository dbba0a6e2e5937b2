"""fedsim --per-device: who took part in each round, the partition, and each device's final
accuracy on its own held-out data (by natural user where the data set names them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedclient.protocol import decode_tensors
from fedclient.runtime import create_backend
from fedclient.server import plan_from_dict
from fedclient.sim.cli import main as fedsim
from fedclient.sim.config import SimulationConfig
from fedclient.sim.datasets import load_dataset
from fedclient.sim.registry import register_devices
from tests.conftest import SHARED_DATA

RUN = ["run", "--devices", "20", "--devices-per-round", "5", "--rounds", "3", "--epochs", "1"]


def _run(tmp_path: Path, *flags: str) -> dict[str, Any]:
    out = tmp_path / "r.json"
    assert fedsim([*flags, "--quiet", "--no-plot", "--report", str(out)]) == 0
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def test_per_device_accuracies_are_each_device_s_own_evaluation(tmp_path: Path) -> None:
    model = tmp_path / "final.safetensors"
    flags = ["--partition", "dirichlet:0.3", "--seed", "6", "--per-device"]
    report = _run(tmp_path, *RUN, *flags, "--save-model", str(model))
    # Each device, evaluated here on its own share of the test set, with the saved model.
    config = SimulationConfig(**report["config"])
    data = load_dataset("digits", seed=config.seed)
    plan = plan_from_dict(report["plan"])
    weights, metadata = decode_tensors(model.read_bytes())
    assert int(metadata["model_version"]) == report["final"]["model_version"]
    backend = create_backend(plan.model)
    backend.set_weights(weights)
    registry = register_devices(config, plan, data)
    assert [e["device"] for e in report["devices"]] == list(range(len(registry)))
    assert registry.held_out is not None
    for entry, held_out in zip(report["devices"], registry.held_out, strict=True):
        examples = registry.examples(entry["device"])
        assert held_out is not None and entry["held_out"] == len(held_out)
        own = backend.evaluate(data.x_test[held_out], data.y_test[held_out])
        assert entry["accuracy"] == round(own.accuracy, 6), entry
        assert entry["examples"] == len(examples)
        assert entry["classes"] == len(np.unique(data.y_train[examples]))
    # The shares split the test set: weighted by their sizes, they are its accuracy.
    held = np.array([e["held_out"] for e in report["devices"]])
    accuracy = np.array([e["accuracy"] for e in report["devices"]])
    assert held.sum() == len(data.y_test)
    assert abs(float(held @ accuracy) / held.sum() - report["final"]["accuracy"]) < 1e-5
    spread = report["final"]["device_accuracy"]
    assert spread["devices"] == 20 and spread["min"] <= spread["median"] <= spread["max"]
    assert spread["mean"] == pytest.approx(accuracy.mean(), abs=1e-6)
    assert spread["std"] == pytest.approx(accuracy.std(), abs=1e-6)
    # A Dirichlet(0.3) split: devices hold few classes, unevenly.
    assert report["partition"]["classes_per_device"]["mean"] < 10
    assert report["partition"]["examples"]["min"] < report["partition"]["examples"]["max"]


def test_each_round_names_its_participants(tmp_path: Path) -> None:
    report = _run(tmp_path, *RUN, "--seed", "2", "--per-device", "--over-selection", "1.4")
    for record in report["rounds"]:
        assert len(record["participants"]) == record["updates"] == 5
        assert len(set(record["participants"])) == 5
    taken = {e["device"]: e["updates"] for e in report["devices"]}
    for i in range(20):
        assert taken[i] == sum(i in r["participants"] for r in report["rounds"])
    # Without the flag the participants are still named; the devices are not listed.
    plain = _run(tmp_path, *RUN, "--seed", "2", "--over-selection", "1.4")
    assert [r["participants"] for r in plain["rounds"]] == [
        r["participants"] for r in report["rounds"]
    ]
    assert "devices" not in plain and "device_accuracy" not in plain["final"]


def test_a_natural_split_evaluates_each_user_on_their_own_test_examples(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    users = np.repeat(np.array(["ann", "bob", "cy", "dee"]), 50)
    x = rng.random((200, 4)).astype(np.float32)
    y = rng.integers(0, 2, 200)
    data = tmp_path / "users.npz"
    np.savez(data, x=x, y=y, user=users)
    report = _run(
        tmp_path, "run", "--dataset", f"npz:{data}", "--partition", "natural", "--rounds", "2",
        "--devices-per-round", "2", "--per-device",
    )  # fmt: skip
    loaded = load_dataset(f"npz:{data}", seed=0)
    assert loaded.test_users is not None
    expected = [int(np.sum(loaded.test_users == u)) for u in ("ann", "bob", "cy", "dee")]
    assert [e["held_out"] for e in report["devices"]] == expected
    assert sum(expected) == len(loaded.y_test)


@pytest.mark.skipif(
    not (SHARED_DATA / "femnist").is_dir(),
    reason=f"FEMNIST file not found in {SHARED_DATA}/femnist (set FEDCLIENT_DATA)",
)
def test_femnist_evaluates_each_writer_on_their_own_test_examples(tmp_path: Path) -> None:
    plan = tmp_path / "plan.toml"
    plan.write_text(
        '[job]\nname = "femnist"\nrounds = 1\ndevices_per_round = 5\nseed = 1\n'
        '[model]\nkind = "mlp"\ninputs = 784\nhidden = [32]\nclasses = 62\n'
        "[train]\nepochs = 1\n[evaluate]\nevery = 1\n"
    )
    report = _run(
        tmp_path, "run", "--plan", str(plan), "--dataset", "femnist", "--data-dir",
        str(SHARED_DATA), "--partition", "natural", "--per-device",
    )  # fmt: skip
    data = load_dataset("femnist", SHARED_DATA)
    assert data.test_users is not None and data.users is not None
    writers = np.unique(data.users)
    held = [e["held_out"] for e in report["devices"]]
    assert held == [int(np.sum(data.test_users == w)) for w in writers]
    assert report["rounds"][0]["evaluated"] >= 1  # the writers measured the model themselves
