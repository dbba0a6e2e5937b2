"""Local DP inside real rounds: noise on the device, the ledger charged before upload,
the budget enforced, the fleet's spend on the server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedclient
from fedclient.privacy.dp import PrivacyLedger
from fedclient.protocol import decode_tensors
from fedclient.server import FederationService, ServerStore, plan_from_dict
from fedclient.sim.cli import main as fedsim
from tests.conftest import ManualClock, Server, step_until

pytestmark = pytest.mark.anyio


def _dp_server(**privacy: Any) -> Server:
    plan = plan_from_dict(
        {
            "job": {"name": "digits", "rounds": 5, "devices_per_round": 1, "seed": 1},
            "model": {"kind": "softmax", "inputs": 64, "hidden": [], "classes": 10},
            "train": {"epochs": 1, "batch_size": 8, "learning_rate": 0.1},
            "privacy": {"dp_epsilon": 8.0, "dp_delta": 1e-5, "clip": 0.5, **privacy},
        }
    )
    clock = ManualClock()
    service = FederationService(ServerStore(), clock=clock)
    service.add_job(plan)
    return Server(service, clock)


async def test_a_dp_update_is_clipped_noised_and_charged_before_it_leaves(
    make_devices: Any,
) -> None:
    server = _dp_server()
    (device,) = make_devices(1, server.transport())
    await step_until(device, fedclient.Phase.TRAINED)  # nothing sent yet
    ledger = PrivacyLedger(device.device_state.db, device.device_state.key)
    assert ledger.releases("digits") == 1  # charged already
    assert server.store.update_count(1) == 0
    assert (await device.astep()).status == "uploaded"
    assert server.store.update_count(1) == 1
    found = server.store.model("digits", 1)
    assert found is not None
    delta = decode_tensors(found[0])[0]["fc1.weight"]
    # Clipped to 0.5 then noised with sigma = z * 2 * clip: far larger than the update.
    assert float(np.std(delta)) > 0.3
    spent = server.service.job_status("digits").privacy_spent
    assert spent["devices"] == 1 and spent["max_epsilon"] == pytest.approx(
        ledger.spent("digits", 1e-5), rel=1e-9
    )


async def test_a_device_out_of_budget_refuses_and_gives_its_place_back(make_devices: Any) -> None:
    server = _dp_server(budget_epsilon=9.0)  # one release costs ~8.6 under RDP
    (device,) = make_devices(1, server.transport())
    assert (await device.arun_once()).status == "uploaded"
    assert (await device.astep()).status == "admitted"  # with the model: training is next
    with pytest.raises(fedclient.PrivacyBudgetExceeded) as refused:
        await device.astep()
    assert refused.value.budget == 9.0 and refused.value.epsilon > 9.0
    assert server.store.admitted_count(2) == 0  # it left the round
    ledger = PrivacyLedger(device.device_state.db, device.device_state.key)
    assert ledger.releases("digits") == 1  # nothing more was charged
    assert device.device_state.progress("digits").phase is fedclient.Phase.IDLE


async def test_an_update_without_its_spend_is_refused() -> None:
    dp = _dp_server()
    async with dp.http() as http:
        auth = {
            "Authorization": "Bearer " + (await http.post("/v1/devices", json={})).json()["token"]
        }
        plan = (await http.post("/v1/jobs/digits/checkin", json={}, headers=auth)).json()["plan"]
        body = dp.store.model("digits", 0)
        assert body is not None
        zeros = {k: np.zeros_like(v) for k, v in decode_tensors(body[0])[0].items()}
        before = dp.store.fingerprint()
        answer = await http.post(
            f"/v1/rounds/{plan['round_id']}/updates",
            content=fedclient.protocol.encode_tensors(zeros, {"num_examples": "5"}),
            headers={**auth, "Idempotency-Key": "k"},
        )
        assert answer.status_code == 400 and "epsilon_spent" in answer.text
        assert dp.store.fingerprint() == before


def test_fedsim_reports_the_epsilon_each_device_spent(tmp_path: Path) -> None:
    report = tmp_path / "dp.json"
    assert (
        fedsim(
            [
                "run",
                "--dataset",
                "digits",
                "--devices",
                "20",
                "--devices-per-round",
                "5",
                "--rounds",
                "4",
                "--seed",
                "1",
                "--dp",
                "epsilon=8,delta=1e-5,clip=1.0",
                "--quiet",
                "--report",
                str(report),
            ]
        )
        == 0
    )
    again = tmp_path / "again.json"
    assert (
        fedsim(
            [
                "run",
                "--dataset",
                "digits",
                "--devices",
                "20",
                "--devices-per-round",
                "5",
                "--rounds",
                "4",
                "--seed",
                "1",
                "--dp",
                "epsilon=8,delta=1e-5,clip=1.0",
                "--quiet",
                "--report",
                str(again),
            ]
        )
        == 0
    )
    # The noise is seeded in a simulation: the same seed gives the same noisy models.
    first, second = (json.loads(p.read_text())["rounds"] for p in (report, again))
    assert [r["accuracy"] for r in first] == [r["accuracy"] for r in second]
    privacy = json.loads(report.read_text())["final"]["privacy"]
    spent = privacy["epsilon_spent_per_device"]
    assert len(spent) == 20 and privacy["devices_released"] == sum(e > 0 for e in spent)
    assert 8 < privacy["max_epsilon_spent"] <= privacy["budget_epsilon"]
    assert fedsim(["run", "--dp", "clip=1", "--report", str(tmp_path / "x.json")]) == 2
