"""Streaming aggregation: a mean-based strategy folds updates into the round's running
sum as they arrive and keeps at most `FOLD_EVERY` bodies; the model it makes is the
one every body held to the close would make, across restarts and rolled-back folds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from fedclient.protocol import Weights, decode_tensors
from fedclient.server import ClientUpdate, FedAvg, FederationService, ServerStore, Strategy
from fedclient.server import rounds as rounds_module
from fedclient.server.strategies import FedAdam, Median
from tests.conftest import ManualClock, Server, make_plan

pytestmark = pytest.mark.anyio

DEVICES = 10
FOLD = 3


class HeldFedAvg(Strategy):
    """FedAvg as a plain strategy: its rounds keep every body to the close."""

    def aggregate(
        self, weights: Weights, updates: Sequence[ClientUpdate], state: Weights
    ) -> tuple[Weights, Weights]:
        return FedAvg(self.settings).aggregate(weights, updates, state)


def _stored_bodies(server: Server, round_id: int = 1) -> int:
    # In the row or in the round's spool file beside a served SQLite file.
    return len(server.store.updates(round_id, bodies=False, unfolded=True))


def _model(server: Server, version: int = 1) -> Weights:
    found = server.store.model("digits", version)
    assert found is not None
    return decode_tensors(found[0])[0]


def _same(a: Weights, b: Weights) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture(autouse=True)
def small_folds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rounds_module, "FOLD_EVERY", FOLD)


async def _one_round(server: Server, make_devices: Any) -> list[int]:
    """Every device uploads once; the stored bodies after each upload before the close."""
    held = []
    for i, device in enumerate(make_devices(DEVICES, server.transport())):
        assert (await device.arun_once()).status == "uploaded"
        if i < DEVICES - 1:
            held.append(_stored_bodies(server))
    return held


def test_only_mean_strategies_stream() -> None:
    assert FedAvg.streams and FedAdam.streams and not Median.streams
    assert not HeldFedAvg.streams  # a user's strategy keeps its bodies unless it says so


async def test_a_streaming_round_holds_few_bodies_and_makes_the_held_rounds_model(
    make_server: Any, make_devices: Any
) -> None:
    job = {"devices_per_round": DEVICES, "rounds": 1}
    streaming = make_server(**job)
    held = make_server(service_options={"strategy": HeldFedAvg()}, **job)
    bodies = await _one_round(streaming, make_devices)
    assert max(bodies) < FOLD and bodies[FOLD - 1] == 0  # the FOLDth upload folded them all
    assert await _one_round(held, make_devices) == list(range(1, DEVICES))
    assert _stored_bodies(streaming) == _stored_bodies(held) == 0  # closed: none kept
    assert not streaming.store.partial_sums(1)  # the closed round's sums are gone too
    # Folded in arrival order, in float64: the very model the held bodies make.
    assert _same(_model(streaming), _model(held))
    closed = streaming.service.job_status("digits").previous_round
    assert closed is not None and closed.updates == DEVICES


async def test_a_restarted_server_folds_on_from_the_stored_sum(
    db_url: Any, make_server: Any, make_devices: Any
) -> None:
    job = {"devices_per_round": DEVICES, "rounds": 1}
    reference = make_server(**job)
    await _one_round(reference, make_devices)
    db, clock = db_url("server"), ManualClock()
    first = Server(FederationService(ServerStore(db), clock=clock), clock)
    first.service.add_job(make_plan(**job))
    for device in make_devices(DEVICES, first.transport())[:7]:  # two folds, one waiting
        assert (await device.arun_once()).status == "uploaded"
    assert _stored_bodies(first) == 1 and first.store.round_sum_count(1) == 6
    first.store.close()
    second = Server(FederationService(ServerStore(db), clock=clock), clock)
    second.service.add_job(make_plan(**job))  # the same plan: resume
    for device in make_devices(DEVICES, second.transport())[7:]:
        assert (await device.arun_once()).status == "uploaded"
    assert _same(_model(second), _model(reference))


async def test_a_fold_rolled_back_leaves_the_bodies_and_is_folded_once_later(
    make_server: Any, make_devices: Any
) -> None:
    server: Server = make_server(devices_per_round=DEVICES, rounds=1)
    reference: Server = make_server(devices_per_round=DEVICES, rounds=1)
    await _one_round(reference, make_devices)
    devices = make_devices(DEVICES, server.transport())
    for device in devices[:2]:
        assert (await device.arun_once()).status == "uploaded"
    job = server.store.job("digits")
    assert job is not None
    before = server.store.fingerprint()
    with pytest.raises(RuntimeError), server.store.atomic():
        assert server.service.rounds.fold(job, 1).count == 2  # the cache now says 2
        raise RuntimeError("the transaction around the fold fails")
    assert server.store.fingerprint() == before  # both bodies kept, no sum stored
    for device in devices[2:]:
        assert (await device.arun_once()).status == "uploaded"
    assert _same(_model(server), _model(reference))  # each update counted once
