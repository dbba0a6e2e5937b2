"""The local engine: real `fedclient.Client`s against the real server, on a simulated clock.

Each round is a small discrete-event simulation. Devices check in (in an order
drawn from the seed), the admitted ones download and train for real, and each
finishes at a simulated time given by its `DeviceProfile`. Uploads then reach
the server in that order with the clock set to their arrival time, so the
server's quota and deadline logic decides which updates count — exactly as it
would in production, only without waiting. Nothing depends on wall time, so
the same seed gives the same report.

The devices and the server they talk to are `fedclient.sim.fleet`'s; the rounds of
an async (FedBuff) job are `fedclient.sim.buffered`'s; what the report says beyond
the rounds (privacy spend, personalisation, per-device results) is
`fedclient.sim.results`'. `SimulationConfig`
(`fedclient.sim.config`) and `SimClock` are re-exported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import heapq
import itertools
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import msgspec
import numpy as np

from fedclient import InvalidInput, __version__
from fedclient.privacy.noise import SeededNoiseWarning
from fedclient.protocol import JobPlan, Weights, encode_tensors
from fedclient.runtime import EvalResult, create_backend
from fedclient.server import FederationService, ServerStore, create_app
from fedclient.server.selection import SELECTION_PENDING
from fedclient.sim.arrivals import ARRIVAL_STEP, Arrivals
from fedclient.sim.buffered import run_buffered
from fedclient.sim.config import SimulationConfig
from fedclient.sim.datasets import CsvColumns, Dataset, load_dataset
from fedclient.sim.fleet import (
    Checkin,
    Fleet,
    SimClock,
    SimServer,
    disable_secure_delete,
    is_round_full,
    simulation_authority,
)
from fedclient.sim.results import (
    device_report,
    personalization_report,
    privacy_report,
    rounded,
)
from fedclient.sim.trainpool import TrainPool, resolve_workers

__all__ = ["SimClock", "SimulationConfig", "peak_rss_mb", "simulate"]


async def simulate(
    config: SimulationConfig, on_round: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Run the federation ``config`` describes; return the report (see `fedclient.sim.report`)."""
    wall_start = time.perf_counter()
    config = config.resolved()  # one seed; no flag the plan would override
    columns = CsvColumns(
        config.text_column, config.label_column, config.user_column, header=not config.no_header
    )
    data = load_dataset(config.dataset, config.data_dir, seed=config.seed, columns=columns)
    if config.holdout:  # the server's own data (e.g. public data it pre-trained on)
        data = data.without(data.holdout(config.holdout, config.seed))
    _check_natural_devices(config, data)
    plan = config.plan(data)
    plugins = config.plugins(plan)
    if config.engine not in ("local", "ray"):
        raise InvalidInput(f"unknown engine {config.engine!r}; use local or ray")
    if config.engine != "ray" and (config.ray_address or config.ray_actors or config.ray_host_ip):
        raise InvalidInput("--ray-address, --ray-actors and --ray-host-ip need --engine ray")
    if config.engine == "ray" and plan.train.trainer:
        raise InvalidInput("a client trainer ([train] trainer) runs on the local engine")
    if config.engine == "ray" and config.workers != 1:
        raise InvalidInput("--workers is for the local engine (Ray runs --ray-actors)")
    if config.inline_model_max < 0:
        raise InvalidInput(f"--inline-model-max must be 0 or more, got {config.inline_model_max}")
    if (
        config.server is None
        and config.state_dir
        and any(Path(config.state_dir).glob("**/devices-*.sqlite"))  # shard-NNN/ on Ray
    ):
        raise InvalidInput(
            f"--state-dir {config.state_dir} holds the devices of an earlier run, enrolled "
            "with that run's in-process server, which is gone: give a new folder (or "
            "--server URL, a server that knows them)"
        )
    clock = SimClock()
    service: FederationService | None = None
    if config.server is None:
        # Secure aggregations' public randomness from the seed: the same report each time.
        public = np.random.default_rng([config.seed, 5])
        authority = simulation_authority(config) if plan.privacy.secagg else None
        service = FederationService(
            ServerStore(),
            clock=clock,
            secure_random=public.bytes,
            identity_authorities=(authority.public,) if authority else (),
        )
        disable_secure_delete(service.store.db)
        service.add_job(plan)
        server = SimServer(
            "http://fedserver.local",
            httpx.ASGITransport(app=create_app(service, metrics=False, body_idle_seconds=None)),
            clock,
            service.tick,
        )
    else:
        if config.faults:
            raise InvalidInput("--faults needs the in-process server (drop --server)")
        server = SimServer(
            config.server.rstrip("/"),
            None,
            credential=config.enrolment_credential,
            verify=config.ca_bundle or True,
            patience=config.server_patience,
        )
    async with contextlib.AsyncExitStack() as stack:
        # The devices draw privacy noise from the seed, knowingly (the report says so):
        # one warning per device and round would bury the run's output.
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore", SeededNoiseWarning)
        stack.push_async_callback(server.aclose)
        if config.server is not None:
            plan = (await server.status(plan.job.name)).plan  # the server's plan rules
        if config.engine == "ray":  # the devices on Ray actors, the server served over HTTP
            fleet = await stack.enter_async_context(_ray_fleet(config, plan, data, service))
        else:
            # The devices' SQLite state: in memory (shards of the fleet's
            # DEVICES_PER_STATE_FILE devices each), or in STATE_FILES files under --state-dir.
            state_dir = Path(config.state_dir) if config.state_dir else None
            if state_dir is not None:
                state_dir.mkdir(parents=True, exist_ok=True)
            fleet = Fleet(config, plan, data, server, state_dir)
            stack.callback(fleet.close)
            stack.push_async_callback(fleet.rest)
            workers = resolve_workers(config.workers)
            if workers > 1:
                pool = TrainPool(workers, plan.model, config.runtime)
                stack.callback(pool.close)
                fleet.train_on(pool)
        devices = len(fleet)
        evaluator = _Evaluator(plan, config.runtime, data)
        stack.callback(evaluator.close)
        startup_seconds = time.perf_counter() - wall_start  # to the first round
        stack.enter_context(_long_lived_frozen())
        if plan.job.mode == "async":
            if config.engine != "local" or config.server is not None:
                raise InvalidInput("--mode async runs on the local engine, in-process")
            if config.per_device or config.save_model or config.stop_at is not None:
                raise InvalidInput("--per-device, --save-model and --stop-at are for sync rounds")
            rounds = await run_buffered(
                config, plan, data, server, clock, fleet, evaluator.backend, on_round, wall_start
            )
        else:
            rounds = await _run_rounds(
                config, plan, data, server, clock, fleet, evaluator, on_round, wall_start
            )
        privacy = privacy_report(plan, fleet)
        personal = personalization_report(config, plan, data, fleet, evaluator.latest)
        latest, backend = evaluator.latest, evaluator.backend
        per_device = device_report(config, data, fleet, latest, backend, rounds)
        if config.save_model and evaluator.latest is not None:
            version, weights = evaluator.latest
            path = Path(config.save_model)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode_tensors(weights, {"model_version": str(version)}))
    last = rounds[-1] if rounds else {}
    final = {
        "accuracy": last.get("accuracy"),
        "loss": last.get("loss"),
        "model_version": last.get("model_version"),
        "rounds_completed": sum(r["status"] == "closed" for r in rounds),
        "rounds_failed": sum(r["status"] == "failed" for r in rounds),
        "bytes_up": sum(r["bytes_up"] for r in rounds),
        "bytes_down": sum(r["bytes_down"] for r in rounds),
        "retries": sum(r["retries"] for r in rounds),
        "wasted_bytes": sum(r["wasted_bytes"] for r in rounds),
        "resumed_transfers": sum(r["resumed_transfers"] for r in rounds),
        "discarded": sum(r["discarded"] for r in rounds),
        "dropouts": {
            cause: sum(r["dropouts"][cause] for r in rounds)
            for cause in ("deadline", "over_selection", "unavailable", "network", "budget")
        },
        "devices": devices,
        "examples": sum(r.get("examples", 0) for r in rounds),  # sync rounds count them
        **({"privacy": privacy} if privacy else {}),
        **_federated_final(rounds),
        **personal,
        **per_device.pop("final", {}),
        "simulated_seconds": last.get("simulated_seconds", 0.0),
        "wall_seconds": round(time.perf_counter() - wall_start, 3),
        "startup_seconds": round(startup_seconds, 3),
        "peak_rss_mb": peak_rss_mb(),
    }
    return {
        "fedsim_version": __version__,
        "versions": {
            "fedclient": __version__,
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
        # The enrolment secret stays out of the report (a file that gets shared).
        "config": {**asdict(config), "enrolment_credential": None},
        "plan": msgspec.to_builtins(plan),
        **({"plugins": plugins} if plugins else {}),
        "rounds": rounds,
        "final": final,
        **per_device,
    }


@contextlib.contextmanager
def _long_lived_frozen() -> Iterator[None]:
    """The objects alive when the rounds start (the modules, the data set, the fleet's
    registry, the server) live to the end: the cyclic collector skips them until then.

    Its full collections otherwise walk them again and again: 3 of them took 0.75 s
    of a W3 run at load 4 (`gc.callbacks`), a third of the collector's time there."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far, in MB (None where unknown)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def _check_natural_devices(config: SimulationConfig, data: Dataset) -> None:
    """``--partition natural`` makes one device per user: a number of devices other than
    that (or the default, which it replaces) is refused, not silently ignored."""
    if config.partition != "natural" or data.users is None:
        return
    users = len(np.unique(data.users))
    default = SimulationConfig.__dataclass_fields__["devices"].default
    if config.devices not in (default, users):
        raise InvalidInput(
            f"--partition natural makes one device per user ({users} in {data.name}), "
            f"not --devices {config.devices}: drop --devices"
        )


def _federated_final(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The last federated evaluation: the model version it measured, and the central test
    accuracy of that same version (``accuracy`` beside it is the final model's)."""
    measured = [r for r in rounds if r.get("federated_accuracy") is not None]
    if not measured:
        return {}
    last = measured[-1]
    return {
        "federated_accuracy": last["federated_accuracy"],
        "federated_loss": last["federated_loss"],
        "federated_model_version": last["federated_model_version"],
        "federated_central_accuracy": last["federated_central_accuracy"],
        "federated_evaluated": last["evaluated"],
    }


class _Evaluator:
    """Each model version's accuracy on the test set, computed on a thread of its own.

    Evaluation is numpy over the whole test set, which runs with the GIL released: on a
    second core it overlaps the next round's check-ins instead of holding up the loop.
    It has its own model object (the fleet's serves the devices training on the loop).
    The results do not depend on when they are computed."""

    def __init__(self, plan: JobPlan, runtime: str, data: Dataset) -> None:
        self.backend = create_backend(plan.model, runtime)
        self.data = data
        self.results: dict[int, asyncio.Future[EvalResult]] = {}
        self.latest: tuple[int, Weights] | None = None  # the newest model it was given
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="fedsim-evaluate")

    def start(self, version: int, weights: Weights) -> None:
        """Evaluate model ``version`` (its result lands in ``results[version]``)."""
        if self.latest is None or version >= self.latest[0]:
            self.latest = (version, weights)
        loop = asyncio.get_running_loop()
        self.results[version] = loop.run_in_executor(self._thread, self._evaluate, weights)

    def _evaluate(self, weights: Weights) -> EvalResult:
        self.backend.set_weights(weights)
        return self.backend.evaluate(self.data.x_test, self.data.y_test)

    def close(self) -> None:
        self._thread.shutdown(cancel_futures=True)


async def _run_rounds(
    config: SimulationConfig,
    plan: JobPlan,
    data: Dataset,
    server: SimServer,
    clock: SimClock,
    fleet: Fleet,
    evaluator: _Evaluator,
    on_round: Callable[[dict[str, Any]], None] | None,
    wall_start: float,
) -> list[dict[str, Any]]:
    job = plan.job.name
    simulated = isinstance(server.clock, SimClock)
    rounds: list[dict[str, Any]] = []
    # Rounds whose model is still being evaluated: reported, in order, once it is (with
    # the model the devices evaluated, when they did: the round's starting model).
    unreported: list[
        tuple[dict[str, Any], asyncio.Future[EvalResult], asyncio.Future[EvalResult] | None]
    ] = []

    async def report_evaluated() -> None:
        for record, evaluated, federated in unreported:
            result = await evaluated
            record["accuracy"], record["loss"] = round(result.accuracy, 6), round(result.loss, 6)
            if federated is not None:  # the central figure of the model the devices measured
                record["federated_central_accuracy"] = round((await federated).accuracy, 6)
            rounds.append(record)
            if on_round is not None:
                on_round(record)
        unreported.clear()

    sim_total = 0.0
    token = ""
    while True:
        status = await server.status(job)
        current = status.current_round
        if status.status == "finished" or current is None:
            break
        totals0 = await fleet.totals()
        # Check-in: devices arrive in an order drawn from the seed; the server fills the round.
        registry = fleet.registry
        order, failure_draw = registry.checkin_order(config.seed, current.number)
        # Asleep, off Wi-Fi or unplugged: a device offline does not check in.
        # The devices' time: the simulated clock's, or against a remote server (which
        # keeps real time) the simulated seconds the rounds took so far.
        now = clock.now if simulated else sim_total
        available = registry.available(now)
        # With an availability model, devices offline now may come online while the
        # round is open, and check in then (`fedclient.sim.arrivals`).
        arrivals = None
        if (
            simulated
            and registry.availability is not None
            and not plan.privacy.secagg
            and not plan.selection.name
        ):
            arrivals = Arrivals(registry)
        late_looks = arrivals is not None
        online = (
            (i for i in order if registry.online(i, now))
            if arrivals is None
            else arrivals.online_now(order, now)
        )
        checked_in = joined_late = 0
        admitted: list[int] = []
        network_dropouts = unavailable = 0
        full = False
        # In waves of as many devices as there are places left: a fleet spread over
        # workers checks a wave in at once, and admits the same devices as one by one.
        # A round that selects tells its candidates to come back (after retry_after s).
        candidates: list[tuple[int, float]] = []
        while not full and len(admitted) < plan.admit_per_round:
            wave = list(itertools.islice(online, plan.admit_per_round - len(admitted)))
            if not wave:
                break
            answers = await fleet.checkin(wave, current.number, clock.now)
            checked_in += len(answers)
            told = _told(answers, token)
            admitted += told.admitted
            candidates += told.pending
            network_dropouts += told.network
            full, token = full or told.full, told.token
        selecting = 0.0  # seconds the candidates waited for the selection
        while candidates:  # they come back until the round chose (its window bounds it)
            wait = max(retry for _, retry in candidates)
            selecting += wait
            if simulated:
                clock.now += wait
            else:
                await asyncio.sleep(wait)
            back = [i for i, _ in candidates]
            told = _told(await fleet.checkin(back, current.number, clock.now), token)
            admitted += told.admitted
            candidates = told.pending
            network_dropouts += told.network
            token = told.token
        await report_evaluated()  # the last round's evaluation ran alongside these check-ins
        if config.stop_at is not None and rounds and rounds[-1]["accuracy"] >= config.stop_at:
            break  # --stop-at: the target is reached; the round just opened is not run
        # Download and train for real; each device finishes at its simulated time.
        finish: list[tuple[float, int]] = []  # (upload time, device): a heap
        cut = 0  # uploads that found the round closed (by its quota: over-selection)
        # (a remote round's times are the server's: offsets from the round's open)
        opened = None if simulated else current.opened_at
        counted: list[int] = []  # the devices whose update the round took

        lost = await _start_work(
            fleet,
            failure_draw,
            admitted,
            clock.now,
            current.opened_at + selecting,
            now,
            opened,
            finish,
        )
        unavailable += lost.unavailable
        network_dropouts += lost.network
        refused, discarded = lost.refused, lost.discarded
        trained_in_time = len(finish)  # trained, and online until their upload
        secured = 0  # devices whose masked input went into a secure sum
        examples = 0  # examples the updates that arrived trained on (epochs or steps)
        if plan.privacy.secagg:
            # Secure aggregation: the stages advance together once the slowest device
            # finished training; each pass moves every device one stage on.
            if simulated and finish:
                clock.now = max(clock.now, max(at for at, _ in finish))
            pending = [i for _, i in sorted(finish)]
            for _ in range(9):  # six stages, and room for retries
                waiting = []
                for i in pending:
                    outcome, waited = await fleet.upload(i, clock.now)
                    if outcome is None:
                        network_dropouts += 1
                    elif outcome.status == "waiting":
                        waiting.append(i)
                    else:
                        discarded += outcome.status == "discarded"
                        secured += outcome.status == "uploaded"
                        if outcome.status == "uploaded":
                            counted.append(i)
                            examples += plan.train.work(registry.count(i))
                pending = waiting
                if not pending:
                    break
            finish = []
        # Uploads arrive in simulated-time order; the server's quota and deadline decide.
        # A device retrying an upload holds the clock for its backoff. Between them, a
        # look every ARRIVAL_STEP seconds for devices that came online, while there is room.
        look = current.opened_at + selecting + ARRIVAL_STEP
        span = 0.0  # the round's last upload, from its open
        while finish or arrivals is not None:
            if arrivals is not None:
                places = plan.admit_per_round - len(admitted)
                if (
                    places <= 0
                    or full
                    or len(counted) >= plan.job.devices_per_round
                    or look >= current.deadline
                ):
                    arrivals = None  # no more looks this round
                    continue
                if not finish or look < finish[0][0]:
                    clock.now = max(clock.now, look)
                    wave = arrivals.take(look, places)
                    look += ARRIVAL_STEP
                    if not wave:
                        continue
                    answers = await fleet.checkin(wave, current.number, clock.now)
                    checked_in += len(answers)
                    told = _told(answers, token)
                    late = told.admitted
                    network_dropouts += told.network
                    full, token = full or told.full, told.token
                    admitted.extend(late)
                    joined_late += len(late)
                    before = len(finish)
                    t = clock.now  # they check in, and start, now
                    lost = await _start_work(fleet, failure_draw, late, t, t, t, opened, finish)
                    unavailable += lost.unavailable
                    network_dropouts += lost.network
                    refused += lost.refused
                    discarded += lost.discarded
                    trained_in_time += len(finish) - before
                    continue
            at, i = heapq.heappop(finish)
            span = max(span, at - current.opened_at)
            if simulated:
                clock.now = max(clock.now, at)
            uploaded, waited = await fleet.upload(i, clock.now)
            if simulated:
                clock.now += waited
            if uploaded is None:
                network_dropouts += 1
            else:
                cut += uploaded.status == "discarded"
                if uploaded.status == "uploaded":
                    counted.append(i)
                    examples += plan.train.work(registry.count(i))
        await server.wait_closed(job, current.number, current.deadline)
        totals = await fleet.totals()
        # Every round that closed meanwhile (late uploads can outlive several short rounds).
        status = await server.status(job)
        newest = (
            status.current_round.number - 1
            if status.current_round is not None
            else status.previous_round.number
            if status.previous_round is not None
            else current.number
        )
        for number in range(current.number, newest + 1):
            closed = await server.round(job, number)
            first = number == current.number
            # Uploads that found the round closed: cut by the quota (over-selection), or late.
            by_quota = closed.reason.startswith("quota")
            version = closed.model_version + (closed.status == "closed")
            if version not in evaluator.results:
                evaluator.start(version, await server.model(job, version, token))
            if simulated:
                elapsed = (closed.closed_at or clock.now) - closed.opened_at
                sim_total = closed.closed_at or clock.now
            else:  # a remote server keeps real time; report the devices' simulated time
                elapsed = min(span, closed.deadline - closed.opened_at) if first else 0.0
                sim_total += elapsed
            record = {
                "round": number,
                "round_id": closed.round_id,
                "status": closed.status,
                "model_version": version,
                "accuracy": None,  # filled in by report_evaluated
                "loss": None,
                "train_loss": closed.train_loss,
                "admitted": len(admitted) if first else closed.admitted,
                "updates": secured if plan.privacy.secagg and first else closed.updates,
                "participants": sorted(counted) if first else [],
                # Who could take part, who came, and who counted (the round's first).
                "participation": {
                    "available": available if first else 0,
                    "checked_in": checked_in if first else 0,
                    "admitted": len(admitted) if first else 0,
                    "trained": trained_in_time if first else 0,
                    "updates": len(counted) if first else 0,
                    # (with an availability model: admitted while the round was open)
                    **({"joined_late": joined_late if first else 0} if late_looks else {}),
                },
                "discarded": discarded + cut if first else 0,
                "dropouts": {
                    "deadline": discarded + (0 if by_quota else cut) if first else 0,
                    "over_selection": cut if first and by_quota else 0,
                    "unavailable": unavailable if first else 0,
                    "network": network_dropouts if first else 0,
                    "budget": refused if first else 0,
                },
                "retries": totals["retries"] - totals0["retries"] if first else 0,
                "wasted_bytes": totals["wasted_bytes"] - totals0["wasted_bytes"] if first else 0,
                "resumed_transfers": totals["resumed_transfers"] - totals0["resumed_transfers"]
                if first
                else 0,
                "bytes_up": totals["bytes_up"] - totals0["bytes_up"] if first else 0,
                "bytes_down": totals["bytes_down"] - totals0["bytes_down"] if first else 0,
                # Examples trained on (x epochs) in the updates that arrived this round.
                "examples": examples if first else 0,
                "round_seconds": round(elapsed, 3),
                "simulated_seconds": round(sim_total, 3),
                "wall_seconds": round(time.perf_counter() - wall_start, 3),
            }
            federated = None
            if plan.evaluate.every:
                # The devices' measure of the model this round started from, beside the
                # test set's measure of that same model (not of the round's new one).
                measured = closed.model_version
                if measured not in evaluator.results:
                    evaluator.start(measured, await server.model(job, measured, token))
                record["federated_model_version"] = measured
                record["federated_accuracy"] = rounded(closed.federated_accuracy)
                record["federated_loss"] = rounded(closed.federated_loss)
                record["evaluated"] = closed.evaluated
                record["federated_central_accuracy"] = None  # filled in by report_evaluated
                federated = evaluator.results[measured] if closed.evaluated else None
            unreported.append((record, evaluator.results[version], federated))
        await fleet.rest()
    await report_evaluated()
    return rounds


async def _start_work(
    fleet: Fleet,
    failure_draw: Callable[[int], float],
    devices: list[int],
    now: float,
    start: float,
    seen_at: float,
    opened: float | None,
    finish: list[tuple[float, int]],
) -> _Lost:
    """Admitted ``devices`` (online at ``seen_at``) download and train at ``now`` (the
    clock's time), their simulated work starting at ``start``; those that will be online
    to upload join the heap ``finish`` (upload time, device). ``opened``: a remote
    round's open, on the server's clock (None: the simulated clock is the server's)."""
    registry = fleet.registry
    unavailable = network = refused = discarded = 0
    working: list[int] = []
    for i in devices:
        if failure_draw(i) < registry.failure_rate(i):
            unavailable += 1  # went offline mid-round: it simply never reports
        else:
            working.append(i)
    for work in await fleet.work(working, now):
        trained = work.outcome
        if trained is None:
            network += 1
            continue
        if trained.status != "trained":  # left: out of time or out of privacy budget
            if trained.reason.startswith("budget"):
                refused += 1
            else:
                discarded += trained.status == "discarded"
            continue
        at = start + work.seconds + work.backoff
        ends = at if opened is None else seen_at + (at - opened)
        if registry.online_until(work.device, seen_at) < ends:
            unavailable += 1  # its session ended before its upload: it never reports
            continue
        heapq.heappush(finish, (at, work.device))
    return _Lost(unavailable, network, refused, int(discarded))


class _Told(NamedTuple):
    """What a batch of check-ins was told: who was admitted, who waits for the round's
    selection (device, seconds to come back), how many never heard back, whether the
    round said it is full, and a device token to read the models with."""

    admitted: list[int]
    pending: list[tuple[int, float]]
    network: int
    full: bool
    token: str


def _told(answers: list[Checkin], token: str) -> _Told:
    """Sort ``answers`` (in their order); ``token``: the one held so far, if any."""
    admitted: list[int] = []
    pending: list[tuple[int, float]] = []
    network, full = 0, False
    for i, outcome, device_token in answers:
        if outcome is None:
            network += 1
            continue
        if outcome.status == "admitted":
            admitted.append(i)
            token = token or device_token
        elif outcome.reason == SELECTION_PENDING:
            pending.append((i, outcome.retry_after or 1.0))
        full = full or is_round_full(outcome)
    return _Told(admitted, pending, network, full, token)


class _Lost(NamedTuple):
    """Admitted devices whose update will not come: offline, network, budget, too late."""

    unavailable: int
    network: int
    refused: int
    discarded: int


def _ray_fleet(
    config: SimulationConfig, plan: JobPlan, data: Dataset, service: FederationService | None
) -> contextlib.AbstractAsyncContextManager[Fleet]:
    """The fleet on Ray actors (``--engine ray``), if the ray extra is installed."""
    try:
        from fedclient.sim.engines.ray import ray_fleet
    except ImportError as exc:
        raise InvalidInput(
            f"--engine ray needs the ray extra: pip install 'fedclient[ray]' ({exc})"
        ) from None
    return ray_fleet(config, plan, data, service)
