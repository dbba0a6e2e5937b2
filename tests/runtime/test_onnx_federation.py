"""Numpy and ONNX Runtime devices train one model in one job; fedsim runs on either runtime."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

import fedclient
from fedclient.protocol import decode_tensors
from fedclient.runtime import NumpyModel
from fedclient.sim.cli import main as fedsim
from fedclient.sim.datasets import Dataset
from tests.conftest import Server

pytestmark = pytest.mark.anyio

ROUNDS = 4


async def _federate(server: Server, devices: list[fedclient.Client]) -> dict[str, np.ndarray]:
    """Run the job to its end; every device offers itself in turn. The final model."""
    for _ in range(ROUNDS * len(devices)):
        outcomes = [await d.arun_once() for d in devices]
        if all(o.status == "finished" for o in outcomes):
            break
    job = server.store.job("digits")
    assert job is not None and job.model_version == ROUNDS
    stored = server.store.model("digits", job.model_version)
    assert stored is not None
    return decode_tensors(stored[0])[0]


async def test_a_mixed_fleet_trains_the_same_model_as_a_numpy_fleet(
    make_server: Callable[..., Server], make_devices: Any, digits: Dataset
) -> None:
    finals = {}
    runtimes: dict[str, list[str]] = {}
    for fleet in ("numpy", "mixed"):
        server = make_server(rounds=ROUNDS, devices_per_round=4, min_devices=4, over_selection=1.0)
        devices = make_devices(
            8,
            server.transport(),
            per_device={
                "runtime": lambda i, f=fleet: "onnx" if f == "mixed" and i % 2 else "numpy"
            },
        )
        finals[fleet] = await _federate(server, devices)
        runtimes[fleet] = [type(d.model).__name__ for d in devices]
        assert all(len(d.device_state.receipts("digits")) >= 1 for d in devices)
    assert runtimes["mixed"].count("OnnxBackend") == runtimes["mixed"].count("NumpyModel") == 4
    # Runtimes agree to float32 rounding, so the fleet's mix does not change the model.
    for name, value in finals["numpy"].items():
        np.testing.assert_allclose(finals["mixed"][name], value, atol=1e-4, err_msg=name)
    model = NumpyModel(fedclient.protocol.ModelSpec("mlp", 64, [16], 10), seed=7)
    before = model.evaluate(digits.x_test, digits.y_test)
    model.set_weights(finals["mixed"])
    after = model.evaluate(digits.x_test, digits.y_test)
    assert before.accuracy < 0.2 < 0.5 < after.accuracy  # 4 short rounds; chance is 0.1


def test_fedsim_runs_on_the_onnx_runtime_like_on_numpy(tmp_path: Path) -> None:
    small = [
        "run",
        "--dataset",
        "digits",
        "--devices",
        "12",
        "--devices-per-round",
        "4",
        "--rounds",
        "3",
        "--partition",
        "dirichlet:0.5",
        "--seed",
        "2",
        "--quiet",
    ]
    reports = {}
    for runtime in ("numpy", "onnx"):
        path = tmp_path / f"{runtime}.json"
        assert fedsim([*small, "--runtime", runtime, "--report", str(path)]) == 0
        reports[runtime] = json.loads(path.read_text())
    assert reports["onnx"]["config"]["runtime"] == "onnx"
    accuracy = {k: [r["accuracy"] for r in v["rounds"]] for k, v in reports.items()}
    assert len(accuracy["onnx"]) == 3
    np.testing.assert_allclose(accuracy["onnx"], accuracy["numpy"], atol=1e-3)
