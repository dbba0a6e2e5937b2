"""Federated evaluation: devices measure the round's model on their held-out data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedclient
from fedclient.protocol import TENSOR_MEDIA_TYPE, decode_tensors, encode_tensors
from fedclient.server import FederationService, ServerStore, plan_from_dict
from fedclient.sim.cli import main as fedsim
from tests.conftest import ManualClock, Server, enrol, step_until

pytestmark = pytest.mark.anyio


def _server(db: str, every: int = 1, devices: int = 2, **privacy: Any) -> Server:
    plan = plan_from_dict(
        {
            "job": {
                "name": "digits",
                "rounds": 4,
                "devices_per_round": 3,
                "over_selection": 1.3,
                "seed": 1,
            },
            "model": {"kind": "softmax", "inputs": 64, "hidden": [], "classes": 10},
            "train": {"epochs": 1, "batch_size": 8, "learning_rate": 0.1},
            "evaluate": {"every": every, "devices": devices},
            **({"privacy": privacy} if privacy else {}),
        }
    )
    clock = ManualClock()
    service = FederationService(ServerStore(db), clock=clock)
    service.add_job(plan)
    return Server(service, clock)


async def test_the_first_devices_evaluate_the_model_they_received(
    db_url: Any, make_devices: Any, digits: Any
) -> None:
    server = _server(db_url(), devices=2)
    held_out = (digits.x_test, digits.y_test)
    devices = make_devices(3, server.transport(), eval_data=held_out)
    for device in devices:
        assert (await device.arun_once()).status == "uploaded"
    summary = server.service.round_status("digits", 1)
    # Two of three evaluated, on their held-out data, the model of version 0.
    assert summary.evaluated == 2
    backend = fedclient.create_backend(server.service.job_status("digits").plan.model)
    body, _ = server.store.model("digits", 0) or (b"", "")
    backend.set_weights(decode_tensors(body)[0])
    expected = backend.evaluate(*held_out)
    assert summary.federated_accuracy == pytest.approx(expected.accuracy)
    assert summary.federated_loss == pytest.approx(expected.loss, rel=1e-5)
    # The round's model is unchanged by evaluating: it trained on its training data only.
    assert server.service.job_status("digits").model_version == 1


async def test_a_device_whose_update_came_too_late_still_reports_its_evaluation(
    db_url: Any, make_devices: Any, digits: Any
) -> None:
    server = _server(db_url(), devices=0)  # every admitted device evaluates
    # The plan closes a round at 3 updates and admits 3 x 1.3 = 4.
    halves = [
        (digits.x_test[:180], digits.y_test[:180]),
        (digits.x_test[180:], digits.y_test[180:]),
    ]
    first, second, third, late = make_devices(
        4, server.transport(), per_device={"eval_data": lambda i: halves[i % 2]}
    )
    await step_until(late, fedclient.Phase.TRAINED)  # admitted, evaluated, trained...
    for device in (first, second, third):
        assert (await device.arun_once()).status == "uploaded"  # ...and the quota of 3 closes it
    outcome = await late.astep()
    assert outcome.status == "discarded" and server.store.update_count(1) == 3
    summary = server.service.round_status("digits", 1)
    assert summary.evaluated == 4  # the late device's measure counts too
    backend = fedclient.create_backend(server.service.job_status("digits").plan.model)
    body, _ = server.store.model("digits", 0) or (b"", "")
    backend.set_weights(decode_tensors(body)[0])
    correct = examples = 0
    for x, y in (halves[0], halves[1], halves[0], halves[1]):
        measured = backend.evaluate(x, y)
        correct += round(measured.accuracy * len(y))
        examples += len(y)
    assert summary.federated_accuracy == pytest.approx(correct / examples)


async def test_an_evaluation_on_its_own_comes_only_from_a_device_asked_and_counts_once(
    db_url: Any,
) -> None:
    server = _server(db_url(), devices=1)
    async with server.http() as http:
        asked, other, stranger = [await enrol(http) for _ in range(3)]
        for auth in (asked, other):
            await http.post("/v1/jobs/digits/checkin", json={}, headers=auth)
        report = {"correct": 3, "loss_sum": 2.5, "examples": 4}
        url = "/v1/rounds/1/evaluation"
        assert (await http.post(url, json=report, headers=asked)).status_code == 200
        assert (await http.post(url, json=report, headers=asked)).status_code == 200
        summary = server.service.round_status("digits", 1)
        assert (summary.evaluated, summary.federated_accuracy) == (1, 0.75)
        before = server.store.fingerprint()
        for auth, body, status in [
            (other, report, 403),  # admitted, but not among the first 1 asked
            (stranger, report, 403),  # not admitted
            (asked, {**report, "correct": 5}, 400),  # more correct than examples
            (asked, {**report, "loss_sum": -1.0}, 400),
            (asked, {"correct": 1}, 400),
        ]:
            assert (await http.post(url, json=body, headers=auth)).status_code == status
        assert (
            await http.post("/v1/rounds/99/evaluation", json=report, headers=asked)
        ).status_code == 404
        assert server.store.fingerprint() == before


async def test_evaluation_stays_off_unless_asked_and_every_k_rounds(
    db_url: Any, make_devices: Any
) -> None:
    server = _server(db_url(), every=2, devices=0)
    devices = make_devices(3, server.transport())
    for _ in range(2):
        for device in devices:
            assert (await device.arun_once()).status == "uploaded"
    assert server.service.round_status("digits", 1).evaluated == 0  # round 1: not a 2nd
    assert server.service.round_status("digits", 2).evaluated == 3  # devices=0: all


async def test_a_dp_device_sends_no_evaluation(db_url: Any, make_devices: Any) -> None:
    # Unnoised counts about the data do not travel beside a DP release.
    server = _server(db_url(), dp_epsilon=8.0, clip=1.0)
    (device,) = make_devices(1, server.transport())
    await step_until(device, fedclient.Phase.TRAINED)
    held = device.device_state.progress("digits").update
    assert held is not None and "eval_examples" not in decode_tensors(held)[1]


@pytest.mark.parametrize(
    "counts",
    [
        {"eval_correct": "5", "eval_loss_sum": "1.0", "eval_examples": "4"},  # correct > n
        {"eval_correct": "1", "eval_loss_sum": "nan", "eval_examples": "4"},
        {"eval_correct": "1", "eval_loss_sum": "-1", "eval_examples": "4"},
        {"eval_correct": "x", "eval_loss_sum": "1.0", "eval_examples": "4"},
        {"eval_examples": "4"},
    ],
)
async def test_bad_evaluation_counts_are_refused(db_url: Any, counts: dict[str, str]) -> None:
    server = _server(db_url())
    async with server.http() as http:
        auth = await enrol(http)
        plan = (await http.post("/v1/jobs/digits/checkin", json={}, headers=auth)).json()["plan"]
        body, _ = server.store.model("digits", 0) or (b"", "")
        delta = {k: np.zeros_like(v) for k, v in decode_tensors(body)[0].items()}
        meta = {"num_examples": "4", "model_version": "0", **counts}
        before = server.store.fingerprint()
        answer = await http.post(
            f"/v1/rounds/{plan['round_id']}/updates",
            content=encode_tensors(delta, meta),
            headers={**auth, "Idempotency-Key": "k", "Content-Type": TENSOR_MEDIA_TYPE},
        )
        assert answer.status_code == 400
        assert server.store.fingerprint() == before


def test_fedsim_runs_a_plan_file_and_reports_federated_accuracy(tmp_path: Path) -> None:
    plan = tmp_path / "plan.toml"
    plan.write_text(
        "\n".join(
            [
                "[job]",
                'name = "digits"',
                "rounds = 3",
                "devices_per_round = 5",
                "min_devices = 3",
                "seed = 1",
                "[model]",
                'kind = "mlp"',
                "inputs = 64",
                "hidden = [32]",
                "classes = 10",
                "[evaluate]",
                "every = 1",
                "devices = 4",
            ]
        )
    )
    report = tmp_path / "r.json"
    assert (
        fedsim(
            [
                "run",
                "--plan",
                str(plan),
                "--devices",
                "20",
                "--seed",
                "1",
                "--quiet",
                "--report",
                str(report),
            ]
        )
        == 0
    )
    data = json.loads(report.read_text())
    assert data["plan"]["model"]["hidden"] == [32] and len(data["rounds"]) == 3
    # The first 4 admitted evaluate; one that drops out (the phones fleet) reports nothing.
    assert all(1 <= r["evaluated"] <= 4 for r in data["rounds"])
    final = data["final"]
    assert 0 <= final["federated_accuracy"] <= 1
    # Both figures are of one model: version 2, which round 2 made (not round 3's version 3).
    assert final["federated_model_version"] == 2 and final["model_version"] == 3
    made = next(r for r in data["rounds"] if r["model_version"] == 2)
    assert final["federated_central_accuracy"] == made["accuracy"]
    assert [r["federated_model_version"] for r in data["rounds"]] == [0, 1, 2]
    assert (tmp_path / "r.png").exists()
    wrong = tmp_path / "wrong.toml"
    wrong.write_text(plan.read_text().replace("inputs = 64", "inputs = 784"))
    assert fedsim(["run", "--plan", str(wrong), "--quiet", "--report", str(report)]) != 0
