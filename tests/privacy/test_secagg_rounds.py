"""Secure aggregation inside real rounds, over the HTTP API: the server sees only the sum."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedclient
from fedclient.privacy.dp import GaussianMechanism, PrivacyLedger
from fedclient.privacy.secagg import RotatedQuantization
from fedclient.protocol import decode_tensors
from fedclient.server import FederationService, ServerStore, plan_from_dict
from fedclient.server.secure_rounds import secure_floor
from fedclient.sim.cli import main as fedsim
from tests.conftest import ManualClock, Server, step_until

pytestmark = pytest.mark.anyio

#: These rounds have 6 devices; a device's default policy refuses cohorts under 10 beyond
#: its colluders, and secure aggregation without an identity authority it pins. These
#: tests play an honest server (tests/privacy/test_secagg_attacks.py plays the other).
SMALL_COHORTS = fedclient.PrivacyPolicy(min_secure_cohort=2, trust_server_identities=True)
# 24 devices, 8 a round, 3 rounds of digits: the fedsim runs these tests compare.
SMALL_RUN = ["run", "--dataset", "digits", "--devices", "24", "--devices-per-round", "8"]
SMALL_RUN += ["--rounds", "3", "--seed", "1", "--quiet"]


def _server(secagg: str, compression: str = "", **privacy: Any) -> Server:
    plan = plan_from_dict(
        {
            "job": {
                "name": "digits",
                "rounds": 2,
                "devices_per_round": 6,
                "over_selection": 1.0,
                "seed": 4,
                "compression": compression,
            },
            "model": {"kind": "mlp", "inputs": 64, "hidden": [16], "classes": 10},
            "train": {"epochs": 1, "batch_size": 8, "learning_rate": 0.1},
            "privacy": {"secagg": secagg, **privacy} if secagg else {},
        }
    )
    clock = ManualClock()
    service = FederationService(ServerStore(), clock=clock)
    service.add_job(plan)
    return Server(service, clock)


async def _one_round(
    server: Server, make_devices: Any, devices: list[Any] | None = None
) -> dict[str, np.ndarray]:
    if devices is None:
        devices = make_devices(6, server.transport(), policy=SMALL_COHORTS)
    for device in devices:
        for _ in range(3):
            await device.astep()  # check in, download, train
    pending = list(devices)
    for _ in range(10):
        pending = [d for d in pending if (await d.astep()).status == "waiting"]
        if not pending:
            break
    assert not pending
    found = server.store.model("digits", 1)
    assert found is not None
    return decode_tensors(found[0])[0]


@pytest.mark.parametrize("mode", ["secagg", "secagg+"])
async def test_a_secure_round_gives_fedavg_of_the_updates(make_devices: Any, mode: str) -> None:
    plain = await _one_round(_server(""), make_devices)
    secure_server = _server(mode)
    secure = await _one_round(secure_server, make_devices)
    for name in plain:
        # Same devices, same seeds: the only difference is the fixed-point rounding.
        np.testing.assert_allclose(secure[name], plain[name], atol=2e-4)
    assert secure_server.store.update_count(1) == 0  # no device's update was ever stored
    assert secure_server.service.job_status("digits").model_version == 1


@pytest.mark.parametrize("compression", ["q8", "q4"])
async def test_a_compressed_secure_round_gives_the_mean_in_fewer_bytes(
    make_devices: Any, compression: str
) -> None:
    # Finding 8: --compress q8 with SecAgg crashed every device ("wants length 651, got
    # (655,)") and the round never ended. The quantised values now go into the field.
    plain = await _one_round(_server("secagg+"), make_devices)
    server = _server("secagg+", compression, clip=5.0)  # a clip the updates stay under
    secure = await _one_round(server, make_devices)
    assert server.service.job_status("digits").model_version == 1
    # Each device holds ~240 examples, over the weight cap (100): weights are 1, the
    # counts nearly equal, so the mean is FedAvg's but for the q8 / q4 rounding, whose
    # error is bounded by the grid's step.
    d = sum(v.size for v in plain.values())
    grid = RotatedQuantization.create(
        d, clip=5.0, max_devices=6, seed=bytes(32), bits=int(compression[1:])
    )
    gap = np.sqrt(sum(float(np.sum((secure[n] - plain[n]) ** 2)) for n in plain))
    assert 0 < gap < 1.2 * np.sqrt(6 * grid.padded) * grid.step / 2 / 6
    assert grid.modulus_bits < 16  # what each device sent: a few bits a coordinate


async def test_a_distributed_dp_round_adds_each_device_s_share_of_the_noise(
    make_devices: Any,
) -> None:
    plain = await _one_round(_server("secagg"), make_devices)
    server = _server("secagg", dp_epsilon=8.0, clip=1.0, distributed_dp=True)
    devices = make_devices(6, server.transport(), policy=SMALL_COHORTS)
    secure = await _one_round(server, make_devices, devices)
    noise = np.concatenate([(secure[n] - plain[n]).ravel() for n in plain])
    # The aggregation's floor is 4 (two beyond the 2 colluders of 6 the plan and the
    # devices assume), so each device adds half the noise one (8, 1e-5) release needs at
    # the replace sensitivity 2 * clip: the two honest devices the floor guarantees carry
    # all of it. Six devices: the mean carries sqrt(6 / 2) / 6 of it, rotated into the
    # model's coordinates unchanged in size.
    job = server.store.job("digits")
    assert job is not None and secure_floor(job.plan, 6) == 4
    z = GaussianMechanism.for_release(8.0, 1e-5, 1.0).noise_multiplier
    assert np.std(noise) == pytest.approx(z * 2.0 * np.sqrt(6 / 2) / 6, rel=0.1)
    for device in devices:  # each device charged its ledger, once, before sending
        ledger = PrivacyLedger(device.device_state.db, device.device_state.key)
        assert ledger.releases("digits") == 1
        assert ledger._rows("digits")[0][1] == pytest.approx(z)


async def test_plans_that_cannot_work_are_refused_when_loaded() -> None:
    # Finding 8: async mode with SecAgg left devices waiting forever.
    base = {"job": {"name": "x", "devices_per_round": 4}}
    with pytest.raises(fedclient.InvalidInput, match="sync rounds"):
        plan_from_dict(
            {**base, "job": {"name": "x", "mode": "async"}, "privacy": {"secagg": "secagg"}}
        )
    with pytest.raises(fedclient.InvalidInput, match="not topk"):
        plan_from_dict(
            {"job": {"name": "x", "compression": "topk:0.1,q8"}, "privacy": {"secagg": "secagg+"}}
        )
    with pytest.raises(fedclient.InvalidInput, match="distributed_dp needs"):
        plan_from_dict(
            {"job": {"name": "x"}, "privacy": {"dp_epsilon": 8.0, "distributed_dp": True}}
        )


async def test_a_device_sends_nothing_masked_into_a_cohort_under_its_minimum(
    make_devices: Any,
) -> None:
    # Six devices; the default policy wants ten in a secure sum beyond the colluders it
    # assumes (20%: 2 of 6): each device reads the floor the parameters announce (4),
    # sends no key and no masked input, and drops its update.
    server = _server("secagg+")
    trusting = fedclient.PrivacyPolicy(trust_server_identities=True)
    devices = make_devices(6, server.transport(), policy=trusting)
    for device in devices:
        await step_until(device, fedclient.Phase.TRAINED)
    for device in devices:
        outcome = await device.astep()
        assert outcome.status == "discarded" and "wants 10 beyond the 2 colluders" in (
            outcome.reason
        )
    assert server.service.secure.rounds[1].server.waiting_for == frozenset(range(1, 7))
    assert server.store.model("digits", 1) is None


async def test_secure_jobs_refuse_plain_uploads_and_bad_stage_messages(make_devices: Any) -> None:
    server = _server("secagg")
    devices = make_devices(6, server.transport(), policy=SMALL_COHORTS)
    for device in devices:
        await device.astep()  # the sixth admission fixes the cohort
    async with server.http() as http:
        token = devices[0].device_state.identity(devices[0].server)
        assert token is not None
        auth = {"Authorization": f"Bearer {token.token}"}
        before = server.store.fingerprint()
        garbage = await http.post("/v1/rounds/1/secagg/keys", content=b"\x01\x02", headers=auth)
        assert garbage.status_code == 400
        early = await http.get("/v1/rounds/1/secagg/keys", headers=auth)
        assert early.status_code == 425 and early.json()["error"]["code"] == "too_early"
        unknown = await http.post("/v1/rounds/1/secagg/nope", content=b"", headers=auth)
        assert unknown.status_code == 404
        body = server.store.model("digits", 0)
        assert body is not None
        plain = await http.post(
            "/v1/rounds/1/updates", content=body[0], headers={**auth, "Idempotency-Key": "k"}
        )
        assert plain.status_code == 400 and "secagg" in plain.text
        assert server.store.fingerprint() == before
    assert fedclient.TooEarly.status == 425


def test_fedsim_secagg_plus_matches_plaintext(tmp_path: Path) -> None:
    common = SMALL_RUN
    assert fedsim([*common, "--report", str(tmp_path / "plain.json")]) == 0
    assert fedsim([*common, "--secagg-plus", "--report", str(tmp_path / "secure.json")]) == 0
    plain = json.loads((tmp_path / "plain.json").read_text())
    secure = json.loads((tmp_path / "secure.json").read_text())
    assert [r["updates"] for r in secure["rounds"]] == [8, 8, 8]
    assert abs(plain["final"]["accuracy"] - secure["final"]["accuracy"]) <= 0.005


def test_fedsim_distributed_dp_reports_the_aggregate_s_privacy_and_reproduces(
    tmp_path: Path,
) -> None:
    common = [
        *SMALL_RUN,
        "--no-plot",
        "--dp",
        "epsilon=8,delta=1e-5,clip=1.0",
        "--secagg-plus",
        "--distributed-dp",
        "--compress",
        "q8",
    ]
    reports = []
    for name in ("a", "b"):
        assert fedsim([*common, "--report", str(tmp_path / f"{name}.json")]) == 0
        reports.append(json.loads((tmp_path / f"{name}.json").read_text()))
    a, b = reports
    privacy = a["final"]["privacy"]
    assert privacy["mechanism"] == "distributed" and privacy["max_epsilon_spent"] > 0
    assert [r["accuracy"] for r in a["rounds"]] == [r["accuracy"] for r in b["rounds"]]
    assert [r["updates"] for r in a["rounds"]] == [8, 8, 8]


async def _walk(devices: list[Any], passes: int = 10) -> list[Any]:
    pending = list(devices)
    for _ in range(passes):
        pending = [d for d in pending if (await d.astep()).status == "waiting"]
        if not pending:
            break
    return pending


async def test_a_stage_closes_at_its_deadline_without_the_dropouts(make_devices: Any) -> None:
    server = _server("secagg")
    devices = make_devices(6, server.transport(), clock=server.clock, policy=SMALL_COHORTS)
    for device in devices:
        for _ in range(3):
            await device.astep()
    quitter, *stayers = devices
    assert (await quitter.astep()).status == "waiting"  # it posts its keys, then vanishes
    await _walk(stayers, passes=2)  # the others post keys (the stage closes), then share
    assert server.store.model("digits", 1) is None
    server.clock.now += 61  # the agreement's time is up: it closes without the quitter
    server.service.tick()
    assert await _walk(stayers) == []
    status = server.service.job_status("digits")
    assert status.model_version == 1 and status.previous_round is not None
    assert status.previous_round.status == "closed"


async def test_too_many_dropouts_fail_the_round_and_keep_the_model(make_devices: Any) -> None:
    server = _server("secagg")
    devices = make_devices(6, server.transport(), clock=server.clock, policy=SMALL_COHORTS)
    for device in devices:
        await step_until(device, fedclient.Phase.TRAINED)
    for device in devices:
        await device.astep()  # everyone advertises keys: the last one's closes the stage
    await _walk(devices, passes=1)  # everyone agrees on the roster
    await _walk([devices[0], devices[-1]], passes=1)  # two share their keys
    # Two of six shared: under the threshold (3 for six devices, 20% colluding).
    assert server.service.secure.rounds[1].params.threshold == 3
    server.clock.now += 61
    server.service.tick()
    status = server.service.job_status("digits")
    assert status.model_version == 0 and status.rounds_failed == 1
    assert "secure aggregation failed" in (
        status.previous_round.reason if status.previous_round else ""
    )
    assert server.store.update_count(1) == 0


def test_cryptography_loads_only_for_secure_aggregation(tmp_path: Path) -> None:
    # An app (or a server) that never aggregates securely runs without `cryptography`:
    # a whole plain fedsim run (enrolment included) loads none of it.
    code = (
        "import sys, fedclient, fedclient.sim.engine\n"
        "from fedclient.sim.cli import main\n"
        "main(['run', '--devices', '6', '--devices-per-round', '3', '--rounds', '1',\n"
        "      '--quiet', '--no-plot', '--report', sys.argv[1]])\n"
        "print('cryptography' in sys.modules)\n"
        "import fedclient.privacy\n"
        "fedclient.privacy.secagg.SecAggClient\n"
        "print('cryptography' in sys.modules)\n"
    )
    report = str(tmp_path / "r.json")
    out = subprocess.run(
        [sys.executable, "-c", code, report], capture_output=True, text=True, check=True
    )
    assert out.stdout.split()[-2:] == ["False", "True"], out.stderr
