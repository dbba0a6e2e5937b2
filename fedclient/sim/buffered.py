"""The event loop of an asynchronous (FedBuff) federation on the simulated clock.

There are no rounds to wait for. Devices check in while the server lets them
(at most ``admit_per_round`` train at once), train on the version current at
that moment, and upload when their profile says they finish; the server folds
each buffer of ``devices_per_round`` updates in. A device that finishes goes
back to the end of the line, and the next idle device checks in. Events are
processed in simulated-time order (ties by device index), so a seed gives one
report.

With an availability model (``--availability``), a device offline when its turn comes
keeps its place in the line and the next online one checks in; one whose session ends
before its upload vanishes mid-training (``unavailable``): it neither uploads nor
leaves, its place comes back to the server after the job's deadline, and when it is
next online it sends its update late (counted, weighted by staleness) or drops it. When
nobody is training (all offline, or every place held by vanished devices) the clock
moves on by `IDLE_STEP` seconds at a time, for at most `IDLE_LIMIT`.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from fedclient.runtime import EvalResult, TrainingBackend
from fedclient.sim.fleet import TOTALS, Fleet, SimClock, SimServer, device_token

if TYPE_CHECKING:
    from fedclient import StepOutcome
    from fedclient.protocol import JobPlan
    from fedclient.sim.config import SimulationConfig
    from fedclient.sim.datasets import Dataset

__all__ = ["run_buffered"]

#: Simulated seconds the clock moves on while nobody is training.
IDLE_STEP = 60.0
#: ...and for at most this long in a row (a week): then the job is reported as it stands.
IDLE_LIMIT = 7 * 24 * 3600.0


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
    registry = fleet.registry
    idle = Line(registry.checkin_order(config.seed, 0)[0], len(registry))
    events: list[tuple[float, int]] = []  # (finish time, device index)
    token = ""
    counts = {"stale": 0, "network": 0, "left": 0, "waits": 0, "unavailable": 0}
    # Who could take part, who came, and who counted, since the last aggregation.
    seen = {"checked_in": 0, "admitted": 0, "trained": 0}
    contributed: list[int] = []  # devices whose update is in the buffer being filled
    sequence = 0

    def settled(i: int, outcome: StepOutcome | None) -> None:
        """Count an upload's outcome (made on time, or late after a vanishing)."""
        if outcome is None:
            counts["network"] += 1
        elif outcome.status == "discarded":
            counts["stale"] += 1
        elif outcome.status == "uploaded":
            contributed.append(i)

    async def start_devices() -> str:
        """Idle devices online now check in and start training until the server says
        enough are training ("waiting"), the job is finished ("finished"), or a whole
        pass over the line started nobody ("passed": all offline, or all turned away)."""
        nonlocal token, sequence
        passed = 0  # idle devices passed over in a row without starting to train
        while idle and passed < len(idle):
            i = idle.first()
            if not registry.online(i, clock.now):
                idle.append(idle.popleft())  # it waits for its next turn
                passed += 1
                continue
            sequence += 1
            d = fleet.activate(i, sequence)
            outcome = await d.checkin()
            if outcome is not None and outcome.status in ("uploaded", "discarded"):
                settled(i, outcome)  # back from vanishing: it sent what it held, late
                if await record_aggregations():
                    await _release(fleet, i)
                    return "finished"
                outcome = await d.checkin()
            if outcome is not None and outcome.status == "waiting":
                await _release(fleet, i)
                counts["waits"] += 1
                return "waiting"  # the line stays as it is until someone finishes
            seen["checked_in"] += 1
            idle.popleft()
            passed += 1
            if outcome is None or outcome.status != "admitted":
                counts["network" if outcome is None else "left"] += 1
                await _release(fleet, i)
                idle.append(i)
                if outcome is not None and outcome.status == "finished":
                    return "finished"
                continue
            seen["admitted"] += 1
            token = token or device_token(d)
            trained = await d.download_and_train()
            if trained is None or trained.status != "trained":
                counts["network" if trained is None else "left"] += 1
                await _release(fleet, i)
                idle.append(i)
                continue
            assert d.client is not None
            size = d.client.device_state.update_size(job)
            at = clock.now + d.round_seconds(plan.train, size) + d.backoff
            if registry.online_until(i, clock.now) < at:
                counts["unavailable"] += 1  # its session ends first: it simply vanishes
                await _release(fleet, i)
                idle.append(i)
                continue
            seen["trained"] += 1
            heapq.heappush(events, (at, i))
            passed = 0
        return "passed"

    rounds: list[dict[str, Any]] = []
    evaluated: dict[int, EvalResult] = {}
    totals0 = await fleet.totals()
    last_version = 0

    async def record_aggregations() -> bool:
        """A report entry for each buffer aggregated since the last call; whether the
        job is finished."""
        nonlocal last_version, totals0
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
                "participation": {
                    "available": registry.available(clock.now),
                    **seen,
                    "updates": len(contributed),
                },
                "discarded": 0,
                "dropouts": {
                    "deadline": counts["stale"] + counts["left"],
                    "over_selection": 0,
                    "unavailable": counts["unavailable"],
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
            counts.update(stale=0, network=0, left=0, unavailable=0)
            seen.update(checked_in=0, admitted=0, trained=0)
            rounds.append(record)
            if on_round is not None:
                on_round(record)
        last_version = status.model_version
        return status.status == "finished"

    started = await start_devices()
    idle_since = clock.now
    while started != "finished":
        if events:
            at, i = heapq.heappop(events)
            clock.now = max(clock.now, at)
            d = fleet.device(i)
            before = d.backoff
            outcome = await d.step()
            clock.now += d.backoff - before
            settled(i, outcome)
            await _release(fleet, i)
            idle.append(i)
            idle_since = clock.now
        elif clock.now - idle_since < IDLE_LIMIT and (
            started == "waiting" or registry.availability is not None
        ):
            # Nobody is training: wait for places that lapse, or devices that come online.
            clock.now += IDLE_STEP
        else:
            break  # nobody is training, and nobody can start: the job stands where it is
        if await record_aggregations():
            break
        started = await start_devices()
    return rounds


class Line:
    """The idle devices in the order they come to check in: the fleet's order (drawn
    with the seed, as `DeviceRegistry.checkin_order` draws it: lazily for a fleet of
    millions), then those sent to its end, in the order they were. Only the devices
    sent back are held, so the line costs memory for the devices that worked."""

    def __init__(self, order: Iterator[int], size: int) -> None:
        self._order: Iterator[int] | None = order
        self._back: deque[int] = deque()
        self._first: int | None = None
        self._size = size

    def __len__(self) -> int:
        return self._size

    def first(self) -> int:
        """The device whose turn it is (the line must not be empty)."""
        if self._first is None:
            nxt = None if self._order is None else next(self._order, None)
            if nxt is None:
                self._order = None
                nxt = self._back.popleft()
            self._first = nxt
        return self._first

    def popleft(self) -> int:
        """The device whose turn it is, out of the line."""
        first = self.first()
        self._first = None
        self._size -= 1
        return first

    def append(self, i: int) -> None:
        """Device ``i`` joins the end of the line."""
        self._back.append(i)
        self._size += 1


async def _release(fleet: Fleet, index: int) -> None:
    """A device goes idle: its client closes; its state stays in SQLite."""
    await fleet.release(index)
