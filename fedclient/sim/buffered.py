"""The event loop of an asynchronous (FedBuff) federation on the simulated clock.

There are no rounds to wait for. Devices check in while the server lets them
(at most ``admit_per_round`` train at once), train on the version current at
that moment, and upload when their profile says they finish; the server folds
each buffer of ``devices_per_round`` updates in. A device that finishes goes
back to the end of the line, and the next idle device checks in. Events are
processed in simulated-time order (ties by device index), so a seed gives one
report.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from fedclient.runtime import EvalResult, TrainingBackend
from fedclient.sim.fleet import TOTALS, Fleet, SimClock, SimServer, device_token

if TYPE_CHECKING:
    from fedclient.protocol import JobPlan
    from fedclient.sim.config import SimulationConfig
    from fedclient.sim.datasets import Dataset

__all__ = ["run_buffered"]


async def run_buffered(
    config: SimulationConfig,
    plan: JobPlan,
    data: Dataset,
    server: SimServer,
    clock: SimClock,
    fleet: Fleet,
    evaluator: TrainingBackend,
    on_round: Callable[[dict[str, Any]], None] | None,
    wall_start: float,
) -> list[dict[str, Any]]:
    """Run the async job to its last buffer; one report entry per aggregation."""
    job = plan.job.name
    idle = deque(int(i) for i in np.random.default_rng([config.seed, 0]).permutation(len(fleet)))
    events: list[tuple[float, int]] = []  # (finish time, device index)
    token = ""
    counts = {"stale": 0, "network": 0, "left": 0, "waits": 0}
    contributed: list[int] = []  # devices whose update is in the buffer being filled
    sequence = 0

    async def start_devices() -> None:
        """Idle devices check in until the server says enough are training."""
        nonlocal token, sequence
        while idle:
            i = idle[0]
            sequence += 1
            d = fleet.activate(i, sequence)
            outcome = await d.checkin()
            if outcome is not None and outcome.status == "waiting":
                await _release(fleet, i)
                counts["waits"] += 1
                return  # the line stays as it is until someone finishes
            idle.popleft()
            if outcome is None or outcome.status != "admitted":
                counts["network" if outcome is None else "left"] += 1
                await _release(fleet, i)
                idle.append(i)
                if outcome is not None and outcome.status == "finished":
                    return
                continue
            token = token or device_token(d)
            trained = await d.download_and_train()
            if trained is None or trained.status != "trained":
                counts["network" if trained is None else "left"] += 1
                await _release(fleet, i)
                idle.append(i)
                continue
            assert d.client is not None
            size = d.client.device_state.update_size(job)
            seconds = d.round_seconds(plan.train, size)
            heapq.heappush(events, (clock.now + seconds + d.backoff, i))

    rounds: list[dict[str, Any]] = []
    evaluated: dict[int, EvalResult] = {}
    totals0 = await fleet.totals()
    await start_devices()
    last_version = 0
    while events:
        at, i = heapq.heappop(events)
        clock.now = max(clock.now, at)
        d = fleet.device(i)
        before = d.backoff
        outcome = await d.step()
        clock.now += d.backoff - before
        if outcome is None:
            counts["network"] += 1
        elif outcome.status == "discarded":
            counts["stale"] += 1
        elif outcome.status == "uploaded":
            contributed.append(i)
        await _release(fleet, i)
        idle.append(i)
        status = await server.status(job)
        for version in range(last_version + 1, status.model_version + 1):
            closed = await server.round(job, version)
            if version not in evaluated:
                evaluator.set_weights(await server.model(job, version, token))
                evaluated[version] = evaluator.evaluate(data.x_test, data.y_test)
            totals = await fleet.totals()
            record = {
                "round": version,
                "round_id": closed.round_id,
                "status": closed.status,
                "model_version": version,
                "accuracy": round(evaluated[version].accuracy, 6),
                "loss": round(evaluated[version].loss, 6),
                "train_loss": closed.train_loss,
                "admitted": closed.updates,
                "updates": closed.updates,
                "participants": sorted(contributed),
                "discarded": 0,
                "dropouts": {
                    "deadline": counts["stale"] + counts["left"],
                    "over_selection": 0,
                    "unavailable": 0,
                    "network": counts["network"],
                    "budget": 0,
                },
                **{k: totals[k] - totals0[k] for k in TOTALS},
                "round_seconds": round((closed.closed_at or clock.now) - closed.opened_at, 3),
                "simulated_seconds": round(closed.closed_at or clock.now, 3),
                "wall_seconds": round(time.perf_counter() - wall_start, 3),
            }
            totals0 = totals
            contributed.clear()
            counts.update(stale=0, network=0, left=0)
            rounds.append(record)
            if on_round is not None:
                on_round(record)
        last_version = status.model_version
        if status.status == "finished":
            break
        await start_devices()
    return rounds


async def _release(fleet: Fleet, index: int) -> None:
    """A device goes idle: its client closes; its state stays in SQLite."""
    await fleet.release(index)
