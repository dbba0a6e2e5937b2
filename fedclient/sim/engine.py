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
import contextlib
import hashlib
import itertools
import operator
import platform
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

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
    Personalization,
    Phase,
    PrivacyBudgetExceeded,
    RetryPolicy,
    ServerError,
    StepOutcome,
    TransferStats,
    TransportError,
    __version__,
)
from fedclient.identity import IdentityAuthority
from fedclient.privacy.dp import GaussianMechanism, PrivacyLedger
from fedclient.privacy.noise import SeededNoiseWarning
from fedclient.privacy.policy import PrivacyPolicy
from fedclient.protocol import (
    ENROL,
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
from fedclient.server import FederationService, ServerStore, create_app, load_plan, plan_from_dict
from fedclient.server.database import Database
from fedclient.sim.buffered import run_buffered
from fedclient.sim.datasets import CsvColumns, Dataset, load_dataset, partition
from fedclient.sim.devices import DeviceProfile, draw_profiles
from fedclient.sim.trainpool import TrainPool, resolve_workers
from fedclient.transport import raise_for_error

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
    holdout: int = 0  # training examples (drawn with the seed) the devices never get
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
    inline_model_max: int = 1024 * 1024  # a model up to this size comes with the admission
    personalize: int = 0  # epochs of local fine-tuning whose accuracy the report measures
    text_column: str = "text"  # --dataset csv:PATH: which columns hold what
    label_column: str = "label"
    user_column: str | None = None
    no_header: bool = False
    plan_file: str | None = None  # a TOML plan (fedserver's): it sets the job, not the flags
    enrolment_credential: str | None = None  # for a remote server whose enrolment is closed
    dp: str = ""  # local DP: "epsilon=8,delta=1e-5,clip=1.0[,budget=E]"
    secagg: str = ""  # "", "secagg" or "secagg+": the server learns only each round's sum
    distributed_dp: bool = False  # with dp and secagg: the noise is shared, the sum is private
    mode: str = "sync"  # sync rounds, or async (FedBuff) buffers
    max_staleness: int = 10
    strategy: str = "fedavg"  # the server's aggregation (fedclient.server.strategies)
    server_learning_rate: float | None = None  # None: the strategy's default
    proximal_mu: float = 0.0  # FedProx
    runtime: str = "numpy"  # every device's training backend (fedclient.runtime.RUNTIMES)
    engine: str = "local"  # local | ray (fedclient.sim.engines.ray)
    workers: int = 1  # local engine: processes that train (1: in the loop; 0: one per CPU)
    ray_address: str | None = None  # None: a new local Ray instance; auto | ray://HOST:PORT
    ray_actors: int | None = None  # None: one per CPU of the Ray cluster
    ray_host_ip: str | None = None  # where the actors reach the server; None: detected

    def _model(self, default: dict[str, Any]) -> dict[str, Any]:
        if self.model is None or self.model == default["kind"]:
            return default
        hidden = {"softmax": [], "mlp": [64], "cnn": [8, 16]}.get(self.model)
        if hidden is None:
            raise InvalidInput(f"unknown model {self.model!r}; use softmax, mlp or cnn")
        return {"kind": self.model, "hidden": hidden}

    def plan(self, data: Dataset) -> JobPlan:
        """The job plan this configuration describes: ``plan_file``'s, checked against the
        data, or one built from the flags."""
        if self.plan_file is not None:
            plan = load_plan(self.plan_file)
            if (plan.model.inputs, plan.model.classes) != (data.inputs, data.classes):
                raise InvalidInput(
                    f"the plan's model takes {plan.model.inputs} inputs and {plan.model.classes}"
                    f" classes; {data.name} has {data.inputs} and {data.classes}"
                )
            return plan
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
                    "mode": self.mode,
                    "max_staleness": self.max_staleness,
                    "seed": self.seed,
                },
                "model": {
                    **self._model(defaults["model"]),
                    "inputs": data.inputs,
                    "classes": data.classes,
                },
                "train": {**train, "proximal_mu": self.proximal_mu},
                "privacy": {
                    **_privacy(self.dp),
                    **({"secagg": self.secagg} if self.secagg else {}),
                    **({"distributed_dp": True} if self.distributed_dp else {}),
                },
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
    received: int = 0  # bytes down when it last checked in
    round_trips: int = 3  # of its last round's work: check-in, download (unless inline), upload
    certified: bool = False  # holds the simulation authority's certificate of its identity
    held_out: np.ndarray | None = None  # its share of the test set, for federated evaluation
    own_held_out: np.ndarray | None = None  # its own examples kept from training (personalize)

    async def step(self) -> StepOutcome | None:
        """One step; None when the network beat the retry policy (a network dropout)."""
        assert self.client is not None
        try:
            return await self.client.astep()
        except (TransportError, ServerError):
            return None
        except PrivacyBudgetExceeded as exc:
            return StepOutcome("discarded", reason=f"budget: {exc}")

    async def checkin(self) -> StepOutcome | None:
        """Check in (the bytes it receives from here on are its round's download)."""
        self.received = self.stats.bytes_down
        return await self.step()

    async def download_and_train(self) -> StepOutcome | None:
        """After its admission: download the model, unless it came along, and train."""
        assert self.client is not None
        inline = self.client.device_state.phase(self.client.job) is Phase.DOWNLOADED
        self.round_trips = 2 if inline else 3
        if not inline and await self.step() is None:
            return None
        return await self.step()

    def round_seconds(self, epochs: int, update_bytes: int) -> float:
        """Simulated seconds from its check-in to the end of its upload."""
        return self.profile.round_seconds(
            len(self.examples),
            epochs,
            self.stats.bytes_down - self.received,
            update_bytes,
            round_trips=self.round_trips,
        )


#: The transfer statistics a round reports, summed over the fleet.
TOTALS = ("bytes_up", "bytes_down", "retries", "wasted_bytes", "resumed_transfers")


class _Checkin(NamedTuple):
    """A device's check-in: its outcome (None: a network dropout) and, once admitted,
    its bearer token (the driver fetches the models it evaluates with one)."""

    device: int
    outcome: StepOutcome | None
    token: str = ""


class _Work(NamedTuple):
    """A device's download and training: the outcome (None: a network dropout), the
    simulated seconds from its check-in to the end of its upload, and the seconds it
    waited to retry."""

    device: int
    outcome: StepOutcome | None
    seconds: float
    backoff: float


class _Fleet:
    """Every virtual device, and the few that are working this round."""

    def __init__(
        self,
        config: SimulationConfig,
        plan: JobPlan,
        data: Dataset,
        server: _Server,
        state_dir: Path | None,
        devices: list[_Device] | None = None,
    ) -> None:
        if devices is None:  # else a copy of the driver's (on a Ray actor)
            rng = np.random.default_rng(config.seed)
            parts = partition(data.y_train, config.devices, config.partition, rng, data.users)
            profiles = draw_profiles(len(parts), rng, config.fleet)  # natural: one per user
            devices = [_Device(i, profiles[i], part) for i, part in enumerate(parts)]
            if config.personalize:
                # Personalisation is measured on each device's own held-out examples (a
                # fifth of them; devices with fewer than 5 keep all for training).
                for device in devices:
                    mine = np.random.default_rng([config.seed, 4, device.index]).permutation(
                        device.examples
                    )
                    if len(mine) >= 5:
                        cut = len(mine) - len(mine) // 5
                        device.examples, device.own_held_out = mine[:cut], mine[cut:]
            if plan.evaluate.every:
                # Federated evaluation: each device holds a share of the test set as its
                # held-out data, split like the training set (natural splits: at random).
                scheme = "iid" if config.partition == "natural" else config.partition
                shares = partition(
                    data.y_test, len(devices), scheme, np.random.default_rng([config.seed, 3])
                )
                for device, share in zip(devices, shares, strict=True):
                    device.held_out = share
        self.devices = devices
        self.config, self.plan, self.data, self.server = config, plan, data, server
        self.faults = FaultPlan.parse(config.faults) if config.faults else None
        self.state_dir = state_dir
        self.shards: dict[int, sqlite_utils.Database] = {}
        self.active: list[_Device] = []
        # One model object serves every simulated device: a device's training step sets
        # its weights, trains and reads them back with no await in between.
        self.backend = create_backend(plan.model, config.runtime)
        self.pool: TrainPool | None = None  # or the devices train on worker processes
        # Secure aggregation: the run's identity authority certifies every device's
        # identity key, and every device pins it (see `simulation_authority`).
        self.authority = simulation_authority(config) if plan.privacy.secagg else None
        # The researcher owns the simulated devices: they accept the plan's privacy.
        self.policy = PrivacyPolicy.accepting(
            plan.privacy, (self.authority.public,) if self.authority else ()
        )

    def train_on(self, pool: TrainPool) -> None:
        """Train on ``pool``'s workers; the download and training of several devices
        then overlap (their protocol steps still run on the loop, one at a time)."""
        self.pool = pool

    def activate(self, i: int, round_number: int) -> _Device:
        """Device ``i`` wakes up: a real `Client` over its own SQLite state."""
        d = self.devices[i]
        if d.client is not None:
            return d
        shard = i // DEVICES_PER_STATE_FILE
        if shard not in self.shards:
            if self.state_dir is None:
                db = sqlite_utils.Database(memory=True, execute_plugins=False)
            else:
                db = sqlite_utils.Database(
                    self.state_dir / f"devices-{shard:04d}.sqlite", execute_plugins=False
                )
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=OFF")
            _without_secure_delete(db)
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
            inline_model_max=self.config.inline_model_max,
            stats=d.stats,
            atrain=self.pool,
            enrolment_credential=self.config.enrolment_credential,
            eval_data=(
                None
                if d.held_out is None
                else (self.data.x_test[d.held_out], self.data.y_test[d.held_out])
            ),
            # Reproducible reports: the privacy noise is drawn from the seed too. Not
            # private, and said so: `simulate` and the report both note it.
            simulation_seeded_noise=True,
            policy=self.policy,
        )
        if self.authority is not None and not d.certified:
            state = d.client.device_state
            if state.identity_certificate() is None:  # a new device, or one from --state-dir
                state.set_identity_certificate(self.authority.certify(d.client.identity_key))
            d.certified = True
        self.active.append(d)
        return d

    # -- what the rounds ask of the devices, a batch at a time (see fedclient.sim.engines.ray)
    def _at(self, now: float) -> None:
        """Set the devices' simulated clock (the server's own, or a Ray actor's copy)."""
        if isinstance(self.server.clock, SimClock):
            self.server.clock.now = now

    async def checkin(
        self, indices: Sequence[int], round_number: int, now: float
    ) -> list[_Checkin]:
        """Devices ``indices`` wake up and check in, in that order, until the round is full."""
        self._at(now)
        answers: list[_Checkin] = []
        for i in indices:
            d = self.activate(i, round_number)
            outcome = await d.checkin()
            admitted = outcome is not None and outcome.status == "admitted"
            answers.append(_Checkin(i, outcome, _token(d) if admitted else ""))
            if outcome is not None and _round_full(outcome):
                break
        return answers

    async def work(self, indices: Sequence[int], now: float) -> list[_Work]:
        """Admitted devices ``indices`` download the model and train: one after another,
        or, training on a pool, a few at a time (each device's outcome is the same)."""
        self._at(now)

        async def one(i: int) -> _Work:
            d = self.devices[i]
            trained = await d.download_and_train()
            seconds = 0.0
            if trained is not None and trained.status == "trained":
                assert d.client is not None
                size = d.client.device_state.update_size(self.plan.job.name)
                seconds = d.round_seconds(self.plan.train.epochs, size)
            return _Work(i, trained, seconds, d.backoff)

        if self.pool is None:
            return [await one(i) for i in indices]
        # Enough devices in flight to keep every worker busy while the loop downloads.
        slots = asyncio.Semaphore(2 * self.pool.workers + 2)

        async def in_slot(i: int) -> _Work:
            async with slots:
                return await one(i)

        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(in_slot(i)) for i in indices]
        return [t.result() for t in tasks]

    async def upload(self, index: int, now: float) -> tuple[StepOutcome | None, float]:
        """Device ``index`` uploads its update: the outcome, and the seconds spent retrying."""
        self._at(now)
        d = self.devices[index]
        before = d.backoff
        uploaded = await d.step()
        return uploaded, d.backoff - before

    async def totals(self) -> dict[str, int]:
        """The transfer statistics (`TOTALS`) summed over the fleet."""
        read = operator.attrgetter(*TOTALS)  # one call per device, not one per figure
        rows = [read(d.stats) for d in self.devices] or [(0,) * len(TOTALS)]
        columns = zip(*rows, strict=True)
        return {name: sum(column) for name, column in zip(TOTALS, columns, strict=True)}

    async def rest(self) -> None:
        """The round is over: working devices go idle again (their state stays in SQLite)."""
        for d in self.active:
            if d.client is not None:
                await d.client.aclose()
                d.client = None
        self.active.clear()

    def epsilon_spent(self, job: str, delta: float) -> list[float]:
        """Each device's privacy spend on ``job``, from its own ledger (0: never released)."""
        spent = []
        for d in self.devices:
            db = self.shards.get(d.index // DEVICES_PER_STATE_FILE)
            ledger = PrivacyLedger(db, f"device-{d.index}") if db is not None else None
            released = ledger is not None and ledger.releases(job) > 0
            spent.append(round(ledger.spent(job, delta), 4) if released and ledger else 0.0)
        return spent

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

    http: httpx.AsyncClient | None = None  # the driver's own connection, once it asked
    credential: str | None = None  # what a remote server's enrolment policy asks for
    observer: str = ""  # the driver's own device token, if a remote server wanted one

    async def _get(self, path: str, token: str = "") -> bytes:
        if self.http is None:
            self.http = httpx.AsyncClient(transport=self.transport, timeout=30)
        token = token or self.observer
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = await self.http.get(self.base_url + path, headers=headers)
        if response.status_code == 401 and not token:
            # A server whose status is not public: the driver reads it as a device would.
            enrolled = await self.http.post(
                self.base_url + ENROL.url(),
                json={"label": "fedsim-observer", "credential": self.credential},
            )
            raise_for_error(enrolled)
            self.observer = str(enrolled.json()["token"])
            return await self._get(path)
        raise_for_error(response)
        return response.content

    async def aclose(self) -> None:
        if self.http is not None:
            await self.http.aclose()
            self.http = None

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
    """Run the federation ``config`` describes; return the report (see `fedclient.sim.report`)."""
    wall_start = time.perf_counter()
    columns = CsvColumns(
        config.text_column, config.label_column, config.user_column, header=not config.no_header
    )
    data = load_dataset(config.dataset, config.data_dir, seed=config.seed, columns=columns)
    if config.holdout:  # the server's own data (e.g. public data it pre-trained on)
        data = data.without(data.holdout(config.holdout, config.seed))
    plan = config.plan(data)
    if config.engine not in ("local", "ray"):
        raise InvalidInput(f"unknown engine {config.engine!r}; use local or ray")
    if config.engine != "ray" and (config.ray_address or config.ray_actors or config.ray_host_ip):
        raise InvalidInput("--ray-address, --ray-actors and --ray-host-ip need --engine ray")
    if config.engine == "ray" and config.workers != 1:
        raise InvalidInput("--workers is for the local engine (Ray runs --ray-actors)")
    if config.inline_model_max < 0:
        raise InvalidInput(f"--inline-model-max must be 0 or more, got {config.inline_model_max}")
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
        _without_secure_delete(service.store.db)
        service.add_job(plan)
        server = _Server(
            "http://fedserver.local",
            httpx.ASGITransport(app=create_app(service, metrics=False, body_idle_seconds=None)),
            clock,
            service.tick,
        )
    else:
        if config.faults:
            raise InvalidInput("--faults needs the in-process server (drop --server)")
        server = _Server(config.server.rstrip("/"), None, credential=config.enrolment_credential)
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
            # The devices' SQLite state: in memory (shards of DEVICES_PER_STATE_FILE
            # devices each), or in files kept under --state-dir.
            state_dir = Path(config.state_dir) if config.state_dir else None
            if state_dir is not None:
                state_dir.mkdir(parents=True, exist_ok=True)
            fleet = _Fleet(config, plan, data, server, state_dir)
            stack.callback(fleet.close)
            stack.push_async_callback(fleet.rest)
            workers = resolve_workers(config.workers)
            if workers > 1:
                pool = TrainPool(workers, plan.model, config.runtime)
                stack.callback(pool.close)
                fleet.train_on(pool)
        devices = len(fleet.devices)
        evaluator = _Evaluator(plan, config.runtime, data)
        stack.callback(evaluator.close)
        if plan.job.mode == "async":
            if config.engine != "local" or config.server is not None:
                raise InvalidInput("--mode async runs on the local engine, in-process")
            rounds = await run_buffered(
                config, plan, data, server, clock, fleet, evaluator.backend, on_round, wall_start
            )
        else:
            rounds = await _run_rounds(
                config, plan, data, server, clock, fleet, evaluator, on_round, wall_start
            )
        privacy = _privacy_report(plan, fleet)
        personal = _personalization_report(config, plan, data, fleet, evaluator)
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
            for cause in ("deadline", "unavailable", "network", "budget")
        },
        "devices": devices,
        **({"privacy": privacy} if privacy else {}),
        **_federated_final(rounds),
        **personal,
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


def simulation_authority(config: SimulationConfig) -> IdentityAuthority:
    """The run's identity authority: in a deployment the operator's, kept away from the
    server; here drawn from the seed, so every Ray actor and the in-process server hold
    the same one (a simulation plays every party)."""
    seed = hashlib.sha256(f"fedsim/identity-authority/{config.seed}".encode()).digest()
    return IdentityAuthority(seed)


def _personalization_report(
    config: SimulationConfig, plan: JobPlan, data: Dataset, fleet: _Fleet, evaluator: _Evaluator
) -> dict[str, Any]:
    """With --personalize: the final global model's accuracy on each device's own held-out
    examples, and that of the model each device fine-tunes from it on its training ones
    (`fedclient.Personalization`), over every device's held-out examples together."""
    if not config.personalize or evaluator.latest is None:
        return {}
    version, weights = evaluator.latest
    tuning = Personalization(
        epochs=config.personalize,
        learning_rate=plan.train.learning_rate,
        batch_size=plan.train.batch_size,
    )
    backend = create_backend(plan.model, config.runtime)
    correct_global = correct_personal = examples = 0
    for device in fleet.devices:
        if device.own_held_out is None:
            continue
        x_held, y_held = data.device_data(device.own_held_out)
        backend.set_weights(weights)
        correct_global += round(backend.evaluate(x_held, y_held).accuracy * len(y_held))
        x, y = data.device_data(device.examples)
        tuning.apply(backend, weights, x, y, seed=config.seed * 100_003 + device.index)
        correct_personal += round(backend.evaluate(x_held, y_held).accuracy * len(y_held))
        examples += len(y_held)
    if not examples:
        return {}
    return {
        "personalized_accuracy": round(correct_personal / examples, 6),
        "global_accuracy_on_devices": round(correct_global / examples, 6),
        "personalization": {"epochs": config.personalize, "model_version": version},
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _federated_final(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The last federated evaluation, and the model version it measured."""
    measured = [r for r in rounds if r.get("federated_accuracy") is not None]
    if not measured:
        return {}
    last = measured[-1]
    return {
        "federated_accuracy": last["federated_accuracy"],
        "federated_loss": last["federated_loss"],
        "federated_model_version": last["model_version"] - (last["status"] == "closed"),
    }


def _without_secure_delete(db: sqlite_utils.Database | Database) -> None:
    """No zeroing of freed pages in a simulation's databases.

    Builds of SQLite that default to ``secure_delete`` (Debian's among them) overwrite
    every page a deleted row frees: each replaced model and each dropped update is
    eight 4 KiB pages zeroed, a seventh of a W2 run's instructions (callgrind). That
    protects data at rest on a device; a simulation's throwaway databases hold
    nothing to protect. (`fedclient.DeviceState` keeps the platform's setting.)"""
    db.execute("PRAGMA secure_delete=OFF")


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
    server: _Server,
    clock: SimClock,
    fleet: _Fleet,
    evaluator: _Evaluator,
    on_round: Callable[[dict[str, Any]], None] | None,
    wall_start: float,
) -> list[dict[str, Any]]:
    job = plan.job.name
    simulated = isinstance(server.clock, SimClock)
    rounds: list[dict[str, Any]] = []
    # Rounds whose model is still being evaluated: reported, in order, once it is.
    unreported: list[tuple[dict[str, Any], asyncio.Future[EvalResult]]] = []

    async def report_evaluated() -> None:
        for record, evaluated in unreported:
            result = await evaluated
            record["accuracy"], record["loss"] = round(result.accuracy, 6), round(result.loss, 6)
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
        order = np.random.default_rng([config.seed, current.number]).permutation(len(fleet.devices))
        failures = np.random.default_rng([config.seed, current.number, 1]).random(len(order))
        # Asleep, off Wi-Fi or unplugged: a device offline does not check in.
        online = (int(i) for i in order if fleet.devices[i].profile.online(clock.now))
        admitted: list[int] = []
        network_dropouts = unavailable = 0
        full = False
        # In waves of as many devices as there are places left: a fleet spread over
        # workers checks a wave in at once, and admits the same devices as one by one.
        while not full and len(admitted) < plan.admit_per_round:
            wave = list(itertools.islice(online, plan.admit_per_round - len(admitted)))
            if not wave:
                break
            for i, outcome, device_token in await fleet.checkin(wave, current.number, clock.now):
                if outcome is None:
                    network_dropouts += 1
                    continue
                if outcome.status == "admitted":
                    admitted.append(i)
                    token = token or device_token
                full = full or _round_full(outcome)
        await report_evaluated()  # the last round's evaluation ran alongside these check-ins
        # Download and train for real; each device finishes at its simulated time.
        working: list[int] = []
        for i in admitted:
            if failures[i] < fleet.devices[i].profile.failure_rate:
                unavailable += 1  # went offline mid-round: it simply never reports
            else:
                working.append(i)
        finish: list[tuple[float, int]] = []
        discarded = refused = 0
        for work in await fleet.work(working, clock.now):
            trained = work.outcome
            if trained is None:
                network_dropouts += 1
                continue
            if trained.status != "trained":  # left: out of time or out of privacy budget
                if trained.reason.startswith("budget"):
                    refused += 1
                else:
                    discarded += trained.status == "discarded"
                continue
            finish.append((current.opened_at + work.seconds + work.backoff, work.device))
        secured = 0  # devices whose masked input went into a secure sum
        if plan.privacy.secagg:
            # Secure aggregation: the stages advance together once the slowest device
            # finished training; each pass moves every device one stage on.
            if simulated and finish:
                clock.now = max(clock.now, max(at for at, _ in finish))
            pending = [i for _, i in sorted(finish)]
            for _ in range(8):
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
                pending = waiting
                if not pending:
                    break
            finish = []
        # Uploads arrive in simulated-time order; the server's quota and deadline decide.
        # A device retrying an upload holds the clock for its backoff.
        for at, i in sorted(finish):
            if simulated:
                clock.now = max(clock.now, at)
            uploaded, waited = await fleet.upload(i, clock.now)
            if simulated:
                clock.now += waited
            if uploaded is None:
                network_dropouts += 1
            else:
                discarded += uploaded.status == "discarded"
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
        span = max((at - current.opened_at for at, _ in finish), default=0.0)
        for number in range(current.number, newest + 1):
            closed = await server.round(job, number)
            first = number == current.number
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
                "discarded": discarded if first else 0,
                "dropouts": {
                    "deadline": discarded if first else 0,
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
                "round_seconds": round(elapsed, 3),
                "simulated_seconds": round(sim_total, 3),
                "wall_seconds": round(time.perf_counter() - wall_start, 3),
            }
            if plan.evaluate.every:
                # The devices' measure of the model this round started from.
                record["federated_accuracy"] = _rounded(closed.federated_accuracy)
                record["federated_loss"] = _rounded(closed.federated_loss)
                record["evaluated"] = closed.evaluated
            unreported.append((record, evaluator.results[version]))
        await fleet.rest()
    await report_evaluated()
    return rounds


def _privacy_report(plan: JobPlan, fleet: _Fleet) -> dict[str, Any]:
    """Local DP: what each device spent, from the devices' own ledgers."""
    p = plan.privacy
    if p.dp_epsilon is None:
        return {}
    spent = fleet.epsilon_spent(plan.job.name, p.dp_delta)
    released = [e for e in spent if e > 0]
    return {
        "noise": "seeded from --seed for a reproducible report: a simulation's noise is "
        "not private (devices draw theirs from a CSPRNG)",
        # local: each device's update is (epsilon, delta)-DP; distributed: each round's
        # secure sum is, for every device in it (the ledgers charge the same per round).
        "mechanism": "distributed" if p.distributed_dp else "local",
        "epsilon_per_release": p.dp_epsilon,
        "delta": p.dp_delta,
        "clip": p.clip,
        "budget_epsilon": p.budget_epsilon
        or round(
            GaussianMechanism.for_release(p.dp_epsilon, p.dp_delta, p.clip).epsilon(
                p.dp_delta, plan.job.rounds
            ),
            4,
        ),
        "devices_released": len(released),
        "max_epsilon_spent": max(released, default=0.0),
        "mean_epsilon_spent": round(sum(released) / len(released), 4) if released else 0.0,
        "epsilon_spent_per_device": spent,
    }


def _privacy(text: str) -> dict[str, Any]:
    """``epsilon=8,delta=1e-5,clip=1.0,budget=40`` -> the plan's [privacy] table."""
    names = {
        "epsilon": "dp_epsilon",
        "delta": "dp_delta",
        "clip": "clip",
        "budget": "budget_epsilon",
    }
    table: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = item.partition("=")
        if key not in names:
            raise InvalidInput(f"unknown --dp setting {key!r}; use {', '.join(names)}")
        try:
            table[names[key]] = float(value)
        except ValueError:
            raise InvalidInput(f"--dp {key} needs a number, got {value!r}") from None
    if table and "dp_epsilon" not in table:
        raise InvalidInput("--dp needs epsilon=...")
    return table


def _job_name(dataset: str) -> str:
    """A valid job name for a data set (``csv:my data.csv`` -> ``csv-my-data``)."""
    stem = dataset.split(":")[-1].rsplit(".", 1)[0] if ":" in dataset else dataset
    name = "".join(c if c.isalnum() or c in "_.-" else "-" for c in stem).strip("-.")
    return (name or "job")[:64]


def _ray_fleet(
    config: SimulationConfig, plan: JobPlan, data: Dataset, service: FederationService | None
) -> contextlib.AbstractAsyncContextManager[_Fleet]:
    """The fleet on Ray actors (``--engine ray``), if the ray extra is installed."""
    try:
        from fedclient.sim.engines.ray import ray_fleet
    except ImportError as exc:
        raise InvalidInput(
            f"--engine ray needs the ray extra: pip install 'fedclient[ray]' ({exc})"
        ) from None
    return ray_fleet(config, plan, data, service)


def _round_full(outcome: StepOutcome) -> bool:
    return outcome.status == "waiting" and outcome.reason == "the round is full"


def _token(device: _Device) -> str:
    assert device.client is not None
    identity = device.client.device_state.identity(device.client.server)
    return identity.token if identity else ""
