"""The local engine: real `fedclient.Client`s against the real server, on a simulated clock.

Each round is a small discrete-event simulation. Devices check in (in an order
drawn from the seed), the admitted ones download and train for real, and each
finishes at a simulated time given by its `DeviceProfile`. Uploads then reach
the server in that order with the clock set to their arrival time, so the
server's quota and deadline logic decides which updates count — exactly as it
would in production, only without waiting. Nothing depends on wall time, so
the same seed gives the same report.
"""

from __future__ import annotations

import asyncio
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np
import sqlite_utils

from fedclient import (
    Client,
    DeviceState,
    FaultPlan,
    FaultyTransport,
    InvalidInput,
    RetryPolicy,
    ServerError,
    StepOutcome,
    TransferStats,
    TransportError,
    __version__,
)
from fedclient._client import raise_for_error
from fedclient.protocol import (
    JOB_STATUS,
    MODEL,
    ROUND_STATUS,
    JobPlan,
    JobStatus,
    RoundSummary,
    Weights,
    decode_tensors,
)
from fedclient.runtime import EvalResult, create_backend
from fedserver_ref import FederationService, ServerStore, create_app, plan_from_dict
from simulator.datasets import CsvColumns, Dataset, load_dataset, partition
from simulator.devices import DeviceProfile, draw_profiles

__all__ = ["SimClock", "SimulationConfig", "simulate"]

#: Model and training defaults per data set (the flags override them).
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {
        "model": {"kind": "mlp", "hidden": [64]},
        "train": {"epochs": 5, "batch_size": 8, "learning_rate": 0.1},
    },
    "mnist": {
        "model": {"kind": "softmax", "hidden": []},
        "train": {"epochs": 1, "batch_size": 10, "learning_rate": 0.1},
    },
    "femnist": {
        "model": {"kind": "mlp", "hidden": [200]},
        "train": {"epochs": 5, "batch_size": 10, "learning_rate": 0.05},
    },
    "text": {  # sms_spam and csv: hashed n-grams into softmax regression
        "model": {"kind": "softmax", "hidden": []},
        "train": {"epochs": 5, "batch_size": 8, "learning_rate": 4.0},  # rows are L2-normed
    },
    "arrays": {  # npz: an MLP over whatever features the arrays hold
        "model": {"kind": "mlp", "hidden": [64]},
        "train": {"epochs": 5, "batch_size": 8, "learning_rate": 0.1},
    },
}

DEVICES_PER_STATE_FILE = 1024


@dataclass
class SimulationConfig:
    """Everything a run depends on; it is embedded in the report."""

    dataset: str = "digits"
    data_dir: str | None = None
    devices: int = 100
    devices_per_round: int = 20
    rounds: int = 40
    partition: str = "iid"
    seed: int = 0
    fleet: str = "phones"
    epochs: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    min_devices: int | None = None
    over_selection: float = 1.0
    deadline_seconds: float = 600.0
    server: str | None = None
    job: str | None = None
    state_dir: str | None = None
    faults: str | None = None
    model: str | None = None  # softmax | mlp | cnn; default: the data set's
    compress: str = ""  # update compression the job asks of devices (fedclient.compression)
    text_column: str = "text"  # --dataset csv:PATH: which columns hold what
    label_column: str = "label"
    user_column: str | None = None
    no_header: bool = False
    strategy: str = "fedavg"  # the server's aggregation (fedserver_ref.strategies)
    server_learning_rate: float | None = None  # None: the strategy's default
    proximal_mu: float = 0.0  # FedProx
    runtime: str = "numpy"  # every device's training backend (fedclient.runtime.RUNTIMES)

    def _model(self, default: dict[str, Any]) -> dict[str, Any]:
        if self.model is None or self.model == default["kind"]:
            return default
        hidden = {"softmax": [], "mlp": [64], "cnn": [8, 16]}.get(self.model)
        if hidden is None:
            raise InvalidInput(f"unknown model {self.model!r}; use softmax, mlp or cnn")
        return {"kind": self.model, "hidden": hidden}

    def plan(self, data: Dataset) -> JobPlan:
        """The job plan this configuration describes."""
        family = (
            "text"
            if data.texts is not None
            else "arrays"
            if data.name.startswith("npz:")
            else data.name
        )
        defaults = DATASET_DEFAULTS[family]
        train = dict(defaults["train"])
        for key in ("epochs", "batch_size", "learning_rate"):
            if getattr(self, key) is not None:
                train[key] = getattr(self, key)
        return plan_from_dict(
            {
                "job": {
                    "name": self.job or _job_name(data.name),
                    "rounds": self.rounds,
                    "devices_per_round": self.devices_per_round,
                    "min_devices": self.min_devices or max(1, self.devices_per_round // 2),
                    "over_selection": self.over_selection,
                    "deadline_seconds": self.deadline_seconds,
                    "compression": self.compress,
                    "seed": self.seed,
                },
                "model": {
                    **self._model(defaults["model"]),
                    "inputs": data.inputs,
                    "classes": data.classes,
                },
                "train": {**train, "proximal_mu": self.proximal_mu},
                "strategy": {
                    "name": self.strategy,
                    "server_learning_rate": self.server_learning_rate,
                },
            }
        )


class SimClock:
    """Simulated seconds; the server and every device read time from it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass(slots=True)
class _Device:
    """A virtual device. Idle devices hold only this; a `Client` exists while one works."""

    index: int
    profile: DeviceProfile
    examples: np.ndarray  # indices of its training examples
    stats: TransferStats = field(default_factory=TransferStats)
    backoff: float = 0.0  # simulated seconds spent waiting to retry this round
    client: Client | None = None

    async def step(self) -> StepOutcome | None:
        """One step; None when the network beat the retry policy (a network dropout)."""
        assert self.client is not None
        try:
            return await self.client.astep()
        except (TransportError, ServerError):
            return None


class _Fleet:
    """Every virtual device, and the few that are working this round."""

    def __init__(
        self,
        config: SimulationConfig,
        plan: JobPlan,
        data: Dataset,
        server: _Server,
        state_dir: Path,
    ) -> None:
        rng = np.random.default_rng(config.seed)
        parts = partition(data.y_train, config.devices, config.partition, rng, data.users)
        profiles = draw_profiles(len(parts), rng, config.fleet)  # natural: one per user
        self.devices = [_Device(i, profiles[i], part) for i, part in enumerate(parts)]
        self.config, self.plan, self.data, self.server = config, plan, data, server
        self.faults = FaultPlan.parse(config.faults) if config.faults else None
        self.state_dir = state_dir
        self.shards: dict[int, sqlite_utils.Database] = {}
        self.active: list[_Device] = []
        # One model object serves every simulated device: a device's training step sets
        # its weights, trains and reads them back with no await in between.
        self.backend = create_backend(plan.model, config.runtime)

    def activate(self, i: int, round_number: int) -> _Device:
        """Device ``i`` wakes up: a real `Client` over its own SQLite state."""
        d = self.devices[i]
        if d.client is not None:
            return d
        shard = i // DEVICES_PER_STATE_FILE
        if shard not in self.shards:
            db = sqlite_utils.Database(self.state_dir / f"devices-{shard:04d}.sqlite")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=OFF")
            self.shards[shard] = db
        seed = self.config.seed * 100_003 + i
        transport = self.server.transport
        if self.faults is not None and transport is not None:
            transport = FaultyTransport(transport, self.faults, seed=seed * 1009 + round_number)

        async def wait(seconds: float) -> None:  # retries wait on the simulated clock
            d.backoff += seconds

        d.backoff = 0.0
        d.client = Client(
            self.server.base_url,
            self.plan.job.name,
            self.data.device_data(d.examples),
            state=DeviceState(self.shards[shard], key=f"device-{i}"),
            transport=transport,
            seed=seed,
            label=f"fedsim-{i}",
            clock=self.server.clock,
            retry=RetryPolicy(seed=seed * 1009 + round_number),
            asleep=wait,
            runtime=self.config.runtime,
            model=self.backend,
            # The device's own estimate of its training time, from its profile.
            estimate_seconds=d.profile.training_seconds,
            stats=d.stats,
        )
        self.active.append(d)
        return d

    async def rest(self) -> None:
        """The round is over: working devices go idle again (their state stays in SQLite)."""
        for d in self.active:
            if d.client is not None:
                await d.client.aclose()
                d.client = None
        self.active.clear()

    def total(self, name: str) -> int:
        """A transfer statistic summed over the fleet."""
        return sum(getattr(d.stats, name) for d in self.devices)

    def close(self) -> None:
        for db in self.shards.values():
            db.close()


@dataclass
class _Server:
    """The server the fleet talks to, over HTTP: in-process (ASGI) or remote."""

    base_url: str
    transport: httpx.AsyncBaseTransport | None
    clock: Callable[[], float] = time.time
    tick: Callable[[], None] | None = None  # the in-process server's deadline timer

    async def _get(self, path: str, token: str = "") -> bytes:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with httpx.AsyncClient(transport=self.transport, timeout=30) as http:
            response = await http.get(self.base_url + path, headers=headers)
        raise_for_error(response)
        return response.content

    async def status(self, job: str) -> JobStatus:
        return msgspec.json.decode(await self._get(JOB_STATUS.url(job=job)), type=JobStatus)

    async def round(self, job: str, number: int) -> RoundSummary:
        body = await self._get(ROUND_STATUS.url(job=job, number=number))
        return msgspec.json.decode(body, type=RoundSummary)

    async def model(self, job: str, version: int, token: str) -> Weights:
        return decode_tensors(await self._get(MODEL.url(job=job, version=version), token))[0]

    async def wait_closed(self, job: str, number: int, deadline: float) -> None:
        """Return once round ``number`` closed: at once if it did, else at its deadline
        (instantly on the simulated clock; for real against a remote server)."""
        while (await self.round(job, number)).status == "open":
            if isinstance(self.clock, SimClock) and self.tick is not None:
                self.clock.now = max(self.clock.now, deadline)
                self.tick()
            else:
                await asyncio.sleep(min(1.0, max(0.05, deadline - time.time())))


async def simulate(
    config: SimulationConfig, on_round: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Run the federation ``config`` describes; return the report (see `simulator.report`)."""
    wall_start = time.perf_counter()
    columns = CsvColumns(
        config.text_column, config.label_column, config.user_column, header=not config.no_header
    )
    data = load_dataset(config.dataset, config.data_dir, seed=config.seed, columns=columns)
    plan = config.plan(data)
    clock = SimClock()
    if config.server is None:
        service = FederationService(ServerStore(), clock=clock)
        service.add_job(plan)
        server = _Server(
            "http://fedserver.local",
            httpx.ASGITransport(app=create_app(service)),
            clock,
            service.tick,
        )
    else:
        server = _Server(config.server.rstrip("/"), None)
        plan = (await server.status(plan.job.name)).plan  # the server's plan rules

    if config.faults and config.server is not None:
        raise InvalidInput("--faults needs the in-process server (drop --server)")
    with tempfile.TemporaryDirectory(prefix="fedsim-") as scratch:
        state_dir = Path(config.state_dir or scratch)
        state_dir.mkdir(parents=True, exist_ok=True)
        fleet = _Fleet(config, plan, data, server, state_dir)
        devices = len(fleet.devices)
        try:
            rounds = await _run_rounds(
                config, plan, data, server, clock, fleet, on_round, wall_start
            )
        finally:
            await fleet.rest()
            fleet.close()
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
        "discarded": sum(r["discarded"] for r in rounds),
        "dropouts": {
            cause: sum(r["dropouts"][cause] for r in rounds)
            for cause in ("deadline", "unavailable", "network")
        },
        "devices": devices,
        "simulated_seconds": last.get("simulated_seconds", 0.0),
        "wall_seconds": round(time.perf_counter() - wall_start, 3),
    }
    return {
        "fedsim_version": __version__,
        "versions": {
            "fedclient": __version__,
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
        "config": asdict(config),
        "plan": msgspec.to_builtins(plan),
        "rounds": rounds,
        "final": final,
    }


async def _run_rounds(
    config: SimulationConfig,
    plan: JobPlan,
    data: Dataset,
    server: _Server,
    clock: SimClock,
    fleet: _Fleet,
    on_round: Callable[[dict[str, Any]], None] | None,
    wall_start: float,
) -> list[dict[str, Any]]:
    job = plan.job.name
    evaluator = fleet.backend
    simulated = isinstance(server.clock, SimClock)
    rounds: list[dict[str, Any]] = []
    evaluated: dict[int, EvalResult] = {}
    sim_total = 0.0
    token = ""
    while True:
        status = await server.status(job)
        current = status.current_round
        if status.status == "finished" or current is None:
            break
        totals0 = {k: fleet.total(k) for k in ("bytes_up", "bytes_down", "retries", "wasted_bytes")}
        # Check-in: devices arrive in an order drawn from the seed; the server fills the round.
        order = np.random.default_rng([config.seed, current.number]).permutation(len(fleet.devices))
        admitted: list[_Device] = []
        network_dropouts = 0
        failures = np.random.default_rng([config.seed, current.number, 1]).random(len(order))
        unavailable = 0
        for i in order:
            if not fleet.devices[i].profile.online(clock.now):
                continue  # asleep, off Wi-Fi or unplugged: it does not check in
            d = fleet.activate(int(i), current.number)
            outcome = await d.step()
            if outcome is None:
                network_dropouts += 1
                continue
            if outcome.status == "admitted":
                admitted.append(d)
                token = token or _token(d)
            if (outcome.status == "waiting" and outcome.reason == "the round is full") or len(
                admitted
            ) >= plan.admit_per_round:
                break
        # Download and train for real; each device finishes at its simulated time.
        finish: list[tuple[float, int, _Device]] = []
        discarded = 0
        for d in admitted:
            if failures[d.index] < d.profile.failure_rate:
                unavailable += 1  # went offline mid-round: it simply never reports
                continue
            down = d.stats.bytes_down
            downloaded = await d.step()
            trained = await d.step() if downloaded is not None else None
            if trained is None:
                network_dropouts += 1
                continue
            if trained.status != "trained":  # left: it could not finish by the deadline
                discarded += trained.status == "discarded"
                continue
            assert d.client is not None
            update = d.client.device_state.progress(job).update or b""
            seconds = d.profile.round_seconds(
                len(d.examples), plan.train.epochs, d.stats.bytes_down - down, len(update)
            )
            finish.append((current.opened_at + seconds + d.backoff, d.index, d))
        # Uploads arrive in simulated-time order; the server's quota and deadline decide.
        # A device retrying an upload holds the clock for its backoff.
        for at, _, d in sorted(finish, key=lambda f: (f[0], f[1])):
            if simulated:
                clock.now = max(clock.now, at)
            before = d.backoff
            uploaded = await d.step()
            if simulated:
                clock.now += d.backoff - before
            if uploaded is None:
                network_dropouts += 1
            else:
                discarded += uploaded.status == "discarded"
        await server.wait_closed(job, current.number, current.deadline)
        # Every round that closed meanwhile (late uploads can outlive several short rounds).
        status = await server.status(job)
        newest = (
            status.current_round.number - 1
            if status.current_round is not None
            else status.previous_round.number
            if status.previous_round is not None
            else current.number
        )
        span = max((at - current.opened_at for at, _, _ in finish), default=0.0)
        for number in range(current.number, newest + 1):
            closed = await server.round(job, number)
            first = number == current.number
            version = closed.model_version + (closed.status == "closed")
            if version not in evaluated:
                evaluator.set_weights(await server.model(job, version, token))
                evaluated[version] = evaluator.evaluate(data.x_test, data.y_test)
            result = evaluated[version]
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
                "accuracy": round(result.accuracy, 6),
                "loss": round(result.loss, 6),
                "train_loss": closed.train_loss,
                "admitted": len(admitted) if first else closed.admitted,
                "updates": closed.updates,
                "discarded": discarded if first else 0,
                "dropouts": {
                    "deadline": discarded if first else 0,
                    "unavailable": unavailable if first else 0,
                    "network": network_dropouts if first else 0,
                },
                "retries": fleet.total("retries") - totals0["retries"] if first else 0,
                "wasted_bytes": fleet.total("wasted_bytes") - totals0["wasted_bytes"]
                if first
                else 0,
                "bytes_up": fleet.total("bytes_up") - totals0["bytes_up"] if first else 0,
                "bytes_down": fleet.total("bytes_down") - totals0["bytes_down"] if first else 0,
                "round_seconds": round(elapsed, 3),
                "simulated_seconds": round(sim_total, 3),
                "wall_seconds": round(time.perf_counter() - wall_start, 3),
            }
            rounds.append(record)
            if on_round is not None:
                on_round(record)
        await fleet.rest()
    return rounds


def _job_name(dataset: str) -> str:
    """A valid job name for a data set (``csv:my data.csv`` -> ``csv-my-data``)."""
    stem = dataset.split(":")[-1].rsplit(".", 1)[0] if ":" in dataset else dataset
    name = "".join(c if c.isalnum() or c in "_.-" else "-" for c in stem).strip("-.")
    return (name or "job")[:64]


def _token(device: _Device) -> str:
    assert device.client is not None
    identity = device.client.device_state.identity(device.client.server)
    return identity.token if identity else ""
