"""The README's app pattern on one process: the client and its example store made on the
app's main thread, `run_forever` on another, `predict` on the first meanwhile (issue 25)."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedclient
from fedclient.protocol import decode_tensors
from tests.conftest import LiveServer


class GatedModel:
    """A training backend whose `train` waits, mid-round, until the test lets it go (a
    slow phone's round, held open for as long as the test needs)."""

    runtime = "numpy"

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.inputs, self.classes = inner.inputs, inner.classes
        self.training = threading.Event()
        self.release = threading.Event()

    def get_weights(self) -> dict[str, np.ndarray]:
        return self.inner.get_weights()  # type: ignore[no-any-return]

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        self.inner.set_weights(weights)

    def train(self, x: np.ndarray, y: np.ndarray, **settings: Any) -> Any:
        self.training.set()
        assert self.release.wait(timeout=60), "the test never released training"
        return self.inner.train(x, y, **settings)

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> Any:
        return self.inner.evaluate(x, y)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.inner.predict(x)  # type: ignore[no-any-return]


def served_predictions(live: LiveServer, version: int, x: np.ndarray) -> np.ndarray:
    """What the server's model ``version`` predicts for ``x``."""
    found = live.server.store.model("digits", version)
    assert found is not None
    reference = fedclient.create_backend(live.server.service.job_status("digits").plan.model)
    reference.set_weights(decode_tensors(found[0])[0])
    return reference.predict(x)


def test_predict_on_the_app_thread_while_run_forever_trains_on_another(
    live_server: Any, digits: Any, tmp_path: Path
) -> None:
    live: LiveServer = live_server(devices_per_round=1, rounds=2)
    examples = fedclient.ExampleStore(tmp_path / "examples.sqlite")
    examples.add(digits.x_train[:200], digits.y_train[:200])
    gate = GatedModel(fedclient.models.mlp(64, 16, 10))
    client = fedclient.Client(
        live.url, "digits", examples, state=tmp_path / "fl.sqlite", model=gate, seed=1
    )
    stop = threading.Event()
    worker = threading.Thread(target=client.run_forever, kwargs={"stop": stop}, daemon=True)
    worker.start()
    try:
        assert gate.training.wait(timeout=30)  # round 1 trains on the worker, model 0 held
        x = digits.x_test[:16]
        started = time.monotonic()
        during = client.predict(x)  # on this thread, while the round is held open
        assert time.monotonic() - started < 5.0  # it did not wait for the round
        np.testing.assert_allclose(during, served_predictions(live, 0, x), atol=1e-6)
        examples.add(digits.x_train[200:210], digits.y_train[200:210])  # the app collects on
        assert len(examples) == 210
    finally:
        gate.release.set()
    worker.join(timeout=60)
    assert not worker.is_alive()
    status = live.server.service.job_status("digits")
    assert status.status == "finished" and status.model_version == 2
    # The device holds the job's final aggregate, not the model of its last round.
    np.testing.assert_allclose(client.predict(x), served_predictions(live, 2, x), atol=1e-6)
    client.close()


def test_a_finished_job_hands_its_final_model_once_even_to_a_late_device(
    live_server: Any, digits: Any
) -> None:
    live: LiveServer = live_server(devices_per_round=1, rounds=1)
    early = fedclient.Client(live.url, "digits", (digits.x_train[:80], digits.y_train[:80]))
    assert early.run_once().status == "uploaded"  # the job's one round closes with it
    late = fedclient.Client(live.url, "digits", (digits.x_train[80:160], digits.y_train[80:160]))
    outcome = late.run_once()  # enrols, hears the job is over, fetches its final model
    assert (outcome.status, outcome.model_version) == ("finished", 1)
    x = digits.x_test[:8]
    for device in (early, late):
        if device is early:
            assert device.run_once().status == "finished"
        np.testing.assert_allclose(device.predict(x), served_predictions(live, 1, x), atol=1e-6)
        requests = device.stats.requests
        assert device.run_once().status == "finished"
        assert device.stats.requests == requests + 1  # a check-in, no second download
        device.close()


def test_a_personalised_model_tuned_on_forgotten_examples_is_dropped(
    live_server: Any, digits: Any, tmp_path: Path
) -> None:
    live: LiveServer = live_server(devices_per_round=1, rounds=2)
    examples = fedclient.ExampleStore(tmp_path / "examples.sqlite")
    examples.add(digits.x_train[:100], digits.y_train[:100], source="alice")
    examples.add(digits.x_train[100:200], digits.y_train[100:200], source="bob")
    tuning = fedclient.Personalization(epochs=2)
    client = fedclient.Client(live.url, "digits", examples, personalize=tuning, seed=3)
    assert client.run_once().status == "uploaded"
    tuned = client.latest_model(personalized=True)
    assert client.latest_model(personalized=True) is tuned  # cached while nothing changes

    assert examples.forget(source="bob").complete
    again = client.latest_model(personalized=True)
    assert again is not tuned
    # It is the global model tuned on alice's examples alone, as a fresh tuning gives.
    expected = fedclient.create_backend(live.server.service.job_status("digits").plan.model)
    tuning.apply(
        expected,
        client.latest_model().get_weights(),
        digits.x_train[:100],
        digits.y_train[:100],
        seed=3,
    )
    for name, value in expected.get_weights().items():
        np.testing.assert_array_equal(again.get_weights()[name], value)
    client.close()


def test_predict_with_a_wrong_shape_names_the_shape_it_takes(live_server: Any, digits: Any) -> None:
    live: LiveServer = live_server(devices_per_round=1, rounds=1)
    client = fedclient.Client(live.url, "digits", (digits.x_train[:50], digits.y_train[:50]))
    assert client.run_once().status == "uploaded"
    for bad in (digits.x_test[0], digits.x_test[:3, :10], [["a"] * 64]):
        with pytest.raises(fedclient.InvalidInput, match=r"shape \(n, 64\)"):
            client.predict(bad)
    with_nan = digits.x_test[:2].copy()
    with_nan[0, 0] = np.nan
    with pytest.raises(fedclient.InvalidInput, match="NaN"):
        client.predict(with_nan)
    assert client.predict(digits.x_test[:3]).shape == (3, 10)
    client.close()
