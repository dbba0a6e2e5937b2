"""What an app needs from the SDK: an example store, conditions, the latest model for
inference, personalisation, and a loop that just runs (issue 17)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedclient
from fedclient.protocol import decode_tensors
from fedclient.sim.cli import main as fedsim
from tests.conftest import Server, step_until

pytestmark = pytest.mark.anyio


def _store(tmp_path: Path, **limits: Any) -> fedclient.ExampleStore:
    return fedclient.ExampleStore(tmp_path / "examples.sqlite", **limits)


def test_forgetting_removes_the_rows_and_their_bytes(tmp_path: Path, digits: Any) -> None:
    store = _store(tmp_path)
    store.add(digits.x_train[:50], digits.y_train[:50], source="alice")
    # Features a scan of the files can find byte for byte: 64 floats of a marker value.
    marker = np.full((3, 64), 12345.678, dtype=np.float32)
    ids = store.add(marker, [1, 2, 3], source="bob")
    files = [tmp_path / "examples.sqlite", tmp_path / "examples.sqlite-wal"]

    def scan() -> bool:
        return any(f.exists() and marker[0].tobytes() in f.read_bytes() for f in files)

    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert scan()  # the bytes are on disk...
    assert store.forget(source="bob") == fedclient.Forgotten(3, complete=True)
    assert not scan()  # ...and now nowhere in the database or its log
    assert len(store) == 50
    assert store.forget(ids).count == 0  # gone already
    assert store.forget(before=1e18).count == 50 and len(store) == 0


def test_retention_limits_hold_across_restarts(tmp_path: Path) -> None:
    now = [1000.0]
    store = _store(tmp_path, max_examples=30, clock=lambda: now[0])
    x = np.arange(80 * 4, dtype=np.float32).reshape(80, 4)
    store.add(x[:40], np.zeros(40, int))
    assert len(store) == 30
    kept, _ = store.arrays()
    np.testing.assert_array_equal(kept, x[10:40])  # the newest 30
    now[0] += 3600
    store.add(x[40:50], np.ones(10, int))
    # The app restarts with an age limit: what is older than 30 minutes goes at once.
    again = _store(tmp_path, max_examples=30, max_age_seconds=1800, clock=lambda: now[0])
    assert len(again) == 10
    np.testing.assert_array_equal(again.arrays()[0], x[40:50])
    with pytest.raises(fedclient.InvalidInput):
        again.add(np.zeros((2, 5), np.float32), [0, 1])  # 5 features, not 4
    with pytest.raises(fedclient.InvalidInput):
        again.add(np.full((1, 4), np.nan, np.float32), [0])


async def test_examples_arriving_during_a_round_wait_for_the_next(
    server: Server, digits: Any, tmp_path: Path
) -> None:
    store = _store(tmp_path)
    store.add(digits.x_train[:40], digits.y_train[:40])

    async def train_while_more_arrive(task: fedclient.TrainTask) -> Any:
        store.add(digits.x_train[40:90], digits.y_train[40:90])  # they arrive mid-round
        return task.run()

    device = fedclient.Client(
        "http://fedserver.local",
        "digits",
        store,
        transport=server.transport(),
        atrain=train_while_more_arrive,
        seed=0,
    )
    await step_until(device, fedclient.Phase.TRAINED)
    held = device.device_state.progress("digits").update
    assert held is not None
    assert decode_tensors(held)[1]["num_examples"] == "40"  # the snapshot, not 90
    assert len(store) == 90


async def test_a_device_that_stops_qualifying_leaves_and_another_takes_its_place(
    make_server: Any, make_devices: Any
) -> None:
    server: Server = make_server(devices_per_round=1, over_selection=1.0)
    charging = [True]
    conditions = fedclient.Conditions(lambda: charging[0])
    first, second = make_devices(2, server.transport(), conditions=conditions)
    assert (await first.astep()).status == "admitted"
    charging[0] = False  # unplugged before it trained
    gone = await first.astep()
    assert gone.status == "discarded" and "conditions no longer met" in gone.reason
    assert server.store.admitted_count(1) == 0  # it gave its place back
    waiting = await second.astep()
    assert waiting.status == "waiting" and "conditions not met" in waiting.reason
    charging[0] = True
    assert (await second.arun_once()).status == "uploaded"  # it took the place
    assert server.service.job_status("digits").model_version == 1


@pytest.mark.parametrize("runtime", ["numpy", "onnx", "tflite"])
async def test_predict_runs_the_held_global_model_through_the_runtime(
    server: Server, digits: Any, runtime: str
) -> None:
    if runtime == "tflite":
        pytest.importorskip("ai_edge_litert")
    device = fedclient.Client(
        "http://fedserver.local",
        "digits",
        (digits.x_train[:200], digits.y_train[:200]),
        transport=server.transport(),
        runtime=runtime,
    )
    with pytest.raises(fedclient.StateError):
        device.latest_model()  # nothing held yet
    assert (await device.arun_once()).status == "uploaded"
    version, _, body = device.device_state.held_model("digits") or (0, "", b"")
    served = server.store.model("digits", version)
    assert served is not None and served[0] == body  # the server's model, as held
    reference = fedclient.create_backend(server.service.job_status("digits").plan.model)
    reference.set_weights(decode_tensors(served[0])[0])
    x = digits.x_test[:64]
    np.testing.assert_allclose(device.predict(x), reference.predict(x), atol=1e-5)
    assert device.latest_model().runtime == runtime
    # After a restart, on the same state and with no plan in hand, it still predicts.
    again = fedclient.Client(
        "http://fedserver.local",
        "digits",
        (digits.x_train[:5], digits.y_train[:5]),
        state=device.device_state,
        runtime=runtime,
    )
    np.testing.assert_allclose(again.predict(x), reference.predict(x), atol=1e-5)


async def test_a_personalized_model_is_tuned_on_the_device_and_never_uploaded(
    server: Server, digits: Any
) -> None:
    device = fedclient.Client(
        "http://fedserver.local",
        "digits",
        (digits.x_train[:300], digits.y_train[:300]),
        transport=server.transport(),
        personalize=fedclient.Personalization(epochs=3),
        seed=1,
    )
    assert (await device.arun_once()).status == "uploaded"
    x, y = digits.x_train[:300], digits.y_train[:300]
    global_loss = device.latest_model().evaluate(x, y).loss
    tuned = device.latest_model(personalized=True)
    assert tuned.evaluate(x, y).loss < global_loss  # fitted to its own data
    assert device.latest_model(personalized=True) is tuned  # cached for this version
    held = device.device_state.held_model("digits")
    assert held is not None and server.store.model("digits", held[0])[0] == held[2]  # type: ignore[index]


def test_run_forever_takes_part_until_the_job_finishes(live_server: Any, digits: Any) -> None:
    live = live_server(devices_per_round=1, rounds=3)
    device = fedclient.Client(live.url, "digits", (digits.x_train[:100], digits.y_train[:100]))
    result = device.run_forever(stop=threading.Event())
    assert (result.reason, result.rounds, result.model_version) == ("finished", 3, 3)
    assert live.server.service.job_status("digits").status == "finished"
    device.close()


def test_fedsim_reports_personalised_accuracy_above_the_global_on_dirichlet_0_1(
    tmp_path: Path,
) -> None:
    report = tmp_path / "p.json"
    assert (
        fedsim(
            [
                "run",
                "--dataset",
                "digits",
                "--devices",
                "40",
                "--devices-per-round",
                "10",
                "--rounds",
                "15",
                "--partition",
                "dirichlet:0.1",
                "--seed",
                "1",
                "--personalize",
                "3",
                "--quiet",
                "--no-plot",
                "--report",
                str(report),
            ]
        )
        == 0
    )
    final = json.loads(report.read_text())["final"]
    assert final["personalized_accuracy"] > final["global_accuracy_on_devices"] + 0.02
