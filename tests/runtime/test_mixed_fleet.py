"""Numpy, ONNX Runtime and TFLite devices train one model in one job; fedsim runs on TFLite."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytest.importorskip("ai_edge_litert", reason="the tflite extra is not installed")

import fedclient
from fedclient.protocol import ModelSpec, decode_tensors
from fedclient.runtime import NumpyModel
from fedclient.server import FederationService, ServerStore
from fedclient.sim.cli import main as fedsim
from fedclient.sim.datasets import Dataset
from tests.conftest import ManualClock, Server, make_plan

pytestmark = pytest.mark.anyio

ROUNDS = 5
EPOCHS = 3
RUNTIMES = ("numpy", "onnx", "tflite")
BACKENDS = {"numpy": "NumpyModel", "onnx": "OnnxBackend", "tflite": "TfliteBackend"}


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


def _server(model: ModelSpec) -> Server:
    """An in-process server running the tests' digits job with ``model``."""
    clock = ManualClock()
    service = FederationService(ServerStore(":memory:"), clock=clock)
    plan = make_plan(rounds=ROUNDS, devices_per_round=6, min_devices=6, over_selection=1.0)
    train = msgspec.structs.replace(plan.train, epochs=EPOCHS)
    service.add_job(msgspec.structs.replace(plan, model=model, train=train))
    return Server(service, clock)


@pytest.mark.parametrize(
    ("model", "atol"),
    [
        # Softmax regression is smooth: the runtimes agree to float32 rounding all the way.
        (ModelSpec("softmax", 64, [], 10), 1e-5),
        # An MLP is not: on one device, a hidden unit's input of 6e-8 rounds to -1e-8 in
        # numpy's float32 matmul (ONNX Runtime and LiteRT keep its sign), so the ReLU passes
        # a gradient in one runtime and not in the other, and the final models part by
        # ~4e-3 (measured); the fleets still reach the same accuracy.
        (ModelSpec("mlp", 64, [16], 10), 2e-2),
    ],
    ids=["softmax-64-10", "mlp-64-16-10"],
)
async def test_numpy_onnx_and_tflite_devices_train_one_model_to_convergence(
    model: ModelSpec, atol: float, make_devices: Any, digits: Dataset
) -> None:
    finals = {}
    for fleet in ("numpy", "mixed"):
        # The plan's batch of 8 is below the TFLite models' fixed 16: every step pads and masks.
        server = _server(model)
        devices = make_devices(
            9,
            server.transport(),
            per_device={"runtime": lambda i, f=fleet: RUNTIMES[i % 3] if f == "mixed" else "numpy"},
        )
        finals[fleet] = await _federate(server, devices)
        if fleet == "mixed":
            kinds = [type(d.model).__name__ for d in devices]
            assert Counter(kinds) == {backend: 3 for backend in BACKENDS.values()}
            for d in devices:  # every device, on every runtime, had an update accepted
                assert len(d.device_state.receipts("digits")) >= 1, d.runtime
    for name, value in finals["numpy"].items():
        np.testing.assert_allclose(finals["mixed"][name], value, atol=atol, err_msg=name)
    reference = NumpyModel(model, seed=7)
    before = reference.evaluate(digits.x_test, digits.y_test)
    after = {}
    for fleet, weights in finals.items():
        reference.set_weights(weights)
        after[fleet] = reference.evaluate(digits.x_test, digits.y_test)
    assert before.accuracy < 0.2  # chance is 0.1
    assert after["mixed"].accuracy > 0.8 and after["mixed"].loss < before.loss / 3
    assert after["mixed"].accuracy == pytest.approx(after["numpy"].accuracy, abs=0.01)


def test_fedsim_runs_on_the_tflite_runtime_like_on_numpy(tmp_path: Path) -> None:
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
    for runtime in ("numpy", "tflite"):
        path = tmp_path / f"{runtime}.json"
        assert fedsim([*small, "--runtime", runtime, "--report", str(path)]) == 0
        reports[runtime] = json.loads(path.read_text())
    assert reports["tflite"]["config"]["runtime"] == "tflite"
    accuracy = {k: [r["accuracy"] for r in v["rounds"]] for k, v in reports.items()}
    assert len(accuracy["tflite"]) == 3
    np.testing.assert_allclose(accuracy["tflite"], accuracy["numpy"], atol=1e-3)
