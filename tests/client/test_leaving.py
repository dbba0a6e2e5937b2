"""A device gives its place back on any failure of its own: data that do not fit the job,
a model that does not match, a backend that fails mid-round (issue 25). The next
healthy device takes the place at once, instead of "the round is full" until the
deadline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedclient
from tests.conftest import Server

pytestmark = pytest.mark.anyio


def _one_place(make_server: Any) -> Server:
    server: Server = make_server(devices_per_round=1, over_selection=1.0)
    return server


async def test_a_device_with_bad_labels_leaves_at_once_and_another_takes_its_place(
    make_server: Any, digits: Any
) -> None:
    server = _one_place(make_server)
    labels = digits.y_train[:100].copy()
    labels[7] = 12  # the job has 10 classes
    bad = fedclient.Client(
        "http://fedserver.local",
        "digits",
        (digits.x_train[:100], labels),
        transport=server.transport(),
    )
    with pytest.raises(fedclient.InvalidInput, match=r"labels must lie in \[0, 10\)"):
        await bad.astep()  # admitted (it could not know the job's classes before)...
    assert server.store.admitted_count(1) == 0  # ...and gone again
    assert bad.device_state.phase("digits") is fedclient.Phase.IDLE

    requests = bad.stats.requests
    with pytest.raises(fedclient.InvalidInput):
        await bad.astep()  # now it knows: refused before it checks in
    assert bad.stats.requests == requests

    healthy = fedclient.Client(
        "http://fedserver.local",
        "digits",
        (digits.x_train[100:200], digits.y_train[100:200]),
        transport=server.transport(),
    )
    assert (await healthy.arun_once()).status == "uploaded"  # the place was free
    assert server.service.job_status("digits").model_version == 1


async def test_data_that_do_not_fit_the_devices_own_model_never_check_in(
    server: Server, digits: Any
) -> None:
    device = fedclient.Client(
        "http://fedserver.local",
        "digits",
        (digits.x_train[:50, :60], digits.y_train[:50]),  # 60 features, the model takes 64
        model=fedclient.models.mlp(64, 16, 10),
        transport=server.transport(),
    )
    with pytest.raises(fedclient.InvalidInput, match=r"shape \(n, 64\)"):
        await device.astep()
    assert device.stats.requests == 0


async def test_an_example_store_with_a_label_out_of_range_leaves(
    make_server: Any, digits: Any, tmp_path: Path
) -> None:
    server = _one_place(make_server)
    store = fedclient.ExampleStore(tmp_path / "examples.sqlite")
    store.add(digits.x_train[:40], digits.y_train[:40])
    store.add(digits.x_train[40:41], [10])
    device = fedclient.Client(
        "http://fedserver.local", "digits", store, transport=server.transport()
    )
    with pytest.raises(fedclient.InvalidInput, match=r"got \[0, 10\]"):
        await device.astep()
    assert server.store.admitted_count(1) == 0
    store.forget()  # the app drops every example, bad one included, and adds good ones
    store.add(digits.x_train[:40], digits.y_train[:40])
    assert (await device.arun_once()).status == "uploaded"


class FailingModel:
    """A backend that fails mid-training (a runtime's own error, not the SDK's)."""

    runtime = "numpy"

    def __init__(self) -> None:
        self.inner = fedclient.models.mlp(64, 16, 10)
        self.inputs, self.classes = 64, 10

    def get_weights(self) -> Any:
        return self.inner.get_weights()

    def set_weights(self, weights: Any) -> None:
        self.inner.set_weights(weights)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("out of memory on the accelerator")

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> Any:
        return self.inner.evaluate(x, y)

    def predict(self, x: np.ndarray) -> Any:
        return self.inner.predict(x)


async def test_a_backend_failing_mid_round_gives_the_place_back(
    make_server: Any, digits: Any
) -> None:
    server = _one_place(make_server)
    device = fedclient.Client(
        "http://fedserver.local",
        "digits",
        (digits.x_train[:50], digits.y_train[:50]),
        model=FailingModel(),
        transport=server.transport(),
    )
    assert (await device.astep()).status == "admitted"
    assert server.store.admitted_count(1) == 1
    with pytest.raises(RuntimeError, match="out of memory"):
        while True:
            await device.astep()
    assert server.store.admitted_count(1) == 0
    assert device.device_state.phase("digits") is fedclient.Phase.IDLE
    assert device.stats.discarded_rounds == 1


async def test_an_update_trained_on_forgotten_examples_never_leaves_the_device(
    make_server: Any, digits: Any, tmp_path: Path
) -> None:
    server = _one_place(make_server)
    store = fedclient.ExampleStore(tmp_path / "examples.sqlite")
    store.add(digits.x_train[:40], digits.y_train[:40], source="alice")
    store.add(digits.x_train[40:80], digits.y_train[40:80], source="bob")
    device = fedclient.Client(
        "http://fedserver.local", "digits", store, transport=server.transport(), seed=0
    )
    while device.device_state.phase("digits") is not fedclient.Phase.TRAINED:
        await device.astep()  # trained on alice's and bob's examples, not uploaded yet
    assert store.forget(source="bob").complete  # bob asks to be forgotten
    left = await device.astep()
    assert left.status == "discarded" and "forgotten" in left.reason
    assert server.store.update_count(1) == 0 and server.store.admitted_count(1) == 0
    again = await device.arun_once()  # the place is free: it trains on what is left
    assert again.status == "uploaded" and again.receipt is not None
    assert again.receipt.num_examples == 40
