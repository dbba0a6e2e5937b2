"""The simulated fleet: registered devices, the few that work in a round, and their server.

A `Fleet` holds the registered devices as columns (`fedclient.sim.registry`); a
device that wakes up becomes a `Device` with a real `fedclient.Client` over its own
SQLite state, and goes back to being an id when the round is over. The fleet does
what the rounds ask of the devices, a batch at a time (`Fleet.checkin`,
`Fleet.work`, `Fleet.upload`): `fedclient.sim.engine` drives it in this process,
`fedclient.sim.engines.ray` on Ray actors. `SimServer` is the server it talks to
over HTTP, and `SimClock` the simulated time they both read.
"""

from __future__ import annotations

import asyncio
import hashlib
import operator
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import httpx
import msgspec
import sqlite_utils

from fedclient import (
    Client,
    DeviceState,
    FaultPlan,
    FaultyTransport,
    Phase,
    PrivacyBudgetExceeded,
    RetryPolicy,
    ServerError,
    StateError,
    StepOutcome,
    TransferStats,
    TransportError,
)
from fedclient.identity import IdentityAuthority
from fedclient.privacy.dp import PrivacyLedger
from fedclient.privacy.policy import PrivacyPolicy
from fedclient.protocol import (
    ENROL,
    JOB_STATUS,
    MODEL,
    ROUND_STATUS,
    JobPlan,
    JobStatus,
    RoundSummary,
    TrainSettings,
    Weights,
    decode_tensors,
)
from fedclient.runtime import check_train_options, create_backend
from fedclient.server.database import Database
from fedclient.sim.config import SimulationConfig
from fedclient.sim.datasets import Dataset
from fedclient.sim.devices import DeviceProfile
from fedclient.sim.registry import DeviceRegistry, keep_at_most, register_devices
from fedclient.sim.trainpool import TrainPool
from fedclient.transport import is_retriable_status, raise_for_error, retry_after, ssl_context

__all__ = [
    "DEVICES_PER_STATE_FILE",
    "STATE_FILES",
    "TOTALS",
    "Checkin",
    "Device",
    "Fleet",
    "SimClock",
    "SimServer",
    "Work",
    "device_token",
    "disable_secure_delete",
    "is_round_full",
    "keep_at_most",
    "simulation_authority",
]

#: Devices whose SQLite state shares one database (in memory, or a file under --state-dir).
DEVICES_PER_STATE_FILE = 1024
#: Files of device state under --state-dir, at most: the blocks of `DEVICES_PER_STATE_FILE`
#: devices take turns (file ``(i // 1024) % 64``), so a fleet of millions keeps at most 64
#: files open (192 descriptors: each its write-ahead log and shared memory too), within
#: the 256 a macOS shell allows, rather than one for nearly every device that works.
STATE_FILES = 64


class SimClock:
    """Simulated seconds; the server and every device read time from it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        """The simulated time now (a clock is any callable that returns seconds)."""
        return self.now


@dataclass(slots=True)
class Device:
    """A device at work: built from the registry when it is selected, with a real `Client`
    over its SQLite state, and dropped when the round is over (`Fleet.rest`)."""

    index: int
    profile: DeviceProfile
    size: int  # training examples it holds
    stats: TransferStats = field(default_factory=TransferStats)  # since it woke up
    backoff: float = 0.0  # simulated seconds spent waiting to retry this round
    client: Client | None = None
    received: int = 0  # bytes down when it last checked in
    round_trips: int = 3  # of its last round's work: check-in, download (unless inline), upload

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

    def round_seconds(self, train: TrainSettings, update_bytes: int) -> float:
        """Simulated seconds from its check-in to the end of its upload."""
        return self.profile.round_seconds(
            train.work(self.size),
            1,
            self.stats.bytes_down - self.received,
            update_bytes,
            round_trips=self.round_trips,
        )


#: The transfer statistics a round reports, summed over the fleet.
TOTALS = ("bytes_up", "bytes_down", "retries", "wasted_bytes", "resumed_transfers")


class Checkin(NamedTuple):
    """A device's check-in: its outcome (None: a network dropout) and, once admitted,
    its bearer token (the driver fetches the models it evaluates with one)."""

    device: int
    outcome: StepOutcome | None
    token: str = ""


class Work(NamedTuple):
    """A device's download and training: the outcome (None: a network dropout), the
    simulated seconds from its check-in to the end of its upload, and the seconds it
    waited to retry."""

    device: int
    outcome: StepOutcome | None
    seconds: float
    backoff: float


class Fleet:
    """Every registered device, and the few that are working this round.

    ``registry``: the registered devices (a Ray actor's copy of the driver's); by
    default they are drawn from ``config``'s seed (`register_devices`). A device is a
    `Device` only while it works (``active``); what it keeps between rounds is its
    SQLite state. (`fedclient.sim.engines.ray` subclasses it: the driver keeps the
    registry, and the steps run on the actors.)"""

    def __init__(
        self,
        config: SimulationConfig,
        plan: JobPlan,
        data: Dataset,
        server: SimServer,
        state_dir: Path | None,
        registry: DeviceRegistry | None = None,
    ) -> None:
        if registry is None:  # else a copy of the driver's (on a Ray actor)
            registry = register_devices(config, plan, data)
        self.registry = registry
        self.config, self.plan, self.data, self.server = config, plan, data, server
        self.faults = FaultPlan.parse(config.faults) if config.faults else None
        self.state_dir = state_dir
        self.shards: dict[int, sqlite_utils.Database] = {}
        # Which database holds a device's state: under --state-dir by its index (the
        # same file in every run); in memory in the order devices first worked, so a
        # fleet of millions opens a database per DEVICES_PER_STATE_FILE that worked.
        self.shard_of: dict[int, int] = {}
        self.active: dict[int, Device] = {}
        # The transfer statistics of the devices that went idle (`totals` adds the working).
        self.moved = dict.fromkeys(TOTALS, 0)
        # One model object serves every simulated device: a device's training step sets
        # its weights, trains and reads them back with no await in between.
        self.backend = create_backend(plan.model, config.runtime)
        # Refused now, not mid-run: what the backend (or the plan's trainer) cannot honour.
        self.trainers = config.trainers(plan)
        if not self.trainers:
            check_train_options(self.backend, plan.train.options())
        self.pool: TrainPool | None = None  # or the devices train on worker processes
        # Secure aggregation: the run's identity authority certifies every device's
        # identity key, and every device pins it (see `simulation_authority`).
        self.authority = simulation_authority(config) if plan.privacy.secagg else None
        # The researcher owns the simulated devices: they accept the plan's privacy.
        self.policy = PrivacyPolicy.accepting(
            plan.privacy, (self.authority.public,) if self.authority else ()
        )

    def __len__(self) -> int:
        """Registered devices."""
        return self.registry.size

    def device(self, i: int) -> Device:
        """Working device ``i`` (activated this round)."""
        return self.active[i]

    def train_on(self, pool: TrainPool) -> None:
        """Train on ``pool``'s workers; the download and training of several devices
        then overlap (their protocol steps still run on the loop, one at a time)."""
        self.pool = pool

    def _database(self, i: int) -> sqlite_utils.Database:
        """The SQLite database that holds device ``i``'s state."""
        shard = self.shard_of.get(i)
        if shard is None:
            if self.state_dir is not None:  # the same file in every run, whatever the fleet
                shard = i // DEVICES_PER_STATE_FILE % STATE_FILES
            else:
                shard = len(self.shard_of) // DEVICES_PER_STATE_FILE
            self.shard_of[i] = shard
        if shard not in self.shards:
            if self.state_dir is None:
                db = sqlite_utils.Database(memory=True, execute_plugins=False)
            else:
                db = self._open_file(self.state_dir / f"devices-{shard:04d}.sqlite")
            disable_secure_delete(db)
            self.shards[shard] = db
        return self.shards[shard]

    def _open_file(self, path: Path) -> sqlite_utils.Database:
        """A state file under --state-dir, open (its log too), or `StateError` saying why."""
        try:
            db = sqlite_utils.Database(path, execute_plugins=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=OFF")
            db.execute("BEGIN IMMEDIATE")  # opens the write-ahead log and shared memory now
            db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            raise StateError(
                f"--state-dir: cannot open {path}: {exc} ({len(self.shards)} state files "
                "open, 3 descriptors each; see `ulimit -n`)"
            ) from None
        return db

    def activate(self, i: int, round_number: int) -> Device:
        """Device ``i`` wakes up: a real `Client` over its own SQLite state."""
        d = self.active.get(i)
        if d is not None:
            return d
        registry = self.registry
        d = Device(i, registry.profile(i), registry.count(i))
        db = self._database(i)
        seed = self.config.seed * 100_003 + i
        transport = self.server.transport
        if self.faults is not None and transport is not None:
            transport = FaultyTransport(transport, self.faults, seed=seed * 1009 + round_number)

        async def wait(seconds: float) -> None:  # retries wait on the simulated clock
            d.backoff += seconds

        d.client = Client(
            self.server.base_url,
            self.plan.job.name,
            registry.device_data(i),
            state=DeviceState(db, key=f"device-{i}"),
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
            verify=self.config.ca_bundle or True,
            eval_data=registry.eval_data(i),
            # Reproducible reports: the privacy noise is drawn from the seed too. Not
            # private, and said so: `simulate` and the report both note it.
            simulation_seeded_noise=True,
            policy=self.policy,
            trainers=self.trainers,
        )
        if self.authority is not None:
            state = d.client.device_state
            if state.identity_certificate() is None:  # a new device, or one from --state-dir
                state.set_identity_certificate(self.authority.certify(d.client.identity_key))
        self.active[i] = d
        return d

    # -- what the rounds ask of the devices, a batch at a time (see fedclient.sim.engines.ray)
    def _at(self, now: float) -> None:
        """Set the devices' simulated clock (the server's own, or a Ray actor's copy)."""
        if isinstance(self.server.clock, SimClock):
            self.server.clock.now = now

    async def checkin(self, indices: Sequence[int], round_number: int, now: float) -> list[Checkin]:
        """Devices ``indices`` wake up and check in, in that order, until the round is full."""
        self._at(now)
        answers: list[Checkin] = []
        for i in indices:
            d = self.activate(i, round_number)
            outcome = await d.checkin()
            admitted = outcome is not None and outcome.status == "admitted"
            answers.append(Checkin(i, outcome, device_token(d) if admitted else ""))
            if outcome is not None and is_round_full(outcome):
                break
        return answers

    async def work(self, indices: Sequence[int], now: float) -> list[Work]:
        """Admitted devices ``indices`` download the model and train: one after another,
        or, training on a pool, a few at a time (each device's outcome is the same)."""
        self._at(now)

        async def one(i: int) -> Work:
            d = self.active[i]
            trained = await d.download_and_train()
            seconds = 0.0
            if trained is not None and trained.status == "trained":
                assert d.client is not None
                size = d.client.device_state.update_size(self.plan.job.name)
                seconds = d.round_seconds(self.plan.train, size)
            return Work(i, trained, seconds, d.backoff)

        if self.pool is None:
            return [await one(i) for i in indices]
        # Enough devices in flight to keep every worker busy while the loop downloads.
        slots = asyncio.Semaphore(2 * self.pool.workers + 2)

        async def in_slot(i: int) -> Work:
            async with slots:
                return await one(i)

        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(in_slot(i)) for i in indices]
        return [t.result() for t in tasks]

    async def upload(self, index: int, now: float) -> tuple[StepOutcome | None, float]:
        """Device ``index`` uploads its update: the outcome, and the seconds spent retrying."""
        self._at(now)
        d = self.active[index]
        before = d.backoff
        uploaded = await d.step()
        return uploaded, d.backoff - before

    async def totals(self) -> dict[str, int]:
        """The transfer statistics (`TOTALS`) summed over the fleet."""
        totals = dict(self.moved)
        read = operator.attrgetter(*TOTALS)  # one call per device, not one per figure
        for d in self.active.values():
            for name, value in zip(TOTALS, read(d.stats), strict=True):
                totals[name] += value
        return totals

    async def release(self, i: int) -> None:
        """Device ``i`` goes idle: its client closes, its state stays in SQLite, and
        what it moved joins the fleet's totals."""
        d = self.active.pop(i, None)
        if d is None:
            return
        if d.client is not None:
            await d.client.aclose()
            d.client = None
        read = operator.attrgetter(*TOTALS)
        for name, value in zip(TOTALS, read(d.stats), strict=True):
            self.moved[name] += value

    async def rest(self) -> None:
        """The round is over: working devices go idle again (their state stays in SQLite)."""
        for i in list(self.active):
            await self.release(i)

    def epsilon_spent(self, job: str, delta: float) -> list[float]:
        """Each device's privacy spend on ``job``, from its own ledger (0: never released)."""
        spent = [0.0] * len(self)
        for i in sorted(self.shard_of):
            ledger = PrivacyLedger(self.shards[self.shard_of[i]], f"device-{i}")
            if ledger.releases(job) > 0:
                spent[i] = round(ledger.spent(job, delta), 4)
        return spent

    def close(self) -> None:
        """Close the devices' SQLite databases (after `rest`: no device is working)."""
        for db in self.shards.values():
            db.close()


class _ServerAway(Exception):
    """No answer, or one that says to ask again later (408, 429, 502, 503, 504)."""

    def __init__(self, what: str, retry_after: float | None = None) -> None:
        super().__init__(what)
        self.retry_after = retry_after


@dataclass
class SimServer:
    """The server the fleet talks to, over HTTP: in-process (ASGI) or remote."""

    base_url: str
    transport: httpx.AsyncBaseTransport | None
    clock: Callable[[], float] = time.time
    tick: Callable[[], None] | None = None  # the in-process server's deadline timer

    http: httpx.AsyncClient | None = None  # the driver's own connection, once it asked
    credential: str | None = None  # what a remote server's enrolment policy asks for
    observer: str = ""  # the driver's own device token, if a remote server wanted one
    verify: str | bool = True  # a remote server's certificate: a CA bundle, or the system's

    patience: float = 60.0  # seconds a remote server may stop answering before the run ends

    async def _get(self, path: str, token: str = "") -> bytes:
        """GET ``path`` from the server; a server that is away (no answer, 408, 429, 5xx
        that passes) is asked again with backoff for up to ``patience`` seconds, as a
        restarting server needs, then the run ends with a `TransportError` naming it."""
        retry = RetryPolicy(
            max_attempts=1_000, base_seconds=0.25, cap_seconds=5.0,
            max_total_seconds=self.patience,
        )  # fmt: skip
        attempt, waited = 0, 0.0
        while True:
            attempt += 1
            try:
                return await self._get_once(path, token)
            except _ServerAway as exc:
                wait = retry.delay(attempt, waited, exc.retry_after)
                if wait is None:
                    raise TransportError(
                        f"the server at {self.base_url} did not answer GET {path} for "
                        f"{waited:.0f} s: {exc}"
                    ) from None
                print(
                    f"fedsim: the server at {self.base_url} did not answer GET {path} ({exc}); "
                    f"asking again in {wait:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
            await asyncio.sleep(wait)
            waited += wait

    async def _get_once(self, path: str, token: str) -> bytes:
        if self.http is None:
            self.http = httpx.AsyncClient(
                transport=self.transport, timeout=30, verify=ssl_context(self.verify)
            )
        token = token or self.observer
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            response = await self.http.get(self.base_url + path, headers=headers)
        except httpx.TransportError as exc:
            raise _ServerAway(f"{type(exc).__name__}: {exc}") from None
        if is_retriable_status(response.status_code):
            raise _ServerAway(f"HTTP {response.status_code}", retry_after(response))
        if response.status_code == 401 and not token:
            # A server whose status is not public: the driver reads it as a device would.
            enrolled = await self.http.post(
                self.base_url + ENROL.url(),
                json={"label": "fedsim-observer", "credential": self.credential},
            )
            raise_for_error(enrolled)
            self.observer = str(enrolled.json()["token"])
            return await self._get_once(path, "")
        raise_for_error(response)
        return response.content

    async def aclose(self) -> None:
        """Close the driver's own connection, if it opened one."""
        if self.http is not None:
            await self.http.aclose()
            self.http = None

    async def status(self, job: str) -> JobStatus:
        """The job's status: its current round, or that it finished."""
        return msgspec.json.decode(await self._get(JOB_STATUS.url(job=job)), type=JobStatus)

    async def round(self, job: str, number: int) -> RoundSummary:
        """Round ``number`` of ``job``, open or closed."""
        body = await self._get(ROUND_STATUS.url(job=job, number=number))
        return msgspec.json.decode(body, type=RoundSummary)

    async def model(self, job: str, version: int, token: str) -> Weights:
        """Model ``version`` of ``job``, fetched with a device's bearer ``token``."""
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


def simulation_authority(config: SimulationConfig) -> IdentityAuthority:
    """The run's identity authority: in a deployment the operator's, kept away from the
    server; here drawn from the seed, so every Ray actor and the in-process server hold
    the same one (a simulation plays every party)."""
    seed = hashlib.sha256(f"fedsim/identity-authority/{config.seed}".encode()).digest()
    return IdentityAuthority(seed)


def disable_secure_delete(db: sqlite_utils.Database | Database) -> None:
    """No zeroing of freed pages in a simulation's databases.

    Builds of SQLite that default to ``secure_delete`` (Debian's among them) overwrite
    every page a deleted row frees: each replaced model and each dropped update is
    eight 4 KiB pages zeroed, a seventh of a W2 run's instructions (callgrind). That
    protects data at rest on a device; a simulation's throwaway databases hold
    nothing to protect. (`fedclient.DeviceState` keeps the platform's setting.)"""
    db.execute("PRAGMA secure_delete=OFF")


def is_round_full(outcome: StepOutcome) -> bool:
    """Whether a check-in was turned away because the round has all the devices it admits."""
    return outcome.status == "waiting" and outcome.reason == "the round is full"


def device_token(device: Device) -> str:
    """The bearer token of a working device's identity ("" before it enrolled)."""
    assert device.client is not None
    identity = device.client.device_state.identity(device.client.server)
    return identity.token if identity else ""
