"""Asynchronous federation (FedBuff): buffers instead of rounds, staleness weights and bounds."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import fedclient
from fedclient.server.strategies import ClientUpdate, FedAvg
from tests.conftest import Server, step_until

pytestmark = pytest.mark.anyio


def test_stale_updates_weigh_less() -> None:
    base = {"w": np.zeros(1, np.float32)}
    fresh = ClientUpdate("a", 10, {"w": np.array([1.0], np.float32)}, staleness=0)
    stale = ClientUpdate("b", 10, {"w": np.array([-1.0], np.float32)}, staleness=3)
    new, _ = FedAvg().aggregate(base, [fresh, stale], {})
    # weights 10 and 10/sqrt(4) = 5: (10 - 5) / 15
    np.testing.assert_allclose(new["w"], [1 / 3], rtol=1e-6)


async def test_devices_train_on_whatever_version_is_current(
    make_server: Any, make_devices: Any
) -> None:
    server: Server = make_server(
        mode="async", devices_per_round=2, over_selection=2.0, rounds=4, max_staleness=1
    )
    a, b, c, d, e = make_devices(5, server.transport(), clock=server.clock)
    # a, b, c and d start on version 0; e must wait (4 may train at once).
    for device in (a, b, c, d):
        assert (await device.astep()).status == "admitted"
    assert (await e.astep()).status == "waiting"
    for device in (a, b, c, d):
        await step_until(device, fedclient.Phase.TRAINED)  # on version 0
    # a and b fill the first buffer: version 1. c then lands in the next buffer, stale by 1.
    assert (await a.astep()).status == "uploaded"
    assert (await b.astep()).status == "uploaded"
    assert server.service.job_status("digits").model_version == 1
    assert (await c.astep()).status == "uploaded"
    rows = server.store.updates(2)
    assert [r.staleness for r in rows] == [0 + 1]
    # e checks in now: it trains on version 1, and its update is fresh.
    assert (await e.arun_once()).status == "uploaded"
    assert server.service.job_status("digits").model_version == 2
    assert [r.staleness for r in server.store.updates(2)] == [1, 0]
    # a, back for more, fills buffer 3 with e's second update -> version 3; d, still
    # holding an update trained on version 0, is now 3 versions behind (> 1): refused.
    assert (await a.arun_once()).status == "uploaded"
    assert (await e.arun_once()).status == "uploaded"
    assert server.service.job_status("digits").model_version == 3
    outcome = await d.astep()
    assert outcome.status == "discarded" and "versions behind" in outcome.reason


async def test_async_buffers_have_no_deadline(make_server: Any, make_devices: Any) -> None:
    server: Server = make_server(mode="async", devices_per_round=2, deadline_seconds=60)
    (device,) = make_devices(1, server.transport(), clock=server.clock)
    assert (await device.arun_once()).status == "uploaded"
    server.clock.now += 10_000  # long past any deadline
    server.service.tick()
    status = server.service.job_status("digits")
    assert status.current_round is not None and status.current_round.status == "open"
    assert status.current_round.updates == 1 and status.rounds_failed == 0
    assert fedclient


async def test_devices_that_vanish_give_their_places_back_after_the_deadline(
    make_server: Any, make_devices: Any
) -> None:
    """Devices switched off mid-training neither upload nor leave: after the job's
    deadline_seconds their places go to others (else the job would wait for ever), and
    an update that comes after all still counts."""
    server: Server = make_server(
        mode="async", devices_per_round=2, over_selection=1.0, deadline_seconds=60
    )
    a, b, c = make_devices(3, server.transport(), clock=server.clock)
    await step_until(a, fedclient.Phase.TRAINED)  # a trains, then is out of reach
    assert (await b.astep()).status == "admitted"  # b is switched off
    server.clock.now += 59
    assert (await c.astep()).status == "waiting"  # every place is theirs for the deadline
    server.clock.now += 2
    assert (await c.astep()).status == "admitted"
    # b is back: past its plan's deadline it drops what it had, and checks in afresh.
    assert (await b.astep()).status == "discarded"
    assert (await b.astep()).status == "admitted"
    assert (await c.arun_once()).status == "uploaded"
    # a's update, sent late after all, still counts: it fills the buffer.
    assert (await a.astep()).status == "uploaded"
    status = server.service.job_status("digits")
    assert status.model_version == 1 and status.rounds_completed == 1
