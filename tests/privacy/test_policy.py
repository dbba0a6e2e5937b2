"""The device's privacy policy against a server that sets the plan (issue findings 3, 4, 5).

Each test plays the server as an attacker would and checks that the device, not the
plan, has the last word: a plan outside the policy is refused before anything is
trained, charged or sent; noise cannot be predicted from a client's seed; nothing
unnoised travels beside a DP release.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import fedclient
from fedclient.privacy.dp import GaussianMechanism, PrivacyLedger
from fedclient.privacy.noise import SeededNoiseWarning
from fedclient.protocol import decode_tensors
from fedclient.server import FederationService, ServerStore, plan_from_dict
from tests.conftest import ManualClock, Server, step_until

pytestmark = pytest.mark.anyio


def _server(*, name: str = "digits", rounds: int = 5, **privacy: Any) -> Server:
    plan = plan_from_dict(
        {
            "job": {"name": name, "rounds": rounds, "devices_per_round": 1, "seed": 1},
            "model": {"kind": "softmax", "inputs": 64, "hidden": [], "classes": 10},
            "train": {"epochs": 1, "batch_size": 8, "learning_rate": 0.1},
            "privacy": {"dp_epsilon": 8.0, "dp_delta": 1e-5, "clip": 0.5, **privacy},
        }
    )
    clock = ManualClock()
    service = FederationService(ServerStore(), clock=clock)
    service.add_job(plan)
    return Server(service, clock)


def _ledger(device: fedclient.Client) -> PrivacyLedger:
    return PrivacyLedger(device.device_state.db, device.device_state.key)


async def _refused(device: fedclient.Client, server: Server, match: str) -> None:
    """The device refuses at admission: nothing stored, trained, charged or sent."""
    with pytest.raises(fedclient.PrivacyPolicyViolation, match=match):
        await device.arun_once()
    assert server.store.admitted_count(1) == 0  # it gave its place back
    assert server.store.update_count(1) == 0
    assert device.device_state.progress("digits").phase is fedclient.Phase.IDLE
    assert _ledger(device).releases("digits") == 0


async def test_a_plan_with_a_large_delta_is_refused_before_training(make_devices: Any) -> None:
    # Finding 4: dp_delta=0.5 gave a noise multiplier of 0.51 and the device went along.
    server = _server(dp_delta=0.5)
    (device,) = make_devices(1, server.transport())
    await _refused(device, server, "delta 0.5 is over")


async def test_a_plan_spending_too_much_per_release_is_refused(make_devices: Any) -> None:
    server = _server(dp_epsilon=50.0)
    (device,) = make_devices(1, server.transport())
    await _refused(device, server, "one release costs epsilon")


async def test_the_device_caps_a_job_budget_that_the_plan_inflates(make_devices: Any) -> None:
    # Finding 4: rounds=10^9 made the default budget ~4e7. The policy caps the job at 10:
    # with releases of ~8.6 the device stops after the first.
    server = _server(rounds=10**9)
    (device,) = make_devices(1, server.transport())
    assert (await device.arun_once()).status == "uploaded"
    await device.astep()  # admitted to the next round
    with pytest.raises(fedclient.PrivacyBudgetExceeded) as refused:
        await device.astep()
    assert refused.value.budget == 10.0
    assert _ledger(device).releases("digits") == 1
    # An app that accepts more says so in its policy, and the same plan goes on.
    (generous,) = make_devices(
        1, server.transport(), policy=fedclient.PrivacyPolicy(max_epsilon_per_job=30.0)
    )
    for _ in range(2):
        while (await generous.arun_once()).status != "uploaded":
            server.clock.now += 700
    assert _ledger(generous).releases("digits") == 2


async def test_switching_the_neighbouring_relation_does_not_under_count(make_devices: Any) -> None:
    # Finding 4: a plan calibrated for add_remove (sensitivity C) is half as noisy, per
    # unit of the replace sensitivity (2C). The device charges what the noise gives
    # under its own relation (replace), not what the plan claims.
    server = _server(neighbouring="add_remove", dp_epsilon=4.0)
    (device,) = make_devices(1, server.transport())
    assert (await device.arun_once()).status == "uploaded"
    claimed = GaussianMechanism.for_release(4.0, 1e-5, 0.5, "add_remove")
    charged = _ledger(device)._rows("digits")[0][1]
    assert charged == pytest.approx(claimed.noise_multiplier / 2)
    assert _ledger(device).spent("digits", 1e-5) > 2 * claimed.epsilon(1e-5)


async def test_a_lifetime_budget_holds_across_jobs(make_devices: Any) -> None:
    policy = fedclient.PrivacyPolicy(max_epsilon_lifetime=12.0)
    first, second = _server(name="a"), _server(name="b")
    db = fedclient.DeviceState.in_memory()
    (a,) = make_devices(1, first.transport(), policy=policy, state=db, job="a")
    assert (await a.arun_once()).status == "uploaded"  # ~8.6 of 12
    (b,) = make_devices(
        1, second.transport(), policy=policy, state=db, job="b", base="http://other.local"
    )
    await b.astep()
    with pytest.raises(fedclient.PrivacyBudgetExceeded) as refused:
        while True:
            await b.astep()
    assert refused.value.scope == "lifetime" and refused.value.budget == 12.0
    assert PrivacyLedger(db.db, db.key).releases("b") == 0


async def test_a_device_that_requires_dp_refuses_a_job_without_it(
    make_devices: Any, server: Server
) -> None:
    (device,) = make_devices(1, server.transport(), policy=fedclient.PrivacyPolicy(require_dp=True))
    await _refused(device, server, "requires it")


async def test_no_clear_metadata_travels_beside_a_dp_release(make_devices: Any) -> None:
    # Finding 5: num_examples and train_loss went in clear beside the noised update and
    # were stored per device, outside the epsilon claim.
    server = _server()
    (device,) = make_devices(1, server.transport())
    await step_until(device, fedclient.Phase.TRAINED)
    held = device.device_state.progress("digits").update
    assert held is not None
    sent = decode_tensors(held)[1]
    assert "num_examples" not in sent and "train_loss" not in sent
    assert set(sent) == {"model_version", "round_id", "epsilon_spent"}
    assert (await device.astep()).status == "uploaded"
    (row,) = server.store.updates(1)
    assert row.num_examples == 1 and row.train_loss is None  # weighted like any other
    # An app may allow them, knowingly.
    shared = _server()
    (open_device,) = make_devices(
        1, shared.transport(), policy=fedclient.PrivacyPolicy(share_metadata=True)
    )
    await step_until(open_device, fedclient.Phase.TRAINED)
    held = open_device.device_state.progress("digits").update
    assert held is not None and "num_examples" in decode_tensors(held)[1]


async def _noised_upload(make_devices: Any, **client: Any) -> np.ndarray:
    server = _server()
    (device,) = make_devices(1, server.transport(), **client)
    assert (await device.arun_once()).status == "uploaded"
    found = server.store.model("digits", 1)
    assert found is not None
    return decode_tensors(found[0])[0]["fc1.weight"]


async def test_a_seeded_client_draws_noise_no_one_can_predict(make_devices: Any) -> None:
    # Finding 3: Client(seed=...) drew the noise from default_rng([seed*1_000_003+round, 7]),
    # so its upload minus that noise was the exact clipped update. The same seed, data
    # and plan now give different noise every time.
    first = await _noised_upload(make_devices)
    second = await _noised_upload(make_devices)
    assert not np.array_equal(first, second)
    # Only the simulation switch reproduces it, and it says the noise is not private.
    with pytest.warns(SeededNoiseWarning, match="not private"):
        a = await _noised_upload(make_devices, simulation_seeded_noise=True)
    with pytest.warns(SeededNoiseWarning):
        b = await _noised_upload(make_devices, simulation_seeded_noise=True)
    np.testing.assert_array_equal(a, b)
